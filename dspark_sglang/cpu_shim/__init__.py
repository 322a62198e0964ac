"""CPU fallback for `sgl_kernel`: `common_ops.py` in this directory is what sgl_kernel's loader
imports (`import common_ops`) when its CUDA extensions cannot load. Put `shim_dir()` on PYTHONPATH;
`dspark_sglang.cpu_mode.enable_cpu_mode()` does that for this process and its children."""

from pathlib import Path


def shim_dir() -> str:
    return str(Path(__file__).resolve().parent)
