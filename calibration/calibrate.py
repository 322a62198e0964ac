"""dspark-calibrate: fit STS temperatures from (confidence, accepted) records; write SGLang's STS JSON.

Reads calibration records (`CalibrationRecords`, .safetensors or .npz: conf_logits [n, γ],
num_accepted [n], verify_lens [n], optional prompt_ids [n]) as written by `dspark-eval` or the
worker, splits them into a fit part and a held-out part (whole prompts when the records carry
prompt ids, else single rounds), fits sequential temperature scaling per position
(`dspark_sglang.confidence.fit_sts`, censoring unverified positions) on the fit part, and reports
ECE / AUC of the cumulative survival Π_{i≤k} c_i before and after on the held-out part. Writes:

- OUT (default sts.json): SGLang 0.5.23's STS JSON for `--speculative-dspark-confidence-sts-path`
  (`temperatures`, `dataset`, `num_samples`, `ece_before`, `ece_after` — the last two on the fit
  part, as SGLang's fitter reports them);
- OUT.report.json: the held-out metrics per position;
- OUT.png: reliability diagram (predicted survival vs observed frequency, per position and
  pooled, before/after), on the held-out part.

Head-less drafters (DFlash, Eagle3 without a confidence head) record logit(top-1 draft
probability); `--estimator EST.json` first fits the `ProposalProbEstimator` (per-position logistic
regression) on the fit part, writes it, and fits STS on the estimator's logits, so the STS file
applies after the estimator.

    dspark-calibrate eval-out/records_dspark_T0_gsm8k.safetensors --out sts.json
    dspark-calibrate records/*.safetensors --holdout-fraction 0.3 --seed 1 --gamma 6
    dspark-calibrate eval-out/records_dspark_T0_*.safetensors --holdout-unit round
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from dspark_sglang.confidence import (
    CalibrationDataError, CalibrationRecords, ProposalProbEstimator, StsCalibration, apply_sts,
    fit_sts, observed_mask, prefix_labels, survival_metrics,
)

from ._cli import UsageError, run

PROG = "dspark-calibrate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", type=Path, nargs="+",
                   help="calibration records (.safetensors or .npz); several files are concatenated "
                        "in the order given (they must share γ)")
    p.add_argument("--out", type=Path, default=Path("sts.json"), help="STS JSON path (default: %(default)s)")
    p.add_argument("--holdout-fraction", type=float, default=0.5,
                   help="fraction of prompts (or rounds, see --holdout-unit) held out for the "
                        "before/after report, in [0, 1); 0 = report on the fit data itself "
                        "(default: %(default)s)")
    p.add_argument("--holdout-unit", choices=("prompt", "round"), default=None,
                   help="hold out whole prompts (needs prompt ids in every record file, as "
                        "dspark-eval writes them) or single rounds (default: prompt when every "
                        "file has prompt ids, else round)")
    p.add_argument("--seed", type=int, default=None,
                   help="choose the held-out prompts/rounds at random with this seed (default: "
                        "by record order, the last ones held out: with several files, mostly the "
                        "last file's)")
    p.add_argument("--gamma", type=int, default=None,
                   help="fit only the first GAMMA positions (default: all recorded)")
    p.add_argument("--num-bins", type=int, default=15, help="ECE bins, as SGLang (default: %(default)s)")
    p.add_argument("--dataset", default=None, help="the STS file's dataset field (default: record file names)")
    p.add_argument("--estimator", type=Path, default=None, metavar="EST.json",
                   help="head-less drafters: fit the ProposalProbEstimator, write it here, and fit "
                        "STS on its logits")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT with .png)")
    p.add_argument("--no-plot", action="store_true")
    return p


def load_records(paths: list[Path], gamma: Optional[int]) -> CalibrationRecords:
    """Load and concatenate record files; optionally keep the first ``gamma`` positions."""
    parts = [CalibrationRecords.load(path) for path in paths]
    widths = {r.gamma for r in parts}
    if len(widths) > 1:
        detail = ", ".join(f"{p} (γ={r.gamma})" for p, r in zip(paths, parts))
        raise UsageError(f"record files have different γ: {detail}")
    records = CalibrationRecords.concat(parts, path=", ".join(map(str, paths)))
    if len(records) == 0:
        raise UsageError(f"{records.path}: no records")
    if gamma is not None:
        if not 1 <= gamma <= records.gamma:
            raise UsageError(f"--gamma {gamma}: the records have γ={records.gamma}")
        lens = records.verify_lens.clamp(max=gamma)
        records = CalibrationRecords(records.conf_logits[:, :gamma], records.num_accepted.clamp(max=gamma),
                                     lens, path=records.path, prompt_ids=records.prompt_ids)
    return records


def holdout_unit(records: CalibrationRecords, requested: Optional[str]) -> str:
    if requested == "prompt" and records.prompt_ids is None:
        raise UsageError(f"--holdout-unit prompt: {records.path}: no prompt ids in (every one of) these "
                         "records; record with dspark-eval, or use --holdout-unit round")
    return requested or ("prompt" if records.prompt_ids is not None else "round")


def split(records: CalibrationRecords, fraction: float, seed: Optional[int], unit: str = "round"):
    """(fit, held-out) record sets. Held out: ``fraction`` of the rounds, or of the prompts with
    every round of each (``unit`` "prompt"); the last ones in record order, or chosen with ``seed``.
    With ``fraction`` 0 both parts are all the records."""
    if unit == "prompt":
        # Group index = rank of the prompt id; ids grow with file order and prompt order (concat).
        group_of_row = torch.unique(records.prompt_ids, return_inverse=True)[1]
    else:
        group_of_row = torch.arange(len(records))
    n = int(group_of_row.max()) + 1 if len(records) else 0
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    num_held = int(round(fraction * n))
    if fraction > 0 and not 1 <= num_held < n:
        raise UsageError(f"--holdout-fraction {fraction} leaves {n - num_held} fit and {num_held} "
                         f"held-out {unit}s of {n}: need at least one of each")
    if not num_held:
        return records, records
    held_group = torch.zeros(n, dtype=torch.bool)
    held_group[order[n - num_held:]] = True
    held_row = held_group[group_of_row]  # [rounds]
    return records.take(~held_row), records.take(held_row)


def count_prompts(records: CalibrationRecords) -> Optional[int]:
    return None if records.prompt_ids is None else len(torch.unique(records.prompt_ids))


def _json_safe(obj):
    """NaN (a position never verified in the held-out part) -> null, so the report is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _mean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def evaluate(records: CalibrationRecords, logits: torch.Tensor, temps, num_bins: int) -> dict:
    """Per-position and mean metrics of the survival cumprod(sigmoid(logits / T))."""
    survival = apply_sts(logits, temps).double().cumprod(dim=-1)  # [n, γ]
    out = survival_metrics(survival, records.num_accepted, records.verify_lens, num_bins)
    out["mean_ece"], out["mean_auc"] = _mean(out["ece"]), _mean(out["auc"])
    return out


