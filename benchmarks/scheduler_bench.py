"""Scheduler micro-benchmark: time per ``schedule`` call on CPU, gamma = 7.

Run installed (``python -m dspark_sglang.benchmarks.scheduler_bench``) or from the repository
(``PYTHONPATH=. python benchmarks/scheduler_bench.py``). Prints one JSON line per (scheduler, R):
the median over ``--calls`` timed calls (``time.perf_counter``, after ``--warmup`` untimed calls),
repeated ``--repeats`` times; ``median_us`` is the smallest of those medians (the least disturbed
by other processes on a shared machine) and ``spread_us`` the largest.

Inputs: a fixed-seed confidence block (c in [0.55, 1.0), so survivals decay along the block as a
real drafter's do) and a step cost table shaped like a GPU's flat-then-falling SPS curve, so the
budget lands in the middle of the candidate list rather than at an end. Each lagged call feeds the
history too, exactly as in serving.

Each scheduler runs on both CPU paths, side by side in one run: ``fused`` (the compiled pass of
dspark_sglang/schedule_cpu.py, what CPU serving uses) and ``torch`` (the reference, and the code path of
accelerator tensors). ``speedup`` is torch / fused. The two must agree: the verified token counts are
printed for both, and the run stops if they differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dspark_sglang.cost_table import SpsTable
from dspark_sglang.schedulers import Algorithm1Scheduler, LaggedBudgetScheduler

GAMMA = 7
REQUEST_COUNTS = (1, 16, 64, 256, 1024)


def bench_cost_table(max_tokens: int = 16384) -> SpsTable:
    """Flat up to 512 batch tokens, then the step time grows linearly (rate ∝ 1/B)."""
    probes = [1, 8, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 16384]
    rates = [100.0 if b <= 512 else 100.0 * 512 / b for b in probes]
    return SpsTable(sample_batch_tokens=probes, sample_steps_per_sec=rates,
                    max_batch_tokens=max_tokens)


def time_per_call(fn, *, calls: int, warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(repeats):
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        medians.append(statistics.median(samples))
    return min(medians) * 1e6, max(medians) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="*", default=list(REQUEST_COUNTS))
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    table = bench_cost_table()
    generator = torch.Generator().manual_seed(0)
    for num_reqs in args.requests:
        confidences = 0.55 + 0.45 * torch.rand(num_reqs, GAMMA, generator=generator)  # [R, γ]
        slots = torch.arange(num_reqs, dtype=torch.int64)  # [R]
        for name, make in (
            ("algorithm1", lambda fused: Algorithm1Scheduler(table, fused_cpu=fused)),
            ("lagged", lambda fused: LaggedBudgetScheduler(table, lag=2, fused_cpu=fused)),
        ):
            row = {"scheduler": name, "num_reqs": num_reqs, "gamma": GAMMA, "device": "cpu", "threads": args.threads}
            for path, fused in (("fused", True), ("torch", False)):
                scheduler = make(fused)
                verify_lens = scheduler.schedule(slots, confidences)
                best, worst = time_per_call(
                    lambda: scheduler.schedule(slots, confidences),
                    calls=args.calls, warmup=args.warmup, repeats=args.repeats,
                )
                row[f"{path}_us"], row[f"{path}_spread_us"] = round(best, 1), round(worst, 1)
                row[f"{path}_verified_tokens"] = int(verify_lens.sum())
            if row["fused_verified_tokens"] != row["torch_verified_tokens"]:
                raise SystemExit(f"scheduler_bench: fused and torch paths disagree: {row}")
            row["speedup"] = round(row["torch_us"] / row["fused_us"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
