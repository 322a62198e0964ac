"""Drafter format detection and config parsing into frozen dataclasses.

Formats (see shared/reference/drafters-and-paper.md §1-§2 and tests/fixtures/drafters/README.md):

| key | `architectures[0]` | family | keys live |
|---|---|---|---|
| `deepspec_dspark` | `Qwen3DSparkModel`, `markov_rank > 0` or a confidence head | dspark | top level |
| `deepspec_dflash` | `Qwen3DSparkModel`, `markov_rank == 0`, no confidence head | dflash | top level |
| `zlab_dflash` | `DFlashDraftModel` | dflash | `dflash_config{mask_token_id, target_layer_ids}`, top-level `block_size` |
| `deepspec_eagle3` | `Qwen3Eagle3Model` (or `Eagle3DraftModel`) | eagle3 | top level |
| `specforge_eagle3` | `LlamaForCausalLMEagle3` | eagle3 | `eagle_config.eagle_aux_hidden_state_layer_ids`, `draft_vocab_size` |
| `speculators_dspark`, `speculators_dflash`, `speculators_eagle3` | any, with `speculators_model_type` | per type | vLLM speculators: see speculators_format.py |

Layer ids everywhere mean "the output of target decoder layer l" (HF `hidden_states[l + 1]`);
DeepSpec allows -1 for the embedding output. Validation errors name the config file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dspark_sglang.drafters.errors import DrafterConfigError, TargetMismatchError
from dspark_sglang.drafters.interface import TargetSpec

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
EAGLE3_DEFAULT_GAMMA = 7  # DeepSpec's ttt_length; SpecForge exports carry no step count
# Sanity cap on drafts per block (block_size, ttt_length): real drafters use 4-16; a hostile value
# such as 10**9 would only surface later as an absurd allocation in the worker.
MAX_DRAFTS_PER_BLOCK = 1024
# Sanity caps on a decoder's shape: beyond them a hostile config.json (say intermediate_size 2**55)
# would surface as a torch overflow or a hang building modules instead of a DrafterConfigError.
# Widths and vocabularies: real ones stay far below 2**24, and a product of two fits int64.
MAX_WIDTH = 2**24
MAX_COUNT = 1024  # layers and heads
FORMAT_FAMILY = {
    "deepspec_dspark": ("dspark", "deepspec"),
    "deepspec_dflash": ("dflash", "deepspec"),
    "zlab_dflash": ("dflash", "zlab"),
    "deepspec_eagle3": ("eagle3", "deepspec"),
    "specforge_eagle3": ("eagle3", "specforge"),
    "speculators_dspark": ("dspark", "speculators"),
    "speculators_dflash": ("dflash", "speculators"),
    "speculators_eagle3": ("eagle3", "speculators"),
}
_ARCHITECTURES = {
    "Qwen3DSparkModel": "deepspec_block",
    "DFlashDraftModel": "zlab_dflash",
    "Qwen3Eagle3Model": "deepspec_eagle3",
    "Eagle3DraftModel": "deepspec_eagle3",  # DeepSpec's eval maps it onto the Qwen3 evaluator
    "LlamaForCausalLMEagle3": "specforge_eagle3",
}
_UNSUPPORTED = {
    "Gemma4DSparkModel": "Gemma4 DSpark drafters are not supported yet",
    "Gemma4Eagle3Model": "Gemma4 Eagle3 drafters are not supported yet",
    "DSparkDraftModel": "SpecForge DSpark (mask-filling) checkpoints are not supported yet",
    "DFlash2DraftModel": "DFlash 2 checkpoints are not supported yet",
}


def _config_file(path: str) -> str:
    return str(Path(path) / "config.json")


def _guess_from_tensors(names: set[str]) -> str | None:
    """Fallback when `architectures` is absent: the tensor layout identifies the format."""
    if any(n.startswith("midlayer.") for n in names):
        return "specforge_eagle3"
    if "layers.0.hidden_norm.weight" in names:
        return "deepspec_eagle3"
    if "hidden_norm.weight" in names and "fc.weight" in names:
        return "deepspec_block" if "embed_tokens.weight" in names else "zlab_dflash"
    return None


def detect_format(config: dict, tensor_names, path: str) -> str:
    """One of FORMAT_FAMILY's keys, from `architectures[0]` (or the tensor names without it)."""
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not archs or not isinstance(archs[0], str)):
        raise DrafterConfigError(_config_file(path), "architectures", f"must be a non-empty list of names, got {archs!r}")
    if "speculators_model_type" in config:  # before the names: speculators reuses some, e.g. DSparkDraftModel
        from dspark_sglang.drafters.speculators_format import detect

        return detect(config, path)
    if archs:
        arch = archs[0]
        if arch in _UNSUPPORTED:
            raise DrafterConfigError(_config_file(path), "architectures", f"{arch}: {_UNSUPPORTED[arch]}")
        kind = _ARCHITECTURES.get(arch)
        if kind is None:
            raise DrafterConfigError(
                _config_file(path), "architectures", f"unknown drafter architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}"
            )
    else:
        kind = _guess_from_tensors(set(tensor_names))
        if kind is None:
            raise DrafterConfigError(_config_file(path), "architectures", "absent, and the tensor names match no known format")
    if kind == "deepspec_block":
        rank = _get(config, "markov_rank", int, path, default=0)
        conf = _get(config, "enable_confidence_head", bool, path, default=False)
        return "deepspec_dspark" if rank > 0 or conf else "deepspec_dflash"
    return kind


