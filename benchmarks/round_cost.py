"""What one speculative round costs, phase by phase, as ratios to a plain DECODE step of the same batch.

    python -m dspark_sglang.benchmarks.round_cost --out examples/bench/round-cost

It drives the real worker in SGLang's CPU engine (`--speculative-algorithm DSPARK`, the zoo DSpark
drafter by default) with the round-cost probe on (dspark_sglang/sglang/round_probe.py): every decode
round first runs SGLang's own DECODE forward + sampling on the scheduler's batch and times it, then
runs the speculative round with a forced verify window (cycling through `--windows`) and times its
phases. Both figures come from the same batch, in the same process, one right after the other, so
their ratio is free of run-to-run drift. For every batch size x context length it reports medians of:
- plain: SGLang's decode step (seconds, the denominator of every ratio);
- draft: the draft step (block forward, LM head, sequential head, confidences, scheduler);
- verify@W: the target forward over every request's window of W tokens (W = 1 is a DECODE forward
  with the drafter's layers captured), its logits included;
- accept, commit: chain acceptance; the drafter's context update and the outputs for SGLang;
- round@W: the whole round; bookkeeping = accept + commit, also per request.
Host syncs are not counted here: on a CPU every tensor is a host tensor (see the README).

Requests are `--batches` concurrent prompts of exactly `--contexts` tokens (real text from the prompt
sets, greedy, EOS ignored); only rounds in which every request of the point verified the full window
count. Writes results.json and round_cost.png under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PHASES = ("draft", "verify", "accept", "commit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dspark_sglang.benchmarks.round_cost", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16", help="concurrent requests per point (default: %(default)s; 64 needs ~8 GB at 2k)")
    p.add_argument("--contexts", default="128,2048", help="prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--windows", default="1,2,3,4,8", help="verify windows W incl. the anchor row (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds per window and point (default: %(default)s)")
    p.add_argument("--drafter", default=None, help="drafter checkpoint (default: the zoo DSpark drafter)")
    p.add_argument("--draft-vocab", default="auto", help="auto | none | PATH (DSPARK_DRAFT_VOCAB; default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", type=Path, default=Path("round-cost"))
    args = p.parse_args(argv)
    for name in ("batches", "contexts", "windows"):
        values = [int(x) for x in getattr(args, name).split(",") if x.strip()]
        if not values or min(values) < 1:
            p.error(f"--{name}: comma-separated integers >= 1")
        setattr(args, name, values)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def context_prompts(tokenizer, num: int, length: int) -> list[list[int]]:
    """`num` distinct token sequences of exactly `length` tokens cut from real prompt text."""
    from dspark_sglang.prompts import load_prompts

    stream: list[int] = []
    for name in ("mtbench", "humaneval", "gsm8k"):
        for prompt in load_prompts(name):
            stream += tokenizer.encode(prompt.messages[0]["content"], add_special_tokens=False)
    need = num * 97 + length
    while len(stream) < need:
        stream += stream
    return [stream[i * 97 : i * 97 + length] for i in range(num)]


def summarize(records: list[dict], batch: int, windows: list[int]) -> dict:
    """Medians per window over the rounds where all `batch` requests verified the full window."""
    out: dict = {"windows": {}}
    full = [r for r in records if r["batch"] == batch and r["verify_tokens"] == batch * r["window"]]
    plain = [r["plain_decode"] for r in full]
    if not plain:
        return out
    base = statistics.median(plain)
    out.update(plain_ms=1000 * base, rounds=len(full), context_tokens=statistics.median(r["context_tokens"] for r in full) / batch)
    draft = statistics.median(r["draft"] for r in full)
    out["draft_ratio"] = draft / base
    for w in windows:
        rows = [r for r in full if r["window"] == w]
        if not rows:
            continue
        med = {ph: statistics.median(r[ph] for r in rows) for ph in PHASES}
        total = statistics.median(sum(r[ph] for ph in PHASES) for r in rows)
        book = statistics.median(r["accept"] + r["commit"] for r in rows)
        out["windows"][str(w)] = dict(
            rounds=len(rows), **{f"{ph}_ratio": med[ph] / base for ph in PHASES}, round_ratio=total / base,
            bookkeeping_share=book / total, bookkeeping_ms_per_request=1000 * book / batch,
            accepted_per_request=statistics.mean(r["accepted"] for r in rows) / batch,
        )
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.6), sharey=True, squeeze=False)
    for ax, point in zip(axes[0], points):
        ws = sorted(point["windows"], key=int)
        x = range(len(ws))
        bottom = [0.0] * len(ws)
        for ph, color in zip(PHASES, ("tab:orange", "tab:blue", "tab:green", "tab:gray")):
            vals = [point["windows"][w][f"{ph}_ratio"] for w in ws]
            ax.bar(x, vals, bottom=bottom, color=color, label=ph)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(list(x), [f"W={w}" for w in ws])
        ax.set_title(f"batch {point['batch']}, ctx {point['context']}\nplain {point['plain_ms']:.0f} ms", fontsize=9)
    axes[0][0].set_ylabel("time / plain DECODE step")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Speculative round, phase by phase (dashed: one plain decode step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    import os

    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dspark_sglang.cpu_mode import cpu_engine_kwargs, enable_cpu_mode

    enable_cpu_mode()
    os.environ["DSPARK_ROUND_PROBE"] = ",".join(map(str, args.windows))
    os.environ["DSPARK_DRAFT_VOCAB"] = args.draft_vocab
    os.environ.setdefault("DSPARK_STATS_EVERY", "0")
    import sglang as sgl
    from transformers import AutoTokenizer

    from dspark_sglang.benchmarks.bench import _recorded_path
    from dspark_sglang.models import ensure_target, zoo_drafter

    target = str(ensure_target())
    drafter = args.drafter or str(zoo_drafter("dspark"))
    tokenizer = AutoTokenizer.from_pretrained(target)
    gamma_window = max(args.windows)
    # A cycle through the windows commits at most sum(windows) tokens per request, so this many new
    # tokens gives every window at least `rounds` rounds (more when drafts are rejected).
    new_tokens = args.rounds * sum(args.windows) + 8
    max_tokens = max(args.batches) * (max(args.contexts) + new_tokens + 2 * gamma_window) + 4096
    engine = sgl.Engine(model_path=target, **cpu_engine_kwargs(
        speculative=True, dtype=args.dtype, speculative_algorithm="DSPARK", speculative_draft_model_path=drafter,
        max_total_tokens=max_tokens, max_running_requests=max(args.batches), chunked_prefill_size=max(8192, max(args.contexts))))
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "drafter": _recorded_path(drafter), "points": [], "command": "python -m dspark_sglang.benchmarks.round_cost " + " ".join(sys.argv[1:])}
    try:
        for context in args.contexts:
            for batch in args.batches:
                prompts = context_prompts(tokenizer, batch, context)
                seen = len(_records(engine))
                # Each window needs `rounds` full rounds: a round commits up to W tokens per request.
                params = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}
                start = time.time()
                engine.generate(input_ids=prompts, sampling_params=params)
                records = _records(engine)[seen:]
                point = dict(batch=batch, context=context, seconds=round(time.time() - start, 1), **summarize(records, batch, args.windows))
                results["points"].append(point)
                print(_line(point), flush=True)
    finally:
        engine.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "round_cost.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'round_cost.png'}")
    return results


def _records(engine) -> list[dict]:
    info = engine.get_server_info()
    states = info.get("internal_states") or [{}]
    return list(states[0].get("dspark_plugin", {}).get("round_probe", {}).get("rounds", []))


def _line(point: dict) -> str:
    if "plain_ms" not in point:
        return f"batch {point['batch']} ctx {point['context']}: no complete rounds"
    ws = " ".join(f"W{w}: verify {v['verify_ratio']:.2f} round {v['round_ratio']:.2f}" for w, v in point["windows"].items())
    return (f"batch {point['batch']:>3} ctx {point['context']:>5}: plain {point['plain_ms']:.1f} ms, "
            f"draft {point['draft_ratio']:.2f}x | {ws}")


if __name__ == "__main__":
    main()
