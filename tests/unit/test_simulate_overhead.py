"""The simulator's worker-overhead term (fitted from a round-cost results.json) and the provenance
of every cost curve it uses: exact fits on synthetic files, the committed measurement, clear errors
for malformed files, hand-derived simulated times, and the printed/stored provenance."""

import json
import math
from pathlib import Path

import pytest
import torch

from dspark_sglang.benchmarks import simulate
from dspark_sglang.benchmarks.cost_provenance import (
    cost_model_provenance, curve_provenance, draft_provenance, format_provenance, overhead_provenance)
from dspark_sglang.benchmarks.metrics import summarize_level
from dspark_sglang.benchmarks.sim_engine import RoundPool, SimSetup, parse_scheduler_spec, simulate_level
from dspark_sglang.benchmarks.worker_overhead import RoundCostError, WorkerOverhead, fit_nonnegative
from dspark_sglang.confidence import CalibrationRecords
from dspark_sglang.cost_table import SpsTable

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "examples" / "bench" / "round-cost" / "s3-few-rows-gemm" / "results.json"

# 100 steps/s up to 64 batch tokens, then step time B/6400 s (as in test_bench.py).
FLAT_THEN_LINEAR = SpsTable([1, 64, 128, 640, 1280], [100.0, 100.0, 50.0, 10.0, 5.0], 1280, interpolation="linear")


# ------------------------------------------------------------------------------------------------
# Fitting


def _point(batch, ctx, plain_ms, overhead_by_window, draft_ms, verify_ratio=1.3):
    """A round-cost point whose windows have the given worker overhead (ms) each."""
    draft_ratio = draft_ms / plain_ms
    windows = {str(w): {"rounds": 4, "draft_ratio": draft_ratio, "verify_ratio": verify_ratio,
                        "accept_ratio": 0.0, "commit_ratio": 0.0,
                        "round_ratio": verify_ratio + draft_ratio + ms / plain_ms, "bookkeeping_share": 0.0}
               for w, ms in overhead_by_window.items()}
    return {"batch": batch, "context": ctx, "context_tokens": float(ctx), "plain_ms": plain_ms,
            "draft_ratio": draft_ratio, "rounds": 16, "windows": windows}


def _results(points, **extra):
    doc = {"args": {"batches": [1, 4, 16]}, "drafter": "zoo/dspark", "points": points,
           "command": "python -m dspark_sglang.benchmarks.round_cost --batches 1,4,16"}
    doc.update(extra)
    return doc


A, B, C = 2.0, 0.75, 0.0005  # ms, ms/request, ms/context token
DA, DB = 8.0, 3.0  # draft: ms, ms/request


def _synthetic_points():
    points = []
    for batch in (1, 4, 16):
        for ctx in (128, 2048):
            true = A + B * batch + C * batch * ctx
            # W = 1 is left out of the fit; W = 8 is one slow window that the median over the
            # windows >= 2 (2, 4, 8) ignores.
            points.append(_point(batch, ctx, 40.0 + batch * 5 + ctx / 100, {1: 0.1, 2: true, 4: true, 8: 10 * true},
                                 DA + DB * batch))
    # A point the benchmark wrote without complete rounds: skipped.
    points.append({"batch": 64, "context": 2048, "seconds": 1.0, "windows": {}})
    return points


def test_fit_recovers_known_coefficients(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results(_synthetic_points())))
    fit = WorkerOverhead.from_round_cost(path)
    assert fit.base_ms == pytest.approx(A, rel=1e-9)
    assert fit.per_req_ms == pytest.approx(B, rel=1e-9)
    assert fit.per_ctx_token_ms == pytest.approx(C, rel=1e-9)
    assert fit.draft_base_ms == pytest.approx(DA, rel=1e-9) and fit.draft_per_req_ms == pytest.approx(DB, rel=1e-9)
    assert fit.source["points"] == 6 and fit.source["fitted_terms"] == ["a", "b", "c"]
    assert fit.source["rms_residual_ms"] == pytest.approx(0.0, abs=1e-9)
    assert fit.source["command"].startswith("python -m dspark_sglang.benchmarks.round_cost")
    # 4 requests holding 1000 context tokens: 2 + 0.75 * 4 + 0.0005 * 1000 = 5.5 ms.
    assert fit.seconds(4, 1000) == pytest.approx(0.0055, rel=1e-9)


