"""Slot-0 greedy agreement of n-gram predictors: how far a drafter is from not reading the target at all.

    OMP_NUM_THREADS=1 python -m examples.training.ngram_baseline --corpus examples/training/corpus/smollm2-135m \
        --train-shards 0:5 --holdout-shard 5

Fits bigram and trigram (bigram backoff) next-token counts on the training shards' tokens and reports
how often their most frequent continuation of the anchor equals the target's greedy next token (top-1
of the cached target features) at every held-out response anchor: the `agree_at[0]` that
train_drafter.py reports, for predictors that ignore the target's hidden states.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

from safetensors import safe_open

from examples.training import corpus as corpus_mod
from examples.training.corpus_features import cache_folder, feature_path


def fit(corpus: Path, shards: list[int]) -> tuple[dict, dict]:
    bigram, trigram = defaultdict(Counter), defaultdict(Counter)
    for k in shards:
        for row in corpus_mod.read_shard(corpus, k):
            seq = [int(t) for t in row["prompt_ids"]] + [int(t) for t in row["response_ids"]]
            for i in range(1, len(seq) - 1):
                bigram[seq[i]][seq[i + 1]] += 1
                trigram[(seq[i - 1], seq[i])][seq[i + 1]] += 1
    top = lambda table: {key: c.most_common(1)[0][0] for key, c in table.items()}  # noqa: E731
    return top(bigram), top(trigram)


def agreement(features_file: Path, bigram: dict, trigram: dict) -> dict:
    with safe_open(str(features_file), framework="pt") as f:
        tokens, offsets, prompt_lens = f.get_tensor("tokens").tolist(), f.get_tensor("offsets").tolist(), f.get_tensor("prompt_lens").tolist()
        target_top1 = f.get_tensor("topk_ids")[:, 0].tolist()  # target's greedy token after position i
    n = hits_bi = hits_tri = 0
    for s, prompt_len in enumerate(prompt_lens):
        lo, hi = offsets[s], offsets[s + 1]
        for a in range(lo + prompt_len, hi - 1):  # the anchors train_drafter evaluates
            bi = bigram.get(tokens[a], -1)
            tri = trigram.get((tokens[a - 1], tokens[a]), bi)
            n += 1
            hits_bi += bi == target_top1[a]
            hits_tri += tri == target_top1[a]
    return dict(anchors=n, bigram=hits_bi / max(n, 1), trigram=hits_tri / max(n, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.training.ngram_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--train-shards", default="0:5", metavar="A:B")
    parser.add_argument("--holdout-shard", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "dspark-sglang" / "train")
    parser.add_argument("--layer-ids", default="1,8,14,20,27")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=2048)
    args = parser.parse_args(argv)
    lo, hi = (int(x) for x in args.train_shards.split(":"))
    bigram, trigram = fit(args.corpus, list(range(lo, hi)))
    folder = cache_folder(args.cache_dir, [int(x) for x in args.layer_ids.split(",")], args.topk, args.max_len, "bfloat16")
    result = agreement(feature_path(folder, args.corpus, args.holdout_shard), bigram, trigram)
    print(f"held-out shard {args.holdout_shard}: {result['anchors']} anchors; slot-0 greedy agreement with the target: "
          f"bigram {result['bigram']:.3f}, trigram (bigram backoff) {result['trigram']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
