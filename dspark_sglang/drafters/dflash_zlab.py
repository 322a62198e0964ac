"""z-lab DFlash drafter (`DFlashDraftModel` checkpoints; z-lab/dflash).

Slot convention (z-lab): the block is [anchor, MASK x (B-1)] at positions a .. a+B-1, but **only
the B-1 mask slots draft: slot j (j = 1..B-1) predicts the token at position a+j**. The anchor
row's hidden state is computed (it takes part in the bidirectional attention) and then discarded,
so gamma = block_size - 1 (block 16 -> 15 drafts). Reading the anchor row as a draft would shift
every draft by one position: plausible tokens, acceptance near zero, no crash.

What it needs from the target:
- context features = outputs of target decoder layers `dflash_config.target_layer_ids` (layer id
  l = output of decoder layer l, HF `hidden_states[l + 1]`), concatenated;
- the target's input embedding (`TargetSpec.embed_tokens` [V, H]) to embed the block, and the
  target's LM head (`TargetSpec.lm_head` [V, H]) for the draft logits. The checkpoint has neither;
  loading fails if the TargetSpec lacks them.

Drafts are sampled independently per slot from process_logits(lm_head(h_j)); no confidence head.
The backbone is identical to DeepSpec's (block.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.cpu_linear import linear
from dspark_sglang.drafters.block import BlockBackbone, BlockDrafterBase
from dspark_sglang.drafters.checkpoint import check_target_tensor, load_weights
from dspark_sglang.drafters.config import BlockDrafterConfig
from dspark_sglang.drafters.dspark import empty_block
from dspark_sglang.drafters.heads import sample_independent
from dspark_sglang.drafters.interface import DraftBlock, DrafterInfo, TargetSpec
from dspark_sglang.sampling import SamplingBatch


class ZlabDFlashDrafter(BlockDrafterBase, nn.Module):
    """Implements `interface.Drafter` for the `zlab_dflash` format."""

    def __init__(
        self,
        config: BlockDrafterConfig,
        embed_tokens: torch.Tensor,  # [V, H] the target's input embedding (borrowed, not copied)
        lm_head: torch.Tensor,  # [V, H] the target's LM head
        dtype: torch.dtype = torch.float32,
        device="cpu",
        meta: bool = False,
    ):
        nn.Module.__init__(self)
        if config.format != "zlab_dflash":
            raise ValueError(f"ZlabDFlashDrafter serves z-lab checkpoints, not {config.format!r}")
        self.config = config
        dims = config.dims
        with torch.device("meta" if meta else device):
            self.backbone = BlockBackbone(dims, len(config.target_layer_ids))
        if not meta:
            self.backbone.to(dtype)
        # Non-persistent: they belong to the target and never appear in this drafter's state_dict.
        self.register_buffer("target_embed", embed_tokens.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("target_lm_head", lm_head.to(device=device, dtype=dtype), persistent=False)
        self._init_cache(dtype, device)
        self.draft_vocab = None  # DraftVocab when drafting over a reduced vocabulary (restrict_vocab)
        self._head_rows = None  # [Vd, H] its rows of the target's LM head
        self.info = DrafterInfo(
            family="dflash",
            format="zlab",
            gamma=config.gamma,
            target_layer_ids=config.target_layer_ids,
            target_hidden_size=dims.hidden_size,
            vocab_size=dims.vocab_size,
            has_confidence_head=False,
            has_markov_head=False,
        )

    @classmethod
    def from_checkpoint(
        cls, config: BlockDrafterConfig, tensors: dict[str, torch.Tensor], target: TargetSpec, path: str,
        dtype: torch.dtype = torch.float32, device="cpu",
    ) -> "ZlabDFlashDrafter":
        shape = (config.dims.vocab_size, config.dims.hidden_size)
        embed = check_target_tensor(target.embed_tokens, "embed_tokens", shape, path, dtype, device)
        head = check_target_tensor(target.lm_head, "lm_head", shape, path, dtype, device)
        drafter = cls(config, embed, head, dtype, device, meta=True)
        load_weights({"": drafter.backbone}, tensors, path, dtype, device)
        return drafter.eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [R, B] int64 -> [R, B, H]
        return F.embedding(ids, self.target_embed)

    def restrict_vocab(self, vocab) -> None:
        """Draft over a reduced vocabulary (`draft_vocab.DraftVocab`; None: the full one again)."""
        if vocab is not None and vocab.vocab_size != self.info.vocab_size:
            raise ValueError(f"draft vocabulary over {vocab.vocab_size} tokens, drafter vocabulary {self.info.vocab_size}")
        self.draft_vocab = None if vocab is None else vocab.to(self.device)
        self._head_rows = None if vocab is None else self.draft_vocab.rows(self.target_lm_head)

    def _draft_logits(self, slots, anchor_tokens, anchor_positions, head: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.block_hidden(slots, anchor_tokens, anchor_positions)  # [R, B, H]
        head = self.target_lm_head if head is None else head
        return linear(hidden[:, 1:], head)  # [R, B-1, V or Vd]: mask slot j -> a + j

    @torch.no_grad()
    def propose_with_logits(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> tuple[DraftBlock, torch.Tensor]:
        """`propose`, plus the draft logits [R, gamma, V]."""
        if not slots:
            block = empty_block(self.info.gamma, self.info.vocab_size, False, self.device)
            return block, block.probs
        vocab = self.draft_vocab
        logits = self._draft_logits(slots, anchor_tokens, anchor_positions, self._head_rows)
        block = sample_independent(logits, sampling, generator)
        return (block if vocab is None else vocab.lift(block)), logits

    def propose(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> DraftBlock:
        """Draft gamma = block_size - 1 tokens per request (the mask slots)."""
        return self.propose_with_logits(slots, anchor_tokens, anchor_positions, sampling, generator)[0]

    def score_block(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        prev_tokens: torch.Tensor | None = None,  # [R, gamma]; unused (no sequential head)
    ) -> tuple[torch.Tensor, None]:
        """Draft logits [R, gamma, V] under the caller's grad mode; no confidence head (None)."""
        return self._draft_logits(slots, anchor_tokens, anchor_positions), None
