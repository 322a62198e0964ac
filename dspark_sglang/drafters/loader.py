"""`load_drafter`: any supported checkpoint directory -> a ready `Drafter`; `describe_drafter`.

| format key | class | from the target |
|---|---|---|
| deepspec_dspark, deepspec_dflash | `dspark.DSparkDrafter` | features (embed/lm_head copies: see below) |
| zlab_dflash | `dflash_zlab.ZlabDFlashDrafter` | features, `embed_tokens`, `lm_head` |
| deepspec_eagle3, specforge_eagle3, speculators_eagle3 | `eagle3.build_eagle3` (imported lazily) | see eagle3.py |
| speculators_dspark, speculators_dflash | `speculators_format.build_block` -> `dspark.DSparkDrafter` | features, `embed_tokens`, `lm_head` (full vocabulary) |

Borrowed copies. DeepSpec checkpoints (DSpark, DFlash, Eagle3) normally carry `embed_tokens.weight`
and `lm_head.weight`, frozen copies of the target's. A checkpoint may omit either copy (the project's
own zoo drafters do, to stay small): the missing tensor is then taken from `TargetSpec.embed_tokens`
/ `TargetSpec.lm_head`, checked for shape (`check_target_tensor`), before the usual strict
assignment. A DeepSpec checkpoint that omits a copy while the TargetSpec lacks that tensor fails with
a `TargetMismatchError` naming it: nothing is left at random init.

Order of checks: config.json and the safetensors headers (cheap) -> format -> config fields ->
target compatibility -> tensor data -> strict weight assignment. Every failure is a
`DrafterLoadError` subclass naming the file and the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark_sglang.drafters.checkpoint import check_target_tensor, read_config, read_tensor_shapes, read_tensors
from dspark_sglang.drafters.config import (
    FORMAT_FAMILY,
    BlockDrafterConfig,
    Eagle3Config,
    detect_format,
    parse_block_config,
    parse_eagle3_config,
    validate_against_target,
)
from dspark_sglang.drafters.errors import DrafterConfigError
from dspark_sglang.drafters.interface import Drafter, TargetSpec


def _build_deepspec_block(cfg, tensors, target, path, dtype, device):
    from dspark_sglang.drafters.dspark import DSparkDrafter

    return DSparkDrafter.from_checkpoint(cfg, tensors, path, dtype, device)


def _build_zlab(cfg, tensors, target, path, dtype, device):
    from dspark_sglang.drafters.dflash_zlab import ZlabDFlashDrafter

    return ZlabDFlashDrafter.from_checkpoint(cfg, tensors, target, path, dtype, device)


def _build_speculators_block(cfg, tensors, target, path, dtype, device):
    from dspark_sglang.drafters.speculators_format import build_block

    return build_block(cfg, tensors, target, path, dtype, device)


# format key -> factory(parsed config, tensors, target, path, dtype, device) for the block drafters.
BLOCK_FACTORIES = {
    "deepspec_dspark": _build_deepspec_block,
    "deepspec_dflash": _build_deepspec_block,
    "zlab_dflash": _build_zlab,
    "speculators_dspark": _build_speculators_block,
    "speculators_dflash": _build_speculators_block,
}


# DeepSpec formats whose checkpoints may omit the frozen copies of the target's weights.
_BORROWABLE = {
    "deepspec_dspark": ("embed_tokens", "lm_head"),
    "deepspec_dflash": ("embed_tokens", "lm_head"),
    "deepspec_eagle3": ("embed_tokens", "lm_head"),  # full-vocabulary lm_head
    # speculators rebuilds a missing full-vocabulary lm_head from the verifier (a missing embedding is
    # borrowed by build_eagle3 itself); a draft-vocabulary lm_head must be in the checkpoint.
    "speculators_eagle3": ("lm_head",),
}


def _borrow_target_copies(fmt: str, cfg, tensors: dict[str, torch.Tensor], target: TargetSpec, path: str,
                          dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Fill in a DeepSpec checkpoint's omitted `embed_tokens.weight` / `lm_head.weight` from the target."""
    missing = [name for name in _BORROWABLE.get(fmt, ()) if f"{name}.weight" not in tensors]
    if getattr(cfg, "draft_vocab_size", None) not in (None, cfg.dims.vocab_size):
        missing = [name for name in missing if name != "lm_head"]  # [Vd, H]: nothing to borrow
    if not missing:
        return tensors
    shape = (cfg.dims.vocab_size, cfg.dims.hidden_size)
    filled = dict(tensors)
    for name in missing:
        filled[f"{name}.weight"] = check_target_tensor(getattr(target, name), name, shape, path, dtype, device)
    return filled


