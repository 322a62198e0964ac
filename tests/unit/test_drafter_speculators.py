"""vLLM speculators-format drafters (DSpark, DFlash, Eagle3) against the reference tensors
speculators 0.9.0's own classes produced (tests/fixtures/drafters/make_speculators_fixtures.py),
plus the format's conventions: slots with and without anchor sampling, the checkpoint's own draft
vocabulary (q = 0 outside it), layer ids shifted by one, and the borrowed target weights."""

from __future__ import annotations

import pytest
import torch

from _block_drafter_helpers import ATOL, FIXTURES, ROUNDS, anchor, feed_context, load_fixture, max_err, sampling
import dataclasses

from dspark_sglang.drafters import draft_vocab as dv
from dspark_sglang.drafters.checkpoint import read_config
from dspark_sglang.drafters.dspark import DSparkDrafter
from dspark_sglang.drafters.eagle3 import Eagle3Drafter
from dspark_sglang.drafters.interface import Drafter, SamplingBatch
from dspark_sglang.drafters.loader import describe_drafter

# fixture -> (sample_from_anchor, has a draft vocabulary of its own, DSpark heads)
BLOCK = {
    "speculators_dspark_vanilla": (True, False, True),
    "speculators_dspark_gated": (False, False, True),
    "speculators_dspark_rnn": (False, True, True),
    "speculators_dflash": (False, True, False),
    # layer 0 slides over the 5 context positions before the anchor; its block: causal / bidirectional
    "speculators_dspark_swa": (True, False, True),
    "speculators_dflash_swa": (False, False, False),
}


@pytest.fixture(scope="module", params=sorted(BLOCK))
def block_fixture(request):
    drafter, ref = load_fixture(request.param)
    return request.param, drafter, ref


def _rounds(drafter, ref):
    """Both fixture rounds on slot 0 (round 2 extends round 1's cache)."""
    drafter.release(0)
    for rnd, pos in ROUNDS.items():
        rows = ref[f"{rnd}.context_rows"]
        feed_context(drafter, 0, ref, int(rows[0]), int(rows[-1]) + 1)
        yield rnd, pos


def test_block_drafters_reproduce_speculators(block_fixture):
    name, drafter, ref = block_fixture
    from_anchor, own_vocab, dspark = BLOCK[name]
    first = 0 if from_anchor else 1  # speculators' teacher-forced tensors cover every block slot
    assert isinstance(drafter, Drafter) and isinstance(drafter, DSparkDrafter)
    for rnd, pos in _rounds(drafter, ref):
        assert drafter.context_length(0) == pos
        tok, position = anchor(ref, pos)
        hidden = drafter.block_hidden([0], tok, position)
        assert max_err(hidden[0], ref[f"{rnd}.block_hidden"]) <= ATOL
        assert max_err(drafter.lm_head(hidden[0]), ref[f"{rnd}.base_logits"]) <= ATOL
        block, logits = drafter.propose_with_logits([0], tok, position, SamplingBatch.greedy(1))
        assert torch.equal(block.tokens[0], ref[f"{rnd}.greedy_draft_tokens"])
        assert max_err(logits[0], ref[f"{rnd}.greedy_draft_logits"]) <= ATOL
        assert torch.equal(block.token_probs, torch.ones_like(block.token_probs))
        if dspark:
            assert max_err(block.confidence_logits[0], ref[f"{rnd}.greedy_confidence_logits"]) <= ATOL
            prev = ref[f"{rnd}.teacher_forced_prev_ids"][first:][None]
            tf_logits, tf_conf = drafter.score_block([0], tok, position, prev)
            assert max_err(tf_logits[0], ref[f"{rnd}.teacher_forced_logits"][first:]) <= ATOL
            assert max_err(tf_conf[0], ref[f"{rnd}.teacher_forced_confidence_logits"][first:]) <= ATOL
        else:
            assert block.confidence_logits is None


