"""Corrupted or mismatched checkpoints: each raises the right DrafterLoadError naming the field.

Corrupted copies are built in tmp_path from the fixtures; the fixtures themselves are never touched.
"""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from _block_drafter_helpers import FIXTURES, anchor, feed_context, max_err, tiny_target
from dspark_sglang.drafters.errors import DrafterConfigError, DrafterWeightsError, TargetMismatchError
from dspark_sglang.drafters.interface import SamplingBatch, TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter

DSPARK = "deepspec_dspark_gated"


def _copy(tmp_path, name: str = DSPARK):
    dest = tmp_path / name
    shutil.copytree(FIXTURES / name, dest)
    return dest


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _load(path, target=None):
    return load_drafter(path, target or tiny_target())


def test_missing_tensor(tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.pop("layers.1.self_attn.k_norm.weight"))
    with pytest.raises(DrafterWeightsError, match=r"missing tensors \[layers\.1\.self_attn\.k_norm\.weight\]"):
        _load(path)


def test_unexpected_tensor(tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.update({"markov_head.extra_proj.weight": torch.zeros(4, 4)}))
    with pytest.raises(DrafterWeightsError, match=r"unexpected tensors \[markov_head\.extra_proj\.weight\]"):
        _load(path)


def test_wrong_shape(tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.update({"fc.weight": torch.zeros(64, 256)}))
    with pytest.raises(DrafterWeightsError, match=r"fc\.weight: shape \[64, 256\] does not match the expected \[64, 320\]"):
        _load(path)


