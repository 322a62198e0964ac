"""Kernel or reference: one switch for every fused op.

Each function here has its reference's signature plus a keyword ``backend``, and routes to the
Triton kernel (kernels/*.py) or to the torch reference in the core:

- ``backend`` argument, else the environment variable ``DSPARK_KERNELS``, read at every call (not
  at import): ``auto`` (default) | ``triton`` | ``torch``;
- ``auto``: CUDA tensors use the kernel, anything else the reference (the CPU path);
- ``triton`` forces the kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests);
  on CPU without the interpreter it raises ValueError rather than failing inside Triton;
- ``torch`` forces the reference.

Layering: the core (dspark_sglang/, drafters included) never imports this package; the worker
calls these functions (or hands them to the core as callables). Kernel modules are imported
lazily, on the first call that needs them, so importing this module never touches Triton.
"""

from __future__ import annotations

import importlib
import os

import torch

from dspark_sglang.acceptance import AcceptanceResult
from dspark_sglang.acceptance import chain_accept as _chain_accept_ref
from dspark_sglang.drafters.block import context_block_attention as _block_attention_ref
from dspark_sglang.drafters.block import paged_context_block_attention as _paged_block_attention_ref
from dspark_sglang.drafters.heads import ConfidenceHead, MarkovHead, sample_sequential_with_uniforms
from dspark_sglang.drafters.interface import DraftBlock
from dspark_sglang.kernels._common import interpreting, rank_offsets
from dspark_sglang.sampling import SamplingBatch
from dspark_sglang import schedulers

__all__ = [
    "ENV_VAR",
    "BACKENDS",
    "resolve_backend",
    "chain_accept",
    "admit_top",
    "topk_budget",
    "sample_sequential",
    "block_attention",
    "paged_block_attention",
]

ENV_VAR = "DSPARK_KERNELS"
BACKENDS = ("auto", "triton", "torch")


def resolve_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for an op whose main input is ``tensor`` (see module doc)."""
    source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
    choice = (backend if backend is not None else os.environ.get(ENV_VAR, "auto")).strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"kernels/dispatch.py: {source} must be one of {list(BACKENDS)}, got {choice!r}")
    on_cuda = tensor.device.type == "cuda"
    if choice == "torch" or (choice == "auto" and not on_cuda):
        return "torch"
    if not on_cuda and not interpreting():
        raise ValueError(
            f"kernels/dispatch.py: {source}={choice!r} asks for the Triton kernel, but the tensors are on "
            f"{tensor.device} and TRITON_INTERPRET is not set (no CPU Triton backend)"
        )
    return "triton"


def _kernel(name: str):
    return importlib.import_module(f"dspark_sglang.kernels.{name}")


def chain_accept(
    target_probs: torch.Tensor,  # [R, gamma+1, V]
    draft_tokens: torch.Tensor,  # [R, gamma]
    draft_probs: torch.Tensor,  # [R, gamma, V]
    verify_lens: torch.Tensor,  # [R]
    greedy: torch.Tensor,  # [R] bool
    accept_uniforms: torch.Tensor,  # [R, gamma]
    sample_uniforms: torch.Tensor,  # [R]
    *,
    backend: str | None = None,
) -> AcceptanceResult:
    """`dspark_sglang.acceptance.chain_accept`, or its fused kernel."""
    args = (target_probs, draft_tokens, draft_probs, verify_lens, greedy, accept_uniforms, sample_uniforms)
    if resolve_backend(target_probs, backend) == "torch":
        return _chain_accept_ref(*args)
    return _kernel("chain_accept").chain_accept(*args)


def admit_top(
    survival: torch.Tensor,  # [R, L] float32 survivals; < 0 = not a candidate
    count: int,
    offsets: torch.Tensor,  # [R, L] int64, the schedulers' canonical N-1-(k*R+r) offsets
    *,
    backend: str | None = None,
) -> torch.Tensor:  # [R] int64
    """`dspark_sglang.schedulers.admit_top`, or the top-budget kernel (which rebuilds the canonical
    offsets itself; every scheduler passes exactly those)."""
    if resolve_backend(survival, backend) == "torch":
        return schedulers.admit_top(survival, count, offsets)
    return _kernel("topk_budget").topk_budget(survival, int(count))


def topk_budget(
    survival: torch.Tensor,  # [R, L] float32
    count: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:  # [R] int64
    """Per-request number of candidates in the global top ``count`` (schedulers' shared order)."""
    if resolve_backend(survival, backend) == "torch":
        return schedulers.admit_top(survival, int(count), rank_offsets(*survival.shape, survival.device))
    return _kernel("topk_budget").topk_budget(survival, int(count))


def sample_sequential(
    base_logits: torch.Tensor,  # [R, G, V] U_k
    hidden: torch.Tensor,  # [R, G, H] h_k
    anchors: torch.Tensor,  # [R] int64
    markov: MarkovHead | None,
    confidence: ConfidenceHead | None,
    sampling: SamplingBatch,
    uniforms: torch.Tensor,  # [R, G] U(0,1)
    *,
    backend: str | None = None,
) -> tuple[DraftBlock, torch.Tensor]:
    """`heads.sample_sequential_with_uniforms`, or the fused head (filtered rows fall back to the
    reference inside it; see kernels/sequential_head.py)."""
    args = (base_logits, hidden, anchors, markov, confidence, sampling, uniforms)
    if resolve_backend(base_logits, backend) == "torch":
        return sample_sequential_with_uniforms(*args)
    return _kernel("sequential_head").sample_sequential(*args)


def block_attention(
    q: torch.Tensor,  # [R, B, heads, d]
    ctx_k: torch.Tensor,  # [R, N, kv_heads, d]
    ctx_v: torch.Tensor,  # [R, N, kv_heads, d]
    ctx_mask: torch.Tensor | None,  # [R, N] bool right-padding mask (a prefix per row), or None
    k: torch.Tensor,  # [R, B, kv_heads, d]
    v: torch.Tensor,  # [R, B, kv_heads, d]
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:  # [R, B, heads, d]
    """`drafters.block.context_block_attention`, or the fused kernel. The kernel reads the mask as
    lengths (``ctx_mask.sum(1)``), which is exact for the right-padded prefix masks
    `ContextCache.gather` builds."""
    if resolve_backend(q, backend) == "torch":
        return _block_attention_ref(q, ctx_k, ctx_v, ctx_mask, k, v, scale)
    lens = None if ctx_mask is None else ctx_mask.sum(dim=1)
    return _kernel("block_attention").block_attention(q, ctx_k, ctx_v, lens, k, v, scale)


def paged_block_attention(
    q: torch.Tensor,  # [R, B, heads, d]
    pool_k: torch.Tensor,  # [P, kv_heads, d]
    pool_v: torch.Tensor,  # [P, kv_heads, d]
    rows: torch.Tensor,  # [R, N] int KV slots of each request's context
    lens: list[int],  # [R]
    k: torch.Tensor,  # [R, B, kv_heads, d]
    v: torch.Tensor,  # [R, B, kv_heads, d]
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:  # [R, B, heads, d]
    """`drafters.block.paged_context_block_attention`, or the fused paged kernel."""
    if resolve_backend(q, backend) == "torch":
        return _paged_block_attention_ref(q, pool_k, pool_v, rows, lens, k, v, scale)
    return _kernel("block_attention").paged_block_attention(q, pool_k, pool_v, rows, lens, k, v, scale)
