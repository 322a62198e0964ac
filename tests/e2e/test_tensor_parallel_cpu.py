"""Tensor parallelism 2 for real, on SGLang's CPU engine (two scheduler ranks over gloo): the DSPARK
worker with the zoo DSpark drafter, whose verify logits and borrowed vocabulary rows are gathered
across the two vocabulary shards (`tensor_parallel.full_vocab_rows`), must produce the plain tp-2
engine's greedy output token for token, and accept drafts (fewer verify rounds than tokens)."""

import pytest

pytestmark = pytest.mark.e2e
MAX_NEW = 24


def _generate(target, texts, **spec):
    import sglang as sgl

    from dspark_sglang.cpu_mode import cpu_engine_kwargs

    engine = sgl.Engine(model_path=str(target), tp_size=2, **cpu_engine_kwargs(speculative=True), **spec)
    try:
        return engine.generate(texts, {"temperature": 0.0, "max_new_tokens": MAX_NEW})
    finally:
        engine.shutdown()


def test_tp2_greedy_parity_with_the_plain_tp2_engine(zoo_setup, monkeypatch):
    from dspark_sglang.cpu_mode import tensor_parallel_environment
    from dspark_sglang.models import zoo_drafter

    for key, value in tensor_parallel_environment(2).items():
        monkeypatch.setenv(key, value)  # inherited by the scheduler ranks
    target, texts = zoo_setup
    texts = texts[:2]
    plain = _generate(target, texts)
    spec = _generate(target, texts, speculative_algorithm="DSPARK",
                     speculative_draft_model_path=str(zoo_drafter("dspark")))
    assert [o["output_ids"] for o in spec] == [o["output_ids"] for o in plain]
    tokens = sum(o["meta_info"]["completion_tokens"] for o in spec)
    rounds = sum(o["meta_info"]["spec_verify_ct"] for o in spec)
    assert rounds < tokens, (tokens, rounds)  # drafts were accepted
