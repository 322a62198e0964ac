"""Per-request control of speculation, carried in SGLang's `custom_params` sampling parameter.

    {"sampling_params": {"custom_params": {"dspark": {"max_verify_len": 2}}}}

`max_verify_len` caps how many drafts of this request a round may verify: 0 means plain decoding
for the request (a latency-critical request, or one known to be hard to draft), while the other
requests of its batch keep speculating. A cap above the server's own maximum changes nothing.
A cap is decided before drafting, so it keeps the output lossless like any other verify length.

`verify_cap` is the one parser: SGLang's request validation calls it (a malformed value gets a 400
that names the field), and the worker calls it once per request at prefill.
"""

from __future__ import annotations

from typing import Any

KEY = "dspark"
FIELDS = ("max_verify_len",)


def verify_cap(custom_params: Any) -> int | None:
    """The request's verify-length cap, or None when it sets none. Raises ValueError naming the field."""
    if not isinstance(custom_params, dict) or KEY not in custom_params:
        return None
    control = custom_params[KEY]
    if not isinstance(control, dict):
        raise ValueError(
            f"custom_params.{KEY} must be an object such as {{\"max_verify_len\": 2}}, "
            f"got {type(control).__name__} {control!r}"
        )
    unknown = sorted(set(control) - set(FIELDS))
    if unknown:
        raise ValueError(f"custom_params.{KEY}: unknown field(s) {unknown}; supported: {list(FIELDS)}")
    cap = control.get("max_verify_len")
    if cap is None:
        return None
    # bool is an int in Python; `true` is not a length.
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ValueError(
            f"custom_params.{KEY}.max_verify_len must be a non-negative integer (0 = no speculation "
            f"for this request), got {cap!r}"
        )
    return cap
