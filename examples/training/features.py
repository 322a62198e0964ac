"""Teacher-forced target forwards -> what the drafter trains on, cached as one safetensors file.

For every training sequence (prompt + the target's response, truncated to `max_len`):
- `features` [N, len(layer_ids) * H] float16: concat over l in layer_ids of HF `hidden_states[l + 1]`,
  the raw output of decoder layer l (the same features the product's drafters read at serve time;
  never HF's last entry, which is final-normed);
- `topk_ids` [N, K] int32 and `topk_logp` [N, K] float32: the target's K most likely next tokens at
  each position and their log-probabilities (temperature 1) — row t describes the token at t + 1;
- `tokens` [N] int32, `offsets` [num_seqs + 1] int64 (sequence s is rows offsets[s]:offsets[s+1]),
  `prompt_lens` [num_seqs] int64 (response tokens, the supervised ones, start there).
The target runs in float32 (as the CPU serving path does). The cache lives outside the repository
(`<cache>/features/<key>.safetensors` + `.json` manifest).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from examples.training.data import Sample

_FP16_MAX = 65504.0


@dataclass
class FeatureSet:
    tokens: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [S + 1] int64
    prompt_lens: torch.Tensor  # [S] int64
    features: torch.Tensor  # [N, F] float16
    topk_ids: torch.Tensor  # [N, K] int64
    topk_logp: torch.Tensor  # [N, K] float32

    @property
    def num_seqs(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def feature_width(self) -> int:
        return int(self.features.shape[1])

    @property
    def topk(self) -> int:
        return int(self.topk_ids.shape[1])

    def seq(self, s: int) -> dict[str, torch.Tensor]:
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        return dict(tokens=self.tokens[lo:hi], features=self.features[lo:hi], topk_ids=self.topk_ids[lo:hi],
                    topk_logp=self.topk_logp[lo:hi], prompt_len=int(self.prompt_lens[s]))


@torch.inference_mode()
def extract(model, samples: list[Sample], layer_ids: tuple[int, ...], topk: int, max_len: int,
            token_budget: int = 4096, head_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run the target over every sample (length-sorted, right-padded batches of <= token_budget).
    `head_weight` [V, H]: compute the top-K log-probs with this LM head (e.g. a float32 copy for a
    bfloat16 target), from the final hidden states in its dtype."""
    seqs = [(s.prompt_ids + s.response_ids)[:max_len] for s in samples]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    hidden_size = model.config.hidden_size
    feats: list[torch.Tensor | None] = [None] * len(seqs)
    tk_ids: list[torch.Tensor | None] = [None] * len(seqs)
    tk_lp: list[torch.Tensor | None] = [None] * len(seqs)
    bar = tqdm(total=sum(map(len, seqs)), desc="target features", unit="tok", unit_scale=True)
    clamped = 0
    i = 0
    while i < len(order):
        width = len(seqs[order[i]])
        j = i
        while j < len(order) and (j - i + 1) * len(seqs[order[j]]) <= max(token_budget, len(seqs[order[j]])):
            j += 1
        batch = order[i:j]
        width = max(len(seqs[b]) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.int64)
        attn = torch.zeros(len(batch), width, dtype=torch.int64)
        for r, b in enumerate(batch):
            ids[r, : len(seqs[b])] = torch.tensor(seqs[b])
            attn[r, : len(seqs[b])] = 1
        out = model.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        hs = out.hidden_states  # (embeddings, layer 0 .. layer L-2 outputs, final-normed)
        for r, b in enumerate(batch):
            n = len(seqs[b])
            f = torch.cat([hs[l + 1][r, :n] for l in layer_ids], dim=-1)  # [n, 5H]
            clamped += int((f.abs() > _FP16_MAX).sum())  # SmolLM2's massive activations peak near 2.5e4
            feats[b] = f.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
            final = hs[-1][r, :n]
            logits = model.lm_head(final) if head_weight is None else torch.nn.functional.linear(final.to(head_weight.dtype), head_weight)
            logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
            lp, ix = logp.topk(topk, dim=-1)
            tk_ids[b], tk_lp[b] = ix.to(torch.int32), lp
            bar.update(n)
        i = j
    bar.close()
    lengths = torch.tensor([len(s) for s in seqs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    if clamped:
        print(f"[features] {clamped} feature values clamped to the float16 range", flush=True)
    return dict(
        tokens=torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
        offsets=offsets,
        prompt_lens=torch.tensor([min(len(s.prompt_ids), max_len) for s in samples], dtype=torch.int64),
        features=torch.cat(feats),
        topk_ids=torch.cat(tk_ids),
        topk_logp=torch.cat(tk_lp),
    )


def _content_key(samples: list[Sample], payload: dict) -> str:
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for sample in samples:
        digest.update(json.dumps([sample.prompt_ids, sample.response_ids]).encode())
    return digest.hexdigest()[:16]


def build_part(model, samples: list[Sample], cache_dir: Path, layer_ids: tuple[int, ...], topk: int,
               max_len: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Features of one list of samples, cached under a key of their exact token ids + settings."""
    payload = dict(layer_ids=list(layer_ids), topk=topk, max_len=max_len, dtype="float32", version=1)
    key = _content_key(samples, payload)
    root = cache_dir / "features"
    root.mkdir(parents=True, exist_ok=True)
    file, manifest = root / f"{key}.safetensors", root / f"{key}.json"
    if not (file.exists() and manifest.exists()):
        if model is None:
            raise RuntimeError("target features are not cached and no target model was given")
        start = time.time()
        tensors = extract(model, samples, layer_ids, topk, max_len)
        save_file(tensors, str(file))
        manifest.write_text(json.dumps(dict(payload, key=key, num_seqs=len(samples), num_tokens=int(tensors["tokens"].numel()),
                                            seconds=round(time.time() - start, 1)), indent=2))
    return load_file(str(file)), json.loads(manifest.read_text())


def build_features(model, parts: list[list[Sample]], cache_dir: Path, layer_ids: tuple[int, ...], topk: int,
                   max_len: int) -> tuple[FeatureSet, list[dict]]:
    """One FeatureSet over all parts (each cached on its own), in part order."""
    loaded = [build_part(model, samples, cache_dir, layer_ids, topk, max_len) for samples in parts if samples]
    tensors = [t for t, _ in loaded]
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for t in tensors:
        offsets.append(t["offsets"][1:] + base)
        base += int(t["offsets"][-1])
    cat = lambda name: torch.cat([t[name] for t in tensors])  # noqa: E731
    fs = FeatureSet(cat("tokens").long(), torch.cat(offsets), cat("prompt_lens"), cat("features"),
                    cat("topk_ids").long(), cat("topk_logp").float())
    return fs, [m for _, m in loaded]