def test_fit_is_never_negative_and_fixes_unidentifiable_terms():
    ones = torch.ones(3).numpy()
    reqs = torch.tensor([1.0, 2.0, 3.0]).numpy()
    # The best unconstrained line has a negative intercept (y = -1 + 2R); the constrained fit is >= 0.
    coef, used = fit_nonnegative([ones, reqs], reqs * 2 - 1)
    assert used == [True, True] and min(coef) >= 0
    # One batch size only: R is collinear with the intercept, so b is fixed at 0.
    coef, used = fit_nonnegative([ones, 4 * ones], 3 * ones)
    assert used == [True, False] and coef == pytest.approx([3.0, 0.0])


def test_committed_round_cost_file_gives_finite_nonnegative_coefficients():
    fit = WorkerOverhead.from_round_cost(COMMITTED)
    values = [fit.base_ms, fit.per_req_ms, fit.per_ctx_token_ms, fit.draft_base_ms, fit.draft_per_req_ms]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert fit.source["points"] == 4 and fit.source["drafter"] == "dspark_sglang/zoo/smollm2-135m-dspark"
    # The committed measurement's fit (4 points: batches 1, 16 x contexts 128, 2048).
    assert fit.base_ms == pytest.approx(2.2392, abs=1e-4) and fit.per_req_ms == pytest.approx(2.7696, abs=1e-4)
    assert fit.per_ctx_token_ms == 0.0
    assert fit.draft_base_ms == pytest.approx(8.2492, abs=1e-4) and fit.draft_per_req_ms == pytest.approx(3.0, abs=1e-4)


def _write(tmp_path, content) -> Path:
    path = tmp_path / "results.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _one_point(**changes):
    point = _point(1, 128, 50.0, {2: 3.0}, 10.0)
    point.update(changes)
    return point


def _window_without(key):
    point = _one_point()
    del point["windows"]["2"][key]
    return point


MALFORMED = [
    ("not json", "{not json", "not JSON"),
    ("a list", [], "expected a JSON object"),
    ("no points", {"args": {}, "drafter": None, "command": "x"}, "missing field 'points'"),
    ("no command", {"args": {}, "drafter": None, "points": []}, "missing field 'command'"),
    ("points not a list", _results({"a": 1}), "field 'points' must be a list"),
    ("point not an object", _results([3]), "field 'points[0]' must be an object"),
    ("nan plain_ms", _results([_one_point(plain_ms=float("nan"))]), "field 'points[0].plain_ms' is not finite"),
    ("string batch", _results([_one_point(batch="16")]), "field 'points[0].batch' must be a number"),
    ("no context", _results([{k: v for k, v in _one_point().items() if k != "context_tokens"}]),
     "missing field 'points[0].context_tokens'"),
    ("infinite round",
     _results([_one_point(windows={"2": {**_one_point()["windows"]["2"], "round_ratio": math.inf}})]),
     "field 'points[0].windows.2.round_ratio' is not finite"),
    ("no verify ratio", _results([_window_without("verify_ratio")]),
     "missing field 'points[0].windows.2.verify_ratio'"),
    ("bad window key", _results([_one_point(windows={"two": {}})]), "field 'points[0].windows.two'"),
    ("only W = 1", _results([_point(1, 128, 50.0, {1: 3.0}, 10.0)]), "no usable points in 'points'"),
    ("no complete rounds", _results([{"batch": 1, "context": 128, "windows": {}}]), "no usable points in 'points'"),
]