def _parse(config: dict, fmt: str, path: str, target_num_layers: int | None, shapes: dict) -> BlockDrafterConfig | Eagle3Config:
    if fmt.startswith("speculators"):
        from dspark_sglang.drafters.speculators_format import parse_speculators

        cfg = parse_speculators(config, path)
        if isinstance(cfg, Eagle3Config):
            return cfg
    elif FORMAT_FAMILY[fmt][0] == "eagle3":
        return parse_eagle3_config(config, fmt, path, target_num_layers)
    else:
        cfg = parse_block_config(config, fmt, path)
    # Headers before building: modules are built per layer (on meta, but still one Python object
    # each), so a hostile num_hidden_layers of 10**9 must be refused before anything is built.
    stored = {name.split(".")[1] for name in shapes if name.startswith("layers.") and name.count(".") >= 2}
    if cfg.dims.num_layers > len(stored):
        raise DrafterConfigError(
            str(Path(path) / "config.json"), "num_hidden_layers",
            f"{cfg.dims.num_layers} layers, but the safetensors headers hold tensors for {len(stored)}",
        )
    return cfg


def load_drafter(
    path: str | os.PathLike,
    target: TargetSpec,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    draft_vocab: str | os.PathLike | None = "auto",
) -> Drafter:
    """Load the drafter checkpoint at `path` for `target`. Never executes checkpoint code.

    draft_vocab: "auto" (default) drafts over the reduced vocabulary in `draft_vocab.safetensors`
    beside the checkpoint when there is one (draft_vocab.py); None or "none" over the full
    vocabulary; any other value is the path of such a file."""
    drafter = _load_checkpoint(str(path), target, dtype, device)
    vocab_file = _draft_vocab_file(str(path), draft_vocab)
    if vocab_file is not None:
        from dspark_sglang.drafters import draft_vocab as dv

        vocab = dv.load(vocab_file, target.vocab_size)
        try:
            drafter.restrict_vocab(vocab)
        except ValueError as exc:
            raise DrafterConfigError(str(vocab_file), "draft vocabulary", str(exc)) from None
    return drafter


def _draft_vocab_file(path: str, draft_vocab) -> Path | None:
    from dspark_sglang.drafters.draft_vocab import beside

    if draft_vocab is None or str(draft_vocab).lower() == "none":
        return None
    if str(draft_vocab).lower() == "auto":
        found = beside(path)
        return found if found.exists() else None
    explicit = Path(draft_vocab)
    if not explicit.is_file():
        raise DrafterConfigError(str(explicit), "draft vocabulary", "no such file")
    return explicit


def _load_checkpoint(path: str, target: TargetSpec, dtype: torch.dtype, device) -> Drafter:
    config = read_config(path)
    if "dspark_test_drafter" in config:  # the validation drafter of the losslessness tests (tempered.py)
        from dspark_sglang.drafters.tempered import CONFIG_KEY, load_tempered

        return load_tempered(path, config[CONFIG_KEY], target, device)
    shapes = read_tensor_shapes(path)  # headers only: a garbage file fails before anything heavy
    fmt = detect_format(config, shapes.keys(), path)
    cfg = _parse(config, fmt, path, target.num_hidden_layers, shapes)
    if fmt.startswith("speculators"):
        from dspark_sglang.drafters.speculators_format import check_target

        check_target(cfg, target, path)
    validate_against_target(cfg, target, path)
    tensors = _borrow_target_copies(fmt, cfg, read_tensors(path), target, path, dtype, device)
    if isinstance(cfg, Eagle3Config):
        # NOTE: written by the Eagle3 owner; imported lazily so block drafters never depend on it.
        from dspark_sglang.drafters.eagle3 import build_eagle3

        return build_eagle3(config, tensors, FORMAT_FAMILY[fmt][1], target, path, dtype, device)
    return BLOCK_FACTORIES[fmt](cfg, tensors, target, path, dtype, device)


