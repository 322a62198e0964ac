"""scripts/gpu_check.sh's driver on the CPU (`--device cpu`): the same steps a GPU host runs, at tiny
sizes (kernels under the interpreter, one zoo drafter, 2 prompts x 8 tokens), so the script a GPU
session runs first is known to work before a GPU is ever lent."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "dspark_sglang.benchmarks.gpu_check", "--device", "cpu", "--out", str(tmp_path),
           "--budget", "900", "--engine-args", "--drafters dspark --prompts 2 --batch 2 --max-new-tokens 8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads((tmp_path / "summary.json").read_text())}
    assert [steps[n]["status"] for n in ("env", "kernels", "engines")] == ["passed"] * 3
    engines = json.loads((tmp_path / "engines.json").read_text())["configs"]
    assert set(engines) == {"plain", "dspark:dspark", "dspark:dspark@tiers"}
    assert engines["dspark:dspark"]["parity"] == {"identical": 2, "total": 2}
    assert engines["dspark:dspark@tiers"]["parity"] == {"identical": 2, "total": 2}
    assert engines["dspark:dspark"]["worker"] == "dspark-sglang"
    assert "greedy parity 2/2" in (tmp_path / "summary.md").read_text()
