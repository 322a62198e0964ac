"""Eagle3 checkpoint checks that go beyond config.py: format names, the tensor layout each format
must have, and the SpecForge draft-vocabulary mapping (`d2t` / `t2d`).

| | DeepSpec (`Qwen3Eagle3Model`) | SpecForge / SafeAILab (`LlamaForCausalLMEagle3`) |
|---|---|---|
| decoder layer prefix | `layers.0.` | `midlayer.` |
| q/k norms | yes (Qwen3) | no (Llama) |
| `fc` | [H, 5H] (`target_layer_ids`) | [H, 3H] (`eagle_config.eagle_aux_hidden_state_layer_ids`) |
| `embed_tokens.weight` | in the checkpoint (the target's copy) | absent in the SGLang export: borrowed from the target |
| `lm_head.weight` | [V, H] | [draft_vocab_size, H] |
| `d2t` [Vd] int64, `t2d` [V] bool | absent | present when Vd < V (SafeAILab deletes them when Vd == V) |

Layer ids are decoder-layer outputs in both formats (HF `hidden_states[l + 1]`): DeepSpec's
`target_layer_ids` directly, and SpecForge's `eagle_aux_hidden_state_layer_ids` directly too, which
is exactly what SGLang's `set_eagle3_layers_to_capture(ids)` captures (the hidden state entering
layer l + 1). The fixture's SpecForge `context_features` are `hidden_states[l + 1]` for l in
{1, 3, 4}, SpecForge's default `[1, L//2 - 1, L - 4]` for L = 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_sglang.drafters.config import Eagle3Config, parse_eagle3_config, validate_against_target
from dspark_sglang.drafters.errors import DrafterConfigError, DrafterWeightsError
from dspark_sglang.drafters.interface import TargetSpec

# build_eagle3's `fmt` (the source, as in FORMAT_FAMILY) -> config.py's format key.
EAGLE3_FORMATS = {"deepspec": "deepspec_eagle3", "specforge": "specforge_eagle3", "speculators": "speculators_eagle3"}
LAYER_PREFIX = {"deepspec_eagle3": "layers.0.", "specforge_eagle3": "midlayer.", "speculators_eagle3": "layers.0."}


def _config_file(path: str) -> str:
    return f"{path}/config.json"


@dataclass(frozen=True)
class Eagle3Layout:
    """What one checkpoint holds, decided from the config and the tensor names."""

    config: Eagle3Config
    layer_prefix: str  # "layers.0." | "midlayer."
    embed_in_checkpoint: bool  # False: the target's embedding is borrowed
    has_vocab_map: bool  # d2t / t2d present (required when draft_vocab_size < vocab_size)

    @property
    def source(self) -> str:  # "deepspec" | "specforge"
        return self.config.format.split("_")[0]


def resolve_format(fmt: str, path: str) -> str:
    """Accept the loader's source names ("deepspec", "specforge") or the full format keys."""
    if fmt in EAGLE3_FORMATS:
        return EAGLE3_FORMATS[fmt]
    if fmt in EAGLE3_FORMATS.values():
        return fmt
    raise DrafterConfigError(_config_file(path), "format", f"{fmt!r} is not an Eagle3 format; expected one of {sorted(EAGLE3_FORMATS)}")


def parse_layout(
    config: dict, fmt: str, tensors: dict[str, torch.Tensor], target: TargetSpec, path: str
) -> Eagle3Layout:
    """Parse and validate the config against the target, then decide the tensor layout."""
    key = resolve_format(fmt, path)
    if key == "speculators_eagle3":  # its own config layout (imported lazily: it imports this module)
        from dspark_sglang.drafters.speculators_format import parse_speculators

        cfg = parse_speculators(config, path)
    else:
        cfg = parse_eagle3_config(config, key, path, target.num_hidden_layers)
    validate_against_target(cfg, target, path)  # hidden, vocab, num_target_layers, layer id range
    return layout_for(cfg, tensors, path)


