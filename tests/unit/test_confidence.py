"""Confidence calibration: STS apply/fit, ECE/AUC/Brier, STS JSON (SGLang's layout), calibration
records, and the proposal-probability estimator for head-less drafters."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_sglang.confidence import (
    CalibrationDataError,
    CalibrationRecords,
    EstimatorFileError,
    ProposalProbEstimator,
    RecordsFileError,
    StsCalibration,
    StsFileError,
    apply_sts,
    auc,
    brier,
    default_temperature_grid,
    expected_calibration_error,
    fit_sts,
    observed_mask,
    prefix_labels,
    survival_metrics,
    top1_feature,
    head_less_feature,
)

NAN = float("nan")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def synthetic(n, temps, seed, censor=False):
    """Raw logits z ~ N(1, 2²); draft k is accepted (given the prefix) w.p. sigmoid(z_k / T_k)."""
    gen = torch.Generator().manual_seed(seed)
    gamma = len(temps)
    z = 1.0 + 2.0 * torch.randn(n, gamma, generator=gen)
    accept = torch.rand(n, gamma, generator=gen) < torch.sigmoid(z / t(temps))
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)
    if censor:  # verify lengths drawn independently of the outcome, as a scheduler would
        lens = torch.randint(1, gamma + 1, (n,), generator=gen)
    else:
        lens = torch.full((n,), gamma)
    return z, torch.minimum(num_accepted, lens), lens


def sglang_module(relpath, name, monkeypatch=None):
    """Load one SGLang source file by path (its package __init__ imports thousands of modules)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# apply, labels


def test_apply_sts_per_position_and_nan():
    out = apply_sts(t([[0.0, 2.0, -2.0], [NAN, 0.0, 0.0]]), [1.0, 2.0, 0.5])
    expected = t([[0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(4))], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="temperatures"):
        apply_sts(t([[0.0, 1.0]]), [1.0])


def test_prefix_labels_and_observed_mask():
    assert prefix_labels(torch.tensor([0, 2, 3]), 3).tolist() == [
        [False, False, False], [True, True, False], [True, True, True]]
    assert observed_mask(torch.tensor([1, 3]), 2, 3).tolist() == [[True, False, False], [True, True, True]]
    assert observed_mask(None, 2, 2).all()


# ---------------------------------------------------------------------------------------------
# Metrics on hand-computable cases


def test_ece_hand_computed():
    probs, labels = t([0.1, 0.1, 0.9, 0.9]), t([0, 1, 1, 1])
    # 15 bins: 0.1 -> bin 1, 0.9 -> bin 13. (|0.2 − 1| + |1.8 − 2|) / 4 = 0.25.
    assert expected_calibration_error(probs, labels) == pytest.approx(0.25)
    # Censor the second element: (|0.1 − 0| + |1.8 − 2|) / 3 = 0.1.
    mask = torch.tensor([True, False, True, True])
    assert expected_calibration_error(probs, labels, mask=mask) == pytest.approx(0.1)
    assert expected_calibration_error(t([0.5] * 4), t([0, 1, 0, 1])) == pytest.approx(0.0)
    # p = 1 lands in the last bin (clamped to 1 − 1e-8), as in SGLang.
    assert expected_calibration_error(t([1.0, 1.0]), t([1, 0])) == pytest.approx(0.5)
    assert math.isnan(expected_calibration_error(t([0.5]), t([1]), mask=torch.tensor([False])))


def test_auc_hand_computed_and_ties():
    assert auc(t([0.1, 0.4, 0.35, 0.8]), t([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(t([0.5, 0.5]), t([0, 1])) == pytest.approx(0.5)  # a tie counts 1/2
    assert auc(t([0.2, 0.5, 0.5, 0.9]), t([0, 0, 1, 1])) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert math.isnan(auc(t([0.1, 0.2]), t([1, 1])))


def test_brier_hand_computed():
    assert brier(t([0.0, 1.0, 0.5]), t([0, 0, 1])) == pytest.approx((0 + 1 + 0.25) / 3)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), st.booleans()),
                min_size=1, max_size=30))
def test_auc_equals_pairwise_definition(pairs):
    probs, labels = t([p for p, _ in pairs]), t([float(y) for _, y in pairs])
    pos = [p for p, y in pairs if y]
    neg = [p for p, y in pairs if not y]
    got = auc(probs, labels)
    if not pos or not neg:
        assert math.isnan(got)
        return
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    assert got == pytest.approx(wins / (len(pos) * len(neg)))
    ece = expected_calibration_error(probs, labels)
    assert 0.0 <= ece <= 1.0


