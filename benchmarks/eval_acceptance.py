"""dspark-eval: accepted length per round, per-position acceptance and confidence calibration.

The DSpark paper's protocol (Table 1): batch size 1, chain drafting, every draft verified
("scheduler off"), τ = mean over rounds of (accepted drafts + 1 bonus/correction token), at T=0
and T=1. It runs the product's own drafter, confidence, scheduler and acceptance code, with a
transformers target instead of the SGLang engine (benchmarks/spec_loop.py).

Calibration: the confidence of the cumulative prefix, survival_k = Π_{i≤k} c_i, is compared with
the observed event "the first k+1 drafts were accepted" on verified positions. STS is fitted on
the even-indexed prompts of each set and evaluated on the odd-indexed ones (held out), per
temperature, because "accepted" means an argmax match at T=0 and the ratio test at T>0.
The (confidence logits, accepted, verify length) records are written for `dspark-calibrate`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dspark_sglang.confidence import (
    CalibrationRecords,
    ProposalProbEstimator,
    apply_sts,
    fit_sts,
    survival_metrics,
)
from dspark_sglang.benchmarks.eval_compare import merge_results, paired_comparisons, print_paired
from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter
from dspark_sglang.sampling import SamplingBatch

DEFAULT_SETS = ("gsm8k", "humaneval", "mtbench")


@dataclass
class RunRecords:
    """All rounds of one (drafter, temperature, prompt set)."""

    conf_logits: list[torch.Tensor]  # per round [gamma] raw confidence (head logit or logit(top-1 q))
    num_accepted: list[int]
    verify_lens: list[int]
    prompt_index: list[int]
    context_lens: list[int] = None  # per round, the anchor's position (prompt + output so far)
    new_tokens: int = 0
    seconds: float = 0.0
    num_prompts: int = 0  # prompts run (a prompt may end before its first round)

    def tensors(self, keep: torch.Tensor | None = None) -> CalibrationRecords:
        records = CalibrationRecords(torch.stack(self.conf_logits).float(), torch.tensor(self.num_accepted),
                                     torch.tensor(self.verify_lens),
                                     prompt_ids=torch.tensor(self.prompt_index, dtype=torch.long))
        return records if keep is None else records.take(keep)


def target_spec_of(model) -> TargetSpec:
    cfg = model.config
    return TargetSpec(
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_hidden_layers=cfg.num_hidden_layers,
        embed_tokens=model.get_input_embeddings().weight.detach(),
        lm_head=model.get_output_embeddings().weight.detach(),
    )


def sampling_for(temperature: float) -> SamplingBatch:
    batch = SamplingBatch.greedy(1)
    batch.temperatures.fill_(temperature)
    return batch


def make_verify_len_chooser(kind: str, gamma: int, fixed_len: int | None):
    """Verify lengths at batch size 1; Table 1 verifies every draft (the scheduler is a load
    decision, measured by dspark-bench, not an acceptance property)."""
    if kind == "verify-all":
        return lambda conf, probs: torch.tensor([gamma])
    return lambda conf, probs: torch.tensor([min(fixed_len, gamma)])


def run_set(target, drafter, prompts, args, temperature: float, seed: int) -> RunRecords:
    from dspark_sglang.benchmarks.spec_loop import speculative_generate

    gamma = drafter.info.gamma
    choose = make_verify_len_chooser(args.scheduler, gamma, args.fixed_len)
    records = RunRecords([], [], [], [], [], num_prompts=len(prompts))
    eos = target.tokenizer.eos_token_id
    identity = ProposalProbEstimator.identity(gamma)
    for index, prompt in enumerate(tqdm(prompts, desc=f"  T={temperature:g}", leave=False)):
        generator = torch.Generator().manual_seed(seed + index)
        ids = target.chat_ids(prompt.messages)
        start = time.perf_counter()
        trace = speculative_generate(
            target, drafter, ids, args.max_new_tokens, sampling_for(temperature), choose, generator, eos,
        )
        records.seconds += time.perf_counter() - start
        records.new_tokens += len(trace.output_ids)
        for rnd in trace.rounds:
            # Head-less drafters: the raw confidence is logit(max_v q_k(v)) (an identity estimator).
            raw = rnd.conf_logits if rnd.conf_logits is not None else identity.logits(rnd.top1_probs)
            records.conf_logits.append(raw)
            records.num_accepted.append(rnd.num_accepted)
            records.verify_lens.append(rnd.verify_len)
            records.prompt_index.append(index)
            records.context_lens.append(rnd.context_len)
    return records


CONTEXT_BUCKETS = (0, 256, 512, 1024, 2048)  # τ by context length: [0, 256), [256, 512), ..., [2048, inf)


def tau_by_context(records: RunRecords) -> list[dict]:
    """τ over the rounds whose anchor sits in each context-length bucket (prompt + output so far)."""
    if not records.context_lens:
        return []
    acc = torch.tensor(records.num_accepted, dtype=torch.float64)
    ctx = torch.tensor(records.context_lens)
    edges = list(CONTEXT_BUCKETS) + [None]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        keep = (ctx >= lo) & (ctx < hi if hi is not None else torch.ones_like(ctx, dtype=torch.bool))
        if keep.any():
            out.append({"from": lo, "to": hi, "rounds": int(keep.sum()), "tau": float((acc[keep] + 1).mean())})
    return out


def summarize(records: RunRecords, gamma: int) -> dict:
    acc = torch.tensor(records.num_accepted, dtype=torch.long)
    lens = torch.tensor(records.verify_lens)
    prompt = torch.tensor(records.prompt_index, dtype=torch.long)
    num_prompts = max(records.num_prompts, int(prompt.max()) + 1 if len(prompt) else 0)
    pos = torch.arange(1, gamma + 1)[None, :]
    reached = (lens[:, None] >= pos) & (acc[:, None] >= pos - 1)  # position k verified, prefix accepted
    passed = reached & (acc[:, None] >= pos)
    cond = (passed.sum(0).float() / reached.sum(0).clamp_min(1)).tolist()
    out = {
        "rounds": len(acc),
        "tau": float((acc + 1).float().mean()) if len(acc) else float("nan"),
        "verify_rate": float(lens.float().mean() / gamma) if len(acc) else float("nan"),
        "conditional_acceptance": cond,
        "tokens_per_second": records.new_tokens / max(records.seconds, 1e-9),
        "tau_by_context": tau_by_context(records),
        # per prompt, for paired comparisons of drafters on the same prompts (`--compare`)
        "prompt_rounds": torch.bincount(prompt, minlength=num_prompts).tolist(),
        "prompt_accepted": torch.bincount(prompt, weights=acc.double(), minlength=num_prompts).long().tolist(),
    }
    out.update(calibration(records, gamma))
    return out


def calibration(records: RunRecords, gamma: int) -> dict:
    """ECE/AUC of the cumulative confidence, before and after STS fitted on even prompts."""
    prompt = torch.tensor(records.prompt_index)
    fit_rows, eval_rows = prompt % 2 == 0, prompt % 2 == 1
    if not fit_rows.any() or not eval_rows.any():
        return {}
    fit_part, held_out = records.tensors(fit_rows), records.tensors(eval_rows)
    try:
        sts = fit_sts(fit_part.conf_logits, fit_part.num_accepted, fit_part.verify_lens)
    except ValueError:
        return {}
    raw_survival = torch.sigmoid(held_out.conf_logits).cumprod(-1)
    sts_survival = apply_sts(held_out.conf_logits, sts.temperatures).cumprod(-1)
    before = survival_metrics(raw_survival, held_out.num_accepted, held_out.verify_lens)
    after = survival_metrics(sts_survival, held_out.num_accepted, held_out.verify_lens)

    def mean(values):
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    return {
        "ece_before": mean(before["ece"]), "ece_after": mean(after["ece"]),
        "auc_before": mean(before["auc"]), "auc_after": mean(after["auc"]),
        "ece_before_per_position": before["ece"], "ece_after_per_position": after["ece"],
        "sts_temperatures": sts.temperatures,
    }


def print_table(results: dict, sets: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Accepted length τ per round (incl. bonus), batch size 1, all drafts verified")
    table.add_column("drafter")
    table.add_column("T")
    for name in sets:
        table.add_column(name, justify="right")
    table.add_column("mean", justify="right")
    for drafter, by_temp in results.items():
        for temp, by_set in by_temp.items():
            taus = [by_set[s]["tau"] for s in sets]
            table.add_row(drafter, temp, *[f"{t:.2f}" for t in taus], f"{sum(taus) / len(taus):.2f}")
    Console().print(table)
    rows = {(d, t): context_profile([by_set[s] for s in sets]) for d, by_temp in results.items() for t, by_set in by_temp.items()}
    if any(rows.values()):
        by_ctx = Table(title="τ by context length (prompt + output before the round), all sets pooled; rounds in brackets")
        by_ctx.add_column("drafter")
        by_ctx.add_column("T")
        labels = [f"{lo}-{hi if hi is not None else ''}" for lo, hi in zip(CONTEXT_BUCKETS, list(CONTEXT_BUCKETS[1:]) + [None])]
        for label in labels:
            by_ctx.add_column(label, justify="right")
        for (drafter, temp), profile in rows.items():
            cells = {b["from"]: f"{b['tau']:.2f} ({b['rounds']})" for b in profile}
            by_ctx.add_row(drafter, temp, *[cells.get(lo, "-") for lo in CONTEXT_BUCKETS])
        Console().print(by_ctx)


def context_profile(summaries: list[dict]) -> list[dict]:
    """Pool several sets' tau_by_context buckets (round-weighted)."""
    pooled: dict = {}
    for summary in summaries:
        for b in summary.get("tau_by_context", []):
            rounds, total = pooled.get(b["from"], (0, 0.0))
            pooled[b["from"]] = (rounds + b["rounds"], total + b["tau"] * b["rounds"])
    edges = dict(zip(CONTEXT_BUCKETS, list(CONTEXT_BUCKETS[1:]) + [None]))
    return [{"from": lo, "to": edges[lo], "rounds": n, "tau": total / n} for lo, (n, total) in sorted(pooled.items())]


