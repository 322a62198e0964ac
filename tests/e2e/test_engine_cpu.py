"""SGLang's in-process engine on CPU serves the real SmolLM2-135M target exactly as transformers does.

Greedy, float32 on both sides (bfloat16 rounds differently in SGLang's kernels and transformers'),
three real prompts (GSM8K, HumanEval, MT-Bench) x 32 tokens, compared token by token. Also reports
the engine's start time and decode throughput (run with -s to see them).
"""

import time

import pytest
import torch

from dspark_sglang.cpu_mode import cpu_engine_kwargs
from dspark_sglang.models import ensure_target, load_target_hf
from dspark_sglang.prompts import load_prompts

pytestmark = pytest.mark.e2e

MAX_NEW = 32


@pytest.fixture(scope="module")
def target():
    return ensure_target()


@pytest.fixture(scope="module")
def hf_reference(target):
    """Prompt ids (chat template applied) and transformers' greedy continuation of each."""
    model, tokenizer = load_target_hf(target, torch.float32)
    prompts = [load_prompts(name, limit=1)[0] for name in ("gsm8k", "humaneval", "mtbench")]
    prompt_ids, outputs = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids.append(ids)
        outputs.append(_greedy(model, ids, MAX_NEW))
    return prompt_ids, outputs


@torch.inference_mode()
def _greedy(model, ids, steps):
    """Plain greedy decoding with a KV cache, no stopping rules (EOS included)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.fixture(scope="module")
def engine(target, hf_reference):  # the reference first: one model in memory at a time is enough
    import sglang

    start = time.perf_counter()
    engine = sglang.Engine(model_path=str(target), **cpu_engine_kwargs(dtype="float32"))
    engine.start_seconds = time.perf_counter() - start
    yield engine
    engine.shutdown()


def test_greedy_equals_transformers(engine, hf_reference, record_property):
    prompt_ids, expected = hf_reference
    params = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    engine.generate(input_ids=prompt_ids[0], sampling_params={**params, "max_new_tokens": 2})  # warm-up

    start = time.perf_counter()
    batched = engine.generate(input_ids=prompt_ids, sampling_params=params)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    single = engine.generate(input_ids=prompt_ids[1], sampling_params=params)
    single_s = time.perf_counter() - start

    for out, want in zip(batched, expected):
        assert out["output_ids"] == want
    assert single["output_ids"] == expected[1]
    stats = {"engine_start_s": round(engine.start_seconds, 1),
             "batch3_tok_per_s": round(3 * MAX_NEW / batch_s, 1),
             "batch1_tok_per_s": round(MAX_NEW / single_s, 1)}
    for key, value in stats.items():
        record_property(key, value)
    print(f"\nSGLang CPU engine, SmolLM2-135M float32: {stats}")
