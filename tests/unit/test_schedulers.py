"""Verify-length schedulers: golden cases, a line-by-line reference of the paper's loop, the
value-independence property behind losslessness, and the Appendix A distribution test (with the
retrospective negative control that must fail it).

Exactness: most random inputs draw confidences from {0, 1/4, 1/2, 3/4, 1} and rates from
multiples of 1/16, so every survival, sum and Θ is exact in float32/float64 and the vectorised
schedulers must match the Python reference bit for bit, ties included (ties are then common,
which is what exercises the tie-breaking).
"""

import copy
import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dspark_sglang.acceptance import chain_accept
from dspark_sglang.cost_table import AdditiveSpsTable, SpsTable
from dspark_sglang.draft_cost import FixedDraftCost
from dspark_sglang.schedulers import (
    SCHEDULER_KINDS,
    Algorithm1Scheduler,
    FixedLengthScheduler,
    LaggedBudgetScheduler,
    NoSpeculationScheduler,
    RetrospectiveAlgorithm1,
    SchedulerConfigError,
    SchedulerInputError,
    VerifyAllScheduler,
    lagged_budget,
    make_scheduler,
    prefix_survival,
)

NAN = float("nan")
EPS = 1e-6


def table(rates, first=1):
    """Step table with one probe per batch-token count first, first+1, ..."""
    tokens = list(range(first, first + len(rates)))
    return SpsTable(tokens, [float(r) for r in rates], tokens[-1])


def slots_for(n):
    return torch.arange(n, dtype=torch.int64)


def run(scheduler, confidences):
    c = torch.tensor(confidences, dtype=torch.float32).reshape(len(confidences), -1)
    return scheduler.schedule(slots_for(c.shape[0]), c).tolist()


# ---------------------------------------------------------------------------------------------
# Python references (the paper's loop, written as literally as possible)


def ref_survival(row):
    out, acc = [], 1.0
    for c in row:
        c = 0.0 if math.isnan(c) else min(max(c, 0.0), 1.0)
        acc *= c
        out.append(acc)
    return out


def ref_sps(tbl, num_reqs, tokens):
    return float(tbl.steps_per_second(num_reqs, tokens))


def ref_algorithm1(conf, tbl, *, use_break=True, eps=EPS):
    """Algorithm 1 (paper p. 8): walk E sorted by (a desc, position asc, request asc)."""
    num_reqs = len(conf)
    surv = [ref_survival(row) for row in conf]
    cands = sorted(
        ((a, k, r) for r in range(num_reqs) for k, a in enumerate(surv[r]) if a >= eps),
        key=lambda e: (-e[0], e[1], e[2]),
    )
    ell, batch, tau = [0] * num_reqs, num_reqs, float(num_reqs)
    best, best_ell = tau * ref_sps(tbl, num_reqs, batch), list(ell)
    for a, k, r in cands:
        ell[r], batch, tau = k + 1, batch + 1, tau + a
        theta = tau * ref_sps(tbl, num_reqs, batch)
        if theta > best:
            best, best_ell = theta, list(ell)
        elif use_break:
            break
    return best_ell


def ref_lagged(lagged_surv, conf, tbl, *, forced=0, eps=EPS):
    """Budget = first argmax of Θ over the lagged survivals; then top-K of the current ones."""
    num_reqs = len(conf)
    base = num_reqs + sum(a for row in lagged_surv for a in row[:forced] if a >= eps)
    free = sorted((a for row in lagged_surv for a in row[forced:] if a >= eps), reverse=True)
    thetas, tau = [base * ref_sps(tbl, num_reqs, num_reqs * (1 + forced))], base
    for i, a in enumerate(free, start=1):
        tau += a
        thetas.append(tau * ref_sps(tbl, num_reqs, num_reqs * (1 + forced) + i))
    budget = thetas.index(max(thetas))
    surv = [ref_survival(row) for row in conf]
    cands = sorted(
        ((a, k, r) for r in range(num_reqs) for k, a in enumerate(surv[r]) if k >= forced and a >= eps),
        key=lambda e: (-e[0], e[1], e[2]),
    )
    ell = [min(forced, len(conf[0]))] * num_reqs
    for a, k, r in cands[:budget]:
        ell[r] = max(ell[r], k + 1)
    return ell, budget


# ---------------------------------------------------------------------------------------------
# Strategies

DYADIC = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


@st.composite
def batches(draw, max_reqs=5, max_gamma=5, nan=False, floats=False):
    num_reqs = draw(st.integers(0, max_reqs))
    gamma = draw(st.integers(1, max_gamma))
    element = st.one_of(DYADIC, st.floats(0, 1, width=32)) if floats else DYADIC
    element = st.one_of(element, st.just(NAN)) if nan else element
    conf = [[draw(element) for _ in range(gamma)] for _ in range(num_reqs)]
    return num_reqs, gamma, conf


@st.composite
def jagged_tables(draw, max_tokens=40):
    rates = draw(st.lists(st.integers(1, 32), min_size=max_tokens, max_size=max_tokens))
    return table([r / 16 for r in rates], first=0)


