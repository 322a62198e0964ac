"""dspark-convert: DeepSpec / SpecForge <-> speculators round trips keep every tensor bit for bit,
and the speculators copy loads and drafts exactly like the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark_sglang.drafters import convert
from dspark_sglang.drafters.checkpoint import read_config
from dspark_sglang.drafters.errors import DrafterConfigError
from dspark_sglang.drafters.interface import SamplingBatch, TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "dspark_sglang" / "zoo"
FIXTURES = ROOT / "tests" / "fixtures" / "drafters"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _smollm_target() -> TargetSpec:
    """SmolLM2-135M's shapes, with seeded stand-ins for its embedding / LM head: both drafters
    borrow the same tensors, which is all identity of drafting needs."""
    gen = torch.Generator().manual_seed(0)
    return TargetSpec(576, 49152, 30, torch.randn(49152, 576, generator=gen) * 0.05,
                      torch.randn(49152, 576, generator=gen) * 0.05)


def _draft_twice(original, converted, width: int, gamma: int):
    """Same context, same anchors, same generator: greedy and sampled blocks must be identical."""
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(40, width, generator=gen)
    tokens = torch.randint(0, 49152, (40,), generator=gen)
    for drafter in (original, converted):
        drafter.append_context([0, 1], [feats[:25], feats[:40]], [torch.arange(25), torch.arange(40)],
                               [tokens[:25], tokens[:40]])
    anchors, positions = tokens[[24, 39]], torch.tensor([25, 40])  # any token; at the context's end
    sampled = SamplingBatch(temperatures=torch.tensor([0.0, 0.8]), top_ks=torch.tensor([-1, 50]),
                       top_ps=torch.tensor([1.0, 0.9]), min_ps=torch.zeros(2))
    for batch in (SamplingBatch.greedy(2), sampled):
        blocks = [d.propose([0, 1], anchors, positions, batch, torch.Generator().manual_seed(7))
                  for d in (original, converted)]
        a, b = blocks
        assert a.tokens.shape == (2, gamma)
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.probs, b.probs) and torch.equal(a.token_probs, b.token_probs)
        assert (a.confidence_logits is None) == (b.confidence_logits is None)
        if a.confidence_logits is not None:
            assert torch.equal(a.confidence_logits, b.confidence_logits)


@pytest.mark.parametrize("name,kind", [("smollm2-135m-dspark", "dspark"), ("smollm2-135m-dflash", "dflash"),
                                       ("smollm2-135m-eagle3", "eagle3")])
def test_zoo_round_trip_is_bit_identical_and_drafts_identically(tmp_path, name, kind):
    src = ZOO / name
    spec, back = tmp_path / "speculators", tmp_path / "back"
    assert convert.main(["to-speculators", str(src), str(spec), "--verifier", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    assert convert.main(["from-speculators", str(spec), str(back), "--num-target-layers", "30"]) == 0

    config = read_config(spec)
    assert config["speculators_model_type"] == kind
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    layer_key = "eagle_aux_hidden_state_layer_ids" if kind == "eagle3" else "aux_hidden_state_layer_ids"
    assert config[layer_key] == [l + 1 for l in read_config(src)["target_layer_ids"]]  # [2, 9, 15, 21, 28]
    if kind != "eagle3":
        assert config["sample_from_anchor"] is True
    # The zoo drafters carry no embedding / LM head: nothing to drop, every tensor goes both ways.
    _same_tensors(_tensors(src), _tensors(spec))
    _same_tensors(_tensors(src), _tensors(back))
    original, speculators_copy, round_trip = (describe_drafter(p) for p in (src, spec, back))
    assert round_trip.format == original.format and speculators_copy.format == f"speculators_{kind}"
    for field in ("gamma", "num_layers", "hidden_size", "vocab_size", "draft_vocab_size", "target_layer_ids",
                  "block_size", "mask_token_id", "markov_head_type", "has_confidence_head", "borrows_from_target"):
        assert getattr(speculators_copy, field) == getattr(original, field) == getattr(round_trip, field), field

    target = _smollm_target()
    a, b = load_drafter(src, target), load_drafter(spec, target)
    assert (b.info.family, b.info.format, b.info.gamma) == (a.info.family, "speculators", a.info.gamma)
    _draft_twice(a, b, 5 * 576, a.info.gamma)


def test_specforge_eagle3_round_trip_renames_midlayer(tmp_path):
    src = FIXTURES / "specforge_eagle3"
    spec, back = tmp_path / "speculators", tmp_path / "back"
    convert.to_speculators(src, spec)
    assert convert.from_speculators(spec, back) == "specforge_eagle3"
    original, converted = _tensors(src), _tensors(spec)
    assert {k.replace("midlayer.", "layers.0.") for k in original} == converted.keys()
    for key, value in original.items():
        assert torch.equal(value, converted[key.replace("midlayer.", "layers.0.")])
    _same_tensors(original, _tensors(back))
    config = read_config(spec)
    assert config["transformer_layer_config"]["model_type"] == "llama"  # no q/k norms
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and config["draft_vocab_size"] == 256
    emb = load_file(str(src / "target_embeddings.safetensors"))["embed_tokens.weight"]
    target = TargetSpec(64, 512, 8, embed_tokens=emb)
    a, b = load_drafter(src, target), load_drafter(spec, target)
    ref = load_file(str(src / "reference.safetensors"))
    S, C = ref["token_ids"], ref["context_features"]
    for d in (a, b):
        d.append_context([0], [C[:12]], [torch.arange(12)], [S[:12]])
    blocks = [d.propose([0], S[12:13], torch.tensor([12]), SamplingBatch.greedy(1)) for d in (a, b)]
    assert torch.equal(blocks[0].tokens, blocks[1].tokens) and torch.equal(blocks[0].probs, blocks[1].probs)


def test_speculators_fixture_to_deepspec_and_back(tmp_path):
    """A speculators DSpark that samples from the anchor with the full vocabulary has a DeepSpec form."""
    src = FIXTURES / "speculators_dspark_vanilla"
    assert convert.from_speculators(src, tmp_path / "deepspec") == "deepspec_dspark"
    convert.to_speculators(tmp_path / "deepspec", tmp_path / "again")
    _same_tensors(_tensors(src), _tensors(tmp_path / "deepspec"))
    _same_tensors(_tensors(src), _tensors(tmp_path / "again"))


@pytest.mark.parametrize("name,field", [("speculators_dspark_gated", "sample_from_anchor"),
                                        ("speculators_dflash", "sample_from_anchor"),
                                        ("speculators_dspark_swa", "transformer_layer_config.layer_types"),
                                        ("speculators_eagle3", "draft_vocab_size"),
                                        ("speculators_eagle3_llama", "norm_before_residual"),
                                        ("speculators_eagle3_fcnorm", "fc_norm")])
def test_no_equivalent_is_refused_naming_the_field(tmp_path, name, field):
    with pytest.raises(DrafterConfigError, match=f"config.json: {field}: "):
        convert.from_speculators(FIXTURES / name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_direction_and_malformed_sources(tmp_path):
    with pytest.raises(DrafterConfigError, match="to-speculators converts DeepSpec"):
        convert.to_speculators(FIXTURES / "zlab_dflash", tmp_path / "a")
    with pytest.raises(DrafterConfigError, match="speculators_model_type: absent"):
        convert.from_speculators(FIXTURES / "deepspec_dflash", tmp_path / "b")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"speculators_model_type": "dspark"}))
    (bad / "model.safetensors").write_bytes((FIXTURES / "speculators_dspark_vanilla" / "model.safetensors").read_bytes())
    with pytest.raises(DrafterConfigError, match="transformer_layer_config: required key is missing"):
        convert.from_speculators(bad, tmp_path / "c")


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("to-speculators", "from-speculators", "sample_from_anchor", "bit for bit", "Layer ids shift by one"):
        assert phrase in text, phrase


def test_refuses_a_non_empty_output_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["to-speculators", str(FIXTURES / "deepspec_dflash"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "is not empty" in capsys.readouterr().err
