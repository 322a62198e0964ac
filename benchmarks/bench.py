"""dspark-bench: per-user speedup at matched aggregate throughput, measured on SGLang servers.

For each server configuration (no speculation, fixed verify length, confidence-scheduled), closed-
loop clients at a sweep of concurrency levels (with repeats) stream real prompt sets through the
server; each level yields an aggregate output throughput and a per-user decode speed
(benchmarks/metrics.py). The configurations' curves of per-user speed vs aggregate throughput are
then compared at matched throughput (benchmarks/curves.py): the speedup a user sees when both
deployments deliver the same total tokens/s. Expect about a tie with fixed-length speculation at
concurrency 1 and the confidence scheduler's gains toward saturation (peers-and-demand.md §5).

    dspark-bench run --url http://127.0.0.1:30000 --name no-spec --concurrency 1,2,4,8,16
    dspark-bench run --launch --drafter DIR --fixed-lens 3,7 --cost-table sps.json --out bench-out
    dspark-bench run --launch --configs configs.json --model-path MODEL
    dspark-bench report bench-out/bench.json other/bench.json --out merged

Outputs in --out: bench.json (every level and repeat, with uptime load averages), bench.png
(curves with repeat error bars; speedup vs throughput), server_<name>.log when launched, a rich
table and a one-line summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from dspark_sglang.benchmarks import report
from dspark_sglang.benchmarks.http_stream import Endpoint, Sampling, build_body, get_json, parse_url, send_streaming
from dspark_sglang.benchmarks.loadgen import run_closed_loop
from dspark_sglang.benchmarks.metrics import RequestRecord, summarize_level
from dspark_sglang.benchmarks.servers import (
    CPU_SERVER_ARGS, ManagedServer, ServerConfig, ServerError, cpu_environment, load_configs, preset_configs,
)
from dspark_sglang.jsonio import JSON_PARSE_ERRORS

DEFAULT_SETS = "gsm8k,humaneval,mtbench"
_SERVER_INFO_KEYS = ("version", "speculative_algorithm", "speculative_draft_model_path", "dtype", "device",
                     "attention_backend", "max_total_tokens", "max_running_requests", "disable_radix_cache")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dspark-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="benchmark one running server or launch a list of configurations",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = run.add_argument_group("server")
    mode = target.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="a running server (loopback unless --allow-remote)")
    mode.add_argument("--launch", action="store_true",
                      help="start and stop each configuration on 127.0.0.1 (python -m sglang.launch_server)")
    target.add_argument("--name", default="server", help="configuration name for --url")
    target.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    target.add_argument("--model-path", default=None, help="target model for --launch (default: the bundled "
                        "SmolLM2-135M-Instruct via dspark_sglang.models.ensure_target)")
    target.add_argument("--configs", default=None, help="JSON list of {name, args, env} configurations (--launch)")
    target.add_argument("--drafter", default=None, help="preset: drafter directory for the DSPARK configurations")
    target.add_argument("--fixed-lens", type=_int_list, default=[], help="preset: fixed verify lengths, e.g. 3,7")
    target.add_argument("--cost-table", default=None, help="preset: SPS cost table for the lagged (confidence) configuration")
    target.add_argument("--sts", default=None, help="preset: STS temperatures JSON for the DSPARK configurations")
    target.add_argument("--server-args", default="", help="extra launch_server arguments for every configuration")
    target.add_argument("--cpu", choices=["auto", "yes", "no"], default="auto",
                        help="CPU engine environment and flags (" + " ".join(CPU_SERVER_ARGS) + ")")
    target.add_argument("--health-timeout", type=float, default=900.0, help="seconds to wait for /health")
    target.add_argument("--interleave", action="store_true",
                        help="--launch: run repeat r of every configuration before repeat r+1 (restarts servers; "
                             "spreads machine-load drift over configurations)")

    load = run.add_argument_group("load")
    load.add_argument("--api", choices=["generate", "chat", "completions"], default="generate")
    load.add_argument("--sets", default=DEFAULT_SETS, help="prompt sets (dspark_sglang.prompts), interleaved")
    load.add_argument("--num-prompts", type=int, default=32, help="prompts per set")
    load.add_argument("--prompts-file", default=None, help="JSONL of {id, messages} to use instead of --sets")
    load.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8, 16], help="closed-loop client counts")
    load.add_argument("--repeats", type=int, default=2, help="repeats of the whole sweep (error bars)")
    load.add_argument("--requests-per-client", type=int, default=4, help="requests per level = this x concurrency ...")
    load.add_argument("--min-requests", type=int, default=8, help="... but at least this many ...")
    load.add_argument("--max-requests", type=int, default=512, help="... and at most this many")
    load.add_argument("--max-seconds", type=float, default=300.0, help="stop issuing requests after this long per level")
    load.add_argument("--request-timeout", type=float, default=300.0, help="socket timeout per request")
    load.add_argument("--warmup", type=int, default=2, help="unrecorded requests per configuration before the sweep")
    load.add_argument("--max-new-tokens", type=int, default=64)
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--top-p", type=float, default=1.0)
    load.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    load.add_argument("--tokenizer", default=None, help="chat template source for generate/completions "
                      "(default: the server's tokenizer_path)")

    out = run.add_argument_group("output")
    out.add_argument("--out", default="bench-out", help="output directory")
    out.add_argument("--baseline", default=None, help="configuration the others are compared with (default: the first)")
    out.add_argument("--points", type=int, default=5, help="matched throughputs reported per comparison")
    out.add_argument("--save-timelines", action="store_true", help="store every request's chunk times in bench.json")
    out.add_argument("--no-progress", action="store_true")

    rep = sub.add_parser("report", help="merge bench.json files and recompute curves, speedups, plots",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rep.add_argument("files", nargs="+", help="bench.json files (configurations are merged by name)")
    rep.add_argument("--out", default="bench-report", help="output directory")
    rep.add_argument("--baseline", default=None)
    rep.add_argument("--points", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.repeats < 1 or args.max_new_tokens < 1 or args.num_prompts < 1:
            parser.error("--repeats, --max-new-tokens and --num-prompts must be >= 1")
        if args.url and (args.configs or args.drafter):
            parser.error("--configs/--drafter describe servers to launch; use them with --launch")
    return args


# ------------------------------------------------------------------------------------------------
# Prompts and rendering


def load_prompt_pool(sets: str, num_prompts: int) -> list:
    """Prompts of every set, interleaved (set A #0, set B #0, ..., set A #1, ...)."""
    try:
        from dspark_sglang.prompts import load_prompts
    except ImportError as exc:
        raise SystemExit(f"dspark-bench: cannot import dspark_sglang.prompts ({exc})") from None
    names = [s.strip() for s in sets.split(",") if s.strip()]
    try:
        per_set = [load_prompts(name, limit=num_prompts) for name in names]
    except ImportError as exc:  # a prompt set's wheel is missing; the message names the pip command
        raise SystemExit(f"dspark-bench: {exc}") from None
    pool = []
    for i in range(max(len(p) for p in per_set)):
        pool.extend(p[i] for p in per_set if i < len(p))
    if not pool:
        raise SystemExit(f"dspark-bench: the prompt sets {names} are empty")
    return pool


@dataclass(frozen=True)
class FilePrompt:
    id: str
    messages: list
    meta: dict


def load_prompt_file(path: str) -> list:
    """JSONL, one {"id": str, "messages": [{"role", "content"}, ...]} per line."""
    prompts = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"dspark-bench: {path}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except JSON_PARSE_ERRORS as exc:
            raise SystemExit(f"dspark-bench: {path}:{n}: not valid JSON ({exc})") from None
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise SystemExit(f"dspark-bench: {path}:{n}: messages: expected a list of {{role, content}} objects")
        prompts.append(FilePrompt(str(obj.get("id", f"line{n}")), messages, obj.get("meta") or {}))
    if not prompts:
        raise SystemExit(f"dspark-bench: {path}: no prompts")
    return prompts


def make_renderer(api: str, tokenizer_path: Optional[str]) -> Callable[[object], object]:
    """messages -> what the API takes: the messages themselves for chat, chat-templated text otherwise."""
    if api == "chat":
        return lambda prompt: prompt.messages
    if tokenizer_path is None:
        raise SystemExit("dspark-bench: --tokenizer is needed to render prompts for the generate/completions APIs")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda prompt: tok.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------
# One server: warm-up and the sweep


def requests_for(concurrency: int, args) -> int:
    return max(1, min(args.max_requests, max(args.min_requests, args.requests_per_client * concurrency)))


def server_description(host: str, port: int) -> dict:
    try:
        info = get_json(host, port, "/server_info", timeout=30.0) or {}
    except (OSError, ValueError):
        return {}
    return {k: info.get(k) for k in _SERVER_INFO_KEYS if k in info}


def sweep_server(host: str, port: int, cfg_entry: dict, prompts: list, args, repeats: Sequence[int],
                 save: Callable[[], None], progress) -> None:
    """Warm the server up, then run every concurrency level once per repeat in ``repeats``,
    appending to ``cfg_entry['levels']``."""
    info = {}
    try:
        info = get_json(host, port, "/model_info", timeout=30.0) or {}
    except (OSError, ValueError) as exc:
        print(f"dspark-bench: /model_info unavailable ({exc})", file=sys.stderr)
    cfg_entry["server_info"] = server_description(host, port)
    render = make_renderer(args.api, args.tokenizer or info.get("tokenizer_path") or info.get("model_path"))
    endpoint = Endpoint(host, port, args.api, model=info.get("served_model_name") or "default",
                        timeout=args.request_timeout)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.ignore_eos)

    def send(prompt, record: RequestRecord) -> RequestRecord:
        return send_streaming(endpoint, build_body(endpoint, render(prompt), sampling), record)

    for i in range(args.warmup):
        record = send(prompts[i % len(prompts)], RequestRecord("warmup", None, 0.0))
        if record.error:
            raise ServerError(f"{cfg_entry['name']}: warm-up request failed: {record.error}")

    if not cfg_entry["levels"]:
        cfg_entry["levels"] = [{"load": c, "repeats": []} for c in args.concurrency]
    levels = {lvl["load"]: lvl for lvl in cfg_entry["levels"]}
    for rep in repeats:
        for conc in args.concurrency:
            n = requests_for(conc, args)
            task = progress.add_task(f"{cfg_entry['name']} C={conc} rep {rep + 1}/{args.repeats}", total=n)
            load_before = report.load_average()
            t0 = time.time()
            records = run_closed_loop(send, prompts, concurrency=conc, max_requests=n, max_seconds=args.max_seconds,
                                      offset=(rep * 7919 + conc * 104729) % len(prompts),
                                      on_done=lambda r, t=task: progress.advance(t))
            summary = summarize_level(records).to_dict()
            summary.update(repeat=rep, started=t0, load_avg_before=load_before, load_avg_after=report.load_average(),
                           requests=[r.to_dict(timeline=args.save_timelines) for r in records])
            levels[conc]["repeats"].append(summary)
            progress.remove_task(task)
            progress.console.print(
                f"  {cfg_entry['name']:>12} C={conc:<4} rep {rep + 1}: agg {_f(summary['throughput'])} tok/s, "
                f"per-user {_f(summary['per_user'])} tok/s, accept {_f(summary['spec_accept_length'], '.2f')}, "
                f"errors {summary['num_errors']}, load {summary['load_avg_after']}")
            save()