@st.composite
def cliff_tables(draw, max_tokens=40):
    """Flat, then a cliff: the admitted count lands exactly at knee − R, anywhere in the order
    (inside tie groups too), which is what exposes a wrong tie-break."""
    knee = draw(st.integers(0, max_tokens - 1))
    return table([1.0] * (knee + 1) + [1 / 16] * (max_tokens - knee - 1), first=0)


def step_tables():
    return st.one_of(jagged_tables(), cliff_tables())


def to_tensor(conf, gamma):
    return torch.tensor(conf, dtype=torch.float32).reshape(len(conf), gamma)


# ---------------------------------------------------------------------------------------------
# Golden cases


def test_appendix_a_decisions():
    # SPS(1)=1.0, SPS(2)=0.5, SPS(3)=0.45; a_1 = 0.8; c_2 = 0.9 (x_1 = A) or 0 (x_1 = B).
    # Θ_0 = 1.0, Θ_1 = 1.8·0.5 = 0.9 -> break at once; without break Θ_2 = 2.52·0.45 = 1.134.
    tbl = table([1.0, 0.5, 0.45])
    assert run(Algorithm1Scheduler(tbl), [[0.8, 0.9]]) == [0]
    assert run(Algorithm1Scheduler(tbl), [[0.8, 0.0]]) == [0]
    assert run(RetrospectiveAlgorithm1(tbl), [[0.8, 0.9]]) == [2]
    assert run(RetrospectiveAlgorithm1(tbl), [[0.8, 0.0]]) == [0]


def test_algorithm1_two_requests_hand_computed():
    # Survivals [[0.9, 0.45], [0.6, 0.3]], sorted 0.9 (r0), 0.6 (r1), 0.45 (r0), 0.3 (r1).
    # SPS(2..6) = 1.0, 0.9, 0.8, 0.7, 0.6. Θ_0 = 2, Θ_1 = 2.9·0.9 = 2.61, Θ_2 = 3.5·0.8 = 2.8,
    # Θ_3 = 3.95·0.7 = 2.765 < 2.8 -> break with K = 2: one draft each.
    tbl = table([1.0, 1.0, 0.9, 0.8, 0.7, 0.6])
    conf = [[0.9, 0.5], [0.6, 0.5]]
    assert run(Algorithm1Scheduler(tbl), conf) == [1, 1]
    # Θ_4 = 4.25·0.6 = 2.55: the global argmax is also K = 2.
    assert run(RetrospectiveAlgorithm1(tbl), conf) == [1, 1]


def test_ties_go_to_earlier_position_then_lower_request():
    # All survivals 1: SPS flat at 1 up to 7 tokens, 0.5 beyond. R = 3 -> K = 4 (B = 7), and
    # the 4 admitted are position 1 of requests 0, 1, 2, then position 2 of request 0.
    tbl = table([1.0] * 7 + [0.5] * 5)
    ones = [[1.0, 1.0, 1.0]] * 3
    assert run(Algorithm1Scheduler(tbl), ones) == [2, 1, 1]
    lagged = LaggedBudgetScheduler(tbl, lag=1)
    assert run(lagged, ones) == [2, 1, 1]  # no history: lagged survivals are 1.0 as well
    assert lagged.last_budget == 4
    # R = 2, gamma = 2, K = 2 (B = 4): position 1 of both requests, not both drafts of request 0
    # (position-descending ties would give [2, 0], and make x_1's admission read c_2).
    tbl = table([1.0] * 4 + [0.5] * 2)
    assert run(Algorithm1Scheduler(tbl), [[1.0, 1.0]] * 2) == [1, 1]
    assert run(LaggedBudgetScheduler(tbl), [[1.0, 1.0]] * 2) == [1, 1]


def test_nan_counts_as_zero_and_out_of_range_is_clamped():
    tbl = table([1.0] * 20)  # flat: admit every candidate
    assert run(Algorithm1Scheduler(tbl), [[1.0, NAN, 1.0]]) == [1]
    assert run(Algorithm1Scheduler(tbl), [[1.5, 1.0, -0.5]]) == [2]
    assert run(Algorithm1Scheduler(tbl), [[0.0, 1.0, 1.0]]) == [0]
    torch.testing.assert_close(
        prefix_survival(torch.tensor([[NAN, 1.0], [2.0, 0.5], [float("inf"), -3.0]])),
        torch.tensor([[0.0, 0.0], [1.0, 0.5], [1.0, 0.0]]),
    )


def test_survival_eps_excludes_tiny_survivals():
    tbl = table([1.0] * 20)
    assert run(Algorithm1Scheduler(tbl, survival_eps=0.1), [[0.5, 0.5, 0.3]]) == [2]  # 0.075 < 0.1
    assert run(LaggedBudgetScheduler(tbl, survival_eps=0.1), [[0.5, 0.5, 0.3]]) == [2]


def test_stateless_schedulers():
    conf = torch.rand(3, 4)
    s = slots_for(3)
    assert FixedLengthScheduler(2).schedule(s, conf).tolist() == [2, 2, 2]
    assert FixedLengthScheduler(9).schedule(s, conf).tolist() == [4, 4, 4]
    assert VerifyAllScheduler().schedule(s, conf).tolist() == [4, 4, 4]
    assert NoSpeculationScheduler().schedule(s, conf).tolist() == [0, 0, 0]
    for sched in (FixedLengthScheduler(1), VerifyAllScheduler(), NoSpeculationScheduler()):
        out = sched.schedule(slots_for(0), torch.zeros(0, 4))
        assert out.dtype == torch.int64 and out.shape == (0,)


