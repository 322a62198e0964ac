"""Hostile-input fuzzing of every file parser (SECURITY.md, DESIGN.md "Invariants").

Each input, random or a mutation of a valid file, must either parse or raise the parser's
documented error type: `DrafterLoadError` (checkpoints), `CostTableError`, `StsFileError`,
`RecordsFileError`, `EstimatorFileError`, `PluginSettingsError`. Any other exception type fails.
Every example also runs under a wall-clock alarm (no hangs), and the size-claiming inputs run again
in a fresh process under a resident-memory bound (no huge allocation from a header that merely
claims a huge tensor), with a negative control that allocates for real.

Plus two static checks: the package never calls `torch.load` nor imports pickle, and a checkpoint's
`auto_map` / a `pytorch_model.bin` is never executed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dspark_sglang.confidence import (
    CalibrationRecords,
    EstimatorFileError,
    ProposalProbEstimator,
    RecordsFileError,
    StsCalibration,
    StsFileError,
)
from dspark_sglang.cost_table import CostTableError, load_cost_table, parse_cost_table
from dspark_sglang.drafters.checkpoint import read_config, read_tensor_shapes, read_tensors
from dspark_sglang.drafters.errors import DrafterLoadError
from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter
from dspark_sglang.sglang.settings import PluginSettingsError, load_settings

PACKAGE = Path(__file__).resolve().parents[2] / "dspark_sglang"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "drafters"
FORMATS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
SECONDS_PER_EXAMPLE = 10  # generous on a busy 2-core box; a hang is minutes, not seconds
RSS_BUDGET_MB = 384  # growth of a fresh process's resident high-water mark over the size-claiming inputs
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)
FUZZ_SMALL = settings(FUZZ, max_examples=100)


@contextlib.contextmanager
def time_limit(seconds: int = SECONDS_PER_EXAMPLE):
    """Fail (TimeoutError, not a documented type) if the body runs longer than `seconds`."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"parser ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def parses_or_raises(error: type[Exception] | tuple, call, *args, **kwargs):
    """Run `call`; return its value, or None when it raised `error`. Anything else propagates."""
    with time_limit():
        try:
            return call(*args, **kwargs)
        except error as exc:
            assert str(exc), "error without a message"
            return None


def tiny_target() -> TargetSpec:
    """The fixtures' tiny Qwen3 target (H 64, 8 layers, V 512) with its embed / lm_head."""
    from safetensors.torch import load_file

    weights = load_file(str(FIXTURES / "zlab_dflash" / "target_embeddings.safetensors"))
    return TargetSpec(64, 512, 8, weights["embed_tokens.weight"], weights["lm_head.weight"])


TARGET = tiny_target()


