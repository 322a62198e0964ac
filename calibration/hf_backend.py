"""The transformers side of `dspark-profile`: verify-shaped steps on an HF model with a KV cache.

Every request holds the same number of committed tokens (`context_len`, random ids), so a batch of
requests needs no padding: one prefill of `max_requests` contexts is kept, and each timed step runs
``model(input_ids [B, n], past_key_values=<the first B contexts>)`` — n new tokens per request,
causal over the context, logits at every position, as a verify does. Requests of one step must
share one width here (a padded ragged batch would time padding); the sweep asks for that.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

__all__ = ["HFStepRunner"]


class HFStepRunner:
    """Times verify-shaped steps on a transformers causal LM.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Any causal LM taking ``past_key_values``.
    context_len, max_requests : int
        Committed tokens per request, and how many requests are prefilled.
    seed : int
        Seeds the random context and step tokens.
    """

    def __init__(self, model, *, context_len: int, max_requests: int, seed: int = 0,
                 prefill_chunk: int = 8):
        from transformers import DynamicCache

        self.model = model.eval()
        self.context_len = context_len
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self._generator = torch.Generator().manual_seed(seed)
        # Prefill in chunks of requests; keep the per-layer K/V [max_requests, heads, C, d].
        keys: Optional[list[list[torch.Tensor]]] = None
        values: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for start in range(0, max_requests, prefill_chunk):
                rows = min(prefill_chunk, max_requests - start)
                ids = self._random_ids(rows, context_len)  # [rows, C]
                cache = DynamicCache()
                self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                layers = list(cache)
                if keys is None:
                    keys, values = [[] for _ in layers], [[] for _ in layers]
                for i, layer in enumerate(layers):
                    keys[i].append(layer[0])
                    values[i].append(layer[1])
        self._keys = [torch.cat(k, dim=0) for k in keys]  # per layer [max_requests, h, C, d]
        self._values = [torch.cat(v, dim=0) for v in values]
        self.max_requests = max_requests

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        **kwargs) -> "HFStepRunner":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, **kwargs)

    def _random_ids(self, rows: int, cols: int) -> torch.Tensor:
        ids = torch.randint(0, self.vocab_size, (rows, cols), generator=self._generator)
        return ids.to(self.device)  # [rows, cols] int64

    def _cache_for(self, num_reqs: int):
        from transformers import DynamicCache

        # A fresh cache holding the first num_reqs contexts; the step appends to it, so the
        # stored K/V are never modified.
        return DynamicCache(ddp_cache_data=[(k[:num_reqs], v[:num_reqs])
                                            for k, v in zip(self._keys, self._values)])

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def step(self, widths: Sequence[int]) -> tuple[float, float]:
        """One verify-shaped step (all widths equal). Returns (wall seconds, this thread's CPU
        seconds)."""
        num_reqs, width = len(widths), int(widths[0])
        if any(int(w) != width for w in widths):
            raise ValueError(f"the transformers backend needs equal widths per step, got {list(widths)}")
        if num_reqs > self.max_requests:
            raise ValueError(f"{num_reqs} requests asked, {self.max_requests} prefilled")
        cache = self._cache_for(num_reqs)
        ids = self._random_ids(num_reqs, width)  # [B, n]
        positions = torch.arange(self.context_len, self.context_len + width,
                                 device=self.device).expand(num_reqs, width)  # [B, n]
        self._synchronize()
        start, cpu_start = time.perf_counter(), time.thread_time()
        self.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
        self._synchronize()
        return time.perf_counter() - start, time.thread_time() - cpu_start

    def describe(self) -> str:
        return f"transformers {type(self.model).__name__} ({self.model.dtype}, {self.device})"

    def close(self) -> None:
        self._keys, self._values = [], []
