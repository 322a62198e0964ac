"""dspark-simulate: predicted per-user speedup at matched throughput on any steps/s curve.

Replays a drafter's recorded rounds (``dspark-eval`` records) through the real verify-length
schedulers on a steps/s curve — profiled by ``dspark-profile`` (SGLang SPS JSON), or a built-in
GPU curve — under closed-loop or Poisson load, and reports the same curves and matched-throughput
speedups as ``dspark-bench`` (benchmarks/sim_engine.py explains the model).

    dspark-simulate run --sps builtin:h100-qwen3-8b-roofline --eval-dir eval-out \\
        --scheduler none --scheduler fixed:3 --scheduler fixed:7 --scheduler lagged \\
        --concurrency 1,4,16,64,128,256 --output-len 256 --out sim-out
    dspark-simulate run --sps sps.json --acceptance 0.9,0.8,0.7,0.6,0.5,0.4,0.3 ...
    dspark-simulate run --sps builtin:h100-qwen3-8b-roofline --acceptance 0.8,0.6,0.4 \
        --worker-overhead examples/bench/round-cost/s3-few-rows-gemm/results.json
    dspark-simulate validate --bench bench-out/bench.json --sps sps.json --eval-dir eval-out
    dspark-simulate curves        # list the built-in curves

Validation simulates each measured configuration at the measured concurrencies, with the measured
output and prompt lengths, and reports the prediction error of aggregate throughput, per-user speed
and matched speedup.

Every run first prints where each cost curve came from (steps/s curve, the schedulers' table, draft
cost, worker overhead: measured, derived, or typed in) and stores it in the result's
engine.provenance (benchmarks/cost_provenance.py).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dspark_sglang.benchmarks import report
from dspark_sglang.benchmarks.cost_provenance import cost_model_provenance, format_provenance
from dspark_sglang.benchmarks.curves import Curve, MatchedSpeedup
from dspark_sglang.benchmarks.metrics import summarize_level
from dspark_sglang.benchmarks.sim_engine import RoundPool, SchedulerSpec, SimSetup, parse_scheduler_spec, simulate_level
from dspark_sglang.benchmarks.sps_curves import builtin_table, describe_builtins
from dspark_sglang.benchmarks.worker_overhead import WorkerOverhead
from dspark_sglang.confidence import CalibrationRecords, StsCalibration
from dspark_sglang.cost_table import load_cost_table

DEFAULT_SCHEDULERS = ("none", "fixed:3", "verify-all", "lagged")
_RECORDS_NAME = re.compile(r"^records_(?P<drafter>.+)_T(?P<temp>[^_]+)_(?P<set>[^_]+)$")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine model")
    g.add_argument("--sps", required=True, help="steps/s curve: an SGLang SPS JSON (plain or additive) or "
                   "builtin:NAME (see `dspark-simulate curves`)")
    g.add_argument("--sps-interpolation", choices=["step", "linear"], default="linear",
                   help="lookup between probes of a plain SPS table (step: SGLang's floor rule)")
    g.add_argument("--scheduler-cost-table", default=None,
                   help="the table the schedulers believe (default: --sps; in validate, a configuration's "
                        "DSPARK_COST_TABLE when that file exists); to study a mis-profiled table")
    g.add_argument("--scheduler-interpolation", choices=["step", "linear"], default="step",
                   help="how the schedulers read their table (step: what the worker and SGLang do)")
    g.add_argument("--draft-ms", type=float, default=0.0, help="drafter cost per speculative round, ms")
    g.add_argument("--draft-ms-per-req", type=float, default=0.0, help="drafter cost per request per round, ms")
    g.add_argument("--worker-overhead", default=None, metavar="FILE",
                   help="a round-cost results.json (python -m dspark_sglang.benchmarks.round_cost): every decode "
                        "round of a speculative configuration also pays the worker's own host time around its "
                        "two forwards (acceptance, commit, bookkeeping: round - verify - draft, the median over "
                        "windows >= 2 per point), fitted as a + b*requests + c*context tokens over the file's "
                        "points. Without it that time is free, which flatters speculation. The overhead was "
                        "measured on the file's machine, not on the --sps curve's")
    g.add_argument("--draft-from-round-cost", action="store_true",
                   help="take the draft cost (a + b*requests) from the --worker-overhead file's measured draft "
                        "steps instead of --draft-ms/--draft-ms-per-req")
    g.add_argument("--scheduler-ignores-draft-cost", action="store_true",
                   help="the lagged scheduler prices target steps only (the paper's objective; the worker "
                        "with DSPARK_DRAFT_COST=none); by default it weighs the draft cost above, as the "
                        "worker does with its measured draft times")
    g.add_argument("--prompt-len", type=int, default=0, help="prefill tokens per request (0: free prefill)")
    g.add_argument("--max-running", type=int, default=4096, help="most requests decoding at once")
    g = p.add_argument_group("drafter rounds")
    g.add_argument("--records", nargs="*", default=[], help="calibration records files (.safetensors/.npz), "
                   "one pool (prompt set) each")
    g.add_argument("--eval-dir", default=None, help="a dspark-eval output directory: its records_*.safetensors")
    g.add_argument("--drafter", default=None, help="with --eval-dir: only this drafter's records")
    g.add_argument("--temperature", default=None, help="with --eval-dir: only records at this temperature (e.g. 0)")
    g.add_argument("--acceptance", type=_float_list, default=None,
                   help="no records: a synthetic pool with these per-position conditional acceptances "
                        "(confidence = acceptance, identical every round)")
    g.add_argument("--sts", default=None, help="STS temperatures JSON applied to the recorded logits")
    g.add_argument("--replay", choices=["sequential", "iid"], default="sequential")
    g.add_argument("--seed", type=int, default=0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dspark-simulate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="simulate a sweep and report matched-throughput speedups",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_engine_args(run)
    g = run.add_argument_group("load and schedulers")
    g.add_argument("--scheduler", action="append", default=None,
                   help="[NAME=]KIND[:OPTS], repeatable; KIND none|fixed|verify-all|lagged|algorithm1 "
                        f"(default: {' '.join(DEFAULT_SCHEDULERS)})")
    load = g.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, default=None, help="closed-loop users (default 1,2,4,...,256)")
    load.add_argument("--rates", type=_float_list, default=None, help="Poisson arrival rates, requests/s")
    g.add_argument("--repeats", type=int, default=3, help="seeds per level (error bars)")
    g.add_argument("--requests-per-client", type=int, default=8)
    g.add_argument("--min-requests", type=int, default=64)
    g.add_argument("--max-requests", type=int, default=4096)
    g.add_argument("--max-seconds", type=float, default=math.inf, help="simulated seconds per level")
    g.add_argument("--output-len", type=int, default=256, help="tokens per request")
    g = run.add_argument_group("output")
    g.add_argument("--baseline", default=None, help="default: the first scheduler")
    g.add_argument("--points", type=int, default=5)
    g.add_argument("--out", default="sim-out")
    g.add_argument("--no-progress", action="store_true")

    val = sub.add_parser("validate", help="predict a dspark-bench run and report the error",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    val.add_argument("--bench", required=True, help="dspark-bench bench.json")
    _add_engine_args(val)
    val.add_argument("--map", action="append", default=[], metavar="CONFIG=SPEC",
                     help="scheduler for a measured configuration, e.g. server=lagged (default: from its env)")
    val.add_argument("--repeats", type=int, default=3)
    val.add_argument("--points", type=int, default=5)
    val.add_argument("--out", default="validate-out")

    sub.add_parser("curves", help="list the built-in steps/s curves")
    args = parser.parse_args(argv)
    if args.command in ("run", "validate") and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Inputs


def load_sps(spec: str, interpolation: str):
    if spec.startswith("builtin:"):
        return builtin_table(spec.split(":", 1)[1])
    return load_cost_table(spec, interpolation=interpolation)


def synthetic_pool(conditional: Sequence[float], rounds: int = 4096, seed: int = 0) -> RoundPool:
    """Rounds whose confidence is the per-position conditional acceptance, with acceptance drawn
    from it: well calibrated on average, but every round looks alike to the scheduler."""
    cond = torch.tensor([min(max(float(c), 1e-6), 1 - 1e-6) for c in conditional], dtype=torch.float64)
    gamma = cond.numel()
    rng = np.random.default_rng(seed)
    passes = rng.random((rounds, gamma)) < cond.numpy()[None, :]
    accepted = np.where(passes.all(1), gamma, np.argmin(passes, axis=1))
    logits = torch.log(cond) - torch.log1p(-cond)
    records = CalibrationRecords(logits.float().expand(rounds, gamma).clone(), torch.from_numpy(accepted),
                                 torch.full((rounds,), gamma, dtype=torch.int64))
    return RoundPool("synthetic", records)


def eval_record_files(eval_dir: str, drafter: Optional[str], temperature: Optional[str]) -> list[Path]:
    files = []
    for path in sorted(Path(eval_dir).glob("records_*.safetensors")):
        m = _RECORDS_NAME.match(path.stem)
        if m is None:
            continue
        if drafter is not None and m["drafter"] != drafter:
            continue
        if temperature is not None and float(m["temp"]) != float(temperature):
            continue
        files.append(path)
    if not files:
        raise ValueError(f"{eval_dir}: no records_*.safetensors match drafter={drafter} temperature={temperature}")
    drafters = {_RECORDS_NAME.match(p.stem)["drafter"] for p in files}
    temps = {_RECORDS_NAME.match(p.stem)["temp"] for p in files}
    if len(drafters) > 1 or len(temps) > 1:
        raise ValueError(f"{eval_dir}: records of several drafters {sorted(drafters)} / temperatures {sorted(temps)}; "
                         "choose with --drafter and --temperature")
    return files


def load_pools(args) -> list[RoundPool]:
    temps = StsCalibration.load(args.sts).temperatures if args.sts else None
    paths = [Path(p) for p in args.records]
    if args.eval_dir:
        paths += eval_record_files(args.eval_dir, args.drafter, args.temperature)
    if args.acceptance is not None:
        if paths:
            raise ValueError("give recorded rounds (--records/--eval-dir) or --acceptance, not both")
        return [synthetic_pool(args.acceptance, seed=args.seed)]
    if not paths:
        raise ValueError("no drafter rounds: pass --records, --eval-dir or --acceptance")
    pools = []
    for path in paths:
        m = _RECORDS_NAME.match(path.stem)
        pools.append(RoundPool(m["set"] if m else path.stem, CalibrationRecords.load(path), temps))
    return pools


def load_worker_overhead(args) -> Optional[WorkerOverhead]:
    """The --worker-overhead fit (None when not given), checked against --draft-from-round-cost."""
    if getattr(args, "draft_from_round_cost", False):
        if not args.worker_overhead:
            raise ValueError("--draft-from-round-cost needs --worker-overhead FILE (the round-cost results.json)")
        if args.draft_ms or args.draft_ms_per_req:
            raise ValueError("give --draft-ms/--draft-ms-per-req or --draft-from-round-cost, not both")
    return WorkerOverhead.from_round_cost(args.worker_overhead) if getattr(args, "worker_overhead", None) else None


def effective_draft_ms(args, overhead: Optional[WorkerOverhead]) -> tuple[float, float]:
    """The draft cost the simulated engine pays: (ms per round, ms per request per round)."""
    if getattr(args, "draft_from_round_cost", False) and overhead is not None:
        return overhead.draft_base_ms, overhead.draft_per_req_ms
    return args.draft_ms, args.draft_ms_per_req


def make_setup(args, pools: list[RoundPool], output_len, prompt_len: int, scheduler_table: Optional[str] = None,
               overhead: Optional[WorkerOverhead] = None) -> SimSetup:
    sps = load_sps(args.sps, args.sps_interpolation)
    sched = load_sps(scheduler_table or args.scheduler_cost_table or args.sps, args.scheduler_interpolation)
    fixed_ms, per_req_ms = effective_draft_ms(args, overhead)
    return SimSetup(sps, pools, output_len=output_len, prompt_len=prompt_len, draft_seconds=fixed_ms / 1e3,
                    draft_seconds_per_req=per_req_ms / 1e3, max_running=args.max_running,
                    replay=args.replay, scheduler_cost_table=sched,
                    scheduler_sees_draft_cost=not getattr(args, "scheduler_ignores_draft_cost", False),
                    worker_overhead=overhead)


def provenance(args, overhead: Optional[WorkerOverhead], config_tables: Optional[dict] = None) -> dict:
    """Where every cost curve of this run came from (benchmarks/cost_provenance.py)."""
    return cost_model_provenance(args.sps, args.scheduler_cost_table, args.draft_ms, args.draft_ms_per_req,
                                 overhead, getattr(args, "draft_from_round_cost", False), config_tables)


def level_seed(seed: int, load: float, repeat: int) -> int:
    """The same for every scheduler at one (load, repeat): common random numbers."""
    return int(np.random.SeedSequence([seed, int(round(load * 1000)), repeat]).generate_state(1)[0])


def sweep(setup: SimSetup, specs: Sequence[SchedulerSpec], loads: Sequence[float], *, kind: str, repeats: int,
          requests_for, max_seconds: float, seed: int, doc: dict, progress=None) -> dict:
    """Simulate every scheduler at every load, ``repeats`` seeds each, into ``doc['configs']``."""
    for spec in specs:
        entry = {"name": spec.name, "scheduler": spec.to_dict(), "speculative": spec.speculative, "levels": []}
        doc["configs"].append(entry)
        for load in loads:
            level = {"load": load, "repeats": []}
            entry["levels"].append(level)
            for rep in range(repeats):
                n = requests_for(load)
                kwargs = {"concurrency": int(load)} if kind == "concurrency" else {"rate": float(load)}
                records = simulate_level(setup, spec, seed=level_seed(seed, load, rep), max_requests=n,
                                         max_seconds=max_seconds, **kwargs)
                summary = summarize_level(records).to_dict()
                summary["repeat"] = rep
                level["repeats"].append(summary)
                if progress is not None:
                    progress()
    return doc


def _progress_fn(total: int, disabled: bool):
    if disabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="simulating", unit="level", leave=False)
    return bar, bar.update


def cmd_run(args) -> dict:
    overhead = load_worker_overhead(args)
    pools = load_pools(args)
    setup = make_setup(args, pools, args.output_len, args.prompt_len, overhead=overhead)
    prov = provenance(args, overhead)
    print(format_provenance(prov), flush=True)
    specs = [parse_scheduler_spec(s) for s in (args.scheduler or DEFAULT_SCHEDULERS)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"scheduler names must be unique, got {names}; name them NAME=KIND")
    kind = "rate" if args.rates else "concurrency"
    loads = args.rates or args.concurrency or [1, 2, 4, 8, 16, 32, 64, 128, 256]

    def requests_for(load):
        c = int(load) if kind == "concurrency" else max(1, int(load))
        return max(1, min(args.max_requests, max(args.min_requests, args.requests_per_client * c)))

    doc = report.new_document("dspark-simulate", kind, _jsonable(vars(args)), args.baseline or specs[0].name)
    doc["engine"] = engine_description(args, setup, prov)
    bar, tick = _progress_fn(len(specs) * len(loads) * args.repeats, args.no_progress or not sys.stderr.isatty())
    try:
        sweep(setup, specs, loads, kind=kind, repeats=args.repeats, requests_for=requests_for,
              max_seconds=args.max_seconds, seed=args.seed, doc=doc, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    return finish(doc, Path(args.out), "simulate", args.points)


def engine_description(args, setup: SimSetup, prov: dict) -> dict:
    overhead = setup.worker_overhead
    return {"sps": args.sps, "gamma": setup.gamma, "pools": [
        {"name": p.name, "rounds": len(p), "tau_verify_all": p.tau_verify_all,
         "conditional_acceptance": [round(float(v), 4) for v in p.conditional]} for p in setup.pools],
        "draft_ms": setup.draft_seconds * 1e3, "draft_ms_per_req": setup.draft_seconds_per_req * 1e3,
        "replay": args.replay, "scheduler_sees_draft_cost": not args.scheduler_ignores_draft_cost,
        "worker_overhead": None if overhead is None else overhead.to_dict(), "provenance": prov}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def finish(doc: dict, out_dir: Path, stem: str, points: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    report.analyze(doc, points)
    json_path = report.write_document(doc, out_dir / f"{stem}.json")
    png_path = report.plot_document(doc, out_dir / f"{stem}.png")
    report.print_report(doc)
    print(f"wrote {json_path} and {png_path}")
    return doc


# ------------------------------------------------------------------------------------------------
# Validation against a measured run


def spec_for_config(cfg: dict, mapping: dict[str, str]) -> SchedulerSpec:
    """The scheduler a measured configuration ran, from --map or its launch args and env."""
    if cfg["name"] in mapping:
        spec = parse_scheduler_spec(mapping[cfg["name"]])
        return SchedulerSpec(cfg["name"], spec.kind, spec.opts)
    if not cfg.get("speculative"):
        return SchedulerSpec(cfg["name"], "none")
    env = cfg.get("env") or {}
    kind = env.get("DSPARK_SCHEDULER", "lagged").strip().lower()
    opts: dict = {}
    if kind == "fixed":
        opts["verify_len"] = int(env["DSPARK_FIXED_LEN"])
    if kind == "lagged" and env.get("DSPARK_LAG"):
        opts["lag"] = int(env["DSPARK_LAG"])
    return SchedulerSpec(cfg["name"], kind, tuple(sorted(opts.items())))


def _measured_lengths(cfg: dict) -> tuple[list[int], int]:
    outs, prompts = [], []
    for lvl in cfg["levels"]:
        for rep in lvl["repeats"]:
            for r in rep.get("requests", []):
                if r.get("error") is None and r.get("output_tokens"):
                    outs.append(int(r["output_tokens"]))
                    if r.get("prompt_tokens"):
                        prompts.append(int(r["prompt_tokens"]))
    if not outs:
        raise ValueError(f"configuration {cfg['name']!r}: no successful requests to take output lengths from")
    return outs, int(round(sum(prompts) / len(prompts))) if prompts else 0


def _rel(pred, meas) -> Optional[float]:
    if pred is None or meas is None or not meas:
        return None
    return (pred - meas) / meas


def cmd_validate(args) -> dict:
    measured = report.read_document(args.bench)
    if measured["tool"] != "dspark-bench" or measured["load_kind"] != "concurrency":
        raise ValueError(f"{args.bench}: expected a closed-loop dspark-bench results file")
    if not measured.get("curves"):
        report.analyze(measured, args.points)
    mapping = dict(item.split("=", 1) for item in args.map)
    overhead = load_worker_overhead(args)
    pools = load_pools(args)
    config_tables = {}
    for cfg in measured["configs"]:
        table = (cfg.get("env") or {}).get("DSPARK_COST_TABLE")
        if table and Path(table).is_file() and not args.scheduler_cost_table:
            config_tables[cfg["name"]] = table
    prov = provenance(args, overhead, config_tables)
    print(format_provenance(prov), flush=True)
    doc = report.new_document("dspark-simulate", "concurrency", _jsonable(vars(args)), measured.get("baseline"))
    for cfg in measured["configs"]:
        spec = spec_for_config(cfg, mapping)
        outs, prompt_len = _measured_lengths(cfg)
        setup = make_setup(args, pools, outs, args.prompt_len or prompt_len,
                           scheduler_table=config_tables.get(cfg["name"]), overhead=overhead)
        counts = {lvl["load"]: max(r["num_requests"] for r in lvl["repeats"]) for lvl in cfg["levels"]}
        sweep(setup, [spec], list(counts), kind="concurrency", repeats=args.repeats,
              requests_for=lambda load: counts[load], max_seconds=math.inf, seed=args.seed, doc=doc)
    doc["engine"] = engine_description(args, setup, prov)
    report.analyze(doc, args.points)
    doc["validation"] = compare(measured, doc)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_document(doc, out_dir / "validate.json")
    plot_validation(measured, doc, out_dir / "validate.png")
    print_validation(doc["validation"])
    print(f"wrote {out_dir / 'validate.json'} and {out_dir / 'validate.png'}")
    return doc


def compare(measured: dict, predicted: dict) -> dict:
    mcurves = {c["name"]: Curve.from_dict(c) for c in measured["curves"]}
    pcurves = {c["name"]: Curve.from_dict(c) for c in predicted["curves"]}
    rows, per_config = [], {}
    for name, mc in mcurves.items():
        pc = pcurves.get(name)
        if pc is None:
            continue
        ppoints = {p.load: p for p in pc.points}
        errs_x, errs_y = [], []
        for mp in mc.points:
            pp = ppoints.get(mp.load)
            if pp is None:
                continue
            ex, ey = _rel(pp.throughput, mp.throughput), _rel(pp.per_user, mp.per_user)
            rows.append({"config": name, "load": mp.load, "measured_throughput": mp.throughput,
                         "predicted_throughput": pp.throughput, "throughput_error": ex,
                         "measured_per_user": mp.per_user, "predicted_per_user": pp.per_user, "per_user_error": ey})
            errs_x += [abs(ex)] if ex is not None else []
            errs_y += [abs(ey)] if ey is not None else []
        per_config[name] = {"throughput_mape": _avg(errs_x), "per_user_mape": _avg(errs_y)}
    speedups = []
    base = measured.get("baseline")
    for m in (MatchedSpeedup.from_dict(d) for d in measured["matched"]):
        if not m.overlaps or base not in pcurves or m.config not in pcurves:
            continue
        for p in m.points:
            yb, yc = pcurves[base].speed_at(p.throughput), pcurves[m.config].speed_at(p.throughput)
            pred = yc / yb if yb and yc is not None else None
            speedups.append({"config": m.config, "throughput": p.throughput, "measured_speedup": p.speedup,
                             "predicted_speedup": pred, "error": _rel(pred, p.speedup)})
    all_x = [abs(r["throughput_error"]) for r in rows if r["throughput_error"] is not None]
    all_y = [abs(r["per_user_error"]) for r in rows if r["per_user_error"] is not None]
    all_s = [abs(s["error"]) for s in speedups if s["error"] is not None]
    return {"points": rows, "per_config": per_config, "speedups": speedups,
            "throughput_mape": _avg(all_x), "per_user_mape": _avg(all_y), "speedup_mape": _avg(all_s)}


def _avg(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def print_validation(v: dict) -> None:
    from rich.table import Table

    table = Table(title="Simulator vs measurement (relative error = predicted/measured − 1)")
    for col in ("config", "concurrency", "agg meas", "agg pred", "err", "per-user meas", "per-user pred", "err"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in v["points"]:
        table.add_row(r["config"], f"{r['load']:g}", f"{r['measured_throughput']:.1f}", f"{r['predicted_throughput']:.1f}",
                      _pct(r["throughput_error"]), f"{r['measured_per_user']:.1f}", f"{r['predicted_per_user']:.1f}",
                      _pct(r["per_user_error"]))
    console = report.make_console()
    console.print(table)
    if v["speedups"]:
        t2 = Table(title="Matched-throughput speedup: measured vs predicted")
        for col in ("config", "throughput", "measured", "predicted", "err"):
            t2.add_column(col, justify="left" if col == "config" else "right")
        for s in v["speedups"]:
            t2.add_row(s["config"], f"{s['throughput']:.1f}", f"{s['measured_speedup']:.3f}",
                       "–" if s["predicted_speedup"] is None else f"{s['predicted_speedup']:.3f}", _pct(s["error"]))
        console.print(t2)
    console.print(f"mean |error|: throughput {_pct(v['throughput_mape'])}, per-user {_pct(v['per_user_mape'])}, "
                  f"matched speedup {_pct(v['speedup_mape'])}")


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:+.1f}%"


def plot_validation(measured: dict, predicted: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    pcurves = {c["name"]: Curve.from_dict(c) for c in predicted["curves"]}
    for c in (Curve.from_dict(d) for d in measured["curves"]):
        line = ax.errorbar([p.throughput for p in c.points], [p.per_user for p in c.points],
                           xerr=[p.throughput_std for p in c.points], yerr=[p.per_user_std for p in c.points],
                           marker="o", capsize=3, label=f"{c.name} measured")
        if c.name in pcurves:
            pc = pcurves[c.name]
            ax.plot([p.throughput for p in pc.points], [p.per_user for p in pc.points], ls="--", marker="x",
                    color=line[0].get_color(), label=f"{c.name} predicted")
    ax.set_xlabel("aggregate output throughput (tok/s)")
    ax.set_ylabel("per-user decode speed (tok/s)")
    ax.set_title("dspark-simulate validation: measured (solid) vs predicted (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "curves":
            print("built-in steps/s curves (--sps builtin:NAME):")
            print(describe_builtins())
        elif args.command == "run":
            cmd_run(args)
        else:
            cmd_validate(args)
    except (ValueError, OSError) as exc:
        print(f"dspark-simulate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
