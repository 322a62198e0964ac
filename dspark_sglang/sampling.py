"""Sampling-parameter processing with SGLang 0.5.23 semantics, shared by target and draft.

Lossless acceptance needs p (target) and q (draft) processed identically: temperature, then
top-k / top-p / min-p masking of the tempered softmax, renormalised. Greedy (temperature <= 1e-5)
is a one-hot argmax (first index on ties), which makes the ratio test an exact-match test.
"""

from __future__ import annotations

import torch

GREEDY_EPS = 1e-5


def is_greedy(temperatures: torch.Tensor) -> torch.Tensor:
    """[R] float -> [R] bool."""
    return temperatures <= GREEDY_EPS


def process_logits(
    logits: torch.Tensor,  # [N, V]
    temperatures: torch.Tensor,  # [N]
    top_ks: torch.Tensor,  # [N] int64, <= 0 or >= V disables
    top_ps: torch.Tensor,  # [N]
    min_ps: torch.Tensor,  # [N]
) -> torch.Tensor:
    """Return the normalised distribution [N, V] float32 a sampler draws from.

    Rows with greedy temperature become one-hot at the argmax. Non-finite logits are treated as
    -inf (never sampled); a row with no finite logit falls back to a one-hot at index 0 so callers
    never see NaN.
    """
    logits = logits.float()
    num_rows, vocab = logits.shape
    logits = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, float("-inf")))
    greedy = is_greedy(temperatures)
    safe_t = torch.where(greedy, torch.ones_like(temperatures), temperatures).float()
    probs = torch.softmax(logits / safe_t[:, None], dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)

    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where((top_ks <= 0) | (top_ks >= vocab), torch.full_like(top_ks, vocab), top_ks)
    drop = ranks >= k[:, None]
    # SGLang: a token is dropped by top-p when the mass strictly before it already exceeds top_p.
    exclusive_cumsum = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= exclusive_cumsum > top_ps[:, None]
    drop |= sorted_probs < (sorted_probs[:, :1] * min_ps[:, None])
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)

    argmax = logits.argmax(dim=-1)
    one_hot = torch.nn.functional.one_hot(argmax, vocab).float()
    filtered = torch.where(greedy[:, None], one_hot, filtered)
    total = filtered.sum(-1, keepdim=True)
    dead = total.squeeze(-1) <= 0
    if dead.any():
        filtered[dead] = torch.nn.functional.one_hot(torch.zeros_like(argmax[dead]), vocab).float()
        total = filtered.sum(-1, keepdim=True)
    return filtered / total
