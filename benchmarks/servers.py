"""Server configurations for ``dspark-bench --launch``, and launching/stopping them on loopback.

A configuration is a name, extra ``sglang.launch_server`` arguments and extra environment
variables. From a JSON file (a list of objects)::

    [{"name": "no-spec", "args": [], "env": {}},
     {"name": "fixed-3", "args": ["--speculative-algorithm", "DSPARK",
                                   "--speculative-draft-model-path", "DRAFTER"],
      "env": {"DSPARK_SCHEDULER": "fixed", "DSPARK_FIXED_LEN": "3"}},
     {"name": "lagged", "args": [...same...], "env": {"DSPARK_SCHEDULER": "lagged",
                                                      "DSPARK_COST_TABLE": "sps.json"}}]

or from the preset (``preset_configs``): no speculation, fixed verify length k for each k, and the
confidence-scheduled ``lagged`` scheduler when a cost table is given.

Each server runs ``python -m sglang.launch_server`` in its own process group on 127.0.0.1 with a
free port; it is healthy when ``GET /health`` answers 200, and it is stopped by signalling the
whole group (SIGTERM, then SIGKILL after a grace period): SGLang's scheduler and detokenizer
children otherwise outlive the launcher as zombies (cpu-dev-recipe.md §5).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from dspark_sglang.benchmarks.http_stream import get_json
from dspark_sglang.jsonio import JSON_PARSE_ERRORS

__all__ = ["ServerConfig", "ServerError", "load_configs", "preset_configs", "cpu_environment",
           "CPU_SERVER_ARGS", "ManagedServer", "free_port"]

# Same flags for every configuration so they differ only in speculation (float32 everywhere: the
# speculative path on CPU needs it, and the baseline must run the same numerics).
CPU_SERVER_ARGS = ("--device", "cpu", "--attention-backend", "torch_native",
                   "--max-total-tokens", "8192", "--dtype", "float32")
SPEC_FLAG = "--speculative-algorithm"


class ServerError(RuntimeError):
    """A server failed to start, died, or a configuration is malformed."""


@dataclass(frozen=True)
class ServerConfig:
    name: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def speculative(self) -> bool:
        return SPEC_FLAG in self.args

    def to_dict(self) -> dict:
        return {"name": self.name, "args": list(self.args), "env": dict(self.env)}


def _config_from(obj, where: str) -> ServerConfig:
    if not isinstance(obj, dict):
        raise ServerError(f"{where}: expected an object with name/args/env, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"name", "args", "env"})
    if unknown:
        raise ServerError(f"{where}: unknown keys {unknown}; expected name, args, env")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ServerError(f"{where}.name: expected a non-empty string, got {name!r}")
    args = obj.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ServerError(f"{where}.args: expected a list of strings, got {args!r}")
    env = obj.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                            for k, v in env.items()):
        raise ServerError(f"{where}.env: expected an object of string values, got {env!r}")
    return ServerConfig(name.strip(), tuple(args), {k: str(v) for k, v in env.items()})


def load_configs(path: str | Path) -> list[ServerConfig]:
    """Read a JSON list of configurations; names must be unique."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServerError(f"{path}: cannot read ({exc.strerror})") from None
    except JSON_PARSE_ERRORS as exc:
        raise ServerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise ServerError(f"{path}: expected a non-empty JSON list of configurations")
    configs = [_config_from(obj, f"{path}[{i}]") for i, obj in enumerate(data)]
    _check_unique(configs, str(path))
    return configs


def _check_unique(configs: Sequence[ServerConfig], where: str) -> None:
    seen = set()
    for c in configs:
        if c.name in seen:
            raise ServerError(f"{where}: configuration name {c.name!r} appears twice")
        seen.add(c.name)


def preset_configs(drafter: Optional[str], fixed_lens: Sequence[int] = (), cost_table: Optional[str] = None,
                   sts: Optional[str] = None, extra_spec_args: Sequence[str] = ()) -> list[ServerConfig]:
    """no-spec, then fixed-k for each k, then lagged (needs ``cost_table``)."""
    configs = [ServerConfig("no-spec")]
    if drafter is None:
        if fixed_lens or cost_table:
            raise ServerError("--drafter is required for the fixed and lagged presets")
        return configs
    spec = (SPEC_FLAG, "DSPARK", "--speculative-draft-model-path", str(drafter), *extra_spec_args)
    common = {"DSPARK_STS": str(sts)} if sts else {}
    for k in fixed_lens:
        configs.append(ServerConfig(f"fixed-{k}", spec, {**common, "DSPARK_SCHEDULER": "fixed",
                                                         "DSPARK_FIXED_LEN": str(k)}))
    if cost_table:
        configs.append(ServerConfig("lagged", spec, {**common, "DSPARK_SCHEDULER": "lagged",
                                                     "DSPARK_COST_TABLE": str(cost_table)}))
    return configs


def cpu_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` prepared for a CPU SGLang server (``dspark_sglang.cpu_mode``: the CPU
    engine switch, offline hub, one OpenMP thread, the sgl_kernel shim on PYTHONPATH)."""
    from dspark_sglang.cpu_mode import enable_cpu_mode

    env = dict(environ)
    enable_cpu_mode(env)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ManagedServer:
    """``with ManagedServer(...) as server:`` starts, waits for health, and always stops."""

    def __init__(self, model_path: str, config: ServerConfig, *, common_args: Sequence[str] = (),
                 environ: Optional[Mapping[str, str]] = None, log_path: Optional[Path] = None,
                 health_timeout: float = 900.0, stop_grace: float = 20.0, python: str = sys.executable):
        self.model_path, self.config = model_path, config
        self.common_args, self.environ = tuple(common_args), dict(environ or os.environ)
        self.log_path, self.health_timeout, self.stop_grace = log_path, health_timeout, stop_grace
        self.python = python
        self.host, self.port = "127.0.0.1", 0
        self.proc: Optional[subprocess.Popen] = None
        self.startup_seconds: Optional[float] = None

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--host", self.host, "--port", str(self.port), *self.common_args, *self.config.args]

    def __enter__(self) -> "ManagedServer":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.port = free_port(self.host)
        env = {**self.environ, **self.config.env}
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self._t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()

    def _log_tail(self, lines: int = 25) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return "(no log)"
        text = Path(self.log_path).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.health_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"server {self.config.name!r} exited with code {code} before becoming "
                                  f"healthy; log {self.log_path}:\n{self._log_tail()}")
            try:
                get_json(self.host, self.port, "/health", timeout=5.0)
                self.startup_seconds = time.monotonic() - self._t0
                return
            except (OSError, ValueError):
                time.sleep(1.0)
        raise ServerError(f"server {self.config.name!r} not healthy after {self.health_timeout:.0f} s; "
                          f"log {self.log_path}:\n{self._log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server's process group (it leads its own session), wait, then SIGKILL the
        group so no child outlives it, and reap the leader."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10.0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
