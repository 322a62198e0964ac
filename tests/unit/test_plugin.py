"""Plugin registration on the real, installed SGLang (each scenario in a fresh process)."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("_plugin_probe.py")


def run_probe(mode: str, algorithm: str = "DSPARK", draft: str | None = None, device: str = "cpu",
              model: str = "dummy", **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DSPARK_")}
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, str(PROBE), mode, algorithm, draft or "", device, model], env=environ,
        capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"probe failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("PROBE "):])
    result["stderr"] = proc.stderr
    return result


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert names.get("dspark") == "dspark_sglang.sglang.plugin:register"


def test_signature_table_matches_installed_sglang():
    from dspark_sglang.sglang.signatures import check_sglang

    assert check_sglang() == []


def test_signature_check_reports_a_changed_signature(monkeypatch):
    from dspark_sglang.sglang import signatures

    bogus = signatures.Internal("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.register", "call",
                                ("name", "a_parameter_sglang_never_had"))
    monkeypatch.setattr(signatures, "SGLANG_INTERNALS", [bogus])
    problems = signatures.check_sglang(installed_version="0.5.22")
    assert any("0.5.22" in p and "0.5.23" in p for p in problems)
    assert any("a_parameter_sglang_never_had" in p for p in problems)


def test_dspark_flag_is_taken_over():
    out = run_probe("normal")
    assert out["registered"] and out["refusal"] is None
    assert out.get("resolved") == "DSPARK_PLUGIN", out


def test_malformed_custom_params_are_refused_by_sglangs_request_check():
    # The tokenizer manager calls SamplingParams.verify on every request; a ValueError there is a 400.
    checks = run_probe("normal")["custom_params"]
    assert checks["good"] == "ok"
    assert "custom_params.dspark.max_verify_len" in checks["bad"] and "-1" in checks["bad"]


def test_opt_out_leaves_dspark_to_the_builtin():
    out = run_probe("normal", DSPARK_USE_BUILTIN="1")
    assert out.get("resolved") == "DSPARK", out
    # Our worker stays reachable under its own name.
    assert run_probe("normal", "DSPARK_PLUGIN", DSPARK_USE_BUILTIN="1").get("resolved") == "DSPARK_PLUGIN"


def test_mismatch_refuses_loudly_and_dspark_fails_with_the_reason():
    out = run_probe("mismatch")
    assert not out["registered"]
    assert "refused to register" in out["stderr"] and "sglang 0.6.0" in out["stderr"]
    assert "RuntimeError" in out.get("error", "") and "sglang 0.6.0" in out["error"], out
    assert "DSPARK_USE_BUILTIN" in out["error"]


SPECULATORS_DRAFT = Path(__file__).resolve().parents[1] / "fixtures" / "drafters" / "speculators_dspark_vanilla"


def test_speculators_drafter_config_resolves():
    """SGLang reads the draft path's config with AutoConfig while resolving arguments; a speculators
    config.json has no top-level model_type, so without speculators_config.py's hook that fails."""
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="model_type"):
        AutoConfig.from_pretrained(SPECULATORS_DRAFT)
    out = run_probe("normal", draft=str(SPECULATORS_DRAFT))
    assert out.get("resolved") == "DSPARK_PLUGIN", out


def test_speculators_hook_answers_with_the_nested_decoder_config(tmp_path):
    from dspark_sglang.sglang.speculators_config import answer_speculators

    config = answer_speculators(None, SPECULATORS_DRAFT)  # a speculators directory: never calls SGLang's
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen3", 64, 2)
    assert config.architectures == ["DSparkDraftModel"]
    other = tmp_path / "plain"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "qwen3"}')
    assert answer_speculators(lambda model, *a, **k: ("sglang", model), other) == ("sglang", other)
    assert answer_speculators(lambda model, *a, **k: "sglang", "HuggingFaceTB/SmolLM2-135M") == "sglang"


ZOO = Path(__file__).resolve().parents[2] / "dspark_sglang" / "zoo"


@pytest.mark.parametrize("on_cuda, fmt, env, owner", [
    (False, "deepspec_dspark", {}, "plugin"),  # the built-in is CUDA-only
    (True, "deepspec_dflash", {}, "plugin"),  # ... and serves DeepSpec DSpark checkpoints only
    (True, "specforge_eagle3", {}, "plugin"),
    (True, None, {}, "plugin"),  # unreadable here: our worker reports the checkpoint's error
    (True, "deepspec_dspark", {}, "builtin"),  # graphs and overlap: the built-in keeps DSPARK
    (True, "deepspec_dspark", {"DSPARK_USE_BUILTIN": "0"}, "plugin"),
    (False, "deepspec_dspark", {"DSPARK_USE_BUILTIN": "1"}, "builtin"),
])
def test_takeover_policy(on_cuda, fmt, env, owner):
    from dspark_sglang.sglang.settings import dspark_owner

    who, why = dspark_owner(on_cuda, fmt, env)
    assert who == owner and why  # the reason goes to the startup log


def test_a_cuda_server_declines_the_graphs_our_round_never_replays():
    # ServerArgs of a CUDA server, resolved with the plugin on a machine without a GPU: SGLang's graph
    # runner would send our no-draft DECODE forwards (hidden states on) to TARGET_VERIFY graphs
    # captured without them. The plugin turns graph capture off; the built-in keeps its own settings.
    from dspark_sglang.models import ensure_target

    target = str(ensure_target(progress=False))
    ours = run_probe("normal", draft=str(ZOO / "smollm2-135m-dflash"), device="cuda", model=target)
    assert ours.get("resolved") == "DSPARK_PLUGIN" and ours["disable_cuda_graph"] is True, ours
    builtin = run_probe("normal", draft=str(ZOO / "smollm2-135m-dspark"), device="cuda", model=target)
    assert builtin.get("resolved") == "DSPARK", builtin  # a DeepSpec DSpark checkpoint on CUDA
    assert "left to SGLang's built-in worker" in builtin["stderr"]
    forced = run_probe("normal", draft=str(ZOO / "smollm2-135m-dspark"), device="cuda", model=target,
                       DSPARK_USE_BUILTIN="0")
    assert forced.get("resolved") == "DSPARK_PLUGIN" and forced["disable_cuda_graph"] is True, forced


def test_dp_attention_is_refused_with_a_clear_error():
    """Our verify changes the per-rank token counts DP attention gathers before the forward: the
    server must refuse at startup, naming the flag and the alternative, before anything is loaded."""
    from types import SimpleNamespace

    from dspark_sglang.sglang.spec_class import make_spec_class

    spec = make_spec_class()("DSPARK_PLUGIN", factory=None)
    args = SimpleNamespace(enable_dp_attention=True, speculative_draft_model_path=str(ZOO / "smollm2-135m-dspark"))
    with pytest.raises(ValueError, match="does not support --enable-dp-attention.*DSPARK_USE_BUILTIN=1"):
        spec.handle_server_args(args)
