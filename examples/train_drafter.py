#!/usr/bin/env python
"""Train a DSpark, DFlash or Eagle3 drafter for a real target on CPU, in DeepSpec's checkpoint format.

    python examples/train_drafter.py --family dspark --out dspark_sglang/zoo/smollm2-135m-dspark

Pipeline (each stage cached under --cache-dir, outside the repository, so reruns skip it):
  1. prompts: ShareGPT first human turns (training-only; never the evaluation sets), stratified
     into code / math / chat;
  2. self-distillation text: the target's own responses (batched generate, float32 like the serving
     target, part greedy and part sampled), plus a cheap part that keeps ShareGPT's own answers;
  3. target features: teacher-forced float32 target forwards -> outputs of decoder layers
     `--layer-ids` + the target's top-K next-token log-probs;
  4. training: the product's drafter modules (dspark_sglang.drafters) trained with DeepSpec's loss
     (0.1 CE + 0.9 L1 + 1.0 confidence BCE, slot weights exp(-k/4); Eagle3: CE + L1 per TTT step,
     weights 0.8^k) on random anchors of the response tokens;
  5. export: config.json + model.safetensors (bf16, DeepSpec names, without the embed_tokens /
     lm_head copies, which the loader borrows from the target), reloaded through `load_drafter`
     and evaluated on held-out sequences (teacher-forced acceptance 1 - TV per slot, greedy top-1
     agreement), then TRAINING.md.
DSpark, afterwards: examples/refit_confidence.py refits the confidence head on fresh text (a head
trained for many epochs on a small corpus is over-confident on new text; the tokens do not change).

Deterministic for a given --seed and thread count (BLAS reductions depend on the thread count).
Respects OMP_NUM_THREADS (default 1 thread: the development machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dspark_sglang.drafters.config import zlab_default_layer_ids  # noqa: E402
from dspark_sglang.drafters.loader import describe_drafter, load_drafter  # noqa: E402
from examples.training import data as data_mod  # noqa: E402
from examples.training.batches import anchor_candidates, collate, supervised_blocks  # noqa: E402
from examples.training.export import build_modules, drafter_config, save_checkpoint, target_spec  # noqa: E402
from examples.training.features import FeatureSet, build_features, build_part  # noqa: E402
from examples.training.forward import block_scores, eagle3_logits, eagle3_ttt_train  # noqa: E402
from examples.training.losses import dspark_loss, eagle3_loss  # noqa: E402
from examples.training.sampled_vocab import sample_vocabulary, sampled_block_scores  # noqa: E402
from examples.training import train_state  # noqa: E402
from examples.training.target import load_target, target_path  # noqa: E402

MASK_TOKEN_CANDIDATES = ("<empty_output>", "<jupyter_script>", "<jupyter_output>", "<gh_stars>")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--family", choices=("dspark", "dflash", "eagle3"), required=True)
    g.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--layers", type=int, default=1, help="draft decoder layers (Eagle3: must be 1)")
    g.add_argument("--intermediate-size", type=int, default=1536, help="draft MLP width")
    g.add_argument("--layer-ids", type=str, default=None,
                   help="target layers read, comma-separated decoder-layer ids (default: z-lab/DeepSpec's "
                        "build_target_layer_ids(L, 5) = 1..L-3 evenly spaced: [1,8,14,20,27] for L=30)")
    g.add_argument("--block-size", type=int, default=7, help="DSpark/DFlash block size = gamma (the anchor slot drafts too)")
    g.add_argument("--ttt-length", type=int, default=7, help="Eagle3 training-time-test steps (= drafts per round)")
    g.add_argument("--markov-rank", type=int, default=32, help="DSpark Markov head rank")
    g.add_argument("--markov-head", choices=("vanilla", "gated", "rnn"), default="vanilla")
    g.add_argument("--mask-token-id", type=int, default=None,
                   help=f"block mask token (default: the first of {MASK_TOKEN_CANDIDATES} in the vocabulary)")

    g = p.add_argument_group("data")
    g.add_argument("--target-path", type=str, default=None, help="target HF dir (default: dspark_sglang.models.ensure_target())")
    g.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark-sglang")) / "train")
    g.add_argument("--num-generated", type=int, default=160, help="ShareGPT prompts answered by the target (self-distillation)")
    g.add_argument("--num-answers", type=int, default=240,
                   help="further ShareGPT prompts kept with ShareGPT's own first answer (no generation cost)")
    g.add_argument("--max-prompt-tokens", type=int, default=256)
    g.add_argument("--max-new-tokens", type=int, default=192)
    g.add_argument("--gen-batch", type=int, default=16, help="prompts per generate() batch")
    g.add_argument("--greedy-fraction", type=float, default=0.5, help="share of prompts answered greedily (rest: sampled)")
    g.add_argument("--gen-temperature", type=float, default=0.7)
    g.add_argument("--gen-top-p", type=float, default=0.9)
    g.add_argument("--max-len", type=int, default=None,
                   help="training sequence length cap, prompt + response (default: 512; 2048 with --corpus)")
    g.add_argument("--topk", type=int, default=64, help="target log-probs kept per position for the L1/TV loss")
    g.add_argument("--eval-seqs", type=int, default=24, help="held-out self-distilled sequences for the final metrics")
    g.add_argument("--prepare-only", action="store_true", help="stop after building the cached data (stages 1-3)")
    g.add_argument("--corpus", type=Path, default=None,
                   help="train on a self-distillation corpus (examples/training/corpus.py) with its cached features "
                        "(examples/training/corpus_features.py) instead of stages 1-3")
    g.add_argument("--corpus-shards", type=str, default=None, metavar="A:B",
                   help="--corpus: train on shards A..B-1 only (default: every shard but the held-out ones)")
    g.add_argument("--holdout-shards", type=str, default=None, metavar="A:B",
                   help="--corpus: held-out shards for the metrics (default: the last shard)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2400)
    g.add_argument("--batch-seqs", type=int, default=2, help="sequences per step")
    g.add_argument("--anchors", type=int, default=16, help="random anchors per sequence (Eagle3: supervised rows per step)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor, as a fraction of --lr")
    g.add_argument("--warmup", type=float, default=0.04, help="warmup fraction of --steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--loss-decay", type=float, default=4.0, help="slot weight exp(-k/decay) (DeepSpec loss_decay_gamma)")
    g.add_argument("--step-decay", type=float, default=0.8, help="Eagle3 TTT step weight decay^k")
    g.add_argument("--kl-alpha", type=float, default=0.0,
                   help="weight of an added KL(target || draft) term (top-K + tail bucket); 0 = DeepSpec's loss exactly. "
                        "L1/TV alone barely moves a draft that misses the target's tokens, so short runs need it")
    g.add_argument("--vocab-sample", type=int, default=0, metavar="N",
                   help="DSpark/DFlash: train the LM head over each step's needed tokens (target top-K, labels) "
                   "plus N uniformly sampled others, importance-weighted (sampled softmax; the head is most of a "
                   "CPU step); 0 (default) = the full vocabulary. Evaluation always uses the full vocabulary")
    g.add_argument("--lm-head-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="precision of the frozen LM head matmul during training: auto (default) = bfloat16 on a GPU "
                        "or a CPU with AVX512-BF16/AMX-BF16 (~2.4x faster there), float32 elsewhere (bf16 is ~20x "
                        "slower without those units); the loss math is float32, and the final evaluation uses float32")
    g.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--eval-every", type=int, default=0,
                   help="held-out metrics every N steps (the learning curve, in <out>/learning_curve.json); 0: at the end only")
    g.add_argument("--save-every", type=int, default=0,
                   help="write the resumable training state (<out>/train_state) and an exported checkpoint every N steps")
    g.add_argument("--resume", action="store_true", help="continue from <out>/train_state (same arguments)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training time, save the state and exit (resume later with --resume)")
    g.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop at this step, save the state and exit (resume later with --resume)")
    g.add_argument("--init-from", type=Path, default=None,
                   help="start from an exported drafter checkpoint of the same architecture (warm start, fresh optimizer)")
    args = p.parse_args(argv)
    if args.vocab_sample < 0:
        p.error("--vocab-sample must be >= 0")
    if args.vocab_sample and args.family == "eagle3":
        p.error("--vocab-sample is implemented for the block drafters (dspark, dflash), not eagle3")
    if args.max_len is None:
        args.max_len = 2048 if args.corpus is not None else 512
    if args.lm_head_dtype == "auto":
        args.lm_head_dtype = "bfloat16" if fast_bf16_matmul() else "float32"
    return args


def fast_bf16_matmul(cpu_flags: str | None = None) -> bool:
    """A CUDA device, or a CPU whose flags (Linux /proc/cpuinfo) include avx512_bf16 or amx_bf16."""
    if cpu_flags is None:
        if torch.cuda.is_available():
            return True
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False  # not Linux: float32 is the safe default
    return any(flag in cpu_flags.split() for flag in ("avx512_bf16", "amx_bf16"))


# ---- helpers ---------------------------------------------------------------------------------------


def pick_mask_token(tokenizer, samples) -> int:
    used = {t for s in samples for t in s.prompt_ids + s.response_ids}
    vocab = tokenizer.get_vocab()
    for name in MASK_TOKEN_CANDIDATES:
        if name in vocab and vocab[name] not in used:
            return vocab[name]
    raise SystemExit(f"none of {MASK_TOKEN_CANDIDATES} is an unused vocabulary entry; pass --mask-token-id")


def lr_at(step: int, args) -> float:
    warm = max(1, int(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, args.steps - warm)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def block_step(drafter, b: dict, lm_w, args, fused: bool = False, vocab_gen: torch.Generator | None = None):
    """Loss of one batch; `vocab_gen` (training steps with --vocab-sample): a sampled vocabulary."""
    hidden, labels, prev, valid, tk_ids, tk_lp = supervised_blocks(drafter, b)
    if vocab_gen is not None and args.vocab_sample:
        needed = torch.cat([tk_ids[valid].reshape(-1), labels[valid]])
        cols, log_w, lookup = sample_vocabulary(needed, drafter.config.dims.vocab_size, args.vocab_sample, vocab_gen)
        logits, conf = sampled_block_scores(drafter, hidden, prev, cols, log_w)
        # unsupervised rows may name dropped tokens: -1 -> 0, their loss weight is 0
        labels, tk_ids = lookup[labels].clamp_min(0), lookup[tk_ids].clamp_min(0)
    else:
        logits, conf = block_scores(drafter, hidden, prev, lm_w)
    return dspark_loss(logits, conf, labels, valid, tk_ids, tk_lp, decay=args.loss_decay,
                       fused=fused, kl_alpha=args.kl_alpha), valid


def eagle3_rows(b: dict, steps: int):
    """Per step k, the supervised (row t, step k) pairs: anchor a = t + 1 is a sampled anchor and the
    label position t + k + 2 < length. Returns row indices and label positions."""
    rows = b["anchors"] - 1  # [S, A] row t = anchor - 1
    out = []
    for k in range(steps):
        label_pos = rows + k + 2
        valid = (label_pos < b["lengths"][:, None]) & b["keep"]
        out.append((rows, label_pos, valid))
    return out


def eagle3_step(drafter, b: dict, lm_w, args, fused: bool = False, vocab_gen: torch.Generator | None = None):
    steps = args.ttt_length
    S, T = b["tokens"].shape
    xs = eagle3_ttt_train(drafter, b["feats"], b["tokens"], steps, rows=(b["anchors"] - 1).clamp(0, T - 2))  # steps x [S, A, H]
    K = b["tk_ids"].shape[-1]
    per_step = eagle3_rows(b, steps)
    xv = [xs[k].reshape(-1, xs[k].shape[-1])[valid.reshape(-1)] for k, (_, _, valid) in enumerate(per_step)]
    # one LM-head call for all steps (a large GEMM is much faster than seven small ones on CPU)
    logits = list(eagle3_logits(drafter, torch.cat(xv), lm_w).split([x.shape[0] for x in xv]))
    labels, valids, tk_ids, tk_lp = [], [], [], []
    for k, (rows, label_pos, valid) in enumerate(per_step):
        v = valid.reshape(-1)
        lp = label_pos.clamp(max=T - 1)
        labels.append(b["tokens"].gather(1, lp).reshape(-1)[v])
        tpos = (label_pos - 1).clamp(max=T - 1)  # the target row describing the label's token
        tk_ids.append(b["tk_ids"].gather(1, tpos[:, :, None].expand(-1, -1, K)).reshape(-1, K)[v])
        tk_lp.append(b["tk_lp"].gather(1, tpos[:, :, None].expand(-1, -1, K)).reshape(-1, K)[v])
        valids.append(torch.ones(int(v.sum()), dtype=torch.bool))
    return eagle3_loss(logits, labels, valids, tk_ids, tk_lp, step_decay=args.step_decay, fused=fused,
                       kl_alpha=args.kl_alpha), valid


# ---- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(family: str, drafter, fs: FeatureSet, seq_ids: list[int], args, max_anchors: int = 96) -> dict:
    """Teacher-forced metrics on held-out sequences, float32 LM head:
    accept@k = mean over blocks of 1 - TV(p_draft, p_target) at slot k (the T=1 acceptance rate of
    slot k given an accepted prefix, teacher-forced), agree@k = greedy top-1 agreement at slot k,
    tau_prob = 1 + sum_k prod_{i<=k} accept@i per block (DeepSpec's tau_probabilistic)."""
    rng = random.Random(1234)
    G = args.ttt_length if family == "eagle3" else args.block_size
    acc_sum, agr_sum, cnt = torch.zeros(G), torch.zeros(G), torch.zeros(G)
    tau_sum, blocks = 0.0, 0
    conf_err_sum, conf_cnt = 0.0, 0
    for s in seq_ids:
        b = collate(fs, [s], rng, max_anchors)
        if family == "eagle3":
            (_, stats, per_step), _ = eagle3_step(drafter, b, None, args)
            # rows are shared across steps; a row's step k is valid iff its label is in range
            rows_valid = [v for (_, _, v) in eagle3_rows(b, G)]
            A = b["anchors"].shape[1]
            acc = torch.zeros(A, G)
            vmask = torch.zeros(A, G, dtype=torch.bool)
            agr = torch.zeros(A, G)
            for k, t in enumerate(per_step):
                v = rows_valid[k].reshape(-1)
                acc[v, k], agr[v, k], vmask[v, k] = t["accept"], t["agree"], True
        else:
            (_, stats, t), valid = block_step(drafter, b, None, args)
            acc, agr, vmask = t["accept"], t["agree"], valid
            if "conf_err" in stats:
                n = int(vmask.sum())
                conf_err_sum += stats["conf_err"] * n
                conf_cnt += n
        acc_sum += (acc * vmask).sum(0)
        agr_sum += (agr * vmask).sum(0)
        cnt += vmask.sum(0)
        full = vmask.all(-1)
        tau_sum += float((1 + (acc[full]).cumprod(-1).sum(-1)).sum())
        blocks += int(full.sum())
    accept = (acc_sum / cnt.clamp_min(1)).tolist()
    agree = (agr_sum / cnt.clamp_min(1)).tolist()
    out = dict(accept_at=[round(a, 4) for a in accept], agree_at=[round(a, 4) for a in agree],
               tau_prob=round(tau_sum / max(blocks, 1), 4), blocks=blocks)
    if conf_cnt:
        out["conf_abs_err"] = round(conf_err_sum / conf_cnt, 4)
    return out


def legacy_data(args, target, tokenizer, target_name: str, layer_ids):
    """Stages 1-3 of the small built-in pipeline: (train fs, eval fs, train ids, eval ids, info, mask id);
    fs is None after --prepare-only."""
    sample_kw = dict(num_generated=args.num_generated, num_answers=args.num_answers, seed=args.seed,
                     max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch,
                     greedy_fraction=args.greedy_fraction, temperature=args.gen_temperature, top_p=args.gen_top_p,
                     target_name=target_name)
    # the cheap part first (ShareGPT answers: features only), then the self-distilled part
    _, answers, _ = data_mod.build_samples(None, tokenizer, args.cache_dir, generate=False, **sample_kw)
    build_part(target, answers, args.cache_dir, tuple(layer_ids), args.topk, args.max_len)
    generated, answers, gen_root = data_mod.build_samples(target, tokenizer, args.cache_dir, **sample_kw)
    gen_manifest = json.loads((gen_root / "manifest.json").read_text())

    # 3. target features (float32 target; cached per part). Held-out sequences: self-distilled only
    # (the serving distribution), taken first; the rest of both parts trains.
    fs, feat_manifests = build_features(target, [generated, answers], args.cache_dir, tuple(layer_ids), args.topk, args.max_len)
    mask_id = args.mask_token_id if args.mask_token_id is not None else pick_mask_token(tokenizer, generated + answers)
    if args.prepare_only:
        print(f"[data] {gen_root}: {len(generated)} self-distilled + {len(answers)} ShareGPT-answer sequences, "
              f"{fs.num_tokens} tokens")
        return None, None, None, None, None, None
    gen_ids = list(range(len(generated)))
    random.Random(args.seed).shuffle(gen_ids)
    eval_ids = gen_ids[: args.eval_seqs]
    train_ids = [s for s in gen_ids[args.eval_seqs:] + list(range(len(generated), fs.num_seqs)) if anchor_candidates(fs.seq(s))]
    info = dict(kind="legacy", gen=gen_manifest, feats=feat_manifests, num_answers=len(answers))
    return fs, fs, train_ids, eval_ids, info, mask_id


def _shard_range(text: str | None, default: tuple[int, int]) -> list[int]:
    if text is None:
        return list(range(*default))
    a, _, b = text.partition(":")
    return list(range(int(a), int(b)))


def corpus_data(args, layer_ids):
    """(train fs, held-out fs, train ids, held-out ids, info) from a corpus and its cached features."""
    from examples.training import corpus as corpus_mod
    from examples.training.corpus_features import ShardedFeatureSet, cache_folder, feature_files

    manifest = corpus_mod.verify(args.corpus, quiet=True)
    shards = corpus_mod.manifest_shards(args.corpus)
    held = _shard_range(args.holdout_shards, (shards[-1], shards[-1] + 1))
    train = [k for k in _shard_range(args.corpus_shards, (shards[0], shards[-1] + 1)) if k not in held and k in shards]
    folder = cache_folder(args.cache_dir, layer_ids, args.topk, args.max_len, "bfloat16")
    fs = ShardedFeatureSet(feature_files(folder, args.corpus, train))
    eval_fs = ShardedFeatureSet(feature_files(folder, args.corpus, held))
    train_ids = [s for s in range(fs.num_seqs) if anchor_candidates(fs.seq(s))]
    order = list(range(eval_fs.num_seqs))
    random.Random(args.seed).shuffle(order)
    eval_ids = [s for s in order if anchor_candidates(eval_fs.seq(s))][: args.eval_seqs]
    info = dict(kind="corpus", corpus=str(args.corpus), train_shards=train, holdout_shards=held,
                train_tokens=fs.num_tokens, train_seqs=len(train_ids), corpus_manifest={
                    k: manifest[k] for k in ("num_samples", "response_tokens", "prompt_tokens", "generation_seconds",
                                             "response_tokens_per_second_per_process", "settings")})
    return fs, eval_fs, train_ids, eval_ids, info


# ---- main ------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.family == "eagle3" and args.layers != 1:
        raise SystemExit("Eagle3 drafters have exactly one decoder layer (--layers 1)")

    path = target_path(args.target_path)
    target, tokenizer = load_target(path, torch.float32)
    tcfg = target.config
    target_name = "SmolLM2-135M-Instruct" if "smollm2" in str(path).lower() else path.name
    layer_ids = [int(x) for x in args.layer_ids.split(",")] if args.layer_ids else list(zlab_default_layer_ids(tcfg.num_hidden_layers, 5))
    if args.corpus is not None:
        fs, eval_fs, train_ids, eval_ids, data_info = corpus_data(args, layer_ids)
        mask_id = args.mask_token_id if args.mask_token_id is not None else pick_mask_token(tokenizer, [])
        if args.prepare_only:
            print(f"[data] corpus {args.corpus}: {fs.num_seqs} training + {eval_fs.num_seqs} held-out sequences")
            return
    else:
        fs, eval_fs, train_ids, eval_ids, data_info, mask_id = legacy_data(args, target, tokenizer, target_name, layer_ids)
        if fs is None:
            return

    # 4. the product's modules, built from the config that will be saved
    config = drafter_config(args.family, tcfg, num_layers=args.layers, intermediate_size=args.intermediate_size,
                            layer_ids=layer_ids, block_size=args.block_size, mask_token_id=mask_id,
                            markov_rank=args.markov_rank, markov_head_type=args.markov_head, ttt_length=args.ttt_length,
                            target_name=target_name)
    spec = target_spec(target)
    drafter = build_modules(args.family, config, spec, args.seed, final_norm=target.model.norm.weight.detach())
    del target
    if args.init_from is not None:
        warm_start(drafter, args.init_from, spec)
    drafter.train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    head = drafter.model.lm_head.weight if args.family == "eagle3" else drafter.lm_head.weight
    lm_w = head.detach().to(torch.bfloat16) if args.lm_head_dtype == "bfloat16" else None
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    step_fn = eagle3_step if args.family == "eagle3" else block_step
    rng = random.Random(args.seed + 1)
    vocab_gen = torch.Generator().manual_seed(args.seed + 2) if args.vocab_sample else None
    print(f"[train] {args.family}: {n_params / 1e6:.2f}M trainable parameters, {len(train_ids)} train / {len(eval_ids)} "
          f"held-out sequences ({fs.num_tokens} tokens), layer ids {layer_ids}, mask token {mask_id}, "
          f"{args.threads} thread(s)", flush=True)

    pool: list[int] = []
    history, ema, curve = [], {}, []
    first_step, seconds_before = 0, 0.0
    state_dir = args.out / "train_state"
    if args.resume:
        if not (state_dir / "state.json").exists():
            raise SystemExit(f"--resume: no saved state in {state_dir}")
        saved = train_state.load(state_dir, drafter, opt, {"vocab": vocab_gen}, rng)
        first_step, pool, history, ema, curve = (saved["step"], saved["pool"], saved["history"], saved["ema"],
                                                 saved["curve"])
        seconds_before = saved["seconds"]
        print(f"[train] resumed at step {first_step} ({seconds_before / 60:.1f} min of training so far)", flush=True)

    def checkpoint(step: int) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(args.out, args.family, config, drafter)
        train_state.save(state_dir, drafter, opt, {"vocab": vocab_gen}, rng, dict(
            step=step, pool=pool, history=history, ema=ema, curve=curve, seconds=seconds_before + time.time() - t_train))

    def held_out(step: int) -> None:
        drafter.eval()
        with torch.no_grad():
            metrics = evaluate(args.family, drafter, eval_fs, eval_ids, args)
        drafter.train()
        curve.append(dict(step=step, seconds=round(seconds_before + time.time() - t_train, 1),
                          sequences_seen=step * args.batch_seqs, anchors_seen=step * args.batch_seqs * args.anchors, **metrics))
        (args.out / "learning_curve.json").write_text(json.dumps(curve, indent=1))
        print("[curve]", json.dumps(curve[-1]), flush=True)

    t_train = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.eval_every and first_step == 0:
        held_out(0)  # where the curve starts: a random or --init-from drafter on the same held-out rows
    bar = tqdm(range(first_step, args.steps), desc=f"training {args.family}", unit="step", initial=first_step, total=args.steps)
    for step in bar:
        if len(pool) < args.batch_seqs:
            fresh = list(train_ids)
            rng.shuffle(fresh)
            pool += fresh
        batch, pool = pool[: args.batch_seqs], pool[args.batch_seqs:]
        b = collate(fs, batch, rng, args.anchors)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        (loss, stats, _), _ = step_fn(drafter, b, lm_w, args, fused=True, vocab_gen=vocab_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        for k, v in stats.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items() if k in ("loss", "ce", "l1", "kl", "conf")})
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            history.append(dict(step=done, lr=lr_at(step, args), grad_norm=round(float(gnorm), 3),
                                **{k: round(v, 4) for k, v in ema.items()}))
            print(json.dumps(history[-1]), flush=True)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            held_out(done)
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            checkpoint(done)
        out_of_time = args.max_minutes is not None and time.time() - t_train > 60 * args.max_minutes
        if done < args.steps and (out_of_time or done == args.stop_after):
            checkpoint(done)
            bar.close()
            print(f"[train] stopped at step {done} of {args.steps}; state in {state_dir} (continue with --resume)", flush=True)
            return
    bar.close()
    train_seconds = seconds_before + time.time() - t_train
    if args.save_every:
        checkpoint(args.steps)

    # 5. export, reload through the product's loader, evaluate what was saved
    n_saved = save_checkpoint(args.out, args.family, config, drafter)
    reloaded = load_drafter(args.out, spec, torch.float32, "cpu", draft_vocab=None)
    desc = describe_drafter(args.out)
    metrics = evaluate(args.family, reloaded, eval_fs, eval_ids, args)
    curve.append(dict(step=args.steps, seconds=round(train_seconds, 1), sequences_seen=args.steps * args.batch_seqs,
                      anchors_seen=args.steps * args.batch_seqs * args.anchors, reloaded_bf16=True, **metrics))
    (args.out / "learning_curve.json").write_text(json.dumps(curve, indent=1))
    print("[eval] held-out, reloaded bf16 checkpoint:", json.dumps(metrics), flush=True)
    size_mb = (args.out / "model.safetensors").stat().st_size / 2**20
    write_training_md(args, config, desc, n_saved, size_mb, data_info, history, metrics,
                      train_seconds, time.time() - t0, len(train_ids), len(eval_ids))
    print(f"[done] {args.out} ({size_mb:.1f} MB, {n_saved / 1e6:.2f}M saved parameters), "
          f"train {train_seconds / 60:.1f} min, total {(time.time() - t0) / 60:.1f} min", flush=True)