def test_block_info_and_slot_convention(block_fixture):
    name, drafter, ref = block_fixture
    from_anchor, own_vocab, dspark = BLOCK[name]
    info = drafter.info
    assert info.format == "speculators" and info.family == ("dspark" if dspark else "dflash")
    # gamma = block_size with anchor sampling, block_size - 1 without (7-row blocks)
    assert info.gamma == (7 if from_anchor else 6) == ref["round1.greedy_draft_tokens"].numel()
    # aux_hidden_state_layer_ids [2..6] are HF hidden_states indices: our decoder-layer outputs 1..5
    assert read_config(FIXTURES / name)["aux_hidden_state_layer_ids"] == [2, 3, 4, 5, 6]
    assert info.target_layer_ids == (1, 2, 3, 4, 5)
    # the labels: drafting row k predicts anchor + k + 1 in both conventions
    assert torch.equal(ref["round1.label_ids"], ref["token_ids"][13 : 13 + info.gamma])
    row = describe_drafter(FIXTURES / name).as_row()
    assert row["vocab"] == ("256/512" if own_vocab else 512)
    assert row["borrows"] == ("embed_tokens" if own_vocab else "embed_tokens,lm_head")


def test_own_draft_vocabulary_is_exact(block_fixture):
    """q lives on the checkpoint's d2t ids: sampled tokens are members, q = 0 elsewhere, sums 1."""
    name, drafter, ref = block_fixture
    _, own_vocab, _ = BLOCK[name]
    list(_rounds(drafter, ref))
    tok, position = anchor(ref, 16)
    gen = torch.Generator().manual_seed(5)
    block = drafter.propose([0], tok, position, sampling([1.0]), gen)
    assert torch.allclose(block.probs.sum(-1), torch.ones(1, drafter.info.gamma), atol=1e-5)
    assert torch.equal(block.token_probs, block.probs[0].gather(-1, block.tokens[0][:, None]).T)
    if not own_vocab:
        assert drafter.native_vocab is None
        return
    members = drafter.native_vocab.ids
    assert members.numel() == 256 and bool(torch.isin(block.tokens, members).all())
    outside = torch.ones(512, dtype=torch.bool)
    outside[members] = False
    assert float(block.probs[0][:, outside].abs().max()) == 0.0


@pytest.mark.parametrize("name", [n for n, (_, own, _) in sorted(BLOCK.items()) if own])
def test_restricting_an_own_vocabulary_to_a_subset(name):
    """A further DraftVocab must lie inside the checkpoint's own (lm_head holds only its rows)."""
    drafter, ref = load_fixture(name)
    list(_rounds(drafter, ref))
    tok, position = anchor(ref, 16)
    native = drafter.native_vocab
    subset = dv.DraftVocab(native.ids[::2].clone(), 512)
    try:
        drafter.restrict_vocab(subset)
        block, logits = drafter.propose_with_logits([0], tok, position, SamplingBatch.greedy(1))
        assert logits.shape == (1, drafter.info.gamma, 128)
        assert bool(torch.isin(block.tokens, subset.ids).all())
        with pytest.raises(ValueError, match="outside the checkpoint's own 256-token draft vocabulary"):
            drafter.restrict_vocab(dv.from_ids(range(512), 512))
    finally:
        drafter.restrict_vocab(None)
    assert drafter.draft_vocab is drafter.native_vocab or torch.equal(drafter.draft_vocab.ids, native.ids)


def test_batched_ragged_equals_one_by_one(block_fixture):
    """Two requests with different context lengths in one propose = each alone (greedy)."""
    name, drafter, ref = block_fixture
    for slot, end in ((0, 12), (1, 16)):
        drafter.release(slot)
        feed_context(drafter, slot, ref, 0, end)
    S = ref["token_ids"]
    both = drafter.propose([0, 1], S[[12, 16]], torch.tensor([12, 16]), SamplingBatch.greedy(2))
    for r, rnd in enumerate(("round1", "round2")):
        assert torch.equal(both.tokens[r], ref[f"{rnd}.greedy_draft_tokens"])


# fixture -> (q/k norms, draft vocabulary size, norm_before_residual, norm_output, fc input norm)
EAGLE3 = {
    "speculators_eagle3": (True, 256, False, False, None),
    "speculators_eagle3_fcnorm": (True, 256, False, False, "per_layer"),
    "speculators_eagle3_llama": (False, 512, True, True, "concat"),
}