def plot(results: dict, sets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({t for by_temp in results.values() for t in by_temp})
    fig, axes = plt.subplots(2, len(temps), figsize=(5 * len(temps), 8), squeeze=False)
    for col, temp in enumerate(temps):
        ax = axes[0, col]
        width = 0.8 / max(len(results), 1)
        top = 1.0
        for i, (drafter, by_temp) in enumerate(results.items()):
            if temp in by_temp:
                taus = [by_temp[temp][s]["tau"] for s in sets]
                ax.bar([j + i * width for j in range(len(sets))], taus, width, label=drafter)
                top = max(top, *taus)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
        ax.set_ylabel("accepted length τ")
        ax.set_title(f"T = {temp}")
        ax.set_ylim(0, top * 1.2)  # headroom: the legend sits above the bars instead of over one
        ax.legend(loc="upper center", ncol=max(len(results), 1))
        ax = axes[1, col]
        for drafter, by_temp in results.items():
            if temp in by_temp:
                curves = [by_temp[temp][s]["conditional_acceptance"] for s in sets]
                mean = [sum(c[k] for c in curves) / len(curves) for k in range(len(curves[0]))]
                ax.plot(range(1, len(mean) + 1), mean, marker="o", label=drafter)
        ax.set_xlabel("draft position k")
        ax.set_ylabel("P(accept k | accepted < k)")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="dspark-eval",
        description="Measure accepted length per round (τ, incl. the bonus token), per-position acceptance and "
        "confidence calibration of drafters on real prompt sets, the DSpark paper's way (batch size 1).",
    )
    parser.add_argument("--drafter", action="append", metavar="[NAME=]PATH",
                        help="drafter checkpoint directory; repeat to compare several")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="RESULTS_JSON",
                        help="instead of running: merge the results.json of earlier runs (same sets, prompts, tokens "
                        "and seed) and compare their drafters prompt by prompt (paired bootstrap of the τ difference)")
    parser.add_argument("--bootstrap", type=int, default=4000, help="bootstrap resamples of the paired comparison "
                        "(default: %(default)s)")
    parser.add_argument("--target", default=None, help="target model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS), help="comma-separated prompt sets (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=50, help="prompts per set (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, action="append", help="repeatable (default: 0 and 1)")
    parser.add_argument("--scheduler", default="verify-all", choices=["verify-all", "fixed"],
                        help="verify length per round at batch size 1 (default: %(default)s, the paper's Table 1)")
    parser.add_argument("--fixed-len", type=int, default=None, help="drafts verified per round with --scheduler fixed")
    parser.add_argument("--seed", type=int, default=980406, help="base seed; prompt i uses seed+i (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--draft-vocab", default="auto", metavar="auto|none|PATH",
                        help="reduced draft vocabulary: auto (default) = draft_vocab.safetensors beside each drafter "
                        "when present, none = the full vocabulary, or a file for every drafter")
    parser.add_argument("--out", default="eval-out", help="output directory for JSON, PNG and records")
    args = parser.parse_args(argv)
    if bool(args.drafter) == bool(args.compare):
        parser.error("give --drafter (run drafters) or --compare (merge earlier results), not both or neither")
    if args.bootstrap < 100:
        parser.error("--bootstrap needs at least 100 resamples")
    args.temperature = args.temperature or [0.0, 1.0]
    if args.scheduler == "fixed" and args.fixed_len is None:
        parser.error("--scheduler fixed needs --fixed-len")
    return args


def write_outputs(results: dict, sets: list[str], run_args: dict, out_dir: Path, bootstrap: int) -> None:
    """Table, paired comparisons (when several drafters share prompts), results.json and the PNG."""
    print_table(results, sets)
    paired = paired_comparisons(results, sets, bootstrap)
    if paired:
        print_paired(paired)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"args": run_args, "results": results, "paired": paired}, indent=2))
    plot(results, sets, out_dir / "acceptance.png")
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'acceptance.png'}")


