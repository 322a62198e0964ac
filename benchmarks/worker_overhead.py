"""The worker's own per-round host time, fitted from a round-cost measurement.

A speculative round is more than its two forwards: the worker also accepts the drafts, commits the
outputs for SGLang and keeps its books. The simulator prices the forwards from the steps/s curve
and the draft step from ``--draft-ms``; without this term the rest is free, which flatters
speculation. ``python -m dspark_sglang.benchmarks.round_cost`` measures every phase of a real round
as a ratio to a plain DECODE step of the same batch, so per (point, window)

    overhead_ms = (round_ratio − verify_ratio − draft_ratio) · plain_ms

(acceptance + commit + bookkeeping + whatever else the worker does around the two forwards; the
ratios are medians, so the difference may come out slightly negative on a noisy point).

Model (GPU audit): overhead(R, C) = a + b·R + c·C ms, R the requests in the round and C their total
context tokens (R · the point's mean context). Fit, chosen to be robust and simple:
- per point, the median over its windows W >= 2 (a window of 1 verifies nothing: no acceptance work
  to speak of, so it would pull the typical drafted round down; the median keeps one slow window,
  W = 8 at batch 16, from dominating);
- least squares over the points with non-negative coefficients (``scipy.optimize.nnls``), so the
  term never goes negative when extrapolated;
- a term the points cannot tell apart from the ones before it (one batch size only: b; one context
  per batch size: c) is fixed at 0 and named in ``source['fitted_terms']``, rather than split
  arbitrarily between collinear columns.

The same file's draft step (each point's ``draft_ratio · plain_ms``) is fitted as a + b·R the same
way, so ``dspark-simulate --draft-from-round-cost`` can take both from one measurement.
Pure (numpy + scipy; no sglang import).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["WorkerOverhead", "RoundCostError", "fit_nonnegative"]

REQUIRED_KEYS = ("args", "drafter", "points", "command")
MIN_WINDOW = 2  # windows below this verify no draft (see the module doc)


class RoundCostError(ValueError):
    """A round-cost results file is missing, malformed or has nothing to fit."""


@dataclass(frozen=True)
class WorkerOverhead:
    """Host time of one speculative round beyond the draft step and the verify forward."""

    base_ms: float = 0.0  # a: per round
    per_req_ms: float = 0.0  # b: per request in the round
    per_ctx_token_ms: float = 0.0  # c: per context token of the round's requests
    # The same measurement's draft step, a + b·R. Not part of seconds(): the simulator charges draft
    # time separately, and from these only with --draft-from-round-cost.
    draft_base_ms: float = 0.0
    draft_per_req_ms: float = 0.0
    source: dict = field(default_factory=dict, compare=False)  # where the numbers came from

    def __post_init__(self) -> None:
        for name in ("base_ms", "per_req_ms", "per_ctx_token_ms", "draft_base_ms", "draft_per_req_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"worker overhead {name} must be finite and >= 0, got {value}")

    def seconds(self, num_reqs: int, context_tokens: int) -> float:
        """Overhead of one round of ``num_reqs`` requests holding ``context_tokens`` in total."""
        return (self.base_ms + self.per_req_ms * num_reqs + self.per_ctx_token_ms * context_tokens) / 1e3

    def describe(self) -> str:
        text = (f"{self.base_ms:.3f} ms + {self.per_req_ms:.3f} ms/request + "
                f"{self.per_ctx_token_ms * 1e3:.4f} ms per 1000 context tokens")
        if self.source.get("path"):
            text += f" ({self.source.get('points', '?')} points of {self.source['path']})"
        return text

    def describe_draft(self) -> str:
        return f"{self.draft_base_ms:.3f} ms + {self.draft_per_req_ms:.3f} ms/request"

    def to_dict(self) -> dict:
        return {"base_ms": self.base_ms, "per_req_ms": self.per_req_ms, "per_ctx_token_ms": self.per_ctx_token_ms,
                "draft_base_ms": self.draft_base_ms, "draft_per_req_ms": self.draft_per_req_ms,
                "source": self.source}

    @classmethod
    def from_round_cost(cls, path: Union[str, Path]) -> "WorkerOverhead":
        """Fit the overhead and the draft step to a round-cost ``results.json`` (module doc)."""
        doc = _read(Path(path))
        rows = [_point_row(path, i, p) for i, p in enumerate(doc["points"])]
        usable = [r for r in rows if r is not None and r["overhead_ms"] is not None]
        if not usable:
            raise RoundCostError(f"{path}: no usable points in 'points' (need a point with 'plain_ms' and a "
                                 f"window W >= {MIN_WINDOW} in 'windows')")
        reqs = np.array([r["batch"] for r in usable], dtype=np.float64)  # [P]
        ctx = np.array([r["batch"] * r["context_tokens"] for r in usable], dtype=np.float64)  # [P]
        ones = np.ones_like(reqs)
        over = np.array([r["overhead_ms"] for r in usable], dtype=np.float64)  # [P]
        (a, b, c), used = fit_nonnegative([ones, reqs, ctx], over)
        drafted = [r for r in rows if r is not None]
        d_reqs = np.array([r["batch"] for r in drafted], dtype=np.float64)
        d_ms = np.array([r["draft_ms"] for r in drafted], dtype=np.float64)
        (da, db), d_used = fit_nonnegative([np.ones_like(d_reqs), d_reqs], d_ms)
        pred = a + b * reqs + c * ctx
        source = {
            "path": str(path), "command": doc["command"], "args": doc["args"], "drafter": doc["drafter"],
            "points": len(usable),
            "fit": f"median over windows W >= {MIN_WINDOW} of (round - verify - draft) x plain_ms per point; "
                   "non-negative least squares in a + b*R + c*total_context",
            "fitted_terms": [t for t, u in zip(("a", "b", "c"), used) if u],
            "rms_residual_ms": float(np.sqrt(np.mean((pred - over) ** 2))),
            "measured": [{"batch": r["batch"], "context_tokens": r["context_tokens"], "plain_ms": r["plain_ms"],
                          "overhead_ms": r["overhead_ms"], "draft_ms": r["draft_ms"]} for r in usable],
            "draft_fit": "each point's draft_ratio x plain_ms; non-negative least squares in a + b*R "
                         f"({len(drafted)} points, terms {[t for t, u in zip(('a', 'b'), d_used) if u]})",
        }
        return cls(float(a), float(b), float(c), float(da), float(db), source)


def fit_nonnegative(columns: Sequence[np.ndarray], y: np.ndarray) -> tuple[list[float], list[bool]]:
    """Least squares y ≈ Σ_j x_j · columns[j] with every x_j >= 0.

    A column is kept only when it raises the rank of the columns kept before it (tested on
    max-scaled columns, so token counts and request counts compare fairly); the others get 0.
    Returns the coefficients and which columns were fitted."""
    from scipy.optimize import nnls

    scale = [float(np.max(np.abs(col))) or 1.0 for col in columns]
    scaled = [col / s for col, s in zip(columns, scale)]  # each [P]
    kept: list[int] = []
    for j in range(len(columns)):
        trial = np.stack([scaled[k] for k in kept + [j]], axis=1)
        if np.linalg.matrix_rank(trial) > len(kept):
            kept.append(j)
    coef, _ = nnls(np.stack([scaled[k] for k in kept], axis=1), np.asarray(y, dtype=np.float64))
    out = [0.0] * len(columns)
    for k, value in zip(kept, coef):
        out[k] = float(value) / scale[k]
    return out, [j in kept for j in range(len(columns))]


# ------------------------------------------------------------------------------------------------
# Reading and checking the file


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RoundCostError(f"{path}: no such round-cost results file") from None
    except OSError as exc:
        raise RoundCostError(f"{path}: cannot read the round-cost results file ({exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RoundCostError(f"{path}: not JSON ({exc}); expected the results.json of "
                             "python -m dspark_sglang.benchmarks.round_cost") from None
    if not isinstance(doc, dict):
        raise RoundCostError(f"{path}: expected a JSON object with fields {', '.join(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in doc:
            raise RoundCostError(f"{path}: missing field '{key}' (not a round-cost results.json?)")
    if not isinstance(doc["points"], list):
        raise RoundCostError(f"{path}: field 'points' must be a list")
    return doc


def _number(path, where: str, value, *, positive: bool = False) -> float:
    """A finite JSON number (not a bool), > 0 when ``positive``; else a RoundCostError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RoundCostError(f"{path}: field '{where}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise RoundCostError(f"{path}: field '{where}' is not finite ({value})")
    if positive and not value > 0:
        raise RoundCostError(f"{path}: field '{where}' must be > 0, got {value}")
    return float(value)


def _field(path, where: str, obj: dict, key: str):
    if key not in obj:
        raise RoundCostError(f"{path}: missing field '{where}.{key}'")
    return obj[key]


def _point_row(path, index: int, point) -> Optional[dict]:
    """One point's batch, context and measured milliseconds; None for a point the benchmark wrote
    without rounds (no 'plain_ms': no round had every request verify the full window)."""
    where = f"points[{index}]"
    if not isinstance(point, dict):
        raise RoundCostError(f"{path}: field '{where}' must be an object")
    if "plain_ms" not in point:
        return None
    batch = _number(path, f"{where}.batch", _field(path, where, point, "batch"), positive=True)
    if batch != int(batch):
        raise RoundCostError(f"{path}: field '{where}.batch' must be a whole number, got {batch}")
    context = _number(path, f"{where}.context_tokens", _field(path, where, point, "context_tokens"))
    if context < 0:
        raise RoundCostError(f"{path}: field '{where}.context_tokens' must be >= 0, got {context}")
    plain = _number(path, f"{where}.plain_ms", point["plain_ms"], positive=True)
    draft = _number(path, f"{where}.draft_ratio", _field(path, where, point, "draft_ratio"))
    windows = _field(path, where, point, "windows")
    if not isinstance(windows, dict):
        raise RoundCostError(f"{path}: field '{where}.windows' must be an object keyed by window")
    overheads = []
    for key, win in windows.items():
        wwhere = f"{where}.windows.{key}"
        try:
            width = int(key)
        except ValueError:
            raise RoundCostError(f"{path}: field '{wwhere}': window key is not an integer") from None
        if width < MIN_WINDOW:
            continue
        if not isinstance(win, dict):
            raise RoundCostError(f"{path}: field '{wwhere}' must be an object")
        ratios = [_number(path, f"{wwhere}.{name}", _field(path, wwhere, win, name))
                  for name in ("round_ratio", "verify_ratio", "draft_ratio")]
        overheads.append((ratios[0] - ratios[1] - ratios[2]) * plain)
    return {"batch": int(batch), "context_tokens": context, "plain_ms": plain, "draft_ms": draft * plain,
            "overhead_ms": float(np.median(overheads)) if overheads else None}