def test_survival_metrics_censors_positions():
    survival = t([[0.9, 0.5], [0.8, 0.4], [0.2, 0.1]])
    out = survival_metrics(survival, torch.tensor([2, 1, 0]), torch.tensor([2, 1, 2]))
    assert out["count"] == [3.0, 2.0]  # row 1 verified one draft only
    assert out["brier"][1] == pytest.approx(((0.5 - 1) ** 2 + 0.1**2) / 2)
    assert set(out) == {"ece", "auc", "brier", "count"}


# ---------------------------------------------------------------------------------------------
# STS fit

TRUE_TEMPS = [0.5, 1.0, 2.0, 0.8]  # on (or next to) the default grid


@pytest.mark.parametrize("censor", [False, True])
def test_fit_sts_recovers_known_temperatures(censor):
    z, acc, lens = synthetic(20_000, TRUE_TEMPS, seed=0, censor=censor)
    cal = fit_sts(z, acc, None if not censor else lens)
    grid_step = 2.0 / 40  # decades between grid points
    for fitted, true in zip(cal.temperatures, TRUE_TEMPS):
        assert abs(math.log10(fitted / true)) <= 2.5 * grid_step, cal.temperatures
    assert cal.num_samples == 20_000 and len(cal.ece_after) == len(TRUE_TEMPS)
    assert all(a <= b + 1e-12 for a, b in zip(cal.ece_after, cal.ece_before))
    assert cal.ece_before[0] > 0.05 > max(cal.ece_after)  # T_1 = 0.5 is far from 1


def test_fit_sts_matches_sglang_fitter_when_uncensored(monkeypatch):
    sts = sglang_module("srt/speculative/dspark_components/dspark_sts.py",
                        "sglang.srt.speculative.dspark_components.dspark_sts", monkeypatch)
    assert sts.DSparkStsCalibration  # the fitter imports it under that name
    fitter = sglang_module("benchmark/dspark_sts_fit.py", "_sglang_dspark_sts_fit")
    z, acc, lens = synthetic(3000, [0.7, 1.5, 1.0], seed=3)
    ours = fit_sts(z, acc)
    theirs = fitter.fit_sts_temperatures(
        logits=z, prefix_mask=prefix_labels(acc, 3).float(), grid=fitter.default_temperature_grid())
    assert ours.temperatures == theirs["temperatures"]
    assert ours.ece_before == pytest.approx(theirs["ece_before"], rel=1e-12)
    assert ours.ece_after == pytest.approx(theirs["ece_after"], rel=1e-12)


def test_fit_sts_shapes_and_errors():
    cal = fit_sts(t([[3.0]]), torch.tensor([1]))  # n = 1, gamma = 1
    assert len(cal.temperatures) == 1 and cal.num_samples == 1
    assert default_temperature_grid().numel() == 41
    assert float(default_temperature_grid()[0]) == pytest.approx(0.1)
    with pytest.raises(CalibrationDataError, match="position 1"):
        fit_sts(t([[1.0, 1.0]]), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="grid"):
        fit_sts(t([[1.0]]), torch.tensor([1]), grid=t([0.0, 1.0]))
    cal = fit_sts(t([[NAN, 1.0], [2.0, 1.0]]), torch.tensor([0, 2]))  # NaN logit = confidence 0
    assert all(math.isfinite(x) for x in cal.ece_after)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.data())
def test_fit_sts_and_metrics_any_shape(n, gamma, data):
    element = st.one_of(st.floats(-20, 20), st.just(NAN))
    z = t([[data.draw(element) for _ in range(gamma)] for _ in range(n)])
    acc = torch.tensor([data.draw(st.integers(0, gamma)) for _ in range(n)])
    cal = fit_sts(z, acc)
    grid = default_temperature_grid().tolist()
    assert len(cal.temperatures) == gamma and all(x in grid for x in cal.temperatures)
    assert cal.ece_after[0] <= cal.ece_before[0] + 1e-12  # T = 1 is on the grid
    survival = torch.cumprod(cal.apply(z), dim=1)
    metrics = survival_metrics(survival, acc, torch.full((n,), gamma))
    assert all(len(v) == gamma for v in metrics.values())
    assert all(0.0 <= e <= 1.0 for e in metrics["ece"])
    assert apply_sts(torch.zeros(0, gamma), cal.temperatures).shape == (0, gamma)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=8), st.text(max_size=10),
       st.integers(0, 10**6))