@contextlib.contextmanager
def checkpoint_copy(fmt: str, link_weights: bool = True):
    """A throwaway copy of fixture `fmt` (config + weights; weights symlinked unless asked)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("config.json", "model.safetensors"):
            src = FIXTURES / fmt / name
            if link_weights and name.endswith(".safetensors"):
                (root / name).symlink_to(src)
            else:
                shutil.copy(src, root / name)
        yield root


def exercise_checkpoint(root: Path) -> None:
    """Every checkpoint entry point on `root`: each parses or raises DrafterLoadError."""
    parses_or_raises(DrafterLoadError, read_config, root)
    parses_or_raises(DrafterLoadError, read_tensor_shapes, root)
    parses_or_raises(DrafterLoadError, describe_drafter, root)
    drafter = parses_or_raises(DrafterLoadError, load_drafter, root, TARGET)
    if drafter is not None:  # loaded: nothing at random init, nothing left on meta
        for module in [m for m in vars(drafter).values() if isinstance(m, torch.nn.Module)]:
            assert not any(t.is_meta for t in module.state_dict().values())


# JSON values of every kind, including the nasty ones json.loads produces.
json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=12)


def dump(value) -> str:
    return json.dumps(value, allow_nan=True)  # NaN / Infinity literals, as some writers emit


# ------------------------------------------------------------------------------------------------
# Drafter checkpoints: config.json


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.data(), value=json_values)
def test_config_value_mutation(fmt, data, value):
    config = json.loads((FIXTURES / fmt / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config) + ["auto_map", "unknown_key"]), label="key")
    nested = data.draw(st.booleans(), label="nested")
    if nested and isinstance(config.get(key), dict) and config[key]:
        inner = data.draw(st.sampled_from(sorted(config[key])), label="inner")
        config[key][inner] = value
    elif data.draw(st.booleans(), label="delete"):
        config.pop(key, None)
    else:
        config[key] = value
    with checkpoint_copy(fmt) as root:
        (root / "config.json").write_text(dump(config))
        exercise_checkpoint(root)


@FUZZ_SMALL
@given(fmt=st.sampled_from(FORMATS), raw=st.one_of(
    st.binary(max_size=200), st.text(max_size=200).map(str.encode), json_values.map(lambda v: dump(v).encode())))
def test_config_random_bytes(fmt, raw):
    with checkpoint_copy(fmt) as root:
        (root / "config.json").write_bytes(raw)
        exercise_checkpoint(root)


# An integer literal longer than Python's 4300-digit str limit: json.loads raises a plain ValueError.
HUGE_INT_LITERAL = "9" * 5000


@pytest.mark.parametrize("text", ["[" * 200_000, '{"hidden_size": ' + HUGE_INT_LITERAL + "}"])
def test_config_deeply_nested_or_huge_integer_json(text):
    with checkpoint_copy(FORMATS[0]) as root:
        (root / "config.json").write_text(text)
        with pytest.raises(DrafterLoadError, match="config.json: malformed JSON"):
            read_config(root)


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", 10**9), ("block_size", 10**9), ("rms_norm_eps", -1.0), ("head_dim", 2**40),
])
def test_config_absurd_sizes_are_refused_before_building(field, value):
    # A num_hidden_layers of 10**9 would build 10**9 (meta) layers: it is refused from the headers.
    with checkpoint_copy("deepspec_dspark_vanilla") as root:
        config = json.loads((root / "config.json").read_text())
        config[field] = value
        (root / "config.json").write_text(json.dumps(config))
        with time_limit(), pytest.raises(DrafterLoadError, match=f"{field}|does not match the expected"):
            load_drafter(root, TARGET)


def test_config_overflowing_float_is_refused():
    with checkpoint_copy("deepspec_dspark_vanilla") as root:
        text = (root / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1' + "0" * 400)
        (root / "config.json").write_text(text)
        with pytest.raises(DrafterLoadError, match="config.json: rms_norm_eps"):
            describe_drafter(root)


# ------------------------------------------------------------------------------------------------
# Drafter checkpoints: safetensors


def header_of(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ", ""]
huge_ints = st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**32, 2**40, 2**60, 2**63, 2**64 - 1]))


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.data())
def test_safetensors_header_mutation(fmt, data):
    original = (FIXTURES / fmt / "model.safetensors").read_bytes()
    header, body = header_of(original)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names), label="tensor")
    entry = header[name]
    kind = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "junk", "rename"]), label="kind")
    if kind == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(DTYPES), label="dtype")
    elif kind == "shape":  # e.g. [2**40, 2**40]: refused from the header, never allocated
        entry["shape"] = data.draw(st.lists(huge_ints, max_size=4), label="shape")
    elif kind == "offsets":
        entry["data_offsets"] = data.draw(st.lists(huge_ints, min_size=0, max_size=3), label="offsets")
    elif kind == "drop":
        del header[name]
    elif kind == "junk":
        header[name] = data.draw(json_values, label="junk")
    else:
        header[name + data.draw(st.sampled_from(["", ".x", "_1"]), label="suffix")] = header.pop(name)
    with checkpoint_copy(fmt) as root:
        (root / "model.safetensors").unlink()
        (root / "model.safetensors").write_bytes(with_header(header, body))
        exercise_checkpoint(root)
        parses_or_raises(DrafterLoadError, read_tensors, root)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.data())
def test_safetensors_byte_mutation(fmt, data):
    raw = bytearray((FIXTURES / fmt / "model.safetensors").read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "length", "garbage"]), label="kind")
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
    elif kind == "flip":
        (length,) = struct.unpack("<Q", raw[:8])
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            at = data.draw(st.integers(0, 8 + length - 1), label="at")  # the header: where parsing happens
            raw[at] = data.draw(st.integers(0, 255), label="byte")
    elif kind == "length":  # e.g. a header claiming 2**60 bytes
        raw[:8] = struct.pack("<Q", data.draw(huge_ints | st.integers(0, 2**64 - 1), label="length"))
    else:
        raw = bytearray(data.draw(st.binary(max_size=64), label="garbage"))
    with checkpoint_copy(fmt) as root:
        (root / "model.safetensors").unlink()
        (root / "model.safetensors").write_bytes(bytes(raw))
        exercise_checkpoint(root)
        parses_or_raises(DrafterLoadError, read_tensors, root)


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**31, 2**31, 16], [2**62]])
def test_safetensors_absurd_shape_refused_from_header(shape):
    with checkpoint_copy("deepspec_dspark_vanilla") as root:
        (root / "model.safetensors").unlink()
        header = {"fc.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}
        (root / "model.safetensors").write_bytes(with_header(header, b"\0" * 16))
        for call in (read_tensor_shapes, read_tensors, describe_drafter):
            with time_limit(), pytest.raises(DrafterLoadError, match="model.safetensors"):
                call(root)


def test_safetensors_huge_header_length_refused():
    with checkpoint_copy("deepspec_dspark_vanilla") as root:
        (root / "model.safetensors").unlink()
        (root / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
        for call in (read_tensor_shapes, read_tensors):
            with time_limit(), pytest.raises(DrafterLoadError, match="model.safetensors"):
                call(root)


@FUZZ_SMALL
@given(fmt=st.sampled_from(FORMATS), data=st.data(),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.float16, torch.float64]))
def test_wrong_tensor_dtype(fmt, data, dtype):
    from safetensors.torch import load_file

    tensors = load_file(str(FIXTURES / fmt / "model.safetensors"))
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    tensors[name] = torch.zeros(tensors[name].shape, dtype=dtype)
    with checkpoint_copy(fmt) as root:
        (root / "model.safetensors").unlink()
        save_file(tensors, str(root / "model.safetensors"))
        exercise_checkpoint(root)


# ------------------------------------------------------------------------------------------------
# Never executed: auto_map / remote code, pickle files


class _Boom:
    """Unpickling this writes the sentinel file: proof that a pickle was loaded."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (Path(self.sentinel), "unpickled"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_map_and_pickles_never_executed(fmt, tmp_path):
    sentinel = tmp_path / "sentinel"
    root = tmp_path / "ckpt"
    root.mkdir()
    config = json.loads((FIXTURES / fmt / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil_modeling.EvilModel", "AutoConfig": "evil_modeling.EvilConfig"}
    config["trust_remote_code"] = True
    (root / "config.json").write_text(json.dumps(config))
    (root / "evil_modeling.py").write_text(f"open({str(sentinel)!r}, 'w').write('imported')\n")
    shutil.copy(FIXTURES / fmt / "model.safetensors", root / "model.safetensors")
    load_drafter(root, TARGET)  # auto_map is ignored: the fixture loads as usual
    describe_drafter(root)
    assert not sentinel.exists()

    (root / "model.safetensors").unlink()
    with open(root / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Boom(str(sentinel)), f)
    for call in (read_tensors, read_tensor_shapes, describe_drafter, lambda r: load_drafter(r, TARGET)):
        with pytest.raises(DrafterLoadError, match="pickle files and are refused"):
            call(root)
    assert not sentinel.exists()


def test_package_sources_never_unpickle():
    offenders = []
    pattern = re.compile(r"torch\.load\(|^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle)\b|allow_pickle=True")
    for file in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{file.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "pickle-based loading in the package:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------------------------
# Cost tables


STEP_TABLE = {"sample_batch_tokens": [1, 8, 64], "sample_steps_per_sec": [50.0, 45.0, 30.0], "max_batch_tokens": 128}
ADDITIVE_TABLE = {"bias_seconds": 0.01, "bs_probes": [1, 4], "alpha_seconds": [0.0, 0.001],
                  "m_probes": [1, 64], "theta_seconds": [0.0, 0.002]}


def mutate(data, base: dict) -> dict:
    """`base` with one key replaced (deep: possibly one list element), deleted, or added."""
    obj = json.loads(json.dumps(base))
    key = data.draw(st.sampled_from(sorted(obj) + ["extra"]), label="key")
    action = data.draw(st.sampled_from(["replace", "delete", "element"]), label="action")
    if action == "delete":
        obj.pop(key, None)
    elif action == "element" and isinstance(obj.get(key), list) and obj[key]:
        obj[key][data.draw(st.integers(0, len(obj[key]) - 1), label="index")] = data.draw(json_values, label="elem")
    else:
        obj[key] = data.draw(json_values, label="value")
    return obj


@FUZZ
@given(data=st.data(), base=st.sampled_from([STEP_TABLE, ADDITIVE_TABLE]),
       interpolation=st.sampled_from(["step", "linear"]))
def test_cost_table_mutation(data, base, interpolation):
    table = parses_or_raises(CostTableError, parse_cost_table, dump(mutate(data, base)), interpolation=interpolation)
    if table is not None:  # a table that parsed must answer lookups with a positive finite rate
        rate = float(table.steps_per_second(4, 16))
        assert rate > 0 and rate == rate and rate != float("inf")


@FUZZ_SMALL
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(lambda v: dump(v).encode())))
def test_cost_table_random_file(raw, tmp_path_factory):
    file = tmp_path_factory.mktemp("cost") / "table.json"
    file.write_bytes(raw)
    parses_or_raises(CostTableError, load_cost_table, file)


# ------------------------------------------------------------------------------------------------
# STS files, estimator files, calibration records


STS = {"temperatures": [1.0, 1.2, 0.9], "dataset": "x", "num_samples": 10, "ece_before": [0.1, 0.1, 0.1],
       "ece_after": [0.05, 0.05, 0.05]}
ESTIMATOR = {"format": "dspark-proposal-prob-estimator", "slopes": [1.0, 0.8], "intercepts": [0.0, 0.1],
             "num_samples": 4}


@FUZZ
@given(data=st.data())
def test_sts_mutation(data):
    sts = parses_or_raises(StsFileError, StsCalibration.from_json, dump(mutate(data, STS)), path="sts.json")
    if sts is not None:
        out = sts.apply(torch.zeros(2, sts.gamma))
        assert torch.isfinite(out).all()


@FUZZ
@given(data=st.data())
def test_estimator_mutation(data):
    est = parses_or_raises(EstimatorFileError, ProposalProbEstimator.from_json, dump(mutate(data, ESTIMATOR)))
    if est is not None:
        assert torch.isfinite(est.confidences(torch.full((2, est.gamma), 0.5))).all()


@FUZZ_SMALL
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(lambda v: dump(v).encode())))
def test_sts_and_estimator_random_files(raw, tmp_path_factory):
    file = tmp_path_factory.mktemp("cal") / "file.json"
    file.write_bytes(raw)
    parses_or_raises(StsFileError, StsCalibration.load, file)
    parses_or_raises(EstimatorFileError, ProposalProbEstimator.load, file)


