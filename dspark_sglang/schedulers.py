"""Verify-length schedulers: how many of each request's drafts the target verifies this round.

Vocabulary (drafters-and-paper.md §4-§7):
- ``confidences[r, k-1] = c_{r,k}``: calibrated P(draft x_{r,k} accepted | x_{r,<k} accepted).
  c_k reads x_{k-1} (never x_k), so it is known before x_k is sampled.
- survival ``a_{r,k} = Π_{i≤k} c_{r,i}``: P(the first k drafts are all accepted).
- ``verify_len[r]`` in [0, γ] counts draft tokens verified, EXCLUDING the anchor row, which is always
  present: request r costs ``1 + verify_len[r]`` batch tokens.
- objective Θ = τ · SPS(B): expected committed tokens τ = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j}) per step times
  steps per second at B = Σ_r (1 + ℓ_r) batch tokens (``dspark_sglang.cost_table``).

Losslessness (§5): the output distribution equals the target's iff the drafts are always sampled
in full and the decision "verify at least k drafts of request r" never depends on x_{r,k}. Since
c_{r,k+1}, c_{r,k+2}, ... read x_{r,k} (directly or through later drafts), the admission of draft k
may use c_{r,1..k} and anything about other requests, but never c_{r,k+1..γ}. Every scheduler here
except ``RetrospectiveAlgorithm1`` (a deliberately biased negative control) has that property; each
docstring says why, and tests/unit/test_schedulers.py checks it exhaustively on random inputs.

The shared ordering. Candidates (r, k) are ranked by (survival desc, position asc, request asc).
Survival is non-increasing along k (c ≤ 1, and float rounding of a·c with c ≤ 1 never exceeds a),
and ties go to the earlier position, so (r, k+1) always ranks after (r, k): any top-of-the-order
set is a union of per-request prefixes, and the number of candidates ranked before (r, k) is a
function of c_{r,1..k} and the other requests only. Implementation: give (r, k) the
position-major index k·R + r, so "index asc" is "(position, request) asc", and the int64 key
``float32_bits(survival) << 32 | (N − 1 − index)``: unique, monotone in survival (non-negative
floats order like their bit patterns; non-candidates are -inf, whose keys are negative), larger
for the earlier index on ties. The top-K set is then ``key >= (K-th largest key)``.

Degenerate confidences: NaN counts as 0 (the draft and everything after it is never admitted by
confidence), +inf as 1, values are clamped to [0, 1]. Candidates with survival below
``survival_eps`` (default 1e-6, SGLang's) are never admitted by confidence.

Speed: on CPU tensors ``Algorithm1Scheduler`` and ``LaggedBudgetScheduler`` (without a forced
prefix) run each call as one compiled pass (``schedule_cpu.py``, numba), since a CPU torch op costs
~5 µs here and a round is ~25 of them. The torch code below is the reference for that path (tests
check both agree) and the path for accelerator tensors: written to a small op count (one sort, one
k-th value, cached per-shape constants and ``out=`` buffers), one host sync per call (the
admitted count or the budget, an int). benchmarks/scheduler_bench.py measures both.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from typing import Optional

import numpy as np
import torch

from dspark_sglang.cost_table import CostTable
from dspark_sglang.draft_cost import DraftCost

__all__ = [
    "SchedulerInputError",
    "SchedulerConfigError",
    "prefix_survival",
    "VerifyScheduler",
    "Algorithm1Scheduler",
    "RetrospectiveAlgorithm1",
    "LaggedBudgetScheduler",
    "FixedLengthScheduler",
    "VerifyAllScheduler",
    "NoSpeculationScheduler",
    "lagged_budget",
    "admit_top",
    "make_scheduler",
    "SCHEDULER_KINDS",
]

DEFAULT_SURVIVAL_EPS = 1e-6
# Survival written at forced (min_verify_len) positions so they rank above every real survival.
_FORCED = 2.0
_NEG_INF = float("-inf")
_ZERO = torch.zeros(())
_NO_PRIOR = np.zeros(1, dtype=np.float32)  # placeholder when the fused path keeps no prior

logger = logging.getLogger(__name__)
_fused_module = None  # schedule_cpu, imported on first use (numba's import takes ~0.5 s)


def _fused():
    """The fused CPU path's module, or None (with one warning) if numba cannot be imported."""
    global _fused_module
    if _fused_module is None:
        try:
            from dspark_sglang import schedule_cpu
            _fused_module = schedule_cpu
        except ImportError as exc:  # numba is a dependency; keep serving on the torch path if it broke
            logger.warning("dspark: numba unavailable (%s); CPU schedulers use the torch path", exc)
            _fused_module = False
    return _fused_module or None


def _warm_up_fused(enabled: bool) -> None:
    """Compile the fused path; if numba cannot (no writable cache, a broken LLVM), use torch."""
    global _fused_module
    fused = enabled and _fused()
    if fused:
        try:
            fused.warm_up()
        except Exception as exc:  # noqa: BLE001 - any compile failure: serve on the torch path
            logger.warning("dspark: the fused CPU scheduler failed to compile (%s); using the torch path", exc)
            _fused_module = False


def _host_inputs(slots: torch.Tensor, confidences: torch.Tensor):
    """numpy views (or copies) of CPU inputs as the fused path takes them: float32, int64."""
    conf = confidences.detach() if confidences.requires_grad else confidences  # detach() costs ~1 µs
    if conf.dtype != torch.float32:
        conf = conf.to(torch.float32)
    if slots.dtype != torch.int64:
        slots = slots.to(torch.int64)
    return slots.numpy(), conf.numpy()


