"""Cost tables: SGLang's two JSON forms (read, write, reject), the step/linear lookup rules,
from_probes and the flat-then-linear fit."""

import bisect
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_sglang.cost_table import (
    RATE_FLOOR_FRACTION,
    AdditiveSpsTable,
    CostTable,
    CostTableError,
    SpsTable,
    fit_flat_then_linear,
    from_probes,
    load_cost_table,
    parse_cost_table,
    save_cost_table,
)

STEP = SpsTable([1, 4, 16], [100.0, 80.0, 40.0], 32)
ADDITIVE = AdditiveSpsTable(0.01, [1, 5], [0.0, 0.004], [0, 10, 30], [0.0, 0.002, 0.012])


def sps(table, num_reqs, tokens):
    return table.steps_per_second(num_reqs, torch.tensor(tokens)).tolist()


def sglang_sps_module():
    """SGLang's dspark_sps.py loaded by path (bisect + msgspec only; the package __init__ is huge)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "srt/speculative/dspark_components/dspark_sps.py"
    module_spec = importlib.util.spec_from_file_location("_sglang_dspark_sps", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Lookup rules


def test_step_lookup_is_sglang_floor():
    # Below the first probe: first rate; between probes: the lower probe's; beyond: the last.
    assert sps(STEP, 1, [0, 1, 3, 4, 15, 16, 32, 1000]) == [100, 100, 100, 80, 80, 40, 40, 40]
    assert STEP.steps_per_second(7, 5) == 80.0  # int in, float out; num_reqs unused
    assert isinstance(STEP, CostTable) and isinstance(ADDITIVE, CostTable)


def test_linear_lookup_and_extrapolation():
    lin = SpsTable([1, 4, 16], [100.0, 80.0, 40.0], 32, interpolation="linear")
    got = sps(lin, 1, [0, 1, 2.5, 4, 10, 16, 20, 28])
    # Clamp below the first probe, linear between probes, and beyond 16 the last slope
    # (−40/12 per token) continues: 20 -> 26.67, 28 -> 0 which is floored (below).
    assert got[:7] == pytest.approx([100, 100, 90, 80, 60, 40, 40 - 4 * 40 / 12])
    assert got[7] == pytest.approx(RATE_FLOOR_FRACTION * 40)
    # Never below RATE_FLOOR_FRACTION × the smallest probed rate.
    assert lin.steps_per_second(1, 10_000) == pytest.approx(RATE_FLOOR_FRACTION * 40)
    # A rising last segment is held flat, not extrapolated upwards.
    rising = SpsTable([1, 2], [10.0, 20.0], 2, interpolation="linear")
    assert sps(rising, 1, [1, 2, 50]) == [10, 20, 20]
    single = SpsTable([8], [5.0], 8, interpolation="linear")
    assert sps(single, 1, [1, 8, 100]) == [5, 5, 5]


def test_additive_step_time_hand_computed():
    # R = 3: alpha = 0.004·(3−1)/4 = 0.002. B = 20: theta = 0.002 + 0.01·(10/20) = 0.007.
    assert ADDITIVE.step_seconds(3, 20) == pytest.approx(0.01 + 0.002 + 0.007)
    assert ADDITIVE.steps_per_second(3, 20) == pytest.approx(1 / 0.019)
    # Clamped at both ends: R = 9 -> alpha 0.004; B = 100 -> theta 0.012.
    assert ADDITIVE.step_seconds(9, 100) == pytest.approx(0.026)
    rates = ADDITIVE.steps_per_second(3, torch.tensor([3, 20, 100]))
    assert rates.dtype == torch.float64 and rates.shape == (3,)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=8, unique=True),
       st.lists(st.integers(0, 400), min_size=1, max_size=20), st.data())
def test_vectorised_step_lookup_matches_bisect(probes, queries, data):
    probes = sorted(probes)
    rates = [float(data.draw(st.integers(1, 1000))) for _ in probes]
    table = SpsTable(probes, rates, probes[-1])
    expected = [rates[max(0, min(bisect.bisect_right(probes, q) - 1, len(probes) - 1))] for q in queries]
    assert sps(table, 1, queries) == expected


# ---------------------------------------------------------------------------------------------
# JSON round trips and SGLang interoperability


def test_round_trips(tmp_path):
    for table in (STEP, ADDITIVE):
        path = tmp_path / "table.json"
        save_cost_table(table, path)
        assert load_cost_table(path) == table
    assert STEP.to_json() == '{"sample_batch_tokens":[1,4,16],"sample_steps_per_sec":[100.0,80.0,40.0],"max_batch_tokens":32}'
    assert list(json.loads(ADDITIVE.to_json())) == ["bias_seconds", "bs_probes", "alpha_seconds",
                                                    "m_probes", "theta_seconds"]
    linear = load_cost_table(tmp_path / "table.json", interpolation="linear")  # additive: ignored
    assert isinstance(linear, AdditiveSpsTable)


def test_reads_hand_written_sglang_examples(tmp_path):
    # dspark_sps.py: SpsCostTable (ints for rates are fine: msgspec reads them as floats) and the
    # profiler's additive fit, whose offsets may be negative.
    step = tmp_path / "sps.json"
    step.write_text('{"sample_batch_tokens": [1, 64, 512], "sample_steps_per_sec": [52.1, 50, 31.5],'
                    ' "max_batch_tokens": 1024, "comment": "unknown keys are ignored"}')
    table = load_cost_table(step)
    assert isinstance(table, SpsTable) and sps(table, 1, [63, 64, 4096]) == [52.1, 50.0, 31.5]
    add = tmp_path / "additive.json"
    add.write_text('{"bias_seconds":0.0123,"bs_probes":[1,8,32],"alpha_seconds":[0.0,-0.0004,0.0021],'
                   '"m_probes":[0,64,128],"theta_seconds":[0.0,0.0011,0.0032]}')
    table = load_cost_table(add)
    assert isinstance(table, AdditiveSpsTable)
    assert table.step_seconds(8, 64) == pytest.approx(0.0123 - 0.0004 + 0.0011)


def test_interoperates_with_sglang_structs():
    sglang = sglang_sps_module()
    theirs = sglang.SpsCostTable.from_json(STEP.to_json())
    assert parse_cost_table(theirs.to_json()) == STEP
    for b in range(0, 40):
        assert STEP.steps_per_second(1, b) == theirs.lookup(b)
    theirs_add = sglang.SpsAdditiveCostTable.from_json(ADDITIVE.to_json())
    assert parse_cost_table(theirs_add.to_json()) == ADDITIVE
    for r in (1, 3, 9):
        for budget in (0, 5, 17, 60):
            assert ADDITIVE.step_seconds(r, r + budget) == pytest.approx(
                theirs_add.step_time(num_reqs=r, budget=budget), rel=1e-12)
    profiled = sglang.profile_sps_table(probes=[(4, 2.0), (1, 3.0)], max_batch_tokens=8)
    assert parse_cost_table(profiled.to_json()) == SpsTable([1, 4], [3.0, 2.0], 8)


# ---------------------------------------------------------------------------------------------
# Malformed files: one case each

BASE = {"sample_batch_tokens": [1, 2], "sample_steps_per_sec": [1.0, 0.5], "max_batch_tokens": 2}
ADD_BASE = {"bias_seconds": 0.01, "bs_probes": [1], "alpha_seconds": [0.0], "m_probes": [1, 2],
            "theta_seconds": [0.0, 0.001]}


@pytest.mark.parametrize("change,field", [
    ({"sample_batch_tokens": [], "sample_steps_per_sec": []}, "sample_batch_tokens"),  # empty
    ({"sample_batch_tokens": [2, 1]}, "sample_batch_tokens"),  # unsorted
    ({"sample_batch_tokens": [2, 2]}, "sample_batch_tokens"),  # duplicate
    ({"sample_steps_per_sec": [1.0, 0.0]}, "sample_steps_per_sec[1]"),  # zero rate
    ({"sample_steps_per_sec": [-1.0, 0.5]}, "sample_steps_per_sec[0]"),  # negative rate
    ({"sample_steps_per_sec": [1.0]}, "sample_steps_per_sec"),  # length mismatch
    ({"sample_batch_tokens": [1, 2.0]}, "sample_batch_tokens[1]"),  # float where int
    ({"sample_batch_tokens": [1, True]}, "sample_batch_tokens[1]"),  # bool where int
    ({"sample_batch_tokens": [-1, 2]}, "sample_batch_tokens[0]"),  # negative probe
    ({"sample_batch_tokens": "1,2"}, "sample_batch_tokens"),  # not a list
    ({"sample_steps_per_sec": [1.0, "fast"]}, "sample_steps_per_sec[1]"),  # string rate
    ({"sample_steps_per_sec": [1.0, None]}, "sample_steps_per_sec[1]"),  # null rate
    ({"max_batch_tokens": 1}, "max_batch_tokens"),  # below the last probe
    ({"max_batch_tokens": 2.5}, "max_batch_tokens"),  # wrong type
    ({"max_batch_tokens": None}, "max_batch_tokens"),  # removed below -> missing
])
def test_step_table_rejects(tmp_path, change, field):
    obj = {**BASE, **change}
    if change.get("max_batch_tokens", 0) is None:
        del obj["max_batch_tokens"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(CostTableError) as err:
        load_cost_table(path)
    assert err.value.field == field and str(path) in str(err.value)


@pytest.mark.parametrize("change,field", [
    ({"bias_seconds": 0.0}, "bias_seconds"),
    ({"bias_seconds": "0.1"}, "bias_seconds"),
    ({"bs_probes": []}, "bs_probes"),
    ({"m_probes": [2, 1]}, "m_probes"),
    ({"m_probes": [1, 10**300, 10**301]}, "m_probes[1]"),  # beyond float64: was an OverflowError
    ({"bs_probes": [1, 2**53 + 1]}, "bs_probes[1]"),
    ({"theta_seconds": [0.0]}, "theta_seconds"),
    ({"alpha_seconds": [-0.02]}, "alpha_seconds/theta_seconds"),  # step time would be <= 0
    ({"alpha_seconds": [float("nan")]}, "alpha_seconds[0]"),
])
def test_additive_table_rejects(tmp_path, change, field):
    path = tmp_path / "bad_additive.json"
    path.write_text(json.dumps({**ADD_BASE, **change}))
    with pytest.raises(CostTableError) as err:
        load_cost_table(path)
    assert err.value.field == field and str(path) in str(err.value)


@pytest.mark.parametrize("text,field", [("{oops", "<root>"), ("[1, 2]", "<root>"), ("3", "<root>")])
def test_rejects_non_objects(tmp_path, text, field):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(CostTableError) as err:
        load_cost_table(path)
    assert err.value.field == field


def test_missing_file_and_bad_interpolation():
    with pytest.raises(CostTableError, match="cannot read"):
        load_cost_table("/nonexistent/sps.json")
    with pytest.raises(CostTableError, match="interpolation"):
        SpsTable([1], [1.0], 1, interpolation="cubic")


# ---------------------------------------------------------------------------------------------
# from_probes and the flat-then-linear fit


def test_from_probes_medians_duplicates():
    table = from_probes([(8, 3.0), (1, 10.0), (8, 1.0), (8, 2.0), (4, 5.0), (4, 7.0)])
    assert table.sample_batch_tokens == [1, 4, 8]
    assert table.sample_steps_per_sec == [10.0, 6.0, 2.0]  # even count: mean of the middle two
    assert table.max_batch_tokens == 8
    assert from_probes([(2, 1.0)], max_batch_tokens=64).max_batch_tokens == 64
    with pytest.raises(CostTableError, match="empty"):
        from_probes([])
    with pytest.raises(CostTableError, match=r"probes\[0\]"):
        from_probes([(1.5, 2.0)])
    with pytest.raises(CostTableError, match="must be > 0"):
        from_probes([(1, 0.0)])


def test_fit_flat_then_linear_exact():
    tokens = [1, 2, 4, 8, 16, 32, 64]
    seconds = [0.02 if b <= 8 else 0.02 + 0.001 * (b - 8) for b in tokens]
    fit = fit_flat_then_linear(tokens, seconds)
    assert fit.knee == 8
    assert fit.flat_seconds == pytest.approx(0.02)
    assert fit.slope_seconds_per_token == pytest.approx(0.001)
    assert fit.step_seconds(torch.tensor([4, 40])).tolist() == pytest.approx([0.02, 0.052])


def test_fit_flat_then_linear_noisy_and_flat():
    gen = torch.Generator().manual_seed(0)
    tokens = list(range(8, 520, 8)) * 3
    true = torch.tensor([0.03 if b <= 256 else 0.03 + 2e-4 * (b - 256) for b in tokens], dtype=torch.float64)
    noisy = (true * (1 + 0.01 * torch.randn(len(tokens), generator=gen, dtype=torch.float64))).tolist()
    fit = fit_flat_then_linear(tokens, noisy)
    assert abs(fit.knee - 256) <= 24 and fit.slope_seconds_per_token == pytest.approx(2e-4, rel=0.1)
    flat = fit_flat_then_linear([1, 2, 3], [0.5, 0.5, 0.5])
    assert flat.slope_seconds_per_token == 0.0 and flat.flat_seconds == pytest.approx(0.5)
    falling = fit_flat_then_linear([1, 2, 3], [0.3, 0.2, 0.1])  # noise: never a negative slope
    assert falling.slope_seconds_per_token == 0.0


@pytest.mark.parametrize("tokens,seconds,match", [
    ([1, 2], [0.1], "length"),
    ([1], [0.1], "two"),
    ([1, 2], [0.1, 0.0], "> 0"),
    ([1, 2], [0.1, float("inf")], "finite"),
])
def test_fit_flat_then_linear_errors(tokens, seconds, match):
    with pytest.raises(CostTableError, match=match):
        fit_flat_then_linear(tokens, seconds)
