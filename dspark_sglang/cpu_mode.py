"""The one switch for running SGLang on a CPU-only machine (tests, the demo and the tools use it).

    eval "$(dspark-cpu-env)"                      # a shell, and every SGLang process it starts
    dspark_sglang.cpu_mode.enable_cpu_mode()      # this Python process and its children

It sets `SGLANG_USE_CPU_ENGINE=1` (SGLang's CPU platform; without it RoPE falls through to vLLM ops),
keeps everything offline, defaults to one OpenMP thread (two threads on a shared 2-core box can be
100x slower), and puts the `sgl_kernel` CPU fallback (`dspark_sglang/cpu_shim/common_ops.py`) on
PYTHONPATH, which SGLang's spawned scheduler processes inherit. Call it before importing sglang.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

from dspark_sglang.cpu_shim import shim_dir

CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def _with_shim(pythonpath: str) -> str:
    parts = [p for p in pythonpath.split(os.pathsep) if p]
    return os.pathsep.join([shim_dir()] + [p for p in parts if p != shim_dir()])


def cpu_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables CPU mode sets, given the current environment."""
    environ = os.environ if environ is None else environ
    env = dict(CPU_ENV)
    env["OMP_NUM_THREADS"] = environ.get("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = _with_shim(environ.get("PYTHONPATH", ""))
    return env


def enable_cpu_mode(environ: MutableMapping[str, str] | None = None) -> None:
    """Turn CPU mode on for `environ` (default: this process) and this interpreter's sys.path.
    Idempotent."""
    environ = os.environ if environ is None else environ
    environ.update(cpu_environment(environ))
    if environ is os.environ and shim_dir() not in sys.path:
        sys.path.insert(0, shim_dir())


def cpu_engine_kwargs(speculative: bool = False) -> dict:
    """`sglang.Engine` / server arguments that work on a CPU without AMX.

    torch_native attention is the fast CPU backend (~39 ms/step for SmolLM2-135M). float32 keeps
    greedy speculative decoding token-exact against plain decoding: in bfloat16 the decode and
    extend kernels round differently, so parity tests would flake on near-ties.
    """
    return {
        "device": "cpu",
        "attention_backend": "torch_native",
        "dtype": "float32" if speculative else "bfloat16",
        "max_total_tokens": 8192,
        "disable_cuda_graph": True,
        "log_level": "error",
    }


def main_env() -> None:
    """`dspark-cpu-env`: print `export` lines for a POSIX shell."""
    import shlex

    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print('usage: eval "$(dspark-cpu-env)"\n\nPrint the environment that runs SGLang on a CPU-only '
              "machine with this project's sgl_kernel fallback.")
        return
    for key, value in cpu_environment().items():
        print(f"export {key}={shlex.quote(value)}")
