"""The corpus feature cache (examples/training/corpus_features.py): one folder per extraction
setting, one file per shard named by the shard's checksum, read lazily per sequence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from examples.training import corpus
from examples.training import corpus_features as cf


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [dict(id=f"sharegpt/y{offset + i}", source="sharegpt", turns=1, mode="greedy", finish="length",
                 prompt_ids=list(range(i, i + 3)), response_ids=[5, 6, i]) for i in range(n)]


def test_cache_key_depends_on_settings_only_and_files_on_shard_content(tmp_path):
    folder = cf.cache_folder(tmp_path, [1, 8], 64, 2048, "bfloat16")
    assert folder == cf.cache_folder(tmp_path, [1, 8], 64, 2048, "bfloat16")
    assert folder != cf.cache_folder(tmp_path, [1, 9], 64, 2048, "bfloat16")
    assert folder != cf.cache_folder(tmp_path, [1, 8], 32, 2048, "bfloat16")

    data = tmp_path / "corpus"
    data.mkdir()
    corpus.write_shard(data, 0, _rows(2), {"seconds": 1.0})
    corpus.write_manifest(data)
    first = cf.feature_path(folder, data, 0)
    # A corpus that grows keeps shard 0's feature file ...
    corpus.write_shard(data, 1, _rows(2, 10), {"seconds": 1.0})
    corpus.write_manifest(data)
    assert cf.feature_path(folder, data, 0) == first
    assert cf.feature_path(folder, data, 1) != first
    # ... a regenerated shard 0 gets a new one.
    corpus.write_shard(data, 0, _rows(3), {"seconds": 1.0})
    corpus.write_manifest(data)
    assert cf.feature_path(folder, data, 0) != first


def test_shards_missing_from_the_manifest_are_not_read(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    corpus.write_shard(data, 0, _rows(2), {"seconds": 1.0})
    corpus.write_manifest(data)
    corpus.write_shard(data, 1, _rows(2, 10), {"seconds": 1.0})  # written by a running `generate`
    assert corpus.done_shards(data) == [0, 1]
    assert corpus.manifest_shards(data) == [0]
    with pytest.raises(SystemExit, match="shard-00001 is not in manifest.json"):
        cf.feature_path(tmp_path / "f", data, 1)


def test_sharded_feature_set_slices_each_sequence(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    files = []
    for part, lengths in enumerate([[3, 4], [2]]):
        n = sum(lengths)
        offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
        tensors = dict(tokens=torch.arange(n, dtype=torch.int32) + 100 * part, offsets=offsets,
                       prompt_lens=torch.tensor([1] * len(lengths)),
                       features=torch.arange(n * 6, dtype=torch.float16).reshape(n, 6) + 100 * part,
                       topk_ids=torch.zeros(n, 2, dtype=torch.int32), topk_logp=torch.zeros(n, 2))
        files.append(folder / f"part{part}.safetensors")
        save_file(tensors, str(files[-1]))
    fs = cf.ShardedFeatureSet(files)
    assert (fs.num_seqs, fs.num_tokens, fs.feature_width, fs.topk) == (3, 9, 6, 2)
    assert fs.seq(1)["tokens"].tolist() == [3, 4, 5, 6]
    assert fs.seq(2)["tokens"].tolist() == [100, 101]
    assert fs.seq(2)["features"][1, 0].item() == 106.0
    with pytest.raises(ValueError, match="no feature files"):
        cf.ShardedFeatureSet([])


def test_plot_curves_reads_runs_and_rejects_other_json(tmp_path):
    from examples.training import plot_curves

    run = tmp_path / "run"
    run.mkdir()
    point = dict(step=0, seconds=6.0, anchors_seen=0, accept_at=[0.3, 0.2], agree_at=[0.25, 0.2], tau_prob=1.4)
    (run / "learning_curve.json").write_text(json.dumps([point, dict(point, step=500, anchors_seen=16000, tau_prob=1.6)]))
    text = plot_curves.table({"a": plot_curves.load_curve(run)})
    assert "| a | 500 | 16000 | 0.1 | 0.300 | 0.250 | 1.600 |" in text
    assert plot_curves.main([f"a={run}", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(SystemExit, match="not a learning_curve.json"):
        plot_curves.load_curve(tmp_path / "bad.json")


def test_ngram_baseline_counts_agreement_on_response_anchors(tmp_path):
    from examples.training import ngram_baseline

    data = tmp_path / "corpus"
    data.mkdir()
    rows = [dict(id="sharegpt/z0", source="sharegpt", turns=1, mode="greedy", finish="length",
                 prompt_ids=[1, 2], response_ids=[3, 4, 3, 4, 3])]
    corpus.write_shard(data, 0, rows, {"seconds": 1.0})
    corpus.write_manifest(data)
    bigram, trigram = ngram_baseline.fit(data, [0])
    assert bigram[3] == 4 and bigram[4] == 3 and trigram[(3, 4)] == 3
    # held out: tokens 1 2 | 3 4 9; the target's greedy continuations after each position
    tokens = torch.tensor([1, 2, 3, 4, 9], dtype=torch.int32)
    top1 = torch.tensor([[2], [3], [4], [7], [0]], dtype=torch.int32)  # after 3: 4 (hit); after 4: 7 (miss)
    save_file(dict(tokens=tokens, offsets=torch.tensor([0, 5]), prompt_lens=torch.tensor([2]), topk_ids=top1),
              str(tmp_path / "f.safetensors"))
    result = ngram_baseline.agreement(tmp_path / "f.safetensors", bigram, trigram)
    assert result == dict(anchors=2, bigram=0.5, trigram=0.5)
