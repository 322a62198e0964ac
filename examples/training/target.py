"""The real target (SmolLM2-135M-Instruct, materialized offline by `dspark_sglang.models`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def target_path(explicit: str | None = None) -> Path:
    """The target's HF directory: `explicit`, else `dspark_sglang.models.ensure_target()`."""
    if explicit:
        return Path(explicit)
    try:
        from dspark_sglang.models import ensure_target
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        raise SystemExit(
            "dspark_sglang.models.ensure_target is not available; pass --target-path DIR "
            f"(a transformers directory of SmolLM2-135M-Instruct) ({exc})"
        ) from None
    found = ensure_target()
    for attr in ("path", "model_dir", "dir"):
        if hasattr(found, attr):
            found = getattr(found, attr)
            break
    if isinstance(found, (tuple, list)):
        found = found[0]
    return Path(found)


def load_target(path: Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a transformers directory, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(path))


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt with the generation header, exactly as the evaluators build it."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if not isinstance(ids, list):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]
