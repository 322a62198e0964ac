"""dspark-soak: a bounded loopback soak of the DSPARK worker under KV-cache pressure.

1. Reference: a plain SGLang server (no speculation, float32, roomy KV pool) answers every request
   greedily.
2. Soak: a DSPARK server with a deliberately small KV pool (--max-total-tokens) serves the same
   requests at high concurrency, so SGLang runs out of KV slots, retracts running requests (their KV
   freed, the request re-queued) and re-admits them later, all with speculation on.
3. Checks: every request completes; every greedy output equals the reference token for token; once
   idle, the free KV slots (GET /v1/loads) are back at their start value; SGLang's own idle
   memory-leak check (strict by default: the scheduler raises) never fired, so the server is still
   healthy and its log is clean; and at least one request was retracted (counted from /metrics,
   `sglang:num_retracted_requests_total`, and from the scheduler's "Retract requests" log lines),
   unless --allow-no-retraction.

    dspark-soak                                            # 300 requests, concurrency 32, KV pool 2048
    dspark-soak --requests 40 --concurrency 16 --max-total-tokens 640 --fault nan_draft:0.3
    dspark-soak --out soak-out --drafter DIR --target DIR

Requests are chat-rendered prompts of real prompt sets (token ids, so both servers see the same
input), each with its own max_new_tokens drawn (seeded) from [--min-new-tokens, --max-new-tokens]
so finishes are staggered. --fault sets DSPARK_TEST_FAULT on the DSPARK server (testing-only fault
injection, dspark_sglang/sglang/settings.py): the outputs must stay exact under injected faults too.
Writes soak.json (config, figures, failures) and both server logs into --out; exit status 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from dspark_sglang.benchmarks.http_stream import get_json
from dspark_sglang.benchmarks.servers import CPU_SERVER_ARGS, ManagedServer, ServerConfig, cpu_environment

DEFAULT_SETS = "sharegpt,gsm8k,humaneval,mtbench"
# Lines of a server log that mean the soak failed even if every output matched (a scheduler crash
# shows up as an unhealthy server instead).
LEAK_PATTERNS = ("memory leak detected", "Mem Leak Detected", "double free", "use-after-free")
RETRACT_LOG = re.compile(r"Retract requests\. #retracted_reqs: (\d+)")
RETRACT_METRIC = re.compile(r"^sglang:num_retracted_requests_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.M)


@dataclass
class SoakConfig:
    target: Optional[str] = None  # default: the bundled SmolLM2-135M (dspark-models materialize)
    drafter: Optional[str] = None  # default: the zoo DSpark drafter for it
    requests: int = 300
    concurrency: int = 32
    min_new_tokens: int = 8
    max_new_tokens: int = 64
    max_prompt_tokens: int = 160
    max_total_tokens: int = 2048  # the DSPARK server's KV pool (the reference server keeps 8192)
    # SGLang admits a request when its prompt plus this fraction (x 0.7) of its max_new_tokens fits;
    # below 1 admission is optimistic, decode then runs out of KV slots and retracts.
    schedule_conservativeness: float = 0.3
    prompt_sets: str = DEFAULT_SETS
    fault: Optional[str] = None  # DSPARK_TEST_FAULT for the DSPARK server
    env: dict = field(default_factory=dict)  # more environment for the DSPARK server
    server_args: list = field(default_factory=list)  # more launch_server arguments for the DSPARK server
    seed: int = 0
    request_timeout: float = 900.0
    idle_timeout: float = 120.0
    allow_no_retraction: bool = False
    out: str = "soak-out"
    progress: bool = True


@dataclass(frozen=True)
class SoakRequest:
    index: int
    input_ids: list
    max_new_tokens: int

    def body(self) -> dict:
        return {"input_ids": self.input_ids,
                "sampling_params": {"temperature": 0.0, "max_new_tokens": self.max_new_tokens}}


# ------------------------------------------------------------------------------------------------
# Requests


def build_requests(cfg: SoakConfig, tokenizer_path: str) -> list[SoakRequest]:
    """cfg.requests chat-rendered prompts (cycling through the pool if it is short), token ids."""
    from transformers import AutoTokenizer

    from dspark_sglang.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    names = [s.strip() for s in cfg.prompt_sets.split(",") if s.strip()]
    per_set = [load_prompts(name, limit=cfg.requests) for name in names]
    pool = []
    for i in range(max(map(len, per_set), default=0)):  # interleave the sets
        for prompts in per_set:
            if i < len(prompts):
                ids = tok.apply_chat_template(prompts[i].messages, tokenize=True, add_generation_prompt=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in new transformers
                if len(ids) <= cfg.max_prompt_tokens:
                    pool.append(ids)
    if not pool:
        raise SystemExit(f"dspark-soak: no prompt of {names} fits --max-prompt-tokens {cfg.max_prompt_tokens}")
    rng = random.Random(cfg.seed)
    return [SoakRequest(i, pool[i % len(pool)], rng.randint(cfg.min_new_tokens, cfg.max_new_tokens))
            for i in range(cfg.requests)]


def post_json(server: ManagedServer, path: str, body: dict, timeout: float) -> dict:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def run_requests(server: ManagedServer, requests: Sequence[SoakRequest], concurrency: int, timeout: float,
                 desc: str, progress: bool) -> list[dict]:
    """Send every request (at most `concurrency` in flight); [{"output_ids", "meta_info"} or {"error"}]
    in request order."""
    from tqdm import tqdm

    results: list[dict] = [{} for _ in requests]

    def one(req: SoakRequest) -> dict:
        try:
            out = post_json(server, "/generate", req.body(), timeout)
            return {"output_ids": out["output_ids"], "meta_info": out.get("meta_info", {})}
        except Exception as exc:  # noqa: BLE001 - every failure is reported per request
            return {"error": f"{type(exc).__name__}: {exc}"}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(requests), desc=desc, disable=not progress, unit="req", file=sys.stderr) as bar:
        futures = {pool.submit(one, req): req.index for req in requests}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results


# ------------------------------------------------------------------------------------------------
# Server state


def kv_state(server: ManagedServer) -> dict:
    """{"free": free KV token slots, "total", "running", "waiting"} from GET /v1/loads."""
    load = get_json(server.host, server.port, "/v1/loads", timeout=30.0)["loads"][0]
    total, used = int(load["max_total_num_tokens"]), int(load["num_used_tokens"])
    return {"free": total - used, "total": total, "running": int(load["num_running_reqs"]),
            "waiting": int(load["num_waiting_reqs"])}


def wait_idle(server: ManagedServer, start_free: int, timeout: float) -> dict:
    """Poll until nothing runs or waits and the free slots are back at `start_free` (or time out:
    then the last state is returned, and the caller reports the difference as a leak)."""
    deadline = time.monotonic() + timeout
    state = kv_state(server)
    while time.monotonic() < deadline:
        if state["running"] == 0 and state["waiting"] == 0 and state["free"] == start_free:
            break
        time.sleep(0.5)
        state = kv_state(server)
    return state


def retractions_from_metrics(server: ManagedServer) -> Optional[int]:
    """Total retracted requests from Prometheus /metrics (needs --enable-metrics); None without the
    endpoint. The labelled counter appears only after its first increment: absent means 0."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30.0)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        if resp.status != 200:
            return None
    except OSError:
        return None
    finally:
        conn.close()
    return int(sum(float(v) for v in RETRACT_METRIC.findall(text)))