@dataclass(frozen=True)
class DrafterDescription:
    """Static facts about a checkpoint, read from config.json and the safetensors headers only."""

    path: str
    format: str  # FORMAT_FAMILY key, e.g. "deepspec_dspark"
    family: str  # "dspark" | "dflash" | "eagle3"
    source: str  # "deepspec" | "zlab" | "specforge" | "speculators"
    architecture: str
    gamma: int  # drafts per block (Eagle3: autoregressive steps)
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_layer_ids: tuple[int, ...]  # () when the config leaves them to the target
    num_target_layers: int | None
    block_size: int | None  # block drafters only
    mask_token_id: int | None  # block drafters only
    markov_head_type: str | None
    has_confidence_head: bool
    borrows_from_target: tuple[str, ...]  # target weights needed at run time
    num_parameters: int  # in the checkpoint (borrowed target weights not counted)

    def as_row(self) -> dict:
        """One row for a README table or a CLI listing."""
        heads = "+".join(filter(None, [self.markov_head_type and f"markov:{self.markov_head_type}",
                                       "confidence" if self.has_confidence_head else None])) or "-"
        return {
            "format": self.format, "gamma": self.gamma, "layers": self.num_layers, "hidden": self.hidden_size,
            "vocab": self.vocab_size if self.draft_vocab_size == self.vocab_size else f"{self.draft_vocab_size}/{self.vocab_size}",
            "target layers": list(self.target_layer_ids), "heads": heads,
            "borrows": ",".join(self.borrows_from_target) or "-", "params": self.num_parameters,
        }


def describe_drafter(path: str | os.PathLike) -> DrafterDescription:
    """Describe the checkpoint at `path` without loading tensor data or needing the target."""
    path = str(path)
    config = read_config(path)
    if "dspark_test_drafter" in config:
        from dspark_sglang.drafters.tempered import describe_tempered

        return describe_tempered(path, config)
    shapes = read_tensor_shapes(path)
    fmt = detect_format(config, shapes.keys(), path)
    family, source = FORMAT_FAMILY[fmt]
    cfg = _parse(config, fmt, path, None, shapes)
    dims = cfg.dims
    borrows = [name for name in ("embed_tokens", "lm_head") if f"{name}.weight" not in shapes]
    if isinstance(cfg, BlockDrafterConfig):
        block, mask, head, conf, draft_vocab = (
            cfg.block_size, cfg.mask_token_id, cfg.markov_head_type, cfg.confidence_head,
            cfg.draft_vocab_size or dims.vocab_size,
        )
    else:
        block, mask, head, conf, draft_vocab = None, None, None, False, cfg.draft_vocab_size
        if fmt == "specforge_eagle3" or draft_vocab < dims.vocab_size:  # a reduced-vocabulary lm_head: the checkpoint's own
            borrows = [b for b in borrows if b == "embed_tokens"]
    return DrafterDescription(
        path=path, format=fmt, family=family, source=source,
        architecture=(config.get("architectures") or ["?"])[0], gamma=cfg.gamma, num_layers=dims.num_layers,
        hidden_size=dims.hidden_size, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
        vocab_size=dims.vocab_size, draft_vocab_size=draft_vocab,
        target_layer_ids=tuple(cfg.target_layer_ids), num_target_layers=cfg.num_target_layers,
        block_size=block, mask_token_id=mask, markov_head_type=head, has_confidence_head=conf,
        borrows_from_target=tuple(borrows),
        num_parameters=sum(math.prod(shape) for shape in shapes.values()),
    )