def test_linear_and_additive_tables_drive_the_schedulers():
    lin = SpsTable([1, 8, 16], [100.0, 100.0, 50.0], 16, interpolation="linear")
    add = AdditiveSpsTable(0.01, [1, 4], [0.0, 0.001], [0, 8, 64], [0.0, 0.0, 0.02])
    conf = torch.full((4, 3), 0.9)
    for tbl in (lin, add):
        for sched in (Algorithm1Scheduler(tbl), LaggedBudgetScheduler(tbl)):
            out = sched.schedule(slots_for(4), conf)
            assert out.dtype == torch.int64 and ((out >= 0) & (out <= 3)).all()


# ---------------------------------------------------------------------------------------------
# Vectorised == reference (exact, dyadic inputs)


@settings(max_examples=150, deadline=None)
@given(batches(nan=True), step_tables())
def test_algorithm1_matches_paper_loop(batch, tbl):
    num_reqs, gamma, conf = batch
    c = to_tensor(conf, gamma)
    assert Algorithm1Scheduler(tbl).schedule(slots_for(num_reqs), c).tolist() == ref_algorithm1(conf, tbl)
    assert (RetrospectiveAlgorithm1(tbl).schedule(slots_for(num_reqs), c).tolist()
            == ref_algorithm1(conf, tbl, use_break=False))


@settings(max_examples=150, deadline=None)
@given(batches(nan=True), st.data(), step_tables(), st.integers(1, 3), st.integers(0, 2))
def test_lagged_matches_reference(batch, data, tbl, lag, forced):
    num_reqs, gamma, conf = batch
    assume(num_reqs > 0)
    sched = LaggedBudgetScheduler(tbl, lag=lag, min_verify_len=forced)
    rounds = [
        [[data.draw(DYADIC) for _ in range(gamma)] for _ in range(num_reqs)] for _ in range(lag)
    ]
    for past in rounds:
        sched.schedule(slots_for(num_reqs), to_tensor(past, gamma))
    lagged = [ref_survival(row) for row in rounds[0]]  # written exactly `lag` rounds ago
    expected, budget = ref_lagged(lagged, conf, tbl, forced=min(forced, gamma))
    assert sched.schedule(slots_for(num_reqs), to_tensor(conf, gamma)).tolist() == expected
    assert sched.last_budget == budget


def test_lagged_budget_function_matches_reference():
    # Survivals 0.9, 0.6, 0.45, 0.3 at SPS(2..6) = 1, 1, 0.9, 0.8, 0.7:
    # Θ = 2, 2.9, 3.15, 3.16, 2.975 -> K = 3 (no break: Θ_2 < Θ_3 is fine).
    tbl = table([1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], first=2)
    lagged = prefix_survival(torch.tensor([[0.9, 0.5], [0.6, 0.5]]))
    rates = torch.as_tensor(tbl.steps_per_second(2, torch.arange(2, 7)), dtype=torch.float64)
    assert lagged_budget(lagged, rates) == ref_lagged(lagged.tolist(), [[0, 0]] * 2, tbl)[1] == 3
    # One forced token per request (0.9 + 0.6): Θ_0 = 3.5·SPS(4) = 3.15, Θ_1 = 3.95·0.8 = 3.16,
    # Θ_2 = 4.25·0.7 = 2.975 -> K = 1.
    rates = torch.as_tensor(tbl.steps_per_second(2, torch.arange(4, 7)), dtype=torch.float64)
    assert lagged_budget(lagged, rates, min_verify_len=1) == 1


# ---------------------------------------------------------------------------------------------
# Value independence: admission of draft k never reads c_{k+1..} of the same request


def perturb_tail(conf, r, j, data):
    """Copy of conf with row r's columns > j redrawn (c_{r,j+2..} read x_{r,j+1})."""
    other = [list(row) for row in conf]
    for k in range(j + 1, len(conf[r])):
        other[r][k] = data.draw(st.one_of(DYADIC, st.floats(0, 1), st.just(NAN)))
    return other


@settings(max_examples=200, deadline=None)
@given(batches(max_reqs=4, floats=True), st.data(), step_tables())
def test_algorithm1_admission_is_value_independent(batch, data, tbl):
    num_reqs, gamma, conf = batch
    assume(num_reqs > 0)
    r = data.draw(st.integers(0, num_reqs - 1))
    j = data.draw(st.integers(0, gamma - 1))  # column j = draft x_{j+1}
    other = perturb_tail(conf, r, j, data)
    sched = Algorithm1Scheduler(tbl)
    a = sched.schedule(slots_for(num_reqs), to_tensor(conf, gamma))[r]
    b = sched.schedule(slots_for(num_reqs), to_tensor(other, gamma))[r]
    assert (a > j) == (b > j)


@settings(max_examples=200, deadline=None)
@given(batches(max_reqs=4, floats=True), st.data(), step_tables(), st.integers(1, 2),
       st.integers(0, 2), st.sampled_from([None, 0.25, 1.0]))