@pytest.mark.parametrize("text", ["[" * 200_000, '{"temperatures": [' + HUGE_INT_LITERAL + "]}"])
def test_json_parsers_refuse_deep_nesting_and_huge_integers(text):
    for error, call in ((CostTableError, parse_cost_table), (StsFileError, StsCalibration.from_json),
                        (EstimatorFileError, ProposalProbEstimator.from_json)):
        with pytest.raises(error, match="not valid JSON"):
            call(text)


@pytest.mark.parametrize("probe", [2**53 + 1, 10**400], ids=["2**53+1", "10**400"])
def test_cost_table_probe_past_float64_names_the_field(probe):
    # 10**400 once escaped as OverflowError: the message formatted it as a float (CI, hypothesis).
    table = {**STEP_TABLE, "sample_batch_tokens": [1, probe], "sample_steps_per_sec": [50.0, 45.0]}
    with pytest.raises(CostTableError, match=r"sample_batch_tokens\[1\].*must be <= 2\*\*53.*-bit integer"):
        parse_cost_table(dump(table))


RECORD_DTYPES = [torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@FUZZ
@given(data=st.data(), suffix=st.sampled_from([".safetensors", ".npz"]))
def test_records_mutation(data, suffix, tmp_path_factory):
    n = data.draw(st.integers(0, 5), label="n")
    gamma = data.draw(st.integers(0, 4), label="gamma")
    tensors = {}
    for name, shape in (("conf_logits", (n, gamma)), ("num_accepted", (n,)), ("verify_lens", (n,))):
        if data.draw(st.integers(0, 9), label=f"drop {name}") == 0:
            continue
        if data.draw(st.booleans(), label=f"reshape {name}"):
            shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3), label=f"shape {name}"))
        dtype = data.draw(st.sampled_from(RECORD_DTYPES), label=f"dtype {name}")
        tensors[name] = torch.randint(-2, 6, shape).to(dtype)
    file = tmp_path_factory.mktemp("rec") / f"records{suffix}"
    if suffix == ".safetensors":
        save_file(tensors, str(file))
    else:
        with open(file, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in tensors.items()})
    raw = bytearray(file.read_bytes())
    if raw and data.draw(st.booleans(), label="damage"):
        if data.draw(st.booleans(), label="truncate"):
            raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
        else:
            raw[data.draw(st.integers(0, len(raw) - 1), label="at")] = data.draw(st.integers(0, 255), label="b")
        file.write_bytes(bytes(raw))
    parses_or_raises(RecordsFileError, CalibrationRecords.load, file)


