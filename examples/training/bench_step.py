"""Training-step time of a block drafter, full-vocabulary LM head vs `--vocab-sample N`, side by side.

    OMP_NUM_THREADS=1 python -m examples.training.bench_step [--family dspark] [--vocab-sample 4096]

Random weights and data at the zoo drafters' shapes (SmolLM2-135M target: H 576, V 49152, 5 target
layers; 2 sequences x 512 tokens x 16 anchors x block 7, top-64 targets), so no target or cache is
needed. Alternates the two variants for --reps rounds and prints the median seconds per step
(forward + backward + optimizer step) of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dspark_sglang.drafters.interface import TargetSpec  # noqa: E402
from examples.training.export import build_modules, drafter_config  # noqa: E402


class _SmolLM2Config:
    """The attributes drafter_config reads: SmolLM2-135M's shapes."""

    hidden_size, num_attention_heads, num_key_value_heads, head_dim = 576, 9, 3, 64
    num_hidden_layers, vocab_size, rms_norm_eps, max_position_embeddings = 30, 49152, 1e-5, 8192
    rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
    bos_token_id, eos_token_id, pad_token_id, model_type = 1, 2, 2, "llama"


def batch(S: int, T: int, A: int, width: int, V: int, K: int, g: torch.Generator) -> dict:
    tk_lp = torch.log_softmax(torch.randn(S, T, K, generator=g) * 3, -1) - 0.3
    anchors = torch.stack([torch.randperm(T - 8, generator=g)[:A].sort().values + 1 for _ in range(S)])
    return dict(tokens=torch.randint(0, V, (S, T), generator=g), feats=torch.randn(S, T, width, generator=g),
                tk_ids=torch.randint(0, V, (S, T, K), generator=g), tk_lp=tk_lp,
                valid=torch.ones(S, T, dtype=torch.bool), lengths=torch.full((S,), T),
                anchors=anchors, keep=torch.ones(S, A, dtype=torch.bool))


def main(argv=None) -> None:
    from examples.train_drafter import block_step

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("dspark", "dflash"), default="dspark")
    p.add_argument("--vocab-sample", type=int, default=4096)
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = drafter_config(args.family, _SmolLM2Config, num_layers=1, intermediate_size=1536, layer_ids=[1, 8, 14, 20, 27],
                         block_size=7, mask_token_id=16, markov_rank=32, markov_head_type="vanilla", ttt_length=7,
                         target_name="SmolLM2-135M (random)")
    V, H = 49152, 576
    target = TargetSpec(H, V, 30, torch.randn(V, H, generator=g) * 0.02, torch.randn(V, H, generator=g) * 0.02)
    drafter = build_modules(args.family, cfg, target, seed=0)
    drafter.train()
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=1e-4)
    b = batch(2, 512, 16, drafter.config.context_width, V, 64, g)
    variants = {"full vocabulary": 0, f"--vocab-sample {args.vocab_sample}": args.vocab_sample}
    times = {name: [] for name in variants}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, n in variants.items():
            step_args = SimpleNamespace(vocab_sample=n, loss_decay=4.0, kl_alpha=0.0)
            start = time.perf_counter()
            (loss, _, _), _ = block_step(drafter, b, None, step_args, fused=True,
                                         vocab_gen=torch.Generator().manual_seed(rep) if n else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rep:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.family}, {torch.get_num_threads()} thread(s), median of {args.reps} steps each, alternated:")
    for name, t in medians.items():
        print(f"  {name:>24}: {t:.3f} s/step")
    full, sampled = medians.values()
    print(f"  speed-up: {full / sampled:.2f}x")


if __name__ == "__main__":
    main()