def test_lagged_admission_is_value_independent(batch, data, tbl, lag, forced, draft_s):
    num_reqs, gamma, conf = batch
    assume(num_reqs > 0)
    cost = None if draft_s is None else FixedDraftCost(draft_s)
    sched = LaggedBudgetScheduler(tbl, lag=lag, min_verify_len=forced, draft_cost=cost)
    for _ in range(data.draw(st.integers(0, lag))):  # 0 rounds: no history at all
        past = [[data.draw(DYADIC) for _ in range(gamma)] for _ in range(num_reqs)]
        sched.schedule(slots_for(num_reqs), to_tensor(past, gamma))
    twin = copy.deepcopy(sched)
    r = data.draw(st.integers(0, num_reqs - 1))
    j = data.draw(st.integers(0, gamma - 1))
    other = perturb_tail(conf, r, j, data)
    a = sched.schedule(slots_for(num_reqs), to_tensor(conf, gamma))[r]
    b = twin.schedule(slots_for(num_reqs), to_tensor(other, gamma))[r]
    assert (a > j) == (b > j)


GRID = (0.0, 0.5, 1.0)


SMALL_GRID_TABLES = [table([1.0] * (knee + 1) + [1 / 16] * 6, first=0) for knee in range(2, 7)] + [
    # A dip then a plateau (Appendix A's shape for R = 2): Θ_1 < Θ_0, yet Θ_4 can beat Θ_0.
    table([1.0, 1.0, 1.0, 0.6, 0.6, 0.6, 0.6], first=0),
]


def value_dependences(make):
    """Exhaustive search over R = 2, gamma = 2, c in {0, 1/2, 1}, and tables placing the admitted
    count at every K in 0..4 (cliffs) or rewarding a look past a dip: cases where draft 1's
    admission changes with the same row's column 1 (c_2 reads x_1). ``make(tbl)`` returns a fresh
    scheduler (the lagged one then reads survival 1.0 for its budget: identical for both inputs)."""
    found = []
    for tbl in SMALL_GRID_TABLES:
        for flat in itertools.product(GRID, repeat=4):
            conf = [list(flat[:2]), list(flat[2:])]
            base = make(tbl).schedule(slots_for(2), to_tensor(conf, 2)).tolist()
            for r in range(2):
                for tail in GRID:  # column 1 of row r (read x_{r,1}); column 0 stays
                    other = [list(row) for row in conf]
                    other[r][1] = tail
                    again = make(tbl).schedule(slots_for(2), to_tensor(other, 2)).tolist()
                    if (base[r] > 0) != (again[r] > 0):
                        found.append((tbl.sample_steps_per_sec, conf, other, r))
    return found


@pytest.mark.parametrize("make", [Algorithm1Scheduler, LaggedBudgetScheduler,
                                  lambda tbl: LaggedBudgetScheduler(tbl, lag=1, min_verify_len=1),
                                  lambda tbl: LaggedBudgetScheduler(tbl, draft_cost=FixedDraftCost(0.5))])
def test_value_independence_exhaustive_small_grid(make):
    assert value_dependences(make) == []


def test_value_independence_exhaustive_finds_the_retrospective_bias():
    assert value_dependences(RetrospectiveAlgorithm1)


def test_retrospective_violates_value_independence():
    # Appendix A: draft x_1's admission flips with c_2, which reads x_1.
    tbl = table([1.0, 0.5, 0.45])
    retro = RetrospectiveAlgorithm1(tbl)
    assert retro.lossless is False
    assert run(retro, [[0.8, 0.9]])[0] > 0
    assert run(retro, [[0.8, 0.0]])[0] == 0


# ---------------------------------------------------------------------------------------------
# Output distribution (Appendix A): with-break / lagged give p_t, the retrospective does not

P_TARGET = torch.tensor([0.7, 0.3])
P_DRAFT = torch.tensor([0.5, 0.5])
A1 = 0.8  # Σ min(p_t, p_d)
TRIALS = 200_000
TOL = 0.006  # ~5 standard errors of a frequency near 0.7 at 2e5 trials


def c2_given_x1(x1):  # the second confidence reads x_1: A -> 0.9, B -> 0
    return torch.where(x1 == 0, 0.9, 0.0)


