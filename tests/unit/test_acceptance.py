"""Chain acceptance: golden cases derived by hand, invariants, exactness against a loop reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_sglang.acceptance import AcceptanceResult, chain_accept, chain_accept_from_logits
from dspark_sglang.sampling import SamplingBatch, process_logits, sample_from_probs

NAN = float("nan")


def one_hot(ids, vocab):  # nested list of ids -> [..., vocab] float
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()


def greedy_case(drafts, target_argmax, verify_lens, vocab=8):
    """Greedy batch: target rows one-hot at `target_argmax` [R][gamma+1], drafts [R][gamma]."""
    num_reqs, gamma = len(drafts), len(drafts[0])
    return chain_accept(
        target_probs=one_hot(target_argmax, vocab),
        draft_tokens=torch.tensor(drafts),
        draft_probs=one_hot(drafts, vocab),
        verify_lens=torch.tensor(verify_lens),
        greedy=torch.ones(num_reqs, dtype=torch.bool),
        accept_uniforms=torch.rand(num_reqs, gamma),
        sample_uniforms=torch.rand(num_reqs),
    )


def assert_result(result: AcceptanceResult, num_accepted, next_tokens, output_tokens):
    assert result.num_accepted.tolist() == num_accepted
    assert result.next_tokens.tolist() == next_tokens
    assert result.output_tokens.tolist() == output_tokens
    assert result.num_accepted.dtype == result.next_tokens.dtype == result.output_tokens.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# Golden greedy cases


def test_greedy_perfect_match_gets_the_bonus():
    # target argmax per row: 1 | 2 | 3 | 4; drafts 1, 2, 3 all match -> 3 accepted, bonus = row 3's 4.
    assert_result(greedy_case([[1, 2, 3]], [[1, 2, 3, 4]], [3]), [3], [4], [[1, 2, 3, 4]])


def test_greedy_early_mismatch_emits_the_correction():
    # row 1 wants 5, draft x2 = 2 -> x1 accepted, correction 5, rest padding.
    assert_result(greedy_case([[1, 2, 3]], [[1, 5, 3, 4]], [3]), [1], [5], [[1, 5, -1, -1]])
    # row 0 wants 7 -> nothing accepted; x2, x3 matching later is irrelevant.
    assert_result(greedy_case([[1, 2, 3]], [[7, 2, 3, 4]], [3]), [0], [7], [[7, -1, -1, -1]])


def test_greedy_verify_len_zero_and_shortened():
    # len 0: no draft verified; the next token is row 0's argmax (1), as plain decoding would give.
    assert_result(greedy_case([[1, 2, 3]], [[1, 2, 3, 4]], [0]), [0], [1], [[1, -1, -1, -1]])
    # len 2: x1, x2 match; the bonus comes from row 2 (argmax 3), x3 is never looked at.
    assert_result(greedy_case([[1, 2, 6]], [[1, 2, 3, 4]], [2]), [2], [3], [[1, 2, 3, -1]])


def test_greedy_multiple_requests():
    result = greedy_case(
        drafts=[[1, 2, 3], [4, 5, 6], [7, 7, 7], [0, 0, 0]],
        target_argmax=[[1, 2, 3, 4], [4, 0, 6, 1], [7, 7, 7, 2], [3, 3, 3, 3]],
        verify_lens=[3, 3, 1, 2],
    )
    # r0: all match -> 3 + bonus 4.  r1: row 1 wants 0 -> 1 accepted, correction 0.
    # r2: len 1, x1=7 matches -> bonus from row 1 = 7.  r3: row 0 wants 3 -> correction 3.
    assert_result(result, [3, 1, 1, 0], [4, 0, 7, 3],
                  [[1, 2, 3, 4], [4, 0, -1, -1], [7, 7, -1, -1], [3, -1, -1, -1]])


def test_greedy_ties_use_the_first_index_and_q_is_ignored():
    # Target rows not one-hot: row 0 = (.4, .4, .2) ties ids 0 and 1 -> argmax 0.
    target = torch.tensor([[[0.4, 0.4, 0.2], [0.1, 0.2, 0.7]]])
    # Draft x1 = 1 with a q that would pass a ratio test (q(1) = .4 = p(1)) -> greedy still rejects.
    result = chain_accept(target, torch.tensor([[1]]), torch.tensor([[[0.3, 0.4, 0.3]]]),
                          torch.tensor([1]), torch.tensor([True]), torch.zeros(1, 1), torch.zeros(1))
    assert_result(result, [0], [0], [[0, -1]])


def test_mixed_greedy_and_sampled_in_one_batch():
    vocab = 4
    p_sampled = [[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.5, 0.0], [0.1, 0.1, 0.1, 0.7]]
    q_sampled = [[0.2, 0.6, 0.2, 0.0], [0.25, 0.25, 0.5, 0.0]]
    target = torch.stack([
        one_hot([2, 3, 1], vocab),  # r0 greedy, argmax 2 | 3 | 1
        torch.tensor(p_sampled),  # r1 sampled
        torch.tensor(p_sampled),  # r2 sampled
        torch.tensor(p_sampled),  # r3 sampled
    ])
    drafts = torch.tensor([[2, 0], [1, 2], [1, 2], [1, 2]])
    draft_probs = torch.stack([one_hot([2, 0], vocab)] + [torch.tensor(q_sampled)] * 3)
    result = chain_accept(
        target, drafts, draft_probs,
        verify_lens=torch.tensor([2, 2, 2, 1]),
        greedy=torch.tensor([True, False, False, False]),
        accept_uniforms=torch.tensor([[0.9, 0.9], [0.4, 0.99], [0.6, 0.0], [0.4, 0.0]]),
        sample_uniforms=torch.tensor([0.3, 0.6, 0.99, 0.95]),
    )
    # r0 greedy: x1=2 matches, x2=0 vs argmax 3 -> 1 accepted, correction 3 (uniforms unused).
    # r1: x1=1, ratio p/q = .3/.6 = .5, u=.4 accepts; x2=2, ratio .5/.5 = 1 accepts any u<1;
    #     bonus from row 2 = (.1,.1,.1,.7), cdf .1,.2,.3,1; u=.6 -> id 3.
    # r2: u=.6 >= .5 rejects x1; residual max(p-q,0) = (.3,0,0,0) -> id 0 for any u.
    # r3: len 1, x1 accepted (u=.4); bonus from row 1 = (.25,.25,.5,0), cdf .25,.5,1,1; u=.95 -> 2.
    assert_result(result, [1, 2, 0, 1], [3, 3, 0, 2],
                  [[2, 3, -1], [1, 2, 3], [0, -1, -1], [1, 2, -1]])


def test_sampled_rejects_when_the_draft_probability_is_zero():
    # q(x1) = 0 (x1 outside the draft's top-k, say): reject, never 0/0. Residual = p - 0 = p.
    target = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    result = chain_accept(target, torch.tensor([[1]]), torch.tensor([[[0.5, 0.0, 0.5]]]),
                          torch.tensor([1]), torch.tensor([False]), torch.zeros(1, 1), torch.tensor([0.5]))
    assert_result(result, [0], [1], [[1, -1]])


def test_sampled_residual_falls_back_to_p_when_p_equals_q():
    # p == q: the ratio is 1, so only u >= 1 (out of range, rounding) can reject; then the residual
    # is all zero and the correction falls back to p: cdf .5, 1 with u=.7 -> id 1.
    dist = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    result = chain_accept(dist, torch.tensor([[0]]), dist[:, :1], torch.tensor([1]),
                          torch.tensor([False]), torch.tensor([[1.0]]), torch.tensor([0.7]))
    assert_result(result, [0], [1], [[1, -1]])


def test_empty_batch_and_gamma_zero():
    empty = chain_accept(torch.zeros(0, 4, 5), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, 5),
                         torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                         torch.zeros(0, 3), torch.zeros(0))
    assert empty.num_accepted.shape == (0,) and empty.output_tokens.shape == (0, 4)
    # gamma = 0: plain decoding, one token from row 0 (greedy argmax 2; sampled cdf .5,.5,1 u=.75 -> 2).
    target = torch.tensor([[[0.5, 0.0, 0.5]], [[0.2, 0.0, 0.8]]])
    result = chain_accept(target, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 3),
                          torch.zeros(2, dtype=torch.long), torch.tensor([False, True]),
                          torch.zeros(2, 0), torch.tensor([0.75, 0.0]))
    assert_result(result, [0, 0], [2, 2], [[2], [2]])


def test_bad_inputs_raise_value_errors_naming_the_field():
    args = dict(target_probs=torch.rand(2, 3, 4), draft_tokens=torch.zeros(2, 2, dtype=torch.long),
                draft_probs=torch.rand(2, 2, 4), verify_lens=torch.tensor([1, 2]),
                greedy=torch.tensor([True, False]), accept_uniforms=torch.rand(2, 2),
                sample_uniforms=torch.rand(2))
    chain_accept(**args)
    for name, bad, match in [
        ("draft_probs", torch.rand(2, 2, 5), "draft_probs"),
        ("verify_lens", torch.tensor([1, 3]), "verify_lens"),
        ("verify_lens", torch.tensor([-1, 0]), "verify_lens"),
        ("greedy", torch.tensor([1, 0]), "greedy"),
        ("accept_uniforms", torch.rand(2, 3), "accept_uniforms"),
        ("target_probs", torch.rand(2, 3), "target_probs"),
    ]:
        with pytest.raises(ValueError, match=match):
            chain_accept(**{**args, name: bad})


# ---------------------------------------------------------------------------------------------
# Random inputs: invariants, garbage rows, exactness against a per-token loop


def random_case(seed, num_reqs, gamma, vocab, greedy_frac=0.5):
    gen = torch.Generator().manual_seed(seed)

    def dists(*shape):  # random distributions with some exact zeros
        weights = torch.rand(*shape, vocab, generator=gen) ** 3
        weights[torch.rand(*shape, vocab, generator=gen) < 0.3] = 0.0
        weights[..., 0] += (weights.sum(-1) == 0).float()
        return weights / weights.sum(-1, keepdim=True)

    target = dists(num_reqs, gamma + 1)
    draft_probs = dists(num_reqs, gamma)
    # Mostly draws from q; sometimes p's argmax (so greedy rows accept); sometimes anything.
    from_q = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=gen).reshape(num_reqs, gamma)
    from_p = target[:, :gamma].argmax(-1)
    choice = torch.randint(0, 5, (num_reqs, gamma), generator=gen)
    anything = torch.randint(0, vocab, (num_reqs, gamma), generator=gen)
    drafts = torch.where(choice < 2, from_q, torch.where(choice < 4, from_p, anything))
    return dict(
        target_probs=target,
        draft_tokens=drafts,
        draft_probs=draft_probs,
        verify_lens=torch.randint(0, gamma + 1, (num_reqs,), generator=gen),
        greedy=torch.rand(num_reqs, generator=gen) < greedy_frac,
        accept_uniforms=torch.rand(num_reqs, gamma, generator=gen),
        sample_uniforms=torch.rand(num_reqs, generator=gen),
    )


def loop_reference(target_probs, draft_tokens, draft_probs, verify_lens, greedy,
                   accept_uniforms, sample_uniforms):
    """The rule written one token at a time, straight from the paper."""
    num_reqs, rows, vocab = target_probs.shape
    out = torch.full((num_reqs, rows), -1, dtype=torch.long)
    for r in range(num_reqs):
        n = 0
        while n < int(verify_lens[r]):
            x = int(draft_tokens[r, n])
            p, q = target_probs[r, n], draft_probs[r, n]
            if bool(greedy[r]):
                ok = x == int(p.argmax())
            else:
                ok = float(q[x]) > 0 and float(accept_uniforms[r, n]) < min(1.0, float(p[x]) / float(q[x]))
            if not ok:
                break
            out[r, n] = x
            n += 1
        p = target_probs[r, n]
        if bool(greedy[r]):
            y = int(p.argmax())
        else:
            dist = p
            if n < int(verify_lens[r]):
                residual = (p - draft_probs[r, n]).clamp_min(0)
                dist = residual if residual.sum() > 0 else p
            y = int(sample_from_probs(dist[None], sample_uniforms[r:r + 1])[0])
        out[r, n] = y
    return out


case_params = dict(
    seed=st.integers(0, 2**31 - 1),
    num_reqs=st.integers(0, 7),
    gamma=st.integers(0, 5),
    vocab=st.integers(1, 13),
)


@settings(max_examples=150, deadline=None)
@given(**case_params)
def test_invariants(seed, num_reqs, gamma, vocab):
    case = random_case(seed, num_reqs, gamma, vocab)
    result = chain_accept(**case)
    n, nxt, out = result.num_accepted, result.next_tokens, result.output_tokens
    assert n.shape == nxt.shape == (num_reqs,) and out.shape == (num_reqs, gamma + 1)
    assert ((n >= 0) & (n <= case["verify_lens"])).all()
    assert ((out != -1).sum(1) == n + 1).all()
    slots = torch.arange(gamma + 1)[None, :]
    assert (out[slots > n[:, None]] == -1).all()  # -1 only after the emitted tokens
    assert torch.equal(out.gather(1, n[:, None]).squeeze(1), nxt)
    assert torch.equal(torch.where(slots[:, :gamma] < n[:, None], case["draft_tokens"], -1),
                       torch.where(slots[:, :gamma] < n[:, None], out[:, :gamma], -1))
    assert ((nxt >= 0) & (nxt < vocab)).all()
    # The next token always has target mass at its row (a residual > 0 implies p > 0).
    p_next = case["target_probs"][torch.arange(num_reqs), n]
    assert (p_next.gather(1, nxt[:, None]) > 0).all()


@settings(max_examples=150, deadline=None)
@given(**case_params)
def test_equals_the_per_token_loop(seed, num_reqs, gamma, vocab):
    case = random_case(seed, num_reqs, gamma, vocab)
    assert torch.equal(chain_accept(**case).output_tokens, loop_reference(**case))


@settings(max_examples=60, deadline=None)
@given(**case_params)
def test_rows_past_verify_len_are_ignored(seed, num_reqs, gamma, vocab):
    case = random_case(seed, num_reqs, gamma, vocab)
    expected = chain_accept(**case).output_tokens
    rows = torch.arange(gamma + 1)[None, :]
    garbage = dict(case)
    unused_rows = rows > case["verify_lens"][:, None]  # [R, gamma+1]
    garbage["target_probs"] = case["target_probs"].masked_fill(unused_rows[..., None], NAN)
    unverified = rows[:, :gamma] >= case["verify_lens"][:, None]
    garbage["draft_probs"] = case["draft_probs"].masked_fill(unverified[..., None], NAN)
    garbage["draft_tokens"] = case["draft_tokens"].masked_fill(unverified, -1)
    garbage["accept_uniforms"] = case["accept_uniforms"].masked_fill(unverified, NAN)
    assert torch.equal(chain_accept(**garbage).output_tokens, expected)


def test_non_finite_entries_in_used_rows_count_as_zero():
    # Row 0: p = (NaN, .5, inf, .5) -> treated as (0, .5, 0, .5). x1 = 1, q(1) = .5: ratio 1, accept.
    # Row 1 (bonus) = (NaN, NaN, 1, -1) -> (0, 0, 1, 0): every u gives 2; greedy argmax 2 too.
    target = torch.tensor([[[NAN, 0.5, float("inf"), 0.5], [NAN, NAN, 1.0, -1.0]]] * 2)
    q = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]] * 2)
    result = chain_accept(target, torch.tensor([[1], [1]]), q, torch.tensor([1, 1]),
                          torch.tensor([False, True]), torch.tensor([[0.99], [0.0]]), torch.tensor([0.3, 0.3]))
    # Greedy r1: row 0's cleaned argmax is 1 (first of the .5 tie), x1 = 1 matches -> bonus 2.
    assert_result(result, [1, 1], [2, 2], [[1, 2], [1, 2]])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_reqs=st.integers(0, 5), gamma=st.integers(0, 4),
       vocab=st.integers(2, 11))
def test_from_logits_equals_process_then_accept(seed, num_reqs, gamma, vocab):
    gen = torch.Generator().manual_seed(seed)
    sampling = SamplingBatch(
        temperatures=torch.tensor([0.0, 0.7, 1.0, 1.3])[torch.randint(0, 4, (num_reqs,), generator=gen)],
        top_ks=torch.randint(-1, vocab + 1, (num_reqs,), generator=gen),
        top_ps=torch.rand(num_reqs, generator=gen).clamp_min(0.05),
        min_ps=torch.rand(num_reqs, generator=gen) * 0.3,
    )
    logits = torch.randn(num_reqs, gamma + 1, vocab, generator=gen) * 2
    draft_logits = logits[:, :gamma] + torch.randn(num_reqs, gamma, vocab, generator=gen)

    def proc(x):  # [R, k, V] with per-request params broadcast over k
        k = x.shape[1]
        rep = lambda t: t.repeat_interleave(k)  # noqa: E731
        return process_logits(x.reshape(-1, vocab), rep(sampling.temperatures), rep(sampling.top_ks),
                              rep(sampling.top_ps), rep(sampling.min_ps)).reshape(num_reqs, k, vocab)

    draft_probs = proc(draft_logits)
    drafts = sample_from_probs(draft_probs.reshape(-1, vocab), torch.rand(num_reqs * gamma, generator=gen))
    drafts = drafts.reshape(num_reqs, gamma)
    common = dict(draft_tokens=drafts, draft_probs=draft_probs,
                  verify_lens=torch.randint(0, gamma + 1, (num_reqs,), generator=gen),
                  accept_uniforms=torch.rand(num_reqs, gamma, generator=gen),
                  sample_uniforms=torch.rand(num_reqs, generator=gen))
    from_logits = chain_accept_from_logits(logits, sampling=sampling, **common)
    expected = chain_accept(proc(logits), greedy=sampling.is_greedy(), **common)
    assert torch.equal(from_logits.output_tokens, expected.output_tokens)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_reqs=st.integers(0, 6), gamma=st.integers(0, 5),
       vocab=st.integers(1, 6))
def test_greedy_fast_path_equals_chain_accept_on_one_hot_rows(seed, num_reqs, gamma, vocab):
    """The worker's all-greedy path (argmax tokens only) against chain_accept on process_logits'
    one-hot rows of the same logits: NaN and inf logits, ties (small vocabularies) and every verify
    length. A small vocabulary makes drafts match often, so long accepted prefixes are covered."""
    from dspark_sglang.acceptance import greedy_chain_accept
    from dspark_sglang.sampling import sanitize_logits

    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (num_reqs * (gamma + 1), vocab), generator=g).float()  # ties
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")])
    poke = torch.rand(logits.shape, generator=g) < 0.1
    logits[poke] = specials[torch.randint(0, 3, (int(poke.sum()),), generator=g)]
    drafts = torch.randint(0, vocab, (num_reqs, gamma), generator=g)
    verify_lens = torch.randint(0, gamma + 1, (num_reqs,), generator=g)
    sampling = SamplingBatch.greedy(num_reqs * (gamma + 1))
    probs = process_logits(logits, sampling.temperatures, sampling.top_ks, sampling.top_ps, sampling.min_ps)
    ref = chain_accept(probs.view(num_reqs, gamma + 1, vocab), drafts, torch.full((num_reqs, gamma, vocab), 1.0 / vocab),
                       verify_lens, torch.ones(num_reqs, dtype=torch.bool), torch.rand(num_reqs, gamma, generator=g),
                       torch.rand(num_reqs, generator=g))
    tokens = sanitize_logits(logits).argmax(dim=-1).view(num_reqs, gamma + 1)
    got = greedy_chain_accept(tokens, drafts, verify_lens)
    assert torch.equal(got.num_accepted, ref.num_accepted)
    assert torch.equal(got.next_tokens, ref.next_tokens)
    assert torch.equal(got.output_tokens, ref.output_tokens)


def test_greedy_fast_path_rejects_mismatched_shapes():
    from dspark_sglang.acceptance import greedy_chain_accept

    with pytest.raises(ValueError, match="draft_tokens must be"):
        greedy_chain_accept(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                            torch.zeros(2, dtype=torch.long))
