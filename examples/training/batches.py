"""Training batches: right-padded sequences with sampled anchors, and the supervised (anchor, slot)
targets of the block drafters (DSpark, DFlash). Shared by training, its held-out evaluation and the
confidence-head refit, so all three supervise exactly the same rows."""

from __future__ import annotations

import random

import torch

from examples.training.features import FeatureSet
from examples.training.forward import block_hidden_train


def anchor_candidates(seq: dict) -> list[int]:
    """Anchor positions a with a and a+1 both response tokens (DeepSpec: both in the loss mask)."""
    return list(range(seq["prompt_len"], seq["tokens"].numel() - 1))


def collate(fs: FeatureSet, seq_ids: list[int], rng: random.Random, num_anchors: int | None):
    """Right-padded batch tensors and anchors [S, A] (+ keep [S, A]); num_anchors None = all."""
    seqs = [fs.seq(s) for s in seq_ids]
    T = max(s["tokens"].numel() for s in seqs)
    S, F_, K = len(seqs), fs.feature_width, fs.topk
    tokens = torch.zeros(S, T, dtype=torch.int64)
    feats = torch.zeros(S, T, F_, dtype=torch.float32)
    tk_ids = torch.zeros(S, T, K, dtype=torch.int64)
    tk_lp = torch.full((S, T, K), -1e4, dtype=torch.float32)
    valid = torch.zeros(S, T, dtype=torch.bool)
    prompt_lens = torch.zeros(S, dtype=torch.int64)
    cands = []
    for i, s in enumerate(seqs):
        n = s["tokens"].numel()
        tokens[i, :n], feats[i, :n], tk_ids[i, :n], tk_lp[i, :n] = s["tokens"], s["features"].float(), s["topk_ids"], s["topk_logp"]
        valid[i, :n] = True
        prompt_lens[i] = s["prompt_len"]
        cands.append(anchor_candidates(s))
    A = num_anchors or max(len(c) for c in cands)
    anchors = torch.zeros(S, A, dtype=torch.int64)
    keep = torch.zeros(S, A, dtype=torch.bool)
    for i, c in enumerate(cands):
        chosen = sorted(rng.sample(c, min(A, len(c)))) if num_anchors else c
        anchors[i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
        keep[i, : len(chosen)] = True
        anchors[i, len(chosen):] = max(1, int(prompt_lens[i]))  # dummy anchors, masked out of the loss
    return dict(tokens=tokens, feats=feats, tk_ids=tk_ids, tk_lp=tk_lp, valid=valid, lengths=valid.sum(1),
                anchors=anchors, keep=keep)


def block_targets(b: dict, G: int):
    """Labels, teacher-forced prev tokens, validity and target top-K for every (anchor, slot)."""
    S, A = b["anchors"].shape
    slot_pos = b["anchors"][:, :, None] + torch.arange(G)  # [S, A, G] position of each slot's input row
    label_pos = slot_pos + 1  # slot k predicts the token at a + k + 1
    valid = (label_pos < b["lengths"][:, None, None]) & b["keep"][:, :, None]
    valid = valid.int().cumprod(-1).bool()  # a contiguous supervised prefix (DeepSpec's eval_mask)
    T = b["tokens"].shape[1]
    lp = label_pos.clamp(max=T - 1)
    sp = slot_pos.clamp(max=T - 1)
    flat = lambda x, idx: x.gather(1, idx.reshape(S, -1)).reshape(S, A, G)  # noqa: E731
    labels = flat(b["tokens"], lp)
    prev = flat(b["tokens"], sp)  # [anchor, gt_1 .. gt_{G-1}]
    K = b["tk_ids"].shape[-1]
    idx = sp.reshape(S, -1, 1).expand(-1, -1, K)
    tk_ids = b["tk_ids"].gather(1, idx).reshape(S, A, G, K)  # row a+k describes the token at a+k+1
    tk_lp = b["tk_lp"].gather(1, idx).reshape(S, A, G, K)
    return labels, prev, valid, tk_ids, tk_lp


def supervised_blocks(drafter, b: dict):
    """The kept anchors of batch `b` through the drafter's block forward, with their targets:
    hidden [N, G, H], labels [N, G], prev [N, G], valid [N, G], tk_ids [N, G, K], tk_lp [N, G, K]."""
    G = drafter.config.block_size
    hidden = block_hidden_train(drafter, b["feats"], b["valid"], b["tokens"], b["anchors"])  # [S, A, G, H]
    labels, prev, valid, tk_ids, tk_lp = block_targets(b, G)
    keep = b["keep"].reshape(-1)
    sel = lambda x: x.reshape(-1, *x.shape[2:])[keep]  # noqa: E731
    return sel(hidden), sel(labels), sel(prev), sel(valid), sel(tk_ids), sel(tk_lp)
