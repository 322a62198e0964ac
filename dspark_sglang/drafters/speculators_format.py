"""vLLM speculators checkpoints (`config.json` with `speculators_model_type`), mapped onto our drafters.

| `speculators_model_type` | format key | drafter |
|---|---|---|
| `dspark` | `speculators_dspark` (`speculators_dflash` when `markov_rank` is 0 and no confidence head) | `dspark.DSparkDrafter` |
| `dflash` | `speculators_dflash` | `dspark.DSparkDrafter` |
| `eagle3` | `speculators_eagle3` | `eagle3.Eagle3Drafter` |

Config (speculators 0.9.0; defaults are speculators' own when a key is absent):
- `transformer_layer_config`: the draft decoder's dims (a Qwen3 or Llama config dict);
- `draft_vocab_size` (< the vocabulary: a draft vocabulary, with `d2t` [Vd] int64 offsets and
  `t2d` [V] bool in the weights, SpecForge's convention: draft index d is target id d + d2t[d]);
- block drafters: `block_size`, `mask_token_id`, `aux_hidden_state_layer_ids`, `target_hidden_size`,
  `sample_from_anchor` (default true for dspark, false for dflash): gamma = block_size if true (slot
  k predicts anchor + k + 1, DeepSpec's convention), else block_size - 1 (mask slot j predicts
  anchor + j, z-lab's);
- dspark: `markov_rank` (256), `markov_head_type` (vanilla | gated | rnn), `enable_confidence_head`
  (true), `confidence_head_with_markov` (true: the head reads [h ; W1[prev]]);
- eagle3: `eagle_aux_hidden_state_layer_ids`; drafts per block: the default proposal method's
  `speculators_config.proposal_methods[i].speculative_tokens`; variants `norm_before_residual`
  (residual = hidden_norm(g)), `norm_output` (the next step is fed norm(x)), `norm_before_fc`
  (`input_norm` over the concatenated features) or `fc_norm` (`fc_norm.{i}` per target layer).

Layer ids: speculators (vLLM) id i is the hidden state entering decoder layer i (HF
`hidden_states[i]`; 0 = the embeddings); ours is the output of layer l (`hidden_states[l + 1]`),
so l = i - 1.

Tensors: the block drafters' names equal DeepSpec's (`layers.*`, `fc`, `hidden_norm`, `norm`,
`markov_head.*`, `confidence_head.*`), without `embed_tokens` (the target's is borrowed) and with
`lm_head` only over a draft vocabulary ([Vd, H]; the Markov W2 is then [Vd, r]; otherwise the
target's LM head is borrowed). Eagle3: `layers.0.*` (Qwen3 q/k norms per the layer config's
`model_type`), `fc`, `norm`, `lm_head` [Vd, H], `embed_tokens` [V, H] (borrowed when absent),
`input_norm` [nH] / `fc_norm.{i}` [H] with those variants.

Sliding-window layers (`transformer_layer_config.layer_types` `sliding_attention`, width
`sliding_window`) see only the `sliding_window` context positions before the anchor, and the block
causally unless `sliding_window_non_causal` (speculators' training mask; block.py
`windowed_block_attention`).

Refused with a DrafterConfigError naming the field: other model types (dflash2, mtp, peagle,
xpress), sliding-window Eagle3 layers, projection biases, and a target_hidden_size other than the
draft's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark_sglang.drafters.checkpoint import check_target_tensor, load_weights
from dspark_sglang.drafters.config import (
    EAGLE3_DEFAULT_GAMMA,
    MARKOV_HEAD_TYPES,
    MAX_DRAFTS_PER_BLOCK,
    MAX_WIDTH,
    BlockDrafterConfig,
    Eagle3Config,
    _get,
    _int_list,
    parse_dims,
)
from dspark_sglang.drafters.errors import DrafterConfigError, DrafterWeightsError, TargetMismatchError
from dspark_sglang.drafters.interface import TargetSpec

KEY = "speculators_model_type"
LAYER = "transformer_layer_config"
_SUPPORTED = ("dspark", "dflash", "eagle3")


def _file(path: str) -> str:
    return str(Path(path) / "config.json")


def is_speculators(config: dict) -> bool:
    return KEY in config


def detect(config: dict, path: str) -> str:
    """Our format key for a speculators config."""
    kind = _get(config, KEY, str, path)
    if kind not in _SUPPORTED:
        raise DrafterConfigError(_file(path), KEY, f"{kind!r} is not supported; supported: {list(_SUPPORTED)}")
    if kind == "dspark":
        rank = _get(config, "markov_rank", int, path, default=256)
        conf = _get(config, "enable_confidence_head", bool, path, default=True)
        return "speculators_dspark" if rank > 0 or conf else "speculators_dflash"
    return f"speculators_{kind}"


def _layer_config(config: dict, path: str) -> tuple[dict, object, tuple[int, ...]]:
    """`transformer_layer_config`, its dims and its sliding-window layers; errors name the nested field."""
    layer = _get(config, LAYER, dict, path)
    try:
        dims = parse_dims(layer, path)
    except DrafterConfigError as exc:
        raise DrafterConfigError(exc.path, f"{LAYER}.{exc.field}", exc.problem) from None
    for key in ("attention_bias", "mlp_bias"):
        if _get(layer, key, bool, path, default=False, where=f"{LAYER}."):
            raise DrafterConfigError(_file(path), f"{LAYER}.{key}", "projection biases are not supported")
    act = _get(layer, "hidden_act", str, path, default="silu", where=f"{LAYER}.")
    if act != "silu":
        raise DrafterConfigError(_file(path), f"{LAYER}.hidden_act", f"{act!r}: only silu (SwiGLU) MLPs are supported")
    kinds = layer.get("layer_types") or []
    if not isinstance(kinds, list) or any(k not in ("full_attention", "sliding_attention") for k in kinds):
        raise DrafterConfigError(_file(path), f"{LAYER}.layer_types", f"expected a list of full_attention / sliding_attention, got {kinds!r}")
    sliding = tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
    if sliding and len(kinds) != dims.num_layers:
        raise DrafterConfigError(_file(path), f"{LAYER}.layer_types", f"{len(kinds)} entries for {dims.num_layers} layers")
    return layer, dims, sliding


def _our_layer_ids(config: dict, key: str, path: str) -> tuple[int, ...]:
    ids = _int_list(config, key, path)
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise DrafterConfigError(_file(path), key, f"must be distinct, non-negative layer ids, got {list(ids)}")
    return tuple(i - 1 for i in ids)  # speculators' id i = the input of layer i = the output of layer i - 1


def _gamma_from_proposals(config: dict, path: str) -> int:
    """Eagle3's drafts per block: the default proposal method's `speculative_tokens`."""
    spec = _get(config, "speculators_config", dict, path, default={})
    methods = _get(spec, "proposal_methods", list, path, default=[], where="speculators_config.")
    default = spec.get("default_proposal_method")
    for method in methods:
        if isinstance(method, dict) and method.get("proposal_type", default) == default:
            tokens = _get(method, "speculative_tokens", int, path, default=EAGLE3_DEFAULT_GAMMA,
                          where="speculators_config.proposal_methods[].")
            if not 1 <= tokens <= MAX_DRAFTS_PER_BLOCK:
                raise DrafterConfigError(_file(path), "speculators_config.proposal_methods[].speculative_tokens",
                                         f"must be in [1, {MAX_DRAFTS_PER_BLOCK}], got {tokens}")
            return tokens
    return EAGLE3_DEFAULT_GAMMA


def parse_speculators(config: dict, path: str) -> BlockDrafterConfig | Eagle3Config:
    fmt = detect(config, path)
    layer, dims, sliding = _layer_config(config, path)
    file = _file(path)
    target_hidden = _get(config, "target_hidden_size", int, path, default=None)
    if target_hidden is not None and target_hidden != dims.hidden_size:
        raise DrafterConfigError(file, "target_hidden_size",
                                 f"{target_hidden} differs from the draft's hidden size {dims.hidden_size}; not supported")
    draft_vocab = _get(config, "draft_vocab_size", int, path)
    if not 0 < draft_vocab <= dims.vocab_size:
        raise DrafterConfigError(file, "draft_vocab_size", f"must be in [1, {LAYER}.vocab_size={dims.vocab_size}], got {draft_vocab}")
    if fmt == "speculators_eagle3":
        if sliding:
            raise DrafterConfigError(file, f"{LAYER}.layer_types", "sliding-window Eagle3 layers are not supported yet")
        flags = {key: _get(config, key, bool, path, default=False)
                 for key in ("norm_before_fc", "fc_norm", "norm_output", "norm_before_residual")}
        if flags["norm_before_fc"] and flags["fc_norm"]:
            raise DrafterConfigError(file, "fc_norm", "norm_before_fc and fc_norm are mutually exclusive")
        fc_input_norm = "concat" if flags["norm_before_fc"] else "per_layer" if flags["fc_norm"] else None
        model_type = _get(layer, "model_type", str, path, default="qwen3", where=f"{LAYER}.")
        if model_type not in ("qwen3", "llama"):
            raise DrafterConfigError(file, f"{LAYER}.model_type", f"{model_type!r}: Eagle3 layers are qwen3 or llama")
        return Eagle3Config(fmt, dims, _our_layer_ids(config, "eagle_aux_hidden_state_layer_ids", path), None,
                            draft_vocab, _gamma_from_proposals(config, path), qk_norms=model_type == "qwen3",
                            norm_before_residual=flags["norm_before_residual"], norm_output=flags["norm_output"],
                            fc_input_norm=fc_input_norm)
    kind = config[KEY]
    block = _get(config, "block_size", int, path)
    if not 2 <= block <= MAX_DRAFTS_PER_BLOCK:
        raise DrafterConfigError(file, "block_size", f"must be in [2, {MAX_DRAFTS_PER_BLOCK}], got {block}")
    from_anchor = _get(config, "sample_from_anchor", bool, path, default=kind == "dspark")
    window = None
    if sliding:
        window = _get(layer, "sliding_window", int, path, where=f"{LAYER}.")
        if not 1 <= window <= MAX_WIDTH:
            raise DrafterConfigError(file, f"{LAYER}.sliding_window", f"must be in [1, {MAX_WIDTH}], got {window}")
    non_causal = _get(config, "sliding_window_non_causal", bool, path, default=False)
    rank, head, conf, conf_markov = 0, None, False, False
    if kind == "dspark":
        rank = _get(config, "markov_rank", int, path, default=256)
        if not 0 <= rank <= MAX_WIDTH:
            raise DrafterConfigError(file, "markov_rank", f"must be in [0, {MAX_WIDTH}], got {rank}")
        if rank:
            head = _get(config, "markov_head_type", str, path, default="vanilla")
            if head not in MARKOV_HEAD_TYPES:
                raise DrafterConfigError(file, "markov_head_type", f"{head!r} is not one of {list(MARKOV_HEAD_TYPES)}")
        conf = _get(config, "enable_confidence_head", bool, path, default=True)
        conf_markov = conf and _get(config, "confidence_head_with_markov", bool, path, default=True)
        if conf_markov and rank == 0:
            raise DrafterConfigError(file, "confidence_head_with_markov", "true but markov_rank is 0 (no W1 to read)")
    return BlockDrafterConfig(
        fmt, dims, block, _get(config, "mask_token_id", int, path),
        _our_layer_ids(config, "aux_hidden_state_layer_ids", path), None, rank, head, conf, conf_markov,
        sample_from_anchor=from_anchor, draft_vocab_size=draft_vocab if draft_vocab < dims.vocab_size else None,
        sliding_layers=sliding, sliding_window=window, sliding_non_causal=non_causal,
    )


def check_target(cfg: BlockDrafterConfig | Eagle3Config, target: TargetSpec, path: str) -> None:
    """Layer ids in speculators' own terms: 0 .. L-1 (id L, the final state, is never capturable)."""
    key = "eagle_aux_hidden_state_layer_ids" if isinstance(cfg, Eagle3Config) else "aux_hidden_state_layer_ids"
    bad = [l + 1 for l in cfg.target_layer_ids if not -1 <= l < target.num_hidden_layers - 1]
    if bad:
        raise TargetMismatchError(_file(path), key, f"{bad} outside [0, {target.num_hidden_layers - 1}] for a "
                                                    f"{target.num_hidden_layers}-layer target")


