"""Draft-block attention over [context K/V ; block K/V]: the fused twin of
`dspark_sglang.drafters.block.context_block_attention` (the DSpark/DFlash backbone's attention).

One program per (request, query head): its B block queries (padded to a 16-row tile for tl.dot)
stream the request's first ``ctx_lens[r]`` context rows in BLOCK_N tiles, then the B block rows,
with an online softmax (running max, rescaled sum and accumulator; exp2 with the log2(e) folded
into the scale). No mask inside the block (bidirectional); ragged contexts cost only their own
length (the right padding of shorter contexts is never read). Query head j reads KV head
j // (heads / kv_heads).

Not fused, on purpose: q/k RMSNorm and RoPE. They act on the block's own B rows (a few KB per
request per layer) while the context K arrive from the cache already normed and rotated; fusing
them would save two small elementwise launches and none of the dominant traffic below.

Memory traffic per layer (b bytes per element, d = head_dim): context K and V,
2 * sum_r ctx_lens[r] * kv_heads * d * b, read once per KV head from DRAM (the group's other query
heads re-read it from L2); block K/V 2 * R * B * kv_heads * d * b; q and out R * B * heads * d * b
each. E.g. R = 16, 4k-token contexts, 8 KV heads, d = 128, bf16: 268 MB of K/V per layer.

One kernel, two layouts. The context rows live in a pool indexed by the serving engine's KV slots
(`drafters.block.KvSlotContext`, `paged_block_attention`): each program loads its request's slot
indices tile by tile and reads the rows in place, so nothing is gathered or padded per round. A
right-padded [R, N] context (`block_attention`) is the same pool with row r * N + n. The only extra
traffic is the index, 4 bytes per context row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dspark_sglang.drafters.block import context_block_attention as block_attention_ref  # reference
from dspark_sglang.drafters.block import paged_context_block_attention as paged_block_attention_ref  # reference
from dspark_sglang.kernels._common import FLOAT_DTYPES, INDEX_DTYPES, check, check_tensor, next_pow2

__all__ = ["block_attention", "block_attention_ref", "paged_block_attention", "paged_block_attention_ref"]

_WHERE = "kernels/block_attention.py"
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, keep, in_d, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, BLOCK_D] key/value tile (``keep``: valid keys)."""
    kv_mask = keep[:, None] & in_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_Q, BLOCK_N], log2 units
    s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one valid key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def block_attention(
    q: torch.Tensor,  # [R, B, heads, d] block queries (normed, rotated)
    ctx_k: torch.Tensor,  # [R, N, kv_heads, d] context keys, right-padded
    ctx_v: torch.Tensor,  # [R, N, kv_heads, d]
    ctx_lens: torch.Tensor | None,  # [R] int, real context rows per request (<= N); None = N
    k: torch.Tensor,  # [R, B, kv_heads, d] block keys
    v: torch.Tensor,  # [R, B, kv_heads, d]
    scale: float | None = None,  # default d ** -0.5
    *,
    out: torch.Tensor | None = None,  # [R, B, heads, d]
    block_n: int | None = None,
    num_warps: int = 8,  # sm_90, d = 128, BLOCK_N = 64: 192 registers, no spills (4 warps spill)
) -> torch.Tensor:  # [R, B, heads, d]
    """Fused `block_attention_ref` with the context given by lengths (a right-padded prefix mask
    ``ctx_mask`` is ``ctx_lens = ctx_mask.sum(1)``). Lengths are clamped to [0, N]."""
    check(_WHERE, isinstance(q, torch.Tensor) and q.ndim == 4, "q must be a [R, B, heads, d] tensor")
    num_reqs, block, heads, head_dim = q.shape
    check(_WHERE, isinstance(ctx_k, torch.Tensor) and ctx_k.ndim == 4, "ctx_k must be a [R, N, kv_heads, d] tensor")
    num_ctx, kv_heads = ctx_k.shape[1], ctx_k.shape[2]
    device, dtype = q.device, q.dtype
    check(_WHERE, kv_heads >= 1 and heads % kv_heads == 0,
          f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    check(_WHERE, block >= 1, "the block must hold at least one query")
    check_tensor(_WHERE, "q", q, (num_reqs, block, heads, head_dim), FLOAT_DTYPES, device)
    for name, tensor, rows in (("ctx_k", ctx_k, num_ctx), ("ctx_v", ctx_v, num_ctx), ("k", k, block), ("v", v, block)):
        check_tensor(_WHERE, name, tensor, (num_reqs, rows, kv_heads, head_dim), (dtype,), device)
    if ctx_lens is None:
        ctx_lens = torch.full((num_reqs,), num_ctx, dtype=torch.int32, device=device)
    else:
        check_tensor(_WHERE, "ctx_lens", ctx_lens, (num_reqs,), INDEX_DTYPES, device)
        ctx_lens = ctx_lens.clamp(0, num_ctx)
    # The padded layout is a pool whose row r * (stride_r / stride_n) + n is request r's n-th context
    # row: one kernel serves both layouts (the index costs 4 bytes per context row).
    if ctx_k.stride() != ctx_v.stride() or ctx_k.stride(0) % max(ctx_k.stride(1), 1) or ctx_k.stride(3) != 1:
        ctx_k, ctx_v = ctx_k.contiguous(), ctx_v.contiguous()
    per_req = ctx_k.stride(0) // max(ctx_k.stride(1), 1)
    num_rows = (num_reqs - 1) * per_req + num_ctx
    pool_shape, pool_strides = (max(num_rows, 1), kv_heads, head_dim), (ctx_k.stride(1), ctx_k.stride(2), 1)
    pool_k = torch.as_strided(ctx_k, pool_shape, pool_strides) if num_ctx else ctx_k.new_zeros(1, kv_heads, head_dim)
    pool_v = torch.as_strided(ctx_v, pool_shape, pool_strides) if num_ctx else ctx_v.new_zeros(1, kv_heads, head_dim)
    rows = (torch.arange(num_reqs, device=device)[:, None] * per_req
            + torch.arange(max(num_ctx, 1), device=device)[None, :]).to(torch.int32)
    return _launch_paged(q, pool_k, pool_v, rows, ctx_lens, k, v, scale, out, block_n, num_warps)


@triton.jit(do_not_specialize=["block", "head_dim"])
def _paged_block_attention_kernel(
    q_ptr,  # [R, B, heads, d]
    pool_k_ptr,  # [P, kv_heads, d]
    pool_v_ptr,  # [P, kv_heads, d]
    rows_ptr,  # [R, N] int KV slot of each context position
    ctx_lens_ptr,  # [R] int
    blk_k_ptr,  # [R, B, kv_heads, d]
    blk_v_ptr,  # [R, B, kv_heads, d]
    out_ptr,  # [R, B, heads, d]
    block,
    head_dim,
    group,
    qk_scale,
    stride_q_r, stride_q_b, stride_q_h,
    stride_pk_p, stride_pk_h,
    stride_pv_p, stride_pv_h,
    stride_rows_r,
    stride_bk_r, stride_bk_b, stride_bk_h,
    stride_bv_r, stride_bv_b, stride_bv_h,
    stride_o_r, stride_o_b, stride_o_h,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    kv_head = (head // group).to(tl.int64)
    rows = tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    in_d = cols < head_dim
    q_mask = (rows[:, None] < block) & in_d[None, :]
    q = tl.load(q_ptr + req * stride_q_r + rows[:, None] * stride_q_b + head * stride_q_h + cols[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    ctx_len = tl.load(ctx_lens_ptr + req).to(tl.int32)
    for n0 in range(0, ctx_len, BLOCK_N):
        n = n0 + offs_n
        keep = n < ctx_len
        slot = tl.load(rows_ptr + req * stride_rows_r + n, mask=keep, other=0).to(tl.int64)  # [BLOCK_N]
        k_ptrs = pool_k_ptr + slot[:, None] * stride_pk_p + kv_head * stride_pk_h + cols[None, :]
        v_ptrs = pool_v_ptr + slot[:, None] * stride_pv_p + kv_head * stride_pv_h + cols[None, :]
        m_i, l_i, acc = _attend_tile(q, k_ptrs, v_ptrs, keep, in_d, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    b = tl.arange(0, BLOCK_Q)
    keep = b < block
    k_ptrs = blk_k_ptr + req * stride_bk_r + b[:, None] * stride_bk_b + kv_head * stride_bk_h + cols[None, :]
    v_ptrs = blk_v_ptr + req * stride_bv_r + b[:, None] * stride_bv_b + kv_head * stride_bv_h + cols[None, :]
    m_i, l_i, acc = _attend_tile(q, k_ptrs, v_ptrs, keep, in_d, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + req * stride_o_r + rows[:, None] * stride_o_b + head * stride_o_h + cols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_block_attention(
    q: torch.Tensor,  # [R, B, heads, d] block queries (normed, rotated)
    pool_k: torch.Tensor,  # [P, kv_heads, d] one layer's context keys, by KV slot
    pool_v: torch.Tensor,  # [P, kv_heads, d]
    rows: torch.Tensor,  # [R, N] int KV slots of each request's context positions (right-padded)
    lens,  # [R] context rows per request: a list or an int tensor (<= N)
    k: torch.Tensor,  # [R, B, kv_heads, d] block keys
    v: torch.Tensor,  # [R, B, kv_heads, d]
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 8,
) -> torch.Tensor:  # [R, B, heads, d]
    """Fused `paged_block_attention_ref`: context rows read in place from the KV-slot pool."""
    check(_WHERE, isinstance(q, torch.Tensor) and q.ndim == 4, "q must be a [R, B, heads, d] tensor")
    num_reqs, block, heads, head_dim = q.shape
    check(_WHERE, isinstance(pool_k, torch.Tensor) and pool_k.ndim == 3, "pool_k must be a [P, kv_heads, d] tensor")
    num_slots, kv_heads = pool_k.shape[0], pool_k.shape[1]
    device, dtype = q.device, q.dtype
    check(_WHERE, kv_heads >= 1 and heads % kv_heads == 0, f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    check(_WHERE, block >= 1, "the block must hold at least one query")
    check_tensor(_WHERE, "q", q, (num_reqs, block, heads, head_dim), FLOAT_DTYPES, device)
    for name, tensor in (("pool_k", pool_k), ("pool_v", pool_v)):
        check_tensor(_WHERE, name, tensor, (num_slots, kv_heads, head_dim), (dtype,), device)
        check(_WHERE, tensor.stride(2) == 1, f"{name} rows must be contiguous in d")
    for name, tensor in (("k", k), ("v", v)):
        check_tensor(_WHERE, name, tensor, (num_reqs, block, kv_heads, head_dim), (dtype,), device)
    check(_WHERE, isinstance(rows, torch.Tensor) and rows.ndim == 2 and rows.shape[0] == num_reqs,
          f"rows must be a [{num_reqs}, N] tensor")
    check_tensor(_WHERE, "rows", rows, tuple(rows.shape), INDEX_DTYPES, device)
    rows = rows.contiguous()
    lens = torch.as_tensor(lens, dtype=torch.int32, device=device).clamp(0, rows.shape[1])
    check(_WHERE, lens.shape == (num_reqs,), f"lens must hold {num_reqs} lengths")
    return _launch_paged(q, pool_k, pool_v, rows, lens, k, v, scale, out, block_n, num_warps)


def _launch_paged(q, pool_k, pool_v, rows, lens, k, v, scale, out, block_n, num_warps) -> torch.Tensor:
    """One program per (request, query head) over checked inputs (see the two wrappers above)."""
    num_reqs, block, heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_tensor(_WHERE, "out", out, tuple(q.shape), (q.dtype,), q.device)
    if num_reqs == 0:
        return out
    kv_heads = pool_k.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    check(_WHERE, math.isfinite(scale), f"scale must be finite, got {scale}")
    block_q = max(16, next_pow2(block))
    block_n = block_n or max(16, min(64, next_pow2(max(1, rows.shape[1]))))
    _paged_block_attention_kernel[(num_reqs, heads)](
        q, pool_k, pool_v, rows, lens, k, v, out,
        block, head_dim, heads // kv_heads, scale * _LOG2E,
        *q.stride()[:3], *pool_k.stride()[:2], *pool_v.stride()[:2], rows.stride(0),
        *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(head_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out