def first_token_frequencies(decide, seed=0):
    """Simulate TRIALS independent rounds of R=1, gamma=2 with chain acceptance (the project's
    acceptance.chain_accept); ``decide(conf_row, trial_key) -> verify_len`` runs the scheduler on
    one round. Returns the frequencies of the first committed token."""
    gen = torch.Generator().manual_seed(seed)
    x1 = (torch.rand(TRIALS, generator=gen) >= P_DRAFT[0]).long()  # x_1 ~ p_d
    x2 = (torch.rand(TRIALS, generator=gen) >= P_DRAFT[0]).long()
    keys = torch.randint(0, 3, (TRIALS,), generator=gen)  # per-trial history choice (lagged)
    conf = torch.stack([torch.full((TRIALS,), A1), c2_given_x1(x1)], dim=1)  # [N, 2]
    # The scheduler is a deterministic function of (history, confidences): run it once per
    # distinct input and broadcast.
    verify = torch.empty(TRIALS, dtype=torch.int64)
    rows = torch.cat([conf, keys[:, None].float()], dim=1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    for i, row in enumerate(distinct):
        verify[inverse == i] = decide(row[:2].clone(), int(row[2]))
    res = chain_accept(
        target_probs=P_TARGET.expand(TRIALS, 3, 2).contiguous(),
        draft_tokens=torch.stack([x1, x2], dim=1),
        draft_probs=P_DRAFT.expand(TRIALS, 2, 2).contiguous(),
        verify_lens=verify,
        greedy=torch.zeros(TRIALS, dtype=torch.bool),
        accept_uniforms=torch.rand(TRIALS, 2, generator=gen),
        sample_uniforms=torch.rand(TRIALS, generator=gen),
    )
    first = res.output_tokens[:, 0]
    return torch.bincount(first, minlength=2).double() / TRIALS, verify


def is_target_distribution(freq):
    return bool((freq - P_TARGET.double()).abs().max() < TOL)


def stateless(sched):
    return lambda row, _key: int(sched.schedule(slots_for(1), row[None, :])[0])


@pytest.mark.parametrize("sps2", [0.5, 0.6])  # 0.6: Θ_1 = 1.08 > 1, so x_1 is admitted
def test_appendix_a_algorithm1_is_lossless(sps2):
    freq, verify = first_token_frequencies(stateless(Algorithm1Scheduler(table([1.0, sps2, 0.45]))))
    assert is_target_distribution(freq), freq
    assert bool((verify > 0).any()) == (sps2 == 0.6)


def test_appendix_a_retrospective_is_biased():
    freq, _ = first_token_frequencies(stateless(RetrospectiveAlgorithm1(table([1.0, 0.5, 0.45]))))
    # P(A) = 0.5 + 0.5·0.7 = 0.85: fails the very check the lossless schedulers pass.
    assert abs(float(freq[0]) - 0.85) < TOL
    assert not is_target_distribution(freq)


HISTORIES = ([0.9, 0.9], [0.3, 0.0], [0.8, 0.5])  # budgets 2, 0, 1 under SPS(1..3)=1, 0.6, 0.45


def lagged_decider(cheat, sps2=0.6):
    tbl = table([1.0, sps2, 0.45])

    def decide(row, key):
        sched = LaggedBudgetScheduler(tbl, lag=1)
        # Honest: the previous round's confidences; cheat ("lag 0"): this round's own.
        past = row if cheat else torch.tensor(HISTORIES[key])
        sched.schedule(slots_for(1), past[None, :])
        return int(sched.schedule(slots_for(1), row[None, :])[0])

    return decide


@pytest.mark.parametrize("sps2", [0.5, 0.6])
def test_lagged_scheduler_is_lossless(sps2):
    freq, verify = first_token_frequencies(lagged_decider(cheat=False, sps2=sps2))
    assert is_target_distribution(freq), freq
    if sps2 == 0.6:
        assert set(verify.unique().tolist()) == {0, 1, 2}  # the budget varies with history


def test_budget_from_current_confidences_is_biased():
    # "lag 0": with SPS(2) = 0.5 the budget is 2 when c_2 = 0.9 (x_1 = A) and 0 when c_2 = 0,
    # exactly the retrospective search: P(A) = 0.85.
    freq, _ = first_token_frequencies(lagged_decider(cheat=True, sps2=0.5))
    assert abs(float(freq[0]) - 0.85) < TOL
    assert not is_target_distribution(freq), freq


def lagged_cost_decider(cheat, draft_s=0.25, sps2=0.6):
    """The lagged scheduler with a draft cost, skip_round included (a skipped round verifies 0)."""
    tbl = table([1.0, sps2, 0.45])

    def decide(row, key):
        sched = LaggedBudgetScheduler(tbl, lag=1, draft_cost=FixedDraftCost(draft_s))
        past = row if cheat else torch.tensor(HISTORIES[key])
        sched.schedule(slots_for(1), past[None, :])
        if sched.skip_round(slots_for(1)):
            return 0
        return int(sched.schedule(slots_for(1), row[None, :])[0])

    return decide


def test_lagged_scheduler_with_draft_cost_is_lossless():
    # d = 0.25 s on SPS(1..3) = 1, 0.6, 0.45 (drafted rates 0.8, 0.522, 0.404): history
    # [0.9, 0.9] drafts (best Θ 1.10 beats 1.0 without a draft; verify 2, or 1 when c_2 = 0);
    # [0.3, 0] and [0.8, 0.5] skip drafting (best Θ 0.80, 0.94), though without a draft cost
    # [0.8, 0.5] verifies 1 draft (Θ_1 = 1.08).
    freq, verify = first_token_frequencies(lagged_cost_decider(cheat=False))
    assert is_target_distribution(freq), freq
    assert set(verify.unique().tolist()) == {0, 1, 2}
    _, verify_free = first_token_frequencies(lagged_decider(cheat=False, sps2=0.6))
    assert (verify == 0).sum() > (verify_free == 0).sum() * 1.5  # the draft cost did skip rounds


def test_skip_decided_from_current_confidences_is_biased():
    # Negative control: the same skip rule fed this round's confidences skips exactly when x_1 = B
    # (c_2 = 0: best Θ 0.99 < 1), so x_1 is verified only when it is A: P(A) = 0.85.
    freq, _ = first_token_frequencies(lagged_cost_decider(cheat=True))
    assert abs(float(freq[0]) - 0.85) < TOL
    assert not is_target_distribution(freq), freq


def test_draft_cost_changes_budget_and_skip():
    # SPS(1..3) = 1, 0.7, 0.55; lagged survival [0.5, 0.25] for the lone request.
    # No draft cost: Θ = 1, 1.05, 0.9625 -> budget 1, draft.
    # d = 0.2 s: rates/(1 + d·rates) = 0.833, 0.614, 0.495 -> Θ = 0.833, 0.921, 0.867: the best
    #   drafted round (0.921 tok/s) loses to not drafting (1.0): skip.
    # d = 1 s: 0.5, 0.412, 0.355 -> Θ = 0.5, 0.618, 0.621: budget 2 (the draft step is amortised
    #   over more tokens) but still below 1.0: skip.
    tbl = table([1.0, 0.7, 0.55])
    history, s = torch.tensor([[0.5, 0.5]]), slots_for(1)
    for draft_s, budget, skip in ((None, 1, False), (0.2, 1, True), (1.0, 2, True)):
        sched = LaggedBudgetScheduler(tbl, lag=1, draft_cost=None if draft_s is None else FixedDraftCost(draft_s))
        sched.schedule(s, history)
        assert sched.skip_round(s) == skip
        probe = LaggedBudgetScheduler(tbl, lag=1, draft_cost=sched.draft_cost)
        probe.schedule(s, history)
        probe.schedule(s, torch.ones(1, 2))  # a round that drafted anyway (a probe)
        assert probe.last_budget == budget
    with pytest.raises(SchedulerConfigError, match="draft_cost"):
        LaggedBudgetScheduler(tbl, draft_cost=0.1)


def test_draft_cost_skips_where_budget_alone_would_not():
    # A table where drafts with survival 0.3 pay when drafting is free (2% slower per token): the
    # scheduler without a draft cost never skips (negative control); with a draft step of two
    # target steps (0.2 s at 10 steps/s) it skips most rounds (measured 55 of 90; the others are
    # probes and rounds with slots never drafted before, which read the optimistic 1.0).
    gentle = table([10.0 / (1 + 0.02 * i) for i in range(40)])
    for draft_cost, expected in ((None, 0), (FixedDraftCost(0.2), 45)):
        skipped = sum(_skip_or_schedule(LaggedBudgetScheduler(gentle, lag=2, probe_every=4,
                                                              draft_cost=draft_cost), seed)
                      for seed in range(3))
        assert skipped >= expected if expected else skipped == 0


def _skip_or_schedule(scheduler, seed, rounds=30):
    gen = torch.Generator().manual_seed(seed)
    skipped = 0
    for _ in range(rounds):
        slots = torch.randperm(8, generator=gen)[:4]
        if scheduler.skip_round(slots):
            skipped += 1
        else:
            scheduler.schedule(slots, torch.full((4, 4), 0.3))
    return skipped


def test_population_prior_for_released_and_new_slots():
    tbl = table([1.0, 0.6, 0.45])
    s, low, high = slots_for(1), torch.tensor([[0.3, 0.0]]), torch.tensor([[0.9, 0.9]])
    for prior, budget in (("optimistic", 2), ("population", 0)):
        sched = LaggedBudgetScheduler(tbl, lag=1, prior=prior)
        sched.schedule(s, low)
        sched.schedule(s, high)
        sched.release(s)
        sched.schedule(s, high)
        # optimistic: 1.0 -> Θ = 1, 1.2, 1.35 -> 2. population: mean survival 0.9·[0.3, 0] +
        # 0.1·[0.9, 0.81] = [0.36, 0.081] -> Θ = 1, 0.816, 0.648 -> 0.
        assert sched.last_budget == budget, prior
    expected = torch.tensor([0.36, 0.081])
    assert torch.allclose(sched._prior_mean, 0.9 * expected + 0.1 * torch.tensor([0.9, 0.81]))
    before = sched._prior_mean.clone()
    sched.schedule(torch.tensor([300]), high)  # a slot beyond the capacity: grown rows read the prior
    assert torch.equal(sched._history[0, 299], before)
    with pytest.raises(SchedulerConfigError, match="prior"):
        LaggedBudgetScheduler(tbl, prior="pessimistic")
    with pytest.raises(SchedulerConfigError, match="prior_decay"):
        LaggedBudgetScheduler(tbl, prior_decay=1.0)


# ---------------------------------------------------------------------------------------------
# Lagged scheduler state


def test_lagged_reads_history_exactly_lag_rounds_back():
    tbl = table([1.0, 0.6, 0.45])
    sched = LaggedBudgetScheduler(tbl, lag=2, prior="optimistic")
    s = slots_for(1)
    high, low = torch.tensor([[0.9, 0.9]]), torch.tensor([[0.3, 0.0]])
    sched.schedule(s, low)
    assert sched.last_budget == 2  # no history: survival 1.0 -> Θ = (1+i)·SPS: 1, 1.2, 1.35
    sched.schedule(s, high)
    assert sched.last_budget == 2  # still no history for round 1
    sched.schedule(s, high)
    assert sched.last_budget == 0  # round 0's `low`
    sched.schedule(s, high)
    assert sched.last_budget == 2  # round 1's `high`
    sched.release(s)
    sched.schedule(s, low)
    sched.schedule(s, low)
    assert sched.last_budget == 2  # released: back to survival 1.0


def test_lagged_grows_slot_capacity_and_keeps_history():
    tbl = table([1.0] * 40)
    sched = LaggedBudgetScheduler(tbl, lag=1, initial_slots=2)
    sched.schedule(torch.tensor([0, 1]), torch.full((2, 2), 0.5))
    out = sched.schedule(torch.tensor([1, 9]), torch.full((2, 2), 0.5))
    assert out.tolist() == [2, 2]
    assert sched._history.shape[1] >= 10


def test_lagged_rejects_bad_slots_and_gamma_change():
    sched = LaggedBudgetScheduler(table([1.0] * 10), lag=1)
    with pytest.raises(SchedulerInputError, match="slots"):
        sched.schedule(torch.tensor([-1]), torch.ones(1, 2))
    sched.schedule(torch.tensor([0]), torch.ones(1, 2))
    with pytest.raises(SchedulerInputError, match="slots"):
        sched.schedule(torch.tensor([-3]), torch.ones(1, 2))
    with pytest.raises(SchedulerInputError, match="gamma changed"):
        sched.schedule(torch.tensor([0]), torch.ones(1, 3))
    sched.reset()
    assert sched.schedule(torch.tensor([0]), torch.ones(1, 3)).tolist() == [3]


def test_min_and_max_verify_len():
    tbl = table([1.0, 0.1, 0.1, 0.1, 0.1, 0.1])  # any extra token loses
    zeros = torch.zeros(2, 4)
    assert LaggedBudgetScheduler(tbl, min_verify_len=2).schedule(slots_for(2), zeros).tolist() == [2, 2]
    flat = table([1.0] * 20)
    ones = torch.ones(2, 4)
    assert LaggedBudgetScheduler(flat, max_verify_len=3).schedule(slots_for(2), ones).tolist() == [3, 3]
    assert Algorithm1Scheduler(flat, max_verify_len=1).schedule(slots_for(2), ones).tolist() == [1, 1]
    assert Algorithm1Scheduler(flat, max_verify_len=0).schedule(slots_for(2), ones).tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, input errors, factory


@settings(max_examples=60, deadline=None)
@given(batches(max_reqs=6, max_gamma=8, nan=True), step_tables())
def test_outputs_are_bounded_int64_prefix_counts(batch, tbl):
    num_reqs, gamma, conf = batch
    c = to_tensor(conf, gamma)
    for sched in (Algorithm1Scheduler(tbl), LaggedBudgetScheduler(tbl), RetrospectiveAlgorithm1(tbl)):
        out = sched.schedule(slots_for(num_reqs), c)
        assert out.dtype == torch.int64 and out.shape == (num_reqs,)
        assert bool(((out >= 0) & (out <= gamma)).all())


@pytest.mark.parametrize("slots,conf,match", [
    (torch.zeros(2, dtype=torch.int64), torch.zeros(2), "confidences"),
    (torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64), "float"),
    (torch.zeros(3, dtype=torch.int64), torch.zeros(2, 3), "slots"),
    (torch.zeros(2), torch.zeros(2, 3), "integer"),
    (torch.zeros(2, dtype=torch.int64), torch.zeros(2, 0), "gamma"),
])
def test_input_validation(slots, conf, match):
    for sched in (Algorithm1Scheduler(table([1.0])), LaggedBudgetScheduler(table([1.0])),
                  VerifyAllScheduler()):
        with pytest.raises(SchedulerInputError, match=match):
            sched.schedule(slots, conf)


