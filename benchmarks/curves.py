"""Per-user speed vs aggregate throughput curves, and the per-user speedup at matched throughput.

One implementation, used by ``dspark-bench`` (measured curves) and ``dspark-simulate`` (predicted
ones).

A configuration's curve is its operating points in load order (concurrency 1, 2, 4, ...): x =
aggregate output throughput (tokens/s over all users), y = per-user decode speed (tokens/s seen by
one user). Reading the curve at throughput X answers "if this configuration were loaded until it
delivered X tokens/s in total, how fast would each user go?". The speedup of configuration B over
baseline A at matched throughput X is y_B(X) / y_A(X) (paper §5: "per-user speed at matched
throughput").

Interpolation is piecewise linear on the throughput axis along the load path. When the path turns
back (throughput falls as load grows, as fixed-length speculation does past saturation), several
segments cover the same X; the curve then reads the best of them (the upper envelope), because an
operator would run at the lighter load that delivers the same throughput faster. Outside the
throughput range a curve reached, it has no value: speedups are reported only on the range both
curves reach, [max(min x_A, min x_B), min(max x_A, max x_B)].

Extremes: on any interval where both curves are single linear pieces, y_B/y_A is a linear-fractional
function of X and therefore monotone, so its min and max over the matched range lie at a breakpoint
of either curve, at a range end, or where envelope pieces cross. The crossings are covered by a dense
grid (``DENSE_POINTS``), so the reported extremes are exact for monotone curves and within the grid
spacing otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

__all__ = ["CurvePoint", "Curve", "MatchedPoint", "MatchedSpeedup", "matched_range", "matched_speedup",
           "curve_from_repeats", "DENSE_POINTS"]

DENSE_POINTS = 401


@dataclass(frozen=True)
class CurvePoint:
    """One operating point: mean over repeats, with the repeat standard deviations (0 for one)."""

    load: float  # concurrency (closed loop) or request rate (open loop)
    throughput: float  # aggregate output tokens/s
    per_user: float  # per-user decode tokens/s
    throughput_std: float = 0.0
    per_user_std: float = 0.0


@dataclass
class Curve:
    """A configuration's operating points, kept in load order (the order the path is walked)."""

    name: str
    points: list[CurvePoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.points = sorted(self.points, key=lambda p: p.load)
        for p in self.points:
            for value, what in ((p.throughput, "throughput"), (p.per_user, "per-user speed")):
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"curve {self.name!r}: {what} at load {p.load:g} is {value!r}; "
                                     "expected a finite number >= 0")

    @property
    def x_min(self) -> float:
        return min(p.throughput for p in self.points)

    @property
    def x_max(self) -> float:
        return max(p.throughput for p in self.points)

    def speed_at(self, throughput: float) -> Optional[float]:
        """Per-user speed at aggregate ``throughput`` (upper envelope of the load path), or None
        outside the range the curve reached."""
        if not self.points:
            return None
        best: Optional[float] = None
        for p in self.points:  # exact hits (also covers a one-point curve)
            if p.throughput == throughput:
                best = p.per_user if best is None else max(best, p.per_user)
        for a, b in zip(self.points, self.points[1:]):
            lo, hi = sorted((a.throughput, b.throughput))
            if lo <= throughput <= hi and hi > lo:
                frac = (throughput - a.throughput) / (b.throughput - a.throughput)
                y = a.per_user + frac * (b.per_user - a.per_user)
                best = y if best is None else max(best, y)
        return best

    def to_dict(self) -> dict:
        return {"name": self.name, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, obj: dict) -> "Curve":
        return cls(obj["name"], [CurvePoint(**p) for p in obj["points"]])


@dataclass(frozen=True)
class MatchedPoint:
    throughput: float
    baseline_per_user: float
    per_user: float
    speedup: float


@dataclass
class MatchedSpeedup:
    """Speedup of ``config`` over ``baseline`` at matched aggregate throughput."""

    config: str
    baseline: str
    lo: Optional[float]  # matched throughput range; None when the curves do not overlap
    hi: Optional[float]
    points: list[MatchedPoint]  # evenly spaced over [lo, hi]
    min_speedup: Optional[float]
    min_at: Optional[float]  # throughput where the minimum occurs
    max_speedup: Optional[float]
    max_at: Optional[float]

    @property
    def overlaps(self) -> bool:
        return self.lo is not None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["points"] = [asdict(p) for p in self.points]
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> "MatchedSpeedup":
        fields = dict(obj)
        fields["points"] = [MatchedPoint(**p) for p in obj["points"]]
        return cls(**fields)


def matched_range(a: Curve, b: Curve) -> Optional[tuple[float, float]]:
    """The aggregate-throughput interval both curves reach, or None."""
    if not a.points or not b.points:
        return None
    lo, hi = max(a.x_min, b.x_min), min(a.x_max, b.x_max)
    return (lo, hi) if lo <= hi else None


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    if n < 1:
        return []
    if n == 1 or hi == lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _ratio(x: float, baseline: Curve, config: Curve) -> Optional[MatchedPoint]:
    yb, yc = baseline.speed_at(x), config.speed_at(x)
    if yb is None or yc is None or yb <= 0:
        return None
    return MatchedPoint(x, yb, yc, yc / yb)


def matched_speedup(baseline: Curve, config: Curve, num_points: int = 5) -> MatchedSpeedup:
    """Per-user speedup of ``config`` over ``baseline`` at ``num_points`` evenly spaced matched
    throughputs, and its min/max over the whole matched range (module doc)."""
    rng = matched_range(baseline, config)
    if rng is None:
        return MatchedSpeedup(config.name, baseline.name, None, None, [], None, None, None, None)
    lo, hi = rng
    points = [p for p in (_ratio(x, baseline, config) for x in _linspace(lo, hi, num_points)) if p]
    candidates = set(_linspace(lo, hi, DENSE_POINTS)) | {lo, hi}
    candidates |= {p.throughput for c in (baseline, config) for p in c.points if lo <= p.throughput <= hi}
    checked = [p for p in (_ratio(x, baseline, config) for x in sorted(candidates)) if p]
    if not checked:
        return MatchedSpeedup(config.name, baseline.name, lo, hi, points, None, None, None, None)
    low = min(checked, key=lambda p: p.speedup)
    high = max(checked, key=lambda p: p.speedup)
    return MatchedSpeedup(config.name, baseline.name, lo, hi, points,
                          low.speedup, low.throughput, high.speedup, high.throughput)


def curve_from_repeats(name: str, loads: Sequence[float], repeats: Sequence[Sequence[tuple[float, float]]]) -> Curve:
    """Build a curve from per-load lists of (throughput, per_user) repeat measurements: mean and
    sample standard deviation (0 with one repeat). Loads with no successful repeat are dropped."""
    points = []
    for load, runs in zip(loads, repeats):
        runs = [r for r in runs if r is not None and all(math.isfinite(v) for v in r)]
        if not runs:
            continue
        xs, ys = [r[0] for r in runs], [r[1] for r in runs]
        points.append(CurvePoint(float(load), _mean(xs), _mean(ys), _std(xs), _std(ys)))
    return Curve(name, points)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
