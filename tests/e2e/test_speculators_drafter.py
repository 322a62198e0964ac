"""A vLLM speculators-format drafter served end to end: the zoo DSpark drafter, re-exported into the
speculators layout by `dspark-convert to-speculators`, runs in a real SGLang CPU engine with
`--speculative-algorithm DSPARK`. Greedy output equals the plain engine's token for token (4 real
prompts x 48 tokens, batched), and the accepted length per round stays above the floor that the
zoo drafters' own test uses (tests/e2e/test_zoo_drafters.py: DSpark measured 1.333 there; a
speculators copy that read its layer ids or slots wrong would draft junk and sit at 1.0).
"""

from __future__ import annotations

import pytest

from test_zoo_drafters import FLOORS, _generate, reference  # noqa: F401  (module fixture; zoo_setup is conftest's)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def speculators_drafter(tmp_path_factory):
    from dspark_sglang.drafters.convert import to_speculators
    from dspark_sglang.drafters.loader import describe_drafter
    from dspark_sglang.models import zoo_drafter

    out = tmp_path_factory.mktemp("speculators") / "smollm2-135m-dspark"
    to_speculators(zoo_drafter("dspark"), out)
    assert describe_drafter(out).format == "speculators_dspark"
    return out


def test_speculators_drafter_parity_and_accept_floor(zoo_setup, reference, speculators_drafter):  # noqa: F811
    target, texts = zoo_setup
    outs, _ = _generate(target, texts, speculative_algorithm="DSPARK",
                        speculative_draft_model_path=str(speculators_drafter))
    assert [o["output_ids"] for o in outs] == reference
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    rounds = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    accept_length = tokens / rounds
    print(f"speculators dspark: accepted length {accept_length:.3f} over {rounds} rounds")
    assert accept_length > FLOORS["dspark"], accept_length
