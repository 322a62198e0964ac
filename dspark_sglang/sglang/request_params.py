"""Validate a request's `custom_params["dspark"]` where SGLang validates its sampling parameters.

An AFTER hook on `SamplingParams.verify`, which the tokenizer manager calls for every request before
it reaches a scheduler: a ValueError there becomes an HTTP 400 (or an Engine-side ValueError) with our
message, and the server keeps serving. Installed in every process by the plugin's `register()`, so
it also holds when the request is sent to a plain server (where the field means nothing, but a
malformed one is still refused rather than silently ignored).
"""

from __future__ import annotations

from dspark_sglang.request_control import verify_cap

VERIFY_TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"


def _check_custom_params(result, params, *args, **kwargs):
    verify_cap(getattr(params, "custom_params", None))  # raises ValueError naming the field
    return None  # keep verify's own result


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if any(getattr(h, "_dspark_request_params", False) for _, h, _ in HookRegistry._hooks.get(VERIFY_TARGET, ())):
        return
    _check_custom_params._dspark_request_params = True
    HookRegistry.register(VERIFY_TARGET, _check_custom_params, HookType.AFTER)