def grown_layer_source(name: str, theirs: dict) -> tuple[str, bool] | None:
    """For a decoder layer the source checkpoint lacks (a deeper drafter): the source tensor to start
    it from (the same tensor of the source's last layer) and whether to zero it instead. The new
    layer's output projections (attention o_proj, MLP down_proj) start at zero, so it adds nothing
    to the residual stream at first: the deeper drafter starts as exactly the source's function."""
    match = re.fullmatch(r"(.*layers)\.(\d+)\.(.+)", name)  # e.g. backbone.layers.1.mlp.down_proj.weight
    if match is None:
        return None
    prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
    source_ids = [int(m.group(1)) for m in (re.fullmatch(re.escape(prefix) + r"\.(\d+)\..+", n) for n in theirs) if m]
    if not source_ids or index <= max(source_ids):
        return None
    return f"{prefix}.{max(source_ids)}.{rest}", rest.endswith(("o_proj.weight", "down_proj.weight"))


def warm_start(drafter, path: Path, spec) -> None:
    """Copy every trainable weight from an exported checkpoint of the same architecture; a drafter
    with more decoder layers than the checkpoint starts its extra layers as identities
    (`grown_layer_source`)."""
    source = load_drafter(path, spec, torch.float32, "cpu", draft_vocab=None)
    theirs = dict(source.named_parameters()) if args_family(drafter) != "eagle3" else dict(source.model.named_parameters())
    mine = {n: p for n, p in (drafter.named_parameters() if args_family(drafter) != "eagle3"
                              else drafter.model.named_parameters()) if p.requires_grad}
    plan = {}
    for name, p in mine.items():
        grown = None if name in theirs else grown_layer_source(name, theirs)
        source_name, zero = grown if grown is not None else (name, False)
        if source_name not in theirs or theirs[source_name].shape != p.shape:
            raise SystemExit(f"--init-from {path}: not the same architecture ({name} has no counterpart)")
        plan[name] = (source_name, zero)
    with torch.no_grad():
        for name, (source_name, zero) in plan.items():
            mine[name].copy_(torch.zeros_like(mine[name]) if zero else theirs[source_name])
    grown = sum(1 for n, (s, _) in plan.items() if s != n)
    print(f"[train] warm start from {path} ({len(mine)} tensors"
          + (f"; {grown} of them start new layers as identities" if grown else "") + ")", flush=True)


