"""Convert drafter checkpoints to and from vLLM speculators' format.

    dspark-convert to-speculators   SRC OUT [--verifier NAME] [--gamma N]
    dspark-convert from-speculators SRC OUT [--num-target-layers L]
    (or python -m dspark_sglang.drafters.convert ...)

| source | to-speculators gives | from-speculators gives back |
|---|---|---|
| DeepSpec DSpark (`Qwen3DSparkModel`, Markov and/or confidence head) | `speculators_model_type: dspark`, `sample_from_anchor: true` | DeepSpec DSpark |
| DeepSpec DFlash (`Qwen3DSparkModel`, `markov_rank: 0`) | `dflash`, `sample_from_anchor: true` | DeepSpec DFlash |
| SpecForge Eagle3 (`LlamaForCausalLMEagle3`) | `eagle3` with a llama layer config (`midlayer.*` -> `layers.0.*`) | SpecForge Eagle3 |
| DeepSpec Eagle3 (`Qwen3Eagle3Model`) | `eagle3` with a qwen3 layer config (q/k norms) | DeepSpec Eagle3 |

Tensors are copied bit for bit (same dtype, same values); only names and config.json change.
Layer ids shift by one (speculators' id = our id + 1: it names the hidden state entering a layer).
Weights speculators never stores for a full-vocabulary block drafter (the target's embedding and LM
head) are dropped if the source has copies: every loader takes them from the target. A
`draft_vocab.safetensors` beside the source is copied along.

What has no equivalent is refused with a message naming the field: a speculators block drafter with
`sample_from_anchor: false`, with its own draft vocabulary or with sliding-window layers has no
DeepSpec form; an Eagle3 with q/k norms has no SpecForge form (and one with a reduced vocabulary no
DeepSpec form), and speculators' Eagle3 variants (`norm_before_residual`, `norm_output`,
`norm_before_fc`, `fc_norm`) have neither. The source is parsed by the same strict code that loads
drafters, so a malformed one fails the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark_sglang.drafters.checkpoint import WEIGHTS_NAME, read_checkpoint, read_tensor_shapes
from dspark_sglang.drafters.config import (
    EAGLE3_DEFAULT_GAMMA,
    BlockDrafterConfig,
    DecoderDims,
    detect_format,
    parse_block_config,
    parse_eagle3_config,
)
from dspark_sglang.drafters.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from dspark_sglang.drafters.errors import DrafterConfigError
from dspark_sglang.drafters.speculators_format import parse_speculators

FORMAT_VERSION = "0.9.0"  # the speculators release whose format this writes (and was checked against)
_ARCHITECTURE = {"dspark": "DSparkDraftModel", "dflash": "DFlashDraftModel", "eagle3": "Eagle3DraftModel"}


def _layer_config(dims: DecoderDims, model_type: str, dtype: str | None) -> dict:
    """A transformers config dict of the draft decoder (what `transformer_layer_config` holds)."""
    config = {
        "model_type": model_type,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab_size,
        "rms_norm_eps": dims.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": dims.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * dims.num_layers,
    }
    if dtype:
        config["dtype"] = dtype
    return config


def _flat_dims(dims: DecoderDims) -> dict:
    """The same dims as top-level keys (DeepSpec and SpecForge configs are flat)."""
    config = _layer_config(dims, "", None)
    config.pop("model_type")
    return config


def _speculators_config(kind: str, gamma: int, verifier: str | None) -> dict:
    return {
        "algorithm": kind,
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": gamma,
                              "verifier_accept_k": 1, "accept_tolerance": 0.0}],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": verifier, "architectures": []},
    }


def _refuse(path: Path, field: str, problem: str):
    raise DrafterConfigError(str(path / "config.json"), field, problem)


def _read(src: Path):
    """(config dict, tensors, format key, parsed config) of a checkpoint, strictly parsed."""
    config, tensors = read_checkpoint(src)
    fmt = detect_format(config, read_tensor_shapes(src).keys(), str(src))
    if fmt.startswith("speculators"):
        parsed = parse_speculators(config, str(src))
    elif fmt.endswith("eagle3"):
        parsed = parse_eagle3_config(config, fmt, str(src))
    else:
        parsed = parse_block_config(config, fmt, str(src))
    return config, tensors, fmt, parsed


def _write(out: Path, config: dict, tensors: dict[str, torch.Tensor], src: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if (src / DRAFT_VOCAB_FILE).is_file():
        shutil.copy(src / DRAFT_VOCAB_FILE, out / DRAFT_VOCAB_FILE)


def _dtype(config: dict) -> str | None:
    value = config.get("dtype", config.get("torch_dtype"))
    return value if isinstance(value, str) else None


# ---- to speculators ---------------------------------------------------------------------------


def to_speculators(src, out, verifier: str | None = None, gamma: int | None = None) -> str:
    """Write the speculators form of the checkpoint at `src` to `out`; returns the source format."""
    src, out = Path(src), Path(out)
    config, tensors, fmt, cfg = _read(src)
    if fmt in ("deepspec_dspark", "deepspec_dflash"):
        kind = "dspark" if fmt == "deepspec_dspark" else "dflash"
        new = {
            "architectures": [_ARCHITECTURE[kind]],
            "speculators_model_type": kind,
            "speculators_version": FORMAT_VERSION,
            "speculators_config": _speculators_config(kind, cfg.gamma, verifier),
            "transformer_layer_config": _layer_config(cfg.dims, "qwen3", _dtype(config)),
            "draft_vocab_size": cfg.dims.vocab_size,
            "block_size": cfg.block_size,
            "mask_token_id": cfg.mask_token_id,
            "aux_hidden_state_layer_ids": [l + 1 for l in cfg.target_layer_ids],
            "target_hidden_size": cfg.dims.hidden_size,
            "sample_from_anchor": True,  # DeepSpec's convention: slot k predicts anchor + k + 1
            "sliding_window_non_causal": False,
            "tie_word_embeddings": False,
        }
        if kind == "dspark":
            new |= {"markov_rank": cfg.markov_rank, "markov_head_type": cfg.markov_head_type or "vanilla",
                    "enable_confidence_head": cfg.confidence_head, "confidence_head_with_markov": cfg.confidence_with_markov}
        # speculators keeps neither for a full-vocabulary block drafter; loaders take the target's.
        weights = {k: v for k, v in tensors.items() if k not in ("embed_tokens.weight", "lm_head.weight")}
    elif fmt in ("specforge_eagle3", "deepspec_eagle3"):
        if not cfg.target_layer_ids:
            _refuse(src, "eagle_config.eagle_aux_hidden_state_layer_ids", "absent: SpecForge's default needs the target's depth; add the ids")
        specforge = fmt == "specforge_eagle3"
        steps = gamma or (EAGLE3_DEFAULT_GAMMA if specforge else cfg.gamma)
        new = {
            "architectures": [_ARCHITECTURE["eagle3"]],
            "speculators_model_type": "eagle3",
            "speculators_version": FORMAT_VERSION,
            "speculators_config": _speculators_config("eagle3", steps, verifier),
            "transformer_layer_config": _layer_config(cfg.dims, "llama" if specforge else "qwen3", _dtype(config)),
            "draft_vocab_size": cfg.draft_vocab_size,
            "eagle_aux_hidden_state_layer_ids": [l + 1 for l in cfg.target_layer_ids],
            "target_hidden_size": cfg.dims.hidden_size,
            "norm_before_residual": False,
            "tie_word_embeddings": False,
        }
        weights = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v for k, v in tensors.items()}
    else:
        _refuse(src, "architectures", f"{fmt}: to-speculators converts DeepSpec DSpark/DFlash/Eagle3 and SpecForge Eagle3")
    _write(out, new, weights, src)
    return fmt


# ---- from speculators -------------------------------------------------------------------------


def from_speculators(src, out, num_target_layers: int | None = None) -> str:
    """Write the DeepSpec (DSpark, DFlash, Eagle3 with q/k norms) or SpecForge (Eagle3 without)
    form of the speculators checkpoint at `src` to `out`; returns the written format."""
    src, out = Path(src), Path(out)
    config, tensors, fmt, cfg = _read(src)
    if not fmt.startswith("speculators"):
        _refuse(src, "speculators_model_type", f"absent: this is a {fmt} checkpoint, not a speculators one")
    ids = list(cfg.target_layer_ids)
    depth = {"num_target_layers": num_target_layers} if num_target_layers else {}
    if isinstance(cfg, BlockDrafterConfig):
        if not cfg.sample_from_anchor:
            _refuse(src, "sample_from_anchor", "false (mask slots draft, anchor + j): DeepSpec's format drafts from the anchor slot")
        if cfg.draft_vocab_size is not None:
            _refuse(src, "draft_vocab_size", f"{cfg.draft_vocab_size} < vocabulary: DeepSpec's format has no draft vocabulary")
        if cfg.sliding_layers:
            _refuse(src, "transformer_layer_config.layer_types", "sliding-window layers: DeepSpec's format has none")
        written = "deepspec_dspark" if cfg.family == "dspark" else "deepspec_dflash"
        new = {"architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", **_flat_dims(cfg.dims), **depth,
               "block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id, "target_layer_ids": ids,
               "markov_rank": cfg.markov_rank, "enable_confidence_head": cfg.confidence_head}
        if cfg.markov_rank:
            new["markov_head_type"] = cfg.markov_head_type
        if cfg.confidence_head:
            new["confidence_head_with_markov"] = cfg.confidence_with_markov
        weights = dict(tensors)
    else:
        dims = cfg.dims
        variants = {"norm_before_residual": cfg.norm_before_residual, "norm_output": cfg.norm_output,
                    "norm_before_fc": cfg.fc_input_norm == "concat", "fc_norm": cfg.fc_input_norm == "per_layer"}
        for key, on in variants.items():
            if on:
                _refuse(src, key, "true: neither DeepSpec's nor SpecForge's Eagle3 format has this variant")
        if cfg.qk_norm:
            if cfg.draft_vocab_size != dims.vocab_size:
                _refuse(src, "draft_vocab_size", "a qwen3 (q/k norm) Eagle3 converts to DeepSpec's format, which has no draft vocabulary")
            written = "deepspec_eagle3"
            new = {"architectures": ["Qwen3Eagle3Model"], "model_type": "qwen3", **_flat_dims(dims), **depth,
                   "target_layer_ids": ids, "ttt_length": cfg.gamma, "draft_num_hidden_layers": 1}
            weights = dict(tensors)
        else:
            written = "specforge_eagle3"
            new = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", **_flat_dims(dims), **depth,
                   "rope_theta": dims.rope_theta, "draft_vocab_size": cfg.draft_vocab_size,
                   "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids}}
            weights = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v for k, v in tensors.items()}
    dtype = _dtype(config.get("transformer_layer_config") or {})
    if dtype:
        new["dtype"] = dtype
    _write(out, new, weights, src)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dspark-convert", description="Convert drafter checkpoints to and from vLLM speculators' format.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-speculators", help="DeepSpec DSpark/DFlash/Eagle3 or SpecForge Eagle3 -> speculators")
    to.add_argument("src", type=Path, help="checkpoint folder (config.json + model.safetensors)")
    to.add_argument("out", type=Path, help="output folder (created)")
    to.add_argument("--verifier", default=None, help="target model id or path to record in speculators_config.verifier")
    to.add_argument("--gamma", type=int, default=None,
                    help=f"Eagle3 drafts per block (speculative_tokens); default the source's ttt_length, else {EAGLE3_DEFAULT_GAMMA}")
    back = sub.add_parser("from-speculators", help="speculators -> DeepSpec DSpark/DFlash/Eagle3 or SpecForge Eagle3")
    back.add_argument("src", type=Path)
    back.add_argument("out", type=Path)
    back.add_argument("--num-target-layers", type=int, default=None, help="record the target's depth (optional)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")
    if args.command == "to-speculators":
        fmt = to_speculators(args.src, args.out, args.verifier, args.gamma)
        print(json.dumps({"from": fmt, "to": "speculators", "out": str(args.out)}))
    else:
        fmt = from_speculators(args.src, args.out, args.num_target_layers)
        print(json.dumps({"from": "speculators", "to": fmt, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