def _vocab_ids(cfg: BlockDrafterConfig, tensors: dict[str, torch.Tensor], path: str) -> torch.Tensor | None:
    """Pop d2t / t2d; return the draft vocabulary's target ids [Vd] (None without one)."""
    from dspark_sglang.drafters.eagle3_config import check_vocab_map

    maps = {name: tensors.pop(name) for name in ("d2t", "t2d") if name in tensors}
    vocab, draft = cfg.dims.vocab_size, cfg.draft_vocab_size
    if draft is None:
        if maps:
            raise DrafterWeightsError(path, sorted(maps)[0], f"present, but draft_vocab_size equals the vocabulary ({vocab})")
        return None
    for name in ("d2t", "t2d"):
        if name not in maps:
            raise DrafterWeightsError(path, name, f"missing: draft_vocab_size {draft} < vocabulary {vocab} needs d2t and t2d")
    d2t, t2d = maps["d2t"], maps["t2d"]
    if d2t.dtype not in (torch.int64, torch.int32) or tuple(d2t.shape) != (draft,):
        raise DrafterWeightsError(path, "d2t", f"must be an integer [{draft}] tensor, got {d2t.dtype} {list(d2t.shape)}")
    if t2d.dtype != torch.bool or tuple(t2d.shape) != (vocab,):
        raise DrafterWeightsError(path, "t2d", f"must be a bool [{vocab}] tensor, got {t2d.dtype} {list(t2d.shape)}")
    if "lm_head.weight" not in tensors:
        raise DrafterWeightsError(path, "lm_head.weight", f"missing: a draft-vocabulary checkpoint carries its own [{draft}, H] LM head")
    return check_vocab_map(d2t.long(), t2d, vocab, path)


def build_block(cfg: BlockDrafterConfig, tensors: dict[str, torch.Tensor], target: TargetSpec, path: str,
                dtype: torch.dtype = torch.float32, device="cpu"):
    """A `DSparkDrafter` from a parsed speculators DSpark / DFlash checkpoint, strictly."""
    from dspark_sglang.drafters.draft_vocab import DraftVocab
    from dspark_sglang.drafters.dspark import DSparkDrafter

    tensors = dict(tensors)
    ids = _vocab_ids(cfg, tensors, path)
    full = (cfg.dims.vocab_size, cfg.dims.hidden_size)
    borrowed = ["embed_tokens"] + (["lm_head"] if ids is None else [])  # never saved by speculators
    for name in borrowed:
        if f"{name}.weight" not in tensors:
            tensors[f"{name}.weight"] = check_target_tensor(getattr(target, name), name, full, path, dtype, device)
    drafter = DSparkDrafter(cfg, dtype, device, meta=True)
    load_weights(drafter.weight_parts(), tensors, path, dtype, device)
    if ids is not None:
        drafter.set_native_vocab(DraftVocab(ids.to(device), cfg.dims.vocab_size))
    return drafter.eval()
