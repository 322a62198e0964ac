"""Step-rate cost tables: how many verify steps per second the target runs at a given batch size.

The scheduler maximises expected committed tokens per second, Θ = τ · SPS(B), where B is the number
of batch tokens of one verify step (Σ_r (1 + verify_len_r)). This module holds the curve SPS(B)
behind one interface, ``steps_per_second(num_reqs, batch_tokens)``, in the two on-disk forms that
SGLang 0.5.23 reads (``sglang/srt/speculative/dspark_components/dspark_sps.py``):

``SpsTable`` (SGLang's ``SpsCostTable``)::

    {"sample_batch_tokens": [int, ...],      # probes, strictly increasing
     "sample_steps_per_sec": [float, ...],   # one rate per probe, > 0
     "max_batch_tokens": int}                # >= the last probe

    Interpolation (``interpolation=``):
    - ``"step"`` (default; what SGLang does): a floor step function. B between probes i and i+1
      takes probe i's rate; B below the first probe takes the first rate; B beyond the last probe
      keeps the last rate (clamp).
    - ``"linear"``: linear between probes; below the first probe the first rate (clamp); beyond the
      last probe the last segment's slope is extended, but only when it is falling (a rising rate
      is held flat, never extrapolated upwards: that would invite verify-all on a guess), and never
      below ``RATE_FLOOR_FRACTION`` × the smallest probed rate, so the rate stays positive.
    ``num_reqs`` does not enter this table.

``AdditiveSpsTable`` (SGLang's ``SpsAdditiveCostTable``; chosen when the JSON has ``bias_seconds``)::

    {"bias_seconds": float > 0,
     "bs_probes": [int, ...], "alpha_seconds": [float, ...],    # per-request-count term
     "m_probes": [int, ...],  "theta_seconds": [float, ...]}    # per-batch-token term

    step_seconds = bias + interp(alpha, num_reqs) + interp(theta, batch_tokens), each ``interp``
    linear between probes and clamped at both ends; steps_per_second = 1 / step_seconds. (SGLang
    writes the theta argument as ``num_reqs + budget``, which is our ``batch_tokens``.)

Unknown JSON keys are ignored, as SGLang's decoder does. Validation is stricter than SGLang's in
one way: rates (and additive step times) must be positive and finite, because a zero or negative
rate silently pins the scheduler's argmax. Every failure raises ``CostTableError`` naming the
file and the field.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence, Union, runtime_checkable

import torch

from dspark_sglang.jsonio import JSON_PARSE_ERRORS

__all__ = [
    "RATE_FLOOR_FRACTION",
    "CostTableError",
    "CostTable",
    "SpsTable",
    "AdditiveSpsTable",
    "FlatLinearFit",
    "from_probes",
    "fit_flat_then_linear",
    "load_cost_table",
    "parse_cost_table",
    "save_cost_table",
]

# Linear extrapolation never goes below this fraction of the smallest probed rate.
RATE_FLOOR_FRACTION = 1e-3
_IN_MEMORY = "<in-memory>"
_INTERPOLATIONS = ("step", "linear")

BatchTokens = Union[int, torch.Tensor]


class CostTableError(ValueError):
    """A cost table (file or in-memory) is malformed. The message names the file and the field."""

    def __init__(self, path: str, field: str, problem: str):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


@runtime_checkable
class CostTable(Protocol):
    def steps_per_second(self, num_reqs: int, batch_tokens: BatchTokens) -> torch.Tensor | float:
        """Verify steps per second with ``num_reqs`` requests and ``batch_tokens`` batch tokens.

        ``batch_tokens`` is an int (returns a float) or an integer tensor of any shape (returns a
        float64 tensor of the same shape, on the same device).
        """
        ...

    def to_json(self) -> str: ...


# ------------------------------------------------------------------------------------------------
# Field validation helpers (JSON types are checked strictly: bool is not a number, 2.0 is not int).


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    """A number that is finite as a float (a JSON integer like 10**400 is not: float() overflows)."""
    try:
        return _is_number(value) and math.isfinite(float(value))
    except OverflowError:
        return False


# Largest probe (batch tokens, request count): interpolation runs in float64, exact up to 2**53.
_MAX_PROBE = 2**53


def _int_list(obj: dict, name: str, path: str) -> list[int]:
    values = obj.get(name)
    if isinstance(values, tuple):
        values = list(values)
    if not isinstance(values, list):
        raise CostTableError(path, name, f"expected a list of integers, got {type(values).__name__}")
    if not values:
        raise CostTableError(path, name, "empty: at least one probe is required")
    for i, v in enumerate(values):
        if not _is_int(v):
            raise CostTableError(path, f"{name}[{i}]", f"expected an integer, got {v!r}")
        if v < 0:
            raise CostTableError(path, f"{name}[{i}]", f"must be >= 0, got {v}")
        if v > _MAX_PROBE:
            raise CostTableError(path, f"{name}[{i}]", f"must be <= 2**53 (exact in float64), got a {v.bit_length()}-bit integer")
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            kind = "duplicate" if values[i] == values[i - 1] else "unsorted"
            raise CostTableError(
                path, name, f"must be strictly increasing ({kind} probe {values[i]} at index {i});"
                " median repeated probes first (cost_table.from_probes)",
            )
    return list(values)


def _float_list(obj: dict, name: str, path: str, length: int, length_of: str) -> list[float]:
    values = obj.get(name)
    if isinstance(values, tuple):
        values = list(values)
    if not isinstance(values, list):
        raise CostTableError(path, name, f"expected a list of numbers, got {type(values).__name__}")
    if len(values) != length:
        raise CostTableError(
            path, name, f"length {len(values)} does not match {length_of} length {length}"
        )
    for i, v in enumerate(values):
        if not _is_finite_number(v):
            raise CostTableError(path, f"{name}[{i}]", f"expected a finite number, got {v!r}")
    return [float(v) for v in values]


def _require_keys(obj, keys: Sequence[str], path: str) -> None:
    if not isinstance(obj, dict):
        raise CostTableError(path, "<root>", f"expected a JSON object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise CostTableError(path, key, "missing")


# ------------------------------------------------------------------------------------------------
# Interpolation kernels (pure; vectorised over a float64 tensor of batch-token counts).


def _floor_step(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # xs: [P] float64 increasing; ys: [P]; x: [...] float64 -> [...]
    idx = (torch.bucketize(x, xs, right=True) - 1).clamp_(0, xs.numel() - 1)
    return ys[idx]


def _linear_clamped(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # xs: [P] float64 increasing; ys: [P]; x: [...] float64 -> [...]
    if xs.numel() == 1:
        return ys[0].expand_as(x).clone()
    xc = x.clamp(float(xs[0]), float(xs[-1]))
    hi = torch.bucketize(xc, xs, right=True).clamp_(1, xs.numel() - 1)
    lo = hi - 1
    frac = (xc - xs[lo]) / (xs[hi] - xs[lo])
    return ys[lo] + frac * (ys[hi] - ys[lo])


def _as_float_tensor(batch_tokens: BatchTokens, device) -> tuple[torch.Tensor, bool]:
    if isinstance(batch_tokens, torch.Tensor):
        return batch_tokens.to(dtype=torch.float64), False
    if not _is_int(batch_tokens):
        raise TypeError(f"batch_tokens must be an int or a tensor, got {type(batch_tokens).__name__}")
    return torch.tensor(float(batch_tokens), dtype=torch.float64, device=device), True


# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpsTable:
    """SGLang's ``SpsCostTable``: probed steps/s at a few batch-token counts.

    Parameters
    ----------
    sample_batch_tokens : list[int]
        Probe batch-token counts, strictly increasing, >= 0.
    sample_steps_per_sec : list[float]
        Steps per second at each probe, finite and > 0.
    max_batch_tokens : int
        The largest batch the engine runs, >= the last probe (carried for SGLang; lookups beyond
        it follow the extrapolation rule).
    interpolation : {"step", "linear"}
        Not stored in the JSON: ``"step"`` (default) reproduces SGLang's lookup exactly.
    path : str
        Where the table came from, for error messages only.
    """

    sample_batch_tokens: list[int]
    sample_steps_per_sec: list[float]
    max_batch_tokens: int
    interpolation: str = "step"
    path: str = field(default=_IN_MEMORY, compare=False)

    def __post_init__(self) -> None:
        raw = {
            "sample_batch_tokens": self.sample_batch_tokens,
            "sample_steps_per_sec": self.sample_steps_per_sec,
        }
        tokens = _int_list(raw, "sample_batch_tokens", self.path)
        rates = _float_list(raw, "sample_steps_per_sec", self.path, len(tokens), "sample_batch_tokens")
        for i, rate in enumerate(rates):
            if rate <= 0:
                raise CostTableError(self.path, f"sample_steps_per_sec[{i}]", f"must be > 0, got {rate}")
        if not _is_int(self.max_batch_tokens):
            raise CostTableError(
                self.path, "max_batch_tokens", f"expected an integer, got {self.max_batch_tokens!r}"
            )
        if self.max_batch_tokens < tokens[-1]:
            raise CostTableError(
                self.path, "max_batch_tokens",
                f"{self.max_batch_tokens} is smaller than the last probe {tokens[-1]}",
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise CostTableError(
                self.path, "interpolation", f"{self.interpolation!r} is not one of {_INTERPOLATIONS}"
            )
        object.__setattr__(self, "sample_batch_tokens", tokens)
        object.__setattr__(self, "sample_steps_per_sec", rates)
        object.__setattr__(self, "_xs", torch.tensor(tokens, dtype=torch.float64))
        object.__setattr__(self, "_ys", torch.tensor(rates, dtype=torch.float64))

    def steps_per_second(self, num_reqs: int, batch_tokens: BatchTokens) -> torch.Tensor | float:
        """Steps/s at ``batch_tokens`` (``num_reqs`` is unused by this table). See module doc."""
        x, scalar = _as_float_tensor(batch_tokens, self._xs.device)
        xs, ys = self._xs.to(x.device), self._ys.to(x.device)
        if self.interpolation == "step":
            rate = _floor_step(xs, ys, x)
        else:
            rate = _linear_clamped(xs, ys, x)
            if xs.numel() > 1:
                slope = min((ys[-1] - ys[-2]).item() / (xs[-1] - xs[-2]).item(), 0.0)
                floor = RATE_FLOOR_FRACTION * min(self.sample_steps_per_sec)
                beyond = (ys[-1] + slope * (x - xs[-1])).clamp_(min=floor)
                rate = torch.where(x > xs[-1], beyond, rate)
        return float(rate) if scalar else rate

    def to_dict(self) -> dict:
        return {
            "sample_batch_tokens": list(self.sample_batch_tokens),
            "sample_steps_per_sec": list(self.sample_steps_per_sec),
            "max_batch_tokens": int(self.max_batch_tokens),
        }

    def to_json(self) -> str:
        """SGLang's layout: compact JSON, fields in SGLang's order; ``interpolation`` not stored."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, obj, *, path: str = _IN_MEMORY, interpolation: str = "step") -> "SpsTable":
        _require_keys(obj, ("sample_batch_tokens", "sample_steps_per_sec", "max_batch_tokens"), path)
        return cls(
            sample_batch_tokens=obj["sample_batch_tokens"],
            sample_steps_per_sec=obj["sample_steps_per_sec"],
            max_batch_tokens=obj["max_batch_tokens"],
            interpolation=interpolation,
            path=path,
        )


