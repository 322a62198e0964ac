"""Building blocks shared by the drafter families (Qwen3/Llama-style decoder pieces).

Module attribute names mirror the checkpoint tensor names (`q_proj`, `k_norm`, `gate_proj`, ...),
so `load_state_dict(strict=True)` maps checkpoints onto modules without renaming tables.

Conventions (the ones every fixture in `shared/fixtures` was produced with):
- RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, computed in float32, cast back.
- RoPE: non-interleaved rotate-half, `inv_freq_i = theta^(-2i/d)`, applied after q/k norms.
- Attention: scale `head_dim ** -0.5`; grouped-query, query head j reads KV head j // group.
- No projection in a decoder layer has a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.cpu_linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(
    positions: torch.Tensor,  # [T] int64
    head_dim: int,
    theta: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, each [T, head_dim], for rotate-half RoPE."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(
    x: torch.Tensor,  # [T, num_heads, head_dim]
    cos: torch.Tensor,  # [T, head_dim]
    sin: torch.Tensor,  # [T, head_dim]
) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """q/k/v/o projections with optional per-head q/k RMSNorm (Qwen3) and GQA.

    `in_features` is H for DSpark/DFlash layers and 2H for Eagle3 layers (whose q/k/v read
    `[norm(embedding) ; norm(hidden)]`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qk_norm: bool,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(in_features, num_heads * head_dim, bias=False)
        self.k_proj = Linear(in_features, num_kv_heads * head_dim, bias=False)
        self.v_proj = Linear(in_features, num_kv_heads * head_dim, bias=False)
        self.o_proj = Linear(num_heads * head_dim, out_features, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] -> [T, num_heads, head_dim] (normed, not yet rotated)."""
        q = self.q_proj(x).view(x.shape[0], self.num_heads, self.head_dim)
        return self.q_norm(q) if self.qk_norm else q

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, in] -> k, v each [S, num_kv_heads, head_dim] (k normed, not yet rotated)."""
        k = self.k_proj(x).view(x.shape[0], self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(x.shape[0], self.num_kv_heads, self.head_dim)
        return (self.k_norm(k) if self.qk_norm else k), v


def grouped_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim] (rotated)
    k: torch.Tensor,  # [S, num_kv_heads, head_dim] (rotated)
    v: torch.Tensor,  # [S, num_kv_heads, head_dim]
    mask: torch.Tensor | None = None,  # [T, S] bool, True = may attend; None = attend to all
) -> torch.Tensor:
    """Softmax attention for one sequence; returns [T, num_heads * head_dim]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=q.shape[-1] ** -0.5
    )  # [num_heads, T, head_dim]
    return out.transpose(0, 1).reshape(q.shape[0], -1)