def args_family(drafter) -> str:
    return drafter.info.family


def _data_lines(args, info: dict, n_train: int, n_eval: int) -> list[str]:
    if info["kind"] == "corpus":
        m = info["corpus_manifest"]
        st = m.get("settings", {})
        return [
            f"- Corpus: `{info['corpus']}` (examples/training/corpus.py): {m['num_samples']} training-only prompts "
            f"(ShareGPT past the serving tools' first prompts, some multi-turn; AlpacaEval; Arena-Hard; no prompt sharing a "
            f"10-word shingle with GSM8K, AIME25, HumanEval or MT-Bench) answered by the target itself in SGLang's CPU "
            f"engine ({st.get('dtype')}, {int(100 * st.get('greedy_fraction', 0))}% greedy, the rest T={st.get('temperature')} "
            f"top-p {st.get('top_p')}, up to {st.get('max_new_tokens')} new tokens): {m['response_tokens']} response + "
            f"{m['prompt_tokens']} prompt tokens, {m['response_tokens_per_second_per_process']} response tokens/s per process.",
            f"- Training shards {info['train_shards'][0]}..{info['train_shards'][-1]} ({len(info['train_shards'])} shards, "
            f"{info['train_tokens']} tokens incl. prompts, {n_train} sequences); held-out shard(s) {info['holdout_shards']} "
            f"({n_eval} sequences for the metrics below).",
            f"- Target features: bfloat16 teacher-forced target forwards (examples/training/corpus_features.py), float32 LM head "
            f"for the top-{args.topk} next-token log-probs; sequences capped at {args.max_len} tokens.",
        ]
    gen, feats, n_answers = info["gen"], info["feats"], info["num_answers"]
    return [
        "- Prompts: ShareGPT V3 first human turns only (code/math/chat-stratified, seeded; a training-only source: "
        "no prompt of GSM8K, AIME25, HumanEval, MT-Bench, Arena-Hard or AlpacaEval).",
        f"- Self-distilled part: {gen['num_samples']} prompts answered by the target itself: "
        f"{int(args.greedy_fraction * 100)}% greedy, the rest sampled at T={args.gen_temperature}, top-p {args.gen_top_p}; "
        f"max {args.max_new_tokens} new tokens, float32 generation; {gen['response_tokens']} response + "
        f"{gen['prompt_tokens']} prompt tokens; generation took {gen['seconds'] / 60:.1f} min.",
        f"- ShareGPT-answer part: {n_answers} further prompts with ShareGPT's own first answer (no generation; "
        "the loss still matches the target's distributions on that text).",
        f"- Target features: float32 teacher-forced target forwards, fp16 storage, top-{args.topk} next-token "
        f"log-probs; {sum(f['num_tokens'] for f in feats)} tokens, {sum(f['seconds'] for f in feats) / 60:.1f} min. "
        f"Sequences capped at {args.max_len} tokens.",
        f"- {n_train} training sequences; {n_eval} held-out self-distilled sequences (seeded split).",
    ]


