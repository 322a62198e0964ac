"""dspark-profile: measure the target's throughput curve and write SGLang's SPS cost table.

Drives the real target through verify-shaped steps — B batch tokens as requests × new tokens each,
a causal extend over a committed context of `--context-len` tokens — across a sweep of B, with
warm-up, repeats and medians (sweep.py), then writes:

- OUT (default sps.json): SGLang 0.5.23's SPS table `{sample_batch_tokens, sample_steps_per_sec,
  max_batch_tokens}` (`--speculative-dspark-sps-table-path`, our scheduler's cost table);
- OUT.samples.json: every repeat, the flat-then-linear fit and the run's metadata (load average
  before and after: other processes on the machine distort the curve);
- OUT.png: step time and throughput with repeat spread, the fit and its knee.

Backends: `sglang` (default) times EXTEND batches on SGLang's own ModelRunner in this process
(dspark_sglang/sglang/profile_backend.py); `transformers` times the HF model with a KV cache.

    dspark-profile --out sps.json                                  # bundled SmolLM2-135M, CPU
    dspark-profile --max-tokens 256 --repeats 9 --device cuda --model /models/Qwen3-8B
    dspark-profile --compare old.json                              # profile, then compare
    dspark-profile --compare a.json b.json --tolerance 0.1         # compare two files only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ._cli import UsageError, run
from .sweep import Profile, compare_tables, host_meta, run_sweep, shape_for, staircase

PROG = "dspark-profile"


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("batch tokens must be integers >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\nRun with OMP_NUM_THREADS set (1 on a "
               "shared CPU) and as little else running as possible; the load average is recorded "
               "next to the table.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("target")
    g.add_argument("--model", help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--backend", choices=["sglang", "transformers"], default="sglang",
                   help="sglang: SGLang's ModelRunner in-process; transformers: HF model with KV "
                        "cache (default: %(default)s)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="default: %(default)s")
    g.add_argument("--attention-backend", default=None,
                   help="sglang backend only: SGLang --attention-backend (default: torch_native on "
                        "CPU, SGLang's choice on GPU)")
    g.add_argument("--last-logits-only", action="store_true",
                   help="sglang backend only: skip the all-position logits a verify needs "
                        "(times a plain extend)")
    g.add_argument("--no-plugins", action="store_true",
                   help="sglang backend only: do not run SGLang's load_plugins() (which installs "
                        "this package's engine patches, as in a served engine)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: leave as set by OMP_NUM_THREADS)")
    s = p.add_argument_group("sweep")
    s.add_argument("--batch-tokens", type=_int_list, default=None, metavar="B1,B2,...",
                   help="probe batch-token counts (default: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... — "
                        "powers of two and their 1.5x — from --min-tokens to --max-tokens)")
    s.add_argument("--min-tokens", type=int, default=1, help="default: %(default)s")
    s.add_argument("--max-tokens", type=int, default=64, help="default: %(default)s")
    s.add_argument("--width", type=int, default=8,
                   help="most new tokens per request in a step (verify width, γ+1); B tokens run as "
                        "B/n requests of width n, n the largest divisor of B <= this; 1 = decode-"
                        "shaped (default: %(default)s)")
    s.add_argument("--context-len", type=int, default=256,
                   help="committed tokens per request before each step (default: %(default)s)")
    s.add_argument("--warmup", type=int, default=2, help="discarded steps per probe (default: %(default)s)")
    s.add_argument("--repeats", type=int, default=7, help="timed steps per probe (default: %(default)s)")
    s.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="which step time goes into the table: wall clock, or the stepping thread's "
                        "CPU time (CPU device with one torch thread only: the step's cost without "
                        "time lost to other processes on a shared machine); auto = cpu there, wall "
                        "otherwise (default: %(default)s). Both are kept in OUT.samples.json")
    s.add_argument("--seed", type=int, default=0, help="random tokens and visiting order (default: %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("sps.json"), help="SPS table path (default: %(default)s)")
    o.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT with .png)")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--max-batch-tokens", type=int, default=None,
                   help="the table's max_batch_tokens (default: the largest probe)")
    o.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                   help="one file: profile, then compare the new table with it; two files: only "
                        "compare them (the first is the reference)")
    o.add_argument("--tolerance", type=float, default=0.10,
                   help="with --compare: exit 1 if the largest relative steps/s difference exceeds "
                        "this (default: %(default)s)")
    o.add_argument("--compare-on", choices=["steps", "shape"], default="steps",
                   help="with --compare: apply the tolerance to the steps/s themselves, or to the "
                        "curve's shape after scaling the second by the median ratio (a uniformly "
                        "faster or slower machine; the budget's argmax ignores that scale, the "
                        "decision to draft against a measured draft time does not) (default: %(default)s)")
    o.add_argument("--quiet", action="store_true", help="no progress bar or table")
    return p


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _default_model() -> str:
    from dspark_sglang._wheels import MissingWheelError
    from dspark_sglang.models import ensure_target

    try:
        return str(ensure_target())
    except (MissingWheelError, ValueError) as exc:
        raise UsageError(f"the bundled target is not available ({exc}); pass --model") from None


def make_runner(args, max_requests: int, max_width: int):
    """The step function's owner for the chosen backend."""
    model = args.model
    if not Path(model).is_dir():
        raise UsageError(f"--model {model}: not a directory")
    if args.backend == "sglang":
        from dspark_sglang.sglang.profile_backend import SglangStepRunner

        return SglangStepRunner(model, context_len=args.context_len, max_requests=max_requests,
                                max_width=max_width, dtype=args.dtype, device=args.device,
                                attention_backend=args.attention_backend,
                                all_logits=not args.last_logits_only,
                                load_plugins=not args.no_plugins, seed=args.seed)
    import torch

    from .hf_backend import HFStepRunner

    return HFStepRunner.from_pretrained(model, dtype=getattr(torch, args.dtype), device=args.device,
                                        context_len=args.context_len, max_requests=max_requests,
                                        seed=args.seed)


