"""DSpark's sequential head in one launch per round: the fused twin of
`dspark_sglang.drafters.heads.sample_sequential_with_uniforms`.

One program serves a block of up to 16 requests and walks k = 0..G-1 for all of them at once (the
recurrence is sequential in k, not across requests), so every weight tile it loads (W2, the
gate/joint projection) serves the whole block:

1. ``rows = W1[p_k]`` (p_0 = anchor, then the token just drawn);
2. confidence logit ``c_k = w·[h_k ; rows] + b`` (or ``w·h_k + b`` without Markov features);
3. Markov vector ``v``: vanilla ``rows``; gated ``σ(Wg [h_k ; rows] + bg) ⊙ rows``; rnn
   ``[g; c; o] = Wj [s ; rows ; h_k] + bj``, ``s = σ(g) ⊙ s + (1 - σ(g)) ⊙ tanh(c)``, ``v = tanh(o)``;
4. pass A over the vocabulary: ``l = U_k + W2 v`` (stored: the reference's second return), with a
   per-lane online max/sum of ``sanitize(l) / T`` and the first-index argmax;
5. pass C: ``q = exp(x - max) / sum`` stored (one-hot at the argmax for greedy rows), with its
   float64 total and last positive index;
6. pass E: inverse-CDF draw with the given uniform on the stored q (float64 running CDF, first
   entry above ``u * total``, clamped to the last positive weight, as `sampling.sample_from_probs`);
   greedy rows take the argmax. ``q(x)`` is read back from the stored row.

Scope and dispatch rule. The kernel does `process_logits` for greedy rows (`is_greedy`: T < 1e-6
or top_k == 1, plus NaN temperatures, which the reference also sends to the one-hot argmax) and
for plain temperature rows. Rows with a top-k (1 < k < V), top-p (< 1) or min-p (> 0) filter need
a sort; `sample_sequential` below runs the kernel for the batch and then recomputes those rows
with the reference (a host check, as `process_logits` itself makes) and writes them over.

Agreement with the reference: logits, q and confidences agree to float32 rounding (different
summation order in the matvecs, exp, and the reference's extra renormalisation q / Σq, which the
kernel skips: its softmax already sums to 1 within rounding). One batch-level quirk is not
reproduced: when any row of a batch filters, `process_logits` sorts every row, and its top-p test
``exclusive cumsum > 1.0`` then drops tail tokens of unfiltered rows whose float32 prefix sum
rounds above 1 (mass ~1e-8; SGLang's torch sampler does the same). The kernel's unfiltered rows
keep them. Tokens agree exactly except when a uniform lands within that rounding of a CDF step,
or two logits tie within it under greedy; the chain is sequential, so such a flip changes the
rest of that request's block. Losslessness does not depend on agreement: each token is drawn
from exactly the q the kernel stores, and acceptance reads that q.

Memory traffic per step (V = vocab, r = rank, H = hidden, R requests, 4-byte activations, b-byte
weights): W2 V*r*b once per block of 16 requests (dominant: 78 MB for V = 151936, r = 256, bf16;
the per-request design read it R times), gate/joint weights (r or 3r) * (H + 2r) * b likewise;
per request U 4V, logits written 4V and re-read 4V, q written 4V and re-read ~2V (early exit),
W1 row r*b, h_k 4H. From 16 requests on, the block's products are ``tl.dot`` in IEEE float32;
smaller batches use broadcast products with one request's tile budget split across the block
(`tile_sizes`). At batch 1 a single program still streams the whole vocabulary per step: a grid
over vocabulary tiles (a bias GEMM per step, then split sampling passes) would use more SMs there.

Registers (ptxas -v, sm_90, r = 256, H = 4096, 8 warps, `tile_sizes` tiles; compiled without a GPU):
one request (broadcast): vanilla 188, gated 224, no spills; rnn 255 with ~750 B spilled. Sixteen
(tl.dot, BLOCK_VW 64): 255 registers with ~210 B spilled (vanilla, gated) and ~1.1 KB (rnn), in the
W2 product; BLOCK_VW 32 or 128 spilled more. `tests/interp/_compile_kernels.py` builds both forms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark_sglang.drafters.heads import ConfidenceHead, MarkovHead, sample_sequential_with_uniforms
from dspark_sglang.drafters.interface import DraftBlock
from dspark_sglang.kernels._common import FLOAT_DTYPES, INDEX_DTYPES, check, check_tensor, interpreting, next_pow2
from dspark_sglang.sampling import SamplingBatch, is_greedy

__all__ = ["sequential_head", "sample_sequential", "sample_sequential_ref", "filtered_rows", "tile_sizes", "KINDS"]

sample_sequential_ref = sample_sequential_with_uniforms  # the reference (CPU path)

_WHERE = "kernels/sequential_head.py"
KINDS = {"none": 0, "vanilla": 1, "gated": 2, "rnn": 3}


@triton.jit
def _sanitize(x):
    """sampling.sanitize_logits: NaN, -inf -> -1e30; +inf -> +1e30 (its _LOGIT_SENTINEL)."""
    x = tl.where(x != x, -1e30, x)
    return tl.minimum(tl.maximum(x, -1e30), 1e30)


@triton.jit
def _times(x, wt, USE_DOT: tl.constexpr):
    """[BLOCK_R, N] = x [BLOCK_R, K] @ wt [K, N] in float32. ``tl.dot`` (IEEE float32, so the
    result matches the torch reference to rounding) needs every dimension >= 16 on a GPU; smaller
    request blocks take a broadcast product over a [BLOCK_R, K, N] tile instead."""
    if USE_DOT:
        return tl.dot(x, wt, input_precision="ieee")
    else:
        return tl.sum(x[:, :, None] * wt[None, :, :], 1)


@triton.jit
def _rows_matmul(x_rows, in_req, n_cols, w_ptr, stride_w, row0, col0, n_out, outs,
                 BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr):
    """[BLOCK_R, BLOCK_OUT]: X @ W[row0 + o, col0 + c]^T (o < n_out, c < n_cols), where request i's
    input row starts at pointer ``x_rows[i]``. Each [BLOCK_C, BLOCK_OUT] weight tile is loaded once
    for the whole request block; inputs stream from memory in BLOCK_C chunks."""
    offs = tl.arange(0, BLOCK_C)
    acc = tl.zeros([x_rows.shape[0], outs.shape[0]], tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + offs
        x = tl.load(x_rows[:, None] + cols[None, :], mask=in_req[:, None] & (cols[None, :] < n_cols),
                    other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_C]
        wt = tl.load(w_ptr + (row0 + outs[None, :]).to(tl.int64) * stride_w + col0 + cols[:, None],
                     mask=(outs[None, :] < n_out) & (cols[:, None] < n_cols), other=0.0).to(tl.float32)
        acc += _times(x, wt, USE_DOT)  # wt: [BLOCK_C, BLOCK_OUT]
    return acc


@triton.jit
def _rows_dot(x_rows, in_req, w_ptr, n, BLOCK_C: tl.constexpr):
    """[BLOCK_R]: sum_j x_i[j] * w[j], j < n, float32 (request i's row at pointer ``x_rows[i]``)."""
    offs = tl.arange(0, BLOCK_C)
    acc = tl.zeros([x_rows.shape[0], BLOCK_C], tl.float32)
    for c0 in range(0, n, BLOCK_C):
        cols = c0 + offs
        x = tl.load(x_rows[:, None] + cols[None, :], mask=in_req[:, None] & (cols[None, :] < n), other=0.0)
        acc += x.to(tl.float32) * tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    return tl.sum(acc, 1)


@triton.jit(do_not_specialize=["num_reqs", "gamma", "vocab", "hidden_size", "rank"])
def _sequential_head_kernel(
    base_ptr,  # [R, G, V] U
    hidden_ptr,  # [R, G, H] h
    anchors_ptr,  # [R] int
    uniforms_ptr,  # [R, G] float
    temps_ptr,  # [R] float32
    onehot_ptr,  # [R] bool: greedy (or NaN temperature)
    w1_ptr,  # [V, r]
    w2_ptr,  # [V, r]
    mix_w_ptr,  # gated: [r, H + r]; rnn: [3r, 2r + H]
    mix_b_ptr,  # gated: [r]; rnn: [3r]
    conf_w_ptr,  # [H (+ r)]
    conf_b_ptr,  # [1]
    state_ptr,  # [R, r] float32 rnn state scratch, zero on entry (s_{-1} = 0)
    tokens_ptr,  # [R, G] int64 out
    probs_ptr,  # [R, G, V] float32 out
    token_probs_ptr,  # [R, G] float32 out
    conf_ptr,  # [R, G] float32 out
    logits_ptr,  # [R, G, V] out
    num_reqs,
    gamma,
    vocab,
    hidden_size,
    rank,
    stride_u_r, stride_u_k, stride_h_r, stride_h_k, stride_un_r,
    stride_w1, stride_w2, stride_mix, stride_s_r,
    stride_p_r, stride_p_k, stride_l_r, stride_l_k, stride_o_r,
    KIND: tl.constexpr,  # 0 none, 1 vanilla, 2 gated, 3 rnn
    HAS_CONF: tl.constexpr,
    CONF_MARKOV: tl.constexpr,
    BLOCK_R: tl.constexpr,  # requests per program: every weight tile serves all of them
    USE_DOT: tl.constexpr,  # BLOCK_R >= 16: tensor-core-shaped products (see _times)
    BLOCK_V: tl.constexpr,  # elementwise passes
    BLOCK_VW: tl.constexpr,  # bias pass ([BLOCK_RANK, BLOCK_VW] W2 tiles)
    BLOCK_H: tl.constexpr,  # column chunk of the [rank, *] matvecs
    BLOCK_RANK: tl.constexpr,
):
    reqs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    in_req = reqs < num_reqs
    offs_v = tl.arange(0, BLOCK_V)
    offs_vw = tl.arange(0, BLOCK_VW)
    ranks_i = tl.arange(0, BLOCK_RANK)  # output index of rank-sized products
    in_rank = ranks_i < rank
    onehot = (tl.load(onehot_ptr + reqs, mask=in_req, other=0) != 0) & in_req
    temp = tl.load(temps_ptr + reqs, mask=in_req, other=1.0).to(tl.float32)
    temp = tl.where(onehot, 1.0, temp)  # the reference's safe_t
    sampled = in_req & ~onehot  # rows drawn by inverse CDF
    prev = tl.load(anchors_ptr + reqs, mask=in_req, other=0).to(tl.int64)
    s_rows = state_ptr + reqs * stride_s_r  # [BLOCK_R] pointers

    for k in range(0, gamma):
        h_rows = hidden_ptr + reqs * stride_h_r + k * stride_h_k
        # Clamp a bad id rather than read out of bounds (the reference's embedding would raise).
        prev = tl.minimum(tl.maximum(prev, 0), vocab - 1)
        w1_rows = w1_ptr + prev * stride_w1  # W1[p_k]
        rank_mask = in_req[:, None] & in_rank[None, :]
        if KIND > 0:  # [BLOCK_R, BLOCK_RANK]
            rows = tl.load(w1_rows[:, None] + ranks_i[None, :], mask=rank_mask, other=0.0).to(tl.float32)
        else:
            rows = tl.zeros([BLOCK_R, BLOCK_RANK], tl.float32)

        if HAS_CONF:  # c_k = w . [h_k ; W1[p_k]] + b
            conf = _rows_dot(h_rows, in_req, conf_w_ptr, hidden_size, BLOCK_H) + tl.load(conf_b_ptr).to(tl.float32)
            if CONF_MARKOV:
                wr = tl.load(conf_w_ptr + hidden_size + ranks_i, mask=in_rank, other=0.0).to(tl.float32)
                conf += tl.sum(wr[None, :] * rows, 1)
            tl.store(conf_ptr + reqs * stride_o_r + k, conf, mask=in_req)

        if KIND == 2:  # gate = sigmoid(Wg [h ; W1[p]] + bg)
            acc = _rows_matmul(h_rows, in_req, hidden_size, mix_w_ptr, stride_mix, 0, 0, rank, ranks_i,
                               BLOCK_H, USE_DOT)
            acc += _rows_matmul(w1_rows, in_req, rank, mix_w_ptr, stride_mix, 0, hidden_size, rank, ranks_i,
                                BLOCK_H, USE_DOT)
            acc += tl.load(mix_b_ptr + ranks_i, mask=in_rank, other=0.0).to(tl.float32)[None, :]
            vec = tl.sigmoid(acc) * rows
        elif KIND == 3:  # [g; c; o] = Wj [s ; W1[p] ; h] + bj, chunk j at rows j*r
            # One chunk at a time, each finished before the next starts (register pressure).
            acc = _rows_matmul(s_rows, in_req, rank, mix_w_ptr, stride_mix, 0, 0, rank, ranks_i, BLOCK_H, USE_DOT)
            acc += _rows_matmul(w1_rows, in_req, rank, mix_w_ptr, stride_mix, 0, rank, rank, ranks_i,
                                BLOCK_H, USE_DOT)
            acc += _rows_matmul(h_rows, in_req, hidden_size, mix_w_ptr, stride_mix, 0, 2 * rank, rank, ranks_i,
                                BLOCK_H, USE_DOT)
            bias = tl.load(mix_b_ptr + ranks_i, mask=in_rank, other=0.0).to(tl.float32)
            gate = tl.sigmoid(acc + bias[None, :])
            acc = _rows_matmul(s_rows, in_req, rank, mix_w_ptr, stride_mix, rank, 0, rank, ranks_i,
                               BLOCK_H, USE_DOT)
            acc += _rows_matmul(w1_rows, in_req, rank, mix_w_ptr, stride_mix, rank, rank, rank, ranks_i,
                                BLOCK_H, USE_DOT)
            acc += _rows_matmul(h_rows, in_req, hidden_size, mix_w_ptr, stride_mix, rank, 2 * rank, rank, ranks_i,
                                BLOCK_H, USE_DOT)
            acc += tl.load(mix_b_ptr + rank + ranks_i, mask=in_rank, other=0.0).to(tl.float32)[None, :]
            tanh_c = 2.0 * tl.sigmoid(2.0 * acc) - 1.0
            acc = _rows_matmul(s_rows, in_req, rank, mix_w_ptr, stride_mix, 2 * rank, 0, rank, ranks_i,
                               BLOCK_H, USE_DOT)
            acc += _rows_matmul(w1_rows, in_req, rank, mix_w_ptr, stride_mix, 2 * rank, rank, rank, ranks_i,
                                BLOCK_H, USE_DOT)
            acc += _rows_matmul(h_rows, in_req, hidden_size, mix_w_ptr, stride_mix, 2 * rank, 2 * rank, rank,
                                ranks_i, BLOCK_H, USE_DOT)
            acc += tl.load(mix_b_ptr + 2 * rank + ranks_i, mask=in_rank, other=0.0).to(tl.float32)[None, :]
            vec = 2.0 * tl.sigmoid(2.0 * acc) - 1.0  # tanh(o)
            state = tl.load(s_rows[:, None] + ranks_i[None, :], mask=rank_mask, other=0.0)
            tl.debug_barrier()  # every thread has read s_{k-1} before any writes s_k
            tl.store(s_rows[:, None] + ranks_i[None, :], gate * state + (1.0 - gate) * tanh_c, mask=rank_mask)
            tl.debug_barrier()  # s_k visible to the next step's matvecs
        else:
            vec = rows

        # Pass A: l = U + W2 v (stored), online softmax stats of sanitize(l) / T, argmax. Each W2
        # tile is read once per step for the whole request block.
        u_rows = base_ptr + reqs * stride_u_r + k * stride_u_k
        l_rows = logits_ptr + reqs * stride_l_r + k * stride_l_k
        m_lane = tl.full([BLOCK_R, BLOCK_VW], float("-inf"), tl.float32)
        s_lane = tl.zeros([BLOCK_R, BLOCK_VW], tl.float32)
        best = tl.full([BLOCK_R, BLOCK_VW], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_R, BLOCK_VW], tl.int32)
        for v0 in range(0, vocab, BLOCK_VW):
            idx = v0 + offs_vw
            in_v = idx < vocab
            tile = in_req[:, None] & in_v[None, :]
            logit = tl.load(u_rows[:, None] + idx[None, :], mask=tile, other=0.0).to(tl.float32)
            if KIND > 0:
                w2t = tl.load(w2_ptr + idx[None, :].to(tl.int64) * stride_w2 + ranks_i[:, None],
                              mask=in_rank[:, None] & in_v[None, :], other=0.0).to(tl.float32)  # [RANK, VW]
                logit += _times(vec, w2t, USE_DOT)
            tl.store(l_rows[:, None] + idx[None, :], logit.to(logits_ptr.dtype.element_ty), mask=tile)
            clean = _sanitize(logit.to(logits_ptr.dtype.element_ty).to(tl.float32))
            better = tile & (clean > best)
            best = tl.where(better, clean, best)
            best_idx = tl.where(better, idx[None, :], best_idx)
            x = tl.where(tile, tl.div_rn(clean, temp[:, None]), float("-inf"))  # IEEE, as torch's l / T
            m_new = tl.maximum(m_lane, x)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no entry yet: no -inf - -inf
            s_lane = s_lane * tl.exp(m_lane - safe) + tl.exp(x - safe)
            m_lane = m_new
        top = tl.max(best, 1)
        argmax = tl.min(tl.where(best == top[:, None], best_idx, 2147483647), 1)  # [BLOCK_R]
        x_max = tl.max(m_lane, 1)
        x_max_safe = tl.where(in_req, x_max, 0.0)  # rows past num_reqs saw no entry (never stored)
        x_sum = tl.sum(s_lane * tl.exp(m_lane - x_max_safe[:, None]), 1)
        x_sum = tl.where(in_req, x_sum, 1.0)
        tl.debug_barrier()  # pass C re-reads logits other threads of this program wrote

        # Pass C: q (one-hot for greedy rows), float64 total and last positive index.
        p_rows = probs_ptr + reqs * stride_p_r + k * stride_p_k
        acc_q = tl.zeros([BLOCK_R, BLOCK_V], tl.float64)
        last_q = tl.full([BLOCK_R, BLOCK_V], -1, tl.int32)
        for v0 in range(0, vocab, BLOCK_V):
            idx = v0 + offs_v
            tile = in_req[:, None] & (idx < vocab)[None, :]
            clean = _sanitize(tl.load(l_rows[:, None] + idx[None, :], mask=tile, other=0.0).to(tl.float32))
            soft = tl.div_rn(tl.exp(tl.div_rn(clean, temp[:, None]) - x_max_safe[:, None]), x_sum[:, None])
            q = tl.where(onehot[:, None], tl.where(idx[None, :] == argmax[:, None], 1.0, 0.0), soft)
            q = tl.where(tile, q, 0.0)
            tl.store(p_rows[:, None] + idx[None, :], q, mask=tile)
            acc_q += q.to(tl.float64)
            last_q = tl.maximum(last_q, tl.where(q > 0.0, idx[None, :], -1))
        tl.debug_barrier()  # pass E re-reads q

        # Pass E: inverse CDF on the stored q (sampling.sample_from_probs) for sampled rows, until
        # every one has found its token; greedy rows take the argmax.
        u = tl.load(uniforms_ptr + reqs * stride_un_r + k, mask=in_req, other=0.0).to(tl.float64)
        target = tl.minimum(tl.maximum(u, 0.0), 1.0) * tl.sum(acc_q, 1)  # [BLOCK_R]
        found = tl.where(sampled, vocab, 0)  # vocab = not found yet
        carry = tl.zeros([BLOCK_R], tl.float64)
        pos = tl.zeros([], tl.int32)  # a tensor: loop-carried values must be when compiled
        while (pos < vocab) & (tl.max(found, 0) == vocab):
            idx = pos + offs_v
            tile = sampled[:, None] & (idx < vocab)[None, :]
            w = tl.load(p_rows[:, None] + idx[None, :], mask=tile, other=0.0).to(tl.float64)
            cdf = carry[:, None] + tl.cumsum(w, 1)
            hit = tl.min(tl.where((cdf > target[:, None]) & tile, idx[None, :], vocab), 1)
            found = tl.where(found == vocab, hit, found)
            carry = tl.max(cdf, 1)
            pos += BLOCK_V
        drawn = tl.minimum(found, tl.maximum(tl.max(last_q, 1), 0))
        token = tl.where(onehot, argmax, drawn)
        token_prob = tl.load(p_rows + token, mask=in_req & (token < vocab), other=0.0)  # token < vocab by construction
        tl.store(tokens_ptr + reqs * stride_o_r + k, token.to(tl.int64), mask=in_req)
        tl.store(token_probs_ptr + reqs * stride_o_r + k, token_prob, mask=in_req)
        prev = token.to(tl.int64)


