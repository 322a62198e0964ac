"""kernels/sequential_head.py against heads.sample_sequential_with_uniforms (TRITON_INTERPRET=1).

Logits, q and confidences agree to float32 rounding (different summation order and exp); tokens
agree exactly (a flip needs a uniform within ~1e-7 of a CDF step, or a greedy near-tie, and the
seeded inputs here have neither). See the kernel docstring.
"""

import pytest
import torch

from dspark_sglang.drafters.heads import (
    ConfidenceHead,
    MarkovHead,
    sample_sequential,
    sample_sequential_with_uniforms,
)
from dspark_sglang.kernels import sequential_head as seq
from dspark_sglang.kernels._common import KernelInputError
from dspark_sglang.sampling import SamplingBatch

pytestmark = pytest.mark.interp
HIDDEN, RANK = 40, 12  # neither a power of two: masked tails in every matvec


def heads(kind: str | None, vocab: int, seed: int, conf_markov: bool = True):
    torch.manual_seed(seed)
    markov = MarkovHead(kind, vocab, HIDDEN, RANK) if kind else None
    confidence = ConfidenceHead(HIDDEN, RANK if (kind and conf_markov) else 0)
    for p in list(confidence.parameters()) + (list(markov.parameters()) if markov else []):
        torch.nn.init.normal_(p, std=0.4)
    return markov, confidence


def inputs(seed: int, num_reqs: int, gamma: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_reqs, gamma, vocab, generator=g) * 2,  # U
            torch.randn(num_reqs, gamma, HIDDEN, generator=g),  # h
            torch.randint(0, vocab, (num_reqs,), generator=g),  # anchors
            torch.rand(num_reqs, gamma, generator=g))  # uniforms


def plain(temps) -> SamplingBatch:
    n = len(temps)
    return SamplingBatch(torch.tensor(temps, dtype=torch.float32), torch.full((n,), -1, dtype=torch.int64),
                         torch.ones(n), torch.zeros(n))


@pytest.fixture
def poison_outputs(monkeypatch):
    """Outputs the kernel allocates start as NaN (floats) / -7 (ints): every element must be written."""
    real_empty = torch.empty

    def empty(*shape, dtype=None, device=None, **kw):
        t = real_empty(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(seq.torch, "empty", empty)


def assert_close(got, ref):
    (block, logits), (ref_block, ref_logits) = got, ref
    assert torch.equal(block.tokens, ref_block.tokens)
    for name, a, b, tol in (("probs", block.probs, ref_block.probs, 2e-6),
                            ("token_probs", block.token_probs, ref_block.token_probs, 2e-6),
                            ("logits", logits, ref_logits, 2e-5),
                            ("confidence", block.confidence_logits, ref_block.confidence_logits, 2e-5)):
        if b is None:
            assert a is None
            continue
        assert not bool(torch.isnan(a).any()), f"{name}: NaN (unwritten or computed)"
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=tol, rtol=1e-5, msg=name)
    assert int((block.tokens == -7).sum()) == 0


@pytest.mark.parametrize(
    "kind, num_reqs, gamma, vocab, block_v, temps",
    [
        ("vanilla", 1, 4, 1000, None, [0.8]),  # batch 1
        ("vanilla", 4, 3, 257, 256, [0.0, 1.0, 0.6, 2.0]),  # vocab = BLOCK + 1; greedy + sampled
        ("gated", 3, 4, 1023, None, [1.0, 0.0, 0.7]),
        ("rnn", 3, 5, 300, 64, [1.3, 0.9, 0.0]),  # several tiles; state across 5 steps
        (None, 2, 3, 500, None, [1.0, 0.0]),  # no Markov head: confidence from h only
    ],
)
def test_equals_reference(poison_outputs, kind, num_reqs, gamma, vocab, block_v, temps):
    markov, confidence = heads(kind, vocab, seed=vocab)
    args = (*inputs(vocab + gamma, num_reqs, gamma, vocab)[:3], markov, confidence, plain(temps),
            inputs(vocab + gamma, num_reqs, gamma, vocab)[3])
    ref = sample_sequential_with_uniforms(*args)
    got = seq.sample_sequential(*args, block_v=block_v)
    assert_close(got, ref)


@pytest.mark.parametrize(
    "kind, num_reqs, vocab, block_v",
    [
        ("vanilla", 16, 300, 64),  # one program of 16 requests: tl.dot products
        ("gated", 17, 257, None),  # two programs, the second with 1 live request and 15 masked rows
        ("rnn", 40, 200, 64),  # three programs; the rnn state of every request across 3 steps
        (None, 20, 100, None),
        ("vanilla", 5, 300, 64),  # one program of 8 rows (5 live): broadcast products
    ],
)
def test_request_blocks_equal_the_reference(poison_outputs, kind, num_reqs, vocab, block_v):
    """Requests share a program (and each W2 tile it loads); masked rows past the batch stay unwritten."""
    gamma = 3
    markov, confidence = heads(kind, vocab, seed=num_reqs)
    temps = [(0.0, 1.0, 0.6, 1.7)[i % 4] for i in range(num_reqs)]  # greedy and sampled rows mixed
    u, h, anchors, uniforms = inputs(num_reqs + vocab, num_reqs, gamma, vocab)
    args = (u, h, anchors, markov, confidence, plain(temps), uniforms)
    assert_close(seq.sample_sequential(*args, block_v=block_v), sample_sequential_with_uniforms(*args))


