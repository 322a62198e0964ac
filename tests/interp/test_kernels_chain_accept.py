"""kernels/chain_accept.py against dspark_sglang.acceptance.chain_accept (TRITON_INTERPRET=1).

Exact equality on fresh random inputs. The one float-order difference (the inverse-CDF draw's
float64 running sum, see the kernel docstring) can only matter when ``u * total`` sits within
rounding of a CDF step: rows that close are excluded from the exact comparison and counted, and
dyadic inputs, whose sums are exact in any order, are compared exactly at the steps themselves.
"""

import pytest
import torch

from dspark_sglang.acceptance import AcceptanceResult
from dspark_sglang.kernels._common import KernelInputError
from dspark_sglang.kernels.chain_accept import chain_accept, chain_accept_ref

pytestmark = pytest.mark.interp
POISON = -7


def poisoned(num_reqs: int, gamma: int) -> AcceptanceResult:
    return AcceptanceResult(
        num_accepted=torch.full((num_reqs,), POISON, dtype=torch.int64),
        next_tokens=torch.full((num_reqs,), POISON, dtype=torch.int64),
        output_tokens=torch.full((num_reqs, gamma + 1), POISON, dtype=torch.int64),
    )


def random_batch(seed: int, num_reqs: int, gamma: int, vocab: int):
    """Realistic mixed batch: drafts sampled from q (so acceptances happen), some q == p rows
    (all-zero residual), a zero-q draft, NaN past verify_len, greedy and sampled requests."""
    g = torch.Generator().manual_seed(seed)
    temps = 0.5 + 2 * torch.rand(num_reqs, 1, 1, generator=g)
    target_logits = torch.randn(num_reqs, gamma + 1, vocab, generator=g) * 3
    target = torch.softmax(target_logits / temps, dim=-1)
    # Drafts close to the target (perturbed logits), sometimes sharper.
    draft = torch.softmax((target_logits[:, :gamma] + torch.randn(num_reqs, gamma, vocab, generator=g)) / temps, -1)
    if num_reqs > 1 and gamma > 0:
        draft[1] = target[1, :gamma]  # q == p: residual all zero at a rejection
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).view(num_reqs, gamma)
    if num_reqs > 2 and gamma > 0:
        draft[2, 0, tokens[2, 0]] = 0.0  # q(x) == 0 rejects
    verify_lens = torch.randint(0, gamma + 1, (num_reqs,), generator=g)
    verify_lens[0] = gamma
    for r in range(num_reqs):  # rows past verify_len may hold anything
        target[r, verify_lens[r] + 1:] = float("nan")
    greedy = torch.rand(num_reqs, generator=g) < 0.3
    if greedy.any():  # greedy drafts: usually the target argmax, so chains get accepted
        argmax_drafts = target[:, :gamma].nan_to_num(0).argmax(-1)
        keep = torch.rand(num_reqs, gamma, generator=g) < 0.8
        tokens = torch.where(greedy[:, None] & keep, argmax_drafts, tokens)
    return (target, tokens, draft, verify_lens, greedy,
            torch.rand(num_reqs, gamma, generator=g), torch.rand(num_reqs, generator=g))


def near_cdf_step(args, ref: AcceptanceResult, tol: float = 1e-9) -> torch.Tensor:
    """[R] bool: sampled rows whose draw target lies within ``tol`` (relative) of a CDF step."""
    target, tokens, draft, verify_lens, greedy, _, u = args
    n = ref.num_accepted
    rows = torch.arange(target.shape[0])
    p = target[rows, n].double().nan_to_num(0).clamp_min(0)
    rejected = n < verify_lens
    if draft.shape[1]:
        q = draft[rows, n.clamp(max=draft.shape[1] - 1)].double().nan_to_num(0).clamp_min(0)
        res = (p.float() - q.float()).clamp_min(0).double()
        res = torch.where(res.sum(-1, keepdim=True) > 0, res, p)
        p = torch.where(rejected[:, None], res, p)
    cdf = p.cumsum(-1)
    goal = u.double().clamp(0, 1)[:, None] * cdf[:, -1:]
    gap = (cdf - goal).abs().min(-1).values / cdf[:, -1].clamp_min(1e-300)
    return (gap < tol) & ~greedy