@dataclass(frozen=True)
class AdditiveSpsTable:
    """SGLang's ``SpsAdditiveCostTable``: step time = bias + alpha(num_reqs) + theta(batch_tokens).

    ``alpha_seconds`` and ``theta_seconds`` are offsets fitted by least squares and may be negative;
    what must hold is a positive step time everywhere, i.e. ``bias + min(alpha) + min(theta) > 0``
    (the interpolants are piecewise linear, so their minima sit at probes).
    """

    bias_seconds: float
    bs_probes: list[int]
    alpha_seconds: list[float]
    m_probes: list[int]
    theta_seconds: list[float]
    path: str = field(default=_IN_MEMORY, compare=False)

    def __post_init__(self) -> None:
        raw = {
            "bs_probes": self.bs_probes, "alpha_seconds": self.alpha_seconds,
            "m_probes": self.m_probes, "theta_seconds": self.theta_seconds,
        }
        bs = _int_list(raw, "bs_probes", self.path)
        alpha = _float_list(raw, "alpha_seconds", self.path, len(bs), "bs_probes")
        ms = _int_list(raw, "m_probes", self.path)
        theta = _float_list(raw, "theta_seconds", self.path, len(ms), "m_probes")
        bias = self.bias_seconds
        if not _is_finite_number(bias):
            raise CostTableError(self.path, "bias_seconds", f"expected a finite number, got {bias!r}")
        if bias <= 0:
            raise CostTableError(self.path, "bias_seconds", f"must be > 0, got {bias}")
        if bias + min(alpha) + min(theta) <= 0:
            raise CostTableError(
                self.path, "alpha_seconds/theta_seconds",
                f"bias + min(alpha) + min(theta) = {bias + min(alpha) + min(theta)} <= 0: "
                "the step time (1 / rate) would be non-positive",
            )
        for name, value in (("bs_probes", bs), ("alpha_seconds", alpha), ("m_probes", ms),
                            ("theta_seconds", theta), ("bias_seconds", float(bias))):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_bs", torch.tensor(bs, dtype=torch.float64))
        object.__setattr__(self, "_alpha", torch.tensor(alpha, dtype=torch.float64))
        object.__setattr__(self, "_ms", torch.tensor(ms, dtype=torch.float64))
        object.__setattr__(self, "_theta", torch.tensor(theta, dtype=torch.float64))

    def step_seconds(self, num_reqs: int, batch_tokens: BatchTokens) -> torch.Tensor | float:
        """Predicted seconds per verify step (the reciprocal of ``steps_per_second``)."""
        x, scalar = _as_float_tensor(batch_tokens, self._ms.device)
        n = torch.tensor([float(num_reqs)], dtype=torch.float64)
        alpha = float(_linear_clamped(self._bs, self._alpha, n)[0])
        theta = _linear_clamped(self._ms.to(x.device), self._theta.to(x.device), x)
        seconds = self.bias_seconds + alpha + theta
        return float(seconds) if scalar else seconds

    def steps_per_second(self, num_reqs: int, batch_tokens: BatchTokens) -> torch.Tensor | float:
        seconds = self.step_seconds(num_reqs, batch_tokens)
        return 1.0 / seconds if isinstance(seconds, float) else seconds.reciprocal()

    def to_dict(self) -> dict:
        return {
            "bias_seconds": float(self.bias_seconds),
            "bs_probes": list(self.bs_probes),
            "alpha_seconds": list(self.alpha_seconds),
            "m_probes": list(self.m_probes),
            "theta_seconds": list(self.theta_seconds),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, obj, *, path: str = _IN_MEMORY) -> "AdditiveSpsTable":
        keys = ("bias_seconds", "bs_probes", "alpha_seconds", "m_probes", "theta_seconds")
        _require_keys(obj, keys, path)
        return cls(**{k: obj[k] for k in keys}, path=path)


