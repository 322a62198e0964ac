"""Built-in steps/s curves for projecting to GPUs (``dspark-simulate --sps builtin:NAME``).

Each is stored as step time (ms) at a few total batch-token counts, linearly interpolated in step
time onto a dense probe grid and converted to an SPS table (``linear`` lookup; beyond the last
probe the falling slope is extended). Sources (peers-and-demand.md §0, §3):

- ``mi355x-qwen3.8-27b-tp1`` [O, measured]: eagle-harness 0.1.3 profile
  ``core/profiles/mi355x-qwen3.8-27b-tp1/cost``, 27B dense bf16 on one MI355X, by total tokens:
  1 → 11.99 ms, 8 → 12.67, 32 → 15.52, 64 → 15.92, 256 → 28.65, 512 → 45.59, 1024 → 76.13
  (flat to about 64 tokens, then about 60 µs per extra token).
- ``h100-qwen3-8b-roofline`` [D, derived, not measured]: Qwen3-8B bf16 on one H100 SXM, 16.4 GB of
  weights at 3.35 TB/s = 4.9 ms, at the 76% of floor SGLang reaches at batch 1 (Llama-3.1-8B 6.3 ms)
  → 6.4 ms flat up to a 192-token knee, then 30 µs per token (16.4 GFLOP/token at ~55% MFU).
"""

from __future__ import annotations

from dspark_sglang.cost_table import SpsTable

__all__ = ["BUILTIN_CURVES", "builtin_table", "builtin_description", "describe_builtins"]

# name -> (description, [(batch_tokens, step_ms), ...])
BUILTIN_CURVES: dict[str, tuple[str, list[tuple[int, float]]]] = {
    "mi355x-qwen3.8-27b-tp1": (
        "measured: eagle-harness profile, 27B dense bf16, 1x MI355X",
        [(1, 11.989), (8, 12.670), (32, 15.520), (64, 15.917), (256, 28.648), (512, 45.592), (1024, 76.130)],
    ),
    "h100-qwen3-8b-roofline": (
        "derived (roofline, not measured): Qwen3-8B bf16, 1x H100 SXM",
        [(1, 6.4), (192, 6.4), (4096, 6.4 + 0.030 * (4096 - 192))],
    ),
}


def _dense_probes(points: list[tuple[int, float]], step: int = 8) -> tuple[list[int], list[float]]:
    tokens = sorted({1, *range(step, points[-1][0] + 1, step), *(p[0] for p in points)})
    ms = []
    for b in tokens:
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= b <= x1:
                ms.append(y0 + (y1 - y0) * (b - x0) / (x1 - x0))
                break
    return tokens, [1000.0 / m for m in ms]


def builtin_table(name: str) -> SpsTable:
    if name not in BUILTIN_CURVES:
        raise ValueError(f"unknown built-in curve {name!r}; known: {', '.join(BUILTIN_CURVES)}")
    tokens, rates = _dense_probes(BUILTIN_CURVES[name][1])
    return SpsTable(tokens, rates, max(tokens[-1], 16384), interpolation="linear", path=f"builtin:{name}")


def builtin_description(name: str) -> str:
    """Where a built-in curve came from; it starts with "measured" or "derived"."""
    if name not in BUILTIN_CURVES:
        raise ValueError(f"unknown built-in curve {name!r}; known: {', '.join(BUILTIN_CURVES)}")
    return BUILTIN_CURVES[name][0]


def describe_builtins() -> str:
    return "\n".join(f"  builtin:{name}: {desc}" for name, (desc, _) in BUILTIN_CURVES.items())
