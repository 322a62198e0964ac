"""Confidence calibration: STS (sequential temperature scaling), its metrics and files, and a
calibrated estimator for drafters without a confidence head.

Vocabulary (drafters-and-paper.md §4, §8):
- ``conf_logits[n, k]``: the raw confidence logit for draft x_{k+1} of round n (0-based k).
  The calibrated confidence is c = sigmoid(logit / T_k) (STS, as SGLang's ``apply_sts``); a NaN
  logit gives confidence 0.
- survival ``Π_{i≤k} c_i`` estimates P(the first k+1 drafts are all accepted).
- label ``label[n, k] = num_accepted[n] > k``.
- censoring: position k of round n is observed iff ``k < verify_lens[n]``. Positions at or beyond
  the verify length are excluded from every metric and fit, even where the label is logically
  known (a rejection at j < verify_len implies label 0 beyond): keeping only those would select
  rows on their outcome (drop the all-accepted ones) and bias the fit towards 0, while excluding by
  ``verify_len`` selects on the scheduler's decision, which depends on confidences, not on labels.
  SGLang's recorder does not censor (it labels unverified positions 0); record with verify-all to
  compare.

Files: SGLang 0.5.23's STS JSON (``dspark_sts.py``: ``temperatures``, ``dataset``, ``num_samples``,
``ece_before``, ``ece_after``, defaults omitted when written), calibration records (.safetensors or
.npz, no pickle), and the estimator's JSON. Malformed files raise a ``CalibrationFileError``
subclass naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from dspark_sglang.jsonio import JSON_PARSE_ERRORS

__all__ = [
    "CalibrationFileError", "StsFileError", "RecordsFileError", "EstimatorFileError",
    "CalibrationDataError",
    "apply_sts", "prefix_labels", "observed_mask", "default_temperature_grid",
    "expected_calibration_error", "auc", "brier", "survival_metrics", "fit_sts",
    "StsCalibration", "CalibrationRecords", "ProposalProbEstimator", "top1_feature", "head_less_feature",
]

_MAX_STEP = 5.0  # Newton step clip in ProposalProbEstimator.fit
PROB_CLAMP = 1e-8  # probabilities are clamped to [1e-8, 1 - 1e-8] before binning (as SGLang)
_IN_MEMORY = "<in-memory>"
PathLike = Union[str, Path]


class CalibrationFileError(ValueError):
    """A calibration file is malformed. The message names the file and the field."""

    def __init__(self, path: str, field: str, problem: str):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


class StsFileError(CalibrationFileError):
    """An STS calibration JSON is malformed."""


class RecordsFileError(CalibrationFileError):
    """A calibration-records file (or in-memory records) is malformed."""


class EstimatorFileError(CalibrationFileError):
    """A ProposalProbEstimator JSON is malformed."""


class CalibrationDataError(ValueError):
    """The data cannot support a fit (e.g. a position that was never verified)."""


# ------------------------------------------------------------------------------------------------
# Application, labels, metrics


def apply_sts(
    raw_logits: torch.Tensor,  # [..., gamma] raw confidence logits
    temperatures: Union[torch.Tensor, Sequence[float]],  # [gamma], > 0
) -> torch.Tensor:  # [..., gamma] float32 calibrated confidences
    """``sigmoid(raw_logit / T_k)`` per position; NaN logits give 0."""
    temps = torch.as_tensor(temperatures, dtype=torch.float32, device=raw_logits.device)
    if temps.dim() != 1 or temps.numel() != raw_logits.shape[-1]:
        raise ValueError(
            f"temperatures: {temps.numel()} values for gamma={raw_logits.shape[-1]} positions"
        )
    return torch.sigmoid(raw_logits.float() / temps).nan_to_num_(nan=0.0)


def prefix_labels(num_accepted: torch.Tensor, gamma: int) -> torch.Tensor:
    """[n] int -> [n, gamma] bool: ``label[n, k] = num_accepted[n] > k``."""
    return torch.arange(gamma, device=num_accepted.device)[None, :] < num_accepted[:, None]


def observed_mask(verify_lens: Optional[torch.Tensor], num_rows: int, gamma: int) -> torch.Tensor:
    """[n] int (or None: all observed) -> [n, gamma] bool: ``k < verify_lens[n]``."""
    if verify_lens is None:
        return torch.ones(num_rows, gamma, dtype=torch.bool)
    return torch.arange(gamma, device=verify_lens.device)[None, :] < verify_lens[:, None]


def default_temperature_grid() -> torch.Tensor:
    """41 log-spaced temperatures in [0.1, 10]: SGLang's grid value for value (computed in
    float32 as SGLang does, returned as float64), so fits and files agree to the last digit."""
    return torch.logspace(-1.0, 1.0, steps=41, dtype=torch.float32).to(torch.float64)


def _select(probs, labels, mask):
    probs = probs.reshape(-1).to(torch.float64)
    labels = labels.reshape(-1).to(torch.float64)
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool)
        probs, labels = probs[keep], labels[keep]
    return probs, labels


def _ece_batched(
    probs: torch.Tensor,  # [G, m] float64 candidate probabilities
    labels: torch.Tensor,  # [m] float64
    num_bins: int,
) -> torch.Tensor:  # [G] float64
    """Equal-width ECE of each row: Σ_b |Σ_{i∈b} (p_i − y_i)| / m (= Σ_b (n_b/m)|p̄_b − ȳ_b|)."""
    probs = probs.clamp(PROB_CLAMP, 1.0 - PROB_CLAMP)
    bins = (probs * num_bins).long().clamp_(0, num_bins - 1)  # [G, m]
    gap = torch.zeros(probs.shape[0], num_bins, dtype=torch.float64, device=probs.device)
    gap.scatter_add_(1, bins, probs - labels[None, :])
    return gap.abs().sum(dim=1) / max(probs.shape[1], 1)


def expected_calibration_error(
    probs: torch.Tensor,  # [...] predicted probabilities
    labels: torch.Tensor,  # [...] 0/1 outcomes
    num_bins: int = 15,
    mask: Optional[torch.Tensor] = None,  # [...] bool, False = censored
) -> float:
    """Equal-width-bin ECE (SGLang's definition: probabilities clamped to [1e-8, 1−1e-8], bin
    ``floor(p·num_bins)``). NaN when no element is observed."""
    p, y = _select(probs, labels, mask)
    if p.numel() == 0:
        return float("nan")
    return float(_ece_batched(p[None, :], y, num_bins)[0])


def auc(
    probs: torch.Tensor,  # [...] scores
    labels: torch.Tensor,  # [...] 0/1
    mask: Optional[torch.Tensor] = None,  # [...] bool
) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U), tied scores sharing their mean rank
    (a tie between a positive and a negative counts 1/2). NaN unless both classes occur."""
    p, y = _select(probs, labels, mask)
    positives = y > 0.5
    num_pos = int(positives.sum())
    num_neg = p.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(p, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    mean_rank = torch.cumsum(counts, 0) - (counts - 1.0) / 2.0  # 1-based mean rank per value
    rank_sum = mean_rank[inverse][positives].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def brier(probs: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Mean squared error of the probabilities; NaN when nothing is observed."""
    p, y = _select(probs, labels, mask)
    return float(((p - y) ** 2).mean()) if p.numel() else float("nan")


def survival_metrics(
    survival: torch.Tensor,  # [n, gamma] cumulative survival estimates
    num_accepted: torch.Tensor,  # [n] int
    verify_lens: Optional[torch.Tensor] = None,  # [n] int, None = all observed
    num_bins: int = 15,
) -> dict[str, list[float]]:
    """Per-position ECE, AUC, Brier and observed count of survival vs. prefix labels."""
    num_rows, gamma = survival.shape
    labels = prefix_labels(num_accepted, gamma)
    mask = observed_mask(verify_lens, num_rows, gamma)
    out: dict[str, list[float]] = {"ece": [], "auc": [], "brier": [], "count": []}
    for k in range(gamma):
        s, y, m = survival[:, k], labels[:, k], mask[:, k]
        out["ece"].append(expected_calibration_error(s, y, num_bins, m))
        out["auc"].append(auc(s, y, m))
        out["brier"].append(brier(s, y, m))
        out["count"].append(float(m.sum()))
    return out


# ------------------------------------------------------------------------------------------------
# STS fit


def fit_sts(
    conf_logits: torch.Tensor,  # [n, gamma] raw confidence logits
    num_accepted: torch.Tensor,  # [n] int
    verify_lens: Optional[torch.Tensor] = None,  # [n] int, None = every position observed
    *,
    grid: Optional[torch.Tensor] = None,  # [G] candidate temperatures, > 0
    num_bins: int = 15,
    dataset: str = "",
) -> "StsCalibration":
    """Sequential temperature scaling (paper §3.2.1; SGLang's fitter, plus censoring).

    For k = 0..gamma−1 in order, with T_0..T_{k−1} fixed, pick the grid temperature minimising the
    ECE of the cumulative survival ``Π_{i≤k} sigmoid(logit_i / T_i)`` against ``label[:, k]`` over
    the rows observed at k (first minimum on ties, i.e. the smallest temperature). ``ece_before``
    is the same ECE at T = 1 throughout. Raises ``CalibrationDataError`` if a position has no
    observed row.
    """
    logits = conf_logits.to(torch.float64)
    if logits.dim() != 2 or num_accepted.shape != (logits.shape[0],):
        raise ValueError(f"conf_logits [n, gamma] and num_accepted [n] expected, got "
                         f"{tuple(conf_logits.shape)} and {tuple(num_accepted.shape)}")
    num_rows, gamma = logits.shape
    grid = default_temperature_grid() if grid is None else grid.to(torch.float64).reshape(-1)
    if grid.numel() == 0 or not bool((grid > 0).all()):
        raise ValueError("grid: temperatures must be a non-empty list of values > 0")
    labels = prefix_labels(num_accepted, gamma).to(torch.float64)
    mask = observed_mask(verify_lens, num_rows, gamma)

    temperatures, ece_before, ece_after = [], [], []
    raw = torch.ones(num_rows, dtype=torch.float64)  # survival at T = 1
    fitted = torch.ones(num_rows, dtype=torch.float64)  # survival at the fitted temperatures
    for k in range(gamma):
        rows = mask[:, k]
        if not bool(rows.any()):
            raise CalibrationDataError(
                f"position {k} was never verified (all verify_lens <= {k}); collect with "
                "verify-all or fit fewer positions"
            )
        z, y = logits[rows, k], labels[rows, k]
        raw = raw * torch.sigmoid(logits[:, k]).nan_to_num(nan=0.0)
        ece_before.append(float(_ece_batched(raw[rows][None, :], y, num_bins)[0]))
        # All candidates at once: [G, m] survivals.
        candidates = fitted[rows][None, :] * torch.sigmoid(z[None, :] / grid[:, None]).nan_to_num(nan=0.0)
        eces = _ece_batched(candidates, y, num_bins)
        best = int(torch.argmin(eces))
        temperatures.append(float(grid[best]))
        ece_after.append(float(eces[best]))
        fitted = fitted * torch.sigmoid(logits[:, k] / grid[best]).nan_to_num(nan=0.0)
    return StsCalibration(temperatures=temperatures, dataset=dataset, num_samples=num_rows,
                          ece_before=ece_before, ece_after=ece_after)


# ------------------------------------------------------------------------------------------------
# STS JSON (SGLang's DSparkStsCalibration layout)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number_list(values, name: str, path: str, error=StsFileError) -> list[float]:
    if isinstance(values, tuple):
        values = list(values)
    if not isinstance(values, list):
        raise error(path, name, f"expected a list of numbers, got {type(values).__name__}")
    for i, v in enumerate(values):
        try:  # a JSON integer like 10**400 overflows float(): not finite either
            finite = _is_number(v) and math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite:
            raise error(path, f"{name}[{i}]", f"expected a finite number, got {v!r}")
    return [float(v) for v in values]


@dataclass(frozen=True)
class StsCalibration:
    """SGLang's ``DSparkStsCalibration``: per-position temperatures plus fit diagnostics."""

    temperatures: list[float]
    dataset: str = ""
    num_samples: int = 0
    ece_before: list[float] = field(default_factory=list)
    ece_after: list[float] = field(default_factory=list)
    path: str = field(default=_IN_MEMORY, compare=False)

    def __post_init__(self) -> None:
        temps = _number_list(self.temperatures, "temperatures", self.path)
        if not temps:
            raise StsFileError(self.path, "temperatures", "empty: at least one temperature is required")
        for i, t in enumerate(temps):
            if t <= 0:
                raise StsFileError(self.path, f"temperatures[{i}]", f"must be > 0, got {t}")
        if not isinstance(self.dataset, str):
            raise StsFileError(self.path, "dataset", f"expected a string, got {self.dataset!r}")
        if not isinstance(self.num_samples, int) or isinstance(self.num_samples, bool) \
                or self.num_samples < 0:
            raise StsFileError(self.path, "num_samples",
                               f"expected an integer >= 0, got {self.num_samples!r}")
        for name in ("ece_before", "ece_after"):
            values = _number_list(getattr(self, name), name, self.path)
            if values and len(values) != len(temps):
                raise StsFileError(self.path, name, f"{len(values)} values for {len(temps)} temperatures")
            object.__setattr__(self, name, values)
        object.__setattr__(self, "temperatures", temps)

    @property
    def gamma(self) -> int:
        return len(self.temperatures)

    def apply(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """[..., gamma] raw logits -> [..., gamma] calibrated confidences."""
        return apply_sts(raw_logits, self.temperatures)

    def to_dict(self) -> dict:
        out: dict = {"temperatures": list(self.temperatures)}
        if self.dataset:
            out["dataset"] = self.dataset
        if self.num_samples:
            out["num_samples"] = self.num_samples
        if self.ece_before:
            out["ece_before"] = list(self.ece_before)
        if self.ece_after:
            out["ece_after"] = list(self.ece_after)
        return out

    def to_json(self) -> str:
        """Compact JSON in SGLang's field order, defaults omitted (``omit_defaults``)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, *, path: str = _IN_MEMORY) -> "StsCalibration":
        try:
            obj = json.loads(text)
        except JSON_PARSE_ERRORS as exc:
            raise StsFileError(path, "<root>", f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise StsFileError(path, "<root>", f"expected a JSON object, got {type(obj).__name__}")
        if "temperatures" not in obj:
            raise StsFileError(path, "temperatures", "missing")
        keys = ("temperatures", "dataset", "num_samples", "ece_before", "ece_after")
        return cls(**{k: obj[k] for k in keys if k in obj}, path=path)  # unknown keys ignored

    @classmethod
    def load(cls, path: PathLike) -> "StsCalibration":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise StsFileError(str(path), "<file>", f"cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise StsFileError(str(path), "<file>", f"not UTF-8 text ({exc})") from None
        return cls.from_json(text, path=str(path))

    def save(self, path: PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Calibration records


_RECORD_FIELDS = ("conf_logits", "num_accepted", "verify_lens")
_PROMPT_IDS = "prompt_ids"  # optional: lets a calibrator hold out whole prompts


@dataclass(eq=False)
class CalibrationRecords:
    """Per-round calibration data.

    conf_logits [n, gamma] float32 raw confidence logits (for head-less drafters:
    ``logit(top-1 draft probability)``, see ``ProposalProbEstimator``); num_accepted [n] int64;
    verify_lens [n] int64 with 0 <= num_accepted <= verify_lens <= gamma. Positions k >=
    verify_lens[n] are censored (module doc). Optional prompt_ids [n] int64 >= 0 name the prompt
    each round came from (`dspark-eval` writes them), so a fit can hold out whole prompts: rounds of
    one prompt are correlated, and splitting them between fit and held-out flatters the held-out
    metrics.
    """

    conf_logits: torch.Tensor  # [n, gamma] float32
    num_accepted: torch.Tensor  # [n] int64
    verify_lens: torch.Tensor  # [n] int64
    path: str = field(default=_IN_MEMORY, compare=False, repr=False)
    prompt_ids: Optional[torch.Tensor] = None  # [n] int64, or None when not recorded

    def __post_init__(self) -> None:
        p = self.path
        logits, acc, lens = self.conf_logits, self.num_accepted, self.verify_lens
        per_round = {"num_accepted": acc, "verify_lens": lens}  # the [n] integer fields
        if self.prompt_ids is not None:
            per_round[_PROMPT_IDS] = self.prompt_ids
        for name, t in {"conf_logits": logits, **per_round}.items():
            if not isinstance(t, torch.Tensor):
                raise RecordsFileError(p, name, f"expected a tensor, got {type(t).__name__}")
        if logits.dim() != 2 or not logits.is_floating_point():
            raise RecordsFileError(p, "conf_logits", f"expected [n, gamma] float, got "
                                   f"{tuple(logits.shape)} {logits.dtype}")
        for name, t in per_round.items():
            if t.shape != (logits.shape[0],) or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise RecordsFileError(p, name, f"expected [{logits.shape[0]}] integer, got "
                                       f"{tuple(t.shape)} {t.dtype}")
        self.conf_logits = logits.to(torch.float32)
        self.num_accepted, self.verify_lens = acc.to(torch.int64), lens.to(torch.int64)
        gamma = logits.shape[1]
        if bool(((self.verify_lens < 0) | (self.verify_lens > gamma)).any()):
            raise RecordsFileError(p, "verify_lens", f"values must lie in [0, {gamma}]")
        if bool(((self.num_accepted < 0) | (self.num_accepted > self.verify_lens)).any()):
            raise RecordsFileError(p, "num_accepted", "values must lie in [0, verify_lens]")
        if self.prompt_ids is not None:
            self.prompt_ids = self.prompt_ids.to(torch.int64)
            if bool((self.prompt_ids < 0).any()):
                raise RecordsFileError(p, _PROMPT_IDS, "values must be >= 0")

    @property
    def gamma(self) -> int:
        return self.conf_logits.shape[1]

    def __len__(self) -> int:
        return self.conf_logits.shape[0]

    def take(self, rows: torch.Tensor) -> "CalibrationRecords":
        """The rounds selected by ``rows`` (indices or a bool mask [n]), prompt ids included."""
        ids = None if self.prompt_ids is None else self.prompt_ids[rows]
        return CalibrationRecords(self.conf_logits[rows], self.num_accepted[rows], self.verify_lens[rows],
                                  path=self.path, prompt_ids=ids)

    @classmethod
    def concat(cls, parts: Sequence["CalibrationRecords"], *, path: str = _IN_MEMORY) -> "CalibrationRecords":
        """The rounds of several record sets, in order. Prompt ids survive only if every part has
        them, offset per part so that prompts of different files (sets, runs) never share an id."""
        ids = None
        if parts and all(r.prompt_ids is not None for r in parts):
            offsets, shifted = 0, []
            for r in parts:
                shifted.append(r.prompt_ids + offsets)
                offsets += int(r.prompt_ids.max()) + 1 if len(r) else 0
            ids = torch.cat(shifted)
        return cls(torch.cat([r.conf_logits for r in parts]), torch.cat([r.num_accepted for r in parts]),
                   torch.cat([r.verify_lens for r in parts]), path=path, prompt_ids=ids)

    @classmethod
    def from_prefix_mask(cls, logits: torch.Tensor, prefix_mask: torch.Tensor) -> "CalibrationRecords":
        """From SGLang's recorder layout ({logits, prefix_mask} [n, gamma]): uncensored rows."""
        mask = prefix_mask.to(torch.bool)
        counts = mask.sum(dim=1)
        if not torch.equal(mask, prefix_labels(counts, mask.shape[1])):
            raise RecordsFileError(_IN_MEMORY, "prefix_mask", "rows must be 1s followed by 0s")
        full = torch.full_like(counts, mask.shape[1])
        return cls(logits, counts, full)

    def save(self, path: PathLike) -> None:
        """``.safetensors`` or ``.npz`` by suffix."""
        path = Path(path)
        tensors = {n: getattr(self, n).contiguous().cpu() for n in _RECORD_FIELDS}
        if self.prompt_ids is not None:
            tensors[_PROMPT_IDS] = self.prompt_ids.contiguous().cpu()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata={"format": "dspark-calibration-records"})
        elif path.suffix == ".npz":
            with open(path, "wb") as f:
                np.savez(f, **{n: t.numpy() for n, t in tensors.items()})
        else:
            raise RecordsFileError(str(path), "<suffix>", "expected .safetensors or .npz")

    @classmethod
    def load(cls, path: PathLike) -> "CalibrationRecords":
        path = Path(path)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                raw = load_file(str(path))
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    raw = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
            else:
                raise RecordsFileError(str(path), "<suffix>", "expected .safetensors or .npz")
        except RecordsFileError:
            raise
        except Exception as exc:  # unreadable container: name the file
            raise RecordsFileError(str(path), "<file>", f"cannot read ({exc})") from None
        for name in _RECORD_FIELDS:
            if name not in raw:
                raise RecordsFileError(str(path), name, "missing")
        return cls(*(raw[n] for n in _RECORD_FIELDS), path=str(path), prompt_ids=raw.get(_PROMPT_IDS))


# ------------------------------------------------------------------------------------------------
# Estimator for drafters without a confidence head


def top1_feature(draft_probs: torch.Tensor) -> torch.Tensor:
    """[..., gamma, V] draft distributions q_k -> [..., gamma] max_v q_k(v)."""
    return draft_probs.amax(dim=-1)


def head_less_feature(block) -> torch.Tensor:
    """The estimator's feature of a DraftBlock [R, gamma]: the drafter's temperature-1 top-1
    probability when the drafter reported it (`DraftBlock.top1_probs`), else max_v q_k(v)."""
    return block.top1_probs if block.top1_probs is not None else top1_feature(block.probs)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.to(torch.float64).clamp(PROB_CLAMP, 1.0 - PROB_CLAMP)
    return torch.log(p) - torch.log1p(-p)


@dataclass
class ProposalProbEstimator:
    """Confidence logits from the draft distribution: ``logit_k = a_k · logit(f_k) + b_k``.

    The feature f_k is the drafter's top-1 probability at position k at temperature 1,
    ``max_v softmax(z_k)(v)`` (``DraftBlock.top1_probs``; ``top1_feature`` of q_k for drafters that
    do not report it). Not of the request's q_k: for a greedy request q_k is one-hot and its maximum
    is always 1, which would call every draft certain. Why not q_k(x_k) under sampling: it reads x_k, so a
    schedule built on it would decide whether to verify x_k from x_k's own value, which is not
    lossless (p_t = (0.7, 0.3), q = (0.8, 0.2), verify iff q(x) ≥ 0.5 outputs A with probability
    0.84, not 0.7; tests/unit/test_confidence.py). max_v q_k(v) depends on x_{<k} only, exactly like
    a DSpark confidence head's c_k.

    (a_k, b_k) estimate the conditional acceptance P(x_k accepted | x_{<k} accepted): ``fit``
    runs a per-position logistic regression (Newton, a small ridge towards the default a=1, b=0)
    on the rows where position k was verified and every earlier draft accepted.
    """

    slopes: list[float]
    intercepts: list[float]
    num_samples: int = 0

    def __post_init__(self) -> None:
        self.slopes = _number_list(self.slopes, "slopes", _IN_MEMORY, EstimatorFileError)
        self.intercepts = _number_list(self.intercepts, "intercepts", _IN_MEMORY, EstimatorFileError)
        if not self.slopes or len(self.slopes) != len(self.intercepts):
            raise EstimatorFileError(_IN_MEMORY, "slopes/intercepts",
                                     f"need equal non-empty lengths, got {len(self.slopes)} and "
                                     f"{len(self.intercepts)}")

    @classmethod
    def identity(cls, gamma: int) -> "ProposalProbEstimator":
        return cls([1.0] * gamma, [0.0] * gamma)

    @property
    def gamma(self) -> int:
        return len(self.slopes)

    def logits(self, top1_probs: torch.Tensor) -> torch.Tensor:
        """[..., gamma] top-1 draft probabilities -> [..., gamma] float32 confidence logits."""
        return self.apply_to_raw(_logit(top1_probs))

    def apply_to_raw(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """[..., gamma] raw logits ``logit(f_k)`` -> [..., gamma] float32 calibrated logits."""
        if raw_logits.shape[-1] != self.gamma:
            raise ValueError(f"expected {self.gamma} positions, got {raw_logits.shape[-1]}")
        a = torch.tensor(self.slopes, dtype=torch.float64, device=raw_logits.device)
        b = torch.tensor(self.intercepts, dtype=torch.float64, device=raw_logits.device)
        return (raw_logits.to(torch.float64) * a + b).to(torch.float32)

    def confidences(self, top1_probs: torch.Tensor) -> torch.Tensor:
        """[..., gamma] -> [..., gamma] calibrated confidences in [0, 1] (NaN -> 0)."""
        return torch.sigmoid(self.logits(top1_probs)).nan_to_num_(nan=0.0)

    @classmethod
    def fit(cls, records: CalibrationRecords, *, ridge: float = 1e-3, max_iter: int = 100,
            tol: float = 1e-10) -> "ProposalProbEstimator":
        """Per-position logistic regression of acceptance on ``records.conf_logits`` (which must
        hold ``logit(top-1 draft probability)``). Positions without data keep a=1, b=0."""
        z = records.conf_logits.to(torch.float64).nan_to_num(nan=0.0)  # [n, γ]
        gamma = z.shape[1]
        pos = torch.arange(gamma)[None, :]
        acc, lens = records.num_accepted[:, None], records.verify_lens[:, None]
        weight = ((pos < lens) & (acc >= pos)).to(torch.float64)  # verified, prefix accepted
        y = (acc > pos).to(torch.float64)
        a, b = torch.ones(gamma, dtype=torch.float64), torch.zeros(gamma, dtype=torch.float64)
        for _ in range(max_iter):
            p = torch.sigmoid(a * z + b)
            r, h = weight * (p - y), weight * p * (1.0 - p)  # [n, γ]
            g_a, g_b = (r * z).sum(0) + ridge * (a - 1.0), r.sum(0) + ridge * b
            h_aa, h_ab, h_bb = (h * z * z).sum(0) + ridge, (h * z).sum(0), h.sum(0) + ridge
            det = h_aa * h_bb - h_ab * h_ab  # > 0: the ridge keeps the Hessian definite
            # Newton step, clipped so that a far start on nearly separable data cannot overshoot.
            step_a = ((h_bb * g_a - h_ab * g_b) / det).clamp(-_MAX_STEP, _MAX_STEP)
            step_b = ((h_aa * g_b - h_ab * g_a) / det).clamp(-_MAX_STEP, _MAX_STEP)
            a, b = a - step_a, b - step_b
            if float(torch.maximum(step_a.abs(), step_b.abs()).max()) < tol:
                break
        return cls(a.tolist(), b.tolist(), num_samples=len(records))

    def to_json(self) -> str:
        return json.dumps({"format": "dspark-proposal-prob-estimator", "slopes": self.slopes,
                           "intercepts": self.intercepts, "num_samples": self.num_samples})

    @classmethod
    def from_json(cls, text: str, *, path: str = _IN_MEMORY) -> "ProposalProbEstimator":
        try:
            obj = json.loads(text)
        except JSON_PARSE_ERRORS as exc:
            raise EstimatorFileError(path, "<root>", f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise EstimatorFileError(path, "<root>", "expected a JSON object")
        for key in ("slopes", "intercepts"):
            if key not in obj:
                raise EstimatorFileError(path, key, "missing")
        num = obj.get("num_samples", 0)
        if not isinstance(num, int) or isinstance(num, bool) or num < 0:
            raise EstimatorFileError(path, "num_samples", f"expected an integer >= 0, got {num!r}")
        slopes = _number_list(obj["slopes"], "slopes", path, EstimatorFileError)
        intercepts = _number_list(obj["intercepts"], "intercepts", path, EstimatorFileError)
        if not slopes or len(slopes) != len(intercepts):
            raise EstimatorFileError(path, "slopes/intercepts", "need equal non-empty lengths")
        return cls(slopes, intercepts, num_samples=num)

    @classmethod
    def load(cls, path: PathLike) -> "ProposalProbEstimator":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise EstimatorFileError(str(path), "<file>", f"cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise EstimatorFileError(str(path), "<file>", f"not UTF-8 text ({exc})") from None
        return cls.from_json(text, path=str(path))

    def save(self, path: PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")
