"""The self-distillation data engine (examples/training/corpus.py): shard storage, checksums, the
evaluation-prompt exclusion, and (when the corpus is committed) that it holds no evaluation prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.training import corpus

COMMITTED = Path(__file__).resolve().parents[2] / "examples" / "training" / "corpus" / "smollm2-135m"


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [dict(id=f"sharegpt/x{offset + i}", source="sharegpt", turns=1, mode="greedy" if i % 2 else "sample",
                 finish="length", prompt_ids=list(range(i, i + 5)), response_ids=[49151, 7, i]) for i in range(n)]


def test_shards_round_trip_and_manifest(tmp_path):
    corpus.write_shard(tmp_path, 0, _rows(3), {"seconds": 1.5})
    corpus.write_shard(tmp_path, 2, _rows(2, 10), {"seconds": 2.0})
    manifest = corpus.write_manifest(tmp_path)
    assert corpus.done_shards(tmp_path) == [0, 2]
    assert manifest["num_samples"] == 5 and manifest["response_tokens"] == 15 and manifest["prompt_tokens"] == 25
    back = corpus.load_corpus(tmp_path)
    assert [r["prompt_ids"] for r in back] == [r["prompt_ids"] for r in _rows(3) + _rows(2, 10)]
    assert back[0]["response_ids"] == [49151, 7, 0] and back[4]["id"] == "sharegpt/x11"


def test_verify_names_a_corrupt_or_missing_shard(tmp_path):
    corpus.write_shard(tmp_path, 0, _rows(3), {"seconds": 1.0})
    corpus.write_manifest(tmp_path)
    npz = tmp_path / "shard-00000.npz"
    data = bytearray(npz.read_bytes())
    data[-5] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00000.npz: sha256 differs"):
        corpus.verify(tmp_path)
    npz.unlink()
    with pytest.raises(ValueError, match="missing"):
        corpus.verify(tmp_path)
    with pytest.raises(ValueError, match="no manifest"):
        corpus.verify(tmp_path / "elsewhere")


def test_token_ids_must_fit_uint16(tmp_path):
    rows = _rows(1)
    rows[0]["response_ids"] = [70000]
    with pytest.raises(ValueError, match="uint16"):
        corpus.write_shard(tmp_path, 0, rows, {"seconds": 1.0})


def test_shingles_catch_an_evaluation_prompt_inside_a_longer_one():
    banned = corpus.shingles("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.")
    inside = [{"role": "user", "content": "Please help: natalia SOLD clips to 48 of her friends in april, and then she"
                                          " sold half as many. Thanks"}]
    unrelated = [{"role": "user", "content": "Write a short poem about the sea and the wind over the harbour at night."}]
    assert corpus.overlaps_eval(inside, banned)
    assert not corpus.overlaps_eval(unrelated, banned)
    # only user turns count: an assistant turn quoting the eval text is the corpus' own business
    assert not corpus.overlaps_eval([{"role": "assistant", "content": inside[0]["content"]}] + unrelated, banned)


def test_committed_corpus_is_intact_and_holds_no_evaluation_prompt():
    manifest = corpus.verify(COMMITTED, quiet=True)
    assert manifest["response_tokens"] >= 100_000
    banned = corpus.eval_shingles()
    from dspark_sglang.prompts import load_prompts

    reserved = {p.id for p in load_prompts("sharegpt", limit=corpus.RESERVED_SHAREGPT)}
    from transformers import AutoTokenizer

    from dspark_sglang.models import ensure_target

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_target(progress=False)))
    for k in corpus.done_shards(COMMITTED):
        info = json.loads((COMMITTED / f"{corpus.shard_name(k)}.json").read_text())
        assert not reserved & {s["id"] for s in info["samples"]}, f"shard {k} uses a reserved ShareGPT prompt"
        for row in corpus.read_shard(COMMITTED, k):
            text = tokenizer.decode(row["prompt_ids"])
            assert not (corpus.shingles(text) & banned), f"{row['id']} shares a 10-word run with an evaluation prompt"