def test_make_scheduler():
    tbl = table([1.0, 0.5])
    assert isinstance(make_scheduler("algorithm1", tbl), Algorithm1Scheduler)
    lagged = make_scheduler("Lagged", tbl, lag=3, min_verify_len=1)
    assert isinstance(lagged, LaggedBudgetScheduler) and lagged.lag == 3
    assert isinstance(make_scheduler("verify-all"), VerifyAllScheduler)
    assert isinstance(make_scheduler("none", tbl), NoSpeculationScheduler)
    assert make_scheduler("fixed", verify_len=3).verify_len == 3
    assert set(SCHEDULER_KINDS) == {"algorithm1", "lagged", "fixed", "verify_all", "none"}


@pytest.mark.parametrize("kind,table_arg,opts,match", [
    ("retrospective", True, {}, "unknown scheduler kind"),
    ("magic", True, {}, "unknown scheduler kind"),
    ("lagged", False, {}, "needs a cost table"),
    ("algorithm1", False, {}, "needs a cost table"),
    ("lagged", True, {"lags": 2}, "unknown option"),
    ("lagged", True, {"lag": 0}, "lag must be"),
    ("fixed", False, {}, "verify_len"),
    ("algorithm1", True, {"survival_eps": 0.0}, "survival_eps"),
])
def test_make_scheduler_errors(kind, table_arg, opts, match):
    with pytest.raises(SchedulerConfigError, match=match):
        make_scheduler(kind, table([1.0]) if table_arg else None, **opts)


