"""Reduced draft vocabularies (dspark_sglang/drafters/draft_vocab.py): the file format, its checks,
and that every drafter family drafts over the subset exactly as over the full vocabulary with the
other tokens masked out (same uniforms, same tokens, q = 0 outside the subset)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dspark_sglang.drafters import draft_vocab as dv
from dspark_sglang.drafters.errors import DrafterConfigError, DrafterWeightsError
from dspark_sglang.drafters.loader import load_drafter
from tests.unit._block_drafter_helpers import FIXTURES, ROUNDS, anchor, feed_context, sampling, tiny_target

V = 512


def subset(seed: int = 0, size: int = 96) -> dv.DraftVocab:
    g = torch.Generator().manual_seed(seed)
    return dv.from_ids(torch.randperm(V, generator=g)[:size].tolist(), V)


def test_save_load_round_trip(tmp_path):
    vocab = subset()
    dv.save(tmp_path / "v.safetensors", vocab)
    back = dv.load(tmp_path / "v.safetensors", V)
    assert torch.equal(back.ids, vocab.ids) and back.vocab_size == V
    assert torch.equal(back.ids, torch.sort(back.ids).values)


def test_most_frequent_ranks_by_count_then_id_and_keeps_specials():
    counts = torch.zeros(10, dtype=torch.int64)
    counts[[7, 3, 5, 9]] = torch.tensor([5, 5, 9, 1])
    vocab = dv.most_frequent(counts, 2, keep=[0])
    assert vocab.ids.tolist() == [0, 3, 5]  # 5 (9 counts), then 3 before 7 (tie: lower id), plus kept 0
    assert dv.coverage(vocab, counts) == pytest.approx(14 / 20)
    with pytest.raises(ValueError, match="size"):
        dv.most_frequent(counts, 0)


@pytest.mark.parametrize("case", ["missing_t2d", "float_d2t", "short_t2d", "inconsistent", "out_of_range", "garbage"])
def test_bad_files_name_the_field(tmp_path, case):
    ids = subset().ids
    d2t, t2d = ids - torch.arange(ids.numel()), torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    tensors = {"d2t": d2t, "t2d": t2d}
    field = {"missing_t2d": "t2d", "float_d2t": "d2t", "short_t2d": "t2d", "inconsistent": "d2t",
             "out_of_range": "d2t", "garbage": "file"}[case]
    if case == "missing_t2d":
        del tensors["t2d"]
    elif case == "float_d2t":
        tensors["d2t"] = d2t.float()
    elif case == "short_t2d":
        tensors["t2d"] = t2d[:-1]
    elif case == "inconsistent":
        tensors["d2t"] = d2t.clone()
        tensors["d2t"][3] += 1
    elif case == "out_of_range":
        tensors["d2t"] = d2t.clone()
        tensors["d2t"][-1] = V * 4
    path = tmp_path / "v.safetensors"
    if case == "garbage":
        path.write_bytes(b"\x00" * 40)
    else:
        save_file(tensors, str(path))
    with pytest.raises(DrafterWeightsError) as err:
        dv.load(path, V)
    assert err.value.field == field and str(path) in str(err.value)


def test_load_drafter_auto_uses_the_file_beside_the_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "deepspec_dspark_vanilla", folder)
    assert load_drafter(folder, tiny_target()).draft_vocab is None
    dv.save(dv.beside(folder), subset())
    assert torch.equal(load_drafter(folder, tiny_target()).draft_vocab.ids, subset().ids)
    assert load_drafter(folder, tiny_target(), draft_vocab=None).draft_vocab is None
    with pytest.raises(DrafterConfigError, match="no such file"):
        load_drafter(folder, tiny_target(), draft_vocab=tmp_path / "absent.safetensors")


def test_specforge_eagle3_refuses_a_second_reduced_vocabulary(tmp_path):
    file = tmp_path / "v.safetensors"
    dv.save(file, subset())
    with pytest.raises(DrafterConfigError, match="already drafts over its own reduced vocabulary"):
        load_drafter(FIXTURES / "specforge_eagle3", tiny_target(), draft_vocab=file)


def _masked_twin(name: str, vocab: dv.DraftVocab):
    """The full-vocabulary drafter whose draft logits are -inf outside the subset."""
    drafter = load_drafter(FIXTURES / name, tiny_target(), draft_vocab=None)
    outside = torch.ones(V, dtype=torch.bool)
    outside[vocab.ids] = False
    if name == "deepspec_eagle3":
        full = drafter._logits
        drafter._logits = lambda x: full(x).masked_fill(outside, float("-inf"))
    elif name == "zlab_dflash":
        full = drafter._draft_logits
        drafter._draft_logits = lambda *a, **k: full(*a, **k).masked_fill(outside, float("-inf"))
    else:
        weight = drafter.lm_head.weight
        drafter.lm_head.forward = lambda h: F.linear(h, weight).masked_fill(outside, float("-inf"))
    return drafter


@pytest.mark.parametrize("name", ["deepspec_dspark_vanilla", "deepspec_dspark_gated", "deepspec_dspark_rnn",
                                  "deepspec_dflash", "zlab_dflash", "deepspec_eagle3"])
def test_drafting_over_a_subset_equals_masking_the_full_vocabulary(name, tmp_path):
    from safetensors.torch import load_file

    vocab = subset(seed=1, size=128)
    file = tmp_path / "v.safetensors"
    dv.save(file, vocab)
    reduced = load_drafter(FIXTURES / name, tiny_target(), draft_vocab=file)
    twin = _masked_twin(name, vocab)
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    position = ROUNDS["round1"]
    blocks = []
    for drafter in (reduced, twin):
        feed_context(drafter, 0, ref, 0, position)
        feed_context(drafter, 1, ref, 0, position)
        tok, pos = anchor(ref, position)
        gen = torch.Generator().manual_seed(7)
        blocks.append(drafter.propose([0, 1], tok.repeat(2), pos.repeat(2), sampling([0.0, 1.0]), gen))
    got, want = blocks
    assert torch.equal(got.tokens, want.tokens)
    assert bool(torch.isin(got.tokens, vocab.ids).all())
    assert torch.allclose(got.probs, want.probs, atol=1e-6)
    outside = torch.ones(V, dtype=torch.bool)
    outside[vocab.ids] = False
    assert float(got.probs[..., outside].abs().max()) == 0.0
    assert torch.allclose(got.probs.sum(-1), torch.ones(2, got.tokens.shape[1]), atol=1e-5)
    assert torch.allclose(got.token_probs, got.probs.gather(-1, got.tokens[..., None]).squeeze(-1))
    if want.confidence_logits is not None:
        assert torch.allclose(got.confidence_logits, want.confidence_logits, atol=1e-6)
