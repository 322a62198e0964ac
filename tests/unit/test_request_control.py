"""custom_params["dspark"]: the per-request verify-length cap, and the errors a malformed one gets."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspark_sglang.request_control import verify_cap


@pytest.mark.parametrize("params", [None, {}, {"other": 1}, {"dspark": {}}, {"dspark": {"max_verify_len": None}}])
def test_no_cap_unless_asked(params):
    assert verify_cap(params) is None


@pytest.mark.parametrize("k", [0, 1, 7, 1000])
def test_cap_is_read(k):
    assert verify_cap({"dspark": {"max_verify_len": k}, "thinking_budget": 5}) == k


@pytest.mark.parametrize("control, field", [
    ({"max_verify_len": -1}, "custom_params.dspark.max_verify_len"),
    ({"max_verify_len": 2.0}, "custom_params.dspark.max_verify_len"),
    ({"max_verify_len": "3"}, "custom_params.dspark.max_verify_len"),
    ({"max_verify_len": True}, "custom_params.dspark.max_verify_len"),  # a bool is not a length
    ({"max_verify_length": 2}, "unknown field(s) ['max_verify_length']"),
    (3, "custom_params.dspark must be an object"),
    ([1, 2], "custom_params.dspark must be an object"),
])
def test_malformed_control_names_the_field(control, field):
    with pytest.raises(ValueError) as err:
        verify_cap({"dspark": control})
    assert field in str(err.value)


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                                     st.text(max_size=4)), max_size=3))
def test_any_json_control_is_a_cap_or_a_value_error(control):
    try:
        cap = verify_cap({"dspark": control})
    except ValueError as exc:
        assert "custom_params.dspark" in str(exc)
    else:
        assert cap is None or (isinstance(cap, int) and cap >= 0)
