"""DFlash drafters: DeepSpec's (anchor slot drafts, gamma = block_size) and z-lab's (mask slots
draft, gamma = block_size - 1) against their reference tensors, plus cache, batching, sampling."""

from __future__ import annotations

import pytest
import torch

from _block_drafter_helpers import ATOL, ROUNDS, anchor, feed_context, load_fixture, max_err, sampling
from dspark_sglang.drafters.interface import Drafter, SamplingBatch
from dspark_sglang.sampling import process_logits

# fixture -> (logits tensor name in reference.safetensors, gamma, DrafterInfo.format)
FORMATS = {
    "deepspec_dflash": ("greedy_draft_logits", 7, "deepspec"),
    "zlab_dflash": ("draft_logits", 6, "zlab"),
}


@pytest.fixture(scope="module", params=list(FORMATS))
def fixture(request):
    drafter, ref = load_fixture(request.param)
    return request.param, drafter, ref


def test_reproduces_reference(fixture):
    name, drafter, ref = fixture
    logits_key, gamma, _ = FORMATS[name]
    assert isinstance(drafter, Drafter)
    drafter.release(0)
    for rnd, pos in ROUNDS.items():
        rows = ref[f"{rnd}.context_rows"]
        feed_context(drafter, 0, ref, int(rows[0]), int(rows[-1]) + 1)  # round 2 extends round 1
        tok, position = anchor(ref, pos)
        hidden = drafter.block_hidden([0], tok, position)
        assert max_err(hidden[0], ref[f"{rnd}.block_hidden"]) <= ATOL
        block, logits = drafter.propose_with_logits([0], tok, position, SamplingBatch.greedy(1))
        assert logits.shape == (1, gamma, 512)
        assert max_err(logits[0], ref[f"{rnd}.{logits_key}"]) <= ATOL
        assert torch.equal(block.tokens[0], ref[f"{rnd}.greedy_draft_tokens"])
        assert block.confidence_logits is None
        # Head-less: the confidence feature is the drafter's own temperature-1 top-1 probability,
        # not max q_k, which is 1 for every greedy draft.
        assert torch.equal(block.probs.amax(-1), torch.ones(1, gamma))
        assert torch.allclose(block.top1_probs, torch.softmax(logits, -1).amax(-1), atol=1e-6)
        assert (block.top1_probs < 1).all()
        scored, conf = drafter.score_block([0], tok, position, torch.zeros(1, gamma, dtype=torch.int64))
        assert conf is None and max_err(scored, logits) <= 1e-6
        if name == "deepspec_dflash":
            assert max_err(logits[0], ref[f"{rnd}.base_logits"]) <= ATOL  # no Markov bias


def test_info_and_slot_convention(fixture):
    name, drafter, ref = fixture
    _, gamma, fmt = FORMATS[name]
    info = drafter.info
    assert (info.family, info.format, info.gamma) == ("dflash", fmt, gamma)
    assert not info.has_markov_head and not info.has_confidence_head
    assert info.target_layer_ids == (1, 2, 3, 4, 5)
    # Draft k (1-based) predicts position anchor + k in both formats.
    assert torch.equal(ref["round1.label_ids"], ref["token_ids"][13 : 13 + gamma])
    if name == "zlab_dflash":  # the anchor row is computed but does not draft
        drafter.release(0)
        feed_context(drafter, 0, ref, 0, 12)
        tok, position = anchor(ref, 12)
        hidden = drafter.block_hidden([0], tok, position)
        _, logits = drafter.propose_with_logits([0], tok, position, SamplingBatch.greedy(1))
        assert max_err(logits[0], hidden[0, 1:] @ drafter.target_lm_head.T) <= 1e-5