def test_records_npz_with_pickled_object_is_refused(tmp_path):
    file = tmp_path / "records.npz"
    with open(file, "wb") as f:
        np.savez(f, conf_logits=np.array([_Boom(str(tmp_path / "sentinel"))], dtype=object),
                 num_accepted=np.zeros(1, np.int64), verify_lens=np.zeros(1, np.int64))
    with pytest.raises(RecordsFileError, match="records.npz"):
        CalibrationRecords.load(file)
    assert not (tmp_path / "sentinel").exists()


# ------------------------------------------------------------------------------------------------
# Plugin settings (DSPARK_CONFIG)


SETTING_KEYS = ["scheduler", "fixed_len", "cost_table", "sts", "gamma", "lag", "seed", "estimator",
                "stats_every", "keep_radix_cache"]
setting_values = st.one_of(json_scalars, st.sampled_from(["lagged", "fixed", "verify-all", "1", "true", "-3"]),
                           st.lists(json_scalars, max_size=2))


@FUZZ
@given(config=st.dictionaries(st.sampled_from(SETTING_KEYS + ["bogus"]), setting_values, max_size=4))
def test_settings_json_mutation(config, tmp_path_factory):
    file = tmp_path_factory.mktemp("settings") / "dspark.json"
    file.write_text(dump(config))
    parses_or_raises(PluginSettingsError, load_settings, {"DSPARK_CONFIG": str(file)})


