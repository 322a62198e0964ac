"""Guards that keep a decode round well defined when the drafter misbehaves, and the testing-only
fault injector that proves they work (pure torch: no sglang import, unit-testable).

A guard may only *shorten* what is verified, and decides from drafter-side values that precede the
draft it admits (the invariant of schedulers.py), so the output stays exactly the target's:

- `usable_draft_prefix`: draft x_k is usable when its distribution q_k is finite and x_k is a
  target-vocabulary id. q_k reads x_<k only, and a valid drafter never fails the token check, so
  cutting the chain before the first unusable draft is lossless. A drafter that emits NaN from the
  start gets 0 usable drafts: that request decodes plainly for the round.
- `sanitize_confidences`: confidences are probabilities. NaN or -inf -> 0 (no evidence: do not
  speculate from there on), +inf and anything above 1 -> 1, anything below 0 -> 0. The schedulers
  tolerate degenerate values too (schedulers.py, "Degenerate confidences"); sanitizing here makes
  the worker's contract explicit and lets it count the fault.

The third fault, an exception inside the draft step, is handled by the worker itself: the whole
round verifies nothing (verify length 0, one target token per request) and the server keeps going.
"""

from __future__ import annotations

import math
import random

import torch

from dspark_sglang.drafters.interface import DraftBlock


def usable_draft_prefix(
    probs: torch.Tensor,  # [R, gamma, V] draft distributions q_k
    tokens: torch.Tensor,  # [R, gamma] int64 drafts x_k
    vocab_size: int,
) -> torch.Tensor:  # [R] int64 in [0, gamma]: leading drafts that may be verified
    # One reduction over V: a NaN or inf anywhere in q_k makes its sum non-finite.
    ok = torch.isfinite(probs.sum(dim=-1)) & (tokens >= 0) & (tokens < vocab_size)  # [R, gamma]
    return ok.long().cumprod(dim=1).sum(dim=1)


def sanitize_confidences(
    confidences: torch.Tensor,  # [R, gamma] float, calibrated c_k (should lie in [0, 1])
) -> tuple[torch.Tensor, torch.Tensor]:  # ([R, gamma] float32 in [0, 1], [R] bool: row had garbage)
    c = confidences.float()
    garbage = ~((c >= 0) & (c <= 1))  # NaN fails both comparisons
    clean = torch.nan_to_num(c, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    return clean, garbage.any(dim=1)


class InjectedFault(RuntimeError):
    """Raised by the fault injector inside the draft step (DSPARK_TEST_FAULT=draft_exception)."""


# What a broken confidence head might emit; every value lies outside [0, 1].
GARBAGE_CONFIDENCES = (math.nan, math.inf, -math.inf, 1e30, -3.0, 7.0)


class FaultInjector:
    """Testing only (DSPARK_TEST_FAULT, settings.py). Corrupts the drafter's outputs the way a broken
    drafter would, at the points where the worker's guards read them. Draws come from a private
    seeded generator, so the acceptance random stream (and sampled outputs) is untouched."""

    def __init__(self, faults: dict[str, float], seed: int = 0) -> None:
        self.faults = dict(faults)  # kind -> probability per request and round (per round: draft_exception)
        self.rng = random.Random(seed)
        self.injected = {kind: 0 for kind in self.faults}  # request-rounds, as WorkerStats.faults counts

    def _rows(self, kind: str, num_reqs: int) -> list[int]:
        p = self.faults.get(kind)
        rows = [r for r in range(num_reqs) if self.rng.random() < p] if p else []
        if rows:
            self.injected[kind] += len(rows)
        return rows

    def maybe_raise(self, num_reqs: int) -> None:
        """draft_exception: raise for the whole round (drawn once per round, counted per request)."""
        p = self.faults.get("draft_exception")
        if p and self.rng.random() < p:
            self.injected["draft_exception"] += num_reqs
            raise InjectedFault("DSPARK_TEST_FAULT: injected exception in the draft step")

    def maybe_extra_sync(self, tensor: torch.Tensor) -> None:
        """extra_sync: one more host read in the round (per round), the negative control that shows
        the host-sync counter (host_syncs.py) sees a sync added to the decode path."""
        p = self.faults.get("extra_sync")
        if p and self.rng.random() < p:
            self.injected["extra_sync"] += 1
            tensor.sum().item()

    def corrupt_block(self, block: DraftBlock) -> DraftBlock:
        """nan_draft: q (and q(x)) of a chosen request turn NaN from a random position on."""
        rows = self._rows("nan_draft", block.tokens.shape[0])
        if not rows:
            return block
        probs, token_probs = block.probs.clone(), block.token_probs.clone()
        for r in rows:
            start = self.rng.randrange(probs.shape[1])
            probs[r, start:] = math.nan
            token_probs[r, start:] = math.nan
        return DraftBlock(block.tokens, probs, token_probs, block.confidence_logits, block.top1_probs)

    def corrupt_confidences(self, confidences: torch.Tensor) -> torch.Tensor:  # [R, gamma]
        """garbage_confidence: a chosen request's confidences become values from GARBAGE_CONFIDENCES
        (at one random position at least, the rest kept or replaced at random)."""
        rows = self._rows("garbage_confidence", confidences.shape[0])
        if not rows:
            return confidences
        out = confidences.clone()
        gamma = out.shape[1]
        for r in rows:
            hit = self.rng.randrange(gamma)
            for k in range(gamma):
                if k == hit or self.rng.random() < 0.5:
                    out[r, k] = self.rng.choice(GARBAGE_CONFIDENCES)
        return out
