"""The plugin worker inside a real SGLang engine on CPU, with the real SmolLM2-135M target.

`--speculative-algorithm DSPARK` must be served by our worker, and its greedy output must equal the
non-speculative engine's token for token (float32, so decode and extend round alike), whatever the
drafter proposes. The drafter is a DeepSpec-format DSpark checkpoint built in tmp with random
weights plus a "repeat the anchor" Markov head (`_drafter_ckpt.py`): drafts are mostly rejected on
ordinary text and accepted in whole blocks on repetitive text, so both commit paths run.

Two engines per module (~20-40 s each to start on CPU): a plain one for references, then the
speculative one shared by every test.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).parent))
from _drafter_ckpt import build_dspark_checkpoint  # noqa: E402

MAX_NEW = 48
# Ordinary text (drafts rejected), and text the target repeats token by token (drafts accepted).
PROMPTS = [
    "The capital of France is",
    "Hello!!!!!!!!!!!!!!!!",
    "def fibonacci(n):",
    "Write the letter x forever: xxxxxxxxxxxxxxxx",
]
CHAT_2P2 = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n")
GREEDY = {"temperature": 0.0, "max_new_tokens": MAX_NEW}
# Requests with SGLang's logit adjustments, batched with an unadjusted one. Penalties and
# min_new_tokens depend on the generated tokens (plain decoding for the request); logit_bias does
# not (it speculates, with the bias on every verify row). 31069 is the "xx" token of PROMPTS[3].
ADJUSTED = [
    (PROMPTS[1], {**GREEDY, "frequency_penalty": 1.5}),
    (PROMPTS[3], {**GREEDY, "presence_penalty": 2.0}),
    (PROMPTS[1], {**GREEDY, "repetition_penalty": 1.5}),
    (CHAT_2P2, {**GREEDY, "min_new_tokens": 12}),
    (PROMPTS[3], {**GREEDY, "logit_bias": {"31069": -100.0}}),
    (PROMPTS[0], GREEDY),
]
# return_hidden_states: a repetitive prompt (multi-token rounds) batched with an ordinary one.
HIDDEN_PROMPTS = [PROMPTS[1], PROMPTS[0]]
HIDDEN_PARAMS = {"temperature": 0.0, "max_new_tokens": 16}
LOGPROB_PARAMS = {"temperature": 0.0, "max_new_tokens": 12}
LOGPROB_ASKS = {"return_logprob": True, "top_logprobs_num": 3, "token_ids_logprob": [0, 36689]}


def _engine(target: Path, **extra):
    import sglang as sgl

    from dspark_sglang.cpu_mode import cpu_engine_kwargs

    # float32 for both engines: decode and extend then round alike, so parity is exact.
    # Both engines may return hidden states, so the tests can compare them.
    return sgl.Engine(model_path=str(target), **cpu_engine_kwargs(speculative=True, dtype="float32",
                                                                   enable_return_hidden_states=True, **extra))


@pytest.fixture(scope="module")
def target() -> Path:
    from dspark_sglang.cpu_mode import enable_cpu_mode
    from dspark_sglang.models import ensure_target

    enable_cpu_mode()  # before sglang is imported (engines import it lazily)
    return Path(ensure_target(progress=False))


@pytest.fixture(scope="module")
def drafter(target, tmp_path_factory) -> Path:
    return build_dspark_checkpoint(target, tmp_path_factory.mktemp("drafter"))


@pytest.fixture(scope="module")
def reference(target) -> dict:
    """Greedy outputs of the plain engine: the parity prompts, the EOS prompt, the adjusted requests.

    Overlap scheduling off, like the speculative engine: with it on, SGLang cumulates penalties from
    `req.output_ids`, which lag one token behind (the first decode step penalizes the prompt's last
    token instead of the first output token), so penalized outputs differ from the synchronous ones.
    """
    engine = _engine(target, disable_overlap_schedule=True)
    try:
        outs = engine.generate(PROMPTS + [CHAT_2P2], GREEDY)
        adjusted = engine.generate([p for p, _ in ADJUSTED], [s for _, s in ADJUSTED])
        logprobs = engine.generate(PROMPTS[1], LOGPROB_PARAMS, **LOGPROB_ASKS)["meta_info"]
        hidden = {mode: engine.generate(HIDDEN_PROMPTS, HIDDEN_PARAMS, return_hidden_states=mode)
                  for mode in (True, "last")}
    finally:
        engine.shutdown()
    return {"parity": [o["output_ids"] for o in outs[:-1]], "eos": outs[-1]["output_ids"],
            "adjusted": [o["output_ids"] for o in adjusted], "logprobs": logprobs, "hidden": hidden}


@pytest.fixture(scope="module")
def spec_engine(target, drafter, reference):  # `reference` first: one engine at a time
    # The plugin turns the radix cache off by default (cached prefixes carry no drafter features);
    # keep it on here so the tests below exercise prefix-cache hits under speculation.
    os.environ["DSPARK_KEEP_RADIX_CACHE"] = "1"
    try:
        engine = _engine(target, speculative_algorithm="DSPARK", speculative_draft_model_path=str(drafter))
    finally:
        del os.environ["DSPARK_KEEP_RADIX_CACHE"]
    yield engine
    engine.shutdown()


def test_dspark_is_served_by_the_plugin_worker(spec_engine):
    out = spec_engine.generate(PROMPTS[1], {"temperature": 0.0, "max_new_tokens": 16})
    meta = out["meta_info"]
    info = spec_engine.get_server_info()
    assert info["speculative_algorithm"] == "DSPARK_PLUGIN"  # the takeover resolved to our registration
    # cap_lens (per-request verify windows) is reported by our worker only, not by SGLang's EAGLE/NGRAM.
    assert meta["spec_verify_ct"] > 0 and "spec_cap_length" in meta
    assert 1.0 <= meta["spec_cap_length"] <= info["speculative_num_draft_tokens"]



def test_logprobs_top_k_and_token_ids_match_the_plain_engine(spec_engine, reference):
    # Decode rounds commit several tokens at once (this prompt's drafts are accepted in runs); each
    # token still gets its target logprob, top-3 and asked-for token ids, as the plain engine's.
    lp = spec_engine.generate(PROMPTS[1], LOGPROB_PARAMS, **LOGPROB_ASKS)
    meta, expected = lp["meta_info"], reference["logprobs"]
    assert meta["spec_accept_length"] > 1.5
    assert [t for _, t, _ in meta["output_token_logprobs"]] == lp["output_ids"]
    for key in ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs"):
        ours, theirs = meta[key], expected[key]
        assert len(ours) == len(theirs) == len(lp["output_ids"]), key
        for got, want in zip(ours, theirs):
            rows_got = got if isinstance(got, list) and got and isinstance(got[0], (list, tuple)) else [got]
            rows_want = want if isinstance(want, list) and want and isinstance(want[0], (list, tuple)) else [want]
            assert [r[1] for r in rows_got] == [r[1] for r in rows_want], key  # token ids, in order
            assert [r[0] for r in rows_got] == pytest.approx([r[0] for r in rows_want], abs=1e-3), key


def test_greedy_parity_batched_and_one_at_a_time(spec_engine, reference):
    batched = spec_engine.generate(PROMPTS, GREEDY)
    assert [o["output_ids"] for o in batched] == reference["parity"]
    for prompt, expected in zip(PROMPTS, reference["parity"]):
        # Repeated prompts hit the radix cache: the drafter context is rebuilt without those
        # features, which may only cost acceptance, never exactness.
        assert spec_engine.generate(prompt, GREEDY)["output_ids"] == expected, prompt
    # The repetitive prompt accepted multi-token runs, so the accept-and-commit path ran too.
    assert batched[1]["meta_info"]["spec_accept_length"] > 2.0
    assert max(o["meta_info"]["spec_accept_length"] for o in batched) > 2.0


def test_stop_inside_an_accepted_run_truncates_there(spec_engine, reference):
    # The "x forever" output turns into long runs of the token 31069 ("xx"), drafted and accepted
    # several at a time; stopping on it must end the output at its first occurrence.
    expected = reference["parity"][3]
    stop = 31069
    assert stop in expected
    out = spec_engine.generate(PROMPTS[3], {**GREEDY, "stop_token_ids": [stop]})
    ids = out["output_ids"]
    assert ids == expected[: expected.index(stop) + 1] or ids == expected[: expected.index(stop)]


def test_concurrent_mixed_sampling_eos_and_abort(spec_engine, reference):
    tm = spec_engine.tokenizer_manager
    sampled = [
        {"temperature": 0.7, "max_new_tokens": 24},
        {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 24},
        {"temperature": 0.8, "top_k": 20, "min_p": 0.05, "max_new_tokens": 24},
    ]
    requests = (
        [(PROMPTS[i % 4], {"temperature": 0.0, "max_new_tokens": n}) for i, n in enumerate((1, 2, 3))]
        + [(PROMPTS[i], p) for i, p in enumerate(sampled)]
        + [(CHAT_2P2, {"temperature": 0.0, "max_new_tokens": 40})]  # finishes on EOS
    )

    async def one(prompt, params):
        return await spec_engine.async_generate(prompt, params)

    async def aborted():
        chunks = 0
        gen = await spec_engine.async_generate(PROMPTS[0], {"temperature": 0.0, "max_new_tokens": 400},
                                               stream=True, rid="dspark-abort-me")
        last = None
        async for chunk in gen:
            last, chunks = chunk, chunks + 1
            if chunks == 3:
                tm.abort_request("dspark-abort-me")
        return last

    async def main():
        return await asyncio.gather(*(one(p, s) for p, s in requests), aborted())

    outs = asyncio.get_event_loop().run_until_complete(main())
    greedy_short, sampled_outs, eos_out, abort_out = outs[:3], outs[3:6], outs[6], outs[7]
    for i, (n, out) in enumerate(zip((1, 2, 3), greedy_short)):
        assert out["output_ids"] == reference["parity"][i % 4][:n]
        assert out["meta_info"]["finish_reason"]["type"] == "length"
    for out in sampled_outs:
        ids, finish = out["output_ids"], out["meta_info"]["finish_reason"]["type"]
        assert all(0 <= t < 49152 for t in ids)
        # Sampling may draw EOS early (it did once at T=1, top-p 0.9, after 3 tokens): then a stop.
        assert (len(ids) == 24 and finish == "length") or (0 < len(ids) < 24 and finish == "stop"), (ids, finish)
    assert eos_out["output_ids"] == reference["eos"]
    assert eos_out["meta_info"]["finish_reason"]["type"] == "stop"
    assert abort_out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(abort_out["output_ids"]) < 400
    # The engine still serves exactly after the abort.
    assert spec_engine.generate(PROMPTS[2], GREEDY)["output_ids"] == reference["parity"][2]


def test_penalties_min_new_tokens_and_logit_bias_stay_exact(spec_engine, reference):
    outs = spec_engine.generate([p for p, _ in ADJUSTED], [s for _, s in ADJUSTED])
    assert [o["output_ids"] for o in outs] == reference["adjusted"]
    # The adjustments changed the outputs (the test is not vacuous): penalties broke the repetitive
    # runs, min_new_tokens held EOS back, the bias removed the "xx" token.
    plain_hello, plain_xx = reference["parity"][1], reference["parity"][3]
    assert reference["adjusted"][0] != plain_hello and reference["adjusted"][2] != plain_hello
    assert reference["adjusted"][1] != plain_xx
    assert len(reference["adjusted"][3]) > len(reference["eos"])
    assert 31069 not in reference["adjusted"][4]
    # Penalized requests decode plainly (one token per round); the biased one still speculates.
    # (the first token comes from the prefill, each decode round commits exactly one more)
    for penalized in outs[:3]:
        meta = penalized["meta_info"]
        assert meta["spec_verify_ct"] == meta["completion_tokens"] - 1
    assert outs[4]["meta_info"]["spec_verify_ct"] > 0


def _as_rows(entry) -> "np.ndarray":
    import numpy as np

    a = np.asarray(entry, dtype=np.float64)
    return a.reshape(-1, a.shape[-1])  # [rows, H]


def test_hidden_states_equal_the_plain_engine(spec_engine, reference):
    import numpy as np

    def close(a, b) -> bool:  # float32 through a verify extend vs a decode forward: summation order only
        return a.shape == b.shape and np.abs(a - b).max() < 1e-3 * max(1.0, np.abs(b).max())

    for mode in (True, "last"):
        ours = spec_engine.generate(HIDDEN_PROMPTS, HIDDEN_PARAMS, return_hidden_states=mode)
        for got, want in zip(ours, reference["hidden"][mode]):
            assert got["output_ids"] == want["output_ids"]
            hs_got, hs_want = got["meta_info"]["hidden_states"], want["meta_info"]["hidden_states"]
            if mode == "last":  # the last committed token's row
                assert close(_as_rows(hs_got), _as_rows(hs_want)) and _as_rows(hs_got).shape == (1, 576)
                continue
            # The prefill's entry first (the positions that prefill computed: a prefix-cache hit in
            # either engine leaves fewer, so compare the rows both have), then one row per decoded token.
            assert len(hs_got) == len(hs_want) == HIDDEN_PARAMS["max_new_tokens"], mode
            pre_got, pre_want = _as_rows(hs_got[0]), _as_rows(hs_want[0])
            n = min(len(pre_got), len(pre_want))
            assert n >= 1 and close(pre_got[-n:], pre_want[-n:])
            decoded_got, decoded_want = _as_rows(hs_got[1:]), _as_rows(hs_want[1:])
            assert decoded_got.shape == (HIDDEN_PARAMS["max_new_tokens"] - 1, 576)
            assert close(decoded_got, decoded_want), np.abs(decoded_got - decoded_want).max()
    # The repetitive request committed several tokens per round, so decode rounds' rows were checked.
    assert ours[0]["meta_info"]["spec_accept_length"] > 1.5


def test_per_request_verify_caps_in_a_mixed_batch(spec_engine, reference):
    def capped(k):
        return {**GREEDY, "custom_params": {"dspark": {"max_verify_len": k}}}

    # The repetitive prompts accept whole blocks when free to speculate.
    prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[1], PROMPTS[0]]
    outs = spec_engine.generate(prompts, [capped(0), capped(1), GREEDY, GREEDY])
    assert [o["output_ids"] for o in outs] == [reference["parity"][i] for i in (1, 3, 1, 0)]
    opted_out, capped_1, free = (o["meta_info"] for o in outs[:3])
    # max_verify_len 0: plain decoding, one token per decode round, windows of the anchor alone.
    assert opted_out["spec_verify_ct"] == opted_out["completion_tokens"] - 1
    assert opted_out["spec_cap_length"] == 1.0
    # max_verify_len 1: at most one draft verified per round (2 tokens committed), accepted at times.
    rounds = capped_1["spec_verify_ct"]
    assert capped_1["spec_cap_length"] <= 2.0
    assert 1 + rounds < capped_1["completion_tokens"] <= 1 + 2 * rounds
    assert free["spec_accept_length"] > 2.0  # the same prompt, uncapped, in the same batch

    with pytest.raises(ValueError, match=r"custom_params\.dspark\.max_verify_len"):
        spec_engine.generate(PROMPTS[0], capped(-1))
    with pytest.raises(ValueError, match=r"unknown field"):
        spec_engine.generate(PROMPTS[0], {**GREEDY, "custom_params": {"dspark": {"verify": 1}}})
    # The engine still serves exactly afterwards.
    assert spec_engine.generate(PROMPTS[2], GREEDY)["output_ids"] == reference["parity"][2]
