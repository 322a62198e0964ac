"""Per-request context cache of the Eagle3 drafters (see eagle3.py for the pairing of rows).

A request's committed positions 0..n-1 each have fc(c_p); rows 0..n-2 are *completed* (paired with
the token at p+1) and have K/V; row n-1 is *pending* until the next token is known. fc(c_p) is kept
for every row, not only the pending one, so `truncate` can re-open any row as the pending one:
the cost is H values per position on top of the 2 * kv_heads * head_dim of K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Slot:
    feats: torch.Tensor  # [capacity, H] fc(c_p) of every committed position
    keys: torch.Tensor  # [capacity, kv_heads, head_dim] K of completed rows (row p <-> token p+1)
    values: torch.Tensor  # [capacity, kv_heads, head_dim]
    length: int = 0  # committed positions with a feature; rows 0..length-2 are completed


class Eagle3Cache:
    """Per-request rows in growable buffers (amortised O(1) append)."""

    def __init__(self, hidden: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.hidden, self.kv_shape = hidden, (num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self._slots: dict[int, _Slot] = {}

    def length(self, slot: int) -> int:
        entry = self._slots.get(slot)
        return 0 if entry is None else entry.length

    def pending(self, slot: int) -> torch.Tensor | None:
        """fc(c) of the last committed position, [1, H]; None for an empty slot."""
        entry = self._slots.get(slot)
        return None if entry is None or entry.length == 0 else entry.feats[entry.length - 1 : entry.length]

    def append(
        self,
        slot: int,
        feats: torch.Tensor,  # [n, H] new positions' fc(c)
        keys: torch.Tensor,  # [m, kv_heads, head_dim] rows completed by the new tokens
        values: torch.Tensor,  # [m, kv_heads, head_dim]
    ) -> None:
        entry = self._slots.get(slot)
        old = 0 if entry is None else entry.length
        new = old + feats.shape[0]
        done_old, done_new = max(old - 1, 0), max(new - 1, 0)
        if keys.shape[0] != done_new - done_old:
            raise ValueError(f"slot {slot}: {keys.shape[0]} completed rows for {old} -> {new} positions")
        if entry is None or new > entry.feats.shape[0]:
            cap = max(new, 2 * (0 if entry is None else entry.feats.shape[0]), 64)
            kw = dict(dtype=self.dtype, device=self.device)
            grown = _Slot(torch.empty(cap, self.hidden, **kw), torch.empty(cap, *self.kv_shape, **kw),
                          torch.empty(cap, *self.kv_shape, **kw), old)
            if entry is not None:
                grown.feats[:old], grown.keys[:done_old], grown.values[:done_old] = (
                    entry.feats[:old], entry.keys[:done_old], entry.values[:done_old])
            entry = self._slots[slot] = grown
        entry.feats[old:new] = feats
        entry.keys[done_old:done_new] = keys
        entry.values[done_old:done_new] = values
        entry.length = new

    def truncate(self, slot: int, length: int) -> None:
        if length < 0:
            raise ValueError(f"cannot truncate slot {slot} to a negative length {length}")
        entry = self._slots.get(slot)
        if entry is not None:  # row length-1 becomes the pending row again; its fc(c) is kept
            entry.length = min(entry.length, length)

    def release(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def gather(self, slots: list[int], extra: int):
        """For a chain of `extra` steps: keys, values [R, kv_heads, N + extra, head_dim] (completed
        rows right-padded to N, then room for the steps), mask [R, N + extra] bool or None when
        nothing is padded, and the pending rows' fc(c) [R, H]."""
        done = [self.length(s) - 1 for s in slots]
        n_max = max(done)
        heads, dim = self.kv_shape
        keys = torch.zeros(len(slots), heads, n_max + extra, dim, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        for r, (slot, n) in enumerate(zip(slots, done)):
            if n:
                keys[r, :, :n] = self._slots[slot].keys[:n].transpose(0, 1)
                values[r, :, :n] = self._slots[slot].values[:n].transpose(0, 1)
        mask = None
        if len(set(done)) > 1:
            cols = torch.arange(n_max + extra, device=self.device)[None, :]
            mask = (cols < torch.tensor(done, device=self.device)[:, None]) | (cols >= n_max)
        pending = torch.cat([self.pending(s) for s in slots])  # [R, H]
        return keys, values, mask, pending, n_max
