"""What the worker needs from SGLang under tensor parallelism.

The target's embedding and LM head are vocabulary-parallel: each TP rank holds rows
[rank * V_p / tp, (rank + 1) * V_p / tp) of the padded vocabulary V_p. Drafters that borrow them
(z-lab DFlash, SpecForge Eagle3) and the worker's TargetSpec need the whole [V, H] table, the same on
every rank (every rank runs the full drafter; rank 0's decisions are broadcast, worker._tp_agree).
"""

from __future__ import annotations

import torch


def full_vocab_rows(
    weight: torch.Tensor,  # [V_p / tp, H] this rank's shard ([V_p, H] without TP)
    vocab_size: int,
    group,  # SGLang's GroupCoordinator of the TP group, or None
) -> torch.Tensor:
    """[vocab_size, H]: the shards gathered in rank order, padding rows dropped."""
    if group is not None and group.world_size > 1:
        weight = group.all_gather(weight.contiguous(), dim=0)  # [V_p, H]
    if weight.shape[0] < vocab_size:
        raise ValueError(f"a vocabulary table of {weight.shape[0]} rows cannot cover {vocab_size} tokens")
    return weight[:vocab_size]