def layout_for(cfg: Eagle3Config, tensors: dict[str, torch.Tensor], path: str) -> Eagle3Layout:
    """The tensor layout of a parsed, target-checked config (checks that need no format knowledge)."""
    key = cfg.format
    dims, file = cfg.dims, _config_file(path)
    if dims.num_layers != 1:
        # Both formats train exactly one decoder layer; a deeper stack would need per-layer caches.
        raise DrafterConfigError(file, "num_hidden_layers", f"Eagle3 drafters have exactly 1 decoder layer, got {dims.num_layers}")
    if not 0 < cfg.draft_vocab_size <= dims.vocab_size:
        raise DrafterConfigError(file, "draft_vocab_size", f"{cfg.draft_vocab_size} must be in [1, vocab_size={dims.vocab_size}]")
    if key == "deepspec_eagle3" and cfg.draft_vocab_size != dims.vocab_size:
        raise DrafterConfigError(file, "draft_vocab_size", "DeepSpec Eagle3 drafts over the full vocabulary")
    if cfg.gamma < 1:
        raise DrafterConfigError(file, "ttt_length", f"must be >= 1, got {cfg.gamma}")
    has_map = key != "deepspec_eagle3" and (cfg.draft_vocab_size < dims.vocab_size or "d2t" in tensors or "t2d" in tensors)
    embed_in_ckpt = key == "deepspec_eagle3" or "embed_tokens.weight" in tensors
    layout = Eagle3Layout(cfg, LAYER_PREFIX[key], embed_in_ckpt, has_map)
    check_head_shapes(layout, tensors, path)
    return layout


def check_head_shapes(layout: Eagle3Layout, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Clearer messages than the generic shape check for the two tensors tied to config fields.

    Missing tensors are left to `checkpoint.load_weights`, which lists all of them at once.
    """
    cfg = layout.config
    hidden, width = cfg.dims.hidden_size, len(cfg.target_layer_ids) * cfg.dims.hidden_size
    fc = tensors.get("fc.weight")
    if fc is not None and tuple(fc.shape) != (hidden, width):
        raise DrafterWeightsError(
            path, "fc.weight",
            f"shape {list(fc.shape)}, but {len(cfg.target_layer_ids)} target layers {list(cfg.target_layer_ids)} "
            f"x hidden {hidden} need [{hidden}, {width}]",
        )
    head = tensors.get("lm_head.weight")
    if head is not None and tuple(head.shape) != (cfg.draft_vocab_size, hidden):
        field = "vocab_size" if layout.source == "deepspec" else "draft_vocab_size"
        raise DrafterWeightsError(
            path, "lm_head.weight", f"shape {list(head.shape)} disagrees with {field}={cfg.draft_vocab_size} x hidden {hidden}"
        )


def check_vocab_map(
    d2t: torch.Tensor,  # [Vd] int64 offsets: draft index d -> target id d + d2t[d]
    t2d: torch.Tensor,  # [V] bool, t2d[v] iff target token v is in the draft vocabulary
    vocab_size: int,
    path: str,
) -> torch.Tensor:
    """Validate SpecForge's mapping; return the draft vocabulary's target ids [Vd] int64 (ascending).

    The invariant is `nonzero(t2d) == d2t + arange(Vd)`: the draft vocabulary is the chosen target
    ids in ascending order. Inverse-CDF sampling over the draft vocabulary then picks the same token
    as over the scattered target-vocabulary q, and a broken table would silently draft wrong ids.
    """
    draft_vocab = d2t.shape[0]
    target_ids = torch.arange(draft_vocab, device=d2t.device) + d2t.long()  # [Vd]
    bad = (target_ids < 0) | (target_ids >= vocab_size)
    if bool(bad.any()):
        d = int(bad.nonzero()[0])
        raise DrafterWeightsError(path, "d2t", f"draft index {d} maps to target id {int(target_ids[d])}, outside [0, {vocab_size})")
    members = t2d.nonzero().squeeze(-1)  # [#true]
    if members.numel() != draft_vocab:
        raise DrafterWeightsError(path, "t2d", f"marks {members.numel()} target tokens, but d2t has {draft_vocab} entries")
    mismatch = members.to(target_ids.device) != target_ids
    if bool(mismatch.any()):
        d = int(mismatch.nonzero()[0])
        raise DrafterWeightsError(
            path, "d2t",
            f"inconsistent with t2d at draft index {d}: d + d2t[d] = {int(target_ids[d])}, but the {d}-th token of t2d is "
            f"{int(members[d])} (need nonzero(t2d) == d2t + arange(draft_vocab_size))",
        )
    return target_ids