def scan_log(path: Path) -> dict:
    """Retractions and leak/traceback lines in a server log."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    problems = [line.strip() for line in text.splitlines() if any(p in line for p in LEAK_PATTERNS)]
    events = RETRACT_LOG.findall(text)
    return {"retractions": sum(int(n) for n in events), "retraction_events": len(events), "problems": problems[:20]}


def plugin_stats(server: ManagedServer) -> dict:
    """The worker's counters (WorkerStats + injected faults) from /server_info internal_states."""
    info = get_json(server.host, server.port, "/server_info", timeout=30.0)
    states = info.get("internal_states") or [{}]
    return states[0].get("dspark_plugin", {})


def compare(requests: Sequence[SoakRequest], reference: Sequence[dict], results: Sequence[dict]) -> list[dict]:
    """Requests whose output differs from the reference (or failed), with the first differing position."""
    bad = []
    for req, want, got in zip(requests, reference, results):
        if "error" in got or "error" in want:
            bad.append({"index": req.index, "error": got.get("error") or f"reference: {want.get('error')}"})
            continue
        a, b = want["output_ids"], got["output_ids"]
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            bad.append({"index": req.index, "first_diff": first, "reference_len": len(a), "soak_len": len(b)})
    return bad


# ------------------------------------------------------------------------------------------------
# The two servers