def assert_same(got: AcceptanceResult, ref: AcceptanceResult, skip: torch.Tensor | None = None):
    keep = torch.ones_like(ref.num_accepted, dtype=torch.bool) if skip is None else ~skip
    assert torch.equal(got.num_accepted[keep], ref.num_accepted[keep])
    assert torch.equal(got.next_tokens[keep], ref.next_tokens[keep])
    assert torch.equal(got.output_tokens[keep], ref.output_tokens[keep])
    for t in (got.num_accepted, got.next_tokens, got.output_tokens):
        assert t.dtype == torch.int64 and not bool((t == POISON).any()), "an output element was not written"


@pytest.mark.parametrize(
    "seed, num_reqs, gamma, vocab, block_v",
    [
        (0, 1, 4, 1000, None),  # batch 1
        (1, 7, 5, 1023, None),  # ragged verify lengths, vocab just under a power of two
        (2, 5, 3, 257, 256),  # vocab = BLOCK + 1: a one-element tail tile
        (3, 4, 2, 256, 256),  # vocab = BLOCK exactly
        (4, 6, 6, 100, 16),  # many tiles
        (5, 3, 1, 17, None),
    ],
)
def test_equals_reference_on_random_inputs(seed, num_reqs, gamma, vocab, block_v):
    args = random_batch(seed, num_reqs, gamma, vocab)
    ref = chain_accept_ref(*args)
    got = chain_accept(*args, out=poisoned(num_reqs, gamma), block_v=block_v)
    skip = near_cdf_step(args, ref)
    assert int(skip.sum()) == 0  # a hit would be a ~1e-9 event: inspect before loosening
    assert_same(got, ref, skip)
    assert int(ref.num_accepted.sum()) > 0  # the batch exercised acceptance, not only rejection


@pytest.mark.parametrize("vocab", [49152, 151936])
def test_large_vocab_tiny_batch(vocab):
    args = random_batch(10, 2, 1, vocab)
    assert_same(chain_accept(*args, out=poisoned(2, 1)), chain_accept_ref(*args))


def test_dyadic_inputs_agree_exactly_at_cdf_steps():
    """Weights that are multiples of 2^-10 sum exactly in any order, so uniforms placed exactly on
    CDF steps (and between) must give the reference's token: first index whose CDF exceeds u*total."""
    g = torch.Generator().manual_seed(7)
    vocab, gamma = 40, 2
    counts_p = torch.randint(0, 6, (gamma + 1, vocab), generator=g).float()
    counts_p[:, ::7] = 0  # zero-weight tokens on steps
    counts_q = torch.randint(0, 6, (gamma, vocab), generator=g).float()
    p = counts_p / 1024  # not normalised: the draw scales u by the total
    q = counts_q / 1024
    cdf_steps = torch.unique(torch.cat([p[0].cumsum(0), p[1].cumsum(0), torch.tensor([0.0])]))
    uniforms = torch.cat([cdf_steps / float(p[0].sum()), torch.tensor([0.0, 1.0, 0.5, 0.999])]).clamp(0, 1)
    num_reqs = uniforms.numel()
    target = p.expand(num_reqs, -1, -1).contiguous()
    draft = q.expand(num_reqs, -1, -1).contiguous()
    tokens = torch.randint(0, vocab, (num_reqs, gamma), generator=g)
    verify_lens = torch.randint(0, gamma + 1, (num_reqs,), generator=g)
    accept_u = torch.where(torch.rand(num_reqs, gamma, generator=g) < 0.5, 0.0, 0.999)  # mix accept/reject
    args = (target, tokens, draft, verify_lens, torch.zeros(num_reqs, dtype=torch.bool), accept_u, uniforms)
    assert_same(chain_accept(*args, out=poisoned(num_reqs, gamma), block_v=16), chain_accept_ref(*args))


