"""Faster float32 matmuls for few rows on CPU: the kernels behind `DSPARK_CPU_GEMM`, and `linear`.

Pure torch + numba (no sglang): `dspark_sglang/sglang/cpu_gemm.py` routes SGLang's linear layers and LM
head here, and the drafters call `linear` / `Linear` for their own matmuls, so one setting serves the
target and the drafter alike. Nothing changes until `select` names a kernel: `linear` is then
`F.linear` (and it always is for tensors that need gradients, off CPU, or outside float32).

On a CPU, a decode step of a small model and a speculative verify of a few tokens are
weight-bound: every matmul streams its whole weight for 1-16 rows of activations. PyTorch's
`F.linear(x, W)` for such rows takes a path that does not stay weight-bound in float32. Measured
on this project's 2-core machine (one thread, SmolLM2-135M's shapes, 30 layers + LM head, weights
streamed from memory, best of 5, nothing else running; `python -m dspark_sglang.benchmarks.cpu_gemm`
re-measures it on yours; examples/bench/cpu-gemm-row-block/results.json, 2026-12-08):

    rows                      1      2      3      4      5      6      8     16     24     32
    F.linear (stock)        45 ms  78 ms 102 ms  65 ms  75 ms  73 ms  74 ms  96 ms 118 ms 142 ms
    few-rows: W @ x^T       30 ms  30 ms  46 ms  50 ms  60 ms  71 ms  77 ms 115 ms 150 ms 161 ms
    row-dot (numba)         25 ms  28 ms  28 ms  33 ms  37 ms  44 ms  53 ms  89 ms 118 ms 151 ms

Two kernels, chosen by `DSPARK_CPU_GEMM`:
- ``few-rows``: `W @ x^T` (the weight as the left operand of BLAS's GEMM) keeps 2 rows at the cost of
  one (1-5 rows in the layers, 1-8 in the LM head);
- ``row-dot``: blocks of up to 5 activation rows, one pass over the weight per block, compiled with
  numba (1-16 rows). It keeps 3 rows at 1.15x and 4 at 1.34x the cost of one, and a row's result does
  not depend on how many rows came with it, so a verify row equals the decode step's bit for bit.
  Past 5 rows it is 2+ passes; from 24 rows on the stock GEMM is as fast, and the hooks hand it back.
In the engine, row-dot made the batch-1 decode step 0.79x few-rows' (42.5 vs 53.7 ms) and a W = 3 verify
1.15x that step (examples/bench/round-cost, session 6). Why not register-block several weight rows
per pass: examples/bench/cpu-gemm-row-block/variants.py. In bfloat16 the stock path is already
weight-bound: only float32 is served here.

Both change the last bits of float32 results against stock, so they are opt-in and apply to every
engine of a process tree alike: `DSPARK_CPU_GEMM=few-rows|row-dot` in the environment of a plain or a
speculative server. Benchmarks that compare plain with speculative decoding set it for both or for
neither. The drafter's own matmuls take the same kernel; its outputs only decide what gets verified.
"""

from __future__ import annotations

import dataclasses
import functools

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Row counts served by W @ x^T (measured table above): up to 5 rows for the decoder layers' mixed
# shapes, up to 8 for the wide LM head, where the stock path stays slower for longer.
MAX_ROWS_LINEAR = 5
MAX_ROWS_LM_HEAD = 8
ROW_DOT_MAX_ROWS = 16  # row-dot is ahead of stock through 16 rows and level at 24 (table above)


def few_row_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """x @ weight.T + bias ([M, N], contiguous) with the weight as the left operand of the GEMM."""
    rows = x if x.shape[0] > 1 else torch.cat([x, x])  # one row: a GEMV, the slow path; two: a GEMM
    out = torch.mm(weight, rows.t()).t()[: x.shape[0]].contiguous()  # [M, N]
    return out if bias is None else out + bias


ROW_BLOCK_MAX = 5  # rows one pass over a weight serves (6+ gave no gain; 8 spills registers: see row_block_kernel)


def _row_block_source(block: int) -> str:
    """Source of the kernel for `block` activation rows: one pass over weight row j feeds `block` scalar
    accumulators, so the row streams from memory once and is read from L1 once per k for all of them."""
    acc = [f"acc{i}" for i in range(block)]
    return "\n".join([
        "def kernel(x, weight, out):  # x [block, K], weight [N, K], out [block, N]: float32 numpy views",
        "    for j in range(weight.shape[0]):",
        *[f"        {a} = np.float32(0.0)" for a in acc],
        "        for k in range(x.shape[1]):",
        "            w = weight[j, k]",
        *[f"            {a} += x[{i}, k] * w" for i, a in enumerate(acc)],
        *[f"        out[{i}, j] = {a}" for i, a in enumerate(acc)],
    ])


