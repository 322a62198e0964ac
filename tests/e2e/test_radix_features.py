"""Radix-cache hits under DSPARK in the real engine (dspark_sglang/sglang/feature_pool.py).

With DSPARK_KEEP_RADIX_CACHE=1 the worker stores the drafter's target features per KV slot, and a
request whose prompt is cached reads the prefix's features from that store. Here the same prompts
are sent cold, then warm (a real hit: > 90% of the prompt cached): outputs are identical and every
request takes as many verification rounds as it did cold.

This is the integration check (the store is sized from SGLang's KV pool, written by prefill and
verify forwards, read on a hit, without breaking exactness). Whether a hit reads the exact cold
features, and that zeros would be read without the store, is shown in tests/unit/test_feature_pool.py:
with this weak zoo drafter the round counts alone do not tell zeros from real features (checked by
hand: they matched with the store disabled too).
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
    os.environ["DSPARK_KEEP_RADIX_CACHE"] = "1"
    try:
        engine = sgl.Engine(model_path=str(target), speculative_algorithm="DSPARK",
                            speculative_draft_model_path=str(zoo_drafter("dspark")),
                            **cpu_engine_kwargs(speculative=True))
    finally:
        del os.environ["DSPARK_KEEP_RADIX_CACHE"]
    yield engine, texts
    engine.shutdown()


def test_warm_prompts_draft_like_cold_ones(engine_and_texts):
    engine, texts = engine_and_texts
    greedy = {"temperature": 0.0, "max_new_tokens": MAX_NEW}
    cold = engine.generate(texts, greedy)
    warm = engine.generate(texts, greedy)
    for c, w in zip(cold, warm):
        assert w["output_ids"] == c["output_ids"]
        assert w["meta_info"]["cached_tokens"] > 0.9 * w["meta_info"]["prompt_tokens"]  # a real hit
        assert w["meta_info"]["spec_verify_ct"] == c["meta_info"]["spec_verify_ct"]
        assert w["meta_info"]["spec_accept_length"] == c["meta_info"]["spec_accept_length"]
