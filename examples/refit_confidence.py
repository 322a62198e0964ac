#!/usr/bin/env python
"""Refit a trained DSpark drafter's confidence head on fresh text (its drafted tokens do not change).

    python examples/refit_confidence.py --drafter dspark_sglang/zoo/smollm2-135m-dspark

A drafter trained for many epochs on a small corpus agrees with the target far more often on its
training text than on new text, and a confidence head trained jointly learns the former: it is
over-confident at serve time by an offset that STS (a per-position temperature) cannot remove.
This script:
  1. picks --num-prompts ShareGPT prompts the drafter never saw (the training selection of
     --train-prompts prompts at --train-seed is recomputed and excluded; evaluation sets never enter);
  2. has the target answer them (self-distillation, like training; cached under --cache-dir);
  3. runs the frozen drafter teacher-forced over them and refits only the confidence head
     (weighted BCE on 1 - TV, DeepSpec's target and slot weights) on --fit-fraction of the sequences;
  4. reports the head before and after on the rest (held out), writes the head into the checkpoint
     (only its two tensors change) and a "Confidence head refit" section into TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dspark_sglang.drafters.loader import load_drafter  # noqa: E402
from examples.training import data as data_mod  # noqa: E402
from examples.training.confidence_refit import (  # noqa: E402
    collect_rows, fit_head, head_report, require_confidence_head, write_confidence_head)
from examples.training.export import target_spec  # noqa: E402
from examples.training.features import build_features  # noqa: E402
from examples.training.target import load_target, target_path  # noqa: E402

SECTION = "## Confidence head refit"
REPORT = "confidence_refit.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", type=Path, required=True, help="DSpark checkpoint directory (refitted in place unless --out)")
    p.add_argument("--out", type=Path, default=None, help="write a refitted copy here instead of changing --drafter")
    p.add_argument("--num-prompts", type=int, default=96, help="fresh ShareGPT prompts answered by the target")
    p.add_argument("--fit-fraction", type=float, default=0.75, help="share of those sequences the head is fitted on; the rest is held out")
    p.add_argument("--seed", type=int, default=1, help="seed of the fresh prompt selection and the fit/held-out split")
    p.add_argument("--train-prompts", type=int, default=400,
                   help="size of the drafter's training prompt pool (train_drafter --num-generated + --num-answers), excluded")
    p.add_argument("--train-seed", type=int, default=0, help="train_drafter's --seed (recomputes the excluded pool)")
    p.add_argument("--target-path", type=str, default=None)
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark-sglang")) / "train")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--greedy-fraction", type=float, default=0.5)
    p.add_argument("--gen-temperature", type=float, default=0.7)
    p.add_argument("--gen-top-p", type=float, default=0.9)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--topk", type=int, default=64, help="target log-probs kept per position (the 1 - TV target)")
    p.add_argument("--loss-decay", type=float, default=4.0, help="slot weight exp(-k/decay), as in training")
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS function evaluations")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = p.parse_args(argv)
    if not 0 < args.fit_fraction < 1:
        p.error("--fit-fraction must be in (0, 1): some sequences must stay held out")
    if args.num_prompts < 4:
        p.error("--num-prompts must be >= 4")
    if not (args.drafter / "config.json").is_file():
        p.error(f"--drafter {args.drafter}: no config.json there")
    if args.out is not None and args.out.exists():
        p.error(f"--out {args.out} exists; choose a new directory")
    if (args.drafter / REPORT).exists():
        # the fit starts from the stored head, and the report's "before" means the trained head
        p.error(f"--drafter {args.drafter}: its confidence head was already refitted ({REPORT}); "
                "refit the checkpoint train_drafter.py wrote")
    return args


def fresh_prompts(tokenizer, args) -> list[tuple]:
    """`--num-prompts` prompts from the same ShareGPT source as training, none in the training pool."""
    trained = {p[0] for p in data_mod.select_prompts(tokenizer, args.train_prompts, args.train_seed, args.max_prompt_tokens)}
    pool = data_mod.select_prompts(tokenizer, args.train_prompts + args.num_prompts, args.seed + 7919, args.max_prompt_tokens)
    fresh = [p for p in pool if p[0] not in trained][: args.num_prompts]
    if len(fresh) < args.num_prompts:
        raise SystemExit(f"only {len(fresh)} ShareGPT prompts outside the training pool; lower --num-prompts")
    return fresh


def fresh_samples(model, tokenizer, args, target_name: str) -> tuple[list, dict]:
    """The target's answers to the fresh prompts, generated once and cached with a manifest."""
    payload = dict(target=target_name, purpose="confidence-refit", num_prompts=args.num_prompts, seed=args.seed,
                   train_prompts=args.train_prompts, train_seed=args.train_seed, max_prompt_tokens=args.max_prompt_tokens,
                   max_new_tokens=args.max_new_tokens, greedy_fraction=args.greedy_fraction,
                   temperature=args.gen_temperature, top_p=args.gen_top_p, version=1)
    root = args.cache_dir / "refit" / data_mod.cache_key(payload)
    root.mkdir(parents=True, exist_ok=True)
    prompts_file = root / "prompts.json"
    if prompts_file.exists():
        prompts = [tuple(p) for p in json.loads(prompts_file.read_text())]
    else:
        prompts = fresh_prompts(tokenizer, args)
        prompts_file.write_text(json.dumps(prompts))
    rows, manifest = data_mod.generate_once(model, tokenizer, [p[:3] for p in prompts], root, payload,
                                            max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch,
                                            greedy_fraction=args.greedy_fraction, temperature=args.gen_temperature,
                                            top_p=args.gen_top_p, seed=args.seed)
    samples = [data_mod.Sample(r["prompt_id"], r["domain"], r["prompt_ids"], r["response_ids"], r["mode"])
               for r in rows if len(r["response_ids"]) >= 2]
    return samples, manifest