def test_cost_table_with_non_positive_rate_is_refused_at_use():
    class Broken:
        def steps_per_second(self, num_reqs, batch_tokens):
            return torch.zeros(batch_tokens.shape, dtype=torch.float64)

    with pytest.raises(SchedulerConfigError, match="non-positive"):
        Algorithm1Scheduler(Broken()).schedule(slots_for(1), torch.ones(1, 2))


# ---------------------------------------------------------------------------------------------
# skip_round: the worker drafts nothing when the budget is already known to be 0


def _skip_check_run(scheduler, rounds=60, seed=0):
    """Drive `scheduler` through `rounds` rounds of random batches. On every round it skips, a copy
    taken just before the skip must verify nothing for ANY confidences (here: random ones and the
    best case, all ones). Returns (skipped rounds, rounds that verified at least one draft)."""
    gen = torch.Generator().manual_seed(seed)
    skipped = verified = 0
    for _ in range(rounds):
        num = int(torch.randint(1, 6, (1,), generator=gen))
        slots = torch.randperm(8, generator=gen)[:num]
        high = torch.rand(num, 1, generator=gen) < 0.3  # some requests draft well, most do not
        conf = torch.where(high, torch.full((num, 4), 0.95), torch.full((num, 4), 0.05))
        before = copy.deepcopy(scheduler)
        if scheduler.skip_round(slots):
            skipped += 1
            for trial in (conf, torch.rand(num, 4, generator=gen), torch.ones(num, 4)):
                assert int(copy.deepcopy(before).schedule(slots, trial).sum()) == 0
        else:
            verified += int(scheduler.schedule(slots, conf).sum() > 0)
    return skipped, verified