def test_incremental_cache_equals_from_scratch(fixture):
    _, drafter, ref = fixture
    tok, position = anchor(ref, 20)
    results = []
    for chunks in ([(0, 20)], [(0, 7), (7, 8), (8, 15), (15, 20)]):
        drafter.release(0)
        for start, stop in chunks:
            feed_context(drafter, 0, ref, start, stop)
        results.append(drafter.propose_with_logits([0], tok, position, SamplingBatch.greedy(1)))
    (scratch, scratch_logits), (incremental, incremental_logits) = results
    assert torch.equal(scratch.tokens, incremental.tokens)
    assert max_err(scratch_logits, incremental_logits) <= 1e-6
    feed_context(drafter, 0, ref, 20, 24)
    drafter.truncate_context(0, 20)
    _, truncated_logits = drafter.propose_with_logits([0], tok, position, SamplingBatch.greedy(1))
    assert max_err(truncated_logits, scratch_logits) <= 1e-6


def test_batched_ragged_propose_equals_one_at_a_time(fixture):
    _, drafter, ref = fixture
    lengths = {0: 14, 1: 6, 2: 20, 3: 11}
    for slot, n in lengths.items():
        drafter.release(slot)
        feed_context(drafter, slot, ref, 0, n)
    # Mixed context sizes in one append call are split back per slot.
    drafter.release(4)
    drafter.release(5)
    rows_a, rows_b = torch.arange(0, 9), torch.arange(0, 3)
    feats = ref["context_features"]
    drafter.append_context([4, 5], [feats[rows_a], feats[rows_b]], [rows_a, rows_b],
                           [ref["token_ids"][rows_a], ref["token_ids"][rows_b]])
    lengths.update({4: 9, 5: 3})
    slots = list(lengths)
    anchors = torch.stack([ref["token_ids"][n] for n in lengths.values()])
    positions = torch.tensor(list(lengths.values()))
    batched, batched_logits = drafter.propose_with_logits(slots, anchors, positions, SamplingBatch.greedy(len(slots)))
    for r, slot in enumerate(slots):
        drafter.release(99)
        feed_context(drafter, 99, ref, 0, lengths[slot])
        single, single_logits = drafter.propose_with_logits([99], anchors[r : r + 1], positions[r : r + 1],
                                                            SamplingBatch.greedy(1))
        assert torch.equal(batched.tokens[r], single.tokens[0])
        assert max_err(batched_logits[r], single_logits[0]) <= 1e-5


def test_sampled_drafting(fixture):
    name, drafter, ref = fixture
    _, gamma, _ = FORMATS[name]
    drafter.release(0)
    feed_context(drafter, 0, ref, 0, 16)
    tok, position = anchor(ref, 16)
    num = 2000
    params = sampling([0.0] + [0.9] * (num - 1), top_k=5, top_p=0.95)  # small support: tight TV
    block, logits = drafter.propose_with_logits([0] * num, tok.expand(num), position.expand(num), params,
                                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(block.probs.sum(-1), torch.ones(num, gamma), atol=1e-5)
    assert torch.equal(block.token_probs, block.probs.gather(-1, block.tokens[..., None]).squeeze(-1))
    assert (block.token_probs > 0).all()
    # DFlash slots are independent: q_k = process_logits(U_k) with the request's parameters.
    expected = process_logits(logits[1:3].reshape(-1, 512), *(t[1:3].repeat_interleave(gamma) for t in (
        params.temperatures, params.top_ks, params.top_ps, params.min_ps)))
    assert max_err(expected.view(2, gamma, 512), block.probs[1:3]) <= 1e-6
    # Empirical law of every slot's draws matches its q (all rows share the same q here).
    for k in range(gamma):
        empirical = torch.bincount(block.tokens[1:, k], minlength=512).float() / (num - 1)
        assert 0.5 * (empirical - block.probs[1, k]).abs().sum() < 0.06
    # The greedy row equals greedy alone, and the reference chain.
    alone = drafter.propose([0], tok, position, SamplingBatch.greedy(1))
    assert torch.equal(block.tokens[0], alone.tokens[0])
    assert torch.equal(block.tokens[0], ref["round2.greedy_draft_tokens"])
