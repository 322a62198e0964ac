"""Malformed or mismatched speculators-format checkpoints: each raises the right DrafterLoadError
naming the file and the field. Copies are built in tmp_path; the fixtures are never touched.
(Random mutations of every fixture, these included, are in test_fuzz_inputs.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _block_drafter_helpers import FIXTURES, tiny_target
from dspark_sglang.drafters.errors import DrafterConfigError, DrafterWeightsError, TargetMismatchError
from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import load_drafter

DSPARK, DFLASH, EAGLE3 = "speculators_dspark_vanilla", "speculators_dflash", "speculators_eagle3"
RNN_VOCAB = "speculators_dspark_rnn"  # has d2t / t2d


def _copy(tmp_path, name: str):
    dest = tmp_path / name
    shutil.copytree(FIXTURES / name, dest)
    return dest


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _raises(path, error, pattern, target=None):
    with pytest.raises(error, match=pattern) as info:
        load_drafter(path, target or tiny_target())
    assert str(path) in info.value.path  # the message names the file


@pytest.mark.parametrize("kind", ["mtp", "dflash2", "peagle", "", "DSPARK"])
def test_unsupported_model_type(tmp_path, kind):
    path = _copy(tmp_path, DSPARK)
    _edit_config(path, lambda c: c.update(speculators_model_type=kind))
    _raises(path, DrafterConfigError, rf"config.json: speculators_model_type: '{kind}' is not supported")


@pytest.mark.parametrize("value", [True, {"": None}, [], [3]])
def test_malformed_architectures(tmp_path, value):
    """Found by test_fuzz_inputs: describe_drafter read architectures[0] of a speculators config unchecked."""
    from dspark_sglang.drafters.loader import describe_drafter

    path = _copy(tmp_path, DFLASH)
    _edit_config(path, lambda c: c.update(architectures=value))
    with pytest.raises(DrafterConfigError, match="architectures: must be a non-empty list of names"):
        describe_drafter(path)
    _raises(path, DrafterConfigError, "architectures: must be a non-empty list of names")


@pytest.mark.parametrize("key", ["transformer_layer_config", "aux_hidden_state_layer_ids", "mask_token_id",
                                 "block_size", "draft_vocab_size"])
def test_missing_required_key(tmp_path, key):
    path = _copy(tmp_path, DSPARK)
    _edit_config(path, lambda c: c.pop(key))
    _raises(path, DrafterConfigError, f"config.json: {key}: required key is missing")


def test_nested_layer_config_errors_name_the_nested_field(tmp_path):
    path = _copy(tmp_path, DFLASH)
    _edit_config(path, lambda c: c["transformer_layer_config"].pop("hidden_size"))
    _raises(path, DrafterConfigError, "transformer_layer_config.hidden_size: required key is missing")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(hidden_size=64, num_key_value_heads=3))
    _raises(path, DrafterConfigError, "transformer_layer_config.num_key_value_heads: 3 does not divide")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(num_key_value_heads=2, attention_bias=True))
    _raises(path, DrafterConfigError, "transformer_layer_config.attention_bias: projection biases are not supported")


def test_sliding_window_fields(tmp_path):
    path = _copy(tmp_path, "speculators_dspark_swa")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(sliding_window=None))
    _raises(path, DrafterConfigError, "transformer_layer_config.sliding_window: required key is missing")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(sliding_window=0))
    _raises(path, DrafterConfigError, r"transformer_layer_config.sliding_window: must be in \[1, ")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(sliding_window=5, layer_types=["sliding_attention"]))
    _raises(path, DrafterConfigError, "transformer_layer_config.layer_types: 1 entries for 2 layers")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(layer_types=["sliding", "full_attention"]))
    _raises(path, DrafterConfigError, "transformer_layer_config.layer_types: expected a list of full_attention")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(layer_types=["sliding_attention", "full_attention"]))
    _edit_config(path, lambda c: c.update(sliding_window_non_causal="no"))
    _raises(path, DrafterConfigError, "sliding_window_non_causal: expected bool")
    eagle = _copy(tmp_path, EAGLE3)
    _edit_config(eagle, lambda c: c["transformer_layer_config"].update(layer_types=["sliding_attention"], sliding_window=4))
    _raises(eagle, DrafterConfigError, "transformer_layer_config.layer_types: sliding-window Eagle3 layers are not supported")


def test_config_value_checks(tmp_path):
    path = _copy(tmp_path, DSPARK)
    _edit_config(path, lambda c: c.update(markov_head_type="lstm"))
    _raises(path, DrafterConfigError, r"markov_head_type: 'lstm' is not one of")
    _edit_config(path, lambda c: c.update(markov_head_type="vanilla", markov_rank=0))
    _raises(path, DrafterConfigError, "confidence_head_with_markov: true but markov_rank is 0")
    _edit_config(path, lambda c: c.update(markov_rank=16, block_size=1))
    _raises(path, DrafterConfigError, r"block_size: must be in \[2, 1024\], got 1")
    _edit_config(path, lambda c: c.update(block_size=7, sample_from_anchor="yes"))
    _raises(path, DrafterConfigError, "sample_from_anchor: expected bool")
    _edit_config(path, lambda c: c.update(sample_from_anchor=True, target_hidden_size=128))
    _raises(path, DrafterConfigError, "target_hidden_size: 128 differs from the draft's hidden size 64")
    _edit_config(path, lambda c: c.update(target_hidden_size=64, draft_vocab_size=1024))
    _raises(path, DrafterConfigError, r"draft_vocab_size: must be in \[1, transformer_layer_config.vocab_size=512\]")
    _edit_config(path, lambda c: c.update(draft_vocab_size=512, aux_hidden_state_layer_ids=[2, 2, 3, 4, 5]))
    _raises(path, DrafterConfigError, "aux_hidden_state_layer_ids: must be distinct")


def test_target_mismatches(tmp_path):
    path = _copy(tmp_path, DSPARK)
    _raises(path, TargetMismatchError, "hidden_size: drafter has 64, target has 128", TargetSpec(128, 512, 8))
    _raises(path, TargetMismatchError, "vocab_size: drafter has 512, target has 1000", TargetSpec(64, 1000, 8))
    # speculators' ids are hidden_states indices: 8 would be the final state of an 8-layer target
    _edit_config(path, lambda c: c.update(aux_hidden_state_layer_ids=[2, 3, 4, 5, 8]))
    _raises(path, TargetMismatchError, r"aux_hidden_state_layer_ids: \[8\] outside \[0, 7\] for a 8-layer target")
    _edit_config(path, lambda c: c.update(aux_hidden_state_layer_ids=[2, 3, 4, 5, 6], mask_token_id=512))
    _raises(path, TargetMismatchError, "mask_token_id: 512 is outside the target vocabulary")


def test_borrowed_weights_must_come_from_the_target(tmp_path):
    path = _copy(tmp_path, DSPARK)
    _raises(path, TargetMismatchError, "embed_tokens: this drafter borrows the target's weight",
            TargetSpec(64, 512, 8))
    full = tiny_target()
    _raises(path, TargetMismatchError, "lm_head: this drafter borrows",
            TargetSpec(64, 512, 8, embed_tokens=full.embed_tokens))


def test_draft_vocabulary_maps(tmp_path):
    path = _copy(tmp_path, RNN_VOCAB)
    _edit_tensors(path, lambda t: t.pop("t2d"))
    _raises(path, DrafterWeightsError, "t2d: missing: draft_vocab_size 256 < vocabulary 512 needs d2t and t2d")
    shutil.rmtree(path)
    path = _copy(tmp_path, RNN_VOCAB)
    _edit_tensors(path, lambda t: t.update(t2d=t["t2d"].long()))
    _raises(path, DrafterWeightsError, r"t2d: must be a bool \[512\] tensor")
    shutil.rmtree(path)
    path = _copy(tmp_path, RNN_VOCAB)

    def shift(t):  # d + d2t[d] no longer the d-th member of t2d
        t["d2t"][3] += 1

    _edit_tensors(path, shift)
    _raises(path, DrafterWeightsError, "d2t: inconsistent with t2d at draft index 3")
    shutil.rmtree(path)
    path = _copy(tmp_path, RNN_VOCAB)
    _edit_tensors(path, lambda t: t.pop("lm_head.weight"))
    _raises(path, DrafterWeightsError, r"lm_head.weight: missing: a draft-vocabulary checkpoint carries its own \[256, H\]")


def test_maps_without_a_draft_vocabulary_are_refused(tmp_path):
    path = _copy(tmp_path, DSPARK)
    _edit_tensors(path, lambda t: t.update(d2t=torch.zeros(512, dtype=torch.int64), t2d=torch.ones(512, dtype=torch.bool)))
    _raises(path, DrafterWeightsError, "d2t: present, but draft_vocab_size equals the vocabulary")


def test_mis_shaped_markov_w2_for_the_draft_vocabulary(tmp_path):
    path = _copy(tmp_path, RNN_VOCAB)
    _edit_tensors(path, lambda t: t.update({"markov_head.markov_w2.weight": torch.zeros(512, 16)}))
    _raises(path, DrafterWeightsError, r"markov_head.markov_w2.weight: shape \[512, 16\] does not match the expected \[256, 16\]")


def test_eagle3_variants_and_layers(tmp_path):
    path = _copy(tmp_path, EAGLE3)
    _edit_config(path, lambda c: c.update(norm_before_fc=True, fc_norm=True))
    _raises(path, DrafterConfigError, "fc_norm: norm_before_fc and fc_norm are mutually exclusive")
    _edit_config(path, lambda c: c.update(fc_norm=False))  # norm_before_fc alone: needs input_norm.weight
    _raises(path, DrafterWeightsError, r"missing tensors \[input_norm.weight\]")
    _edit_config(path, lambda c: c.update(norm_before_fc=False, norm_output="yes"))
    _raises(path, DrafterConfigError, "norm_output: expected bool")
    _edit_config(path, lambda c: c.update(norm_output=False))
    _edit_config(path, lambda c: c["transformer_layer_config"].update(model_type="gemma3"))
    _raises(path, DrafterConfigError, "transformer_layer_config.model_type: 'gemma3'")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(model_type="qwen3", num_hidden_layers=2))
    _raises(path, DrafterConfigError, "num_hidden_layers: Eagle3 drafters have exactly 1 decoder layer")
    _edit_config(path, lambda c: c["transformer_layer_config"].update(num_hidden_layers=1))
    _edit_config(path, lambda c: c["transformer_layer_config"].update(model_type="llama"))  # no q/k norms
    _raises(path, DrafterWeightsError, r"unexpected tensors \[layers.0.self_attn.k_norm.weight")


def test_eagle3_fc_norm_tensors_are_checked(tmp_path):
    path = _copy(tmp_path, "speculators_eagle3_fcnorm")
    _edit_tensors(path, lambda t: t.update({"fc_norm.2.weight": torch.ones(32)}))
    _raises(path, DrafterWeightsError, r"fc_norm.2.weight: shape \[32\] does not match the expected \[64\]")
    shutil.rmtree(path)
    path = _copy(tmp_path, "speculators_eagle3_fcnorm")
    _edit_config(path, lambda c: c.update(fc_norm=False))
    _raises(path, DrafterWeightsError, r"unexpected tensors \[fc_norm.0.weight, fc_norm.1.weight, fc_norm.2.weight\]")


def test_eagle3_full_vocabulary_lm_head_is_borrowed_when_absent(tmp_path):
    path = _copy(tmp_path, "speculators_eagle3_llama")  # 512 = the vocabulary
    _edit_tensors(path, lambda t: t.pop("lm_head.weight"))
    assert load_drafter(path, tiny_target()).model.lm_head.weight.shape == (512, 64)
    _raises(path, TargetMismatchError, "lm_head: this drafter borrows",
            TargetSpec(64, 512, 8, embed_tokens=tiny_target().embed_tokens))


def test_eagle3_missing_embedding_is_borrowed_from_the_target(tmp_path):
    path = _copy(tmp_path, EAGLE3)
    _edit_tensors(path, lambda t: t.pop("embed_tokens.weight"))
    drafter = load_drafter(path, tiny_target())
    assert drafter.target_embed.shape == (512, 64)
    _raises(path, TargetMismatchError, "embed_tokens: this drafter borrows", TargetSpec(64, 512, 8))
