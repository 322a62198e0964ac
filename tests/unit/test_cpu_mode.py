"""CPU mode switch: environment for this process and for children, and the shell helper."""

import os
import subprocess
import sys

from dspark_sglang.cpu_mode import cpu_engine_kwargs, enable_cpu_mode, main_env
from dspark_sglang.cpu_shim import shim_dir


def test_enable_on_a_mapping_is_idempotent_and_leaves_sys_path():
    before = list(sys.path)
    env = {"PYTHONPATH": os.pathsep.join(["/a", shim_dir(), "/b"]), "OMP_NUM_THREADS": "2"}
    assert enable_cpu_mode(env) is env
    once = dict(env)
    enable_cpu_mode(env)
    assert env == once
    assert env["PYTHONPATH"].split(os.pathsep) == [shim_dir(), "/a", "/b"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "2"  # an explicit value is kept
    assert enable_cpu_mode({})["OMP_NUM_THREADS"] == "1"
    assert sys.path == before


def test_engine_kwargs():
    plain, spec = cpu_engine_kwargs(), cpu_engine_kwargs(speculative=True)
    assert plain["device"] == "cpu" and plain["attention_backend"] == "torch_native"
    assert plain["dtype"] == "bfloat16" and spec["dtype"] == "float32"
    assert plain["disable_cuda_graph"] is True and plain["max_total_tokens"] == 8192
    assert cpu_engine_kwargs(dtype="float32", max_total_tokens=4096)["max_total_tokens"] == 4096


def test_shell_exports_round_trip(capsys):
    assert main_env([]) == 0
    out = capsys.readouterr().out
    assert "export SGLANG_USE_CPU_ENGINE=1" in out
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": "/x"}
    shown = subprocess.run(["bash", "-c", f'{out}\necho "$PYTHONPATH"'], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert shown.split(os.pathsep)[0] == shim_dir()


def test_tensor_parallel_environment_binds_one_core_per_rank():
    from dspark_sglang.cpu_mode import tensor_parallel_environment

    assert tensor_parallel_environment(1) == {}
    env = tensor_parallel_environment(2, cpu_count=2)
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1"
    assert env["SGLANG_NCCL_SO_PATH"].startswith("/nonexistent/")
    assert tensor_parallel_environment(4, cpu_count=2)["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1|0|1"