# ------------------------------------------------------------------------------------------------
# Reading and writing files.


def parse_cost_table(
    text: str, *, path: str = _IN_MEMORY, interpolation: str = "step"
) -> Union[SpsTable, AdditiveSpsTable]:
    """Parse either JSON form. The additive form is recognised by a ``bias_seconds`` key, as in
    SGLang; ``interpolation`` applies to the step form only."""
    try:
        obj = json.loads(text)
    except JSON_PARSE_ERRORS as exc:
        raise CostTableError(path, "<root>", f"not valid JSON ({exc})") from None
    if isinstance(obj, dict) and "bias_seconds" in obj:
        return AdditiveSpsTable.from_dict(obj, path=path)
    return SpsTable.from_dict(obj, path=path, interpolation=interpolation)


def load_cost_table(path: Union[str, Path], *, interpolation: str = "step"):
    """Read a cost table written by SGLang's profiler (either form) or by ``save_cost_table``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CostTableError(str(path), "<file>", f"cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise CostTableError(str(path), "<file>", f"not UTF-8 text ({exc})") from None
    return parse_cost_table(text, path=str(path), interpolation=interpolation)


def save_cost_table(table: Union[SpsTable, AdditiveSpsTable], path: Union[str, Path]) -> None:
    Path(path).write_text(table.to_json(), encoding="utf-8")


def from_probes(
    probes: Iterable[tuple[int, float]],
    *,
    max_batch_tokens: int | None = None,
    interpolation: str = "step",
) -> SpsTable:
    """Build an ``SpsTable`` from raw ``(batch_tokens, steps_per_sec)`` measurements.

    Repeated measurements of one batch size are reduced to their median (``statistics.median``:
    the mean of the two middle values for an even count). ``max_batch_tokens`` defaults to the
    largest probe.
    """
    grouped: dict[int, list[float]] = {}
    for i, probe in enumerate(probes):
        if len(probe) != 2 or not _is_int(probe[0]) or not _is_number(probe[1]):
            raise CostTableError(_IN_MEMORY, f"probes[{i}]", f"expected (int, float), got {probe!r}")
        grouped.setdefault(int(probe[0]), []).append(float(probe[1]))
    if not grouped:
        raise CostTableError(_IN_MEMORY, "probes", "empty: at least one probe is required")
    tokens = sorted(grouped)
    return SpsTable(
        sample_batch_tokens=tokens,
        sample_steps_per_sec=[statistics.median(grouped[t]) for t in tokens],
        max_batch_tokens=tokens[-1] if max_batch_tokens is None else max_batch_tokens,
        interpolation=interpolation,
    )


# ------------------------------------------------------------------------------------------------
# Flat-then-linear step-time model (used by the profiler).


@dataclass(frozen=True)
class FlatLinearFit:
    """step_seconds(B) = flat_seconds for B <= knee, flat_seconds + slope·(B − knee) beyond."""

    knee: int
    flat_seconds: float
    slope_seconds_per_token: float
    sse: float

    def step_seconds(self, batch_tokens: torch.Tensor) -> torch.Tensor:
        # batch_tokens: [...] -> [...] float64
        excess = (batch_tokens.to(torch.float64) - self.knee).clamp(min=0.0)
        return self.flat_seconds + self.slope_seconds_per_token * excess


def fit_flat_then_linear(tokens: Sequence[int], step_seconds: Sequence[float]) -> FlatLinearFit:
    """Least-squares flat-then-linear fit of step time against batch tokens.

    Every distinct probed batch size is tried as the knee; for each, ordinary least squares on the
    basis ``[1, max(B − knee, 0)]`` gives the level and the slope, and the knee with the smallest
    squared error wins (ties: the smaller knee). A knee at the last probe is the all-flat model
    (slope 0). A negative fitted slope is replaced by the flat model for that knee (slope 0, level =
    mean step time): step time never falls with batch size, so that is measurement noise.
    """
    if len(tokens) != len(step_seconds):
        raise CostTableError(
            _IN_MEMORY, "step_seconds", f"length {len(step_seconds)} != tokens length {len(tokens)}"
        )
    if len(tokens) < 2:
        raise CostTableError(_IN_MEMORY, "tokens", "need at least two measurements")
    x = torch.tensor([float(t) for t in tokens], dtype=torch.float64)  # [n]
    y = torch.tensor([float(s) for s in step_seconds], dtype=torch.float64)  # [n]
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(y).all()):
        raise CostTableError(_IN_MEMORY, "tokens/step_seconds", "values must be finite")
    if bool((y <= 0).any()):
        raise CostTableError(_IN_MEMORY, "step_seconds", "values must be > 0")

    knees = torch.unique(x)  # [C], sorted
    excess = (x[None, :] - knees[:, None]).clamp(min=0.0)  # [C, n]
    # Closed-form simple regression of y on excess, per candidate knee.
    ex_mean = excess.mean(dim=1, keepdim=True)  # [C, 1]
    y_mean = y.mean()
    var = ((excess - ex_mean) ** 2).sum(dim=1)  # [C]
    cov = ((excess - ex_mean) * (y - y_mean)).sum(dim=1)  # [C]
    slope = torch.where(var > 0, cov / var.clamp(min=1e-300), torch.zeros_like(var)).clamp(min=0.0)
    level = y_mean - slope * ex_mean.squeeze(1)  # [C]
    resid = y[None, :] - (level[:, None] + slope[:, None] * excess)  # [C, n]
    sse = (resid**2).sum(dim=1)  # [C]
    best = int(torch.argmin(sse))
    return FlatLinearFit(
        knee=int(knees[best]),
        flat_seconds=float(level[best]),
        slope_seconds_per_token=float(slope[best]),
        sse=float(sse[best]),
    )