def write_training_md(args, config, desc, n_saved, size_mb, data_info, history, metrics, train_s, total_s, n_train, n_eval):
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    last = history[-1] if history else {}
    fam = {"dspark": "DSpark (DeepSpec `Qwen3DSparkModel`, Markov head + confidence head)",
           "dflash": "DFlash (DeepSpec `Qwen3DSparkModel` with markov_rank 0 and no confidence head)",
           "eagle3": "Eagle3 (DeepSpec `Qwen3Eagle3Model`, full vocabulary)"}[args.family]
    slots = "TTT step" if args.family == "eagle3" else "slot"
    lines = [
        f"# {args.out.name}",
        "",
        f"{fam}, trained for SmolLM2-135M-Instruct by `examples/train_drafter.py`.",
        "",
        "## Reproduce",
        "",
        "```",
        f"OMP_NUM_THREADS={args.threads} HF_HUB_OFFLINE=1 python examples/train_drafter.py {argv}",
        "```",
        "",
        f"Seed {args.seed}, {args.threads} thread(s) (results are bit-reproducible for a fixed seed and thread count).",
        "",
        "## Model",
        "",
        f"- {config['num_hidden_layers']} decoder layer(s), hidden {config['hidden_size']}, MLP {config['intermediate_size']}, "
        f"{config['num_attention_heads']} q heads / {config['num_key_value_heads']} kv heads x {config['head_dim']}, "
        "Qwen3-style attention with per-head q/k RMSNorm (DeepSpec's drafter architecture; the Llama target has none, "
        "which does not matter: the drafter is its own model).",
        f"- target_layer_ids {config['target_layer_ids']} (decoder-layer outputs, HF `hidden_states[l + 1]`; "
        f"DeepSpec/z-lab `build_target_layer_ids({config['num_target_layers']}, 5)`: 1..L-3 evenly spaced).",
    ]
    if args.family != "eagle3":
        lines.append(f"- block_size {config['block_size']} (gamma {config['block_size']}: slot k predicts anchor + k + 1), "
                     f"mask_token_id {config['mask_token_id']} (a special token SmolLM2 never emits)"
                     + (f", Markov head {config['markov_head_type']} rank {config['markov_rank']}, confidence head on "
                        "[h ; W1[prev]]" if args.family == "dspark" else ", no heads") + ".")
    else:
        lines.append(f"- ttt_length {config['ttt_length']} (drafts per round), step_loss_decay {config['step_loss_decay']}.")
    lines += [
        f"- `model.safetensors`: {n_saved / 1e6:.2f}M parameters in bf16 ({size_mb:.1f} MB). `embed_tokens.weight` and "
        "`lm_head.weight` are NOT stored: they are frozen copies of the target's, and `load_drafter` borrows them from "
        f"the TargetSpec (describe_drafter: borrows {list(desc.borrows_from_target)}).",
        "",
        "## Data",
        "",
        *_data_lines(args, data_info, n_train, n_eval),
        "",
        "## Training",
        "",
        f"- {args.steps} steps x {args.batch_seqs} sequences x {args.anchors} random anchors "
        + ("(rows) " if args.family == "eagle3" else "")
        + f"in the response tokens; AdamW lr {args.lr} (betas 0.9/0.95, wd {args.weight_decay}), warmup "
        f"{args.warmup:.0%}, cosine to {args.min_lr_ratio}x, grad-norm clip {args.grad_clip}; LM-head matmul in "
        f"{args.lm_head_dtype} during training"
        + (f"; sampled softmax: each step's needed tokens plus {args.vocab_sample} importance-weighted sampled "
           "others (examples/training/sampled_vocab.py)." if args.vocab_sample else "."),
    ]
    kl = f" + {args.kl_alpha} KL(p_target || p_draft)" if args.kl_alpha else ""
    if args.family == "eagle3":
        lines.append(f"- Loss per TTT step k (weight {args.step_decay}^k): 0.1 CE + 0.9 ||p_draft - p_target||_1{kl}.")
    else:
        lines.append(f"- Loss: 0.1 CE + 0.9 ||p_draft - p_target||_1{kl}"
                     + (" + 1.0 BCE(confidence, 1 - TV)" if args.family == "dspark" else "")
                     + f", slot weights exp(-k/{args.loss_decay}); teacher-forced Markov head (prev = [anchor, gt_1..]), "
                     "block mask: context strictly before the anchor + the block itself (bidirectional).")
    lines += [
        f"- Wall time: training {train_s / 60:.1f} min; whole run {total_s / 60:.1f} min (cached data reused when present).",
        f"- Final (EMA) losses at step {last.get('step')}: "
        + ", ".join(f"{k} {last[k]}" for k in ("loss", "ce", "l1", "kl", "conf", "conf_err") if k in last) + ".",
        "",
        "## Held-out sanity metrics (the saved bf16 checkpoint, reloaded with `load_drafter`, float32)",
        "",
        f"Teacher-forced on {n_eval} held-out sequences, {metrics['blocks']} full blocks:",
        "",
        f"| {slots} k | " + " | ".join(str(k) for k in range(len(metrics["accept_at"]))) + " |",
        "|---|" + "---|" * len(metrics["accept_at"]),
        "| accept (1 - TV) | " + " | ".join(f"{a:.3f}" for a in metrics["accept_at"]) + " |",
        "| greedy top-1 agreement | " + " | ".join(f"{a:.3f}" for a in metrics["agree_at"]) + " |",
        "",
        f"- tau_probabilistic = 1 + sum_k prod_(i<=k) accept_i (teacher-forced, T=1): {metrics['tau_prob']}",
    ]
    if "conf_abs_err" in metrics:
        lines.append(f"- mean |sigmoid(confidence) - (1 - TV)|: {metrics['conf_abs_err']}")
    lines += [
        "",
        "Teacher-forced numbers condition each slot on the ground-truth prefix; real accepted lengths come from",
        "`dspark-eval` (benchmarks/eval_acceptance.py), which drafts from the drafter's own tokens.",
        "",
    ]
    (args.out / "TRAINING.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
