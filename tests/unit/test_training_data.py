"""examples/training/data.generate_once: the target answers each prompt once, later calls only read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.training import data as data_mod  # noqa: E402

PROMPTS = [("p2", "chat", [5, 6]), ("p0", "code", [1]), ("p1", "math", [2, 3, 4])]


def test_generates_once_and_returns_prompt_order(tmp_path, monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, out_file, **kw):  # answers in reverse order, like length-sorted batches
        calls.append([p[0] for p in prompts])
        with out_file.open("a") as sink:
            for pid, domain, ids in reversed(prompts):
                sink.write(json.dumps(dict(prompt_id=pid, domain=domain, mode="greedy", prompt_ids=ids,
                                           response_ids=ids + [9])) + "\n")

    monkeypatch.setattr(data_mod, "generate_responses", fake_generate)
    rows, manifest = data_mod.generate_once(None, None, PROMPTS, tmp_path, {"k": 1}, seed=0)
    assert [r["prompt_id"] for r in rows] == ["p2", "p0", "p1"]
    assert manifest == dict(k=1, num_samples=3, seconds=manifest["seconds"], response_tokens=9, prompt_tokens=6)
    again, manifest2 = data_mod.generate_once(None, None, PROMPTS, tmp_path, {"k": 1}, seed=0)
    assert calls == [["p2", "p0", "p1"]] and again == rows and manifest2 == manifest


def test_no_prompts_seals_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "generate_responses", lambda *a, **k: (_ for _ in ()).throw(AssertionError("called")))
    rows, manifest = data_mod.generate_once(None, None, [], tmp_path, {}, seed=0)
    assert rows == [] and manifest["num_samples"] == 0 and (tmp_path / "manifest.json").exists()
