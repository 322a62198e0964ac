"""The zoo drafters (trained for the bundled target, shipped in the package) served by the plugin
worker inside a real SGLang CPU engine: for each drafter family, greedy output equals the plain
engine's token for token (4 real prompts x 48 tokens, batched and one at a time), and the engine's reported accepted
length per round stays above a floor measured for that drafter.

Floors: set from the accepted lengths measured on these prompts and tokens with the committed zoo
drafters (DSpark 1.333 over 144 rounds, DFlash 1.315 over 146, Eagle3 1.352 over 142), minus a margin, so a regression to
"drafts always rejected" (accepted length 1.0, e.g. a shifted slot or a random-init head) fails while
run-to-run noise does not. The zoo drafters are small and briefly trained (see their TRAINING.md).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

MAX_NEW = 48
# family -> minimum mean accepted tokens per verification round (incl. the bonus token)
FLOORS = {"dspark": 1.2, "dflash": 1.2, "eagle3": 1.2}


def _generate(target, texts, one_at_a_time=False, **spec):
    """Batched outputs, plus (one_at_a_time) each prompt generated alone in the same engine."""
    import sglang as sgl

    from dspark_sglang.cpu_mode import cpu_engine_kwargs

    params = {"temperature": 0.0, "max_new_tokens": MAX_NEW}
    engine = sgl.Engine(model_path=str(target), **cpu_engine_kwargs(speculative=True), **spec)
    try:
        batched = engine.generate(texts, params)
        alone = [engine.generate(text, params) for text in texts] if one_at_a_time else None
        return batched, alone
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def reference(zoo_setup):
    target, texts = zoo_setup
    return [o["output_ids"] for o in _generate(target, texts)[0]]


@pytest.mark.parametrize("family", sorted(FLOORS))
def test_zoo_drafter_parity_and_accept_floor(zoo_setup, reference, family):
    from dspark_sglang.models import zoo_drafter

    target, texts = zoo_setup
    outs, alone = _generate(target, texts, one_at_a_time=True, speculative_algorithm="DSPARK",
                            speculative_draft_model_path=str(zoo_drafter(family)))
    assert [o["output_ids"] for o in outs] == reference
    # One at a time (no batch neighbours; repeated prompts may hit the radix cache): still exact.
    assert [o["output_ids"] for o in alone] == reference
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    rounds = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    accept_length = tokens / rounds
    print(f"{family}: accepted length {accept_length:.3f} over {rounds} rounds")
    assert accept_length > FLOORS[family], (family, accept_length)


def test_fixed_width_verify_tiers_keep_greedy_parity(zoo_setup, reference, monkeypatch):
    """DSPARK_VERIFY_TIERS=auto: every round verifies R x W rows for W in (2, 4, 8), the static shapes
    a CUDA graph replays; rows past a request's verify length are computed and never accepted. The
    lagged scheduler (drafting priced free, so it drafts every round) picks different lengths per
    request, so windows are padded (counted in /server_info), and the output stays the plain engine's."""
    import sglang as sgl

    from dspark_sglang.cpu_mode import cpu_engine_kwargs
    from dspark_sglang.models import zoo_drafter

    monkeypatch.setenv("DSPARK_VERIFY_TIERS", "auto")
    monkeypatch.setenv("DSPARK_DRAFT_COST", "none")
    target, texts = zoo_setup
    engine = sgl.Engine(model_path=str(target), **cpu_engine_kwargs(speculative=True), speculative_algorithm="DSPARK",
                        speculative_draft_model_path=str(zoo_drafter("dspark")))
    try:
        outs = engine.generate(texts, {"temperature": 0.0, "max_new_tokens": MAX_NEW})
        stats = engine.get_server_info()["internal_states"][0]["dspark_plugin"]
    finally:
        engine.shutdown()
    assert [o["output_ids"] for o in outs] == reference
    assert stats["verify_rows_padded"] > 0, stats
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert tokens / sum(o["meta_info"]["spec_verify_ct"] for o in outs) > FLOORS["dspark"]
