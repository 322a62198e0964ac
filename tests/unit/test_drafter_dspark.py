"""DeepSpec DSpark drafters (Markov heads vanilla / gated / rnn + confidence head) against the
reference tensors DeepSpec's own code produced, plus cache, batching and sampling properties."""

from __future__ import annotations

import pytest
import torch

from _block_drafter_helpers import ATOL, FIXTURES, ROUNDS, anchor, feed_context, load_fixture, max_err, sampling
from dspark_sglang.drafters.config import parse_block_config
from dspark_sglang.drafters.checkpoint import read_config
from dspark_sglang.drafters.dspark import DSparkDrafter
from dspark_sglang.drafters.interface import Drafter, SamplingBatch
from dspark_sglang.sampling import process_logits

HEADS = ["vanilla", "gated", "rnn"]


@pytest.fixture(scope="module", params=HEADS)
def fixture(request):
    return load_fixture(f"deepspec_dspark_{request.param}")


def _replay_rounds(drafter, ref):
    """Run both fixture rounds on slot 0; yield (round, anchor_pos, hidden, greedy block, logits)."""
    drafter.release(0)
    previous = 0
    for rnd, pos in ROUNDS.items():
        rows = ref[f"{rnd}.context_rows"]
        assert rows[0] == previous  # round 2 extends round 1's cache
        feed_context(drafter, 0, ref, int(rows[0]), int(rows[-1]) + 1)
        previous = pos
        tok, position = anchor(ref, pos)
        hidden = drafter.block_hidden([0], tok, position)
        block, logits = drafter.propose_with_logits([0], tok, position, SamplingBatch.greedy(1))
        yield rnd, pos, hidden, block, logits


def test_reproduces_deepspec_reference(fixture):
    drafter, ref = fixture
    assert isinstance(drafter, Drafter)
    for rnd, pos, hidden, block, logits in _replay_rounds(drafter, ref):
        assert drafter.context_length(0) == pos
        assert max_err(hidden[0], ref[f"{rnd}.block_hidden"]) <= ATOL
        assert max_err(drafter.lm_head(hidden[0]), ref[f"{rnd}.base_logits"]) <= ATOL
        assert torch.equal(block.tokens[0], ref[f"{rnd}.greedy_draft_tokens"])
        assert max_err(logits[0], ref[f"{rnd}.greedy_draft_logits"]) <= ATOL
        assert max_err(block.confidence_logits[0], ref[f"{rnd}.greedy_confidence_logits"]) <= ATOL
        # Greedy q is one-hot at the drafted token.
        assert torch.equal(block.token_probs, torch.ones_like(block.token_probs))

        tok, position = anchor(ref, pos)
        prev = ref[f"{rnd}.teacher_forced_prev_ids"][None]
        tf_logits, tf_conf = drafter.score_block([0], tok, position, prev)
        assert max_err(tf_logits[0], ref[f"{rnd}.teacher_forced_logits"]) <= ATOL
        assert max_err(tf_conf[0], ref[f"{rnd}.teacher_forced_confidence_logits"]) <= ATOL


def test_info_and_slot_convention(fixture):
    drafter, ref = fixture
    info = drafter.info
    assert (info.family, info.format, info.gamma) == ("dspark", "deepspec", 7)
    assert info.has_markov_head and info.has_confidence_head
    assert info.target_layer_ids == (1, 2, 3, 4, 5) and info.vocab_size == 512
    # Slot k predicts anchor + k + 1: the labels align with the slots (teacher forcing feeds
    # [anchor, S[a+1..a+6]], i.e. slot k's previous token is S[a+k]).
    labels = ref["round1.label_ids"]
    assert torch.equal(ref["round1.teacher_forced_prev_ids"][1:], labels[:-1])


def test_incremental_cache_equals_from_scratch(fixture):
    drafter, ref = fixture
    tok, position = anchor(ref, 19)
    greedy = SamplingBatch.greedy(1)
    for chunks in ([(0, 19)], [(0, 5), (5, 12), (12, 13), (13, 19)]):
        drafter.release(0)
        for start, stop in chunks:
            feed_context(drafter, 0, ref, start, stop)
        block, logits = drafter.propose_with_logits([0], tok, position, greedy)
        if len(chunks) == 1:
            scratch = (block, logits)
    assert torch.equal(block.tokens, scratch[0].tokens)
    assert max_err(logits, scratch[1]) <= 1e-6
    assert max_err(block.confidence_logits, scratch[0].confidence_logits) <= 1e-6

    # Truncation rewinds: feed past the anchor, cut back, and get the same block.
    feed_context(drafter, 0, ref, 19, 23)
    drafter.truncate_context(0, 19)
    assert drafter.context_length(0) == 19
    again, again_logits = drafter.propose_with_logits([0], tok, position, greedy)
    assert torch.equal(again.tokens, scratch[0].tokens) and max_err(again_logits, scratch[1]) <= 1e-6
    drafter.release(0)
    assert drafter.context_length(0) == 0


