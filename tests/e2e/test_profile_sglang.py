"""dspark-profile's SGLang backend: verify-shaped EXTEND steps on SGLang's own ModelRunner (CPU).

Runs the CLI in a subprocess (the runner publishes process-wide SGLang state) on a tiny random
Llama; about 30 s, most of it importing sglang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dspark_sglang.cost_table import SpsTable, load_cost_table

pytestmark = pytest.mark.e2e


def test_profile_sglang_backend_cpu(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    out = tmp_path / "sps.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dspark_sglang.calibration.profile", "--backend", "sglang",
         "--model", str(model_dir), "--device", "cpu", "--dtype", "float32",
         "--batch-tokens", "1,4,8,16", "--width", "8", "--context-len", "32", "--warmup", "1",
         "--repeats", "3", "--out", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = load_cost_table(out)
    assert isinstance(table, SpsTable) and table.sample_batch_tokens == [1, 4, 8, 16]
    samples = json.loads(out.with_name("sps.samples.json").read_text())
    assert samples["meta"]["runner"].startswith("sglang ModelRunner (torch_native")
    assert [(p["num_reqs"], p["width"]) for p in samples["probes"]] == [(1, 1), (1, 4), (1, 8), (2, 8)]
    assert out.with_suffix(".png").exists()