def test_sts_json_round_trip_property(temps, dataset, num):
    cal = StsCalibration(temps, dataset=dataset, num_samples=num)
    assert StsCalibration.from_json(cal.to_json()) == cal


# ---------------------------------------------------------------------------------------------
# STS JSON


def test_sts_json_round_trip_and_omitted_defaults(tmp_path):
    full = StsCalibration([0.5, 1.25], dataset="alpaca", num_samples=10,
                          ece_before=[0.1, 0.2], ece_after=[0.01, 0.02])
    path = tmp_path / "sts.json"
    full.save(path)
    assert StsCalibration.load(path) == full
    minimal = StsCalibration([1.0, 2.0])
    assert minimal.to_json() == '{"temperatures":[1.0,2.0]}'
    assert StsCalibration.from_json(minimal.to_json()) == minimal


def test_sts_reads_sglang_written_example(tmp_path):
    # What sglang.benchmark.dspark_sts_fit writes (msgspec, compact, field order of the struct).
    text = ('{"temperatures":[0.7943282347242815,1.0,1.2589254117941673],"dataset":"sts.*.pt",'
            '"num_samples":512,"ece_before":[0.057,0.082,0.058],"ece_after":[0.02,0.017,0.008]}')
    (tmp_path / "sts.json").write_text(text)
    cal = StsCalibration.load(tmp_path / "sts.json")
    assert cal.temperatures[2] == pytest.approx(1.2589254117941673) and cal.num_samples == 512
    assert json.loads(cal.to_json()) == json.loads(text)


def test_sts_json_interoperates_with_sglang_struct(monkeypatch):
    sts = sglang_module("srt/speculative/dspark_components/dspark_sts.py", "_sglang_dspark_sts")
    ours = StsCalibration([0.5, 2.0], dataset="d", num_samples=3, ece_before=[0.1, 0.2],
                          ece_after=[0.05, 0.1])
    theirs = sts.DSparkStsCalibration.from_json(ours.to_json())
    assert list(theirs.temperatures) == ours.temperatures and theirs.num_samples == 3
    assert StsCalibration.from_json(theirs.to_json()) == ours
    assert StsCalibration.from_json(sts.DSparkStsCalibration(temperatures=[1.5]).to_json()) \
        == StsCalibration([1.5])


@pytest.mark.parametrize("text,field", [
    ("{not json", "<root>"),
    ("[1.0, 2.0]", "<root>"),
    ('{"dataset": "x"}', "temperatures"),
    ('{"temperatures": []}', "temperatures"),
    ('{"temperatures": [1.0, 0.0]}', "temperatures[1]"),
    ('{"temperatures": [1.0, -2.0]}', "temperatures[1]"),
    ('{"temperatures": [1.0, "2"]}', "temperatures[1]"),
    ('{"temperatures": [true]}', "temperatures[0]"),
    ('{"temperatures": [NaN]}', "temperatures[0]"),
    ('{"temperatures": 1.0}', "temperatures"),
    ('{"temperatures": [1.0], "dataset": 3}', "dataset"),
    ('{"temperatures": [1.0], "num_samples": 2.5}', "num_samples"),
    ('{"temperatures": [1.0], "num_samples": -1}', "num_samples"),
    ('{"temperatures": [1.0], "ece_before": [0.1, 0.2]}', "ece_before"),
    ('{"temperatures": [1.0], "ece_after": ["x"]}', "ece_after[0]"),
])
def test_sts_json_rejects_malformed(tmp_path, text, field):
    path = tmp_path / "bad_sts.json"
    path.write_text(text)
    with pytest.raises(StsFileError) as err:
        StsCalibration.load(path)
    assert err.value.field == field and str(path) in str(err.value)


def test_sts_missing_file():
    with pytest.raises(StsFileError, match="cannot read"):
        StsCalibration.load("/nonexistent/sts.json")


# ---------------------------------------------------------------------------------------------
# Calibration records