# Drafts pay only when they are very likely accepted: throughput falls 30% per extra batch token.
STEEP = table([10.0 / (1 + 0.3 * i) for i in range(40)])


def test_lagged_skips_only_rounds_that_would_verify_nothing():
    skipped, verified = _skip_check_run(LaggedBudgetScheduler(STEEP, lag=2, probe_every=4))
    assert skipped >= 10 and verified >= 5  # both paths taken: the check above discriminates


def test_skip_check_catches_a_scheduler_that_skips_too_often():
    # Negative control: skipping whenever the lagged budget is small but not zero must be caught.
    sched = LaggedBudgetScheduler(STEEP, lag=2, probe_every=4)
    def skip_small_budgets(slots):
        return (sched._history is not None and int(slots.max()) < sched._history.shape[1]
                and sched.last_budget <= 2 and sched._round % 4 != 0)

    sched.skip_round = skip_small_budgets
    with pytest.raises(AssertionError):
        _skip_check_run(sched)


def test_lagged_probes_and_options():
    never = table([10.0 / (1 + 5.0 * i) for i in range(40)])  # no draft ever pays
    sched = LaggedBudgetScheduler(never, lag=1, probe_every=4, max_probe_every=4)
    slots, conf = slots_for(3), torch.full((3, 4), 0.9)
    assert not sched.skip_round(slots)  # no history yet: optimistic prior, draft
    decisions = []
    for _ in range(12):
        skip = sched.skip_round(slots)
        decisions.append(skip)
        if not skip:
            assert sched.schedule(slots, conf).tolist() == [0, 0, 0]
    assert decisions.count(False) == 3 and decisions.count(True) == 9  # one probe every 4 rounds
    assert not sched.skip_round(slots_for(5))  # an unseen slot reads the optimistic prior
    assert not LaggedBudgetScheduler(never, probe_every=0).skip_round(slots)
    forced = LaggedBudgetScheduler(never, lag=1, min_verify_len=1)
    forced.schedule(slots, conf)
    assert not forced.skip_round(slots)  # a forced draft is verified every round
    with pytest.raises(SchedulerConfigError, match="probe_every"):
        LaggedBudgetScheduler(never, probe_every=-1)
    with pytest.raises(SchedulerConfigError, match="max_probe_every"):
        LaggedBudgetScheduler(never, probe_every=8, max_probe_every=4)


def test_probes_back_off_while_drafting_keeps_not_paying():
    never = table([10.0 / (1 + 5.0 * i) for i in range(40)])  # no draft ever pays
    sched = LaggedBudgetScheduler(never, lag=1, probe_every=4, max_probe_every=16)
    slots, poor, good = slots_for(2), torch.full((2, 4), 0.9), torch.ones(2, 4)
    sched.schedule(slots, poor)
    probes = []
    for i in range(60):
        if not sched.skip_round(slots):
            probes.append(i)
            sched.schedule(slots, poor)
    # Skipped runs of 3, 7, 15, 15, ... rounds between probes.
    assert probes == [3, 11, 27, 43, 59]
    # Drafting that pays resets the backoff: a flat table, where any survival pays.
    flat = LaggedBudgetScheduler(table([10.0] * 40), lag=1, probe_every=4, max_probe_every=16)
    flat.schedule(slots, good)
    assert not any(flat.skip_round(slots) for _ in range(5))
    assert flat._probe_interval == 4


def test_stateless_skip_round():
    s = slots_for(2)
    assert NoSpeculationScheduler().skip_round(s) and FixedLengthScheduler(0).skip_round(s)
    assert not FixedLengthScheduler(2).skip_round(s) and not VerifyAllScheduler().skip_round(s)