@pytest.mark.parametrize("content,message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_round_cost_files_name_the_file_and_field(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(RoundCostError) as err:
        WorkerOverhead.from_round_cost(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI reports ValueErrors as clean errors


def test_missing_round_cost_file(tmp_path):
    with pytest.raises(RoundCostError, match="no such round-cost results file"):
        WorkerOverhead.from_round_cost(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------------
# Simulated time


def fixed_pool(gamma=4, accepted=3, rounds=64, conf=0.9):
    logits = torch.full((rounds, gamma), math.log(conf / (1 - conf)))
    recs = CalibrationRecords(logits, torch.full((rounds,), accepted), torch.full((rounds,), gamma))
    return RoundPool("fixed", recs)


def test_overhead_per_round_is_hand_derivable():
    # Verify-all commits 4 tokens per round at B = 5 (flat region: 0.01 s a round). A 10 ms
    # overhead doubles the round: 400 -> 200 tok/s per user. Output 1 + 48: 12 rounds.
    base = SimSetup(FLAT_THEN_LINEAR, [fixed_pool()], output_len=1 + 48)
    slow = SimSetup(FLAT_THEN_LINEAR, [fixed_pool()], output_len=1 + 48, worker_overhead=WorkerOverhead(10.0))
    kw = dict(seed=0, concurrency=1, max_requests=4)
    va = lambda setup: summarize_level(simulate_level(setup, parse_scheduler_spec("verify-all"), **kw))
    assert va(base).per_user == pytest.approx(400.0) and va(slow).per_user == pytest.approx(200.0)


def test_overhead_context_term_counts_prompt_and_tokens_so_far():
    # prompt 16 tokens (prefill: one 0.01 s step), then round k (k = 0..11) holds 16 + 1 + 4k context
    # tokens: overhead 0.01 ms x (17 + 4k), Σ = 0.01 x (12·17 + 4·66) = 4.68 ms over the 12 rounds.
    over = WorkerOverhead(per_ctx_token_ms=0.01)
    setup = SimSetup(FLAT_THEN_LINEAR, [fixed_pool()], output_len=1 + 48, prompt_len=16, worker_overhead=over)
    (rec,) = simulate_level(setup, parse_scheduler_spec("verify-all"), seed=0, concurrency=1, max_requests=1)
    assert rec.chunk_tokens == [1] + [1 + 4 * k for k in range(1, 13)]
    assert rec.chunk_times[1] == pytest.approx(0.01 + 0.01 + 0.01 * 17 / 1e3)
    assert rec.t_end == pytest.approx(0.01 + 12 * 0.01 + 4.68e-3)


def test_overhead_slows_speculation_and_leaves_plain_decoding_alone():
    # Common random numbers: the same seed for both engines, so only the overhead differs.
    pool = simulate.synthetic_pool([0.9, 0.7, 0.5, 0.3], rounds=400, seed=0)
    plain = SimSetup(FLAT_THEN_LINEAR, [pool], output_len=[20, 40], prompt_len=32)
    loaded = SimSetup(FLAT_THEN_LINEAR, [pool], output_len=[20, 40], prompt_len=32,
                      worker_overhead=WorkerOverhead(1.0, 0.5, 0.001))
    run = lambda setup, spec: simulate_level(setup, parse_scheduler_spec(spec), seed=11, concurrency=8,
                                             max_requests=32)
    trace = lambda records: [(r.t_send, r.t_end, tuple(r.chunk_times), tuple(r.chunk_tokens)) for r in records]
    assert trace(run(plain, "none")) == trace(run(loaded, "none"))
    for spec in ("fixed:2", "verify-all", "lagged"):
        fast, slow = summarize_level(run(plain, spec)), summarize_level(run(loaded, spec))
        assert slow.per_user < fast.per_user, spec
        assert slow.num_requests == fast.num_requests == 32


# ------------------------------------------------------------------------------------------------
# Provenance


def test_builtin_curve_provenance_says_derived_or_measured():
    derived = curve_provenance("builtin:h100-qwen3-8b-roofline")
    assert derived["kind"] == "builtin" and derived["description"].startswith("derived (roofline, not measured)")
    assert curve_provenance("builtin:mi355x-qwen3.8-27b-tp1")["description"].startswith("measured")
    block = format_provenance(cost_model_provenance("builtin:h100-qwen3-8b-roofline", None, 0.0, 0.0, None))
    assert block.splitlines() == [
        "cost model provenance:",
        "  steps/s curve: builtin:h100-qwen3-8b-roofline: derived (roofline, not measured): Qwen3-8B bf16, 1x H100 SXM",
        "  schedulers' table: the --sps curve",
        "  draft cost: none: drafting is free in this model (no --draft-ms, --draft-ms-per-req or "
        "--draft-from-round-cost)",
        "  worker overhead: not modelled (no --worker-overhead): speculative rounds pay no acceptance, commit or "
        "bookkeeping time, which flatters speculation",
    ]


def test_file_curve_provenance_reads_the_profile_samples(tmp_path):
    table = tmp_path / "sps.json"
    table.write_text(FLAT_THEN_LINEAR.to_json())
    bare = curve_provenance(str(table))
    assert bare["profile"] is None
    assert bare["summary"] == f"{table}: no provenance recorded (no sps.samples.json beside it)"
    meta = {"device": "cpu", "dtype": "float32", "runner": "sglang ModelRunner", "model": "m",
            "started": "2026-01-02T03:04:05", "host_before": {"host": "vm"}}
    (tmp_path / "sps.samples.json").write_text(json.dumps({"meta": meta, "probes": []}))
    prof = curve_provenance(str(table))
    assert prof["samples"] == str(tmp_path / "sps.samples.json")
    assert prof["profile"] == {k: meta[k] for k in ("device", "dtype", "runner", "model", "started")}
    assert prof["summary"] == (f"{table}: measured by dspark-profile (device cpu, dtype float32, runner sglang "
                               "ModelRunner, model m, started 2026-01-02T03:04:05; sps.samples.json)")
    (tmp_path / "sps.samples.json").write_text("{broken")
    assert "no provenance recorded (sps.samples.json unreadable" in curve_provenance(str(table))["summary"]


def test_draft_and_overhead_provenance():
    fit = WorkerOverhead.from_round_cost(COMMITTED)
    typed = draft_provenance(25.0, 19.0, fit, from_round_cost=False)
    assert typed["kind"] == "command line" and typed["summary"].startswith("25 ms + 19 ms/request")
    measured = draft_provenance(0.0, 0.0, fit, from_round_cost=True)
    assert measured["kind"] == "round-cost" and measured["source"] == str(COMMITTED)
    assert measured["draft_ms"] == fit.draft_base_ms
    over = overhead_provenance(fit)
    assert over["source"] == str(COMMITTED) and over["command"] == fit.source["command"]
    assert over["args"]["windows"] == [1, 2, 3, 4, 8] and over["drafter"] == "dspark_sglang/zoo/smollm2-135m-dspark"
    assert over["coefficients"]["base_ms"] == fit.base_ms and over["coefficients"]["per_ctx_token_ms"] == 0.0


def test_simulate_cli_takes_the_overhead_and_records_provenance(tmp_path, capsys):
    out = tmp_path / "sim"
    args = ["run", "--sps", "builtin:h100-qwen3-8b-roofline", "--acceptance", "0.8,0.6,0.4",
            "--worker-overhead", str(COMMITTED), "--draft-from-round-cost", "--scheduler", "none",
            "--scheduler", "fixed:2", "--concurrency", "1,4", "--repeats", "1", "--min-requests", "4",
            "--output-len", "9", "--out", str(out), "--no-progress"]
    assert simulate.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("cost model provenance:\n  steps/s curve: builtin:h100-qwen3-8b-roofline: derived")
    assert "worker overhead: 2.239 ms + 2.770 ms/request" in printed
    engine = json.loads((out / "simulate.json").read_text())["engine"]
    fit = WorkerOverhead.from_round_cost(COMMITTED)
    assert engine["worker_overhead"]["base_ms"] == fit.base_ms
    assert engine["worker_overhead"]["source"]["command"] == fit.source["command"]
    assert engine["draft_ms"] == fit.draft_base_ms and engine["draft_ms_per_req"] == fit.draft_per_req_ms
    prov = engine["provenance"]
    assert set(prov) == {"sps", "scheduler_cost_table", "draft_cost", "worker_overhead"}
    assert prov["sps"]["description"].startswith("derived") and prov["draft_cost"]["kind"] == "round-cost"
    assert prov["worker_overhead"]["coefficients"]["per_req_ms"] == fit.per_req_ms


def test_simulate_cli_overhead_errors_are_clear(tmp_path, capsys):
    base = ["run", "--sps", "builtin:h100-qwen3-8b-roofline", "--acceptance", "0.5", "--out", str(tmp_path)]
    assert simulate.main(base + ["--draft-from-round-cost"]) == 1
    assert "--draft-from-round-cost needs --worker-overhead FILE" in capsys.readouterr().err
    both = ["--worker-overhead", str(COMMITTED), "--draft-from-round-cost", "--draft-ms", "5"]
    assert simulate.main(base + both) == 1
    assert "not both" in capsys.readouterr().err
    assert simulate.main(base + ["--worker-overhead", str(tmp_path / "nope.json")]) == 1
    assert "nope.json: no such round-cost results file" in capsys.readouterr().err


def test_validate_applies_the_overhead(tmp_path):
    # A "measured" run made by the simulator with the overhead: validating it with the same overhead
    # reproduces it exactly, and validating without it predicts a faster speculative configuration.
    pool_path = tmp_path / "records_d_T0_gsm8k.safetensors"
    logits = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    acc = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(1))
    CalibrationRecords(logits, acc, torch.full((200,), 4)).save(pool_path)
    sps = tmp_path / "sps.json"
    sps.write_text(FLAT_THEN_LINEAR.to_json())
    engine = ["--sps", str(sps), "--eval-dir", str(tmp_path), "--worker-overhead", str(COMMITTED)]
    assert simulate.main(["run", *engine, "--scheduler", "none", "--scheduler", "fixed:2", "--concurrency", "1,4",
                          "--repeats", "1", "--min-requests", "4", "--output-len", "17",
                          "--out", str(tmp_path / "sim"), "--no-progress"]) == 0
    measured = json.loads((tmp_path / "sim" / "simulate.json").read_text())
    measured["tool"] = "dspark-bench"
    for cfg in measured["configs"]:
        cfg["env"] = {"DSPARK_SCHEDULER": "fixed", "DSPARK_FIXED_LEN": "2"} if cfg["speculative"] else {}
        for lvl in cfg["levels"]:
            for r in lvl["repeats"]:
                r["requests"] = [{"error": None, "output_tokens": 17, "prompt_tokens": None}]
    (tmp_path / "bench.json").write_text(json.dumps(measured))
    validate = ["validate", "--bench", str(tmp_path / "bench.json"), "--sps", str(sps), "--eval-dir", str(tmp_path),
                "--repeats", "1"]
    assert simulate.main(validate + ["--worker-overhead", str(COMMITTED), "--out", str(tmp_path / "v1")]) == 0
    v1 = json.loads((tmp_path / "v1" / "validate.json").read_text())
    assert v1["validation"]["per_user_mape"] == pytest.approx(0.0, abs=1e-9)
    assert v1["engine"]["provenance"]["worker_overhead"]["source"] == str(COMMITTED)
    assert simulate.main(validate + ["--out", str(tmp_path / "v0")]) == 0
    v0 = json.loads((tmp_path / "v0" / "validate.json").read_text())["validation"]
    errors = {(p["config"], p["load"]): p["per_user_error"] for p in v0["points"]}
    assert errors[("none", 1)] == pytest.approx(0.0, abs=1e-9)  # plain decoding never paid it
    assert errors[("fixed-2", 1)] > 0 and errors[("fixed-2", 4)] > 0  # no overhead: predicted too fast
