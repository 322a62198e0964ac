"""The one interface every drafter family (DSpark, DFlash, Eagle3) implements.

Vocabulary used throughout the project:
- *anchor*: the last committed token of a request (the previous round's bonus or correction). It has
  no target feature yet: its feature arrives with the next verification.
- *context features*: the outputs of the target's decoder layers `target_layer_ids`, concatenated,
  at committed positions (`[n, len(target_layer_ids) * H_target]`).
- *block*: the gamma draft tokens x_1..x_gamma proposed after the anchor; x_k sits at position
  anchor_pos + k.
- *draft distribution* q_k: the distribution x_k was sampled from, after temperature / top-k /
  top-p / min-p (the same processing the target distribution gets in acceptance). For DSpark it is
  the Markov-corrected softmax.

A drafter owns a per-request context cache, keyed by an integer slot (the worker uses SGLang's
req_pool_idx). The cache holds context only: a block's own K/V are transient, so drafting never
needs a rollback of the block; `truncate_context` exists for requests whose committed history is
rewound (retraction, radix re-prefill).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from dspark_sglang.sampling import SamplingBatch  # noqa: F401  (re-exported; lives in the core)


@dataclass
class DraftBlock:
    """What one `propose` call returns for R requests."""

    tokens: torch.Tensor  # [R, gamma] int64 target-vocab ids x_1..x_gamma
    probs: torch.Tensor  # [R, gamma, V] float32 draft distribution q_k each x_k was drawn from
    token_probs: torch.Tensor  # [R, gamma] float32 q_k(x_k)
    confidence_logits: torch.Tensor | None  # [R, gamma] raw confidence-head logits; None without a head
    # [R, gamma] float32 max_v softmax(z_k)(v): the drafter's own top-1 probability at temperature 1,
    # before the request's sampling parameters (reads x_<k only). Head-less drafters set it: it is
    # their confidence feature, and max_v q_k(v) carries nothing for a greedy request (q_k is one-hot).
    top1_probs: torch.Tensor | None = None


@dataclass(frozen=True)
class DrafterInfo:
    """Static facts the worker and scheduler need; capabilities, not family identity checks."""

    family: str  # "dspark" | "dflash" | "eagle3"
    format: str  # "deepspec" | "zlab" | "specforge" | "speculators"
    gamma: int  # drafts per block
    target_layer_ids: tuple[int, ...]  # decoder-layer outputs the drafter reads (0-based layer ids)
    target_hidden_size: int
    vocab_size: int
    has_confidence_head: bool
    has_markov_head: bool


@runtime_checkable
class Drafter(Protocol):
    info: DrafterInfo

    def append_context(
        self,
        slots: list[int],
        features: list[torch.Tensor],  # per request [n_i, len(target_layer_ids) * H_target]
        positions: list[torch.Tensor],  # per request [n_i] int64, contiguous, continuing the cache
        tokens: list[torch.Tensor],  # per request [n_i] int64, the committed token at each position
    ) -> None:
        """Add committed positions' target features to each request's context cache."""

    def propose(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> DraftBlock:
        """Draft a full block of gamma tokens for each request (never fewer: truncation is the
        scheduler's job at verification, so q is unchanged)."""

    def context_length(self, slot: int) -> int:
        """Number of committed positions cached for `slot`."""

    def truncate_context(self, slot: int, length: int) -> None:
        """Drop cached positions >= length."""

    def release(self, slot: int) -> None:
        """Forget a finished request."""


@dataclass
class TargetSpec:
    """What a drafter needs to know about (and may borrow from) the target model."""

    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    embed_tokens: torch.Tensor | None = None  # [V, H]; borrowed by z-lab DFlash / SpecForge Eagle3
    lm_head: torch.Tensor | None = None  # [V, H]; borrowed by z-lab DFlash
