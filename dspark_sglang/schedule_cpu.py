"""Fused CPU path of the table schedulers: a round in two compiled passes and one sort (numba).

Why: a CPU torch op costs ~5 µs on the machines we serve and test on, and a lagged round is ~25 of
them (survival, the history exchange, the population prior, sort, cumsum, Θ, argmax, top-K), about
260 µs at 256 requests. Here the same arithmetic runs in two compiled passes (numba) around one
numpy sort (numpy's SIMD sort is several times faster than a compiled quicksort).
``schedulers.py`` keeps the torch form: it is the reference, and the path for accelerator tensors
(and for the options this path does not cover: a forced ``min_verify_len`` prefix, the negative
control). tests/unit/test_schedule_cpu.py checks that both give the same verify lengths and
budgets, round after round.

Same numbers as the torch path, by construction:
- survival: cumulative product with a float64 accumulator rounded to float32 per position (what
  torch's CPU cumprod does for float32), NaN -> 0, clamp to [0, 1], -inf below ``survival_eps``;
- Θ_i = (R + S_i) · rate_i with S_i the float64 running sum of the sorted survivals, first maximum
  on ties (``torch.argmax``); Algorithm 1 stops at the first Θ_i that does not improve;
- top-K: the int64 rank keys ``float32_bits(survival) << 32 | (N − 1 − (k·R + r))`` of
  ``schedulers.admit_top``, threshold = the K-th largest key;
- population prior: float64 sum over requests / R, rounded to float32, then p + w·(observed − p) in
  float32 (not ``torch.lerp``, whose compiled form may fuse a multiply-add).

Compiled on first use (``cache=True``: later processes load the machine code from numba's cache);
``warm_up()`` compiles ahead of serving.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["SLOT_NEGATIVE", "SLOT_BEYOND_CAPACITY", "survival_into", "lagged_round", "lagged_budget_of_slots",
           "algorithm1_round", "warm_up"]

# Return codes of lagged_round / lagged_budget_of_slots when a slot is outside the history:
# nothing was read or written, the caller grows the history (or raises) and calls again.
SLOT_NEGATIVE = -1
SLOT_BEYOND_CAPACITY = -2


@njit(cache=True, nogil=True)
def survival_into(conf, below_eps, out):
    """out[r, k] = Π_{i≤k} clamp(c[r, i], 0, 1) (NaN -> 0), or -inf where that is <= below_eps."""
    # conf: [R, G] float32 confidences; out: [R, G] float32
    num_reqs, gamma = conf.shape
    for r in range(num_reqs):
        acc = 1.0  # float64, as torch's CPU cumprod accumulates float32 in double
        for k in range(gamma):
            c = np.float64(conf[r, k])
            if not (c > 0.0):  # NaN and negatives
                c = 0.0
            elif c > 1.0:
                c = 1.0
            acc *= c
            value = np.float32(acc)
            out[r, k] = value if value > below_eps else -np.inf


@njit(cache=True, nogil=True)
def _best_budget(values, num_reqs, rates):
    """argmax_i Θ_i = (R + S_i)·rates[i] over i = 0..N (first maximum), S_i the sum of the i largest
    values, and that Θ."""
    # values: [N] float32 (> 0 or -inf) sorted ascending; rates: [N+1] float64
    n = values.shape[0]
    base = np.float64(num_reqs)
    best_i, best = 0, base * rates[0]
    total = 0.0
    for i in range(1, n + 1):
        total += np.float64(values[n - i])  # the i-th largest
        if total == -np.inf:
            break  # every later Θ is -inf
        theta = (total + base) * rates[i]
        if theta > best:
            best_i, best = i, theta
    return best_i, best


@njit(cache=True, nogil=True)
def _admit_top(survival, limit, count, out):
    """out[r] = how many of row r's first ``limit`` survivals are among the ``count`` highest ranked
    (survival desc, position asc, request asc); -inf (non-candidates) never."""
    # survival: [R, G] float32; out: [R] int64
    num_reqs = survival.shape[0]
    total = num_reqs * limit
    out[:] = 0
    if count <= 0 or total == 0:
        return
    keys = np.empty(total, dtype=np.int64)
    bits = survival.view(np.int32)
    for r in range(num_reqs):
        for k in range(limit):
            keys[r * limit + k] = (np.int64(bits[r, k]) << 32) + (total - 1 - (k * num_reqs + r))
    threshold = np.int64(0)
    if count < total:
        threshold = max(np.partition(keys, total - count)[total - count], np.int64(0))
    for r in range(num_reqs):
        admitted = 0
        for k in range(limit):
            if keys[r * limit + k] >= threshold:  # np.partition sorted a copy
                admitted += 1
        out[r] = admitted


@njit(cache=True, nogil=True)
def _budget_then_admit(lagged_sorted, survival, limit, rates, out):
    budget, _ = _best_budget(lagged_sorted, survival.shape[0], rates)
    _admit_top(survival, limit, budget, out)
    return budget


@njit(cache=True, nogil=True)
def _gather(slots, ring, limit, lagged):
    """lagged[r·limit + k] = ring[slots[r], k]; or a SLOT_* code, having read nothing."""
    capacity = ring.shape[0]
    for r in range(slots.shape[0]):
        if slots[r] < 0:
            return SLOT_NEGATIVE
        if slots[r] >= capacity:
            return SLOT_BEYOND_CAPACITY
    for r in range(slots.shape[0]):
        for k in range(limit):
            lagged[r * limit + k] = ring[slots[r], k]
    return 0


@njit(cache=True, nogil=True)
def _exchange(conf, slots, ring, limit, below_eps, prior, prior_mode, prior_weight, survival, lagged):
    """survival <- this round's survivals; lagged <- the slots' ring rows (first ``limit``), then the
    ring rows <- survival; the population prior folds in this round's mean. A SLOT_* code, having
    touched nothing, for a slot outside the ring."""
    code = _gather(slots, ring, limit, lagged)  # every slot read before any is written (duplicates)
    if code != 0:
        return code
    num_reqs, gamma = conf.shape
    survival_into(conf, below_eps, survival)
    for r in range(num_reqs):
        for k in range(gamma):
            ring[slots[r], k] = survival[r, k]
    if prior_mode != 0:
        for k in range(gamma):
            total = 0.0
            for r in range(num_reqs):
                if survival[r, k] > 0.0:
                    total += np.float64(survival[r, k])
            observed = np.float32(total / num_reqs)
            if prior_mode == 2:
                prior[k] = observed
            else:  # float32, each operation rounded on its own (as the torch path's three ops)
                prior[k] = prior[k] + prior_weight * (observed - prior[k])
    return 0


def lagged_round(conf, slots, ring, limit, below_eps, rates, prior, prior_mode, prior_weight, out) -> int:
    """One ``LaggedBudgetScheduler`` round without a forced prefix; returns the budget K (or a
    SLOT_* code, having touched nothing).

    conf [R, G] float32; slots [R] int64; ring [capacity, G] float32, this round's entry of the
    history (read, then overwritten with the current survivals); rates [R·limit + 1] float64 rounds/s
    for R + i batch tokens (draft time already folded in, if any); prior [G] float32 running mean,
    updated in place when prior_mode = 1, overwritten when 2, untouched when 0; out [R] int64.
    """
    survival = np.empty(conf.shape, dtype=np.float32)
    lagged = np.empty(conf.shape[0] * limit, dtype=np.float32)
    code = _exchange(conf, slots, ring, limit, below_eps, prior, prior_mode, prior_weight, survival, lagged)
    if code != 0:
        return code
    lagged.sort()  # numpy's SIMD sort: several times faster than a compiled quicksort here
    return _budget_then_admit(lagged, survival, limit, rates, out)


def lagged_budget_of_slots(slots, ring, limit, rates) -> tuple[int, float]:
    """(K, Θ_K) that ``lagged_round`` would compute from this ring entry, without touching it
    (``skip_round``'s test); (SLOT_* code, 0.0) for a slot outside the history."""
    lagged = np.empty(slots.shape[0] * limit, dtype=np.float32)
    code = _gather(slots, ring, limit, lagged)
    if code != 0:
        return code, 0.0
    lagged.sort()
    return _best_budget(lagged, slots.shape[0], rates)


@njit(cache=True, nogil=True)
def _first_non_improving(values, num_reqs, rates):
    """The paper's break: the length of the leading run of Θ_i > Θ_{i−1}."""
    # values: [N] float32 sorted ascending; rates: [N+1] float64
    n = values.shape[0]
    base = np.float64(num_reqs)
    previous, total = base * rates[0], 0.0
    for i in range(1, n + 1):
        total += np.float64(values[n - i])
        theta = (total + base) * rates[i]
        if not (theta > previous):
            return i - 1
        previous = theta
    return n


@njit(cache=True, nogil=True)
def _survival_values(conf, limit, below_eps, survival, values):
    survival_into(conf, below_eps, survival)
    for r in range(conf.shape[0]):
        for k in range(limit):
            values[r * limit + k] = survival[r, k]


@njit(cache=True, nogil=True)
def _algorithm1_admit(values_sorted, survival, limit, rates, out):
    count = _first_non_improving(values_sorted, survival.shape[0], rates)
    _admit_top(survival, limit, count, out)
    return count


def algorithm1_round(conf, limit, below_eps, rates, out) -> int:
    """One ``Algorithm1Scheduler`` call: admit the top K, K = the leading run of improving Θ_i
    (the paper's break); returns K. conf [R, G] float32; rates [R·limit + 1] float64; out [R] int64."""
    survival = np.empty(conf.shape, dtype=np.float32)
    values = np.empty(conf.shape[0] * limit, dtype=np.float32)
    _survival_values(conf, limit, below_eps, survival, values)
    values.sort()
    return _algorithm1_admit(values, survival, limit, rates, out)


def warm_up() -> None:
    """Compile (or load from numba's cache) every entry point, on a tiny input."""
    conf = np.full((2, 3), 0.5, dtype=np.float32)
    rates = np.ones(2 * 3 + 1, dtype=np.float64)
    out = np.empty(2, dtype=np.int64)
    ring = np.ones((4, 3), dtype=np.float32)
    slots = np.arange(2, dtype=np.int64)
    prior = np.ones(3, dtype=np.float32)
    lagged_round(conf, slots, ring, 3, np.float32(1e-7), rates, prior, 1, np.float32(0.1), out)
    lagged_budget_of_slots(slots, ring, 3, rates)
    algorithm1_round(conf, 3, np.float32(1e-7), rates, out)
