"""What SGLang's overlap scheduler is worth to plain decoding on the CPU engine (issue #20 item 4).

The DSPARK worker forces `disable_overlap_schedule`: its round reads the previous round's accepted
tokens on the host (anchors from `req.output_ids`, the commit), so the scheduler cannot prepare
batch N+1 while N runs. This measures what that costs plain SGLang here: the decode step time of the
bundled target (float32, torch_native, one OpenMP thread) with overlap on (SGLang's default) and
off, at batch 1 and 16, engines one at a time, interleaved repeats.

    OMP_NUM_THREADS=1 python examples/bench/overlap-cpu/measure.py [--repeats 2] [--out results.json]

Step time = (time for 80 new tokens - time for 16) / 64, which removes the prefill. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def step_ms(engine, texts: list[str]) -> float:
    params = {"temperature": 0.0, "ignore_eos": True}
    engine.generate(texts, {**params, "max_new_tokens": 4})  # warm-up
    times = {}
    for new in (16, 80):
        start = time.perf_counter()
        engine.generate(texts, {**params, "max_new_tokens": new})
        times[new] = time.perf_counter() - start
    return 1e3 * (times[80] - times[16]) / 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from dspark_sglang.cpu_mode import cpu_engine_kwargs, enable_cpu_mode

    enable_cpu_mode()
    import sglang

    from dspark_sglang.models import ensure_target
    from dspark_sglang.prompts import load_prompts

    target = str(ensure_target())
    batches = [int(b) for b in args.batches.split(",")]
    texts = [p.messages[-1]["content"] for p in load_prompts("gsm8k", limit=max(batches))]
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for overlap in (True, False):
            engine = sglang.Engine(model_path=target, **cpu_engine_kwargs(speculative=True,
                                                                           disable_overlap_schedule=not overlap))
            try:
                for batch in batches:
                    key = f"{'overlap' if overlap else 'no-overlap'} batch {batch}"
                    samples.setdefault(key, []).append(step_ms(engine, texts[:batch]))
                    print(key, f"{samples[key][-1]:.1f} ms", flush=True)
            finally:
                engine.shutdown()
    summary = {k: statistics.median(v) for k, v in samples.items()}
    for batch in batches:
        on, off = summary[f"overlap batch {batch}"], summary[f"no-overlap batch {batch}"]
        print(f"batch {batch}: overlap {on:.1f} ms, no overlap {off:.1f} ms per decode step: "
              f"forcing overlap off costs {100 * (off / on - 1):+.1f} %")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"samples_ms": samples, "median_ms": summary, "repeats": args.repeats}, f, indent=1)


if __name__ == "__main__":
    main()