def test_tile_sizes_read_the_markov_weight_once_per_block_of_16():
    """Programs per launch = reads of W2 per step: ceil(R / 16), not R; one request keeps the
    per-request tiles (W2 [256, 32], mix [256, 16] at rank 256)."""
    one = seq.tile_sizes(1, 151936, 4096, 256, interp=False)
    assert one == dict(BLOCK_R=1, USE_DOT=False, BLOCK_V=2048, BLOCK_VW=32, BLOCK_H=16, BLOCK_RANK=256)
    four = seq.tile_sizes(4, 151936, 4096, 256, interp=False)
    assert (four["BLOCK_R"], four["USE_DOT"], four["BLOCK_R"] * four["BLOCK_VW"]) == (4, False, 32)
    for num_reqs, programs in ((16, 1), (17, 2), (128, 8)):
        tiles = seq.tile_sizes(num_reqs, 151936, 4096, 256, interp=False)
        assert tiles["USE_DOT"] and -(-num_reqs // tiles["BLOCK_R"]) == programs
        assert min(tiles["BLOCK_VW"], tiles["BLOCK_H"], tiles["BLOCK_RANK"]) >= 16  # tl.dot's minimum


def test_large_vocab_tiny_case(poison_outputs):
    vocab = 49152
    markov, confidence = heads("gated", vocab, seed=1)
    u, h, anchors, uniforms = inputs(3, 1, 2, vocab)
    args = (u, h, anchors, markov, confidence, plain([0.9]), uniforms)
    assert_close(seq.sample_sequential(*args), sample_sequential_with_uniforms(*args))


def test_filtered_rows_fall_back_to_the_reference():
    """Rows with top-k / top-p / min-p are recomputed by the reference; the rest stay fused."""
    vocab = 200
    markov, confidence = heads("vanilla", vocab, seed=2, conf_markov=False)
    u, h, anchors, uniforms = inputs(4, 4, 3, vocab)
    sampling = SamplingBatch(torch.tensor([0.8, 0.8, 1.0, 0.0]), torch.tensor([5, -1, -1, 3]),
                             torch.tensor([1.0, 0.9, 1.0, 0.5]), torch.tensor([0.0, 0.0, 0.1, 0.0]))
    assert seq.filtered_rows(sampling, vocab).tolist() == [True, True, True, False]  # greedy ignores filters
    args = (u, h, anchors, markov, confidence, sampling, uniforms)
    assert_close(seq.sample_sequential(*args), sample_sequential_with_uniforms(*args))


def test_nan_temperature_row_is_one_hot_like_the_reference():
    vocab = 64
    markov, confidence = heads("vanilla", vocab, seed=3)
    u, h, anchors, uniforms = inputs(5, 2, 2, vocab)
    args = (u, h, anchors, markov, confidence, plain([float("nan"), 1.0]), uniforms)
    got = seq.sample_sequential(*args)
    assert_close(got, sample_sequential_with_uniforms(*args))
    assert torch.equal(got[0].probs[0].amax(-1), torch.ones(2))


def test_generator_api_unchanged():
    """sample_sequential(generator) == sample_sequential_with_uniforms(uniforms drawn the same way)."""
    vocab = 50
    markov, confidence = heads("rnn", vocab, seed=4)
    u, h, anchors, _ = inputs(6, 2, 3, vocab)
    a, la = sample_sequential(u, h, anchors, markov, confidence, plain([1.0, 0.5]), torch.Generator().manual_seed(9))
    uniforms = torch.rand(2, 3, generator=torch.Generator().manual_seed(9))
    b, lb = sample_sequential_with_uniforms(u, h, anchors, markov, confidence, plain([1.0, 0.5]), uniforms)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs) and torch.equal(la, lb)


def test_bad_inputs_raise():
    vocab = 30
    markov, confidence = heads("gated", vocab, seed=5)
    u, h, anchors, uniforms = inputs(7, 2, 2, vocab)
    with pytest.raises(KernelInputError, match="kernels/sequential_head.py: uniforms"):
        seq.sample_sequential(u, h, anchors, markov, confidence, plain([1.0, 1.0]), uniforms[:, :1])
    with pytest.raises(ValueError, match="w2"):
        seq.sequential_head(u, h, anchors, uniforms, torch.ones(2), torch.zeros(2, dtype=torch.bool),
                            kind="vanilla", w1=markov.markov_w1.weight, w2=markov.markov_w2.weight[:5])
    with pytest.raises(ValueError, match="kind"):
        seq.sequential_head(u, h, anchors, uniforms, torch.ones(2), torch.zeros(2, dtype=torch.bool),
                            kind="lstm", w1=None, w2=None)
