"""Sampling-parameter processing with SGLang 0.5.23 semantics, shared by target and draft.

Lossless acceptance needs p (target) and q (draft) processed identically. This module mirrors what
SGLang's own sampler does to one row of logits (`sglang/srt/layers/sampler.py`, the `pytorch`
backend `top_k_top_p_min_p_sampling_from_probs_torch`, and `SamplingParams.normalize`):

1. Non-finite logits are sanitised as `sanitize_nan_logits` does: NaN -> -1e30, +inf -> +1e30,
   -inf -> -1e30 (SGLang does this only under SGLANG_SANITIZE_NAN_LOGITS; we always do, so a bad
   row can never produce NaN probabilities).
2. Greedy: SGLang rewrites `0 <= temperature < 1e-6` to `temperature=1, top_k=1`, and an
   all-greedy batch takes `argmax(logits)`. So a row is greedy when `temperature < 1e-6` or
   `top_k == 1`; its distribution is a one-hot at the argmax of the logits (first index on ties).
3. Otherwise `softmax(logits / temperature)`, then, on the probabilities sorted descending:
   - top-k: zero ranks >= top_k (`top_k <= 0` or `top_k >= V` disables; SGLang's "all" is 1 << 30);
   - top-p: zero a token when the mass strictly before it (exclusive cumsum) exceeds top_p;
   - min-p: zero a token whose probability is below `min_p * max_prob`.
   The three masks are all computed from the unfiltered softmax, as in SGLang. The survivors are
   renormalised (SGLang's `torch.multinomial` does this implicitly).

Ties in the sort keep the lower token id first (stable sort); SGLang's sort is not stable, so the
two may keep different members of a tie that straddles a top-k cut. Nothing else differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# SGLang's _SAMPLING_EPS: `0 <= temperature < 1e-6` means greedy (sampling_params.py).
GREEDY_EPS = 1e-6
# SGLang's sanitize_nan_logits value: finite, so logits / temperature cannot overflow to inf.
_LOGIT_SENTINEL = 1e30


@dataclass
class SamplingBatch:
    """Per-request sampling parameters, SGLang semantics (see the module docstring)."""

    temperatures: torch.Tensor  # [R] float32; < 1e-6 means greedy
    top_ks: torch.Tensor  # [R] int; >= vocab or <= 0 means off; 1 means greedy
    top_ps: torch.Tensor  # [R] float32; 1.0 means off
    min_ps: torch.Tensor  # [R] float32; 0.0 means off
    # Whether any row filters (top-k / top-p / min-p), when the host knows it (SGLang's need_*_sampling
    # flags); None: `process_logits` reads it off the device, which costs a host sync on a GPU.
    filtering: bool | None = None
    # Whether every row is greedy, when the host knows it (SGLang's is_all_greedy): acceptance then
    # needs only the target's argmax tokens, not [R, W, V] probabilities.
    all_greedy: bool | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """`process_logits` of [R, V] logits, one row per request."""
        return process_logits(logits, self.temperatures, self.top_ks, self.top_ps, self.min_ps,
                              filtering=self.filtering)

    @classmethod
    def greedy(cls, num_reqs: int, device: torch.device | str = "cpu") -> "SamplingBatch":
        return cls(
            temperatures=torch.zeros(num_reqs, device=device),
            top_ks=torch.full((num_reqs,), -1, dtype=torch.int64, device=device),
            top_ps=torch.ones(num_reqs, device=device),
            min_ps=torch.zeros(num_reqs, device=device),
            filtering=False,
            all_greedy=True,
        )

    def is_greedy(self) -> torch.Tensor:
        """[R] bool, see `is_greedy`."""
        return is_greedy(self.temperatures, self.top_ks)


def is_greedy(
    temperatures: torch.Tensor,  # [N] float
    top_ks: torch.Tensor | None = None,  # [N] int, optional
) -> torch.Tensor:
    """Which rows SGLang samples greedily.

    Shape: ``temperatures`` [N], ``top_ks`` [N] or None; returns [N] bool.
    A row is greedy when ``temperature < 1e-6`` (SGLang's threshold, which also catches the
    invalid negative temperatures) or ``top_k == 1`` (what SGLang rewrites greedy requests to, so
    parameters read back from a ``SamplingBatchInfo`` are recognised).
    """
    greedy = temperatures < GREEDY_EPS
    if top_ks is not None:
        greedy = greedy | (top_ks == 1)
    return greedy


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Float32 copy with SGLang's NaN/inf replacement (NaN, -inf -> -1e30; +inf -> +1e30)."""
    return torch.nan_to_num(
        logits.float(), nan=-_LOGIT_SENTINEL, posinf=_LOGIT_SENTINEL, neginf=-_LOGIT_SENTINEL
    )


