"""Losslessness at the server: tokens a DSPARK server samples, against the target's exact probabilities.

Unit tests prove the acceptance math (tests/unit/test_acceptance_distribution.py); this proves the
whole server path: SGLang's batching, the worker's verify layout, row parameters, acceptance and
commit. It needs power, so everything is chosen for it:

- the target is a tiny random Llama (vocabulary 256, 2 layers; `build_tiny_target`), served by the
  real SGLang CPU engine, with next-token distributions of moderate entropy: thousands of samples
  cost seconds, and the exact probabilities of every sampled prefix come from one teacher-forced
  forward of the same weights in transformers;
- the drafter is the target itself at `temperature_ratio` times each request's temperature
  (drafters/tempered.py): most drafts are accepted, many are not, so acceptance, rejection and the
  residual all run;
- `verify_all` verifies every draft, and `max_new_tokens` = 4 keeps chains short so each request is a
  few rounds.

The statistic: for each decoded token (positions 2..4; the first comes from SGLang's own prefill
sampler) the randomized probability integral transform u = F(t-) + v p(t) under the exact filtered
target distribution given the sampled prefix, tokens ordered by descending p. For a lossless server the
u's are i.i.d. U(0, 1) (Rosenblatt); a Kolmogorov-Smirnov test per sampling configuration (T=1, top-p,
top-k, min-p) gives the p-values. The negative controls (DSPARK_TEST_BREAK: a wrong residual rule, a
wrong temperature) must be rejected at the same sample size.

    python -m dspark_sglang.benchmarks.server_distribution --samples 2000 --out report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VOCAB, NEW_TOKENS, GAMMA = 256, 4, 3
CONFIGS = {  # SGLang sampling parameters per configuration
    "T=1": {"temperature": 1.0},
    "top-p 0.8": {"temperature": 1.0, "top_p": 0.8},
    "top-k 12": {"temperature": 0.9, "top_k": 12},
    "min-p 0.05": {"temperature": 1.0, "min_p": 0.05},
}
BREAKS = ("residual_from_p", "temperature_x1.25")


def build_tiny_target(folder: Path, seed: int = 0, logit_scale: float = 16.0) -> Path:
    """A random 2-layer Llama with a 256-token vocabulary (no tokenizer: requests send token ids).
    `logit_scale` sharpens the LM head so next-token entropies are a few nats, not log(256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=0, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tempered_drafter(folder: Path, target: Path, temperature_ratio: float = 1.6, gamma: int = GAMMA) -> Path:
    """The validation drafter's checkpoint: the target's config plus what tempered.py reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(target) / "config.json").read_text())
    config["dspark_test_drafter"] = {"kind": "tempered_target", "target_path": str(target),
                                     "temperature_ratio": temperature_ratio, "gamma": gamma}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_prompts(num: int, length: int = 6, seed: int = 0) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [[1] + g.integers(2, VOCAB, length - 1).tolist() for _ in range(num)]


def sample_server(target: Path, drafter: Path, prompts, samples: int, break_kind: str | None = None,
                  seed: int = 0, progress: bool = True) -> dict:
    """{config: [[prompt index, token ids...], ...]} and the worker's counters, from one DSPARK engine."""
    import sglang as sgl

    from dspark_sglang.cpu_mode import cpu_engine_kwargs

    env = {"DSPARK_SCHEDULER": "verify_all", "DSPARK_SEED": str(seed), "DSPARK_DRAFT_VOCAB": "none"}
    if break_kind:
        env["DSPARK_TEST_BREAK"] = break_kind
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        engine = sgl.Engine(model_path=str(target), skip_tokenizer_init=True, speculative_algorithm="DSPARK",
                            speculative_draft_model_path=str(drafter),
                            **cpu_engine_kwargs(speculative=True, dtype="float32", max_running_requests=128))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        outputs = {}
        for name, params in CONFIGS.items():
            t0 = time.perf_counter()
            jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(samples)]
            sp = {**params, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
            got = []
            for start in range(0, len(jobs), 512):
                chunk = jobs[start : start + 512]
                outs = engine.generate(input_ids=[p for _, p in chunk], sampling_params=[sp] * len(chunk))
                got += [[i] + list(o["output_ids"]) for (i, _), o in zip(chunk, outs)]
            outputs[name] = got
            if progress:
                print(f"  {name}: {len(got)} samples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        info = engine.get_server_info()
        stats = (info.get("internal_states") or [{}])[0].get("dspark_plugin", {})
    finally:
        engine.shutdown()
    return {"outputs": outputs, "worker": {k: stats.get(k) for k in ("accept_length", "verify_length", "accept_rate_at")}}


@torch.no_grad()
def exact_pits(target: Path, prompts, outputs: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """{config: u's of the decoded tokens (positions 2..NEW_TOKENS)} under the exact target distribution."""
    from transformers import AutoModelForCausalLM

    from dspark_sglang.sampling import process_logits

    model = AutoModelForCausalLM.from_pretrained(str(target), torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    pits = {}
    for name, rows in outputs.items():
        params = CONFIGS[name]
        us = []
        for j in range(1, NEW_TOKENS):  # the token at output position j, given the prompt and outputs[:j]
            prefixes = sorted({tuple(prompts[r[0]]) + tuple(r[1 : 1 + j]) for r in rows})
            index = {p: k for k, p in enumerate(prefixes)}
            ids = torch.tensor(prefixes)  # equal lengths: every prompt has the same length
            logits = model(ids).logits[:, -1].float()  # [P, V]
            n = len(prefixes)
            probs = process_logits(
                logits, torch.full((n,), float(params["temperature"])),
                torch.full((n,), int(params.get("top_k", -1))), torch.full((n,), float(params.get("top_p", 1.0))),
                torch.full((n,), float(params.get("min_p", 0.0))),
            ).double().numpy()  # [P, V]
            order = np.argsort(-probs, axis=1, kind="stable")  # descending p, ties by id
            ranked = np.take_along_axis(probs, order, axis=1)
            cdf_before = np.cumsum(ranked, axis=1) - ranked  # [P, V] mass ranked before each
            rank_of = np.argsort(order, axis=1)  # [P, V] token -> its rank
            for r in rows:
                k = index[tuple(prompts[r[0]]) + tuple(r[1 : 1 + j])]
                rank = rank_of[k, r[1 + j]]
                us.append(cdf_before[k, rank] + rng.random() * ranked[k, rank])
        pits[name] = np.clip(np.asarray(us), 0.0, 1.0)
    return pits


def ks_pvalues(pits: dict[str, np.ndarray]) -> dict[str, float]:
    from scipy.stats import kstest

    return {name: float(kstest(u, "uniform").pvalue) for name, u in pits.items()}


def run(samples: int, breaks=("none",) + BREAKS, num_prompts: int = 3, seed: int = 0, workdir: Path | None = None,
        progress: bool = True) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="dspark-dist-"))
    target = build_tiny_target(workdir / "target", seed=seed)
    drafter = build_tempered_drafter(workdir / "drafter", target)
    prompts = make_prompts(num_prompts, seed=seed)
    report = {"samples_per_prompt_and_config": samples, "prompts": len(prompts), "new_tokens": NEW_TOKENS,
              "gamma": GAMMA, "runs": {}}
    for kind in breaks:
        if progress:
            print(f"server with acceptance {kind!r}:", file=sys.stderr)
        sampled = sample_server(target, drafter, prompts, samples, None if kind == "none" else kind, seed, progress)
        pvalues = ks_pvalues(exact_pits(target, prompts, sampled["outputs"], seed))
        report["runs"][kind] = {"ks_pvalue": pvalues, "min_pvalue": min(pvalues.values()), **sampled["worker"]}
        if progress:
            print(f"  KS p-values {json.dumps({k: float(f'{v:.3g}') for k, v in pvalues.items()})}", file=sys.stderr)
    return report


def main(argv=None) -> int:
    from dspark_sglang.cpu_mode import enable_cpu_mode

    parser = argparse.ArgumentParser(
        prog="python -m dspark_sglang.benchmarks.server_distribution",
        description="Sample a DSPARK server thousands of times and test its tokens against the target's exact "
                    "distribution (KS on the randomized PIT), with negative controls that must fail.")
    parser.add_argument("--samples", type=int, default=2000, help="samples per prompt and sampling configuration")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--breaks", default="none," + ",".join(BREAKS),
                        help="servers to sample: none (the real acceptance) and/or DSPARK_TEST_BREAK kinds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args(argv)
    enable_cpu_mode()
    report = run(args.samples, tuple(args.breaks.split(",")), args.prompts, args.seed)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
