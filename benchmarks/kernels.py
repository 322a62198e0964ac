"""Kernel micro-benchmark: each fused kernel against its torch reference, on one CUDA device.

Run installed (``python -m dspark_sglang.benchmarks.kernels``) or from the repository
(``PYTHONPATH=. python benchmarks/kernels.py``). Prints JSON lines: first the device and its
measured copy bandwidth (``y.copy_(x)`` on a 1 GiB tensor: 2 bytes moved per byte copied), then one
line per (kernel, shape) with the median kernel and reference times (`triton.testing.do_bench`,
L2 flushed between runs, warm-up and compilation excluded), the speedup, the compulsory bytes
(what any implementation must move at least once, from each kernel's traffic accounting), the
achieved bandwidth on those bytes and its fraction of the copy bandwidth. ``--check`` first compares
each kernel with its reference on the benchmark inputs.

Without CUDA it prints one line saying the GPU numbers are unmeasured and exits: interpreter
(TRITON_INTERPRET=1) times measure numpy, not the kernel, and are never reported as speed.
"""

from __future__ import annotations

import argparse
import json

import torch

from dspark_sglang.drafters.heads import ConfidenceHead, MarkovHead
from dspark_sglang.sampling import SamplingBatch

GAMMA = 7
VOCAB = 151936  # Qwen3
HIDDEN, RANK = 2560, 256  # Qwen3-4B drafter, DeepSpec's markov_rank
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (CUDA events, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of a 1 GiB float32 tensor (read + write)."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def report(kernel: str, shape: dict, kernel_ms: float, ref_ms: float, nbytes: int, copy_bps: float, check,
           passed=None):
    """One JSON line; ``check`` says what --check compared and ``passed`` whether it held (None: not checked)."""
    achieved = nbytes / (kernel_ms * 1e-3)
    emit(kernel=kernel, **shape, kernel_us=round(kernel_ms * 1e3, 1), reference_us=round(ref_ms * 1e3, 1),
         speedup=round(ref_ms / kernel_ms, 2), compulsory_bytes=nbytes,
         achieved_GBps=round(achieved / 1e9, 1), fraction_of_copy=round(achieved / copy_bps, 3), check=check,
         passed=passed)


def bench_chain_accept(num_reqs: int, device, copy_bps: float, check: bool) -> None:
    from dspark_sglang.kernels.chain_accept import chain_accept, chain_accept_ref

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(num_reqs, GAMMA + 1, VOCAB, device=device, generator=g) * 3
    target = torch.softmax(logits, -1)
    draft = torch.softmax(logits[:, :GAMMA] + torch.randn(num_reqs, GAMMA, VOCAB, device=device, generator=g), -1)
    tokens = torch.multinomial(draft.view(-1, VOCAB), 1, generator=g).view(num_reqs, GAMMA)
    args = (target, tokens, draft, torch.full((num_reqs,), GAMMA, device=device),
            torch.zeros(num_reqs, dtype=torch.bool, device=device),
            torch.rand(num_reqs, GAMMA, device=device, generator=g), torch.rand(num_reqs, device=device, generator=g))
    status = None
    if check:
        a, b = chain_accept(*args), chain_accept_ref(*args)
        status = "ok" if torch.equal(a.output_tokens, b.output_tokens) else "mismatch"
    # Compulsory: the next-token rows p_n and q_n once (ratio-test gathers are negligible).
    nbytes = num_reqs * 2 * VOCAB * 4
    report("chain_accept", dict(num_reqs=num_reqs, gamma=GAMMA, vocab=VOCAB, greedy=False),
           bench(lambda: chain_accept(*args)), bench(lambda: chain_accept_ref(*args)), nbytes, copy_bps, status,
           None if status is None else status == "ok")


def bench_topk_budget(num_reqs: int, device, copy_bps: float, check: bool) -> None:
    from dspark_sglang.kernels.topk_budget import topk_budget, topk_budget_ref

    g = torch.Generator(device=device).manual_seed(1)
    surv = torch.cumprod(0.55 + 0.45 * torch.rand(num_reqs, GAMMA, device=device, generator=g), dim=1)
    count = num_reqs * GAMMA // 2
    status = None
    if check:
        status = "ok" if torch.equal(topk_budget(surv, count), topk_budget_ref(surv, count)) else "mismatch"
    report("topk_budget", dict(num_reqs=num_reqs, gamma=GAMMA), bench(lambda: topk_budget(surv, count)),
           bench(lambda: topk_budget_ref(surv, count)), surv.numel() * 4 + num_reqs * 8, copy_bps, status,
           None if status is None else status == "ok")