class SchedulerInputError(ValueError):
    """A scheduler was called with mis-shaped or mistyped tensors."""


class SchedulerConfigError(ValueError):
    """A scheduler was configured with an unknown kind, a missing cost table or a bad option."""


def prefix_survival(
    confidences: torch.Tensor,  # [num_reqs, gamma] calibrated confidences c_{r,k}
) -> torch.Tensor:  # [num_reqs, gamma] float32 survival a_{r,k} = Π_{i≤k} c_{r,i}
    """Cumulative product of confidences, after NaN -> 0, +inf -> 1 and clamping to [0, 1]."""
    c = torch.fmax(confidences.to(torch.float32), _ZERO).clamp_(max=1.0)  # fmax: NaN -> 0
    return torch.cumprod(c, dim=1)


def _masked_survival(
    confidences: torch.Tensor,  # [num_reqs, L] float
    below_eps: float,  # the largest float32 below survival_eps
) -> torch.Tensor:  # [num_reqs, L] float32; -inf where not a candidate
    """``prefix_survival`` with non-candidates (survival < eps) set to -inf, in 4 ops.

    -inf makes the sums below -inf (so Θ never improves past them and the argmax never lands on
    them) and gives them negative rank keys (so a non-negative threshold never admits them).
    ``threshold`` keeps x > below_eps, i.e. x >= eps in float32.
    """
    return torch.threshold_(prefix_survival(confidences), below_eps, _NEG_INF)


def _check_inputs(slots: torch.Tensor, confidences: torch.Tensor) -> tuple[int, int]:
    if not isinstance(confidences, torch.Tensor) or confidences.dim() != 2:
        raise SchedulerInputError(
            f"confidences: expected a [num_reqs, gamma] tensor, got {_describe(confidences)}"
        )
    if not confidences.is_floating_point():
        raise SchedulerInputError(f"confidences: expected a float tensor, got {confidences.dtype}")
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
        raise SchedulerInputError(f"slots: expected a [num_reqs] tensor, got {_describe(slots)}")
    if slots.dtype.is_floating_point or slots.dtype == torch.bool:
        raise SchedulerInputError(f"slots: expected an integer tensor, got {slots.dtype}")
    num_reqs, gamma = confidences.shape
    if slots.shape[0] != num_reqs:
        raise SchedulerInputError(
            f"slots: {slots.shape[0]} entries for {num_reqs} rows of confidences"
        )
    if gamma < 1:
        raise SchedulerInputError("confidences: gamma (dim 1) must be >= 1")
    return num_reqs, gamma


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


class _Workspace:
    """Constants and scratch buffers for one (num_reqs, L, forced, device).

    Consecutive rounds usually repeat the shape, so the SPS lookups, the rank-key offsets, the
    output buffers and even the slice views are built once: a dict hit costs ~1 µs, each avoided
    torch op or view ~1-5 µs.

    - ``rates`` [n+1] float64: SPS(first + i), first = R·(1 + forced), n = R·(L − forced).
    - ``scaled`` [n+1]: R · rates (Θ with zero forced survival mass, Algorithm 1's base).
    - ``theta`` [n+1] (theta[0] preset to scaled[0]), ``improving`` [n+1] bool with a False
      sentinel at the end, so ``argmin`` finds the end of the leading True run.
    - ``offsets`` [R, L] int64: N − 1 − (k·R + r), the tie-break half of the rank key.
    """

    def __init__(self, table: CostTable, num_reqs: int, num_pos: int, forced: int, device):
        n = num_reqs * (num_pos - forced)
        first = num_reqs * (1 + forced)
        tokens = torch.arange(first, first + n + 1, dtype=torch.int64)
        rates = torch.as_tensor(table.steps_per_second(num_reqs, tokens), dtype=torch.float64)
        if rates.shape != tokens.shape or not bool(((rates > 0) & torch.isfinite(rates)).all()):
            raise SchedulerConfigError(
                f"cost table returned a non-positive, non-finite or mis-shaped rate for "
                f"num_reqs={num_reqs}, batch tokens {first}..{first + n}"
            )
        self.rates = rates.to(device)
        self.rates_np = rates.numpy() if self.rates.device.type == "cpu" else None  # fused CPU path
        self.num_reqs = num_reqs
        self.scaled = self.rates * num_reqs
        self.theta = self.scaled.clone()
        self.improving = torch.zeros(n + 1, dtype=torch.bool, device=device)
        total = num_reqs * num_pos
        order = torch.arange(total - 1, -1, -1, dtype=torch.int64, device=device)
        self.offsets = order.view(num_pos, num_reqs).t().contiguous()
        # Views used on the hot path.
        self.rates_hi, self.scaled_hi = self.rates[1:], self.scaled[1:]
        self.theta_hi, self.theta_lo = self.theta[1:], self.theta[:-1]
        self.improving_head = self.improving[:-1]
        self.improving_u8 = self.improving.view(torch.uint8)

    def theta_from(self, cumulative: torch.Tensor) -> torch.Tensor:
        """Θ_0..Θ_n for zero forced mass: Θ_i = (R + cumulative_{i−1})·SPS_i (buffer reused;
        ``cumulative`` is overwritten). The fused CPU path rounds exactly so."""
        # cumulative: [n] float64 Σ_{j≤i} s_j, -inf from the first non-candidate on
        torch.mul(cumulative.add_(self.num_reqs), self.rates_hi, out=self.theta_hi)
        return self.theta


