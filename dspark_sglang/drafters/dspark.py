"""DeepSpec DSpark and DeepSpec DFlash drafters (`Qwen3DSparkModel` checkpoints), and the same
drafters in vLLM speculators' format (speculators_format.py maps that format onto this class).

Slot convention (DeepSpec): the block is [anchor, MASK x (gamma-1)] at positions a .. a+gamma-1 and
**slot k (0-based) predicts the token at position a+k+1**: the anchor slot drafts too, so a block of
`block_size` rows gives gamma = block_size drafts. (z-lab differs: see dflash_zlab.py.)
speculators' `sample_from_anchor: false` is z-lab's convention: only mask slot j (j >= 1) drafts,
the token at a+j, and gamma = block_size - 1. Its Markov head still runs over slot 0 with the anchor
as previous token (as speculators trains it), which matters for the RNN head's state only.

A speculators checkpoint may bring its own draft vocabulary (d2t/t2d): lm_head [Vd, H] and Markov
W2 [Vd, r] then have only its rows (W1 stays [V, r], indexed by target ids), and the drafter drafts
over it exactly as over a `draft_vocab.DraftVocab` (q = 0 outside it).

- DSpark (`markov_rank > 0` and/or a confidence head): drafts are sampled left to right through the
  Markov head, and a confidence logit per slot comes from [h_k ; W1[x_{k-1}]] (heads.py).
- DFlash (`markov_rank == 0`, no confidence head): q_k = softmax of the base logits, every slot
  sampled independently; no confidence logits.

What it needs from the target: context features = outputs of target decoder layers
`target_layer_ids` (layer id l = output of decoder layer l, HF `hidden_states[l + 1]`; -1 = the
embedding output), concatenated in that order, for every committed position. The checkpoint
carries its own copies of the target's `embed_tokens` and `lm_head`; they are used as they are and
must have the target's [V, H] shape (config validation checks V and H against the target).
"""

from __future__ import annotations

import torch
from torch import nn

from dspark_sglang.cpu_linear import Linear, linear
from dspark_sglang.drafters.block import BlockBackbone, BlockDrafterBase
from dspark_sglang.drafters.checkpoint import load_weights
from dspark_sglang.drafters.config import FORMAT_FAMILY, BlockDrafterConfig
from dspark_sglang.drafters.heads import (
    ConfidenceHead,
    MarkovHead,
    _uniforms as draw_uniforms,
    sample_independent,
    sample_sequential_with_uniforms,
    teacher_forced_scores,
)
from dspark_sglang.drafters.interface import DraftBlock, DrafterInfo
from dspark_sglang.sampling import SamplingBatch, top1_of_logits


def empty_block(gamma: int, vocab: int, with_confidence: bool, device) -> DraftBlock:
    """The DraftBlock for zero requests (a worker round where no request drafts)."""
    return DraftBlock(
        tokens=torch.zeros(0, gamma, dtype=torch.int64, device=device),
        probs=torch.zeros(0, gamma, vocab, device=device),
        token_probs=torch.zeros(0, gamma, device=device),
        confidence_logits=torch.zeros(0, gamma, device=device) if with_confidence else None,
    )