def test_batched_ragged_propose_equals_one_at_a_time(fixture):
    drafter, ref = fixture
    lengths = {3: 9, 7: 16, 11: 12, 5: 21}  # slot -> context length (anchor at that position)
    for slot, n in lengths.items():
        drafter.release(slot)
        feed_context(drafter, slot, ref, 0, n)
    slots = list(lengths)
    anchors = torch.stack([ref["token_ids"][n] for n in lengths.values()])
    positions = torch.tensor(list(lengths.values()))
    batched, batched_logits = drafter.propose_with_logits(slots, anchors, positions, SamplingBatch.greedy(4))
    for r, slot in enumerate(slots):
        single, single_logits = drafter.propose_with_logits([slot], anchors[r : r + 1], positions[r : r + 1],
                                                            SamplingBatch.greedy(1))
        assert torch.equal(batched.tokens[r], single.tokens[0])
        assert max_err(batched_logits[r], single_logits[0]) <= 1e-5
        assert max_err(batched.confidence_logits[r], single.confidence_logits[0]) <= 1e-5
    # Teacher-forced scoring batches the same way.
    prev = torch.cat([anchors[:, None], batched.tokens[:, :-1]], dim=1)
    tf_logits, tf_conf = drafter.score_block(slots, anchors, positions, prev)
    assert max_err(tf_logits, batched_logits) <= 1e-5
    assert max_err(tf_conf, batched.confidence_logits) <= 1e-5


def test_sampled_drafting_draws_from_q(fixture):
    drafter, ref = fixture
    drafter.release(0)
    feed_context(drafter, 0, ref, 0, 12)
    num = 3000
    tok, position = anchor(ref, 12)
    params = sampling([1.0] * num, top_k=6)
    block = drafter.propose([0] * num, tok.expand(num), position.expand(num), params,
                            generator=torch.Generator().manual_seed(0))
    gamma, vocab = drafter.info.gamma, drafter.info.vocab_size
    assert block.probs.shape == (num, gamma, vocab) and block.tokens.shape == (num, gamma)
    assert torch.allclose(block.probs.sum(-1), torch.ones(num, gamma), atol=1e-5)
    assert torch.equal(block.token_probs, block.probs.gather(-1, block.tokens[..., None]).squeeze(-1))
    assert (block.token_probs > 0).all()
    assert ((block.probs > 0).sum(-1) <= 6).all()  # top-k applied to q itself

    # q_k is the Markov-corrected softmax given the sampled prefix: rescoring the chain with
    # teacher forcing and processing it the same way gives q back.
    prev = torch.cat([tok.expand(num)[:, None], block.tokens[:, :-1]], dim=1)
    logits, conf = drafter.score_block([0] * 64, tok.expand(64), position.expand(64), prev[:64])
    rebuilt = process_logits(logits.reshape(-1, vocab), *(t.repeat_interleave(gamma) for t in (
        params.temperatures[:64], params.top_ks[:64], params.top_ps[:64], params.min_ps[:64])))
    assert max_err(rebuilt.view(64, gamma, vocab), block.probs[:64]) <= 1e-5
    assert max_err(conf, block.confidence_logits[:64]) <= 1e-5

    # Slot 0's q does not depend on any sampled token: the empirical law of x_1 matches it.
    q0 = block.probs[0, 0]
    empirical = torch.bincount(block.tokens[:, 0], minlength=vocab).float() / num
    assert 0.5 * (empirical - q0).abs().sum() < 0.05

    # Same seed, same draws.
    again = drafter.propose([0] * 8, tok.expand(8), position.expand(8), sampling([1.0] * 8, top_k=6),
                            generator=torch.Generator().manual_seed(1))
    again2 = drafter.propose([0] * 8, tok.expand(8), position.expand(8), sampling([1.0] * 8, top_k=6),
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.tokens, again2.tokens)


def test_greedy_rows_unaffected_by_sampled_neighbours(fixture):
    drafter, ref = fixture
    drafter.release(0)
    feed_context(drafter, 0, ref, 0, 16)
    tok, position = anchor(ref, 16)
    alone = drafter.propose([0], tok, position, SamplingBatch.greedy(1))
    mixed = drafter.propose([0, 0, 0], tok.expand(3), position.expand(3), sampling([0.8, 0.0, 1.3]),
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(mixed.tokens[1], alone.tokens[0])
    assert torch.equal(mixed.tokens[1], ref["round2.greedy_draft_tokens"])
    assert max_err(mixed.confidence_logits[1], alone.confidence_logits[0]) <= 1e-5
    assert torch.equal(mixed.probs[1], alone.probs[0])


def test_empty_batch_and_position_checks(fixture):
    drafter, ref = fixture
    empty = drafter.propose([], torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                            SamplingBatch.greedy(0))
    assert empty.tokens.shape == (0, 7) and empty.confidence_logits.shape == (0, 7)
    drafter.release(9)
    feed_context(drafter, 9, ref, 0, 4)
    with pytest.raises(ValueError, match="contiguously"):
        feed_context(drafter, 9, ref, 5, 8)  # skips position 4
    with pytest.raises(ValueError, match="features must be"):
        drafter.append_context([9], [ref["context_features"][4:6, :64]], [torch.arange(4, 6)], [torch.zeros(2)])


def test_constructible_without_checkpoint():
    cfg = parse_block_config(read_config(FIXTURES / "deepspec_dspark_rnn"), "deepspec_dspark", "tiny")
    torch.manual_seed(0)
    drafter = DSparkDrafter(cfg)  # random init, for unit tests and training from scratch
    features = torch.randn(5, cfg.context_width)
    drafter.append_context([0], [features], [torch.arange(5)], [torch.zeros(5, dtype=torch.int64)])
    block = drafter.propose([0], torch.tensor([3]), torch.tensor([5]), SamplingBatch.greedy(1))
    assert block.tokens.shape == (1, 7) and block.confidence_logits.shape == (1, 7)
    assert set(drafter.state_dict()) >= {"backbone.fc.weight", "markov_head.joint_proj.bias"}