def bench_sequential_head(num_reqs: int, kind: str, device, copy_bps: float, check: bool) -> None:
    from dspark_sglang.kernels.sequential_head import sample_sequential, sample_sequential_ref

    torch.manual_seed(2)
    markov = MarkovHead(kind, VOCAB, HIDDEN, RANK).to(device, torch.bfloat16)
    confidence = ConfidenceHead(HIDDEN, RANK).to(device, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(2)
    base = torch.randn(num_reqs, GAMMA, VOCAB, device=device, generator=g, dtype=torch.bfloat16)
    hidden = torch.randn(num_reqs, GAMMA, HIDDEN, device=device, generator=g, dtype=torch.bfloat16)
    anchors = torch.randint(0, VOCAB, (num_reqs,), device=device, generator=g)
    uniforms = torch.rand(num_reqs, GAMMA, device=device, generator=g)
    sampling = SamplingBatch(torch.full((num_reqs,), 0.8, device=device),
                             torch.full((num_reqs,), -1, dtype=torch.int64, device=device),
                             torch.ones(num_reqs, device=device), torch.zeros(num_reqs, device=device))
    args = (base, hidden, anchors, markov, confidence, sampling, uniforms)
    status = passed = None
    if check:
        (a, _), (b, _) = sample_sequential(*args), sample_sequential_ref(*args)
        # bf16 logits round the Markov bias at a different point in the two (fp32 dot, then bf16;
        # vs a bf16 matmul): a rare token flip, which changes the rest of that request's block, is
        # expected. The first draft's q must agree everywhere; most tokens must too.
        close = torch.allclose(a.probs[:, 0], b.probs[:, 0], atol=1e-3)
        equal = float((a.tokens == b.tokens).float().mean())
        status = f"tokens_equal={equal:.3f} first_q_close={close}"
        passed = close and equal >= 0.95
    w2 = VOCAB * RANK * 2
    mix = {"vanilla": 0, "gated": RANK * (HIDDEN + RANK), "rnn": 3 * RANK * (HIDDEN + 2 * RANK)}[kind] * 2
    # Compulsory per step: W2 (and the mixing weights) once for all requests; per request U (bf16)
    # read, logits (bf16) and q (fp32) written.
    nbytes = GAMMA * (w2 + mix + num_reqs * VOCAB * (2 + 2 + 4))
    report("sequential_head", dict(num_reqs=num_reqs, gamma=GAMMA, vocab=VOCAB, rank=RANK, kind=kind),
           bench(lambda: sample_sequential(*args)), bench(lambda: sample_sequential_ref(*args)),
           nbytes, copy_bps, status, passed)


def bench_block_attention(num_reqs: int, ctx_len: int, device, copy_bps: float, check: bool) -> None:
    from dspark_sglang.kernels.block_attention import block_attention, block_attention_ref

    g = torch.Generator(device=device).manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g, dtype=torch.bfloat16)

    q = rand(num_reqs, GAMMA, HEADS, HEAD_DIM)
    ctx_k, ctx_v = rand(num_reqs, ctx_len, KV_HEADS, HEAD_DIM), rand(num_reqs, ctx_len, KV_HEADS, HEAD_DIM)
    k, v = rand(num_reqs, GAMMA, KV_HEADS, HEAD_DIM), rand(num_reqs, GAMMA, KV_HEADS, HEAD_DIM)
    scale = HEAD_DIM ** -0.5
    status = passed = None
    if check:
        a, b = block_attention(q, ctx_k, ctx_v, None, k, v, scale), block_attention_ref(q, ctx_k, ctx_v, None, k, v, scale)
        err = float((a.float() - b.float()).abs().max())
        status = f"max_abs_err={err:.2e}"
        passed = err <= 2e-2  # bf16 outputs of magnitude ~1: a few units in the last place
    nbytes = 2 * (ctx_k.numel() + ctx_v.numel() + k.numel() + v.numel() + 2 * q.numel())
    report("block_attention", dict(num_reqs=num_reqs, ctx_len=ctx_len, block=GAMMA, heads=HEADS,
                                   kv_heads=KV_HEADS, head_dim=HEAD_DIM),
           bench(lambda: block_attention(q, ctx_k, ctx_v, None, k, v, scale)),
           bench(lambda: block_attention_ref(q, ctx_k, ctx_v, None, k, v, scale)), nbytes, copy_bps, status,
           passed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--ctx-len", type=int, default=2048)
    parser.add_argument("--markov", default="vanilla", choices=["vanilla", "gated", "rnn"])
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: chain_accept topk_budget sequential_head block_attention")
    parser.add_argument("--check", action="store_true", help="compare each kernel with its reference first")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        emit(device="cpu", status="unmeasured",
             reason="no CUDA device: GPU kernel timings are not measured here (interpreter times are "
                    "numpy, not kernel speed); run this on a GPU host. Correctness: pytest -m interp")
        return
    device = torch.device("cuda")
    copy_bps = copy_bandwidth(device)
    emit(device=torch.cuda.get_device_name(device), copy_GBps=round(copy_bps / 1e9, 1),
         torch=torch.__version__)
    wanted = set(args.only or ["chain_accept", "topk_budget", "sequential_head", "block_attention"])
    for num_reqs in args.requests:
        if "chain_accept" in wanted:
            bench_chain_accept(num_reqs, device, copy_bps, args.check)
        if "topk_budget" in wanted:
            bench_topk_budget(num_reqs, device, copy_bps, args.check)
        if "sequential_head" in wanted:
            bench_sequential_head(num_reqs, args.markov, device, copy_bps, args.check)
        if "block_attention" in wanted:
            bench_block_attention(num_reqs, args.ctx_len, device, copy_bps, args.check)


if __name__ == "__main__":
    main()
