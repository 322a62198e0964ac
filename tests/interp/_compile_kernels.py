"""Compile every kernel variant for an NVIDIA target without a GPU (run in a subprocess with
TRITON_INTERPRET=0; see test_kernels_compile.py).

The interpreter accepts code the compiler rejects (a Python int as a loop-carried value, a
non-constexpr global, mismatched types across branches), so the interp tests alone do not show
that a kernel builds. ``triton.compile`` runs the whole pipeline down to PTX and a cubin (ptxas
ships with the wheel) with no driver. Prints one line per variant: ``ok <name>`` or ``FAIL <name>``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dspark_sglang.kernels import block_attention, chain_accept, sequential_head, topk_budget  # noqa: E402


def build(fn, pointers: dict, constexprs: dict, num_warps: int, arch: int, floats=()) -> None:
    """Scalars default to i32 (lengths), ``stride*`` to i64, names in ``floats`` to fp32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name.startswith("stride"):
            signature[name] = "i64"
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": num_warps})


def variants():
    yield "chain_accept", lambda arch: build(
        chain_accept._chain_accept_kernel,
        {"target_ptr": "*fp32", "draft_tokens_ptr": "*i64", "draft_probs_ptr": "*bf16", "verify_lens_ptr": "*i64",
         "greedy_ptr": "*i1", "accept_u_ptr": "*fp32", "sample_u_ptr": "*fp32", "num_accepted_ptr": "*i64",
         "next_tokens_ptr": "*i64", "output_tokens_ptr": "*i64"},
        {"BLOCK_V": 256, "BLOCK_G": 8}, 4, arch)
    yield "topk_budget", lambda arch: build(
        topk_budget._topk_budget_kernel, {"surv_ptr": "*fp32", "out_ptr": "*i64"},
        {"BLOCK_R": 64, "BLOCK_L": 8}, 4, arch)
    # Small tiles: the code paths are the same, and ptxas time grows with the unrolled tile size.
    # Request blocks: one request (broadcast products, the per-request tiles) and 16 (tl.dot).
    for kind, has_conf in ((0, False), (1, True), (2, True), (3, True)):
        for block_r, block_h in ((1, 16), (16, 16)):
            yield f"sequential_head[kind={kind},BLOCK_R={block_r}]", lambda arch, kind=kind, h=has_conf, r=block_r, bh=block_h: build(
                sequential_head._sequential_head_kernel,
                {"base_ptr": "*fp32", "hidden_ptr": "*bf16", "anchors_ptr": "*i64", "uniforms_ptr": "*fp32",
                 "temps_ptr": "*fp32", "onehot_ptr": "*i1", "w1_ptr": "*bf16", "w2_ptr": "*bf16",
                 "mix_w_ptr": "*bf16", "mix_b_ptr": "*bf16", "conf_w_ptr": "*bf16", "conf_b_ptr": "*bf16", "state_ptr": "*fp32",
                 "tokens_ptr": "*i64", "probs_ptr": "*fp32", "token_probs_ptr": "*fp32", "conf_ptr": "*fp32",
                 "logits_ptr": "*bf16"},
                {"KIND": kind, "HAS_CONF": h, "CONF_MARKOV": kind > 0, "BLOCK_R": r, "USE_DOT": r >= 16,
                 "BLOCK_V": 256 // r, "BLOCK_VW": 16, "BLOCK_H": bh, "BLOCK_RANK": 16}, 4, arch)
    for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32")):
        yield f"block_attention[{dtype}]", lambda arch, dtype=dtype, precision=precision: build(
            block_attention._paged_block_attention_kernel,
            {name: f"*{dtype}" for name in ("q_ptr", "pool_k_ptr", "pool_v_ptr", "blk_k_ptr", "blk_v_ptr", "out_ptr")}
            | {"rows_ptr": "*i32", "ctx_lens_ptr": "*i32"},
            {"BLOCK_Q": 16, "BLOCK_N": 32, "BLOCK_D": 64, "DOT_PRECISION": precision}, 4, arch,
            floats=("qk_scale",))


def main(argv: list[str]) -> int:
    arch = int(argv[1]) if len(argv) > 1 else 90
    failed = 0
    for name, compile_one in variants():
        try:
            start = time.perf_counter()
            compile_one(arch)
            print(f"ok {name} {time.perf_counter() - start:.1f}s", flush=True)
        except Exception:  # report every variant, then fail
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc(limit=2)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
