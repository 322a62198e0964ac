"""Chain acceptance in one launch: the fused twin of `dspark_sglang.acceptance.chain_accept`.

One program per request does the whole round: the ratio test (or greedy match) over the verified
drafts, stopping at the first rejection, then the next token: greedy argmax, or an inverse-CDF
draw with the given uniform from norm(max(p - q, 0)) (correction) or p (bonus). Same inputs,
outputs and conventions (p = target, q = draft) as the reference, whose docstring is the spec.

Exactness. Everything but the inverse-CDF draw is bit-exact (float32 ratio test with an IEEE
division, first-index argmax, the same cleaning of NaN/inf/negative entries). The draw follows
`sampling.sample_from_probs`: float64 CDF, ``u`` clamped to [0, 1] and scaled by the total, the first
index whose CDF exceeds it, clamped to the last positive weight. The only difference is the order
of the float64 additions (torch's CPU cumsum is sequential; here a per-tile scan plus a carry), so
the token can differ only when ``u * total`` lies within a few float64 ulps of a CDF step
(probability ~1e-15 per draw for random inputs). With weights whose partial sums are exact in
float64 (e.g. dyadic probabilities) the two agree bit for bit, boundaries included; the tests
check both, plus a distribution test.

Memory traffic per request (V = vocab, n = accepted, 4-byte probabilities):
- sampled rows: 2 scalar gathers per tested draft; the next-token pass reads p_n and (on
  rejection) q_n once to size the distribution (8V bytes), then again up to the drawn token
  (on average half: ~4V bytes); total ~12V bytes, e.g. 7.3 MB for V = 151936.
- greedy rows: one argmax pass over p_k per tested draft plus p_n: (n + 1..2) * 4V bytes.
- writes: 2 + (gamma + 1) int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark_sglang.acceptance import AcceptanceResult
from dspark_sglang.acceptance import chain_accept as chain_accept_ref  # the reference (CPU path)
from dspark_sglang.kernels._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check,
    check_tensor,
    next_pow2,
    vocab_block,
)

__all__ = ["chain_accept", "chain_accept_ref"]

_WHERE = "kernels/chain_accept.py"
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a constexpr: jit code may read only those


@triton.jit
def _clean(x):
    """NaN, +-inf and negatives -> 0 (acceptance._clean_probs), on float32 values."""
    return tl.where((x > 0.0) & (x <= _FLT_MAX), x, 0.0)


@triton.jit
def _row_argmax(row_ptr, vocab, BLOCK_V: tl.constexpr):
    """First index of the maximum of a cleaned probability row (torch.argmax's tie rule)."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], -1.0, tl.float32)  # every cleaned value is >= 0
    best_idx = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        in_row = idx < vocab
        vals = _clean(tl.load(row_ptr + idx, mask=in_row, other=0.0).to(tl.float32))
        vals = tl.where(in_row, vals, -1.0)
        better = vals > best  # strict: each lane keeps its earliest maximum
        best = tl.where(better, vals, best)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best, 0)
    return tl.min(tl.where(best == top, best_idx, 2147483647), 0)