def _f(v, spec: str = ".1f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


# ------------------------------------------------------------------------------------------------


def _progress(disabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=disabled, transient=True, console=report.make_console())


def _use_cpu(choice: str) -> bool:
    if choice != "auto":
        return choice == "yes"
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def _configs(args) -> list[ServerConfig]:
    if args.configs:
        return load_configs(args.configs)
    return preset_configs(args.drafter, args.fixed_lens, args.cost_table, args.sts)


def cmd_run(args) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompt_file(args.prompts_file) if args.prompts_file else load_prompt_pool(args.sets, args.num_prompts)
    doc = report.new_document("dspark-bench", "concurrency", vars(args), args.baseline)
    json_path = out_dir / "bench.json"

    def save() -> None:
        report.write_document(doc, json_path)

    with _progress(args.no_progress or not sys.stderr.isatty()) as progress:
        if args.url:
            host, port = parse_url(args.url, allow_remote=args.allow_remote)
            entry = {"name": args.name, "url": args.url, "launched": False, "speculative": None, "levels": []}
            doc["configs"].append(entry)
            sweep_server(host, port, entry, prompts, args, range(args.repeats), save, progress)
            entry["speculative"] = bool(entry.get("server_info", {}).get("speculative_algorithm"))
        else:
            model_path = args.model_path or _default_model()
            cpu = _use_cpu(args.cpu)
            environ = cpu_environment(os.environ) if cpu else dict(os.environ)
            common = [*(CPU_SERVER_ARGS if cpu else ()), *shlex.split(args.server_args)]
            doc["args"]["model_path"] = _recorded_path(model_path)
            configs = _configs(args)
            entries = [{**cfg.to_dict(), "launched": True, "speculative": cfg.speculative, "common_args": common,
                        "startup_seconds": [], "levels": []} for cfg in configs]
            doc["configs"].extend(entries)
            # --interleave: one repeat of every configuration, then the next repeat (servers restart),
            # so slow drifts in machine load spread over all configurations instead of biasing one.
            rounds = [[r] for r in range(args.repeats)] if args.interleave else [list(range(args.repeats))]
            for reps in rounds:
                for cfg, entry in zip(configs, entries):
                    log = out_dir / (f"server_{cfg.name}_rep{reps[0] + 1}.log" if args.interleave
                                     else f"server_{cfg.name}.log")
                    progress.console.print(f"starting {cfg.name}: {' '.join(cfg.args) or '(no extra args)'} "
                                           f"{' '.join(f'{k}={v}' for k, v in cfg.env.items())} (log {log})")
                    with ManagedServer(model_path, cfg, common_args=common, environ=environ, log_path=log,
                                       health_timeout=args.health_timeout) as server:
                        entry["startup_seconds"].append(server.startup_seconds)
                        sweep_server(server.host, server.port, entry, prompts, args, reps, save, progress)
                    progress.console.print(f"stopped {cfg.name}")
    return finish(doc, out_dir, args.points)


def _recorded_path(path: str) -> str:
    """A model path as bench.json records it: the models cache and the home folder by name, so a
    committed result names no machine's folders."""
    from dspark_sglang.models import cache_root

    resolved = Path(path).expanduser().resolve()
    for root, label in ((Path.cwd(), "."), (cache_root() / "models", "<dspark-models cache>"), (Path.home(), "~")):
        if resolved.is_relative_to(root.resolve()):
            return f"{label}/{resolved.relative_to(root.resolve())}"
    return path


def _default_model() -> str:
    try:
        from dspark_sglang.models import ensure_target
    except ImportError as exc:
        raise SystemExit(f"dspark-bench: pass --model-path (dspark_sglang.models unavailable: {exc})") from None
    return str(ensure_target())


def finish(doc: dict, out_dir: Path, points: int) -> dict:
    doc["host"]["load_avg_at_end"] = report.load_average()
    report.analyze(doc, points)
    json_path = report.write_document(doc, out_dir / "bench.json")
    png_path = report.plot_document(doc, out_dir / "bench.png")
    report.print_report(doc)
    print(f"wrote {json_path} and {png_path}")
    return doc


def cmd_report(args) -> dict:
    docs = [report.read_document(p) for p in args.files]
    merged = report.new_document(docs[0]["tool"], docs[0]["load_kind"], {"merged_from": list(args.files)},
                                 args.baseline or docs[0].get("baseline"))
    names = set()
    for path, d in zip(args.files, docs):
        if d["load_kind"] != merged["load_kind"]:
            raise SystemExit(f"dspark-bench report: {path} has load kind {d['load_kind']!r}, "
                             f"expected {merged['load_kind']!r}")
        for cfg in d["configs"]:
            if cfg["name"] in names:
                raise SystemExit(f"dspark-bench report: configuration {cfg['name']!r} appears in two files")
            names.add(cfg["name"])
            merged["configs"].append({**cfg, "source": str(path)})
    if merged["baseline"] not in names:
        merged["baseline"] = merged["configs"][0]["name"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return finish(merged, out_dir, args.points)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "run":
            cmd_run(args)
        else:
            cmd_report(args)
    except (ServerError, ValueError) as exc:
        print(f"dspark-bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
