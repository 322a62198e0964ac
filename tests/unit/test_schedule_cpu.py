"""The fused CPU path of the table schedulers (dspark_sglang/schedule_cpu.py, numba) against their
torch code (schedulers.py, the reference and the accelerator path): the same verify lengths and
budgets on arbitrary inputs, round after round with slot churn, releases, skipped rounds, history
growth and a draft cost; the same errors; and proof that the fused path does not fall back on
the torch code it is compared with.

Inputs here are continuous (not the dyadic values of test_schedulers.py): both paths round the
same operations in the same order, so they must agree bit for bit, not approximately.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_sglang import schedule_cpu, schedulers
from dspark_sglang.cost_table import AdditiveSpsTable, SpsTable
from dspark_sglang.draft_cost import FixedDraftCost
from dspark_sglang.schedulers import Algorithm1Scheduler, LaggedBudgetScheduler, SchedulerInputError

NAN, INF = float("nan"), float("inf")

# Mostly ordinary confidences, some degenerate ones (NaN -> 0, out of range -> clamped, tiny ->
# below survival_eps), and exact ties.
CONFIDENCE = st.one_of(
    st.floats(0.0, 1.0, width=32),
    st.floats(0.0, 1.0, width=32),
    st.sampled_from([NAN, INF, -INF, -0.5, 1.5, 0.0, 1.0, 0.5, 1e-4, 1e-7]),
)


@st.composite
def tables(draw, max_tokens=80):
    """A step SPS table with jagged rates, or an additive one (falling rate)."""
    if draw(st.booleans()):
        rates = draw(st.lists(st.floats(0.05, 50.0), min_size=max_tokens, max_size=max_tokens))
        tokens = list(range(1, max_tokens + 1))
        return SpsTable(tokens, rates, tokens[-1])
    bias = draw(st.floats(1e-3, 0.1))
    per_token = draw(st.floats(0.0, 0.01))
    return AdditiveSpsTable(bias, [1, 64], [0.0, draw(st.floats(0.0, 0.05))], [1, 1001], [0.0, 1000 * per_token])


def confidences(draw, num_reqs, gamma):
    rows = [[draw(CONFIDENCE) for _ in range(gamma)] for _ in range(num_reqs)]
    return torch.tensor(rows, dtype=torch.float32).reshape(num_reqs, gamma)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_algorithm1_fused_equals_torch(data):
    num_reqs, gamma = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 7))
    tbl = data.draw(tables())
    max_len = data.draw(st.one_of(st.none(), st.integers(0, gamma)))
    conf = confidences(data.draw, num_reqs, gamma)
    slots = torch.arange(num_reqs)
    fused = Algorithm1Scheduler(tbl, max_verify_len=max_len)
    torch_path = Algorithm1Scheduler(tbl, max_verify_len=max_len, fused_cpu=False)
    assert fused.schedule(slots, conf).tolist() == torch_path.schedule(slots, conf).tolist()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_lagged_fused_equals_torch_round_after_round(data):
    gamma = data.draw(st.integers(1, 6))
    opts = dict(
        lag=data.draw(st.integers(1, 3)),
        max_verify_len=data.draw(st.one_of(st.none(), st.integers(1, gamma))),
        prior=data.draw(st.sampled_from(["population", "optimistic"])),
        prior_decay=data.draw(st.sampled_from([0.0, 0.3, 0.9])),
        draft_cost=data.draw(st.one_of(st.none(), st.builds(FixedDraftCost, st.floats(0.0, 0.2), st.floats(0.0, 0.02)))),
        probe_every=data.draw(st.sampled_from([0, 2, 3])),
        initial_slots=2,  # slots up to 11 below: the history grows mid-run
    )
    tbl = data.draw(tables())
    fused = LaggedBudgetScheduler(tbl, **opts)
    ref = LaggedBudgetScheduler(tbl, fused_cpu=False, **opts)
    for _ in range(data.draw(st.integers(1, 10))):
        if data.draw(st.booleans()):
            gone = torch.tensor(data.draw(st.lists(st.integers(0, 11), max_size=3)), dtype=torch.int64)
            fused.release(gone)
            ref.release(gone)
        slots = torch.tensor(data.draw(st.lists(st.integers(0, 11), min_size=1, max_size=8, unique=True)))
        skip = fused.skip_round(slots)
        assert skip == ref.skip_round(slots)
        if skip:
            continue
        conf = confidences(data.draw, len(slots), gamma)
        assert fused.schedule(slots, conf).tolist() == ref.schedule(slots, conf).tolist()
        assert fused.last_budget == ref.last_budget
    assert (fused._history is None) == (ref._history is None)
    if fused._history is not None:
        assert torch.equal(fused._history, ref._history)
    # Exact although torch may add in another order: float32 survivals in [1e-6, 1] span < 2^21, so
    # float64 sums of up to 2^8 of them are exact in any order.
    assert (fused._prior_mean is None) == (ref._prior_mean is None)
    if fused._prior_mean is not None:
        assert torch.equal(fused._prior_mean, ref._prior_mean)


def test_fused_path_does_not_use_the_torch_code(monkeypatch):
    """Otherwise the equivalence tests above would compare the torch code with itself."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the fused CPU path called the torch scheduler code")

    for name in ("_masked_survival", "admit_top", "_lagged_budget_fast", "_drafted_budget", "_sorted_desc"):
        monkeypatch.setattr(schedulers, name, forbidden)
    tbl = SpsTable([1, 8, 64], [10.0, 9.0, 2.0], 64)
    conf = torch.tensor([[0.9, 0.8, 0.7], [0.5, 0.4, 0.3]])
    slots = torch.tensor([3, 7])
    # Survivals .9 .72 .504 | .5 .2 .06; Θ = 20, 29, 36.2, 41.24, 46.24, 48.24, then 4.884·9 = 43.96 at
    # 8 batch tokens: the break admits the top 5.
    assert Algorithm1Scheduler(tbl).schedule(slots, conf).tolist() == [3, 2]
    lagged = LaggedBudgetScheduler(tbl, draft_cost=FixedDraftCost(0.01))
    for _ in range(3):
        lagged.skip_round(slots)
        assert lagged.schedule(slots, conf).shape == (2,)
    with pytest.raises(AssertionError, match="torch scheduler code"):
        Algorithm1Scheduler(tbl, fused_cpu=False).schedule(slots, conf)