def compare_main(args) -> dict:
    try:
        results, run_args = merge_results(args.compare)
    except ValueError as exc:
        raise SystemExit(f"dspark-eval --compare: {exc}") from None
    sets = [s.strip() for s in run_args["sets"].split(",") if s.strip()]
    write_outputs(results, sets, dict(run_args, compare=[_input_name(p) for p in args.compare]), Path(args.out), args.bootstrap)
    return results


def _input_name(path) -> str:
    """A compared results.json as the merged file records it: its folder and name, not the machine's
    path to them (committed results must not name local folders)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return compare_main(args)
    torch.manual_seed(args.seed)
    from dspark_sglang.benchmarks.hf_target import HFTarget
    from dspark_sglang.models import ensure_target
    from dspark_sglang.prompts import load_prompts

    dtype = getattr(torch, args.dtype)
    target_path = args.target or str(ensure_target())
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    prompts = {name: load_prompts(name, limit=args.num_prompts) for name in sets}
    drafters = []
    for spec in args.drafter:
        name, _, path = spec.rpartition("=")
        drafters.append((name or Path(path).name, path))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    target = None
    results: dict = {}
    for name, path in drafters:
        layer_ids = describe_drafter(path).target_layer_ids
        if target is None:
            target = HFTarget(target_path, layer_ids, dtype)
        target.layer_ids = tuple(layer_ids)
        drafter = load_drafter(path, target_spec_of(target.model), dtype=dtype, draft_vocab=args.draft_vocab)
        vocab = getattr(drafter, "draft_vocab", None)
        print(f"{name}: {path} (gamma {drafter.info.gamma}, {drafter.info.family}/{drafter.info.format}, "
              f"draft vocabulary {'full' if vocab is None else vocab.size})")
        for temp in args.temperature:
            key = f"{temp:g}"
            for set_name in sets:
                print(f" {set_name}: {len(prompts[set_name])} prompts")
                records = run_set(target, drafter, prompts[set_name], args, temp, args.seed)
                summary = summarize(records, drafter.info.gamma)
                results.setdefault(name, {}).setdefault(key, {})[set_name] = summary
                records.tensors().save(out_dir / f"records_{name}_T{key}_{set_name}.safetensors")
                print(f"   τ = {summary['tau']:.3f} over {summary['rounds']} rounds")
    run_args = {k: v for k, v in vars(args).items() if k not in ("compare", "bootstrap")}
    write_outputs(results, sets, run_args, out_dir, args.bootstrap)
    return results


if __name__ == "__main__":
    main()
