"""Backend-agnostic part of `dspark-profile`: sweep shapes, the timing loop, and the result.

A probe is a batch-token count B (what the scheduler's cost table is indexed by: Σ_r (1 +
verify_len_r)). It is run as `num_reqs` requests of equal width n with B = num_reqs · n, n the
largest divisor of B not above `--width` (so B ≤ width is one request verifying B tokens, and
larger B spreads over more requests of width up to `--width`; `--width 1` gives decode-shaped
steps).

Clocks: each step is timed on the wall clock and on the stepping thread's CPU clock. On a GPU,
or with several torch threads, only the wall clock means anything. On a CPU with one torch thread
every op runs on the stepping thread, so its CPU time is the step's cost without the time the OS
gave other processes: on a shared machine that is the stable measure (`--clock cpu`); the wall
clock measures the step as this machine runs it right now. Both are kept in the samples file,
with the share of wall time the thread spent preempted.

Timing: one warm-up pass over every shape (`warmup` steps each, discarded), then `repeats`
rounds; each round visits every shape once in a freshly shuffled order, so slow drift and a busy
neighbour spread over all shapes instead of biasing whichever shape ran during them. Each probe's
rate is 1 / step time; `cost_table.from_probes` reduces repeats to their median, and the
flat-then-linear fit (`cost_table.fit_flat_then_linear`) runs on the per-probe median step times.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from dspark_sglang.cost_table import (
    CostTableError, FlatLinearFit, SpsTable, fit_flat_then_linear, from_probes, load_cost_table,
    save_cost_table,
)

__all__ = [
    "Shape", "Probe", "Profile", "shape_for", "staircase", "run_sweep",
    "compare_tables", "samples_path",
]

@dataclass(frozen=True)
class Shape:
    batch_tokens: int
    num_reqs: int
    width: int  # new tokens per request

    @property
    def widths(self) -> list[int]:
        return [self.width] * self.num_reqs


def shape_for(batch_tokens: int, max_width: int) -> Shape:
    """B tokens as num_reqs × width with width the largest divisor of B that is <= max_width."""
    if batch_tokens < 1 or max_width < 1:
        raise ValueError(f"batch tokens and width must be >= 1, got {batch_tokens}, {max_width}")
    width = max(d for d in range(1, min(batch_tokens, max_width) + 1) if batch_tokens % d == 0)
    return Shape(batch_tokens, batch_tokens // width, width)


def staircase(low: int, high: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and their 1.5×) clipped to [low, high]."""
    values, p = {low, high}, 1
    while p <= high:
        for v in (p, 3 * p // 2):
            if low <= v <= high:
                values.add(v)
        p *= 2
    return sorted(values)


CLOCKS = ("wall", "cpu")


@dataclass
class Probe:
    """One shape's timed repeats on both clocks; ``seconds`` is the one the table uses."""

    shape: Shape
    clock: str = "wall"
    wall_seconds: list[float] = field(default_factory=list)  # one per repeat
    cpu_seconds: list[float] = field(default_factory=list)  # the stepping thread's CPU time

    @property
    def seconds(self) -> list[float]:
        return self.wall_seconds if self.clock == "wall" else self.cpu_seconds

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def preempted_fraction(self) -> float:
        """Median share of wall time the stepping thread was off the CPU (contention)."""
        return statistics.median(max(0.0, 1.0 - c / w) for w, c in zip(self.wall_seconds, self.cpu_seconds))


def run_sweep(step: Callable[[Sequence[int]], tuple[float, float]], shapes: Sequence[Shape], *,
              warmup: int, repeats: int, seed: int = 0, clock: str = "wall",
              progress=None) -> list[Probe]:
    """Time ``step(widths) -> (wall, cpu seconds)`` for every shape: warm-up pass, then
    ``repeats`` shuffled rounds. ``clock`` picks which of the two the probes report.

    ``progress``, if given, is called with no arguments after every step (a tqdm ``update``).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    tick = progress or (lambda: None)
    for shape in shapes:
        for _ in range(warmup):
            step(shape.widths)
            tick()
    probes = [Probe(shape, clock) for shape in shapes]
    order = list(range(len(shapes)))
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for i in order:
            wall, cpu = step(probes[i].shape.widths)
            probes[i].wall_seconds.append(wall)
            probes[i].cpu_seconds.append(cpu)
            tick()
    return probes


@dataclass
class Profile:
    """A measured curve: the SGLang table, the fit and the raw samples behind them."""

    probes: list[Probe]
    table: SpsTable
    fit: Optional[FlatLinearFit]
    meta: dict

    @classmethod
    def from_probes(cls, probes: list[Probe], meta: dict,
                    max_batch_tokens: Optional[int] = None) -> "Profile":
        rates = [(p.shape.batch_tokens, 1.0 / s) for p in probes for s in p.seconds]
        table = from_probes(rates, max_batch_tokens=max_batch_tokens)
        fit = None
        if len({p.shape.batch_tokens for p in probes}) >= 2:
            fit = fit_flat_then_linear([p.shape.batch_tokens for p in probes],
                                       [p.median_seconds for p in probes])
        return cls(probes, table, fit, meta)

    def summary(self) -> dict:
        out = {"meta": self.meta, "table": self.table.to_dict(), "probes": [
            {**asdict(p.shape), "clock": p.clock, "seconds": p.seconds,
             "median_seconds": p.median_seconds, "wall_seconds": p.wall_seconds,
             "cpu_seconds": p.cpu_seconds, "preempted_fraction": p.preempted_fraction}
            for p in self.probes
        ]}
        if self.fit is not None:
            out["fit"] = {
                "knee_batch_tokens": self.fit.knee,
                "flat_seconds": self.fit.flat_seconds,
                "slope_seconds_per_token": self.fit.slope_seconds_per_token,
                "sse": self.fit.sse,
            }
        return out

    def save(self, path: Path) -> Path:
        """Write the SPS JSON at ``path`` (SGLang's format) and the samples beside it."""
        save_cost_table(self.table, path)
        sidecar = samples_path(path)
        sidecar.write_text(json.dumps(self.summary(), indent=1), encoding="utf-8")
        return sidecar


def samples_path(table_path: Path) -> Path:
    """``x.json`` -> ``x.samples.json``: the raw repeats, fit and run metadata."""
    table_path = Path(table_path)
    return table_path.with_name(table_path.stem + ".samples.json")


def compare_tables(reference: Path, other: Path) -> dict:
    """Largest relative difference in steps/s between two SPS files, over the union of their
    probes (each table read with linear interpolation, so differing probe sets compare at the same
    batch sizes). Relative to the reference: |other − ref| / ref."""
    ref = load_cost_table(reference, interpolation="linear")
    new = load_cost_table(other, interpolation="linear")
    for table, path in ((ref, reference), (new, other)):
        if not isinstance(table, SpsTable):
            raise CostTableError(str(path), "<root>", "--compare reads step tables "
                                 "(sample_batch_tokens/sample_steps_per_sec), not additive ones")
    points = sorted(set(ref.sample_batch_tokens) | set(new.sample_batch_tokens))
    rows = []
    for b in points:
        a, c = ref.steps_per_second(1, b), new.steps_per_second(1, b)
        rows.append({"batch_tokens": b, "reference": a, "other": c, "relative": abs(c - a) / a})
    worst = max(rows, key=lambda r: r["relative"])
    # Shape: the same comparison after scaling `other` by the median ratio (a uniformly faster or
    # slower machine). The budget argmax of Θ = τ·SPS does not change with that scale; the
    # decision to draft at all (against a draft time in seconds) does.
    level = statistics.median(r["other"] / r["reference"] for r in rows)
    for r in rows:
        r["shape_relative"] = abs(r["other"] / level - r["reference"]) / r["reference"]
    worst_shape = max(rows, key=lambda r: r["shape_relative"])
    return {"reference": str(reference), "other": str(other), "points": rows,
            "max_relative": worst["relative"], "at_batch_tokens": worst["batch_tokens"],
            "median_relative": statistics.median(r["relative"] for r in rows),
            "level_ratio": level, "max_shape_relative": worst_shape["shape_relative"],
            "shape_at_batch_tokens": worst_shape["batch_tokens"]}


def host_meta() -> dict:
    import os

    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    return {"host": platform.node(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg": list(load)}