def _check_rows(name: str, tensor: torch.Tensor, num_rows: int) -> None:
    if tensor.shape != (num_rows,):
        raise ValueError(f"{name} must have shape [{num_rows}], got {tuple(tensor.shape)}")


def process_logits(
    logits: torch.Tensor,  # [N, V]
    temperatures: torch.Tensor,  # [N]
    top_ks: torch.Tensor,  # [N] int, <= 0 or >= V disables, 1 is greedy
    top_ps: torch.Tensor,  # [N]
    min_ps: torch.Tensor,  # [N]
    filtering: bool | None = None,
) -> torch.Tensor:
    """The normalised distribution SGLang's sampler would draw each row's next token from.

    Shape: ``logits`` [N, V]; ``temperatures``, ``top_ks``, ``top_ps``, ``min_ps`` [N].
    ``filtering``: whether any row may filter (top-k / top-p / min-p), known on the host; None reads
    it off the parameters (a host sync on a GPU). False skips the O(V log V) sort: only pass False
    when no row filters, or the filters of those rows are silently dropped.

    Returns
    -------
    probs : [N, V] float32
        Rows sum to 1 and contain no NaN. Greedy rows (see `is_greedy`) are one-hot at the argmax.
        Should a row still lose all its mass (only with invalid parameters such as a NaN
        temperature or ``top_p <= 0``), it falls back to the one-hot argmax.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    num_rows, vocab = logits.shape
    for name, tensor in (("temperatures", temperatures), ("top_ks", top_ks),
                         ("top_ps", top_ps), ("min_ps", min_ps)):
        _check_rows(name, tensor, num_rows)
    logits = sanitize_logits(logits)
    greedy = is_greedy(temperatures, top_ks)  # [N]
    # [N, V] float32 one-hot at the argmax (scattered: F.one_hot would build an int64 [N, V] first)
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)

    safe_t = torch.where(greedy, torch.ones_like(temperatures), temperatures).float()  # [N]
    probs = torch.softmax(logits / safe_t[:, None], dim=-1)  # [N, V]

    top_ks = torch.where((top_ks <= 0) | (top_ks >= vocab), torch.full_like(top_ks, vocab), top_ks)
    # Skip the O(V log V) sort when no row filters (SGLang's need_*_sampling flags, or a device check).
    if filtering is None:
        filtering = bool(((top_ks < vocab) | (top_ps < 1.0) | (min_ps > 0.0)).any())
    if filtering:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)  # [N, V]
        ranks = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
        drop = ranks >= top_ks[:, None]
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_ps[:, None].float()
        drop |= sorted_probs < sorted_probs[:, :1] * min_ps[:, None].float()
        probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs.masked_fill(drop, 0.0))

    total = probs.sum(dim=-1, keepdim=True)  # [N, 1]
    usable = (total > 0) & torch.isfinite(total) & ~greedy[:, None]
    return torch.where(usable, probs / torch.where(usable, total, 1.0), one_hot)


CDF_BLOCK = 1024  # vocabulary entries per block of the two-level inverse CDF


def sample_from_probs(
    probs: torch.Tensor,  # [N, V] non-negative weights (need not be normalised)
    uniforms: torch.Tensor,  # [N] U(0, 1)
) -> torch.Tensor:
    """Inverse-CDF draw: token ``i`` such that ``cdf[i-1] <= u * total < cdf[i]``.

    Shape: ``probs`` [N, V], ``uniforms`` [N]; returns [N] int64.

    Two levels, accumulated in float64 without a vocabulary-sized float64 tensor: block sums of
    CDF_BLOCK entries pick the block ([N, V / CDF_BLOCK]), then a CDF within that block picks the
    token ([N, CDF_BLOCK]). The one vocabulary-sized temporary is the cleaned float32 copy of the
    weights (a float64 CDF over the vocabulary was 4x the input: 4.7 GB at 1920 rows of 152k).

    Robust to rounding: ``u`` is clamped to [0, 1]; the result never has zero weight (the first entry
    whose CDF exceeds a non-negative target has positive weight) and never exceeds the last positive
    index (u * total may round up to total). NaN, inf and negative weights count as zero. A row with
    no positive weight returns 0.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, V], got shape {tuple(probs.shape)}")
    _check_rows("uniforms", uniforms, probs.shape[0])
    weights = torch.nan_to_num(probs.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min_(0.0)  # [N, V]
    rows, vocab = weights.shape
    block = max(1, min(CDF_BLOCK, vocab))  # a small vocabulary is one block of exactly V entries
    full = vocab // block * block
    # Block sums in float32 (pairwise summation: relative error ~1e-7, the weights' own rounding), read
    # through a view; torch's sum(dtype=float64) would first copy the whole [N, V] to float64.
    sums = [weights[:, :full].reshape(rows, full // block, block).sum(-1)]
    if full < vocab:
        sums.append(weights[:, full:].sum(-1, keepdim=True))
    block_sums = torch.cat(sums, dim=1).double()  # [N, B]
    block_cdf = block_sums.cumsum(dim=-1)  # [N, B]
    target = uniforms.double().clamp(0.0, 1.0)[:, None] * block_cdf[:, -1:]  # [N, 1]
    chosen = torch.searchsorted(block_cdf, target, right=True)  # [N, 1]
    chosen = torch.minimum(chosen, _last_positive(block_sums)[:, None])  # u * total may round up to total
    # Within the chosen block: [N, block] float64 weights (past the vocabulary: zero).
    cols = chosen * block + torch.arange(block, device=weights.device)  # [N, block]
    inside = weights.gather(1, cols.clamp(max=vocab - 1)).double().masked_fill(cols >= vocab, 0.0)
    before = (block_cdf.gather(1, chosen) - block_sums.gather(1, chosen))  # [N, 1] mass of earlier blocks
    offset = torch.searchsorted(inside.cumsum(dim=-1), (target - before).clamp_min(0.0), right=True)  # [N, 1]
    offset = torch.minimum(offset, _last_positive(inside)[:, None]).squeeze(1)  # [N]
    return chosen.squeeze(1) * block + offset  # a row without positive weight: block 0, offset 0


def draw(
    sampling: SamplingBatch,  # N rows
    logits: torch.Tensor,  # [N, V]
    uniforms: torch.Tensor,  # [N] U(0, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, V] float32, token [N] int64): `sampling.probs(logits)` and the inverse-CDF draw from it.

    A batch the host knows to be all greedy skips the softmax and the CDF: `process_logits` makes a
    greedy row one-hot at the argmax of its sanitized logits, and the draw from a one-hot row is that
    argmax, so both are computed directly (the same tensors; the uniforms go unused either way)."""
    if sampling.all_greedy:
        token = sanitize_logits(logits).argmax(dim=-1)  # [N]
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(
            -1, token[:, None], 1.0), token
    q = sampling.probs(logits)
    return q, sample_from_probs(q, uniforms)


def _last_positive(weights: torch.Tensor) -> torch.Tensor:
    """[N] index of each row's last positive entry (0 for a row without one). weights [N, K]."""
    positive = weights > 0
    last = weights.shape[1] - 1 - positive.flip(-1).int().argmax(dim=-1)
    return torch.where(positive.any(dim=-1), last, 0)


def top1_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., gamma, V] draft logits z_k -> [..., gamma] float32 max_v softmax(z_k)(v), without
    materialising the softmax."""
    z = logits.float()
    return torch.exp(z.amax(dim=-1) - torch.logsumexp(z, dim=-1))