_MISSING = object()


def _get(config: dict, key: str, kind: type, path: str, default=_MISSING, where: str = ""):
    """`config[key]` checked for type; `where` names the nesting (e.g. "dflash_config.")."""
    if key not in config or config[key] is None:
        if default is _MISSING:
            raise DrafterConfigError(_config_file(path), where + key, "required key is missing")
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # a JSON integer beyond float range, e.g. 1e400 written out
            raise DrafterConfigError(_config_file(path), where + key, "integer too large for a float") from None
    # bool is an int subclass in Python: `true` must not pass as a layer count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DrafterConfigError(_config_file(path), where + key, f"expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # json accepts NaN / Infinity
        raise DrafterConfigError(_config_file(path), where + key, f"expected a finite number, got {value!r}")
    return value


def _int_list(config: dict, key: str, path: str, where: str = "", default=_MISSING) -> tuple[int, ...]:
    value = _get(config, key, list, path, default=default, where=where)
    if value is default:
        return value
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DrafterConfigError(_config_file(path), where + key, f"expected a non-empty list of ints, got {value!r}")
    return tuple(value)


def rope_theta(config: dict, path: str) -> float:
    """transformers 5 writes `rope_parameters.rope_theta`; older configs a top-level `rope_theta`."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        kind = params.get("rope_type", "default")
        if kind not in ("default", None):
            raise DrafterConfigError(_config_file(path), "rope_parameters.rope_type", f"unsupported RoPE type {kind!r}")
        return _get(params, "rope_theta", float, path, where="rope_parameters.")
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise DrafterConfigError(_config_file(path), "rope_scaling", f"unsupported RoPE scaling {scaling!r}")
    return _get(config, "rope_theta", float, path)


@dataclass(frozen=True)
class DecoderDims:
    """Shapes of a Qwen3/Llama-style decoder stack."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float