def test_wrong_dtype(tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.update({"norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(DrafterWeightsError, match=r"norm\.weight: dtype torch\.int32 where a float tensor"):
        _load(path)


def test_mismatched_hidden_size(tmp_path):
    with pytest.raises(TargetMismatchError, match="hidden_size: drafter has 64, target has 128"):
        _load(FIXTURES / DSPARK, TargetSpec(hidden_size=128, vocab_size=512, num_hidden_layers=8))


def test_mismatched_vocab(tmp_path):
    with pytest.raises(TargetMismatchError, match="vocab_size: drafter has 512, target has 1000"):
        _load(FIXTURES / "zlab_dflash", TargetSpec(hidden_size=64, vocab_size=1000, num_hidden_layers=8))


def test_mismatched_num_target_layers():
    with pytest.raises(TargetMismatchError, match="num_target_layers"):
        _load(FIXTURES / DSPARK, TargetSpec(hidden_size=64, vocab_size=512, num_hidden_layers=12))


def test_layer_id_out_of_range(tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, target_layer_ids=[1, 2, 3, 4, 8])
    with pytest.raises(TargetMismatchError, match=r"target_layer_ids: \[8\] outside \[-1, 7\]"):
        _load(path)


@pytest.mark.parametrize("name", [DSPARK, "zlab_dflash"])
def test_mask_token_out_of_range(tmp_path, name):
    path = _copy(tmp_path, name)
    if name == "zlab_dflash":
        _edit_config(path, dflash_config={"mask_token_id": 512, "target_layer_ids": [1, 2, 3, 4, 5]})
        field = r"dflash_config\.mask_token_id"
    else:
        _edit_config(path, mask_token_id=-3)
        field = "mask_token_id"
    with pytest.raises(TargetMismatchError, match=field + r": -?\d+ is outside the target vocabulary"):
        _load(path)


def test_unknown_markov_head_type(tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, markov_head_type="lstm")
    with pytest.raises(DrafterConfigError, match=r"markov_head_type: 'lstm' is not one of"):
        _load(path)


@pytest.mark.parametrize("key", ["block_size", "mask_token_id", "target_layer_ids", "hidden_size"])
def test_missing_config_key(tmp_path, key):
    path = _copy(tmp_path)
    _edit_config(path, **{key: None})
    with pytest.raises(DrafterConfigError, match=f"config.json: {key}: required key is missing"):
        _load(path)


def test_bad_config_values(tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, block_size=1)
    with pytest.raises(DrafterConfigError, match="block_size: must be >= 2"):
        _load(path)
    _edit_config(path, block_size="7")
    with pytest.raises(DrafterConfigError, match="block_size: expected int"):
        _load(path)


@pytest.mark.parametrize("key,value", [
    ("intermediate_size", 2**55),  # found by test_fuzz_inputs: torch's storage-size overflow
    ("intermediate_size", 2**63),  # ... and its int64 unpacking overflow
    ("vocab_size", 2**40),
    ("num_hidden_layers", 10**6),  # would build a million modules before failing
    ("markov_rank", 2**40),
])
def test_absurd_sizes_are_config_errors(tmp_path, key, value):
    path = _copy(tmp_path)
    _edit_config(path, **{key: value})
    with pytest.raises(DrafterConfigError, match=f"{key}: .*{value}"):
        _load(path)


@pytest.mark.parametrize("fmt", ["zlab_dflash", DSPARK, "deepspec_eagle3"])
@pytest.mark.parametrize("value,shown", [(10**400, "a 1329-bit integer"), (0, "0"), (2000, "2000")])
def test_absurd_target_depth_is_a_config_error(tmp_path, fmt, value, shown):
    # 10**400 found by scripts/fuzz.sh: z-lab's default layer ids divided it into a float (OverflowError).
    path = _copy(tmp_path, fmt)
    _edit_config(path, num_target_layers=value)
    with pytest.raises(DrafterConfigError, match=rf"num_target_layers: must be in \[1, 1024\], got {shown}"):
        _load(path)


def test_malformed_json(tmp_path):
    path = _copy(tmp_path)
    (path / "config.json").write_text('{"architectures": ["Qwen3DSparkModel"], "block_size": 7,')
    with pytest.raises(DrafterConfigError, match="config.json: malformed JSON"):
        _load(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors(tmp_path, damage):
    path = _copy(tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00\x01not safetensors" * 64)
    with pytest.raises(DrafterWeightsError, match="model.safetensors: not a readable safetensors file"):
        _load(path)


def test_zlab_needs_target_embeddings():
    with pytest.raises(TargetMismatchError, match="embed_tokens: this drafter borrows"):
        _load(FIXTURES / "zlab_dflash", tiny_target(with_embeddings=False))
    spec = tiny_target()
    spec.lm_head = spec.lm_head[:, :32]
    with pytest.raises(TargetMismatchError, match=r"lm_head: target's shape \[512, 32\]"):
        _load(FIXTURES / "zlab_dflash", spec)


def test_unknown_architecture_and_pickle_only(tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, architectures=["MysteryDraftModel"])
    with pytest.raises(DrafterConfigError, match="architectures: unknown drafter architecture"):
        _load(path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(FIXTURES / DSPARK / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(DrafterWeightsError, match="pickle files and are refused"):
        _load(pickled)


def test_auto_map_code_is_never_executed(tmp_path):
    path = _copy(tmp_path, "zlab_dflash")
    marker = tmp_path / "executed"
    (path / "dflash.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    drafter = _load(path)
    assert drafter.info.format == "zlab" and not marker.exists()
    assert "dflash" not in sys.modules


def test_sharded_checkpoint_and_bf16_conversion(tmp_path):
    path = _copy(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():  # stored as bf16, as released checkpoints are
        save_file({n: tensors[n].bfloat16() for n in members}, str(path / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: s for s, members in shards.items() for n in members}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = _load(path)
    original = _load(FIXTURES / DSPARK)
    assert sharded.backbone.fc.weight.dtype == torch.float32
    ref = load_file(str(FIXTURES / DSPARK / "reference.safetensors"))
    logits = []
    for drafter in (sharded, original):
        feed_context(drafter, 0, ref, 0, 12)
        logits.append(drafter.propose_with_logits([0], *anchor(ref, 12), SamplingBatch.greedy(1))[1])
    assert 0 < max_err(*logits) < 0.2  # bf16 rounding of the weights, nothing worse

    index["weight_map"]["fc.weight"] = "model-00001-of-00002.safetensors" if "fc.weight" in shards[
        "model-00002-of-00002.safetensors"] else "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DrafterWeightsError, match="disagrees with model.safetensors.index.json"):
        _load(path)
    index["weight_map"]["fc.weight"] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DrafterWeightsError, match="bad shard file name"):
        _load(path)


@pytest.mark.parametrize("name, fmt", [("deepspec_eagle3", "deepspec"), ("specforge_eagle3", "specforge")])
def test_eagle3_formats_are_handed_to_build_eagle3(monkeypatch, name, fmt):
    calls = []
    fake = types.ModuleType("dspark_sglang.drafters.eagle3")
    fake.build_eagle3 = lambda config, tensors, f, target, path, dtype, device: calls.append((config, tensors, f))
    monkeypatch.setitem(sys.modules, "dspark_sglang.drafters.eagle3", fake)
    _load(FIXTURES / name)
    (config, tensors, got_fmt), = calls
    assert got_fmt == fmt and "fc.weight" in tensors and config["architectures"]


def test_describe_drafter():
    rows = {name: describe_drafter(FIXTURES / name) for name in (
        "deepspec_dspark_vanilla", "deepspec_dspark_rnn", "deepspec_dflash", "zlab_dflash",
        "deepspec_eagle3", "specforge_eagle3")}
    assert {n: (d.format, d.gamma) for n, d in rows.items()} == {
        "deepspec_dspark_vanilla": ("deepspec_dspark", 7), "deepspec_dspark_rnn": ("deepspec_dspark", 7),
        "deepspec_dflash": ("deepspec_dflash", 7), "zlab_dflash": ("zlab_dflash", 6),
        "deepspec_eagle3": ("deepspec_eagle3", 7), "specforge_eagle3": ("specforge_eagle3", 7),
    }
    assert rows["zlab_dflash"].borrows_from_target == ("embed_tokens", "lm_head")
    assert rows["specforge_eagle3"].target_layer_ids == (1, 3, 4)
    assert rows["specforge_eagle3"].draft_vocab_size == 256
    assert rows["deepspec_dspark_rnn"].as_row()["heads"] == "markov:rnn+confidence"
