"""The engine half of the GPU check: greedy parity and speed of DSPARK against plain SGLang.

    python -m dspark_sglang.benchmarks.gpu_engines --out gpu-check-out            # on a GPU host
    python -m dspark_sglang.benchmarks.gpu_engines --device cpu --prompts 2 ...    # the same code on CPU

Starts one `sglang.Engine` per configuration, one after another, on the bundled SmolLM2-135M
target (float32, so greedy speculative output must equal plain decoding token for token):

- ``plain``: no speculation (SGLang's defaults on the device: CUDA graphs on a GPU);
- ``dspark:<drafter>``: this plugin's worker with each zoo drafter (``DSPARK_USE_BUILTIN=0``);
- ``dspark:<first drafter>@tiers``: the same with fixed-width verify tiers (``DSPARK_VERIFY_TIERS=auto``);
- ``builtin:dspark``: SGLang's own DSPARK worker on the zoo DSpark checkpoint (``DSPARK_USE_BUILTIN=1``;
  CUDA only, where the takeover policy would pick it by default);
- ``dspark:dspark@tp2``: this plugin with ``tp_size=2``, where two devices exist.

For each: greedy outputs of ``--prompts`` prompts generated as one batch (compared with ``plain``),
per-user speed at batch 1 (prompts one at a time) and aggregate speed at ``--batch``, accepted
tokens per verification round. A configuration that fails records its error and the next one runs.
Results go to ``<out>/engines.json`` after every configuration, so a scheduler crash that ends this
process (SGLang kills its parent) still leaves what finished; `gpu_check` reads that file.
Speeds are one run on whatever else the host is doing: a smoke figure, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

ZOO = ("dspark", "dflash", "eagle3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="folder for engines.json")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--drafters", default=",".join(ZOO), help="zoo drafters to serve (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=8, help="prompts in the parity batch (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="requests in the aggregate-speed batch (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-builtin", action="store_true", help="skip SGLang's built-in DSPARK worker")
    p.add_argument("--tp", type=int, default=0, help="also serve with tp_size=N (default: 2 when 2+ GPUs)")
    return p.parse_args(argv)


def engine_kwargs(device: str) -> dict:
    """float32 on every device: greedy parity is exact only when both engines round alike."""
    if device == "cpu":
        from dspark_sglang.cpu_mode import cpu_engine_kwargs

        return cpu_engine_kwargs(speculative=True)
    # triton attention serves float32 on CUDA (FlashInfer / FA3 want half precision).
    return {"device": "cuda", "dtype": "float32", "attention_backend": "triton", "mem_fraction_static": 0.5}


def configurations(args, num_devices: int) -> list[tuple[str, dict, dict]]:
    """[(name, engine kwargs beyond the base, environment)] in the order they run."""
    configs = [("plain", {}, {})]
    drafters = [d for d in args.drafters.split(",") if d]
    for drafter in drafters:
        configs.append((f"dspark:{drafter}", {"speculative_draft_model_path": drafter}, {"DSPARK_USE_BUILTIN": "0"}))
    if drafters:  # fixed-width verify tiers (the shapes CUDA graphs need), still eager
        configs.append((f"dspark:{drafters[0]}@tiers", {"speculative_draft_model_path": drafters[0]},
                        {"DSPARK_USE_BUILTIN": "0", "DSPARK_VERIFY_TIERS": "auto"}))
    if args.device == "cuda" and not args.no_builtin and "dspark" in args.drafters.split(","):
        configs.append(("builtin:dspark", {"speculative_draft_model_path": "dspark"}, {"DSPARK_USE_BUILTIN": "1"}))
    tp = args.tp or (2 if num_devices >= 2 else 0)
    if tp > 1 and tp <= num_devices:
        configs.append((f"dspark:dspark@tp{tp}", {"speculative_draft_model_path": "dspark", "tp_size": tp},
                        {"DSPARK_USE_BUILTIN": "0"}))
    return configs


def measure(engine, texts: list[str], batch_texts: list[str], max_new_tokens: int) -> dict:
    greedy = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    outs = engine.generate(texts, greedy)
    start = time.perf_counter()
    tokens = 0
    for text in texts[:4]:  # batch 1: one request at a time
        tokens += engine.generate(text, greedy)["meta_info"]["completion_tokens"]
    batch1 = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    many = engine.generate(batch_texts, greedy)
    seconds = time.perf_counter() - start
    verify = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    accepted = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "output_ids": [o["output_ids"] for o in outs],
        "batch1_tok_s": round(batch1, 1),
        "batch_tok_s": round(sum(o["meta_info"]["completion_tokens"] for o in many) / seconds, 1),
        "tokens_per_round": round(accepted / verify, 3) if verify else None,
    }


def run_one(name: str, extra: dict, env: dict, base: dict, target: str, texts, batch_texts, args) -> dict:
    import sglang

    from dspark_sglang.models import zoo_drafter

    kwargs = dict(base, **extra)
    if "speculative_draft_model_path" in kwargs:
        kwargs["speculative_draft_model_path"] = str(zoo_drafter(kwargs["speculative_draft_model_path"]))
        kwargs["speculative_algorithm"] = "DSPARK"
    start = time.perf_counter()
    with mock.patch.dict(os.environ, env):  # the scheduler process inherits it; restored afterwards
        engine = sglang.Engine(model_path=target, **kwargs)
    try:
        result = {"ready_s": round(time.perf_counter() - start, 1)}
        result.update(measure(engine, texts, batch_texts, args.max_new_tokens))
        info = (engine.get_server_info().get("internal_states") or [{}])[0]
        result["worker"] = "dspark-sglang" if "dspark_plugin" in info else "sglang"
        return result
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        from dspark_sglang.cpu_mode import enable_cpu_mode

        enable_cpu_mode()  # before sglang is imported
    import torch
    from transformers import AutoTokenizer

    from dspark_sglang.models import ensure_target
    from dspark_sglang.prompts import load_prompts

    num_devices = torch.cuda.device_count() if args.device == "cuda" else 1
    target = str(ensure_target())
    tokenizer = AutoTokenizer.from_pretrained(target)
    sets = [load_prompts(name, limit=args.batch) for name in ("gsm8k", "humaneval", "mtbench")]
    prompts = [p for trio in zip(*sets) for p in trio]  # the three sets interleaved
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    parity_texts, batch_texts = texts[: args.prompts], texts[: args.batch]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "engines.json"
    doc = {"device": args.device, "num_devices": num_devices, "max_new_tokens": args.max_new_tokens,
           "prompts": len(parity_texts), "batch": len(batch_texts), "configs": {}}
    base = engine_kwargs(args.device)
    for name, extra, env in configurations(args, num_devices):
        print(f"[gpu_engines] {name} ...", flush=True)
        try:
            result = run_one(name, extra, env, base, target, parity_texts, batch_texts, args)
        except Exception as exc:  # record and go on: one broken configuration must not hide the rest
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)}
        plain = doc["configs"].get("plain", {}).get("output_ids")
        if "output_ids" in result and plain is not None and name != "plain":
            same = sum(a == b for a, b in zip(result["output_ids"], plain))
            result["parity"] = {"identical": same, "total": len(plain)}
        doc["configs"][name] = result
        path.write_text(json.dumps(doc, indent=1))
        print(f"[gpu_engines] {name}: {({k: v for k, v in result.items() if k not in ('output_ids', 'traceback')})}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
