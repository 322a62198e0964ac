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
        for name, scheduler in (
            ("algorithm1", Algorithm1Scheduler(table)),
            ("lagged", LaggedBudgetScheduler(table, lag=2)),
        ):
            verify_lens = scheduler.schedule(slots, confidences)
            best, worst = time_per_call(
                lambda: scheduler.schedule(slots, confidences),
                calls=args.calls, warmup=args.warmup, repeats=args.repeats,
            )
            print(json.dumps({
                "scheduler": name, "num_reqs": num_reqs, "gamma": GAMMA, "device": "cpu",
                "threads": args.threads, "median_us": round(best, 1), "spread_us": round(worst, 1),
                "verified_tokens": int(verify_lens.sum()),
            }))


if __name__ == "__main__":
    main()
