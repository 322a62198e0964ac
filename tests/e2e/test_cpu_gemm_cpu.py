"""`DSPARK_CPU_GEMM=few-rows|row-dot` (dspark_sglang/sglang/cpu_gemm.py) in real SGLang CPU engines.

With either kernel in both engines, the zoo DSpark drafter's greedy output still equals the plain
engine's token for token (4 real prompts x 48 tokens, batched), verify windows of several rows
included (accepted length above 1.2). The hooks are proven live: the speculative engine reports them in
`/server_info`, and the plain engine's logprobs move off the stock engine's in the last bits.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.e2e

MAX_NEW = 48
PARAMS = {"temperature": 0.0, "max_new_tokens": MAX_NEW}


def _run(target, texts, gemm: str, **spec) -> tuple[list[dict], dict | None]:
    """Batched greedy outputs (with logprobs) of an engine started under DSPARK_CPU_GEMM=gemm, and
    the plugin's /server_info entry (speculative engines)."""
    import sglang as sgl

    from dspark_sglang.cpu_mode import cpu_engine_kwargs

    before = os.environ.get("DSPARK_CPU_GEMM")
    os.environ["DSPARK_CPU_GEMM"] = gemm  # the scheduler process inherits it and installs the hooks
    try:
        engine = sgl.Engine(model_path=str(target), **cpu_engine_kwargs(speculative=True), **spec)
    finally:
        if before is None:
            os.environ.pop("DSPARK_CPU_GEMM")
        else:
            os.environ["DSPARK_CPU_GEMM"] = before
    try:
        outs = engine.generate(texts, PARAMS, return_logprob=True)
        plugin = engine.get_server_info()["internal_states"][0].get("dspark_plugin") if spec else None
        return outs, plugin
    finally:
        engine.shutdown()


def _logprobs(out: dict) -> list[float]:
    return [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]


@pytest.mark.parametrize("gemm", ["few-rows", "row-dot"])
def test_few_row_gemm_keeps_greedy_parity(zoo_setup, gemm):
    from dspark_sglang.models import zoo_drafter

    target, texts = zoo_setup
    stock, _ = _run(target, texts, "stock")
    plain, _ = _run(target, texts, gemm)
    spec, plugin = _run(target, texts, gemm, speculative_algorithm="DSPARK",
                        speculative_draft_model_path=str(zoo_drafter("dspark")))

    assert plugin["cpu_gemm"] == gemm
    assert [o["output_ids"] for o in spec] == [o["output_ids"] for o in plain]
    tokens = sum(o["meta_info"]["completion_tokens"] for o in spec)
    rounds = sum(o["meta_info"]["spec_verify_ct"] for o in spec)
    print(f"{gemm} GEMM: accepted length {tokens / rounds:.3f} over {rounds} rounds")
    assert tokens / rounds > 1.2

    # The plain engine really ran the other GEMM: same first tokens, logprobs apart in the last bits.
    first = [(o["output_ids"][:4], _logprobs(o)[:4]) for o in plain]
    first_stock = [(o["output_ids"][:4], _logprobs(o)[:4]) for o in stock]
    assert [ids for ids, _ in first] == [ids for ids, _ in first_stock]
    gaps = [abs(a - b) for (_, la), (_, lb) in zip(first, first_stock) for a, b in zip(la, lb)]
    assert max(gaps) > 0.0
    assert max(gaps) < 1e-3
