"""The one switch for running SGLang on a CPU-only machine (tests, the demo and the tools use it).

    eval "$(dspark-cpu-env)"                      # a shell, and every SGLang process it starts
    dspark_sglang.cpu_mode.enable_cpu_mode()      # this Python process and its children

It sets `SGLANG_USE_CPU_ENGINE=1` (SGLang's CPU platform; without it RoPE falls through to vLLM ops),
keeps everything offline, defaults to one OpenMP thread (two threads on a shared 2-core box can be
100x slower), and puts the `sgl_kernel` CPU fallback (`dspark_sglang/cpu_shim/common_ops.py`) on
PYTHONPATH, which SGLang's spawned scheduler processes inherit. Call it before importing sglang:
SGLang reads the platform at import time (`_is_cpu = is_cpu()` in many modules).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import MutableMapping

from dspark_sglang.cpu_shim import shim_dir

logger = logging.getLogger(__name__)

CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def _with_shim(pythonpath: str) -> str:
    parts = [p for p in pythonpath.split(os.pathsep) if p]
    return os.pathsep.join([shim_dir()] + [p for p in parts if p != shim_dir()])


def cpu_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables CPU mode sets, given `environ` (default: this process's environment).

    OMP_NUM_THREADS keeps an explicit value; PYTHONPATH gets the shim directory in front.
    """
    environ = os.environ if environ is None else environ
    env = dict(CPU_ENV)
    env["OMP_NUM_THREADS"] = environ.get("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = _with_shim(environ.get("PYTHONPATH", ""))
    return env


def enable_cpu_mode(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Turn CPU mode on for `environ` (default: `os.environ`) and return it. Idempotent.

    For `os.environ` it also puts the shim directory on this interpreter's `sys.path` (spawned
    children inherit both). Pass another mapping to prepare the environment of a subprocess.
    """
    environ = os.environ if environ is None else environ
    environ.update(cpu_environment(environ))
    if environ is os.environ:
        if shim_dir() not in sys.path:
            sys.path.insert(0, shim_dir())
        if "sglang.srt.utils" in sys.modules:
            logger.warning("enable_cpu_mode() after sglang was imported: modules imported earlier "
                           "already decided their platform; call it before importing sglang")
    return environ


def cpu_engine_kwargs(speculative: bool = False, **overrides) -> dict:
    """`sglang.Engine` / server arguments that work on a CPU without AMX.

    torch_native attention is the fast CPU backend (~39 ms/step for SmolLM2-135M in bfloat16;
    float32 is about 2x slower). float32 keeps greedy output token-exact against plain decoding and
    against transformers: in bfloat16 the decode and extend kernels round differently, so parity
    tests would flake on near-ties. Hence float32 when `speculative`, bfloat16 otherwise; pass
    `dtype=` (or any other argument) to override. 8192 KV slots keep the cache at a few hundred MB
    (the default sizing takes ~14.5 GB of RAM on CPU).
    """
    kwargs = {
        "device": "cpu",
        "attention_backend": "torch_native",
        "dtype": "float32" if speculative else "bfloat16",
        "max_total_tokens": 8192,
        "disable_cuda_graph": True,
        "log_level": "error",
    }
    kwargs.update(overrides)
    return kwargs


def tensor_parallel_environment(tp_size: int, cpu_count: int | None = None) -> dict[str, str]:
    """The variables SGLang's CPU engine needs for ``tp_size > 1`` on an ordinary (one NUMA node) box.

    - ``SGLANG_CPU_OMP_THREADS_BIND``: SGLang binds each rank to a NUMA node and refuses more ranks
      than nodes unless told which cores each rank gets; rank i gets core i (wrapping around when
      there are fewer cores than ranks).
    - ``SGLANG_NCCL_SO_PATH`` pointing nowhere: a CUDA build of torch ships libnccl, which SGLang
      would then load and try to bind to a CUDA device; without it the ranks talk over gloo.
    """
    if tp_size < 2:
        return {}
    cores = max(1, cpu_count if cpu_count is not None else (os.cpu_count() or 1))
    return {
        "SGLANG_CPU_OMP_THREADS_BIND": "|".join(str(rank % cores) for rank in range(tp_size)),
        "SGLANG_NCCL_SO_PATH": "/nonexistent/libnccl.so.2",
    }


def main_env(argv=None) -> int:
    """`dspark-cpu-env`: print `export` lines for a POSIX shell."""
    parser = argparse.ArgumentParser(
        prog="dspark-cpu-env",
        description="Print the environment that runs SGLang on a CPU-only machine with this project's "
                    'sgl_kernel fallback. Use: eval "$(dspark-cpu-env)"',
    )
    parser.parse_args(argv)
    for key, value in cpu_environment().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main_env())
