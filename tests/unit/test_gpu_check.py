"""The GPU check's bookkeeping (benchmarks/gpu_check.py, gpu_engines.py), without a GPU: how step
results are judged, that a missing piece reads "not run" and never "passed", and which engine
configurations a host gets. tests/e2e/test_gpu_check_cpu.py runs the whole script on the CPU."""

import argparse

import pytest

from dspark_sglang.benchmarks import gpu_check, gpu_engines
from dspark_sglang.benchmarks.gpu_check import FAILED, NOT_RUN, PASSED


def kernel_row(kernel, num_reqs, passed, check="ok"):
    return {"kernel": kernel, "num_reqs": num_reqs, "kernel_us": 10.0, "speedup": 3.0, "check": check,
            "passed": passed}


def test_kernels_pass_only_when_every_check_passed():
    ok = gpu_check.summarize_kernels([{"device": "H100"}, kernel_row("chain_accept", 1, True),
                                      kernel_row("sequential_head", 32, True)])
    assert ok.status == PASSED and ok.detail.startswith("2/2 kernel checks agree")
    bad = gpu_check.summarize_kernels([kernel_row("chain_accept", 1, True),
                                       kernel_row("sequential_head", 32, False, "tokens_equal=0.500 first_q_close=False")])
    assert bad.status == FAILED and "sequential_head@32: tokens_equal=0.500" in bad.detail
    unchecked = gpu_check.summarize_kernels([kernel_row("chain_accept", 1, None, None)])
    assert unchecked.status == FAILED  # a kernel timed without its check is not a pass


def test_kernels_without_cuda_are_not_run():
    result = gpu_check.summarize_kernels([{"device": "cpu", "status": "unmeasured", "reason": "no CUDA device"}])
    assert (result.status, result.detail) == (NOT_RUN, "no CUDA device")


def engines_doc(**overrides):
    configs = {
        "plain": {"output_ids": [[1, 2], [3, 4]], "batch1_tok_s": 100.0, "batch_tok_s": 1000.0},
        "dspark:dspark": {"output_ids": [[1, 2], [3, 4]], "batch1_tok_s": 150.0, "batch_tok_s": 900.0,
                          "parity": {"identical": 2, "total": 2}, "tokens_per_round": 2.5, "worker": "dspark-sglang"},
    }
    configs.update(overrides)
    return {"batch": 32, "configs": configs}


def test_engines_pass_with_parity_and_report_speed_ratios():
    result = gpu_check.summarize_engines(engines_doc())
    assert result.status == PASSED
    assert "dspark:dspark: b1 150.0 tok/s (1.50x plain), b32 900.0 tok/s (0.90x), greedy parity 2/2" in result.detail


def test_engines_fail_on_a_parity_break_or_an_error():
    broken = engines_doc(**{"dspark:dflash": {"output_ids": [[1, 2], [3, 5]], "batch1_tok_s": 1.0, "batch_tok_s": 1.0,
                                              "parity": {"identical": 1, "total": 2}}})
    assert gpu_check.summarize_engines(broken).status == FAILED
    crashed = engines_doc(**{"builtin:dspark": {"error": "RuntimeError: boom"}})
    result = gpu_check.summarize_engines(crashed)
    assert result.status == FAILED and "builtin:dspark: ERROR RuntimeError: boom" in result.detail
    no_plain = gpu_check.summarize_engines({"configs": {"plain": {"error": "OSError: no GPU"}}})
    assert no_plain.status == FAILED and "OSError: no GPU" in no_plain.detail


def test_engines_without_sglang_are_not_run(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "package_version", lambda name: None if name == "sglang" else "1.0")
    result = gpu_check.step_engines("cuda", tmp_path, "", 60)
    assert result.status == NOT_RUN and "sglang is not installed" in result.detail


def test_env_without_a_gpu_fails_on_cuda(monkeypatch):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert gpu_check.step_env("cuda").status == FAILED
    assert gpu_check.step_env("cpu").status == PASSED


def test_summary_table_and_exit_code(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "step_env", lambda device: gpu_check.StepResult("env", PASSED, "a | b"))
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "env", "--device", "cpu"]) == 0
    assert (tmp_path / "summary.md").read_text().splitlines()[2] == "| env | passed | 0 | a / b |"
    monkeypatch.setattr(gpu_check, "step_env", lambda device: gpu_check.StepResult("env", FAILED, "x"))
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "env"]) == 1
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--out", str(tmp_path), "--steps", "env,bogus"])


def configs(device, devices, **kw):
    args = argparse.Namespace(device=device, drafters="dspark,dflash,eagle3", no_builtin=False, tp=0, **kw)
    return [(name, env) for name, _, env in gpu_engines.configurations(args, devices)]


def test_engine_configurations_per_host():
    assert configs("cpu", 1) == [("plain", {}), ("dspark:dspark", {"DSPARK_USE_BUILTIN": "0"}),
                                 ("dspark:dflash", {"DSPARK_USE_BUILTIN": "0"}), ("dspark:eagle3", {"DSPARK_USE_BUILTIN": "0"}),
                                 ("dspark:dspark@tiers", {"DSPARK_USE_BUILTIN": "0", "DSPARK_VERIFY_TIERS": "auto"})]
    one_gpu = configs("cuda", 1)
    assert ("builtin:dspark", {"DSPARK_USE_BUILTIN": "1"}) in one_gpu  # the built-in only runs on CUDA
    assert not any("@tp" in name for name, _ in one_gpu)
    assert configs("cuda", 2)[-1] == ("dspark:dspark@tp2", {"DSPARK_USE_BUILTIN": "0"})


def test_float32_on_every_device():
    assert gpu_engines.engine_kwargs("cuda")["dtype"] == "float32"
    assert gpu_engines.engine_kwargs("cpu")["dtype"] == "float32"