def _paths(cfg: SoakConfig) -> tuple[str, str]:
    from dspark_sglang.models import ensure_target, zoo_drafter

    target = cfg.target or str(ensure_target(progress=cfg.progress))
    drafter = cfg.drafter or str(zoo_drafter("dspark"))
    return target, drafter


def reference_server(cfg: SoakConfig, target: str, out: Path) -> ManagedServer:
    return ManagedServer(target, ServerConfig("reference"), common_args=CPU_SERVER_ARGS,
                         environ=cpu_environment(_environ()), log_path=out / "server_reference.log")


def dspark_server(cfg: SoakConfig, target: str, drafter: str, out: Path) -> ManagedServer:
    args = list(CPU_SERVER_ARGS)
    args[args.index("--max-total-tokens") + 1] = str(cfg.max_total_tokens)
    args += ["--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", drafter, "--enable-metrics",
             "--schedule-conservativeness", str(cfg.schedule_conservativeness), *cfg.server_args]
    env = {**cfg.env, **({"DSPARK_TEST_FAULT": cfg.fault} if cfg.fault else {})}
    return ManagedServer(target, ServerConfig("dspark", tuple(args), env), environ=cpu_environment(_environ()),
                         log_path=out / "server_dspark.log")


def _environ() -> dict:
    import os

    # A fault spec or plugin setting in the caller's shell must not leak into the reference server.
    return {k: v for k, v in os.environ.items() if not k.startswith("DSPARK_")}


def soak_phase(server: ManagedServer, cfg: SoakConfig, requests: Sequence[SoakRequest],
               reference: Sequence[dict], log_path: Path) -> dict:
    """Run the load against a started DSPARK server and check it; returns the figures and failures."""
    before = kv_state(server)
    t0 = time.monotonic()
    results = run_requests(server, requests, cfg.concurrency, cfg.request_timeout, "soak", cfg.progress)
    seconds = time.monotonic() - t0
    after = wait_idle(server, before["free"], cfg.idle_timeout)
    metric_retractions = retractions_from_metrics(server)
    stats = plugin_stats(server)
    healthy = _healthy(server)
    log = scan_log(log_path)
    mismatches = compare(requests, reference, results)
    retractions = metric_retractions if metric_retractions is not None else log["retractions"]
    failures = []
    if mismatches:
        failures.append(f"{len(mismatches)} request(s) failed or differ from the plain engine: {mismatches[:5]}")
    if after["free"] != before["free"]:
        failures.append(f"KV slots leaked: {before['free']} free before, {after['free']} free when idle")
    if not healthy:
        failures.append("the DSPARK server is not healthy after the soak")
    if log["problems"]:
        failures.append(f"server log reports: {log['problems'][:3]}")
    if retractions == 0 and not cfg.allow_no_retraction:
        failures.append("no request was retracted: shrink --max-total-tokens or raise --concurrency")
    completed = sum(1 for r in results if "output_ids" in r)
    return {
        "requests": len(requests), "completed": completed, "mismatches": mismatches,
        "output_tokens": sum(len(r.get("output_ids", ())) for r in results),
        "seconds": seconds, "retractions": retractions, "retractions_metric": metric_retractions,
        "retractions_log": log["retractions"], "retraction_events_log": log["retraction_events"],
        "kv_free_before": before["free"], "kv_free_after": after["free"], "kv_total": before["total"],
        "healthy_after": healthy, "plugin": stats, "failures": failures, "results": results,
    }


def _healthy(server: ManagedServer) -> bool:
    try:
        get_json(server.host, server.port, "/health", timeout=30.0)
        return server.proc is not None and server.proc.poll() is None
    except (OSError, ValueError):
        return False