def parse_dims(config: dict, path: str) -> DecoderDims:
    hidden = _get(config, "hidden_size", int, path)
    heads = _get(config, "num_attention_heads", int, path)
    dims = DecoderDims(
        hidden_size=hidden,
        intermediate_size=_get(config, "intermediate_size", int, path),
        num_layers=_get(config, "num_hidden_layers", int, path),
        num_heads=heads,
        num_kv_heads=_get(config, "num_key_value_heads", int, path, default=heads),
        head_dim=_get(config, "head_dim", int, path, default=hidden // max(heads, 1)),
        vocab_size=_get(config, "vocab_size", int, path),
        rms_norm_eps=_get(config, "rms_norm_eps", float, path, default=1e-6),
        rope_theta=rope_theta(config, path),
    )
    config_key = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        value, key = getattr(dims, field), config_key.get(field, field)
        if value <= 0:
            raise DrafterConfigError(_config_file(path), key, f"must be positive, got {value}")
        cap = MAX_COUNT if field in config_key else MAX_WIDTH
        if value > cap:
            raise DrafterConfigError(_config_file(path), key, f"{value} exceeds the sanity limit {cap}")
    for field in ("rms_norm_eps", "rope_theta"):  # a negative RoPE base gives NaN frequencies
        if getattr(dims, field) <= 0:
            raise DrafterConfigError(_config_file(path), field, f"must be > 0, got {getattr(dims, field)}")
    if dims.num_heads % dims.num_kv_heads:
        raise DrafterConfigError(
            _config_file(path), "num_key_value_heads", f"{dims.num_kv_heads} does not divide num_attention_heads={heads}"
        )
    if dims.head_dim % 2:
        raise DrafterConfigError(_config_file(path), "head_dim", f"must be even for rotate-half RoPE, got {dims.head_dim}")
    return dims


@dataclass(frozen=True)
class BlockDrafterConfig:
    """A DSpark or DFlash (block-parallel) drafter, DeepSpec or z-lab format."""

    format: str  # "deepspec_dspark" | "deepspec_dflash" | "zlab_dflash"
    dims: DecoderDims
    block_size: int  # rows per block: [anchor, MASK x (block_size - 1)]
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int | None  # as written in the config (None: absent)
    markov_rank: int  # 0: no Markov head
    markov_head_type: str | None  # vanilla | gated | rnn when markov_rank > 0
    confidence_head: bool
    confidence_with_markov: bool  # confidence features [h ; W1[prev]] instead of [h]
    # True: slot k predicts anchor + k + 1 (DeepSpec). False: only mask slot j predicts, anchor + j
    # (z-lab; speculators' `sample_from_anchor: false`).
    sample_from_anchor: bool = True
    # A draft vocabulary of the checkpoint's own (speculators' d2t/t2d): lm_head and Markov W2 have
    # this many rows. None: the full vocabulary.
    draft_vocab_size: int | None = None
    # Sliding-window layers (speculators `layer_types`): their queries see only the `sliding_window`
    # context positions before the anchor, and the block causally unless `sliding_non_causal`.
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int | None = None
    sliding_non_causal: bool = False

    @property
    def family(self) -> str:
        return FORMAT_FAMILY[self.format][0]

    @property
    def gamma(self) -> int:
        """Drafts per block: DeepSpec's anchor slot predicts too; z-lab drafts from mask slots only."""
        return self.block_size if self.sample_from_anchor else self.block_size - 1

    @property
    def context_width(self) -> int:
        return len(self.target_layer_ids) * self.dims.hidden_size


def zlab_default_layer_ids(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """z-lab's default when `dflash_config.target_layer_ids` is absent."""
    if num_draft_layers == 1:
        return (num_target_layers // 2,)
    span = num_target_layers - 4
    return tuple(int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers))


def _num_target_layers(config: dict, path: str) -> int | None:
    """The target depth a drafter declares (optional); z-lab derives default layer ids from it."""
    num = _get(config, "num_target_layers", int, path, default=None)
    if num is not None and not 1 <= num <= MAX_COUNT:
        shown = num if abs(num) < 10**12 else f"a {num.bit_length()}-bit integer"
        raise DrafterConfigError(_config_file(path), "num_target_layers", f"must be in [1, {MAX_COUNT}], got {shown}")
    return num


def parse_block_config(config: dict, fmt: str, path: str) -> BlockDrafterConfig:
    dims = parse_dims(config, path)
    if fmt == "zlab_dflash":
        nested = _get(config, "dflash_config", dict, path)
        where = "dflash_config."
        num_target = _num_target_layers(config, path)
        mask = _get(nested, "mask_token_id", int, path, where=where)
        default_ids = None if num_target is None else zlab_default_layer_ids(num_target, dims.num_layers)
        layer_ids = _int_list(nested, "target_layer_ids", path, where=where, default=default_ids)
        if layer_ids is None:
            raise DrafterConfigError(_config_file(path), "dflash_config.target_layer_ids", "missing, and no num_target_layers for z-lab's default")
        rank, head, conf, conf_markov = 0, None, False, False
    else:
        num_target = _num_target_layers(config, path)
        mask = _get(config, "mask_token_id", int, path)
        layer_ids = _int_list(config, "target_layer_ids", path)
        rank = _get(config, "markov_rank", int, path, default=0)
        head = _get(config, "markov_head_type", str, path) if rank > 0 else None
        conf = _get(config, "enable_confidence_head", bool, path, default=False)
        conf_markov = _get(config, "confidence_head_with_markov", bool, path, default=False) if conf else False
        if not 0 <= rank <= MAX_WIDTH:
            raise DrafterConfigError(_config_file(path), "markov_rank", f"must be in [0, {MAX_WIDTH}], got {rank}")
        if head is not None and head not in MARKOV_HEAD_TYPES:
            raise DrafterConfigError(_config_file(path), "markov_head_type", f"{head!r} is not one of {list(MARKOV_HEAD_TYPES)}")
        if conf_markov and rank == 0:
            raise DrafterConfigError(_config_file(path), "confidence_head_with_markov", "true but markov_rank is 0 (no W1 to read)")
    block = _get(config, "block_size", int, path)
    if block < 2:
        raise DrafterConfigError(_config_file(path), "block_size", f"must be >= 2 (an anchor and at least one mask), got {block}")
    if block > MAX_DRAFTS_PER_BLOCK:
        raise DrafterConfigError(_config_file(path), "block_size", f"{block} exceeds the sanity limit {MAX_DRAFTS_PER_BLOCK}")
    return BlockDrafterConfig(fmt, dims, block, mask, layer_ids, num_target, rank, head, conf, conf_markov,
                              sample_from_anchor=fmt != "zlab_dflash")


@dataclass(frozen=True)
class Eagle3Config:
    """An Eagle3 drafter (DeepSpec full-vocab, or SpecForge reduced-vocab with d2t/t2d)."""

    format: str  # "deepspec_eagle3" | "specforge_eagle3"
    dims: DecoderDims
    target_layer_ids: tuple[int, ...]
    num_target_layers: int | None
    draft_vocab_size: int
    gamma: int  # autoregressive steps per block
    qk_norms: bool | None = None  # None: by format (speculators: by transformer_layer_config.model_type)
    # speculators Eagle3 variants (all off in the other formats):
    norm_before_residual: bool = False  # the layer's residual is hidden_norm(g), not g
    norm_output: bool = False  # the state fed to the next step is norm(x), not x (Eagle 3.1)
    fc_input_norm: str | None = None  # "concat": one RMSNorm over [c_l1 ; c_l2 ; ...] before fc; "per_layer": one per c_l

    @property
    def qk_norm(self) -> bool:
        if self.qk_norms is not None:
            return self.qk_norms
        return self.format == "deepspec_eagle3"  # Qwen3 q/k norms; SpecForge's Llama layer has none


def parse_eagle3_config(config: dict, fmt: str, path: str, target_num_layers: int | None = None) -> Eagle3Config:
    dims = parse_dims(config, path)
    if fmt == "deepspec_eagle3":
        layer_ids = _int_list(config, "target_layer_ids", path)
        draft_vocab = dims.vocab_size
    else:
        eagle = _get(config, "eagle_config", dict, path, default={})
        default = None
        if target_num_layers is not None:  # SpecForge's default [1, L//2 - 1, L - 4]
            L = target_num_layers
            default = (1, L // 2 - 1, L - 4)
        # Without the key and without a target (describe_drafter), the ids stay unresolved: ().
        layer_ids = _int_list(eagle, "eagle_aux_hidden_state_layer_ids", path, where="eagle_config.", default=default) or ()
        draft_vocab = _get(config, "draft_vocab_size", int, path, default=dims.vocab_size)
        if not 0 < draft_vocab <= MAX_WIDTH:
            raise DrafterConfigError(_config_file(path), "draft_vocab_size", f"must be in [1, {MAX_WIDTH}], got {draft_vocab}")
    gamma = _get(config, "ttt_length", int, path, default=EAGLE3_DEFAULT_GAMMA)
    if gamma > MAX_DRAFTS_PER_BLOCK:
        raise DrafterConfigError(_config_file(path), "ttt_length", f"{gamma} exceeds the sanity limit {MAX_DRAFTS_PER_BLOCK}")
    num_target = _num_target_layers(config, path)
    return Eagle3Config(fmt, dims, layer_ids, num_target, draft_vocab, gamma)


def validate_against_target(cfg: BlockDrafterConfig | Eagle3Config, target: TargetSpec, path: str) -> None:
    """Raise TargetMismatchError when the drafter was built for a different target."""
    file, dims = _config_file(path), cfg.dims
    if dims.hidden_size != target.hidden_size:
        raise TargetMismatchError(file, "hidden_size", f"drafter has {dims.hidden_size}, target has {target.hidden_size}")
    if dims.vocab_size != target.vocab_size:
        raise TargetMismatchError(file, "vocab_size", f"drafter has {dims.vocab_size}, target has {target.vocab_size}")
    if cfg.num_target_layers is not None and cfg.num_target_layers != target.num_hidden_layers:
        raise TargetMismatchError(
            file, "num_target_layers", f"drafter was trained on {cfg.num_target_layers} layers, target has {target.num_hidden_layers}"
        )
    if not cfg.target_layer_ids:
        raise DrafterConfigError(file, "target_layer_ids", "no target layer ids in the config")
    # DeepSpec: -1 is the embedding output; so is speculators' id 0 (its ids are ours + 1).
    low = -1 if cfg.format.startswith(("deepspec", "speculators")) else 0
    bad = [l for l in cfg.target_layer_ids if not low <= l < target.num_hidden_layers]
    if bad:
        raise TargetMismatchError(
            file, "target_layer_ids", f"{bad} outside [{low}, {target.num_hidden_layers - 1}] for a {target.num_hidden_layers}-layer target"
        )
    if isinstance(cfg, BlockDrafterConfig) and not 0 <= cfg.mask_token_id < target.vocab_size:
        field = "dflash_config.mask_token_id" if cfg.format == "zlab_dflash" else "mask_token_id"
        raise TargetMismatchError(file, field, f"{cfg.mask_token_id} is outside the target vocabulary [0, {target.vocab_size})")
