"""End-to-end tests run a real SGLang engine on CPU. SGLang decides its platform when its modules are
imported and spawns scheduler processes that inherit the environment, so CPU mode (the sgl_kernel
fallback on PYTHONPATH, SGLANG_USE_CPU_ENGINE=1, offline hub) is switched on here, before any test
module imports sglang."""

import pytest

from dspark_sglang.cpu_mode import enable_cpu_mode

enable_cpu_mode()


PROMPT_SETS = ("gsm8k", "humaneval", "mtbench", "gsm8k")


@pytest.fixture(scope="module")
def zoo_setup():
    """(the bundled target's folder, 4 chat-formatted real prompts: GSM8K, HumanEval, MT-Bench, GSM8K)."""
    from transformers import AutoTokenizer

    from dspark_sglang.models import ensure_target
    from dspark_sglang.prompts import load_prompts

    target = ensure_target()
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [load_prompts(name, limit=2)[i // 3] for i, name in enumerate(PROMPT_SETS)]
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    return target, texts
