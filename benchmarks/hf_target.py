"""A transformers target with a KV cache, for tools that do not need the SGLang engine.

It gives exactly what the speculative loop needs from a target: next-token logits at every new
position and the drafter's context features (outputs of decoder layers `layer_ids`, i.e. HF
`hidden_states[l + 1]`), plus a way to drop rejected positions from the cache.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


class HFTarget:
    def __init__(self, path: str, layer_ids: tuple[int, ...], dtype: torch.dtype = torch.float32):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self._setup(model, AutoTokenizer.from_pretrained(path), layer_ids)

    @classmethod
    def from_model(cls, model, layer_ids: tuple[int, ...], tokenizer=None) -> "HFTarget":
        """Wrap an already-built model (tests build tiny random ones)."""
        target = cls.__new__(cls)
        target._setup(model.eval(), tokenizer, layer_ids)
        return target

    def _setup(self, model, tokenizer, layer_ids: tuple[int, ...]) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = self.model.config
        num_layers = self.config.num_hidden_layers
        bad = [l for l in layer_ids if not 0 <= l < num_layers - 1]
        if bad:
            # The last HF hidden state is final-normed, not a raw layer output.
            raise ValueError(f"layer ids {bad} are outside [0, {num_layers - 2}] for a {num_layers}-layer target")
        self.layer_ids = tuple(layer_ids)
        self.cache = DynamicCache()
        self.length = 0  # committed positions held in the cache

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.length = 0

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `tokens` ([n] int64) at positions length..length+n-1.

        Returns logits [n, V] (float32; row i predicts position length+i+1) and context features
        [n, len(layer_ids) * H] (float32).
        """
        n = tokens.numel()
        positions = torch.arange(self.length, self.length + n)[None]
        out = self.model(
            input_ids=tokens[None], position_ids=positions, past_key_values=self.cache,
            use_cache=True, output_hidden_states=True,
        )
        self.length += n
        features = torch.cat([out.hidden_states[l + 1][0] for l in self.layer_ids], dim=-1)
        return out.logits[0].float(), features.float()

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions (drop rejected drafts)."""
        if length < self.length:
            # A negative crop removes that many trailing positions (positive values are deprecated).
            self.cache.crop(length - self.length)
            self.length = length

    def chat_ids(self, messages: list[dict]) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return ids[0].to(torch.int64)
