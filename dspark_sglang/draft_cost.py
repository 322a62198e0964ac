"""What a draft step costs, so the budget can weigh it against the tokens it may bring.

The paper's objective Θ = τ · SPS(B) prices target steps only. That is right on a GPU, where the
drafter is a few percent of a round, and wrong where drafting costs as much as a target step (a
135M target on one CPU core: a 49152-wide draft LM head over γ slots per request). With a draft
step of d seconds, a drafted round of B batch tokens takes 1/SPS(B) + d, and a round that does not
draft takes 1/SPS(R). The scheduler (schedulers.LaggedBudgetScheduler) drafts only when the best
drafted round beats the plain one, and chooses its budget with the draft time included.

Three models behind one interface, ``seconds(num_reqs)``:
- ``NoDraftCost``: d = 0, the paper's objective;
- ``FixedDraftCost(fixed_s, per_req_s)``: d = fixed + per_req · R, e.g. from a profile;
- ``MeasuredDraftCost``: the same line, fitted online to the worker's measured draft steps by
  exponentially weighted least squares (recent rounds count most; no fit until a few rounds).

Lossless: d is a function of earlier rounds' timings, never of the current drafts' values.
Pure (no sglang import).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

__all__ = ["DraftCost", "NoDraftCost", "FixedDraftCost", "MeasuredDraftCost", "DraftCostError",
           "parse_draft_cost"]


class DraftCostError(ValueError):
    """A draft-cost specification or observation is malformed."""


class DraftCost(ABC):
    @abstractmethod
    def seconds(self, num_reqs: int) -> float:
        """Expected seconds of one draft step for ``num_reqs`` requests (>= 0)."""

    def observe(self, num_reqs: int, seconds: float) -> None:
        """A measured draft step (ignored by the fixed models)."""

    def describe(self) -> str:
        return type(self).__name__


class NoDraftCost(DraftCost):
    """The paper's objective: drafting is free."""

    def seconds(self, num_reqs: int) -> float:
        return 0.0

    def describe(self) -> str:
        return "none"


class FixedDraftCost(DraftCost):
    """d(R) = fixed_s + per_req_s · R."""

    def __init__(self, fixed_s: float, per_req_s: float = 0.0):
        for name, value in (("fixed", fixed_s), ("per-request", per_req_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise DraftCostError(f"draft cost: the {name} time must be a finite number >= 0, got {value!r}")
        self.fixed_s, self.per_req_s = float(fixed_s), float(per_req_s)

    def seconds(self, num_reqs: int) -> float:
        return self.fixed_s + self.per_req_s * num_reqs

    def describe(self) -> str:
        return f"{self.fixed_s * 1e3:g} ms + {self.per_req_s * 1e3:g} ms/request"


class MeasuredDraftCost(DraftCost):
    """d(R) = a + b·R fitted to measured draft steps, each weighted by decay^(age in observations).

    The first ``warmup`` observations are dropped (first calls pay allocation and JIT). Until
    ``min_observations`` more have arrived the model answers 0 (the paper's objective). A fit with
    a negative intercept or slope falls back to the best line through the origin or the weighted
    mean respectively, so d is never negative and never extrapolates downwards.
    """

    def __init__(self, *, halflife: float = 64.0, warmup: int = 2, min_observations: int = 3):
        if not (halflife > 0 and math.isfinite(halflife)):
            raise DraftCostError(f"draft cost: halflife must be a finite number > 0, got {halflife!r}")
        self.decay = 0.5 ** (1.0 / halflife)
        self.warmup, self.min_observations = int(warmup), int(min_observations)
        self.count = 0  # observations seen, warm-up included
        # Exponentially weighted sums: Σw, Σw·R, Σw·R², Σw·y, Σw·R·y.
        self._s0 = self._s1 = self._s2 = self._t0 = self._t1 = 0.0
        self._line: tuple[float, float] = (0.0, 0.0)

    def observe(self, num_reqs: int, seconds: float) -> None:
        if num_reqs <= 0 or not (math.isfinite(seconds) and seconds >= 0):
            return  # a clock glitch must not poison the fit
        self.count += 1
        if self.count <= self.warmup:
            return
        g, r, y = self.decay, float(num_reqs), float(seconds)
        self._s0 = g * self._s0 + 1.0
        self._s1 = g * self._s1 + r
        self._s2 = g * self._s2 + r * r
        self._t0 = g * self._t0 + y
        self._t1 = g * self._t1 + r * y
        if self.count - self.warmup >= self.min_observations:
            self._line = self._fit()

    def _fit(self) -> tuple[float, float]:
        s0, s1, s2, t0, t1 = self._s0, self._s1, self._s2, self._t0, self._t1
        det = s0 * s2 - s1 * s1
        if det > 1e-9 * s0 * s2:
            slope = (s0 * t1 - s1 * t0) / det
            intercept = (t0 - slope * s1) / s0
            if slope >= 0 and intercept >= 0:
                return intercept, slope
            if slope < 0:
                return t0 / s0, 0.0  # mean: cost not growing with R (noise)
            return 0.0, t1 / s2  # through the origin
        return t0 / s0, 0.0  # every observation at one batch size: its mean

    @property
    def line(self) -> tuple[float, float]:
        """(intercept s, slope s/request) of the current fit; (0, 0) before it exists."""
        return self._line

    def seconds(self, num_reqs: int) -> float:
        a, b = self._line
        return a + b * num_reqs

    def describe(self) -> str:
        a, b = self._line
        return f"measured ({a * 1e3:.1f} ms + {b * 1e3:.2f} ms/request over {max(self.count - self.warmup, 0)} rounds)"


_FIXED = re.compile(r"^\s*([0-9.eE+-]+)\s*(?:,\s*([0-9.eE+-]+)\s*)?$")


def parse_draft_cost(spec: str) -> DraftCost:
    """``"measured"`` (default), ``"none"``, or ``"A[,B]"``: A ms per draft step plus B ms per request."""
    text = (spec or "").strip().lower()
    if text in ("", "measured", "auto"):
        return MeasuredDraftCost()
    if text in ("none", "0", "off"):
        return NoDraftCost()
    match = _FIXED.match(text)
    if match is None:
        raise DraftCostError(
            f"draft_cost: {spec!r} is not 'measured', 'none' or 'A[,B]' (ms per step[, ms per request])"
        )
    try:
        fixed_ms, per_req_ms = float(match.group(1)), float(match.group(2) or 0.0)
    except ValueError:
        raise DraftCostError(f"draft_cost: {spec!r}: not numbers") from None
    return FixedDraftCost(fixed_ms / 1e3, per_req_ms / 1e3)