class _WorkspaceCache:
    def __init__(self, table: CostTable, max_entries: int = 64):
        self.table, self.max_entries = table, max_entries
        self._memo: dict[tuple, _Workspace] = {}

    def get(self, num_reqs: int, num_pos: int, forced: int, device) -> _Workspace:
        key = (num_reqs, num_pos, forced, device)
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= self.max_entries:
                self._memo.clear()
            hit = self._memo[key] = _Workspace(self.table, num_reqs, num_pos, forced, device)
        return hit


def _sorted_desc(values: torch.Tensor) -> torch.Tensor:
    """[N] float32 (>= 0 or -inf) sorted descending, via the int32 bit patterns (same order for
    such values, and a little cheaper than a float sort)."""
    return torch.sort(values.view(torch.int32), descending=True).values.view(torch.float32)


def admit_top(
    survival: torch.Tensor,  # [num_reqs, L] float32 candidate survivals; < 0 (-inf) = not a candidate
    count: int,
    offsets: torch.Tensor,  # [num_reqs, L] int64 tie-break offsets (see _Workspace)
) -> torch.Tensor:  # [num_reqs] int64
    """Per-request number of candidates among the ``count`` highest-ranked ones (rank: survival
    desc, position asc, request asc); negative survivals are never admitted.

    These are the verify lengths whenever the survivals are non-increasing along each row (see
    the module doc).
    """
    num_reqs, num_pos = survival.shape
    total = num_reqs * num_pos
    if count <= 0 or total == 0:
        return torch.zeros(num_reqs, dtype=torch.int64, device=survival.device)
    key = torch.add(offsets, survival.view(torch.int32), alpha=1 << 32)  # [R, L] unique
    if count < total:
        threshold = torch.kthvalue(key.view(-1), total - count + 1).values.clamp_(min=0)
    else:
        threshold = 0
    return (key >= threshold).sum(dim=1)


class VerifyScheduler(ABC):
    """One interface for every scheduler.

    ``schedule(slots, confidences)`` returns ``verify_lens`` [num_reqs] int64 in [0, gamma], on the
    device of ``confidences``. ``slots`` [num_reqs] are stable per-request ids (SGLang's
    req_pool_idx); stateless schedulers ignore them. ``release(slots)`` tells a stateful scheduler
    that those slots now hold new requests.
    """

    #: False only for the negative control.
    lossless: bool = True

    @abstractmethod
    def schedule(
        self,
        slots: torch.Tensor,  # [num_reqs] int64
        confidences: torch.Tensor,  # [num_reqs, gamma] float, calibrated c_{r,k}
    ) -> torch.Tensor:  # [num_reqs] int64 verify lengths, anchor row excluded
        ...

    def release(self, slots: torch.Tensor) -> None:  # [n] int64
        """Forget per-slot state (no-op for stateless schedulers)."""

    def warm_up(self) -> None:
        """Prepare for CPU tensors before serving (the table schedulers compile their fused CPU path
        here, ~15 s on a cold numba cache, instead of in the first round)."""

    def skip_round(self, slots: torch.Tensor) -> bool:  # [num_reqs] int64
        """True when the caller should not draft this round: no draft would be verified whatever
        the drafts turn out to be, or drafting costs more than it brings. The round is then
        consumed and ``schedule`` must not be called for it. Decided before drafting, from earlier
        rounds' information only: lossless."""
        return False


def _check_eps(survival_eps: float) -> float:
    if not (0.0 < float(survival_eps) <= 1.0):
        raise SchedulerConfigError(f"survival_eps must be in (0, 1], got {survival_eps}")
    return float(survival_eps)


def _below(survival_eps: float) -> float:
    """Largest float32 strictly below float32(eps): ``x > _below(eps)`` ⟺ ``x >= eps`` in float32."""
    eps32 = torch.tensor(survival_eps, dtype=torch.float32)
    return float(torch.nextafter(eps32, torch.zeros((), dtype=torch.float32)))


def _check_max_len(max_verify_len: Optional[int]) -> Optional[int]:
    if max_verify_len is not None and (not isinstance(max_verify_len, int) or max_verify_len < 0):
        raise SchedulerConfigError(f"max_verify_len must be an int >= 0, got {max_verify_len!r}")
    return max_verify_len


def _zeros(num_reqs: int, device) -> torch.Tensor:
    return torch.zeros(num_reqs, dtype=torch.int64, device=device)


