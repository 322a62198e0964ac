"""A reduced draft vocabulary: the drafter scores only a frequency-ranked subset of the target's
vocabulary (FR-Spec; SpecForge's d2t/t2d maps), for any drafter format.

Why: on a CPU at batch 1 the draft step is bound by reading the LM head ([V, H] = 113 MB in float32
for SmolLM2's 49k vocabulary), and at larger batches by its FLOPs and by the softmax/sampling over V
per drafted slot; the DSpark Markov head reads its [V, r] second factor once per slot as well. A
subset of Vd ids, chosen offline from the target's own outputs, cuts all of these by V / Vd.

Exact: the draft distribution q is a softmax over the subset, scattered into the target vocabulary
with q = 0 outside it. Chain acceptance (accept x with min(1, p/q), residual norm(max(p - q, 0)))
is lossless for any q, so the output distribution stays the target's; only the accepted length
changes (a target token outside the subset can never be drafted).

File: `draft_vocab.safetensors` beside the drafter's `config.json`, SpecForge's convention:
- `d2t` [Vd] int64 offsets: draft index d is target id d + d2t[d];
- `t2d` [V] bool: target id v is in the subset;
with nonzero(t2d) == d2t + arange(Vd) (ascending ids; checked on load). Build one with

    python -m dspark_sglang.drafters.draft_vocab build --corpus examples/training/corpus/smollm2-135m \\
        --size 8192 --out dspark_sglang/zoo/smollm2-135m-dspark/draft_vocab.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dspark_sglang.drafters.errors import DrafterWeightsError

FILE_NAME = "draft_vocab.safetensors"


@dataclass(frozen=True)
class DraftVocab:
    """The subset: `ids` [Vd] int64, ascending target ids; `vocab_size` V of the target."""

    ids: torch.Tensor
    vocab_size: int

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def to(self, device) -> "DraftVocab":
        return DraftVocab(self.ids.to(device), self.vocab_size)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """[V, ...] -> [Vd, ...]: the subset's rows (an LM head or a Markov second factor)."""
        return weight.index_select(0, self.ids.to(weight.device)).contiguous()

    def to_target(self, draft_idx: torch.Tensor) -> torch.Tensor:
        """[...] draft indices -> [...] target ids."""
        return self.ids.to(draft_idx.device)[draft_idx]

    def expand(self, probs: torch.Tensor) -> torch.Tensor:
        """[..., Vd] -> [..., V], zero outside the subset."""
        full = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.ids.to(probs.device), probs)

    def lift(self, block):
        """A DraftBlock sampled over the subset (tokens are draft indices, probs [R, G, Vd]) ->
        target ids and target-vocabulary probs; q(x) and the confidences are unchanged."""
        return replace(block, tokens=self.to_target(block.tokens), probs=self.expand(block.probs))


def from_ids(ids, vocab_size: int) -> DraftVocab:
    """A DraftVocab from any iterable of target ids (deduplicated, sorted, range-checked)."""
    ids = torch.as_tensor(sorted(set(int(i) for i in ids)), dtype=torch.int64)
    if ids.numel() == 0:
        raise ValueError("a draft vocabulary needs at least one token")
    if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size})")
    return DraftVocab(ids, vocab_size)


def most_frequent(counts: torch.Tensor, size: int, keep=()) -> DraftVocab:
    """The `size` most frequent ids of `counts` [V] (ties: lower id first), plus every id in `keep`."""
    vocab_size = counts.numel()
    if not 1 <= size <= vocab_size:
        raise ValueError(f"size must lie in [1, {vocab_size}], got {size}")
    # Stable descending sort by count: equal counts keep ascending id order.
    order = torch.sort(counts.to(torch.int64), descending=True, stable=True).indices
    return from_ids(order[:size].tolist() + list(keep), vocab_size)


def coverage(vocab: DraftVocab, counts: torch.Tensor) -> float:
    """Share of the counted tokens that lie in the subset."""
    total = float(counts.sum())
    return float(counts[vocab.ids].sum()) / total if total else 0.0