def update_training_md(checkpoint: Path, text: str) -> None:
    """Replace (or append) the refit section of TRAINING.md, leaving the training record above it."""
    file = checkpoint / "TRAINING.md"
    old = file.read_text() if file.exists() else f"# {checkpoint.name}\n"
    kept = re.split(rf"\n{re.escape(SECTION)}\n", old, maxsplit=1)[0].rstrip("\n")
    file.write_text(kept + "\n\n" + text)


def describe(args, gen: dict, n_fit: int, n_held: int, before: dict, after: dict, fit: dict) -> str:
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    def table(title, rep_b, rep_a):
        head = f"| {title} slot k | " + " | ".join(str(s["slot"]) for s in rep_a["per_slot"]) + " |"
        rows = ["|---|" + "---|" * len(rep_a["per_slot"]),
                "| mean 1 - TV (target) | " + " | ".join(f"{s['accept']:.3f}" for s in rep_a["per_slot"]) + " |",
                "| mean confidence, trained head | " + " | ".join(f"{s['confidence']:.3f}" for s in rep_b["per_slot"]) + " |",
                "| mean confidence, refitted head | " + " | ".join(f"{s['confidence']:.3f}" for s in rep_a["per_slot"]) + " |"]
        return [head, *rows]
    lines = [
        SECTION, "",
        "The head trained with the backbone learned the training text's acceptance; it was refitted on fresh",
        "text with everything else frozen (drafted tokens are unchanged; only `confidence_head.proj.*` changed;",
        "the confidence figure in the held-out metrics above is the trained head's):", "",
        "```", f"OMP_NUM_THREADS={args.threads} HF_HUB_OFFLINE=1 python examples/refit_confidence.py {argv}", "```", "",
        f"- Data: {gen['num_samples']} ShareGPT prompts outside the training pool, answered by the target "
        f"({gen['response_tokens']} response tokens, {gen['seconds'] / 60:.1f} min); fitted on {n_fit} sequences "
        f"({after['fit']['rows']} slots), reported on {n_held} held out ({after['held_out']['rows']} slots).",
        f"- Fit: weighted BCE on 1 - TV, slot weights exp(-k/{args.loss_decay}), L-BFGS ({fit['evaluations']} evaluations), "
        "from the trained head, float32; stored in bf16.",
        f"- Held out: BCE {before['held_out']['bce']} -> {after['held_out']['bce']}, mean |sigmoid(c) - (1 - TV)| "
        f"{before['held_out']['abs_err']} -> {after['held_out']['abs_err']} (the saved bf16 head, reloaded).", "",
        *table("held-out", before["held_out"], after["held_out"]), "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    target, tokenizer = load_target(target_path(args.target_path), torch.float32)
    spec = target_spec(target)
    drafter = load_drafter(args.drafter, spec, torch.float32, "cpu")
    try:
        require_confidence_head(drafter)  # fail before generating anything
    except ValueError as exc:
        raise SystemExit(f"--drafter {args.drafter}: {exc}") from None
    layer_ids = tuple(drafter.config.target_layer_ids)
    target_name = "SmolLM2-135M-Instruct" if "smollm2" in str(target.config._name_or_path).lower() else "target"

    samples, gen = fresh_samples(target, tokenizer, args, target_name)
    fs, _ = build_features(target, [samples], args.cache_dir, layer_ids, args.topk, args.max_len)
    del target
    order = list(range(fs.num_seqs))
    random.Random(args.seed).shuffle(order)
    n_fit = int(round(args.fit_fraction * len(order)))
    fit_ids, held_ids = order[:n_fit], order[n_fit:]

    fit_rows, held_rows = collect_rows(drafter, fs, fit_ids), collect_rows(drafter, fs, held_ids)
    head = drafter.confidence_head
    before = dict(fit=head_report(head, fit_rows, args.loss_decay), held_out=head_report(head, held_rows, args.loss_decay))
    print("[before]", json.dumps(before), flush=True)
    fit = fit_head(head, fit_rows, args.loss_decay, args.max_iter)
    print("[fit]", json.dumps(fit), flush=True)

    out = args.out or args.drafter
    if args.out:
        shutil.copytree(args.drafter, args.out)
    write_confidence_head(out, head)
    saved = load_drafter(out, spec, torch.float32, "cpu").confidence_head  # what was written (bf16)
    after = dict(fit=head_report(saved, fit_rows, args.loss_decay), held_out=head_report(saved, held_rows, args.loss_decay))
    print("[after, saved head]", json.dumps(after), flush=True)
    update_training_md(out, describe(args, gen, len(fit_ids), len(held_ids), before, after, fit))
    (out / REPORT).write_text(json.dumps(dict(before=before, after=after, fit=fit, generation=gen), indent=2))
    print(f"[done] {out}: confidence head refitted in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
