"""CPU matmul micro-benchmark: the target's weight-bound matmuls at 1-16 rows, stock vs few-row GEMM.

    python -m dspark_sglang.benchmarks.cpu_gemm --out examples/bench/cpu-gemm

A decode step feeds every linear layer and the LM head 1 row per request; a speculative verify feeds
W rows per request. On a CPU these are weight-bound, so W rows should cost about what 1 row costs.
This measures whether they do, for the matmul shapes of a transformers target folder (by default the
bundled SmolLM2-135M: every decoder layer's q/k/v, o, gate/up and down projections with their own
weights, so they stream from memory as in a model, then the LM head), for:
- stock: `F.linear(x, W)`, SGLang's path for an unquantized layer;
- few-rows: `W @ x^T` with one row padded to two (`dspark_sglang/cpu_linear.py`,
  `DSPARK_CPU_GEMM=few-rows`);
- row-dot: blocks of up to 5 rows, one pass over the weight per block, compiled with numba
  (`cpu_linear.row_dot_linear`, `DSPARK_CPU_GEMM=row-dot`).
Each point is the best of `--repeats` passes, both methods interleaved, on the threads torch is set to
(set OMP_NUM_THREADS=1 as the engine benchmarks do). Prints a table and writes results.json.
Run it on an otherwise idle machine: matmuls share memory bandwidth with anything else running.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dspark_sglang.cpu_linear import few_row_linear, row_dot_linear


def layer_shapes(config: dict) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """([(out, in)] of one decoder layer's projections, (vocab, hidden) of the LM head)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    inter = config["intermediate_size"]
    qkv = (heads + 2 * kv_heads) * head_dim
    return [(qkv, hidden), (hidden, heads * head_dim), (2 * inter, hidden), (hidden, inter)], (config["vocab_size"], hidden)


def stock(x, w):
    return torch.nn.functional.linear(x, w)


METHODS = {"stock": stock, "few-rows": few_row_linear, "row-dot": row_dot_linear}


def one_pass(fn, layers, lm_head, rows: int) -> tuple[float, float]:
    """Seconds of (every layer's projections, the LM head) for `rows` rows of activations."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for layer in layers for w in layer}
    t0 = time.perf_counter()
    for layer in layers:
        for w in layer:
            fn(inputs[w.shape[1]], w)
    t1 = time.perf_counter()
    fn(inputs[lm_head.shape[1]], lm_head)
    return t1 - t0, time.perf_counter() - t1


def machine_peaks() -> tuple[float, float]:
    """(GFLOP/s of a 2048^3 float32 matmul, GB/s read+write of a 512 MiB copy), best of 5: the bounds a
    weight-bound matmul is measured against."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.empty(1 << 27)
    y = torch.empty_like(x)
    a @ b, y.copy_(x)  # warm-up
    mm = min(_seconds(lambda: a @ b) for _ in range(5))
    copy = min(_seconds(lambda: y.copy_(x)) for _ in range(5))
    return 2 * 2048**3 / mm / 1e9, 2 * x.numel() * 4 / copy / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_sglang.benchmarks.cpu_gemm",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="transformers folder (default: the bundled SmolLM2-135M)")
    parser.add_argument("--rows", default="1,2,3,4,5,6,8,12,16,24,32", help="row counts to measure")
    parser.add_argument("--repeats", type=int, default=5, help="passes per point; the best counts (default: 5)")
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    gflops, gbps = machine_peaks()
    print(f"this machine, {torch.get_num_threads()} thread(s): float32 matmul {gflops:.1f} GFLOP/s, copy {gbps:.1f} GB/s")

    if args.target is None:
        from dspark_sglang.models import ensure_target

        args.target = ensure_target()
    config = json.loads((Path(args.target) / "config.json").read_text())
    shapes, head_shape = layer_shapes(config)
    layers = [[torch.randn(*s) for s in shapes] for _ in range(config["num_hidden_layers"])]  # float32
    lm_head = torch.randn(*head_shape)
    row_counts = [int(r) for r in args.rows.split(",")]
    for fn in METHODS.values():  # compile / load compiled code before anything is timed
        for rows in range(1, 7):
            fn(torch.randn(rows, 8), torch.randn(4, 8))
    best: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for rows in row_counts:
            for name, fn in METHODS.items():
                got = one_pass(fn, layers, lm_head, rows)
                old = best.get((name, rows), [float("inf")] * 2)
                best[(name, rows)] = [min(a, b) for a, b in zip(old, got)]

    points = []
    print(f"{config['num_hidden_layers']} layers {shapes} + LM head {head_shape}, float32, "
          f"{torch.get_num_threads()} thread(s); milliseconds (layers + LM head = total), best of {args.repeats}")
    print(f"{'rows':>4} | " + " | ".join(f"{name:>22}" for name in METHODS) + " | vs stock")
    for rows in row_counts:
        cells, point = [], {"rows": rows}
        for name in METHODS:
            layers_s, head_s = best[(name, rows)]
            key = name.replace("-", "_")
            point[f"{key}_layers_ms"], point[f"{key}_lm_head_ms"] = layers_s * 1e3, head_s * 1e3
            cells.append(f"{layers_s*1e3:7.1f} + {head_s*1e3:5.1f} = {(layers_s + head_s)*1e3:5.1f}")
        stock_total = sum(best[("stock", rows)])
        ratios = " ".join(f"{sum(best[(name, rows)]) / stock_total:.2f}" for name in METHODS if name != "stock")
        points.append(point)
        print(f"{rows:>4} | " + " | ".join(cells) + f" | {ratios}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"target": Path(args.target).name, "threads": torch.get_num_threads(), "repeats": args.repeats,
                  "torch": torch.__version__, "matmul_gflops": gflops, "copy_gbps": gbps, "points": points}
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