@pytest.mark.parametrize("name", sorted(EAGLE3))
def test_eagle3_ttt_steps_reproduce_speculators(name):
    drafter, ref = load_fixture(name)
    assert isinstance(drafter, Eagle3Drafter)
    assert (drafter.info.format, drafter.info.gamma, drafter.info.target_layer_ids) == ("speculators", 3, (1, 3, 4))
    cfg = drafter.config
    assert (cfg.qk_norm, cfg.draft_vocab_size, cfg.norm_before_residual, cfg.norm_output, cfg.fc_input_norm) == EAGLE3[name]
    S, C = ref["token_ids"], ref["context_features"]
    rows = torch.arange(19)  # rows 0..18 have real inputs at all three steps (T = 21)
    slots = list(range(rows.numel()))
    ends = (rows + 1).tolist()
    drafter.append_context(slots, [C[:n] for n in ends], [torch.arange(n) for n in ends], [S[:n] for n in ends])
    forced = torch.stack([S[rows + 2], S[rows + 3]], dim=1)  # [19, 2] target ids for steps 1, 2
    logits, _ = drafter.score_chain(slots, S[rows + 1], rows + 1, forced)
    for k in range(3):
        assert max_err(logits[:, k], ref[f"ttt.step{k}.logits"][rows]) <= ATOL, k
    # Greedy step 0 drafts speculators' step-0 argmax, mapped through d2t to target ids.
    block = drafter.propose(slots, S[rows + 1], rows + 1, SamplingBatch.greedy(rows.numel()))
    assert torch.equal(block.tokens[:, 0], ref["ttt.step0.draft_tokens"][rows])
    assert (drafter.draft_ids is None) == (cfg.draft_vocab_size == 512)


def test_eagle3_variants_matter():
    """Negative controls: each speculators variant flag, switched off, moves the logits far."""
    drafter, ref = load_fixture("speculators_eagle3_llama")
    S, C = ref["token_ids"], ref["context_features"]
    rows = torch.arange(19)
    forced = torch.stack([S[rows + 2], S[rows + 3]], dim=1)
    config = drafter.config

    def err_with(**changes) -> float:
        drafter.config = dataclasses.replace(config, **changes)
        drafter.model.layer.norm_before_residual = drafter.config.norm_before_residual
        drafter.model.fc_input_norm = drafter.config.fc_input_norm
        for slot in range(19):
            drafter.release(slot)
        ends = (rows + 1).tolist()
        drafter.append_context(list(range(19)), [C[:n] for n in ends], [torch.arange(n) for n in ends], [S[:n] for n in ends])
        logits, _ = drafter.score_chain(list(range(19)), S[rows + 1], rows + 1, forced)
        return max(max_err(logits[:, k], ref[f"ttt.step{k}.logits"][rows]) for k in range(3))

    assert err_with() <= ATOL
    for changes in ({"norm_before_residual": False}, {"norm_output": False}, {"fc_input_norm": None}):
        assert err_with(**changes) > 1e-3, changes
    err_with()  # restore


@pytest.mark.parametrize("name,non_causal", [("speculators_dspark_swa", False), ("speculators_dflash_swa", True)])
def test_sliding_window_layer_and_its_block_mask_matter(name, non_causal):
    """Negative controls: reading the whole context, or the other block mask, in the sliding layer
    moves the block hidden states far beyond float rounding."""
    drafter, ref = load_fixture(name)
    assert (drafter.config.sliding_layers, drafter.config.sliding_window) == ((0,), 5)
    assert drafter.config.sliding_non_causal is non_causal
    feed_context(drafter, 0, ref, 0, 16)
    tok, position = anchor(ref, 16)
    want = ref["round2.block_hidden"]
    assert max_err(drafter.block_hidden([0], tok, position)[0], want) <= ATOL
    config = drafter.config
    for changed in (dataclasses.replace(config, sliding_layers=()),
                    dataclasses.replace(config, sliding_non_causal=not non_causal),
                    dataclasses.replace(config, sliding_window=6)):
        drafter.config = changed
        assert max_err(drafter.block_hidden([0], tok, position)[0], want) > 1e-3, changed
    drafter.config = config