class Algorithm1Scheduler(VerifyScheduler):
    """The paper's Algorithm 1 (hardware-aware prefix scheduler) with its early-stop ``break``.

    Walks the candidates in the shared order, admitting each while Θ strictly improves, and stops
    at the first candidate that does not improve Θ (or whose survival is below ``survival_eps``).
    Vectorised: sort the survivals s_1 ≥ s_2 ≥ ..., form Θ_i = (R + Σ_{j≤i} s_j) · SPS(R + i) for
    i = 0..N, and the admitted count K is the length of the leading run of Θ_i > Θ_{i−1}; then the
    top K of the shared order are admitted.

    Why lossless: (r, k) is admitted iff every step up to and including its rank improved. Its rank
    and the Θ values along the way depend only on candidates ranked at or before it: (r, 1..k) and
    other requests' candidates, never (r, k+1..γ), which rank after it. So the admission of x_{r,k}
    is a function of c_{r,1..k} and the other requests only. The ``break`` is essential: without it
    the search reads Θ beyond (r, k) (see ``RetrospectiveAlgorithm1``).

    Parameters
    ----------
    cost_table : CostTable
        SPS(B) curve.
    survival_eps : float
        Candidates with survival below this are never admitted (the paper's a > 0).
    max_verify_len : int, optional
        Cap on verify_len (default: gamma).
    fused_cpu : bool
        CPU tensors take the compiled path of ``schedule_cpu.py`` (default); False keeps the torch
        code (same results, slower on CPU).
    """

    #: The fused CPU path computes this class's rule; a subclass changing the rule opts out.
    _fused_rule = True

    def __init__(self, cost_table: CostTable, *, survival_eps: float = DEFAULT_SURVIVAL_EPS,
                 max_verify_len: Optional[int] = None, fused_cpu: bool = True):
        if cost_table is None:
            raise SchedulerConfigError(f"{type(self).__name__} needs a cost table")
        self.cost_table = cost_table
        self.fused_cpu = bool(fused_cpu)
        self.survival_eps = _check_eps(survival_eps)
        self._below_eps = _below(self.survival_eps)
        self._below_eps32 = np.float32(self._below_eps)
        self.max_verify_len = _check_max_len(max_verify_len)
        self._workspaces = _WorkspaceCache(cost_table)

    def warm_up(self) -> None:
        _warm_up_fused(self._fused_rule and self.fused_cpu)

    def _num_admitted(self, ws: _Workspace, cumulative: torch.Tensor) -> int:
        # cumulative: [N] float64 Σ_{j≤i} s_j (-inf from the first non-candidate on)
        ws.theta_from(cumulative)
        torch.gt(ws.theta_hi, ws.theta_lo, out=ws.improving_head)
        return int(ws.improving_u8.argmin())  # first False: the sentinel if all improved

    def schedule(self, slots: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        num_reqs, gamma = _check_inputs(slots, confidences)
        limit = gamma if self.max_verify_len is None else min(gamma, self.max_verify_len)
        device = confidences.device
        if num_reqs == 0 or limit == 0:
            return _zeros(num_reqs, device)
        ws = self._workspaces.get(num_reqs, limit, 0, device)
        fused = self._fused_rule and self.fused_cpu and device.type == "cpu" and _fused()
        if fused:
            slots_np, conf = _host_inputs(slots, confidences)
            out = np.empty(num_reqs, dtype=np.int64)  # (torch.empty(...).numpy() costs ~5 µs)
            fused.algorithm1_round(conf, limit, self._below_eps32, ws.rates_np, out)
            return torch.from_numpy(out)
        survival = _masked_survival(confidences.detach()[:, :limit], self._below_eps)  # [R, L]
        values = _sorted_desc(survival.view(-1))  # [N]
        count = self._num_admitted(ws, torch.cumsum(values, dim=0, dtype=torch.float64))
        return admit_top(survival, count, ws.offsets)


class RetrospectiveAlgorithm1(Algorithm1Scheduler):
    """NEGATIVE CONTROL — NOT LOSSLESS. Algorithm 1 without the ``break``: the global argmax of Θ
    over the current survivals.

    Kept only so tests can reproduce the paper's Appendix A bias (output (0.85, 0.15) instead of
    the target's (0.7, 0.3)). Why it is biased: to admit x_{r,k} it compares Θ at ranks beyond
    (r, k), which include a_{r,k+1} = a_{r,k}·c_{r,k+1}, and c_{r,k+1} reads x_{r,k}; so whether
    x_{r,k} is verified depends on x_{r,k} itself. Never serve with it: ``make_scheduler`` does not
    offer it.
    """

    lossless = False
    _fused_rule = False

    def _num_admitted(self, ws: _Workspace, cumulative: torch.Tensor) -> int:
        return int(torch.argmax(ws.theta_from(cumulative)))


def lagged_budget(
    lagged_survival: torch.Tensor,  # [num_reqs, L] survivals in [0, 1]; -inf = not a candidate
    rates: torch.Tensor,  # [num_reqs*(L-m) + 1] float64: SPS(num_reqs*(1+m) + i)
    *,
    min_verify_len: int = 0,
) -> int:
    """Budget K: draft tokens beyond the ``min_verify_len`` = m forced per request maximising
    Θ_i = (R + Σ forced a + Σ_{j≤i} s_j) · SPS(R·(1+m) + i), where s are the non-forced lagged
    survivals sorted descending. Global argmax over i = 0..N (no break; first maximum on ties).
    -inf marks a non-candidate (the scheduler writes it for survivals below ``survival_eps``)."""
    return int(torch.argmax(_lagged_theta(lagged_survival, rates, min_verify_len)))


def _lagged_theta(lagged_survival: torch.Tensor, rates: torch.Tensor, min_verify_len: int) -> torch.Tensor:
    """Θ_0..Θ_N of ``lagged_budget`` ([N+1] float64)."""
    num_reqs = lagged_survival.shape[0]
    lagged_survival = lagged_survival.to(torch.float32)
    free = lagged_survival[:, min_verify_len:].reshape(-1)
    values = _sorted_desc(free.contiguous())  # [N]
    base = lagged_survival[:, :min_verify_len].clamp(min=0.0).sum(dtype=torch.float64) + num_reqs
    tau = torch.cumsum(values, dim=0, dtype=torch.float64).add_(base)  # [N]
    return torch.cat([(rates[:1] * base), tau.mul_(rates[1:])])  # [N+1]


def _with_draft_time(rates, draft_seconds: float):  # torch.Tensor or np.ndarray, [n] float64
    """Rounds/s of a drafted round: a target step of 1/SPS plus a draft step of d seconds."""
    return rates / (1.0 + draft_seconds * rates)  # = 1 / (1/SPS + d)


def _drafted_budget(
    lagged_survival: torch.Tensor,  # [num_reqs, L] float32 survivals; -inf = not a candidate
    rates: torch.Tensor,  # [num_reqs*L + 1] float64 SPS(num_reqs + i)
    draft_seconds: float,
) -> tuple[int, float]:
    """(K, Θ_K): the budget maximising tokens/s of a round that drafted, d included, and that best
    Θ. No forced prefix. Compare Θ_K with R·SPS(R), the round that does not draft."""
    theta = _lagged_theta(lagged_survival, _with_draft_time(rates, draft_seconds), 0)  # [N+1]
    best = int(torch.argmax(theta))
    return best, float(theta[best])


def _lagged_budget_fast(ws: _Workspace, lagged_survival: torch.Tensor) -> int:
    """``lagged_budget`` with no forced prefix, on the workspace buffers (same result)."""
    # lagged_survival: [num_reqs, L] float32
    values = _sorted_desc(lagged_survival.reshape(-1))  # [N]
    cumulative = torch.cumsum(values, dim=0, dtype=torch.float64)
    return int(torch.argmax(ws.theta_from(cumulative)))


class LaggedBudgetScheduler(VerifyScheduler):
    """Production form (paper §5.2; SGLang's planner): budget from lagged survivals, allocation by
    current ones.

    Each call (one round):
    1. Read each slot's survivals as stored ``lag`` rounds ago (a ring of ``lag`` survival tables
       indexed by the global round; a slot absent from some rounds reads older information). Slots
       with no stored history read a prior: with ``prior="population"`` (default) a released slot
       reads the running mean of the survivals stored so far (what the average request achieved),
       before any survival was stored and with ``prior="optimistic"`` it reads 1.0 ("every draft
       will be accepted"). The optimistic prior makes every new request look worth drafting for
       its first ``lag`` drafted rounds, which at high concurrency keeps the drafter busy even
       when drafting does not pay.
    2. K = ``lagged_budget``: global argmax of Θ over those lagged survivals (no break).
    3. Admit the top K candidates of the CURRENT survivals in the shared order (only those with
       survival ≥ ``survival_eps``), after the forced ``min_verify_len`` per request; store the
       current survivals for round t + lag.

    Why lossless: K is a function of survivals from earlier rounds only, produced before this
    round's drafts were sampled, so it cannot depend on any current x_{r,k}; the prior substituted
    for a missing history is a constant or a mean of earlier rounds' survivals. Given K, (r, k) is admitted iff its rank in the shared
    order is < K (after the forced prefix) and a_{r,k} ≥ eps; its rank counts only candidates
    ranked before it, never (r, k+1..γ). The forced prefix is value-independent. Any ``lag ≥ 1`` is
    lossless; production uses 2 so that K is known before the previous step ends. ``lag = 0``
    would be the retrospective argmax, and is refused.

    Parameters
    ----------
    cost_table : CostTable
    lag : int
        Rounds between producing survivals and using them for the budget (>= 1, default 2).
    min_verify_len : int
        Drafts always verified per request (capped at gamma; default 0).
    max_verify_len : int, optional
        Cap on verify_len (default: gamma).
    survival_eps : float
    initial_slots : int
        Initial slot capacity; grows on demand.
    probe_every : int
        ``skip_round``: when drafting does not pay (the lagged budget is 0, or with a draft cost
        the best drafted round loses to not drafting), the round is skipped before drafting, so the
        caller saves the draft step; after ``probe_every - 1`` skipped rounds in a row one round drafts
        anyway to refresh the survivals (a skipped round stores nothing, so the lagged survivals
        would otherwise never change). 0: never skip.
    max_probe_every : int
        Each probe after which drafting still does not pay doubles the run of skipped rounds
        before the next probe, up to this; a round that drafts because it pays resets it to
        ``probe_every``. So a drafter that keeps not paying costs ever less, and one whose drafts
        start paying again is noticed within ``max_probe_every`` rounds.
    prior : str
        What a slot without history reads: "population" (default) or "optimistic" (see 1. above).
    prior_decay : float
        Weight of the old mean when ``prior="population"`` folds in a round's mean survival.
    draft_cost : DraftCost, optional
        Seconds of one draft step for R requests (``dspark_sglang.draft_cost``). A drafted round
        then takes 1/SPS(B) + d(R): the budget maximises tokens/s with d included, and
        ``skip_round`` skips drafting whenever the best drafted round, judged on the lagged
        survivals, is no faster than a round that does not draft, R·SPS(R). None or d = 0: the
        paper's objective (drafting is free). Lossless either way: d comes from earlier rounds.
    fused_cpu : bool
        CPU tensors take the compiled path of ``schedule_cpu.py`` (default), except with a forced
        ``min_verify_len`` prefix; False keeps the torch code (same results, ~4-13x slower on CPU).

    Notes
    -----
    Slots in one call must be distinct (duplicates only degrade the budget; it stays lossless).
    Callers should ``release`` a slot when its request finishes, otherwise the next occupant's first
    ``lag`` budgets use the previous occupant's survivals (again: efficiency, not correctness).
    """

    def __init__(self, cost_table: CostTable, *, lag: int = 2, min_verify_len: int = 0,
                 max_verify_len: Optional[int] = None, survival_eps: float = DEFAULT_SURVIVAL_EPS,
                 initial_slots: int = 256, probe_every: int = 8, max_probe_every: int = 64,
                 prior: str = "population",
                 prior_decay: float = 0.9, draft_cost: Optional[DraftCost] = None,
                 fused_cpu: bool = True):
        if cost_table is None:
            raise SchedulerConfigError("LaggedBudgetScheduler needs a cost table")
        self.fused_cpu = bool(fused_cpu)
        if not isinstance(probe_every, int) or probe_every < 0:
            raise SchedulerConfigError(f"probe_every must be an int >= 0, got {probe_every!r}")
        self.probe_every = probe_every
        if not isinstance(max_probe_every, int) or max_probe_every < probe_every:
            raise SchedulerConfigError(
                f"max_probe_every must be an int >= probe_every ({probe_every}), got {max_probe_every!r}")
        self.max_probe_every = max_probe_every
        self._probe_interval = probe_every  # skipped rounds in a row before the next probe, + 1
        self._skipped_in_a_row = 0
        if draft_cost is not None and not isinstance(draft_cost, DraftCost):
            raise SchedulerConfigError(f"draft_cost must be a DraftCost, got {type(draft_cost).__name__}")
        self.draft_cost = draft_cost
        if prior not in ("population", "optimistic"):
            raise SchedulerConfigError(f"prior must be 'population' or 'optimistic', got {prior!r}")
        if not (isinstance(prior_decay, (int, float)) and 0.0 <= prior_decay < 1.0):
            raise SchedulerConfigError(f"prior_decay must be in [0, 1), got {prior_decay!r}")
        self.prior, self.prior_decay = prior, float(prior_decay)
        self._prior_weight = np.float32(1.0 - self.prior_decay)  # the new round's weight, float32
        self._prior_mean: Optional[torch.Tensor] = None  # [gamma] running mean of stored survivals
        if not isinstance(lag, int) or lag < 1:
            raise SchedulerConfigError(f"lag must be an int >= 1 (0 is not lossless), got {lag!r}")
        if not isinstance(min_verify_len, int) or min_verify_len < 0:
            raise SchedulerConfigError(f"min_verify_len must be an int >= 0, got {min_verify_len!r}")
        self.max_verify_len = _check_max_len(max_verify_len)
        if self.max_verify_len is not None and min_verify_len > self.max_verify_len:
            raise SchedulerConfigError(
                f"min_verify_len {min_verify_len} > max_verify_len {self.max_verify_len}"
            )
        self.cost_table, self.lag, self.min_verify_len = cost_table, lag, min_verify_len
        self.survival_eps = _check_eps(survival_eps)
        self._below_eps = _below(self.survival_eps)
        self._below_eps32 = np.float32(self._below_eps)
        self._workspaces = _WorkspaceCache(cost_table)
        self._initial_slots = max(1, int(initial_slots))
        self._history: Optional[torch.Tensor] = None  # [lag, capacity, gamma] float32 survivals
        self._rings: list[torch.Tensor] = []  # the lag [capacity, gamma] views of _history
        self._rings_np: list = []  # their numpy views (CPU history: the fused path)
        self._round = 0
        #: The last budget K (excluding forced tokens), for logging and tests.
        self.last_budget: Optional[int] = None

    def warm_up(self) -> None:
        _warm_up_fused(self.fused_cpu)

    def reset(self) -> None:
        """Forget all history (e.g. when gamma changes)."""
        self._history, self._rings, self._rings_np, self._round, self.last_budget = None, [], [], 0, None
        self._prior_mean = None
        self._probe_interval, self._skipped_in_a_row = self.probe_every, 0

    def release(self, slots: torch.Tensor) -> None:
        if self._history is not None and slots.numel() > 0:
            index = slots.to(self._history.device, torch.int64)
            index = index[index < self._history.shape[1]]
            self._history[:, index] = 1.0 if self._prior_mean is None else self._prior_mean

    def _grow(self, gamma: int, max_slot: int, device) -> None:
        hist = self._history
        capacity = 0 if hist is None else hist.shape[1]
        new_capacity = max(self._initial_slots, capacity)
        while new_capacity <= max_slot:
            new_capacity *= 2
        grown = torch.ones((self.lag, new_capacity, gamma), dtype=torch.float32, device=device)
        if hist is not None:
            grown[:, :capacity] = hist
            if self._prior_mean is not None:
                grown[:, capacity:] = self._prior_mean
        self._history = grown
        self._rings = list(grown.unbind(0))  # per-round [capacity, γ] views
        self._rings_np = [ring.numpy() for ring in self._rings] if grown.device.type == "cpu" else []

    def _check_gamma(self, gamma: int) -> None:
        if self._history is not None and self._history.shape[2] != gamma:
            raise SchedulerInputError(
                f"confidences: gamma changed from {self._history.shape[2]} to {gamma}; call reset() first")

    def _exchange(self, slots: torch.Tensor, survival: torch.Tensor) -> torch.Tensor:
        """Return the slots' stored survivals for this round's ring entry and store the current
        ones in their place (read first, so lag=1 reads the previous round)."""
        # slots: [R] int64; survival: [R, γ] float32 -> [R, γ] float32
        gamma = survival.shape[1]
        self._check_gamma(gamma)
        if self._history is None or slots.device.type != "cpu":
            # No history yet, or on an accelerator where an out-of-range index is fatal: check.
            low, high = (int(v) for v in torch.aminmax(slots))
            if low < 0:
                raise SchedulerInputError(f"slots: must be >= 0, got {low}")
            if self._history is None or high >= self._history.shape[1]:
                self._grow(gamma, high, survival.device)
        ring = self._rings[self._round % self.lag]
        try:
            lagged = ring.index_select(0, slots)
        except IndexError:  # CPU fast path: a slot beyond the capacity (or negative)
            low, high = (int(v) for v in torch.aminmax(slots))
            if low < 0:
                raise SchedulerInputError(f"slots: must be >= 0, got {low}") from None
            self._grow(gamma, high, survival.device)
            ring = self._rings[self._round % self.lag]
            lagged = ring.index_select(0, slots)
        ring.index_copy_(0, slots, survival)
        self._round += 1
        if self.prior == "population":
            # [γ]; -inf (non-candidate) counts as 0; a float64 mean rounded once, as the fused path
            observed = survival.clamp(min=0.0).sum(dim=0, dtype=torch.float64).div_(len(survival))
            observed = observed.to(torch.float32)
            if self._prior_mean is None:
                self._prior_mean = observed
            else:
                # p + w·(observed − p) as three float32 ops, as the fused path rounds it (lerp_ may fuse)
                self._prior_mean.add_(observed.sub_(self._prior_mean).mul_(float(self._prior_weight)))
        return lagged

    def _verify_limit(self, gamma: int) -> int:
        return gamma if self.max_verify_len is None else min(gamma, self.max_verify_len)

    def _draft_seconds(self, num_reqs: int) -> float:
        return 0.0 if self.draft_cost is None else max(0.0, float(self.draft_cost.seconds(num_reqs)))

    def skip_round(self, slots: torch.Tensor) -> bool:
        """True when drafting does not pay this round and nothing is forced. Without a draft cost:
        the budget K that ``schedule`` would compute from the same lagged survivals is 0, so no
        draft would be verified. With one: the best drafted round (d included) is no faster than
        not drafting. Lossless like ``schedule``: it reads only survivals stored in earlier rounds
        (and earlier timings). A skipped round stores nothing (the ring keeps the older survivals)
        and advances the round."""
        hist = self._history
        if self.probe_every == 0 or self.min_verify_len > 0 or hist is None or slots.numel() == 0:
            return False
        if not self._drafting_loses(slots, hist):
            self._probe_interval, self._skipped_in_a_row = self.probe_every, 0
            return False
        if self._skipped_in_a_row >= self._probe_interval - 1:  # a probe: draft to refresh survivals
            self._skipped_in_a_row = 0
            self._probe_interval = min(2 * self._probe_interval, self.max_probe_every)
            return False
        self._skipped_in_a_row += 1
        self._round += 1
        self.last_budget = 0
        return True

    def _drafting_loses(self, slots: torch.Tensor, hist: torch.Tensor) -> bool:
        """skip_round's test, on the lagged survivals this round would read."""
        index = slots.to(hist.device, torch.int64)
        low, high = (int(v) for v in torch.aminmax(index))
        if low < 0 or high >= hist.shape[1]:
            return False  # a slot never seen: optimistic prior, draft
        limit = self._verify_limit(hist.shape[2])
        if limit == 0:
            return False
        ws = self._workspaces.get(index.numel(), limit, 0, hist.device)
        draft_seconds = self._draft_seconds(index.numel())
        fused = self.fused_cpu and hist.device.type == "cpu" and _fused()
        if fused:
            rates = ws.rates_np if draft_seconds <= 0 else _with_draft_time(ws.rates_np, draft_seconds)
            ring = self._rings_np[self._round % self.lag]
            budget, best = fused.lagged_budget_of_slots(index.numpy(), ring, limit, rates)
            return best <= ws.rates_np[0] * ws.num_reqs if draft_seconds > 0 else budget == 0
        lagged = self._rings[self._round % self.lag].index_select(0, index)[:, :limit]  # [R, limit]
        if draft_seconds > 0:
            _, best = _drafted_budget(lagged, ws.rates, draft_seconds)
            return best <= float(ws.scaled[0])  # R·SPS(R): the round without a draft
        return _lagged_budget_fast(ws, lagged) == 0

    def schedule(self, slots: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        num_reqs, gamma = _check_inputs(slots, confidences)
        device = confidences.device
        if num_reqs == 0:
            return _zeros(0, device)
        if self.fused_cpu and device.type == "cpu" and self.min_verify_len == 0 and self._verify_limit(gamma) > 0:
            fused = _fused()
            if fused:
                return self._schedule_fused(fused, slots, confidences)
        survival = _masked_survival(confidences.detach(), self._below_eps)  # [R, γ]
        if slots.dtype != torch.int64 or slots.device != device:
            slots = slots.to(device=device, dtype=torch.int64)
        lagged = self._exchange(slots, survival)  # [R, γ]

        limit = self._verify_limit(gamma)
        forced = min(self.min_verify_len, limit)
        if limit == 0:
            return _zeros(num_reqs, device)
        ws = self._workspaces.get(num_reqs, limit, forced, device)
        current = survival if limit == gamma else survival[:, :limit]
        if limit < gamma:
            lagged = lagged[:, :limit]

        # Budget from lagged information only, then top-(forced·R + budget) of the current
        # survivals with the forced positions ranked first.
        draft_seconds = self._draft_seconds(num_reqs)
        if forced:
            rates = _with_draft_time(ws.rates, draft_seconds) if draft_seconds > 0 else ws.rates
            budget = lagged_budget(lagged, rates, min_verify_len=forced)
            current = current.clone()
            current[:, :forced] = _FORCED
        elif draft_seconds > 0:
            budget, _ = _drafted_budget(lagged, ws.rates, draft_seconds)
        else:
            budget = _lagged_budget_fast(ws, lagged)
        self.last_budget = budget
        return admit_top(current, budget + forced * num_reqs, ws.offsets)

    def _schedule_fused(self, fused, slots: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        """``schedule`` as one compiled pass (schedule_cpu.lagged_round): CPU tensors, no forced prefix."""
        slots_np, conf = _host_inputs(slots, confidences)  # [R] int64, [R, γ] float32
        num_reqs, gamma = conf.shape
        self._check_gamma(gamma)
        limit = self._verify_limit(gamma)
        ws = self._workspaces.get(num_reqs, limit, 0, confidences.device)
        draft_seconds = self._draft_seconds(num_reqs)
        rates = ws.rates_np if draft_seconds <= 0 else _with_draft_time(ws.rates_np, draft_seconds)
        # Population prior: 2 = set it to this round's mean (first round), 1 = fold the mean in.
        if self.prior != "population":
            prior_mode, prior = 0, _NO_PRIOR
        elif self._prior_mean is None:
            prior_mode, prior = 2, np.empty(gamma, dtype=np.float32)
        else:
            prior_mode, prior = 1, self._prior_mean.numpy()
        out = np.empty(num_reqs, dtype=np.int64)  # (torch.empty(...).numpy() costs ~5 µs)

        def run_round() -> int:  # the budget, or a SLOT_* code with nothing touched
            return fused.lagged_round(conf, slots_np, self._rings_np[self._round % self.lag], limit,
                                      self._below_eps32, rates, prior, prior_mode, self._prior_weight, out)

        if self._history is None:
            self._grow(gamma, max(int(slots_np.max()), 0), confidences.device)
        budget = run_round()
        if budget == fused.SLOT_BEYOND_CAPACITY:
            self._grow(gamma, int(slots_np.max()), confidences.device)
            budget = run_round()
        if budget == fused.SLOT_NEGATIVE:
            raise SchedulerInputError(f"slots: must be >= 0, got {int(slots_np.min())}")
        if prior_mode == 2:
            self._prior_mean = torch.from_numpy(prior)
        self._round += 1
        self.last_budget = int(budget)
        return torch.from_numpy(out)


class FixedLengthScheduler(VerifyScheduler):
    """Verify ``min(verify_len, gamma)`` drafts for every request. Lossless: value-independent."""

    def __init__(self, verify_len: int):
        if not isinstance(verify_len, int) or verify_len < 0:
            raise SchedulerConfigError(f"verify_len must be an int >= 0, got {verify_len!r}")
        self.verify_len = verify_len

    def schedule(self, slots: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        num_reqs, gamma = _check_inputs(slots, confidences)
        return torch.full((num_reqs,), min(self.verify_len, gamma), dtype=torch.int64,
                          device=confidences.device)

    def skip_round(self, slots: torch.Tensor) -> bool:
        return self.verify_len == 0


class VerifyAllScheduler(VerifyScheduler):
    """Verify all gamma drafts (plain chain speculative decoding). Lossless: value-independent."""

    def schedule(self, slots: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        num_reqs, gamma = _check_inputs(slots, confidences)
        return torch.full((num_reqs,), gamma, dtype=torch.int64, device=confidences.device)


class NoSpeculationScheduler(VerifyScheduler):
    """Verify nothing: every round commits only the target's own token. Lossless trivially."""

    def schedule(self, slots: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
        num_reqs, _ = _check_inputs(slots, confidences)
        return _zeros(num_reqs, confidences.device)

    def skip_round(self, slots: torch.Tensor) -> bool:
        return True


SCHEDULER_KINDS: dict[str, type[VerifyScheduler]] = {
    "algorithm1": Algorithm1Scheduler,
    "lagged": LaggedBudgetScheduler,
    "fixed": FixedLengthScheduler,
    "verify_all": VerifyAllScheduler,
    "none": NoSpeculationScheduler,
}
_NEEDS_TABLE = ("algorithm1", "lagged")


def make_scheduler(kind: str, cost_table: Optional[CostTable] = None, **opts) -> VerifyScheduler:
    """Build a lossless scheduler by name: one of ``SCHEDULER_KINDS`` (``-`` and case ignored).

    ``cost_table`` is required by "algorithm1" and "lagged" and ignored by the others; ``opts`` are
    the constructor's keyword options (e.g. ``lag=2``, ``min_verify_len=1``; "fixed" needs
    ``verify_len``). The negative control is deliberately not reachable from here.
    """
    name = str(kind).strip().lower().replace("-", "_")
    cls = SCHEDULER_KINDS.get(name)
    if cls is None:
        raise SchedulerConfigError(
            f"unknown scheduler kind {kind!r}; expected one of {sorted(SCHEDULER_KINDS)}"
        )
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(opts) - set(params) - {"self"})
    if unknown:
        allowed = sorted(p for p in params if p not in ("self", "cost_table"))
        raise SchedulerConfigError(
            f"scheduler {name!r}: unknown option(s) {unknown}; accepted: {allowed}"
        )
    if name in _NEEDS_TABLE:
        if cost_table is None:
            raise SchedulerConfigError(f"scheduler {name!r} needs a cost table")
        return cls(cost_table, **opts)
    if name == "fixed" and "verify_len" not in opts:
        raise SchedulerConfigError("scheduler 'fixed' needs the option verify_len")
    return cls(**opts)