DOT_ROWS = 16  # tl.dot's smallest dimension on NVIDIA GPUs


def tile_sizes(num_reqs: int, vocab: int, hidden_size: int, rank: int, *, interp: bool,
               block_v: int | None = None) -> dict[str, int | bool]:
    """The kernel's constexpr tiles for a batch.

    A program serves BLOCK_R requests (up to 16), so every W2 / mix-weight tile it loads serves all
    of them: the Markov weight is read ceil(R / 16) times per step instead of R times. From 16
    requests on, the products run as ``tl.dot`` (IEEE float32); fewer requests take a broadcast
    product, whose [BLOCK_R, K, N] tile is kept at the per-request kernel's register budget (a
    single request has exactly its old tiles). Under the interpreter, tiles are wide (its cost is
    per block iteration) but bounded in elements (numpy memory).
    """
    block_r = min(DOT_ROWS, next_pow2(max(num_reqs, 1)))
    use_dot = block_r >= DOT_ROWS
    rows = 1 if use_dot else block_r  # the product tile holds rows x K x N elements
    smallest = 16 if use_dot else 1
    block_rank = max(16, next_pow2(rank))
    if interp:
        block_v = block_v or max(16, min(next_pow2(vocab), 16384))
        block_vw = max(smallest, min(block_v, (1 << 20) // (block_rank * rows)))
        block_h = max(smallest, min(next_pow2(max(hidden_size, rank)), (1 << 18) // (block_rank * rows)))
    else:
        # Elementwise passes: [BLOCK_R, BLOCK_V] float32 + float64 tiles of ~2k elements.
        block_v = block_v or max(16, min(next_pow2(vocab), 2048 // block_r))
        # Register tiles: W2 [BLOCK_RANK, BLOCK_VW] ~8k (16k for tl.dot: fewest spills, ptxas -v at
        # rank 256) and mix [BLOCK_H, BLOCK_RANK] ~4k elements.
        block_vw = max(smallest, min(block_v, (16384 if use_dot else 8192) // (block_rank * rows)))
        block_h = max(smallest, min(next_pow2(max(hidden_size, rank)), 4096 // (block_rank * rows)))
    return dict(BLOCK_R=block_r, USE_DOT=use_dot, BLOCK_V=block_v, BLOCK_VW=block_vw, BLOCK_H=block_h,
                BLOCK_RANK=block_rank)


def _weights(markov: MarkovHead | None, confidence: ConfidenceHead | None) -> dict:
    """The head modules' raw tensors (checkpoint names), as `sequential_head` keywords."""
    kind = "none" if markov is None else markov.kind
    mix = {"gated": "gate_proj", "rnn": "joint_proj"}.get(kind)
    mix = None if mix is None else getattr(markov, mix)
    return dict(
        kind=kind,
        w1=None if markov is None else markov.markov_w1.weight,
        w2=None if markov is None else markov.markov_w2.weight,
        mix_w=None if mix is None else mix.weight, mix_b=None if mix is None else mix.bias,
        conf_w=None if confidence is None else confidence.proj.weight[0],
        conf_b=None if confidence is None else confidence.proj.bias,
    )


def sequential_head(
    base_logits: torch.Tensor,  # [R, G, V] U_k
    hidden: torch.Tensor,  # [R, G, H] h_k
    anchors: torch.Tensor,  # [R] int, p_0
    uniforms: torch.Tensor,  # [R, G] float U(0,1)
    temperatures: torch.Tensor,  # [R] float
    onehot: torch.Tensor,  # [R] bool: rows sampled by argmax (is_greedy, or NaN temperature)
    *,
    kind: str,  # "none" | "vanilla" | "gated" | "rnn"
    w1: torch.Tensor | None,  # [V, r] markov_w1.weight
    w2: torch.Tensor | None,  # [V, r] markov_w2.weight
    mix_w: torch.Tensor | None = None,  # gated [r, H + r] gate_proj / rnn [3r, 2r + H] joint_proj
    mix_b: torch.Tensor | None = None,  # [r] / [3r]
    conf_w: torch.Tensor | None = None,  # [H] or [H + r] confidence proj weight row
    conf_b: torch.Tensor | None = None,  # [1]
    block_v: int | None = None,
    num_warps: int = 8,
) -> tuple[DraftBlock, torch.Tensor]:
    """Launch the fused head on raw tensors: no top-k/top-p/min-p (see `sample_sequential`).

    Returns the DraftBlock (tokens [R, G] int64, probs [R, G, V] float32, token_probs [R, G]
    float32, confidence_logits [R, G] float32 or None) and the logits U + B [R, G, V].
    """
    check(_WHERE, kind in KINDS, f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    check(_WHERE, isinstance(base_logits, torch.Tensor) and base_logits.ndim == 3,
          "base_logits must be a [R, G, V] tensor")
    num_reqs, gamma, vocab = base_logits.shape
    device = base_logits.device
    check(_WHERE, isinstance(hidden, torch.Tensor) and hidden.ndim == 3, "hidden must be a [R, G, H] tensor")
    hidden_size = hidden.shape[2]
    check_tensor(_WHERE, "base_logits", base_logits, (num_reqs, gamma, vocab), FLOAT_DTYPES, device)
    check_tensor(_WHERE, "hidden", hidden, (num_reqs, gamma, hidden_size), FLOAT_DTYPES, device)
    check_tensor(_WHERE, "anchors", anchors, (num_reqs,), INDEX_DTYPES, device)
    check_tensor(_WHERE, "uniforms", uniforms, (num_reqs, gamma), (torch.float32, torch.float64), device)
    check_tensor(_WHERE, "temperatures", temperatures, (num_reqs,), FLOAT_DTYPES, device)
    check_tensor(_WHERE, "onehot", onehot, (num_reqs,), (torch.bool,), device)
    code = KINDS[kind]
    rank = 0
    if code:
        check(_WHERE, w1 is not None and w2 is not None, f"kind {kind!r} needs w1 and w2")
        rank = w1.shape[-1] if w1.ndim == 2 else -1
        check_tensor(_WHERE, "w1", w1, (vocab, rank), FLOAT_DTYPES, device)
        check_tensor(_WHERE, "w2", w2, (vocab, rank), FLOAT_DTYPES, device)
    if code == 2:
        check_tensor(_WHERE, "mix_w (gate_proj.weight)", mix_w, (rank, hidden_size + rank), FLOAT_DTYPES, device)
        check_tensor(_WHERE, "mix_b (gate_proj.bias)", mix_b, (rank,), FLOAT_DTYPES, device)
    if code == 3:
        check_tensor(_WHERE, "mix_w (joint_proj.weight)", mix_w, (3 * rank, 2 * rank + hidden_size),
                     FLOAT_DTYPES, device)
        check_tensor(_WHERE, "mix_b (joint_proj.bias)", mix_b, (3 * rank,), FLOAT_DTYPES, device)
    has_conf = conf_w is not None
    conf_markov = False
    if has_conf and conf_b is None:  # a bias-free confidence projection (DeepSeek-V4 style)
        conf_b = torch.zeros(1, dtype=conf_w.dtype, device=device)
    if has_conf:
        conf_markov = conf_w.shape == (hidden_size + rank,) and rank > 0
        check(_WHERE, conf_w.shape in ((hidden_size,), (hidden_size + rank,)) and (rank > 0 or conf_w.shape == (hidden_size,)),
              f"conf_w must be [{hidden_size}] or [{hidden_size + rank}], got {list(conf_w.shape)}")
        check_tensor(_WHERE, "conf_w", conf_w, tuple(conf_w.shape), FLOAT_DTYPES, device)
        check_tensor(_WHERE, "conf_b", conf_b, (1,), FLOAT_DTYPES, device)

    logits_dtype = base_logits.dtype if w2 is None else torch.promote_types(base_logits.dtype, w2.dtype)
    tokens = torch.empty(num_reqs, gamma, dtype=torch.int64, device=device)
    probs = torch.empty(num_reqs, gamma, vocab, dtype=torch.float32, device=device)
    token_probs = torch.empty(num_reqs, gamma, dtype=torch.float32, device=device)
    conf = torch.empty(num_reqs, gamma, dtype=torch.float32, device=device) if has_conf else None
    logits = torch.empty(num_reqs, gamma, vocab, dtype=logits_dtype, device=device)
    block = DraftBlock(tokens=tokens, probs=probs, token_probs=token_probs, confidence_logits=conf)
    if num_reqs == 0 or gamma == 0:
        return block, logits

    tiles = tile_sizes(num_reqs, vocab, hidden_size, rank, interp=interpreting(), block_v=block_v)
    dummy = probs  # never read: behind constexpr flags
    state = torch.zeros(num_reqs, rank, dtype=torch.float32, device=device) if code == 3 else dummy
    grid = (triton.cdiv(num_reqs, tiles["BLOCK_R"]),)
    _sequential_head_kernel[grid](
        base_logits, hidden, anchors, uniforms, temperatures, onehot,
        w1 if code else dummy, w2 if code else dummy,
        mix_w if code >= 2 else dummy, mix_b if code >= 2 else dummy,
        conf_w if has_conf else dummy, conf_b if has_conf else dummy, state,
        tokens, probs, token_probs, conf if has_conf else token_probs, logits,
        num_reqs, gamma, vocab, hidden_size, max(rank, 1),
        base_logits.stride(0), base_logits.stride(1), hidden.stride(0), hidden.stride(1), uniforms.stride(0),
        w1.stride(0) if code else 0, w2.stride(0) if code else 0, mix_w.stride(0) if code >= 2 else 0,
        state.stride(0),
        probs.stride(0), probs.stride(1), logits.stride(0), logits.stride(1), tokens.stride(0),
        KIND=code, HAS_CONF=has_conf, CONF_MARKOV=conf_markov,
        **tiles, num_warps=num_warps,
    )
    return block, logits


def filtered_rows(sampling: SamplingBatch, vocab: int) -> torch.Tensor:
    """[R] bool: rows whose q needs a top-k/top-p/min-p filter (sorted path; not fused)."""
    top_ks = sampling.top_ks
    active = ((top_ks > 1) & (top_ks < vocab)) | (sampling.top_ps < 1.0) | (sampling.min_ps > 0.0)
    return active & ~is_greedy(sampling.temperatures, top_ks)


def sample_sequential(
    base_logits: torch.Tensor,  # [R, G, V] U_k
    hidden: torch.Tensor,  # [R, G, H] h_k
    anchors: torch.Tensor,  # [R] int64, p_0
    markov: MarkovHead | None,
    confidence: ConfidenceHead | None,
    sampling: SamplingBatch,  # R requests
    uniforms: torch.Tensor,  # [R, G] U(0,1)
    *,
    block_v: int | None = None,
) -> tuple[DraftBlock, torch.Tensor]:
    """Fused `sample_sequential_ref` (same arguments and returns).

    Dispatch rule: the kernel runs every row; rows with an active top-k/top-p/min-p filter
    (`filtered_rows`) are then recomputed by the reference and written over (one host check).
    """
    num_reqs, gamma, vocab = base_logits.shape
    temps = sampling.temperatures
    onehot = is_greedy(temps, sampling.top_ks) | torch.isnan(temps)
    weights = _weights(markov, confidence)
    block, logits = sequential_head(
        base_logits, hidden, anchors, uniforms, temps.float(), onehot,
        **weights, block_v=block_v,
    )
    filtered = filtered_rows(sampling, vocab)
    # A host sync, as process_logits' own filter check, unless the host knows that no row filters.
    if num_reqs and sampling.filtering is not False and bool(filtered.any()):
        index = filtered.nonzero().squeeze(1)
        sub = SamplingBatch(temps[index], sampling.top_ks[index], sampling.top_ps[index], sampling.min_ps[index],
                            filtering=True)
        ref_block, ref_logits = sample_sequential_ref(
            base_logits[index], hidden[index], anchors[index], markov, confidence, sub, uniforms[index]
        )
        block.tokens[index] = ref_block.tokens
        block.probs[index] = ref_block.probs
        block.token_probs[index] = ref_block.token_probs
        if block.confidence_logits is not None:
            block.confidence_logits[index] = ref_block.confidence_logits
        logits[index] = ref_logits.to(logits.dtype)
    return block, logits

