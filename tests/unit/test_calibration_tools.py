"""dspark-calibrate and dspark-profile end to end (CLI in-process), plus the sweep helpers.

The profile test runs the transformers backend on a tiny random Llama saved to tmp_path; the SGLang
backend is exercised by tests/e2e/test_profile_sglang.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark_sglang.calibration import calibrate, profile
from dspark_sglang.calibration.sweep import Shape, run_sweep, samples_path, shape_for, staircase
from dspark_sglang.confidence import CalibrationRecords, ProposalProbEstimator, StsCalibration
from dspark_sglang.cost_table import SpsTable, load_cost_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRUE_TEMPS = [0.5, 1.0, 2.0, 0.8]


def synthetic_records(n, temps, seed=0, censor=False) -> CalibrationRecords:
    """z ~ N(1, 2²); draft k accepted (given the prefix) w.p. sigmoid(z_k / T_k)."""
    gen = torch.Generator().manual_seed(seed)
    gamma = len(temps)
    z = 1.0 + 2.0 * torch.randn(n, gamma, generator=gen)
    accept = torch.rand(n, gamma, generator=gen) < torch.sigmoid(z / torch.tensor(temps))
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)
    lens = torch.randint(1, gamma + 1, (n,), generator=gen) if censor else torch.full((n,), gamma)
    return CalibrationRecords(z, torch.minimum(num_accepted, lens), lens)


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# dspark-calibrate


@pytest.mark.parametrize("censor", [False, True])
def test_calibrate_recovers_known_temperatures(tmp_path, censor, capsys):
    rec = tmp_path / "records.safetensors"
    synthetic_records(40_000, TRUE_TEMPS, seed=1, censor=censor).save(rec)
    out = tmp_path / "sts.json"
    assert calibrate.main([str(rec), "--out", str(out)]) == 0

    sts = StsCalibration.load(out)  # the core's reader accepts what the tool wrote
    grid_step = 2.0 / 40  # decades between SGLang's grid points
    for fitted, true in zip(sts.temperatures, TRUE_TEMPS):
        assert abs(math.log10(fitted / true)) <= 2.5 * grid_step, sts.temperatures
    assert sts.num_samples == 20_000  # the fit half
    assert sts.dataset == "records.safetensors"
    assert set(json.loads(out.read_text())) == {"temperatures", "dataset", "num_samples",
                                                "ece_before", "ece_after"}

    report = json.loads((tmp_path / "sts.report.json").read_text())
    assert report["fit_rounds"] == report["held_out_rounds"] == 20_000
    raw, after = report["held_out"]["raw"], report["held_out"]["STS"]
    assert raw["ece"][0] > 0.05 > after["ece"][0]  # T_1 = 0.5 is far from 1
    assert after["mean_ece"] < raw["mean_ece"]
    assert is_png(tmp_path / "sts.png")
    printed = capsys.readouterr().out
    assert "STS temperatures" in printed and "held-out" in printed


def test_calibrate_split_options(tmp_path):
    rec = tmp_path / "r.npz"
    synthetic_records(400, TRUE_TEMPS, seed=2).save(rec)
    reports = {}
    for name, extra in {"order": [], "seed": ["--seed", "7"], "all": ["--holdout-fraction", "0"],
                        "quarter": ["--holdout-fraction", "0.25", "--gamma", "2"]}.items():
        out = tmp_path / f"{name}.json"
        assert calibrate.main([str(rec), "--out", str(out), "--no-plot", *extra]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.report.json").read_text())
        assert not (tmp_path / f"{name}.png").exists()
    assert reports["order"]["held_out_rounds"] == 200
    assert reports["all"]["fit_rounds"] == reports["all"]["held_out_rounds"] == 400
    assert reports["quarter"]["held_out_rounds"] == 100 and reports["quarter"]["gamma"] == 2
    assert len(StsCalibration.load(tmp_path / "quarter.json").temperatures) == 2
    # A random split holds out different rounds than the order split.
    assert reports["seed"]["held_out"]["raw"]["ece"] != reports["order"]["held_out"]["raw"]["ece"]


def test_calibrate_holds_out_whole_prompts(tmp_path, capsys):
    # Two files of 10 prompts x 30 rounds; prompt ids restart per file (as dspark-eval writes them).
    files = []
    for i in range(2):
        rec = synthetic_records(300, TRUE_TEMPS, seed=10 + i)
        rec = CalibrationRecords(rec.conf_logits, rec.num_accepted, rec.verify_lens,
                                 prompt_ids=torch.arange(10).repeat_interleave(30))
        files.append(tmp_path / f"set{i}.safetensors")
        rec.save(files[-1])
    reports = {}
    for name, extra in {"order": [], "seed": ["--seed", "3"], "rounds": ["--holdout-unit", "round", "--seed", "3"],
                        "fifth": ["--holdout-fraction", "0.2", "--seed", "3"]}.items():
        out = tmp_path / f"{name}.json"
        assert calibrate.main([*map(str, files), "--out", str(out), "--no-plot", *extra]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.report.json").read_text())
    order = reports["order"]
    assert order["holdout_unit"] == "prompt" and order["fit_prompts"] == order["held_out_prompts"] == 10
    assert order["held_out_rounds"] == 300  # the last 10 prompts: all of the second file
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps the table title
    assert "300 rounds of 10 held-out prompts (fit on 300 of 10)" in printed
    fifth = reports["fifth"]
    assert (fifth["held_out_prompts"], fifth["held_out_rounds"], fifth["fit_prompts"]) == (4, 120, 16)
    # Whole prompts only: every held-out round count is a multiple of a prompt's 30 rounds ...
    assert reports["seed"]["held_out_rounds"] % 30 == 0
    # ... and a round split is a different split of the same records.
    rounds = reports["rounds"]
    assert rounds["holdout_unit"] == "round" and rounds["held_out_rounds"] == 300
    assert rounds["held_out"]["raw"]["ece"] != reports["seed"]["held_out"]["raw"]["ece"]


def test_calibrate_prompt_split_needs_prompt_ids(tmp_path, capsys):
    plain = tmp_path / "plain.npz"
    synthetic_records(40, TRUE_TEMPS).save(plain)
    _expect_input_error(capsys, calibrate.main([str(plain), "--holdout-unit", "prompt"]),
                        "--holdout-unit prompt", "no prompt ids", "--holdout-unit round")
    few = tmp_path / "few.npz"
    rec = synthetic_records(40, TRUE_TEMPS)
    CalibrationRecords(rec.conf_logits, rec.num_accepted, rec.verify_lens,
                       prompt_ids=torch.zeros(40, dtype=torch.long)).save(few)
    _expect_input_error(capsys, calibrate.main([str(few)]), "leaves 1 fit and 0 held-out prompts of 1")


def test_calibrate_estimator_and_several_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    synthetic_records(3000, [1.0, 1.0, 1.0], seed=3).save(a)
    synthetic_records(3000, [1.0, 1.0, 1.0], seed=4).save(b)
    est = tmp_path / "est.json"
    out = tmp_path / "sts.json"
    assert calibrate.main([str(a), str(b), "--out", str(out), "--estimator", str(est)]) == 0
    estimator = ProposalProbEstimator.load(est)
    assert estimator.gamma == 3 and estimator.num_samples == 3000
    report = json.loads((tmp_path / "sts.report.json").read_text())
    assert report["rounds"] == 6000 and set(report["held_out"]) == {"raw", "est", "est+STS"}
    assert is_png(tmp_path / "sts.png")


def _expect_input_error(capsys, code, *needles):
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_calibrate_refuses_malformed_records(tmp_path, capsys):
    from safetensors.torch import save_file

    missing = tmp_path / "missing.safetensors"
    save_file({"conf_logits": torch.zeros(2, 3), "num_accepted": torch.zeros(2, dtype=torch.int64)},
              str(missing))
    _expect_input_error(capsys, calibrate.main([str(missing), "--out", str(tmp_path / "s.json")]),
                        "missing.safetensors", "verify_lens", "missing")

    bad = tmp_path / "bad.safetensors"
    save_file({"conf_logits": torch.zeros(2, 3), "num_accepted": torch.tensor([4, 0]),
               "verify_lens": torch.tensor([3, 3])}, str(bad))
    _expect_input_error(capsys, calibrate.main([str(bad)]), "bad.safetensors", "num_accepted")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    _expect_input_error(capsys, calibrate.main([str(garbage)]), "garbage.safetensors")

    wrong_suffix = tmp_path / "records.pt"
    wrong_suffix.write_bytes(b"")
    _expect_input_error(capsys, calibrate.main([str(wrong_suffix)]), "records.pt", ".safetensors")

    a, b = tmp_path / "g3.npz", tmp_path / "g2.npz"
    synthetic_records(10, [1.0] * 3).save(a)
    synthetic_records(10, [1.0] * 2).save(b)
    _expect_input_error(capsys, calibrate.main([str(a), str(b)]), "g3.npz", "g2.npz", "different")

    never = tmp_path / "never.npz"  # position 2 never verified
    CalibrationRecords(torch.zeros(8, 2), torch.zeros(8, dtype=torch.int64),
                       torch.ones(8, dtype=torch.int64)).save(never)
    _expect_input_error(capsys, calibrate.main([str(never), "--out", str(tmp_path / "n.json")]),
                        "never.npz", "position 1 was never verified", "--gamma")


# ---------------------------------------------------------------------------------------------
# dspark-profile


def test_shapes_and_staircase():
    assert shape_for(8, 8) == Shape(8, 1, 8)
    assert shape_for(12, 8) == Shape(12, 2, 6)
    assert shape_for(64, 8) == Shape(64, 8, 8)
    assert shape_for(7, 4) == Shape(7, 7, 1)  # a prime above the width: decode-shaped
    assert shape_for(5, 1).widths == [1] * 5
    assert staircase(1, 64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert staircase(5, 20) == [5, 6, 8, 12, 16, 20]
    with pytest.raises(ValueError):
        shape_for(0, 8)


def test_run_sweep_warms_up_and_repeats_every_shape():
    calls = []

    def step(widths):
        calls.append(sum(widths))
        return 0.01 * sum(widths), 0.005 * sum(widths)  # (wall, cpu): preempted half the time

    shapes = [shape_for(b, 4) for b in (1, 4, 8)]
    probes = run_sweep(step, shapes, warmup=2, repeats=3, seed=0)
    assert calls[:6] == [1, 1, 4, 4, 8, 8]  # warm-up pass, in order
    assert sorted(calls[6:]) == [1, 1, 1, 4, 4, 4, 8, 8, 8]
    assert [p.seconds for p in probes] == [[0.01] * 3, [0.04] * 3, [0.08] * 3]
    assert probes[1].preempted_fraction == pytest.approx(0.5)
    on_cpu = run_sweep(step, shapes, warmup=0, repeats=1, clock="cpu")
    assert [p.median_seconds for p in on_cpu] == [0.005, 0.02, 0.04]
    with pytest.raises(ValueError):
        run_sweep(step, shapes, warmup=0, repeats=1, clock="gpu")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama, hidden 64, random weights, saved without a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_profile_transformers_backend_end_to_end(tmp_path, tiny_llama, capsys):
    out = tmp_path / "prof" / "sps.json"
    argv = ["--backend", "transformers", "--model", str(tiny_llama), "--device", "cpu",
            "--dtype", "float32", "--batch-tokens", "1,2,4,8,12", "--width", "4",
            "--context-len", "16", "--warmup", "1", "--repeats", "3", "--out", str(out), "--quiet"]
    assert profile.main(argv) == 0

    table = load_cost_table(out)  # SGLang's SPS layout, validated by the core reader
    assert isinstance(table, SpsTable)
    assert table.sample_batch_tokens == [1, 2, 4, 8, 12] and table.max_batch_tokens == 12
    assert all(r > 0 for r in table.sample_steps_per_sec)
    assert set(json.loads(out.read_text())) == {"sample_batch_tokens", "sample_steps_per_sec",
                                                "max_batch_tokens"}
    samples = json.loads(samples_path(out).read_text())
    shapes = [(p["num_reqs"], p["width"]) for p in samples["probes"]]
    assert shapes == [(1, 1), (1, 2), (1, 4), (2, 4), (3, 4)]
    assert all(len(p["seconds"]) == 3 for p in samples["probes"])
    # The table's rate is the median over repeats (3 repeats: the middle one).
    for p, rate in zip(samples["probes"], table.sample_steps_per_sec):
        assert rate == pytest.approx(1.0 / sorted(p["seconds"])[1])
    assert samples["fit"]["knee_batch_tokens"] in table.sample_batch_tokens
    assert samples["fit"]["slope_seconds_per_token"] >= 0
    assert samples["meta"]["backend"] == "transformers" and "loadavg" in samples["meta"]["host_before"]
    assert samples["meta"]["clock"] == "cpu"  # auto: one torch thread on a CPU
    assert all(len(p["wall_seconds"]) == len(p["cpu_seconds"]) == 3 for p in samples["probes"])
    assert is_png(out.with_suffix(".png"))
    assert "wrote" in capsys.readouterr().out

    # A table agrees with itself; a perturbed copy is caught by the tolerance.
    assert profile.main(["--compare", str(out), str(out)]) == 0
    assert "max relative steps/s difference 0.0%" in capsys.readouterr().out
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps({**json.loads(out.read_text()), "sample_steps_per_sec":
                                  [0.8 * r for r in table.sample_steps_per_sec]}))
    assert profile.main(["--compare", str(out), str(slower), "--tolerance", "0.1"]) == 1
    assert "20.0%" in capsys.readouterr().out
    assert profile.main(["--compare", str(out), str(slower), "--tolerance", "0.25"]) == 0
    # A uniformly slower machine has the same shape; a bent curve does not.
    capsys.readouterr()
    assert profile.main(["--compare", str(out), str(slower), "--tolerance", "0.01", "--compare-on", "shape"]) == 0
    assert "0.800x" in capsys.readouterr().out
    bent = tmp_path / "bent.json"
    rates = list(table.sample_steps_per_sec)
    rates[-1] *= 0.7
    bent.write_text(json.dumps({**json.loads(out.read_text()), "sample_steps_per_sec": rates}))
    assert profile.main(["--compare", str(out), str(bent), "--tolerance", "0.1", "--compare-on", "shape"]) == 1


def test_profile_refuses_malformed_tables(tmp_path, tiny_llama, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"sample_batch_tokens": [1, 8], "sample_steps_per_sec": [20.0, 10.0],
                                "max_batch_tokens": 8}))
    cases = {
        "notjson.json": ("{not json", "not valid JSON"),
        "unsorted.json": (json.dumps({"sample_batch_tokens": [8, 1], "sample_steps_per_sec": [1.0, 2.0],
                                      "max_batch_tokens": 8}), "sample_batch_tokens"),
        "zero.json": (json.dumps({"sample_batch_tokens": [1], "sample_steps_per_sec": [0.0],
                                  "max_batch_tokens": 1}), "sample_steps_per_sec[0]"),
        "additive.json": (json.dumps({"bias_seconds": 0.01, "bs_probes": [1], "alpha_seconds": [0.0],
                                      "m_probes": [1], "theta_seconds": [0.0]}), "additive"),
    }
    for name, (text, needle) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        _expect_input_error(capsys, profile.main(["--compare", str(good), str(path)]), name, needle)
    _expect_input_error(capsys, profile.main(["--compare", str(tmp_path / "absent.json"), str(good)]),
                        "absent.json", "cannot read")
    # A bad reference is refused before any profiling starts.
    _expect_input_error(capsys, profile.main(["--backend", "transformers", "--model", str(tiny_llama),
                                              "--compare", str(tmp_path / "notjson.json")]),
                        "notjson.json")
    _expect_input_error(capsys, profile.main(["--backend", "transformers", "--model",
                                              str(tmp_path / "no-such-model")]), "not a directory")
    try:  # the CPU clock is only meaningful with one torch thread
        _expect_input_error(capsys, profile.main(["--backend", "transformers", "--model", str(tiny_llama),
                                                  "--device", "cpu", "--clock", "cpu", "--threads", "2"]),
                            "--clock cpu needs")
    finally:
        torch.set_num_threads(1)