def test_fused_errors_leave_the_history_untouched():
    tbl = SpsTable([1, 64], [10.0, 5.0], 64)
    sched = LaggedBudgetScheduler(tbl, initial_slots=4)
    conf = torch.full((2, 3), 0.5)
    sched.schedule(torch.tensor([0, 1]), conf)
    before = sched._history.clone()
    with pytest.raises(SchedulerInputError, match="slots: must be >= 0, got -1"):
        sched.schedule(torch.tensor([2, -1]), conf)
    assert torch.equal(sched._history, before)
    with pytest.raises(SchedulerInputError, match="gamma changed from 3 to 2"):
        sched.schedule(torch.tensor([0, 1]), conf[:, :2])
    # A slot beyond the capacity grows the history (4 -> 16 slots) and is served.
    assert sched.schedule(torch.tensor([0, 9]), conf).shape == (2,)
    assert sched._history.shape[1] == 16


def test_warm_up_compiles_every_entry_point():
    schedule_cpu.warm_up()
    for name in ("_exchange", "_budget_then_admit", "_gather", "_best_budget", "_survival_values",
                 "_algorithm1_admit"):
        assert getattr(schedule_cpu, name).signatures, name  # compiled for at least one signature
    LaggedBudgetScheduler(SpsTable([1], [1.0], 1)).warm_up()


def test_survival_matches_torch_cumprod_bit_for_bit():
    """float64 accumulator rounded per position, like torch's CPU cumprod of float32."""
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(512, 7, generator=gen) * 0.5 + 0.5
    out = np.empty((512, 7), dtype=np.float32)
    schedule_cpu.survival_into(conf.numpy(), np.float32(0.0), out)
    assert torch.equal(torch.from_numpy(out), torch.cumprod(conf, dim=1))


def test_a_failed_compile_falls_back_to_the_torch_path(monkeypatch, caplog):
    def broken():
        raise RuntimeError("no locator available for file")

    monkeypatch.setattr(schedule_cpu, "warm_up", broken)
    monkeypatch.setattr(schedulers, "_fused_module", schedule_cpu)
    tbl = SpsTable([1, 64], [10.0, 5.0], 64)
    sched = LaggedBudgetScheduler(tbl)
    with caplog.at_level("WARNING", logger="dspark_sglang.schedulers"):
        sched.warm_up()
    assert "failed to compile" in caplog.text and schedulers._fused() is None
    conf = torch.full((2, 3), 0.5)
    assert sched.schedule(torch.tensor([0, 1]), conf).tolist() == \
        LaggedBudgetScheduler(tbl, fused_cpu=False).schedule(torch.tensor([0, 1]), conf).tolist()
