"""Target features for a self-distillation corpus (corpus.py), cached per corpus shard and read
lazily, so a corpus of millions of tokens trains without holding its features in memory.

    python -m examples.training.corpus_features --corpus examples/training/corpus/smollm2-135m --workers 2

For corpus shard k, `<cache>/corpus-features/<key>/shard-0000k-<sha>.safetensors` holds what
features.extract computes for its samples (prompt + response, capped at `max_len` tokens): tokens,
offsets, prompt_lens, features [N, len(layer_ids) * H] float16, topk_ids [N, K] int32, topk_logp
[N, K] float32. `key` digests the settings and `<sha>` the shard's token file, so a changed shard or
setting never reads stale features, and new shards leave the old ones' features valid. Files are written atomically; a stage interrupted half-way resumes with
the shards still missing, and `--workers n` runs n processes on disjoint shards.

The target runs in bfloat16 (twice float32's speed on an AVX512-BF16 CPU); its final hidden states
go through the LM head in float32 for the top-K log-probabilities. The serving target's float32
features differ from these by bfloat16 rounding, which a drafter does not notice (it was measured
on held-out text served in float32: see the zoo TRAINING.md files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from examples.training import corpus as corpus_mod
from examples.training.data import Sample

FORMAT_VERSION = 1


def cache_folder(cache_dir: Path, layer_ids, topk: int, max_len: int, dtype: str) -> Path:
    """One folder per extraction setting; the corpus content is keyed per shard (`feature_path`),
    so a corpus that grows by new shards keeps the features of the old ones."""
    payload = dict(layer_ids=list(layer_ids), topk=topk, max_len=max_len, dtype=dtype, version=FORMAT_VERSION)
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "corpus-features" / key


def feature_path(folder: Path, corpus: Path, k: int) -> Path:
    """Shard k's feature file, named by the digest of its token file: regenerated shard = new file."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    name = corpus_mod.shard_name(k)
    if name not in manifest["shards"]:
        raise SystemExit(f"{corpus}: {name} is not in manifest.json (run python -m examples.training.corpus manifest)")
    return folder / f"{name}-{manifest['shards'][name]['sha256_npz'][:12]}.safetensors"


def shard_samples(corpus: Path, k: int) -> list[Sample]:
    return [Sample(r["id"], r["source"], r["prompt_ids"], r["response_ids"], r["mode"])
            for r in corpus_mod.read_shard(corpus, k)]


def build(model, corpus: Path, folder: Path, shards: list[int], layer_ids, topk: int, max_len: int) -> None:
    """Extract every shard of `shards` whose cache file is missing (atomic writes)."""
    from examples.training.features import extract

    folder.mkdir(parents=True, exist_ok=True)
    head = model.lm_head.weight.detach().float()
    for k in shards:
        out = feature_path(folder, corpus, k)
        if out.exists():
            continue
        start = time.time()
        tensors = extract(model, shard_samples(corpus, k), tuple(layer_ids), topk, max_len, head_weight=head)
        tmp = folder / f".{out.name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out)
        n = int(tensors["tokens"].numel())
        print(f"[features] {out.name}: {n} tokens in {time.time() - start:.0f} s ({n / (time.time() - start):.0f} tok/s)",
              flush=True)


@dataclass
class _Part:
    path: Path
    offsets: torch.Tensor  # [s + 1] int64 local offsets
    prompt_lens: torch.Tensor  # [s] int64
    tokens: torch.Tensor  # [n] int64
    width: int
    topk: int


class ShardedFeatureSet:
    """The FeatureSet interface (num_seqs, seq(s), feature_width, topk) over per-shard files; the
    float16 features and top-K tensors are sliced from the memory-mapped files per sequence."""

    def __init__(self, files: list[Path]):
        if not files:
            raise ValueError("no feature files")
        self.parts: list[_Part] = []
        self.index: list[tuple[int, int]] = []  # global sequence -> (part, local sequence)
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                offsets, prompt_lens, tokens = f.get_tensor("offsets"), f.get_tensor("prompt_lens"), f.get_tensor("tokens")
                width, topk = f.get_slice("features").get_shape()[1], f.get_slice("topk_ids").get_shape()[1]
            part = _Part(path, offsets.long(), prompt_lens.long(), tokens.long(), int(width), int(topk))
            self.index += [(len(self.parts), s) for s in range(part.offsets.numel() - 1)]
            self.parts.append(part)
        self.feature_width, self.topk = self.parts[0].width, self.parts[0].topk
        self._handles: dict[int, object] = {}

    @property
    def num_seqs(self) -> int:
        return len(self.index)

    @property
    def num_tokens(self) -> int:
        return sum(int(p.tokens.numel()) for p in self.parts)

    def _handle(self, i: int):
        if i not in self._handles:
            self._handles[i] = safe_open(str(self.parts[i].path), framework="pt")
        return self._handles[i]

    def seq(self, s: int) -> dict:
        i, local = self.index[s]
        part = self.parts[i]
        lo, hi = int(part.offsets[local]), int(part.offsets[local + 1])
        f = self._handle(i)
        return dict(tokens=part.tokens[lo:hi], features=f.get_slice("features")[lo:hi],
                    topk_ids=f.get_slice("topk_ids")[lo:hi].long(), topk_logp=f.get_slice("topk_logp")[lo:hi].float(),
                    prompt_len=int(part.prompt_lens[local]))


def feature_files(folder: Path, corpus: Path, shards: list[int]) -> list[Path]:
    files = [feature_path(folder, corpus, k) for k in shards]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"{folder}: features missing for {missing} (run python -m examples.training.corpus_features)")
    return files


def main(argv=None) -> int:
    from examples.training.target import load_target, target_path

    parser = argparse.ArgumentParser(prog="python -m examples.training.corpus_features", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark-sglang")) / "train")
    parser.add_argument("--layer-ids", default="1,8,14,20,27", help="target decoder layers (the zoo drafters' default)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--shards", default=None, metavar="A:B",
                        help="extract shards A..B-1 only (default: every shard of the manifest)")
    parser.add_argument("--workers", type=int, default=1, help="processes (each one OpenMP thread)")
    parser.add_argument("--target-path", default=None)
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    layer_ids = [int(x) for x in args.layer_ids.split(",")]
    folder = cache_folder(args.cache_dir, layer_ids, args.topk, args.max_len, "bfloat16")
    shards = corpus_mod.manifest_shards(args.corpus)
    if args.shards:
        lo, hi = (int(x) for x in args.shards.split(":"))
        shards = [k for k in shards if lo <= k < hi]
    corpus_mod.verify(args.corpus, quiet=True)
    if args.worker_index is None and args.workers > 1:
        import subprocess

        procs = [subprocess.Popen([sys.executable, "-m", "examples.training.corpus_features", *(argv or sys.argv[1:]),
                                   "--worker-index", str(i)]) for i in range(args.workers)]
        return max(p.wait() for p in procs)
    mine = [k for k in shards if args.worker_index is None or k % args.workers == args.worker_index]
    model, _ = load_target(target_path(args.target_path), torch.bfloat16)
    build(model, args.corpus, folder, mine, layer_ids, args.topk, args.max_len)
    print(f"[features] {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
