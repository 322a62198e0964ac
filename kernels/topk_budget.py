"""Top-budget allocation for the scheduler in one launch: the fused twin of
`dspark_sglang.schedulers.admit_top` (used by LaggedBudgetScheduler and Algorithm1Scheduler).

Given survivals ``s[r, k]`` and a budget K, each request's verify length is the number of its
entries among the K highest-ranked candidates, rank = (survival desc, position asc, request asc);
negative survivals (-inf marks a non-candidate) are never admitted.

Same key as the reference (schedulers.py module doc): ``key = float32_bits(s) << 32 | (N-1-idx)``
with the position-major index idx = k*R + r, N = R*L. Keys are unique, so the admitted set is
``key >= T`` with T the K-th largest key (or 0 when fewer than K keys are non-negative). One
program finds T bit by bit, from bit 62 down (keys of non-negative floats are < 2^63): keep the bit
when at least K keys are >= the candidate threshold; of the offset half only the low
ceil(log2 N) bits can be set, so 31 + ceil(log2 N) rounds suffice. Then it counts ``key >= T`` per
request.
Integer compares only, so the result equals the reference exactly.

Memory traffic: 31 + ceil(log2 RL) counting passes plus one final pass over the R*L float32 survivals (4RL bytes
each; for R*L <= 4096 the tile stays in L1/L2, so DRAM sees ~4RL bytes), and 8R bytes written. The
work is latency-bound (one CTA, ~40 reductions); it replaces a sort/kthvalue and a host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark_sglang import schedulers
from dspark_sglang.kernels._common import check, check_tensor, interpreting, next_pow2, rank_offsets

__all__ = ["topk_budget", "topk_budget_ref", "rank_offsets"]

_WHERE = "kernels/topk_budget.py"


def topk_budget_ref(
    survival: torch.Tensor,  # [R, L] float32; < 0 (-inf) = not a candidate
    count: int,
) -> torch.Tensor:  # [R] int64
    """The torch reference: `schedulers.admit_top` with the canonical offsets."""
    num_reqs, num_pos = survival.shape
    return schedulers.admit_top(survival, int(count), rank_offsets(num_reqs, num_pos, survival.device))


@triton.jit
def _keys(surv_ptr, rows, cols, num_reqs, num_pos, stride_r):
    """[BLOCK_R, BLOCK_L] int64 rank keys; -1 outside the [R, L] table (never admitted)."""
    valid = (rows[:, None] < num_reqs) & (cols[None, :] < num_pos)
    vals = tl.load(surv_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=valid, other=-1.0)
    bits = vals.to(tl.int32, bitcast=True).to(tl.int64)  # sign-extended: negative floats -> < 0
    total = num_reqs.to(tl.int64) * num_pos
    index = cols[None, :].to(tl.int64) * num_reqs + rows[:, None]
    key = (bits << 32) + (total - 1 - index)
    return tl.where(valid, key, -1)


@triton.jit(do_not_specialize=["num_reqs", "num_pos", "count", "low_bits"])
def _topk_budget_kernel(
    surv_ptr,  # [R, L] float32
    out_ptr,  # [R] int64
    num_reqs,
    num_pos,
    count,
    low_bits,  # bit length of N - 1 (>= 1)
    stride_r,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    row_offs = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    threshold = tl.zeros([], tl.int64)
    # Bits 62..32 hold the survival's float bits; of the offset half (bits 31..0) only the low
    # `low_bits` can be set (offsets < N <= 2^low_bits), so the bits between stay 0 in T.
    for step in range(0, 31 + low_bits):
        bit = tl.where(step < 31, 62 - step, low_bits - 1 - (step - 31)).to(tl.int64)
        cand = threshold | (tl.full([], 1, tl.int64) << bit)
        ranked = tl.zeros([], tl.int64)
        for r0 in range(0, num_reqs, BLOCK_R):
            key = _keys(surv_ptr, r0 + row_offs, cols, num_reqs, num_pos, stride_r)
            ranked += tl.sum(tl.sum((key >= cand).to(tl.int64), 1), 0)
        threshold = tl.where(ranked >= count, cand, threshold)
    for r0 in range(0, num_reqs, BLOCK_R):
        rows = r0 + row_offs
        key = _keys(surv_ptr, rows, cols, num_reqs, num_pos, stride_r)
        admitted = tl.sum((key >= threshold).to(tl.int64), 1)  # masked keys are -1 < threshold
        tl.store(out_ptr + rows, admitted, mask=rows < num_reqs)


def topk_budget(
    survival: torch.Tensor,  # [R, L] float32 survivals; < 0 (-inf) = not a candidate
    count: int,  # budget K: candidates admitted in total
    *,
    out: torch.Tensor | None = None,  # [R] int64
    block_r: int | None = None,  # rows per tile (default: a ~4k-element tile)
    num_warps: int = 4,
) -> torch.Tensor:  # [R] int64 verify lengths
    """Fused `topk_budget_ref`: per-request number of candidates among the top ``count``.

    Shape: ``survival`` [R, L] float32 (last dim contiguous); returns [R] int64.
    """
    check(_WHERE, isinstance(survival, torch.Tensor) and survival.ndim == 2,
          "survival must be a [num_reqs, L] tensor")
    num_reqs, num_pos = survival.shape
    device = survival.device
    check_tensor(_WHERE, "survival", survival, (num_reqs, num_pos), (torch.float32,), device)
    check(_WHERE, isinstance(count, int) or (isinstance(count, torch.Tensor) and count.numel() == 1),
          f"count must be an int, got {type(count).__name__}")
    count = int(count)
    if out is None:
        out = torch.empty(num_reqs, dtype=torch.int64, device=device)
    else:
        check_tensor(_WHERE, "out", out, (num_reqs,), (torch.int64,), device)
    if num_reqs == 0:
        return out
    if count <= 0 or num_pos == 0:
        return out.zero_()
    block_l = max(2, next_pow2(num_pos))
    tile = 1 << 16 if interpreting() else 4096  # elements per tile: registers vs interpreter steps
    if block_r is None:
        block_r = max(1, min(next_pow2(num_reqs), max(1, tile // block_l)))
    check(_WHERE, block_r >= 1 and block_r & (block_r - 1) == 0, f"block_r must be a power of two, got {block_r}")
    _topk_budget_kernel[(1,)](
        survival, out, num_reqs, num_pos, min(count, num_reqs * num_pos),
        max(1, (num_reqs * num_pos - 1).bit_length()), survival.stride(0),
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=num_warps,
    )
    return out