def records():
    return CalibrationRecords(t([[0.5, -1.0, 2.0], [1.0, 1.0, NAN]]), torch.tensor([3, 0]),
                              torch.tensor([3, 2]))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_records_round_trip(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    records().save(path)
    back = CalibrationRecords.load(path)
    torch.testing.assert_close(back.conf_logits, records().conf_logits, equal_nan=True)
    assert torch.equal(back.num_accepted, records().num_accepted)
    assert torch.equal(back.verify_lens, records().verify_lens)
    assert back.conf_logits.dtype == torch.float32 and back.verify_lens.dtype == torch.int64
    assert back.prompt_ids is None  # optional, absent when not recorded

    with_ids = records().take(torch.tensor([0, 1]))
    with_ids.prompt_ids = None
    with_ids = CalibrationRecords(with_ids.conf_logits, with_ids.num_accepted, with_ids.verify_lens,
                                  prompt_ids=torch.tensor([7, 7], dtype=torch.int32))
    with_ids.save(path)
    back = CalibrationRecords.load(path)
    assert back.prompt_ids.tolist() == [7, 7] and back.prompt_ids.dtype == torch.int64


def test_records_take_and_concat_keep_prompts_apart():
    a = CalibrationRecords(torch.zeros(3, 2), torch.tensor([0, 1, 2]), torch.full((3,), 2),
                           prompt_ids=torch.tensor([0, 0, 1]))
    b = CalibrationRecords(torch.ones(2, 2), torch.tensor([2, 2]), torch.full((2,), 2),
                           prompt_ids=torch.tensor([0, 4]))
    both = CalibrationRecords.concat([a, b])
    # b's prompt 0 is not a's prompt 0: ids are offset past a's largest.
    assert both.prompt_ids.tolist() == [0, 0, 1, 2, 6]
    assert both.num_accepted.tolist() == [0, 1, 2, 2, 2]
    picked = both.take(torch.tensor([False, True, False, True, True]))
    assert picked.prompt_ids.tolist() == [0, 2, 6] and picked.num_accepted.tolist() == [1, 2, 2]
    # One part without ids: the union has none (a prompt split would be a guess).
    plain = CalibrationRecords(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([2]))
    assert CalibrationRecords.concat([a, plain]).prompt_ids is None


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


GOOD = dict(conf_logits=np.zeros((2, 3), np.float32), num_accepted=np.array([1, 0]),
            verify_lens=np.array([2, 3]))


@pytest.mark.parametrize("change,field", [
    ({"verify_lens": None}, "verify_lens"),
    ({"conf_logits": np.zeros(3, np.float32)}, "conf_logits"),
    ({"conf_logits": np.zeros((2, 3), np.int64)}, "conf_logits"),
    ({"num_accepted": np.array([1.0, 0.0])}, "num_accepted"),
    ({"num_accepted": np.array([1, 0, 0])}, "num_accepted"),
    ({"num_accepted": np.array([3, 0])}, "num_accepted"),  # more accepted than verified
    ({"verify_lens": np.array([2, 4])}, "verify_lens"),  # beyond gamma
    ({"verify_lens": np.array([2, -1])}, "verify_lens"),
    ({"prompt_ids": np.array([0])}, "prompt_ids"),
    ({"prompt_ids": np.array([0.0, 1.0])}, "prompt_ids"),
    ({"prompt_ids": np.array([0, -3])}, "prompt_ids"),
])
def test_records_reject_malformed(tmp_path, change, field):
    arrays = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "bad.npz"
    write_npz(path, **arrays)
    with pytest.raises(RecordsFileError) as err:
        CalibrationRecords.load(path)
    assert err.value.field == field and str(path) in str(err.value)


def test_records_reject_bad_container(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RecordsFileError, match="cannot read"):
        CalibrationRecords.load(bad)
    with pytest.raises(RecordsFileError, match="suffix"):
        CalibrationRecords.load(tmp_path / "records.pt")


def test_records_from_sglang_prefix_mask():
    rec = CalibrationRecords.from_prefix_mask(t([[0.0, 1.0], [2.0, 3.0]]), t([[1, 0], [1, 1]]))
    assert rec.num_accepted.tolist() == [1, 2] and rec.verify_lens.tolist() == [2, 2]
    with pytest.raises(RecordsFileError, match="prefix_mask"):
        CalibrationRecords.from_prefix_mask(t([[0.0, 1.0]]), t([[0, 1]]))


# ---------------------------------------------------------------------------------------------
# Proposal-probability estimator


def test_estimator_recovers_known_coefficients():
    gen = torch.Generator().manual_seed(1)
    n, slopes, intercepts = 20_000, [1.5, 0.7], [-0.5, 1.0]
    top1 = 0.05 + 0.9 * torch.rand(n, 2, generator=gen)
    raw = torch.log(top1) - torch.log1p(-top1)
    accept = torch.rand(n, 2, generator=gen) < torch.sigmoid(raw * t(slopes) + t(intercepts))
    acc = accept.long().cumprod(dim=1).sum(dim=1)
    est = ProposalProbEstimator.fit(CalibrationRecords(raw, acc, torch.full((n,), 2)))
    assert est.slopes == pytest.approx(slopes, abs=0.1)
    assert est.intercepts == pytest.approx(intercepts, abs=0.1)
    conf = est.confidences(top1)
    assert conf.shape == (n, 2) and bool(((conf >= 0) & (conf <= 1)).all())


def test_estimator_defaults_and_no_data():
    est = ProposalProbEstimator.identity(3)
    torch.testing.assert_close(est.confidences(t([[0.25, 0.5, 0.9]])), t([[0.25, 0.5, 0.9]]))
    # Position 1 never verified: keeps a = 1, b = 0.
    rec = CalibrationRecords(t([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0]), torch.tensor([1, 1]))
    fitted = ProposalProbEstimator.fit(rec)
    assert fitted.slopes[1] == pytest.approx(1.0) and fitted.intercepts[1] == pytest.approx(0.0)
    assert top1_feature(t([[[0.2, 0.8], [0.6, 0.4]]])).tolist() == [[0.800000011920929, 0.6000000238418579]]


def test_head_less_feature_prefers_the_drafters_own_top1():
    from dspark_sglang.drafters.interface import DraftBlock
    from dspark_sglang.sampling import top1_of_logits

    logits = t([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    one_hot = t([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # a greedy request's q
    expected = torch.softmax(logits, -1).amax(-1)
    torch.testing.assert_close(top1_of_logits(logits), expected)
    reported = DraftBlock(torch.zeros(1, 2, dtype=torch.long), one_hot, t([[1.0, 1.0]]), None, top1_of_logits(logits))
    torch.testing.assert_close(head_less_feature(reported), expected)
    # a drafter that does not report it falls back to max q_k
    legacy = DraftBlock(torch.zeros(1, 2, dtype=torch.long), one_hot, t([[1.0, 1.0]]), None)
    torch.testing.assert_close(head_less_feature(legacy), t([[1.0, 1.0]]))


def test_estimator_json_round_trip(tmp_path):
    est = ProposalProbEstimator([1.5, 0.5], [-0.25, 0.75], num_samples=9)
    est.save(tmp_path / "est.json")
    assert ProposalProbEstimator.load(tmp_path / "est.json") == est


@pytest.mark.parametrize("text,field", [
    ("nope", "<root>"),
    ('{"intercepts": [0.0]}', "slopes"),
    ('{"slopes": [1.0]}', "intercepts"),
    ('{"slopes": [1.0], "intercepts": [0.0, 1.0]}', "slopes/intercepts"),
    ('{"slopes": ["a"], "intercepts": [0.0]}', "slopes[0]"),
    ('{"slopes": [1.0], "intercepts": [0.0], "num_samples": -2}', "num_samples"),
])
def test_estimator_json_rejects_malformed(tmp_path, text, field):
    path = tmp_path / "est.json"
    path.write_text(text)
    with pytest.raises(EstimatorFileError) as err:
        ProposalProbEstimator.load(path)
    assert err.value.field == field and str(path) in str(err.value)


def first_token_distribution(p, q, admit):
    """Exact output distribution of one chain step when x ~ q is verified iff admit(x)."""
    out = [0.0] * len(p)
    residual = [max(pi - qi, 0.0) for pi, qi in zip(p, q)]
    total = sum(residual)
    for x, qx in enumerate(q):
        if admit(x):
            alpha = min(1.0, p[x] / qx)
            out[x] += qx * alpha
            for y in range(len(p)):
                out[y] += qx * (1 - alpha) * residual[y] / total
        else:
            for y in range(len(p)):
                out[y] += qx * p[y]
    return out


def test_proposed_token_probability_is_not_a_lossless_feature():
    # Why the estimator reads max_v q_k(v) and not q_k(x_k): admitting x only when q(x) is
    # high ties x's admission to its own value. p = (0.7, 0.3), q = (0.8, 0.2).
    p, q = [0.7, 0.3], [0.8, 0.2]
    biased = first_token_distribution(p, q, admit=lambda x: q[x] >= 0.5)
    assert biased == pytest.approx([0.84, 0.16])
    top1 = max(q)  # the same for every x: the admission cannot depend on x
    fair = first_token_distribution(p, q, admit=lambda x: top1 >= 0.5)
    assert fair == pytest.approx(p)
