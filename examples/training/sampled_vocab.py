"""Sampled-softmax training for block drafters (`--vocab-sample N`): the LM head over a per-step
subset of the vocabulary instead of all of it.

On a CPU the frozen LM head is most of a training step (224 rows x 49152 x 576, forward and
backward: ~0.65 s of ~0.85 s on one core). Every term of the loss reads the draft distribution only
at the target's top-K tokens and the label; the rest of the vocabulary enters through the softmax
normaliser Z = Σ_v exp(z_v). So each step keeps
- every token any supervised row needs (its target top-K and its label): the "positives", exact;
- N "negatives" drawn uniformly without replacement from the rest, each standing for
  (V − |positives|) / N tokens: adding log of that weight to their logits makes their exp-sum an
  unbiased estimate of the rest's share of Z (sampled softmax with importance weights).
With N ≥ V − |positives| nothing is sampled and the loss is exact. Evaluation always uses the full
vocabulary, so a drafter trained this way is measured like any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_vocabulary(
    needed: torch.Tensor,  # any shape, int64 token ids the loss reads (target top-K ids, labels)
    vocab_size: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [n] int64, log_weights [n] float32, lookup [V] int64: id -> column in ids or -1)."""
    positives = torch.unique(needed.reshape(-1))
    is_positive = torch.zeros(vocab_size, dtype=torch.bool)
    is_positive[positives] = True
    rest = (~is_positive).nonzero().squeeze(1)  # [V - P]
    if num_negatives >= rest.numel():
        negatives, log_weight = rest, 0.0
    else:
        negatives = rest[torch.randperm(rest.numel(), generator=generator)[:num_negatives]]
        log_weight = math.log(rest.numel() / num_negatives)
    ids = torch.cat([positives, negatives])
    log_weights = torch.cat([torch.zeros(positives.numel()), torch.full((negatives.numel(),), log_weight)])
    lookup = torch.full((vocab_size,), -1, dtype=torch.int64)
    lookup[ids] = torch.arange(ids.numel())
    return ids, log_weights, lookup


def sampled_block_scores(
    drafter,
    hidden: torch.Tensor,  # [N, G, H] block hidden states
    prev_tokens: torch.Tensor,  # [N, G] int64 [anchor, gt_1 .. gt_{G-1}]
    ids: torch.Tensor,  # [n] vocabulary columns kept this step
    log_weights: torch.Tensor,  # [n]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft logits U + B over the kept columns, importance-weighted [N, G, n] (float32), and the
    confidence logits [N, G] (or None): `forward.block_scores` restricted to `ids`."""
    logits = F.linear(hidden, drafter.lm_head.weight[ids]).float() + log_weights
    markov, confidence = drafter.markov_head, drafter.confidence_head
    rows = None
    if markov is not None:
        if markov.kind != "vanilla":
            raise ValueError(f"--vocab-sample supports the vanilla Markov head only, not {markov.kind!r}")
        rows = markov.markov_w1(prev_tokens)  # [N, G, rank]
        logits = logits + F.linear(rows, markov.markov_w2.weight[ids]).float()  # the bigram bias B
    conf = confidence(hidden, rows) if confidence is not None else None
    return logits, conf
