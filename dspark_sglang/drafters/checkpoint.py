"""Reading drafter checkpoints: `config.json` plus safetensors (single file or sharded).

Safety: only safetensors are read (no `torch.load`, no pickle), and `auto_map` / remote code in
`config.json` is ignored: nothing from a checkpoint directory is ever imported or executed. A
directory holding only `pytorch_model.bin` is refused rather than unpickled.

Strictness: `load_weights` maps tensors onto freshly built modules by exact name. A missing or an
unexpected tensor, a wrong shape or a wrong kind of dtype is an error that names the tensor; the
modules are built on the `meta` device, so a parameter the checkpoint did not supply cannot be
silently left at random init (it has no storage at all).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from dspark_sglang.drafters.errors import (
    DrafterConfigError,
    DrafterLoadError,
    DrafterWeightsError,
    TargetMismatchError,
)
from dspark_sglang.jsonio import JSON_PARSE_ERRORS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _as_dir(path: str | os.PathLike) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise DrafterLoadError(str(path), "path", "is not a checkpoint directory (expected config.json + model.safetensors)")
    return root


def read_config(path: str | os.PathLike) -> dict:
    """Parse `<path>/config.json` into a dict. `auto_map` is left in the dict but never acted on."""
    file = _as_dir(path) / CONFIG_NAME
    if not file.is_file():
        raise DrafterConfigError(str(file), CONFIG_NAME, "file not found")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except JSON_PARSE_ERRORS as exc:
        raise DrafterConfigError(str(file), CONFIG_NAME, f"malformed JSON: {exc}") from None
    except OSError as exc:
        raise DrafterConfigError(str(file), CONFIG_NAME, f"cannot read ({exc})") from None
    if not isinstance(config, dict):
        raise DrafterConfigError(str(file), CONFIG_NAME, f"top level must be a JSON object, got {type(config).__name__}")
    return config


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DrafterWeightsError(str(file), file.name, f"not a readable safetensors file ({exc})") from None


def _shard_files(root: Path) -> dict[str, list[str]]:
    """`{shard file name: [tensor names]}` from a sharded checkpoint's index."""
    index_file = root / INDEX_NAME
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except JSON_PARSE_ERRORS as exc:
        raise DrafterWeightsError(str(index_file), INDEX_NAME, f"malformed JSON: {exc}") from None
    except OSError as exc:
        raise DrafterWeightsError(str(index_file), INDEX_NAME, f"cannot read ({exc})") from None
    except (KeyError, TypeError):
        raise DrafterWeightsError(str(index_file), "weight_map", "missing or not an object") from None
    if not isinstance(weight_map, dict):
        raise DrafterWeightsError(str(index_file), "weight_map", "must map tensor names to shard file names")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        # A shard name is a plain file name next to the index: never a path out of the directory.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise DrafterWeightsError(str(index_file), f"weight_map[{name!r}]", f"bad shard file name {shard!r}")
        shards.setdefault(shard, []).append(name)
    return shards


def _weight_files(root: Path) -> dict[Path, list[str] | None]:
    """`{file: tensor names the index assigns to it (None for a single file)}`."""
    single, index = root / WEIGHTS_NAME, root / INDEX_NAME
    if single.is_file():
        return {single: None}
    if not index.is_file():
        pickles = [name for name in _PICKLE_NAMES if (root / name).exists()]
        problem = "no model.safetensors or model.safetensors.index.json"
        if pickles:
            problem += f"; found {pickles}, which are pickle files and are refused (convert to safetensors)"
        raise DrafterWeightsError(str(root), WEIGHTS_NAME, problem)
    files = {root / shard: names for shard, names in _shard_files(root).items()}
    for file in files:
        if not file.is_file():
            raise DrafterWeightsError(str(file), file.name, "shard listed in the index is missing")
    return files


def _check_shard(file: Path, listed: list[str] | None, present) -> None:
    if listed is None:
        return
    absent, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if absent or extra:
        raise DrafterWeightsError(
            str(file), file.name, f"disagrees with {INDEX_NAME}: listed but absent {absent}, present but unlisted {extra}"
        )


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at `path`, on CPU, in their stored dtype.

    Reads `model.safetensors`, or else the shards listed in `model.safetensors.index.json` (each
    shard must hold exactly the tensors the index assigns to it).
    """
    tensors: dict[str, torch.Tensor] = {}
    for file, listed in _weight_files(_as_dir(path)).items():
        loaded = _load_safetensors(file)
        _check_shard(file, listed, loaded.keys())
        tensors.update(loaded)
    return tensors


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """`(config dict, {tensor name: CPU tensor})` for the checkpoint directory `path`."""
    return read_config(path), read_tensors(path)


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers only (cheap: no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, listed in _weight_files(_as_dir(path)).items():
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
                for name in names:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DrafterWeightsError(str(file), file.name, f"not a readable safetensors file ({exc})") from None
        _check_shard(file, listed, names)
    return shapes


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


def _format_names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_weights(
    parts: dict[str, nn.Module],
    tensors: dict[str, torch.Tensor],
    path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> None:
    """Assign `tensors` to the modules in `parts`, strictly.

    `parts` maps a name prefix to a module: `{"": backbone, "markov_head.": head}` expects
    `fc.weight` on the backbone and `markov_head.markov_w1.weight` on the head. Every tensor the
    modules expect must be present with the module's shape, and no other tensor may be present.
    Floating tensors are converted to `dtype`; integer and bool buffers keep their own dtype but
    must be stored as integers / bools. Modules may live on `meta` (recommended): tensors are
    assigned, not copied, so nothing remains at random init.
    """
    expected: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for prefix, module in parts.items():
        for key, ref in module.state_dict(keep_vars=True).items():
            expected[prefix + key] = (module, key, ref)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors [{_format_names(missing)}]")
        if unexpected:
            problems.append(f"unexpected tensors [{_format_names(unexpected)}]")
        field = (missing or unexpected)[0]
        raise DrafterWeightsError(path, field, "; ".join(problems))

    per_module: dict[int, dict[str, torch.Tensor]] = {}
    for name, (module, key, ref) in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise DrafterWeightsError(
                path, name, f"shape {list(tensor.shape)} does not match the expected {list(ref.shape)}"
            )
        want, got = _dtype_kind(ref.dtype), _dtype_kind(tensor.dtype)
        if want != got:
            raise DrafterWeightsError(path, name, f"dtype {tensor.dtype} where a {want} tensor is expected")
        target_dtype = dtype if want == "float" else ref.dtype
        per_module.setdefault(id(module), {})[key] = tensor.to(device=device, dtype=target_dtype)
    for module in parts.values():
        module.load_state_dict(per_module.get(id(module), {}), strict=True, assign=True)
        leftovers = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if leftovers:  # a non-persistent buffer the module forgot to materialise
            raise DrafterWeightsError(path, leftovers[0], "was not materialised by the checkpoint")


def check_target_tensor(
    tensor: torch.Tensor | None,
    name: str,
    shape: tuple[int, ...],
    path: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """A weight borrowed from the target (embedding, LM head), checked and moved to dtype/device."""
    if tensor is None:
        raise TargetMismatchError(path, name, "this drafter borrows the target's weight, but the TargetSpec has none")
    if tuple(tensor.shape) != tuple(shape):
        raise TargetMismatchError(path, name, f"target's shape {list(tensor.shape)} differs from the expected {list(shape)}")
    if not tensor.dtype.is_floating_point:
        raise TargetMismatchError(path, name, f"target's tensor has dtype {tensor.dtype}, expected floating point")
    return tensor.to(device=device, dtype=dtype)