@functools.cache
def row_block_kernel(block: int):
    """The compiled kernel for `block` (1..ROW_BLOCK_MAX) rows. Every accumulator is the same vectorized
    reduction over k whatever `block` is, so a row's result does not depend on the rows beside it
    (tests/unit/test_cpu_gemm.py checks it bit for bit; at 8 accumulators LLVM splits the reduction
    differently, so blocks stop at 5)."""
    if not 1 <= block <= ROW_BLOCK_MAX:
        raise ValueError(f"row block of {block} rows: expected 1..{ROW_BLOCK_MAX}")
    namespace = {"np": np}
    exec(compile(_row_block_source(block), f"<row_block_kernel {block}>", "exec"), namespace)
    return numba.njit(fastmath=True, nogil=True)(namespace["kernel"])


def row_blocks(rows: int) -> list[int]:
    """Near-equal block sizes of at most ROW_BLOCK_MAX that add up to `rows` (7 -> [4, 3])."""
    count = -(-rows // ROW_BLOCK_MAX)
    return [rows // count + (i < rows % count) for i in range(count)]


def row_dot_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """x @ weight.T + bias ([M, N]) in blocks of up to ROW_BLOCK_MAX rows, one pass over the weight per
    block (numba): up to 5 rows cost about what one row costs, and row m's result does not depend on M,
    so a verify row equals the decode step's for the same input bit for bit."""
    rows = x.detach().contiguous().numpy()  # numba reads numpy views (callers run without autograd)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    weight_np, out_np = weight.detach().contiguous().numpy(), out.numpy()
    start = 0
    for block in row_blocks(x.shape[0]):
        row_block_kernel(block)(rows[start:start + block], weight_np, out_np[start:start + block])
        start += block
    return out if bias is None else out + bias


def serves(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether a few-row kernel should replace the stock matmul for these operands."""
    return (
        x.device.type == "cpu" and weight.device.type == "cpu"
        and x.dtype == torch.float32 and weight.dtype == torch.float32
        and x.dim() == 2 and weight.dim() == 2 and 0 < x.shape[0] <= max_rows
        and x.shape[1] == weight.shape[1]
    )


KERNELS = {"few-rows": few_row_linear, "row-dot": row_dot_linear}
# Each kernel's row range: (decoder layers, LM head).
KERNEL_MAX_ROWS = {"few-rows": (MAX_ROWS_LINEAR, MAX_ROWS_LM_HEAD), "row-dot": (ROW_DOT_MAX_ROWS, ROW_DOT_MAX_ROWS)}


@dataclasses.dataclass(frozen=True)
class Selection:
    """The kernel in use and its row ranges (decoder layers / any other matmul, LM head)."""

    name: str
    kernel: object  # (x [M, K], weight [N, K], bias [N] | None) -> [M, N]
    max_rows_linear: int
    max_rows_lm_head: int


_selection: Selection | None = None  # None: every matmul takes F.linear


def select(name: str | None) -> None:
    """Use kernel `name` (a KERNELS key) from now on in this process; None: the stock path."""
    global _selection
    if name is None:
        _selection = None
        return
    if name not in KERNELS:
        raise ValueError(f"unknown CPU GEMM kernel {name!r}: expected one of {', '.join(KERNELS)}")
    _selection = Selection(name, KERNELS[name], *KERNEL_MAX_ROWS[name])


def selection() -> Selection | None:
    return _selection


def kernel_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, lm_head: bool = False):
    """The selected kernel when it should compute `F.linear(x [M, K], weight, bias)` (float32 on CPU,
    within its row range for a decoder layer or an LM head), else None: the stock path."""
    chosen = _selection
    if chosen is None:
        return None
    max_rows = chosen.max_rows_lm_head if lm_head else chosen.max_rows_linear
    if serves(x, weight, max_rows) and (bias is None or bias.dtype == torch.float32):
        return chosen.kernel
    return None


def linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """`F.linear`, through the selected few-row kernel when one is selected and the operands qualify
    (no gradients needed, float32 on CPU, at most its row range of rows)."""
    if _selection is not None and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x  # [M, K]
        kernel = kernel_for(rows, weight, bias)
        if kernel is not None:
            return kernel(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
