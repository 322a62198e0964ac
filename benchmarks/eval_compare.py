"""Paired comparison of drafters evaluated on the same prompts (`dspark-eval --compare`).

Two drafters run on the same prompt set with the same seeds see the same prompts; at T=0 they even
produce the same text (speculative decoding is lossless), so their accepted lengths differ only
through the drafters. The difference of pooled τ (Σ(accepted + 1) / Σ rounds) is therefore judged by
a paired bootstrap over prompts: resample prompt indices with replacement, recompute both drafters'
pooled τ on the same resample, and read the 2.5/97.5 % quantiles of the difference. `p_not_better`
is the bootstrap share of resamples where the first drafter is not ahead (a one-sided p-value
estimate: small means "the first drafter's τ is higher, beyond prompt-to-prompt noise").
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

# run settings that must agree for prompt i to be the same prompt in every run
_PAIRING_ARGS = ("sets", "num_prompts", "max_new_tokens", "seed", "scheduler", "fixed_len", "dtype", "target")


def pooled_tau(rounds: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """Pooled τ per resample: rounds, accepted [B, P] (per-prompt counts) -> [B]."""
    return (accepted.sum(-1) + rounds.sum(-1)).double() / rounds.sum(-1).clamp_min(1).double()


def paired_tau_difference(first: dict, second: dict, samples: int = 4000, seed: int = 0) -> dict:
    """Bootstrap the pooled-τ difference first − second of two per-set summaries that hold
    `prompt_rounds` and `prompt_accepted` (the same prompts, in the same order)."""
    r1, a1 = torch.tensor(first["prompt_rounds"]), torch.tensor(first["prompt_accepted"])
    r2, a2 = torch.tensor(second["prompt_rounds"]), torch.tensor(second["prompt_accepted"])
    if r1.numel() != r2.numel():
        raise ValueError(f"paired comparison needs the same prompts: {r1.numel()} vs {r2.numel()} prompts")
    if r1.numel() == 0:
        raise ValueError("paired comparison needs at least one prompt")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, r1.numel(), (samples, r1.numel()), generator=generator)  # [B, P]
    diffs = pooled_tau(r1[picks], a1[picks]) - pooled_tau(r2[picks], a2[picks])  # [B]
    point = float(pooled_tau(r1[None], a1[None]) - pooled_tau(r2[None], a2[None]))
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=diffs.dtype)).tolist()
    return {"diff": point, "ci95": [low, high], "p_not_better": float((diffs <= 0).double().mean()),
            "prompts": r1.numel()}


def paired_comparisons(results: dict, sets: list[str], samples: int = 4000) -> list[dict]:
    """Every ordered-by-appearance pair of drafters, per temperature and set they share, plus the
    pooled 'all' set (prompts of all sets together)."""
    rows = []
    for (name_a, by_temp_a), (name_b, by_temp_b) in itertools.combinations(results.items(), 2):
        for temp in by_temp_a:
            if temp not in by_temp_b:
                continue
            shared = [s for s in sets if s in by_temp_a[temp] and s in by_temp_b[temp]
                      and "prompt_rounds" in by_temp_a[temp][s] and "prompt_rounds" in by_temp_b[temp][s]]
            for set_name in shared + (["all"] if len(shared) > 1 else []):
                parts = shared if set_name == "all" else [set_name]
                first = _concat([by_temp_a[temp][s] for s in parts])
                second = _concat([by_temp_b[temp][s] for s in parts])
                row = paired_tau_difference(first, second, samples)
                rows.append({"first": name_a, "second": name_b, "temperature": temp, "set": set_name, **row})
    return rows


def _concat(summaries: list[dict]) -> dict:
    return {key: [v for s in summaries for v in s[key]] for key in ("prompt_rounds", "prompt_accepted")}


def merge_results(paths: list[Path]) -> tuple[dict, dict]:
    """(merged results, the shared run arguments) of several `results.json` files. Refuses runs whose
    prompts differ (sets, prompt counts, tokens, seeds, ...) and a (drafter, temperature) present twice;
    one drafter's runs at different temperatures are joined."""
    merged: dict = {}
    reference_args, reference_path = None, None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            args, results = data["args"], data["results"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a dspark-eval results.json ({exc})") from exc
        pairing = {k: args.get(k) for k in _PAIRING_ARGS}
        if reference_args is None:
            reference_args, reference_path = pairing, path
        elif pairing != reference_args:
            differing = sorted(k for k in _PAIRING_ARGS if pairing[k] != reference_args[k])
            raise ValueError(f"{path} and {reference_path} ran different prompts or settings ({', '.join(differing)}): "
                             "a paired comparison needs the same --sets, --num-prompts, --max-new-tokens, --seed, ...")
        for name, by_temp in results.items():
            # One drafter may come from several runs (say T=0 and T=1 run apart), never one temperature twice.
            both = sorted(set(merged.get(name, {})) & set(by_temp))
            if both:
                raise ValueError(f"drafter {name!r} at T={', '.join(both)} appears in more than one results file")
            merged.setdefault(name, {}).update(by_temp)
    if not merged:
        raise ValueError("--compare needs at least one results.json")
    return merged, reference_args


def print_paired(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Paired τ difference (first − second), bootstrap over prompts")
    for column in ("first", "second", "T", "set", "Δτ", "95% CI", "P(not better)", "prompts"):
        table.add_column(column, justify="right" if column not in ("first", "second", "set") else "left")
    for row in rows:
        low, high = row["ci95"]
        table.add_row(row["first"], row["second"], row["temperature"], row["set"], f"{row['diff']:+.3f}",
                      f"[{low:+.3f}, {high:+.3f}]", f"{row['p_not_better']:.3f}", str(row["prompts"]))
    Console().print(table)
