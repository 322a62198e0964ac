"""Draft-cost models: the fixed line, the online fit, the specification parser, the setting."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_sglang.draft_cost import (
    DraftCostError,
    FixedDraftCost,
    MeasuredDraftCost,
    NoDraftCost,
    parse_draft_cost,
)
from dspark_sglang.sglang.settings import PluginSettingsError, load_settings


def test_fixed_line_and_errors():
    cost = FixedDraftCost(0.04, 0.006)
    assert cost.seconds(1) == pytest.approx(0.046) and cost.seconds(16) == pytest.approx(0.136)
    assert NoDraftCost().seconds(64) == 0.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(DraftCostError):
            FixedDraftCost(bad)
        with pytest.raises(DraftCostError):
            FixedDraftCost(0.0, bad)


def test_measured_recovers_the_line_after_warmup():
    cost = MeasuredDraftCost(halflife=64, warmup=2, min_observations=3)
    cost.observe(4, 5.0)  # warm-up outliers (first calls) are dropped
    cost.observe(4, 5.0)
    assert cost.seconds(4) == 0.0
    sizes = [1, 2, 4, 8, 16, 3, 5, 12]
    for i, r in enumerate(sizes):
        cost.observe(r, 0.040 + 0.006 * r)
        if i < 2:
            assert cost.seconds(r) == 0.0  # fewer than min_observations: the paper's objective
    a, b = cost.line
    assert a == pytest.approx(0.040, rel=1e-6) and b == pytest.approx(0.006, rel=1e-6)
    assert cost.seconds(32) == pytest.approx(0.040 + 0.006 * 32, rel=1e-6)
    assert "measured" in cost.describe()


def test_measured_forgets_an_old_regime():
    cost = MeasuredDraftCost(halflife=8, warmup=0, min_observations=1)
    for r in (1, 2, 4, 8) * 10:
        cost.observe(r, 0.100)  # flat 100 ms
    assert cost.seconds(4) == pytest.approx(0.100, rel=1e-6)
    for r in (1, 2, 4, 8) * 20:
        cost.observe(r, 0.010 * r)  # then 10 ms per request, no intercept
    assert cost.seconds(4) == pytest.approx(0.040, rel=0.02)


def test_measured_never_negative_and_ignores_glitches():
    cost = MeasuredDraftCost(warmup=0, min_observations=1)
    for r, y in ((1, 0.2), (2, 0.15), (4, 0.1), (8, 0.05)):  # falling with R: noise, not a law
        cost.observe(r, y)
    a, b = cost.line
    assert b == 0.0 and a == pytest.approx(0.125, rel=0.01)  # the (decay-weighted) mean
    cost = MeasuredDraftCost(warmup=0, min_observations=1)
    for r, y in ((1, 0.001), (2, 0.05), (4, 0.15)):  # a negative intercept: through the origin
        cost.observe(r, y)
    a, b = cost.line
    assert a == 0.0 and b > 0
    before = cost.line
    for glitch in (math.nan, -1.0, math.inf):
        cost.observe(4, glitch)
    cost.observe(0, 1.0)
    assert cost.line == before


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 256), st.floats(0, 10)), min_size=1, max_size=40))
def test_measured_prediction_is_finite_and_non_negative(observations):
    cost = MeasuredDraftCost(warmup=0, min_observations=1)
    for r, y in observations:
        cost.observe(r, y)
        for n in (1, 7, 256, 4096):
            assert math.isfinite(cost.seconds(n)) and cost.seconds(n) >= 0


def test_parse_specifications():
    assert isinstance(parse_draft_cost("measured"), MeasuredDraftCost)
    assert isinstance(parse_draft_cost(""), MeasuredDraftCost)
    assert isinstance(parse_draft_cost("none"), NoDraftCost)
    fixed = parse_draft_cost("40, 6")
    assert fixed.seconds(10) == pytest.approx(0.1)
    assert parse_draft_cost("25").seconds(10) == pytest.approx(0.025)
    for bad in ("fast", "40,6,1", "-5", "nan", "1e999", "40;6"):
        with pytest.raises(DraftCostError):
            parse_draft_cost(bad)


def test_setting_is_validated():
    assert load_settings({}).draft_cost == "measured"
    assert load_settings({"DSPARK_DRAFT_COST": "30,2"}).draft_cost == "30,2"
    with pytest.raises(PluginSettingsError, match="draft_cost"):
        load_settings({"DSPARK_DRAFT_COST": "sometimes"})