def print_report(rows: dict[str, dict], gamma: int, where: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cumulative survival Π c_i vs accepted prefix, {where}")
    table.add_column("position", justify="right")
    table.add_column("verified", justify="right")
    for name in rows:
        table.add_column(f"ECE {name}", justify="right")
    for name in rows:
        table.add_column(f"AUC {name}", justify="right")
    first = next(iter(rows.values()))
    for k in range(gamma):
        table.add_row(str(k + 1), f"{first['count'][k]:.0f}",
                      *[f"{r['ece'][k]:.4f}" for r in rows.values()],
                      *[f"{r['auc'][k]:.3f}" for r in rows.values()])
    table.add_row("mean", "", *[f"{r['mean_ece']:.4f}" for r in rows.values()],
                  *[f"{r['mean_auc']:.3f}" for r in rows.values()], style="bold")
    console = Console()
    console.width = max(console.width, 110)  # keep every column readable in a pipe
    console.print(table)


def main_inner(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.holdout_fraction < 1.0:
        parser.error("--holdout-fraction must lie in [0, 1)")
    if args.num_bins < 1:
        parser.error("--num-bins must be >= 1")

    records = load_records(args.records, args.gamma)
    unit = holdout_unit(records, args.holdout_unit)
    fit_part, held_out = split(records, args.holdout_fraction, args.seed, unit)
    gamma = records.gamma
    dataset = args.dataset if args.dataset is not None else ",".join(p.name for p in args.records)

    fit_logits, held_logits = fit_part.conf_logits, held_out.conf_logits
    estimator = None
    if args.estimator is not None:
        estimator = ProposalProbEstimator.fit(fit_part)
        fit_logits = estimator.apply_to_raw(fit_logits)
        held_logits = estimator.apply_to_raw(held_logits)
    try:
        sts = fit_sts(fit_logits, fit_part.num_accepted, fit_part.verify_lens,
                      num_bins=args.num_bins, dataset=dataset)
    except CalibrationDataError as exc:
        raise UsageError(f"{records.path}: {exc} (try --gamma)") from None

    ones = [1.0] * gamma
    rows = {"raw": evaluate(held_out, held_out.conf_logits, ones, args.num_bins)}
    if estimator is not None:
        rows["est"] = evaluate(held_out, held_logits, ones, args.num_bins)
        rows["est+STS"] = evaluate(held_out, held_logits, sts.temperatures, args.num_bins)
    else:
        rows["STS"] = evaluate(held_out, held_logits, sts.temperatures, args.num_bins)
    if not args.holdout_fraction:
        where = f"the {len(fit_part)} fit rounds (no hold-out)"
    elif unit == "prompt":
        where = (f"{len(held_out)} rounds of {count_prompts(held_out)} held-out prompts "
                 f"(fit on {len(fit_part)} of {count_prompts(fit_part)})")
    else:
        where = f"{len(held_out)} held-out rounds (fit on {len(fit_part)})"

    args.out.parent.mkdir(parents=True, exist_ok=True)
    sts.save(args.out)
    StsCalibration.load(args.out)  # what we wrote must read back
    written = [str(args.out)]
    if estimator is not None:
        estimator.save(args.estimator)
        written.append(str(args.estimator))
    report = {"records": [str(p) for p in args.records], "rounds": len(records), "gamma": gamma,
              "fit_rounds": len(fit_part), "held_out_rounds": len(held_out),
              "fit_prompts": count_prompts(fit_part), "held_out_prompts": count_prompts(held_out),
              "holdout_fraction": args.holdout_fraction, "holdout_unit": unit, "split_seed": args.seed,
              "temperatures": sts.temperatures, "held_out": rows}
    report_path = args.out.with_name(args.out.stem + ".report.json")
    report_path.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False), encoding="utf-8")
    written.append(str(report_path))
    if not args.no_plot:
        from .plots import plot_reliability

        png = args.plot or args.out.with_suffix(".png")
        labels = prefix_labels(held_out.num_accepted, gamma)
        observed = observed_mask(held_out.verify_lens, len(held_out), gamma)
        before = torch.sigmoid(held_out.conf_logits.double()).nan_to_num(0.0).cumprod(-1)
        after = apply_sts(held_logits, sts.temperatures).double().cumprod(-1)
        plot_reliability(before, after, labels, observed, png,
                         title=f"{dataset}: reliability on {where}",
                         after_label="est+STS" if estimator is not None else "STS")
        written.append(str(png))

    print_report(rows, gamma, where)
    print("STS temperatures: " + ", ".join(f"{t:.3g}" for t in sts.temperatures))
    print("wrote " + ", ".join(written))
    return 0


def main(argv=None) -> int:
    return run(PROG, main_inner, argv)


if __name__ == "__main__":
    sys.exit(main())