def profile(args) -> Profile:
    import torch
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    single_cpu_thread = args.device == "cpu" and torch.get_num_threads() == 1
    if args.clock == "cpu" and not single_cpu_thread:
        raise UsageError("--clock cpu needs --device cpu and one torch thread (OMP_NUM_THREADS=1 or "
                         f"--threads 1; now {args.device}, {torch.get_num_threads()} threads)")
    clock = args.clock if args.clock != "auto" else ("cpu" if single_cpu_thread else "wall")
    tokens = args.batch_tokens or staircase(args.min_tokens, args.max_tokens)
    shapes = [shape_for(b, args.width) for b in tokens]
    meta = {"backend": args.backend, "model": args.model, "device": args.device, "dtype": args.dtype,
            "context_len": args.context_len, "width": args.width, "warmup": args.warmup,
            "repeats": args.repeats, "seed": args.seed, "torch_threads": torch.get_num_threads(),
            "clock": clock, "sglang_plugins_loaded": args.backend == "sglang" and not args.no_plugins,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host_before": host_meta()}
    start = time.perf_counter()
    runner = make_runner(args, max(s.num_reqs for s in shapes), max(s.width for s in shapes))
    meta["runner"] = runner.describe()
    meta["load_seconds"] = round(time.perf_counter() - start, 2)
    total = len(shapes) * (args.warmup + args.repeats)
    with tqdm(total=total, desc="profiling", unit="step", disable=args.quiet, file=sys.stderr) as bar:
        probes = run_sweep(runner.step, shapes, warmup=args.warmup, repeats=args.repeats,
                           seed=args.seed, clock=clock, progress=bar.update)
    runner.close()
    meta["host_after"] = host_meta()
    meta["sweep_seconds"] = round(time.perf_counter() - start - meta["load_seconds"], 2)
    return Profile.from_probes(probes, meta, max_batch_tokens=args.max_batch_tokens)


def print_profile(prof: Profile) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{prof.meta['runner']}, context {prof.meta['context_len']}, "
                        f"median of {prof.meta['repeats']} ({prof.meta['clock']} clock)")
    for col in ("batch tokens", "reqs × width", "median ms", "min–max ms", "steps/s", "tokens/s",
                "preempted"):
        table.add_column(col, justify="right")
    for p in sorted(prof.probes, key=lambda q: q.shape.batch_tokens):
        m = p.median_seconds
        table.add_row(str(p.shape.batch_tokens), f"{p.shape.num_reqs} × {p.shape.width}",
                      f"{1e3 * m:.1f}", f"{1e3 * min(p.seconds):.1f}–{1e3 * max(p.seconds):.1f}",
                      f"{1 / m:.2f}", f"{p.shape.batch_tokens / m:.0f}",
                      f"{100 * p.preempted_fraction:.0f}%")
    console = Console()
    console.width = max(console.width, 100)
    console.print(table)
    if prof.fit is not None:
        f = prof.fit
        console.print(f"flat-then-linear fit: knee {f.knee} batch tokens, flat {1e3 * f.flat_seconds:.1f} "
                      f"ms/step, slope {1e3 * f.slope_seconds_per_token:.2f} ms per token past the knee")
    before, after = prof.meta["host_before"]["loadavg"], prof.meta["host_after"]["loadavg"]
    console.print(f"load average (1/5/15 min) before {before}, after {after}")