class DSparkDrafter(BlockDrafterBase, nn.Module):
    """Implements `interface.Drafter` for the `deepspec_dspark` and `deepspec_dflash` formats.

    Build with `from_checkpoint` (strict weights), or directly for a randomly initialised model in
    tests and training (`meta=True` builds shapes only, to be filled by `load_weights`).
    """

    def __init__(self, config: BlockDrafterConfig, dtype: torch.dtype = torch.float32, device="cpu", meta: bool = False):
        nn.Module.__init__(self)
        if config.format not in ("deepspec_dspark", "deepspec_dflash", "speculators_dspark", "speculators_dflash"):
            raise ValueError(f"DSparkDrafter serves DeepSpec and speculators checkpoints, not {config.format!r}")
        self.config = config
        dims = config.dims
        with torch.device("meta" if meta else device):
            self.backbone = BlockBackbone(dims, len(config.target_layer_ids))
            self.embed_tokens = nn.Embedding(dims.vocab_size, dims.hidden_size)
            self.lm_head = Linear(dims.hidden_size, config.draft_vocab_size or dims.vocab_size, bias=False)
            self.markov_head = (
                MarkovHead(config.markov_head_type, dims.vocab_size, dims.hidden_size, config.markov_rank,
                           config.draft_vocab_size)
                if config.markov_rank > 0 else None
            )
            self.confidence_head = (
                ConfidenceHead(dims.hidden_size, config.markov_rank if config.confidence_with_markov else 0)
                if config.confidence_head else None
            )
        if not meta:
            self.to(dtype)
        self._init_cache(dtype, device)
        self.draft_vocab = None  # DraftVocab when drafting over a reduced vocabulary (restrict_vocab)
        self._head_rows = self._w2_rows = None  # [Vd, H], [Vd, rank]: its rows of lm_head / markov W2
        self.native_vocab = None  # the checkpoint's own DraftVocab, whose rows lm_head holds (set_native_vocab)
        self.info = DrafterInfo(
            family=config.family,
            format=FORMAT_FAMILY[config.format][1],
            gamma=config.gamma,
            target_layer_ids=config.target_layer_ids,
            target_hidden_size=dims.hidden_size,
            vocab_size=dims.vocab_size,
            has_confidence_head=self.confidence_head is not None,
            has_markov_head=self.markov_head is not None,
        )

    def weight_parts(self) -> dict[str, nn.Module]:
        """Checkpoint name prefix -> module (the checkpoint's names are top level)."""
        parts: dict[str, nn.Module] = {"": self.backbone, "embed_tokens.": self.embed_tokens, "lm_head.": self.lm_head}
        if self.markov_head is not None:
            parts["markov_head."] = self.markov_head
        if self.confidence_head is not None:
            parts["confidence_head."] = self.confidence_head
        return parts

    @classmethod
    def from_checkpoint(
        cls, config: BlockDrafterConfig, tensors: dict[str, torch.Tensor], path: str,
        dtype: torch.dtype = torch.float32, device="cpu",
    ) -> "DSparkDrafter":
        drafter = cls(config, dtype, device, meta=True)
        load_weights(drafter.weight_parts(), tensors, path, dtype, device)
        return drafter.eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [R, B] int64 -> [R, B, H]
        return self.embed_tokens(ids)

    @torch.no_grad()
    def propose_with_logits(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> tuple[DraftBlock, torch.Tensor]:
        """`propose`, plus the logits each q_k was processed from (U + B) [R, gamma, V]."""
        if not slots:
            block = empty_block(self.info.gamma, self.info.vocab_size, self.confidence_head is not None, self.device)
            return block, block.probs
        hidden, state = self._drafting_rows(self.block_hidden(slots, anchor_tokens, anchor_positions), anchor_tokens)
        vocab = self.draft_vocab
        # [R, gamma, V] (or [R, gamma, Vd] over a reduced vocabulary); drafting row k predicts anchor + k + 1
        base_logits = self.lm_head(hidden) if vocab is None else linear(hidden, self._head_rows)
        if self.markov_head is None and self.confidence_head is None:  # DFlash: independent slots
            block = sample_independent(base_logits, sampling, generator)
            return (block if vocab is None else vocab.lift(block)), base_logits
        # The same uniforms `sample_sequential` would draw, so the kernel path samples identically.
        uniforms = draw_uniforms(base_logits.shape[:2], base_logits, generator)  # [R, gamma]
        if vocab is None and state is None:
            sampler = getattr(self, "sequential_fn", sample_sequential_with_uniforms)
            block, logits = sampler(
                base_logits, hidden, anchor_tokens, self.markov_head, self.confidence_head, sampling, uniforms
            )
        else:  # the fused kernel scores the full vocabulary from a zero state; the reference does the rest
            block, logits = sample_sequential_with_uniforms(
                base_logits, hidden, anchor_tokens, self.markov_head, self.confidence_head, sampling, uniforms,
                vocab=vocab, w2_rows=self._w2_rows, initial_state=state,
            )
        if block.confidence_logits is None:  # a Markov head without a confidence head
            block.top1_probs = top1_of_logits(logits)
        return block, logits

    def _drafting_rows(
        self,
        hidden: torch.Tensor,  # [R, block_size, H] every block row
        anchors: torch.Tensor,  # [R] int64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows that draft [R, gamma, H], and the RNN state entering the first of them (None:
        zeros). Without anchor sampling, slot 0 drafts nothing, but speculators' RNN head has
        already stepped through it (previous token: the anchor) when slot 1 drafts."""
        if self.config.sample_from_anchor:
            return hidden, None
        markov, state = self.markov_head, None
        if markov is not None and markov.kind == "rnn":
            zero = markov.initial_state(hidden.shape[0], hidden)
            state = markov.advance(hidden[:, 0], markov.markov_w1(anchors.to(hidden.device)), zero)
        return hidden[:, 1:], state

    def set_native_vocab(self, vocab) -> None:
        """The checkpoint's own draft vocabulary (`DraftVocab`): lm_head / W2 rows are its ids, in order."""
        self.native_vocab = vocab.to(self.device)
        self.restrict_vocab(None)

    def _native_rows(self, vocab) -> torch.Tensor:
        """[Vd'] positions of `vocab`'s ids among the native vocabulary's (each must be one)."""
        native = self.native_vocab.ids
        ids = vocab.ids.to(native.device)
        pos = torch.searchsorted(native, ids).clamp(max=native.numel() - 1)
        outside = int((native[pos] != ids).sum())
        if outside:
            raise ValueError(f"{outside} of its {ids.numel()} tokens are outside the checkpoint's own "
                             f"{native.numel()}-token draft vocabulary")
        return pos

    def restrict_vocab(self, vocab) -> None:
        """Draft over a reduced vocabulary (`draft_vocab.DraftVocab`; None: the full one again, or
        the checkpoint's own one). q stays exact (0 outside the subset); teacher-forced scoring
        keeps the full (or the checkpoint's own) vocabulary."""
        if vocab is not None and vocab.vocab_size != self.info.vocab_size:
            raise ValueError(f"draft vocabulary over {vocab.vocab_size} tokens, drafter vocabulary {self.info.vocab_size}")
        if self.native_vocab is not None:  # lm_head holds only the native rows: pick among those
            chosen = self.native_vocab if vocab is None else vocab.to(self.device)
            rows = self._native_rows(chosen)
            self.draft_vocab = chosen
            self._head_rows = self.lm_head.weight.index_select(0, rows)
            self._w2_rows = None if self.markov_head is None else self.markov_head.markov_w2.weight.index_select(0, rows)
            return
        self.draft_vocab = None if vocab is None else vocab.to(self.device)
        self._head_rows = None if vocab is None else self.draft_vocab.rows(self.lm_head.weight)
        self._w2_rows = (None if vocab is None or self.markov_head is None
                         else self.draft_vocab.rows(self.markov_head.markov_w2.weight))

    def use_kernels(self, attention_fn, sequential_fn, paged_attention_fn=None) -> None:
        """Route the block attention (padded and KV-slot-pool forms) and the sequential head through
        the given functions (the adapter passes `dspark_sglang.kernels.dispatch.block_attention` /
        `.paged_block_attention` / `.sample_sequential`, which pick the fused Triton kernel for CUDA
        tensors and these references otherwise)."""
        self.attention_fn = attention_fn
        self.sequential_fn = sequential_fn
        if paged_attention_fn is not None:
            self.paged_attention_fn = paged_attention_fn

    def propose(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> DraftBlock:
        """Draft gamma tokens per request, with q_k, q_k(x_k) and confidence logits (DSpark)."""
        return self.propose_with_logits(slots, anchor_tokens, anchor_positions, sampling, generator)[0]

    def score_block(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        prev_tokens: torch.Tensor,  # [R, gamma] int64: [anchor, gt_1 .. gt_{gamma-1}]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced scoring (training, evaluation): logits U + B [R, gamma, V] (V: the
        checkpoint's own draft vocabulary when it has one) and confidence logits [R, gamma] (None
        without a confidence head), drafting row k conditioned on prev_tokens[:, k].

        Runs under the caller's grad mode; gradients reach the block path and heads (the cached
        context K/V were computed without grad: use `backbone.context_kv` directly to train fc).
        """
        if prev_tokens.shape != (len(slots), self.info.gamma):
            raise ValueError(f"prev_tokens must be [{len(slots)}, {self.info.gamma}], got {tuple(prev_tokens.shape)}")
        hidden, state = self._drafting_rows(self.block_hidden(slots, anchor_tokens, anchor_positions), anchor_tokens)
        return teacher_forced_scores(
            self.lm_head(hidden), hidden, prev_tokens.to(self.device), self.markov_head, self.confidence_head, state
        )
