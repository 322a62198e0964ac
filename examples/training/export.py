"""DeepSpec-format configs for drafters of a given target, module construction from them, and saving.

The config is built first and the training modules are constructed *from it* with the product's own
parsers (`parse_block_config`, `eagle3_config.parse_layout`), so what is saved is exactly what was
trained and what `load_drafter` rebuilds.

Layout (DeepSpec, `tests/fixtures/drafters/README.md` §1-§3): top-level keys, a Qwen3-style decoder
config (`model_type: qwen3`, per-head q/k RMSNorm) at the target's width. SmolLM2 is a Llama model
(no q/k norms), but the drafter is its own model: DeepSpec's drafters always have Qwen3 attention,
and nothing about the drafter's attention has to match the target's. Keys shared with the target
(hidden size, heads, head_dim, vocabulary, RMSNorm eps, RoPE theta, special ids) are copied from it.

Saved without `embed_tokens.weight` and `lm_head.weight`: they are frozen copies of the target's
(2 x 56 MB for SmolLM2 in bf16); the loader borrows them from the target at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark_sglang.drafters.config import parse_block_config
from dspark_sglang.drafters.dspark import DSparkDrafter
from dspark_sglang.drafters.eagle3 import Eagle3Drafter
from dspark_sglang.drafters.eagle3_config import parse_layout
from dspark_sglang.drafters.interface import TargetSpec

BORROWED = ("embed_tokens.weight", "lm_head.weight")


def drafter_config(family: str, target_cfg, *, num_layers: int, intermediate_size: int, layer_ids: list[int],
                   block_size: int, mask_token_id: int, markov_rank: int, markov_head_type: str,
                   ttt_length: int, target_name: str, extra: dict | None = None) -> dict:
    """config.json for a `family` drafter ("dspark" | "dflash" | "eagle3") of `target_cfg` (a
    transformers config of the target)."""
    rope = getattr(target_cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(target_cfg, "rope_theta", 10000.0)))
    heads = target_cfg.num_attention_heads
    cfg = {
        "architectures": ["Qwen3Eagle3Model" if family == "eagle3" else "Qwen3DSparkModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": target_cfg.bos_token_id,
        "dtype": "bfloat16",
        "eos_token_id": target_cfg.eos_token_id,
        "head_dim": getattr(target_cfg, "head_dim", None) or target_cfg.hidden_size // heads,
        "hidden_act": "silu",
        "hidden_size": target_cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": target_cfg.max_position_embeddings,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": target_cfg.num_key_value_heads,
        "num_target_layers": target_cfg.num_hidden_layers,
        "pad_token_id": target_cfg.pad_token_id,
        "rms_norm_eps": target_cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "sliding_window": None,
        "target_layer_ids": list(layer_ids),
        "target_model_name_or_path": target_name,
        "target_model_type": target_cfg.model_type,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": target_cfg.vocab_size,
    }
    if family == "eagle3":
        cfg.update(draft_num_hidden_layers=num_layers, ttt_length=ttt_length, step_loss_decay=0.8)
    else:
        cfg.update(block_size=block_size, mask_token_id=mask_token_id, num_anchors=512)
        if family == "dspark":
            cfg.update(markov_rank=markov_rank, markov_head_type=markov_head_type,
                       enable_confidence_head=True, confidence_head_with_markov=True)
        else:
            cfg.update(markov_rank=0, enable_confidence_head=False)
    cfg.update(extra or {})
    return dict(sorted(cfg.items()))


def target_spec(model) -> TargetSpec:
    c = model.config
    return TargetSpec(c.hidden_size, c.vocab_size, c.num_hidden_layers,
                      model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach())


def _init_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """HF-style init (what DeepSpec's `post_init` does): Linear/Embedding ~ N(0, 0.02), biases 0,
    norms 1; a seeded generator makes it deterministic."""
    for name, p in sorted(module.named_parameters()):
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.ndim == 1:  # RMSNorm weights
            torch.nn.init.ones_(p)
        else:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def build_modules(family: str, config: dict, target: TargetSpec, seed: int, path: str = "<training>",
                  final_norm: torch.Tensor | None = None):
    """A freshly initialised float32 drafter (the product's module) for `config`, with the target's
    embedding and LM head copied in and frozen.

    `final_norm` ([H], the target's final RMSNorm weight) initialises the drafter's own final `norm`:
    the drafter reuses the target's LM head, whose logit scale was trained against that norm (for
    SmolLM2 a norm of ones makes the initial logits ~6x too large: CE ~60 instead of ~11)."""
    gen = torch.Generator().manual_seed(seed)
    if family == "eagle3":
        layout = parse_layout(config, "deepspec", {}, target, path)
        drafter = Eagle3Drafter(layout, None, None, torch.float32, "cpu")
        _init_(drafter.model, gen)
        with torch.no_grad():
            drafter.model.embed_tokens.weight.copy_(target.embed_tokens)
            drafter.model.lm_head.weight.copy_(target.lm_head)
        frozen = (drafter.model.embed_tokens.weight, drafter.model.lm_head.weight)
        norm = drafter.model.norm
    else:
        fmt = "deepspec_dspark" if family == "dspark" else "deepspec_dflash"
        drafter = DSparkDrafter(parse_block_config(config, fmt, path), torch.float32, "cpu")
        _init_(drafter, gen)
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(target.embed_tokens)
            drafter.lm_head.weight.copy_(target.lm_head)
        frozen = (drafter.embed_tokens.weight, drafter.lm_head.weight)
        norm = drafter.backbone.norm
    if final_norm is not None:
        with torch.no_grad():
            norm.weight.copy_(final_norm)
    for p in frozen:
        p.requires_grad_(False)
    return drafter


def state_dict_for_checkpoint(family: str, drafter) -> dict[str, torch.Tensor]:
    """Top-level DeepSpec tensor names, bf16, without the borrowed embed/lm_head copies."""
    if family == "eagle3":
        sd = drafter.model.state_dict()
    else:
        sd = {}
        for prefix, module in drafter.weight_parts().items():
            sd.update({prefix + k: v for k, v in module.state_dict().items()})
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(sd.items()) if k not in BORROWED}


def save_checkpoint(out: Path, family: str, config: dict, drafter) -> int:
    """Write config.json + model.safetensors; returns the number of saved parameters."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_for_checkpoint(family, drafter)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())