def test_output_distribution_is_the_target():
    """Sampled rows, verify_len 1: the first committed token ~ p_0 whatever q is (lossless). The
    kernel's empirical distribution matches p_0 (total variation), and the reference's draws.
    Small n: the interpreter costs ~20 ms per program; tests/unit/test_acceptance_distribution.py
    runs the large-sample version on the reference, which this kernel equals draw for draw."""
    g = torch.Generator().manual_seed(11)
    vocab, num_reqs = 6, 500
    p0 = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
    q0 = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.2, 0.1])
    target = torch.stack([p0, torch.full((vocab,), 1 / vocab)])[None].expand(num_reqs, -1, -1).contiguous()
    draft = q0[None, None].expand(num_reqs, 1, vocab).contiguous()
    tokens = torch.multinomial(q0, num_reqs, replacement=True, generator=g)[:, None]
    args = (target, tokens, draft, torch.ones(num_reqs, dtype=torch.int64), torch.zeros(num_reqs, dtype=torch.bool),
            torch.rand(num_reqs, 1, generator=g), torch.rand(num_reqs, generator=g))
    got = chain_accept(*args)
    assert torch.equal(got.output_tokens, chain_accept_ref(*args).output_tokens)
    freq = torch.bincount(got.output_tokens[:, 0], minlength=vocab).float() / num_reqs
    assert 0.5 * float((freq - p0).abs().sum()) < 0.1  # TV; ~0.036 expected at n = 500
    assert 0.5 * float((freq - q0).abs().sum()) > 0.2  # and it is not the draft's (TV(p, q) = 0.4)


def test_greedy_ties_nan_and_edge_shapes():
    # Greedy: ties go to the first index; NaN/inf count as zero and never win.
    nan, inf = float("nan"), float("inf")
    target = torch.tensor([[[0.2, 0.4, 0.4, nan], [inf, 0.1, 0.5, 0.5]]])
    args = (target, torch.tensor([[1]]), torch.full((1, 1, 4), 0.25), torch.tensor([1]),
            torch.tensor([True]), torch.rand(1, 1), torch.rand(1))
    got = chain_accept(*args, out=poisoned(1, 1))
    assert got.output_tokens.tolist() == [[1, 2]]  # x1 = 1 is row 0's first argmax; bonus row 1 -> 2
    assert_same(got, chain_accept_ref(*args))
    # Empty batch and gamma = 0 (plain decoding: the next token from row 0).
    empty = chain_accept(torch.rand(0, 3, 5), torch.zeros(0, 2, dtype=torch.int64), torch.rand(0, 2, 5),
                         torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool),
                         torch.rand(0, 2), torch.rand(0))
    assert empty.output_tokens.shape == (0, 3)
    args = (torch.softmax(torch.randn(3, 1, 50), -1), torch.zeros(3, 0, dtype=torch.int64), torch.rand(3, 0, 50),
            torch.zeros(3, dtype=torch.int64), torch.tensor([True, False, False]), torch.rand(3, 0), torch.rand(3))
    assert_same(chain_accept(*args, out=poisoned(3, 0)), chain_accept_ref(*args))


def test_bad_inputs_raise_value_errors_naming_the_field():
    args = list(random_batch(0, 2, 3, 20))
    with pytest.raises(ValueError, match="draft_probs"):
        chain_accept(*args[:2], args[2][:, :, :10], *args[3:])
    with pytest.raises(ValueError, match="greedy"):
        chain_accept(*args[:4], args[4].long(), *args[5:])
    with pytest.raises(ValueError, match="target_probs.*unit stride"):
        chain_accept(args[0].transpose(0, 2).contiguous().transpose(0, 2), *args[1:])
    with pytest.raises(KernelInputError, match="kernels/chain_accept.py"):
        chain_accept(args[0][0], *args[1:])
