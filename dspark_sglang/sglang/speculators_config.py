"""Lets SGLang read a vLLM speculators drafter's config.json while it resolves server arguments.

SGLang 0.5.23 loads the draft path's config with transformers' AutoConfig during argument
resolution, for any speculative algorithm (the algorithm-alias check for Gemma4 drafts, the
boundary-reduction default), long before a worker exists. A speculators checkpoint has no top-level
`model_type`: its decoder's config is nested in `transformer_layer_config`. AutoConfig refuses it and
the engine never starts. An AROUND hook on SGLang's `get_config` answers for such a directory with
that nested decoder config (plus the checkpoint's `architectures`); every other path goes to SGLang
unchanged. Nothing is loaded from it here: the worker reads the drafter itself, strictly
(drafters/speculators_format.py).
"""

from __future__ import annotations

import json
from pathlib import Path

TARGET = "sglang.srt.utils.hf_transformers.config.get_config"


def speculators_layer_config(model) -> dict | None:
    """The nested decoder config of a local speculators checkpoint (with `architectures`), else None."""
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):
        return None  # not a local checkpoint directory, or unreadable: SGLang's own path decides
    if not isinstance(config, dict) or "speculators_model_type" not in config or "model_type" in config:
        return None
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict):
        return None  # malformed: let SGLang fail, and our loader name the field
    archs = config.get("architectures")
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        archs = None  # malformed: our loader names it when the worker starts
    return {"model_type": "qwen3", **layer, "architectures": archs}


def answer_speculators(original, model, *args, **kwargs):
    layer = speculators_layer_config(model)
    if layer is None:
        return original(model, *args, **kwargs)
    from transformers import AutoConfig

    return AutoConfig.for_model(**layer)


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if any(getattr(hook, "_dspark_speculators", False) for _, hook, _ in HookRegistry._hooks.get(TARGET, ())):
        return
    answer_speculators._dspark_speculators = True
    HookRegistry.register(TARGET, answer_speculators, HookType.AROUND)