def report_compare(result: dict, tolerance: float, on: str = "steps") -> int:
    print(f"compare {result['other']} against {result['reference']}: max relative steps/s "
          f"difference {100 * result['max_relative']:.1f}% at {result['at_batch_tokens']} batch "
          f"tokens (median {100 * result['median_relative']:.1f}%); level: the second runs "
          f"{result['level_ratio']:.3f}x the first's steps/s (median ratio), shape after that scale: "
          f"max {100 * result['max_shape_relative']:.1f}% at {result['shape_at_batch_tokens']} batch "
          f"tokens; tolerance {100 * tolerance:.0f}% on {on}")
    worst = result["max_relative"] if on == "steps" else result["max_shape_relative"]
    if worst > tolerance:
        print(f"{PROG}: profiles differ by more than the tolerance ({on})", file=sys.stderr)
        return 1
    return 0


def main_inner(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare and len(args.compare) > 2:
        parser.error("--compare takes one or two files")
    if args.compare and len(args.compare) == 2:
        return report_compare(compare_tables(*args.compare), args.tolerance, args.compare_on)
    if args.compare and args.compare[0].resolve() == args.out.resolve():
        parser.error("--compare: the reference is the --out file this run would overwrite")
    if args.compare:  # fail on a bad reference before spending minutes profiling
        compare_tables(args.compare[0], args.compare[0])
    for name in ("repeats", "width", "context_len", "min_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    args.device = _resolve_device(args.device)
    args.model = args.model or _default_model()

    prof = profile(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = prof.save(args.out)
    written = [str(args.out), str(sidecar)]
    if not args.no_plot:
        from .plots import plot_profile

        png = args.plot or args.out.with_suffix(".png")
        title = (f"{Path(args.model).name}: {prof.meta['runner']}, "
                 f"context {args.context_len}, width ≤ {args.width}, {prof.meta['clock']} clock")
        plot_profile(prof, png, title=title)
        written.append(str(png))
    if not args.quiet:
        print_profile(prof)
    print("wrote " + ", ".join(written))
    if args.compare:
        return report_compare(compare_tables(args.compare[0], args.out), args.tolerance, args.compare_on)
    return 0


def main(argv=None) -> int:
    return run(PROG, main_inner, argv)


if __name__ == "__main__":
    sys.exit(main())