@triton.jit
def _draw_next(p_row_ptr, q_row_ptr, use_q, u, vocab, BLOCK_V: tl.constexpr):
    """Inverse-CDF draw from norm(max(p - q, 0)) when ``use_q`` and that has mass, else from p."""
    offs = tl.arange(0, BLOCK_V)
    # Pass 1: totals and last positive index of both candidate distributions.
    acc_p = tl.zeros([BLOCK_V], tl.float64)
    acc_r = tl.zeros([BLOCK_V], tl.float64)
    last_p = tl.full([BLOCK_V], -1, tl.int32)
    last_r = tl.full([BLOCK_V], -1, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        in_row = idx < vocab
        p = _clean(tl.load(p_row_ptr + idx, mask=in_row, other=0.0).to(tl.float32))
        q = _clean(tl.load(q_row_ptr + idx, mask=in_row & use_q, other=0.0).to(tl.float32))
        res = tl.maximum(p - q, 0.0)  # float32, as the reference's clamp_min
        acc_p += p.to(tl.float64)
        acc_r += res.to(tl.float64)
        last_p = tl.maximum(last_p, tl.where(p > 0.0, idx, -1))
        last_r = tl.maximum(last_r, tl.where(res > 0.0, idx, -1))
    total_r = tl.sum(acc_r, 0)
    use_res = use_q & (total_r > 0.0)  # residual all zero (p == q): fall back to p
    total = tl.where(use_res, total_r, tl.sum(acc_p, 0))
    last = tl.maximum(tl.where(use_res, tl.max(last_r, 0), tl.max(last_p, 0)), 0)
    target = tl.minimum(tl.maximum(u.to(tl.float64), 0.0), 1.0) * total
    # Pass 2: running float64 CDF until it first exceeds the target (early exit).
    # Loop-carried values must be Triton tensors when compiled (the interpreter accepts ints).
    found = vocab
    carry = tl.zeros([], tl.float64)
    start = tl.zeros([], tl.int32)
    while (start < vocab) & (found == vocab):
        idx = start + offs
        in_row = idx < vocab
        p = _clean(tl.load(p_row_ptr + idx, mask=in_row, other=0.0).to(tl.float32))
        q = _clean(tl.load(q_row_ptr + idx, mask=in_row & use_res, other=0.0).to(tl.float32))
        w = tl.where(in_row, tl.maximum(p - q, 0.0).to(tl.float64), 0.0)
        cdf = carry + tl.cumsum(w, 0)
        found = tl.min(tl.where((cdf > target) & in_row, idx, vocab), 0)
        carry = tl.max(cdf, 0)  # non-decreasing, so the max is the last entry
        start += BLOCK_V
    return tl.minimum(found, last)


@triton.jit(do_not_specialize=["gamma", "vocab"])
def _chain_accept_kernel(
    target_ptr,  # [R, gamma+1, V] float
    draft_tokens_ptr,  # [R, gamma] int
    draft_probs_ptr,  # [R, gamma, V] float
    verify_lens_ptr,  # [R] int
    greedy_ptr,  # [R] bool
    accept_u_ptr,  # [R, gamma] float
    sample_u_ptr,  # [R] float
    num_accepted_ptr,  # [R] int64 out
    next_tokens_ptr,  # [R] int64 out
    output_tokens_ptr,  # [R, gamma+1] int64 out
    gamma,
    vocab,
    stride_t_r,
    stride_t_k,
    stride_d_r,
    stride_q_r,
    stride_q_k,
    stride_au_r,
    stride_out_r,
    BLOCK_V: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    verify_len = tl.load(verify_lens_ptr + req).to(tl.int32)
    verify_len = tl.minimum(tl.maximum(verify_len, 0), gamma)  # the reference raises instead
    greedy = tl.load(greedy_ptr + req) != 0
    t_base = target_ptr + req * stride_t_r  # int64 offsets: R * (gamma+1) * V may exceed 2^31
    q_base = draft_probs_ptr + req * stride_q_r
    d_base = draft_tokens_ptr + req * stride_d_r

    # Accepted prefix: n doubles as the position under test, since the loop stops at a rejection.
    n = tl.zeros([], tl.int32)
    go = verify_len > 0
    while go:
        x = tl.load(d_base + n, mask=n < gamma, other=-1).to(tl.int64)  # n < verify_len <= gamma
        valid = (x >= 0) & (x < vocab)  # an out-of-range draft is rejected, never dereferenced
        x = tl.where(valid, x, 0)
        t_row = t_base + n.to(tl.int64) * stride_t_k
        if greedy:
            ok = valid & (_row_argmax(t_row, vocab, BLOCK_V) == x)
        else:
            p = _clean(tl.load(t_row + x, mask=valid, other=0.0).to(tl.float32))
            q = _clean(tl.load(q_base + n.to(tl.int64) * stride_q_k + x, mask=valid, other=0.0).to(tl.float32))
            u = tl.load(accept_u_ptr + req * stride_au_r + n, mask=n < gamma, other=1.0).to(tl.float32)
            # q(x) == 0 rejects (ratio 0) rather than dividing 0 by 0.
            # div_rn: IEEE round-to-nearest like torch; `/` compiles to the approximate div.full.f32.
            ok = u < tl.where(q > 0.0, tl.div_rn(p, tl.where(q > 0.0, q, 1.0)), 0.0)
        n += ok.to(tl.int32)
        go = ok & (n < verify_len)

    # Next token from row n: correction on rejection, bonus otherwise.
    p_row = t_base + n.to(tl.int64) * stride_t_k
    rejected = n < verify_len
    q_row = q_base + tl.minimum(n, gamma - 1).to(tl.int64) * stride_q_k  # read only if rejected
    if greedy:
        next_token = _row_argmax(p_row, vocab, BLOCK_V)
    else:
        u_next = tl.load(sample_u_ptr + req)
        next_token = _draw_next(p_row, q_row, rejected, u_next, vocab, BLOCK_V)

    tl.store(num_accepted_ptr + req, n.to(tl.int64))
    tl.store(next_tokens_ptr + req, next_token.to(tl.int64))
    slots = tl.arange(0, BLOCK_G)
    drafts = tl.load(d_base + slots, mask=slots < n, other=-1).to(tl.int64)
    out = tl.where(slots < n, drafts, tl.where(slots == n, next_token.to(tl.int64), -1))
    tl.store(output_tokens_ptr + req * stride_out_r + slots, out, mask=slots <= gamma)


def chain_accept(
    target_probs: torch.Tensor,  # [R, gamma+1, V] float, processed p
    draft_tokens: torch.Tensor,  # [R, gamma] int32/int64
    draft_probs: torch.Tensor,  # [R, gamma, V] float, processed q
    verify_lens: torch.Tensor,  # [R] int32/int64 in [0, gamma]
    greedy: torch.Tensor,  # [R] bool
    accept_uniforms: torch.Tensor,  # [R, gamma] float U(0,1)
    sample_uniforms: torch.Tensor,  # [R] float U(0,1)
    *,
    out: AcceptanceResult | None = None,
    block_v: int | None = None,
    num_warps: int = 8,
) -> AcceptanceResult:
    """Fused `dspark_sglang.acceptance.chain_accept` (same arguments and result).

    Differences from the reference: no host sync (``verify_lens`` outside [0, gamma] is clamped
    instead of raising), and a verified draft id outside [0, V) is rejected instead of raising.
    ``out`` may supply the three int64 result buffers ([R], [R], [R, gamma+1], contiguous).
    """
    check(_WHERE, isinstance(target_probs, torch.Tensor) and target_probs.ndim == 3,
          "target_probs must be a [R, gamma+1, V] tensor")
    num_reqs, rows, vocab = target_probs.shape
    gamma = rows - 1
    device = target_probs.device
    check(_WHERE, gamma >= 0 and vocab >= 1, f"target_probs shape {list(target_probs.shape)} is empty")
    check_tensor(_WHERE, "target_probs", target_probs, (num_reqs, rows, vocab), FLOAT_DTYPES, device)
    check_tensor(_WHERE, "draft_tokens", draft_tokens, (num_reqs, gamma), INDEX_DTYPES, device)
    check_tensor(_WHERE, "draft_probs", draft_probs, (num_reqs, gamma, vocab), FLOAT_DTYPES, device)
    check_tensor(_WHERE, "verify_lens", verify_lens, (num_reqs,), INDEX_DTYPES, device)
    check_tensor(_WHERE, "greedy", greedy, (num_reqs,), (torch.bool,), device)
    check_tensor(_WHERE, "accept_uniforms", accept_uniforms, (num_reqs, gamma),
                 (torch.float32, torch.float64), device)
    check_tensor(_WHERE, "sample_uniforms", sample_uniforms, (num_reqs,), (torch.float32, torch.float64), device)
    if out is None:
        out = AcceptanceResult(
            num_accepted=torch.empty(num_reqs, dtype=torch.int64, device=device),
            next_tokens=torch.empty(num_reqs, dtype=torch.int64, device=device),
            output_tokens=torch.empty(num_reqs, rows, dtype=torch.int64, device=device),
        )
    else:
        for name, shape in (("num_accepted", (num_reqs,)), ("next_tokens", (num_reqs,)),
                            ("output_tokens", (num_reqs, rows))):
            check_tensor(_WHERE, f"out.{name}", getattr(out, name), shape, (torch.int64,), device)
    if num_reqs == 0:
        return out
    if gamma == 0:  # no draft rows: give the kernel a valid dummy pointer it never reads
        draft_probs = target_probs
        draft_tokens = out.output_tokens
        accept_uniforms = sample_uniforms[:, None]
    grid = (num_reqs,)
    _chain_accept_kernel[grid](
        target_probs, draft_tokens, draft_probs, verify_lens, greedy, accept_uniforms, sample_uniforms,
        out.num_accepted, out.next_tokens, out.output_tokens,
        gamma, vocab,
        target_probs.stride(0), target_probs.stride(1), draft_tokens.stride(0),
        draft_probs.stride(0), draft_probs.stride(1), accept_uniforms.stride(0),
        out.output_tokens.stride(0),
        BLOCK_V=vocab_block(vocab, block_v), BLOCK_G=max(2, next_pow2(rows)),
        num_warps=num_warps,
    )
    return out