def run(cfg: SoakConfig, on_server: Optional[Callable[..., None]] = None) -> dict:
    """The whole soak: reference, then soak; returns the report (also written to out/soak.json).
    `on_server(server, requests, reference, report)` runs against the still-running DSPARK server
    after the checks (tests add their own checks there)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    target, drafter = _paths(cfg)
    requests = build_requests(cfg, target)
    t0 = time.monotonic()
    with reference_server(cfg, target, out) as ref:
        reference = run_requests(ref, requests, cfg.concurrency, cfg.request_timeout, "reference", cfg.progress)
        reference_startup = ref.startup_seconds
    reference_seconds = time.monotonic() - t0
    server = dspark_server(cfg, target, drafter, out)
    with server:
        report = soak_phase(server, cfg, requests, reference, server.log_path)
        report["dspark_startup_seconds"] = server.startup_seconds
        if on_server is not None:
            on_server(server, requests, reference, report)
    report.update(reference_seconds=reference_seconds, reference_startup_seconds=reference_startup, config=asdict(cfg), target=target, drafter=drafter,
                  ok=not report["failures"])
    (out / "soak.json").write_text(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    return report


def summary(report: dict) -> str:
    p = report.get("plugin", {})
    lines = [
        f"requests {report['completed']}/{report['requests']} completed, "
        f"{report['requests'] - len(report['mismatches'])} equal to the plain engine, "
        f"{report['output_tokens']} tokens in {report['seconds']:.0f} s",
        f"retractions {report['retractions']} (metrics {report['retractions_metric']}, log "
        f"{report['retractions_log']} in {report['retraction_events_log']} events)",
        f"KV free slots {report['kv_free_before']} before, {report['kv_free_after']} idle after "
        f"(pool {report['kv_total']}); server healthy after: {report['healthy_after']}",
        f"speculation: accept length {p.get('accept_length', float('nan')):.2f} over {p.get('rounds', 0)} "
        f"rounds; fallbacks {p.get('faults', {})}; injected {p.get('faults_injected', {})}",
    ]
    lines += [f"FAIL: {f}" for f in report["failures"]] or ["PASS"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dspark-soak", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    d = SoakConfig()
    parser.add_argument("--target", help="target model folder (default: the bundled SmolLM2-135M)")
    parser.add_argument("--drafter", help="drafter checkpoint folder (default: the zoo DSpark drafter)")
    parser.add_argument("--requests", type=int, default=d.requests, help="requests to send (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight (default %(default)s)")
    parser.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens,
                        help="smallest per-request max_new_tokens (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="largest per-request max_new_tokens (default %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                        help="skip prompts longer than this (default %(default)s)")
    parser.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens,
                        help="KV pool of the DSPARK server, in tokens (default %(default)s); small forces retraction")
    parser.add_argument("--schedule-conservativeness", type=float, default=d.schedule_conservativeness,
                        help="SGLang admission conservativeness of the DSPARK server (default %(default)s; "
                             "lower admits more optimistically and retracts more)")
    parser.add_argument("--prompt-sets", default=d.prompt_sets, help="comma-separated sets (default %(default)s)")
    parser.add_argument("--fault", help="DSPARK_TEST_FAULT for the DSPARK server, e.g. nan_draft:0.3,draft_exception:0.1")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="more environment for the DSPARK server (repeatable), e.g. DSPARK_COST_TABLE=sps.json")
    parser.add_argument("--server-args", default="", help="more launch_server arguments for the DSPARK server")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the per-request lengths (default %(default)s)")
    parser.add_argument("--allow-no-retraction", action="store_true", help="do not fail when nothing was retracted")
    parser.add_argument("--out", default=d.out, help="folder for soak.json and server logs (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "min_new_tokens", "max_new_tokens", "max_prompt_tokens", "max_total_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.schedule_conservativeness > 0:
        parser.error("--schedule-conservativeness must be > 0")
    if args.min_new_tokens > args.max_new_tokens:
        parser.error("--min-new-tokens exceeds --max-new-tokens")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    if args.fault:
        from dspark_sglang.sglang.settings import PluginSettingsError, parse_fault_spec

        try:
            parse_fault_spec(args.fault)
        except PluginSettingsError as exc:
            parser.error(f"--fault: {exc}")
    import shlex

    cfg = SoakConfig(target=args.target, drafter=args.drafter, requests=args.requests,
                     concurrency=args.concurrency, min_new_tokens=args.min_new_tokens,
                     max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                     max_total_tokens=args.max_total_tokens, prompt_sets=args.prompt_sets, fault=args.fault,
                     schedule_conservativeness=args.schedule_conservativeness,
                     env=env, server_args=shlex.split(args.server_args), seed=args.seed,
                     allow_no_retraction=args.allow_no_retraction, out=args.out, progress=not args.no_progress)
    report = run(cfg)
    print(summary(report))
    print(f"report: {Path(cfg.out) / 'soak.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
