"""Drafter features stored next to SGLang's KV cache, so radix-cache hits draft as well as cold starts.

The drafter reads target features (hidden states of a few target layers) of every committed
position. A radix-cache hit skips the target forward over the cached prefix, so those features are
never computed for the new request. But they were computed once, by the forward that wrote the
prefix's KV entries, and SGLang keeps pointing at those KV slots (`req_to_token`) for as long as
the prefix stays cached. Storing features by KV slot index therefore makes them available exactly
as long as the KV they belong to:

- every target forward writes the features of each token it computed at that token's KV slot
  (`out_cache_loc`), including rejected drafts, which are overwritten when their slots are reused;
- a request that starts on a cached prefix reads the prefix's features at
  `req_to_token[req_pool_idx, have:prefix]`.

Cost: one row of `len(target_layer_ids) x hidden` per KV slot, in the model dtype, allocated on
the first write and logged. Used for drafters that keep per-request caches (Eagle3) when
DSPARK_KEEP_RADIX_CACHE=1; DSpark and DFlash drafters keep their context K/V per KV slot instead
(drafters/block.py `KvSlotContext`), which a radix-cache hit finds in place.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("dspark_sglang")


class KvSlotFeatures:
    def __init__(self, num_kv_slots: Callable[[], int], dtype: torch.dtype, device):
        # A callable: SGLang sizes its KV pool after the speculative worker is built.
        self.num_kv_slots = num_kv_slots
        self.dtype, self.device = dtype, device
        self.rows: torch.Tensor | None = None  # [num_kv_slots, k*H], allocated on first write

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()

    def write(self, kv_slots: torch.Tensor, features: torch.Tensor) -> None:
        """kv_slots [T] int, features [T, k*H]: the features of the tokens stored at those slots."""
        if self.rows is None:
            slots = self.num_kv_slots()
            self.rows = torch.zeros(slots, features.shape[1], dtype=self.dtype, device=self.device)
            logger.info("dspark: drafter features kept per KV slot for radix-cache hits: %d slots x %d, %.1f MB",
                        slots, features.shape[1], self.nbytes / 2**20)
        self.rows[kv_slots.to(self.device, torch.int64)] = features.to(self.dtype)

    def read(self, kv_slots: torch.Tensor) -> torch.Tensor | None:
        """[n, k*H] features stored at `kv_slots`, or None before anything was written."""
        if self.rows is None:
            return None
        return self.rows[kv_slots.to(self.device, torch.int64)]


def kv_slot_count(model_runner) -> int:
    """Rows of SGLang's KV buffers: `size + page_size` (slot 0.. are padding), every index in
    req_to_token is below it."""
    pool = model_runner.token_to_kv_pool
    return int(pool.size) + int(getattr(pool, "page_size", 1) or 1)
