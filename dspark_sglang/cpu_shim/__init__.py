"""CPU fallback for `sgl_kernel`: `common_ops.py` in this directory is what sgl_kernel's loader
imports (`import common_ops`) when its CUDA extensions cannot load. Put `shim_dir()` on PYTHONPATH;
`dspark_sglang.cpu_mode.enable_cpu_mode()` does that for this process and its children.

Do not import `common_ops` directly: only sgl_kernel's loader should, after its real builds failed."""

from pathlib import Path


def shim_dir() -> str:
    """The directory holding `common_ops.py` (absolute)."""
    return str(Path(__file__).resolve().parent)
