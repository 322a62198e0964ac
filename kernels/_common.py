"""Launcher helpers shared by the kernels: validation that raises ValueError naming the file and
the field, block-size choice, and interpreter detection.

Nothing here touches a device at import time (the package must import on a machine without a
GPU), and the environment is read at call time.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class KernelInputError(ValueError):
    """A kernel launcher was given a mis-shaped, mistyped or non-contiguous tensor."""


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def vocab_block(vocab: int, block: int | None, *, gpu_max: int = 2048, interp_max: int = 16384) -> int:
    """Tile width over the vocabulary: the caller's choice, else the next power of two capped at
    ``gpu_max`` (registers) or, under the interpreter (cost per block iteration), ``interp_max``."""
    if block is not None:
        if block < 16 or block & (block - 1):
            raise KernelInputError(f"block size must be a power of two >= 16, got {block}")
        return block
    return max(16, min(next_pow2(vocab), interp_max if interpreting() else gpu_max))


def rank_offsets(num_reqs: int, num_pos: int, device) -> torch.Tensor:
    """[R, L] int64 tie-break offsets N-1-(k*R + r), as the schedulers' workspace builds them
    (position-major index k*R + r; larger offset = earlier in the shared order on ties)."""
    total = num_reqs * num_pos
    order = torch.arange(total - 1, -1, -1, dtype=torch.int64, device=device)
    return order.view(num_pos, num_reqs).t().contiguous()


def check(where: str, condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(f"{where}: {message}")


def check_tensor(
    where: str,
    name: str,
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
    *,
    inner_contiguous: bool = True,
) -> None:
    """Shape, dtype, device and (optionally) a unit stride on the last dimension."""
    if not isinstance(tensor, torch.Tensor):
        raise KernelInputError(f"{where}: {name} must be a tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise KernelInputError(f"{where}: {name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise KernelInputError(
            f"{where}: {name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}"
        )
    if tensor.device != device:
        raise KernelInputError(f"{where}: {name} is on {tensor.device}, expected {device}")
    if inner_contiguous and tensor.ndim and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise KernelInputError(
            f"{where}: {name} must have unit stride on its last dimension, got strides {tensor.stride()}"
        )
