"""Fixed-width verify tiers (dspark_sglang/verify_tiers.py): spelling, widths per gamma, the choice
per round."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspark_sglang.verify_tiers import VerifyTierError, check_tier_spelling, parse_tiers, pick_width


def test_tiers_per_spelling():
    assert parse_tiers("off", 7) is None
    assert parse_tiers("auto", 7) == (2, 4, 8)
    assert parse_tiers("AUTO", 6) == (2, 4, 7)  # gamma + 1 always closes the list
    assert parse_tiers("auto", 1) == (2,)
    assert parse_tiers("3, 5", 7) == (3, 5, 8)
    assert parse_tiers("8", 7) == (8,)


@pytest.mark.parametrize("text, match", [("1", ">= 2"), ("2,x", "comma-separated"), ("", ">= 2"), (" , ", ">= 2")])
def test_bad_spellings_name_the_problem(text, match):
    with pytest.raises(VerifyTierError, match=match):
        check_tier_spelling(text)


def test_widths_past_gamma_are_refused():
    with pytest.raises(VerifyTierError, match=r"widths \[9, 12\] exceed gamma \+ 1 = 8"):
        parse_tiers("4,9,12", 7)


def test_settings_refuse_a_bad_tier_spelling():
    from dspark_sglang.sglang.settings import PluginSettings, PluginSettingsError

    assert PluginSettings(verify_tiers="2,4").verify_tiers == "2,4"
    with pytest.raises(PluginSettingsError, match="verify_tiers"):
        PluginSettings(verify_tiers="wide")


@given(gamma=st.integers(1, 16), longest=st.integers(0, 17))
def test_pick_width_is_the_smallest_tier_that_holds_the_window(gamma, longest):
    tiers = parse_tiers("auto", gamma)
    if longest > gamma + 1:
        with pytest.raises(VerifyTierError, match="exceeds the widest tier"):
            pick_width(longest, tiers)
        return
    width = pick_width(longest, tiers)
    if longest <= 1:
        assert width == 1  # no drafts verified: a DECODE forward
    else:
        assert width in tiers and width >= longest
        assert all(t < longest for t in tiers if t < width)