@FUZZ_SMALL
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(lambda v: dump(v).encode())))
def test_settings_random_file(raw, tmp_path_factory):
    file = tmp_path_factory.mktemp("settings") / "dspark.json"
    file.write_bytes(raw)
    parses_or_raises(PluginSettingsError, load_settings, {"DSPARK_CONFIG": str(file)})


@FUZZ_SMALL
@given(env=st.dictionaries(st.sampled_from([f"DSPARK_{k.upper()}" for k in SETTING_KEYS]),
                           st.text(max_size=12).filter(lambda s: "\x00" not in s), max_size=4))
def test_settings_environment(env):
    parses_or_raises(PluginSettingsError, load_settings, env)


def test_settings_unreadable_paths(tmp_path):
    for path in (str(tmp_path), "[" * 10):  # a directory; a missing file
        with pytest.raises(PluginSettingsError, match="DSPARK_CONFIG"):
            load_settings({"DSPARK_CONFIG": path})
    (tmp_path / "deep.json").write_text("[" * 200_000)
    (tmp_path / "huge.json").write_text('{"gamma": ' + HUGE_INT_LITERAL + "}")
    for name in ("deep.json", "huge.json"):
        with pytest.raises(PluginSettingsError, match=f"{name}: not valid JSON"):
            load_settings({"DSPARK_CONFIG": str(tmp_path / name)})


# ------------------------------------------------------------------------------------------------


def run_hostile_sizes_child(*args: str) -> dict:
    child = Path(__file__).with_name("hostile_sizes_child.py")
    done = subprocess.run([sys.executable, str(child), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_size_claiming_headers_allocate_nothing():
    # In a fresh process (pytest's own high-water mark holds earlier files' engines): headers and
    # configs that claim 2**40-element tensors are refused without allocating what they claim.
    report = run_hostile_sizes_child()
    assert report["loaded"] == [], f"load_drafter accepted {report['loaded']}"
    assert report["refused"] >= 30
    assert report["grown_mb"] < RSS_BUDGET_MB, f"resident high-water mark grew: {report}"


def test_size_claiming_headers_negative_control():
    # The same measurement sees a real allocation of twice the budget.
    report = run_hostile_sizes_child("--control-mb", str(2 * RSS_BUDGET_MB))
    assert report["grown_mb"] >= RSS_BUDGET_MB, report