def save(path: str | Path, vocab: DraftVocab) -> None:
    from safetensors.torch import save_file

    ids = vocab.ids.cpu()
    t2d = torch.zeros(vocab.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    save_file({"d2t": ids - torch.arange(ids.numel()), "t2d": t2d}, str(path))


def load(path: str | Path, vocab_size: int) -> DraftVocab:
    """Read and check a draft_vocab.safetensors against a target of `vocab_size` tokens."""
    from dspark_sglang.drafters.eagle3_config import check_vocab_map

    path = str(path)
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            missing = {"d2t", "t2d"} - names
            if missing:
                raise DrafterWeightsError(path, sorted(missing)[0], "missing (a draft vocabulary has d2t and t2d)")
            d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    except DrafterWeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one typed error naming it
        raise DrafterWeightsError(path, "file", f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if d2t.ndim != 1 or d2t.dtype not in (torch.int64, torch.int32) or d2t.numel() == 0:
        raise DrafterWeightsError(path, "d2t", f"must be a non-empty 1-D integer tensor, got {d2t.dtype} {tuple(d2t.shape)}")
    if t2d.dtype != torch.bool or t2d.shape != (vocab_size,):
        raise DrafterWeightsError(path, "t2d", f"must be bool [{vocab_size}] (the target's vocabulary), got {t2d.dtype} {tuple(t2d.shape)}")
    return DraftVocab(check_vocab_map(d2t.long(), t2d, vocab_size, path), vocab_size)


def beside(drafter_path: str | Path) -> Path:
    return Path(drafter_path) / FILE_NAME


# ---- CLI -------------------------------------------------------------------------------------------


def _corpus_counts(corpus: Path, vocab_size: int) -> torch.Tensor:
    """Token counts [V] of the response tokens (the target's own outputs) of a corpus folder."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.int64)
    shards = sorted(corpus.glob("shard-*.npz"))
    if not shards:
        raise SystemExit(f"{corpus}: no shard-*.npz files (see examples/training/corpus.py)")
    for shard in shards:
        with np.load(shard, allow_pickle=False) as z:
            counts += np.bincount(z["response_tokens"].astype(np.int64), minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(counts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_sglang.drafters.draft_vocab",
                                     description="Build or inspect a reduced draft vocabulary (draft_vocab.safetensors).",
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="the most frequent target tokens of a self-distillation corpus")
    build.add_argument("--corpus", type=Path, required=True, help="corpus folder (shard-*.npz with response_tokens)")
    build.add_argument("--size", type=int, required=True, help="tokens in the subset (Vd)")
    build.add_argument("--vocab-size", type=int, default=49152, help="the target's vocabulary size V")
    build.add_argument("--keep", default="0,1,2", help="ids always included (default: SmolLM2's special tokens 0,1,2)")
    build.add_argument("--out", type=Path, required=True)
    info = sub.add_parser("info", help="size and corpus coverage of an existing file")
    info.add_argument("path", type=Path)
    info.add_argument("--vocab-size", type=int, default=49152)
    info.add_argument("--corpus", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "build":
        counts = _corpus_counts(args.corpus, args.vocab_size)
        keep = [int(x) for x in args.keep.split(",") if x.strip()]
        vocab = most_frequent(counts, args.size, keep)
        save(args.out, vocab)
        print(json.dumps({"out": str(args.out), "size": vocab.size, "vocab_size": vocab.vocab_size,
                          "corpus_tokens": int(counts.sum()), "coverage": round(coverage(vocab, counts), 5)}))
    else:
        vocab = load(args.path, args.vocab_size)
        row = {"path": str(args.path), "size": vocab.size, "vocab_size": vocab.vocab_size}
        if args.corpus is not None:
            row["coverage"] = round(coverage(vocab, _corpus_counts(args.corpus, args.vocab_size)), 5)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
