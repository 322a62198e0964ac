"""Radix-cache hits under DSPARK in the real engine, on by default.

The zoo DSpark drafter keeps its context K/V in a pool indexed by SGLang's KV slots
(drafters/block.py `KvSlotContext`), so a request whose prompt is cached finds the prefix's rows in
place. Here the same prompts are sent cold, then warm (a real hit: > 90% of the prompt cached), one
at a time, with the round-cost probe verifying every draft (window 8): outputs are identical, the
warm requests adopt the cached rows, and every round accepts exactly as many drafts as it did cold,
which a drafter reading other context rows would not (round by round acceptance of 7 verified
drafts is a fingerprint of the drafts themselves). That an adopted prefix drafts exactly what a
cold start drafts is shown directly in tests/unit/test_kv_slot_context.py.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.e2e

MAX_NEW = 32
PROMPT_SETS = ("gsm8k", "mtbench", "humaneval")


@pytest.fixture(scope="module")
def engine_and_texts():
    import sglang as sgl
    from transformers import AutoTokenizer

    from dspark_sglang.cpu_mode import cpu_engine_kwargs
    from dspark_sglang.models import ensure_target, zoo_drafter
    from dspark_sglang.prompts import load_prompts

    target = ensure_target()
    tokenizer = AutoTokenizer.from_pretrained(target)
    texts = [tokenizer.apply_chat_template(load_prompts(name, limit=1)[0].messages, tokenize=False,
                                           add_generation_prompt=True) for name in PROMPT_SETS]
    os.environ["DSPARK_ROUND_PROBE"] = "8"  # every round verifies all 7 drafts
    try:
        engine = sgl.Engine(model_path=str(target), speculative_algorithm="DSPARK",
                            speculative_draft_model_path=str(zoo_drafter("dspark")),
                            **cpu_engine_kwargs(speculative=True))
    finally:
        del os.environ["DSPARK_ROUND_PROBE"]
    yield engine, texts
    engine.shutdown()


def _plugin(engine) -> dict:
    return engine.get_server_info()["internal_states"][0]["dspark_plugin"]


def test_warm_prompts_draft_like_cold_ones(engine_and_texts):
    engine, texts = engine_and_texts
    greedy = {"temperature": 0.0, "max_new_tokens": MAX_NEW}
    runs = {}
    for phase in ("cold", "warm"):
        outs, accepted = [], []
        for text in texts:  # one request at a time: each probe record is that request's round
            seen = len(_plugin(engine)["round_probe"]["rounds"])
            outs.append(engine.generate(text, greedy))
            accepted.append([r["accepted"] for r in _plugin(engine)["round_probe"]["rounds"][seen:]])
        runs[phase] = (outs, accepted)
    (cold, cold_acc), (warm, warm_acc) = runs["cold"], runs["warm"]
    for c, w in zip(cold, warm):
        assert w["output_ids"] == c["output_ids"]
        assert w["meta_info"]["cached_tokens"] > 0.9 * w["meta_info"]["prompt_tokens"]  # a real hit
    assert warm_acc == cold_acc
    assert sum(map(sum, cold_acc)) > 0  # the drafts do get accepted: the fingerprint says something
    stats = _plugin(engine)
    assert stats["prefix_rows_adopted"] >= sum(w["meta_info"]["cached_tokens"] for w in warm)
    assert stats["context_pool"]["bytes"] > 0
