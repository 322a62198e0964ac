"""Losslessness of chain acceptance, tested statistically on a synthetic chain "model".

The model is a Markov chain over a small vocabulary: the target's next-token distribution is a
table row p = Tp[previous token], the drafter's q = Tq[previous token], both processed by the same
`process_logits` parameters. Drafts are sampled from q one position after another, so row i of the
target input really depends on x_i, as in a real verification.

Each of N requests emits num_accepted + 1 tokens; the test completes every request to gamma + 1
tokens by sampling the rest from the target (what later rounds would do). If acceptance is
lossless, every completed sequence is an exact draw from the target chain, so each position's
marginal and each consecutive pair's joint must match the chain's exact laws. We test them with
Pearson chi-square (cells with expected count < 5 pooled; a token with expected count 0 that
occurs fails outright), Bonferroni-corrected over all statistics of one test at family level
ALPHA = 1e-3, for verify lengths 0..gamma and a random per-request length (independent of the
tokens, as a lossless scheduler's must be).

Negative controls: deliberately wrong samplers (and a verify length that peeks at the target) must
push at least one statistic of the same battery over its threshold.
"""

from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chi2

from dspark_sglang.acceptance import chain_accept
from dspark_sglang.sampling import process_logits, sample_from_probs

ALPHA = 1e-3  # family-wise false-failure rate of one test (fixed seeds make it deterministic)
NUM_REQS = 100_000
GAMMA = 3
ANCHOR = 0
VERIFY_MODES = (0, 1, 2, 3, "random")


@dataclass
class Params:
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0


@dataclass
class ChainModel:
    target: torch.Tensor  # [V, V] row = p(next | previous)
    draft: torch.Tensor  # [V, V] row = q(next | previous)

    @property
    def vocab(self) -> int:
        return self.target.shape[0]


def make_model(vocab: int, params: Params, seed: int, draft_noise: float = 1.0) -> ChainModel:
    gen = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(vocab, vocab, generator=gen)
    draft_logits = target_logits + draft_noise * torch.randn(vocab, vocab, generator=gen)

    def proc(logits):
        return process_logits(
            logits, torch.full((vocab,), params.temperature), torch.full((vocab,), params.top_k),
            torch.full((vocab,), params.top_p), torch.full((vocab,), params.min_p),
        )

    return ChainModel(proc(target_logits), proc(draft_logits))


def draft_and_verify_inputs(model: ChainModel, verify_mode, gen: torch.Generator, num_reqs=NUM_REQS):
    """Sample draft chains from q and build chain_accept's inputs for them (all sampled rows)."""
    prev = torch.full((num_reqs,), ANCHOR)
    drafts, target_rows, draft_rows = [], [model.target[prev]], []
    for _ in range(GAMMA):
        q = model.draft[prev]  # [N, V]
        x = sample_from_probs(q, torch.rand(num_reqs, generator=gen))
        drafts.append(x)
        draft_rows.append(q)
        target_rows.append(model.target[x])  # p after [anchor, x_1..x_i] depends on x_i only
        prev = x
    if verify_mode == "random":
        verify_lens = torch.randint(0, GAMMA + 1, (num_reqs,), generator=gen)
    else:
        verify_lens = torch.full((num_reqs,), verify_mode)
    return dict(
        target_probs=torch.stack(target_rows, 1),  # [N, GAMMA+1, V]
        draft_tokens=torch.stack(drafts, 1),  # [N, GAMMA]
        draft_probs=torch.stack(draft_rows, 1),  # [N, GAMMA, V]
        verify_lens=verify_lens,
        greedy=torch.zeros(num_reqs, dtype=torch.bool),
        accept_uniforms=torch.rand(num_reqs, GAMMA, generator=gen),
        sample_uniforms=torch.rand(num_reqs, generator=gen),
    )


def complete_with_target(model: ChainModel, output_tokens, num_accepted, gen):
    """[N, GAMMA+1] sequences: the emitted tokens, then fresh target samples."""
    num_reqs = output_tokens.shape[0]
    seq = torch.empty_like(output_tokens)
    prev = torch.full((num_reqs,), ANCHOR)
    for j in range(GAMMA + 1):
        fresh = sample_from_probs(model.target[prev], torch.rand(num_reqs, generator=gen))
        seq[:, j] = torch.where(j <= num_accepted, output_tokens[:, j], fresh)
        prev = seq[:, j]
    return seq


def exact_laws(model: ChainModel):
    """Marginal of each position and joint of each consecutive pair under the target chain."""
    marginal = model.target[ANCHOR].double()
    marginals, pairs = [marginal], []
    tp = model.target.double()
    for _ in range(GAMMA):
        pairs.append(marginal[:, None] * tp)
        marginal = marginal @ tp
        marginals.append(marginal)
    return marginals, pairs


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; cells with expected count < 5 are pooled."""
    observed = observed.double().flatten()
    expected = expected_probs.double().flatten() * observed.sum()
    if bool((observed[expected == 0] > 0).any()):  # an impossible token occurred
        return float("inf"), 1
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), max(int(keep.sum()) - 1, 1)


def battery(model: ChainModel, sampler, seed: int, modes=VERIFY_MODES):
    """All statistics for one sampler: list of (name, statistic, dof)."""
    gen = torch.Generator().manual_seed(seed)
    marginals, pairs = exact_laws(model)
    vocab = model.vocab
    stats = []
    for mode in modes:
        inputs = draft_and_verify_inputs(model, mode, gen)
        result = sampler(**inputs)
        seq = complete_with_target(model, result.output_tokens, result.num_accepted, gen)
        for j in range(GAMMA + 1):
            counts = torch.bincount(seq[:, j], minlength=vocab)
            stats.append((f"len={mode} pos={j + 1}", *chi_square(counts, marginals[j])))
        for j in range(GAMMA):
            counts = torch.bincount(seq[:, j] * vocab + seq[:, j + 1], minlength=vocab * vocab)
            stats.append((f"len={mode} pair={j + 1},{j + 2}", *chi_square(counts, pairs[j])))
    return stats


def worst_excess(stats) -> tuple[float, str]:
    """max over statistics of statistic / Bonferroni threshold (> 1 means the battery fails)."""
    level = ALPHA / len(stats)
    ratios = [(stat / chi2.isf(level, dof), f"{name}: chi2={stat:.1f} dof={dof}") for name, stat, dof in stats]
    return max(ratios)


SETTINGS = {
    "T=1 V=7": (7, Params()),
    "T=0.7 top_k=6 top_p=0.9 min_p=0.05 V=10": (10, Params(0.7, top_k=6, top_p=0.9, min_p=0.05)),
    "T=1.3 top_p=0.8 V=6": (6, Params(1.3, top_p=0.8)),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_chain_accept_is_lossless(setting):
    vocab, params = SETTINGS[setting]
    model = make_model(vocab, params, seed=11)
    excess, where = worst_excess(battery(model, chain_accept, seed=12))
    assert excess < 1.0, f"{setting}: {where} exceeds the Bonferroni threshold ({excess:.2f}x)"


def test_acceptance_is_not_trivial():
    # The battery only means something if drafts are both accepted and rejected at every position.
    vocab, params = SETTINGS["T=1 V=7"]
    model = make_model(vocab, params, seed=11)
    inputs = draft_and_verify_inputs(model, GAMMA, torch.Generator().manual_seed(0), num_reqs=20_000)
    counts = torch.bincount(chain_accept(**inputs).num_accepted, minlength=GAMMA + 1)
    assert (counts > 1000).all(), counts.tolist()


# ---------------------------------------------------------------------------------------------
# Greedy, and greedy mixed with sampled requests in one batch


@pytest.mark.parametrize("verify_mode", VERIFY_MODES)
def test_greedy_emits_the_target_argmax_chain(verify_mode):
    model = make_model(9, Params(temperature=0.0), seed=5, draft_noise=0.7)
    chain = [ANCHOR]
    for _ in range(GAMMA + 1):
        chain.append(int(model.target[chain[-1]].argmax()))
    gen = torch.Generator().manual_seed(6)
    inputs = draft_and_verify_inputs(model, verify_mode, gen, num_reqs=2000)
    inputs["greedy"][:] = True
    result = chain_accept(**inputs)
    seq = complete_with_target(model, result.output_tokens, result.num_accepted, gen)
    assert (seq == torch.tensor(chain[1:])).all()


def test_mixed_greedy_and_sampled_batch():
    vocab = 8
    sampled = make_model(vocab, Params(temperature=0.8, top_k=6), seed=21)
    greedy = make_model(vocab, Params(temperature=0.0), seed=21)
    gen = torch.Generator().manual_seed(22)
    half = NUM_REQS
    a = draft_and_verify_inputs(sampled, "random", gen, num_reqs=half)
    b = draft_and_verify_inputs(greedy, "random", gen, num_reqs=half)
    b["greedy"][:] = True
    order = torch.randperm(2 * half, generator=gen)  # interleave the two kinds of request
    inputs = {key: torch.cat([a[key], b[key]])[order] for key in a}
    result = chain_accept(**inputs)
    is_greedy = inputs["greedy"]
    seq_s = complete_with_target(sampled, result.output_tokens[~is_greedy], result.num_accepted[~is_greedy], gen)
    seq_g = complete_with_target(greedy, result.output_tokens[is_greedy], result.num_accepted[is_greedy], gen)

    chain = [ANCHOR]
    for _ in range(GAMMA + 1):
        chain.append(int(greedy.target[chain[-1]].argmax()))
    assert (seq_g == torch.tensor(chain[1:])).all()
    marginals, pairs = exact_laws(sampled)
    stats = [(f"pos={j + 1}", *chi_square(torch.bincount(seq_s[:, j], minlength=vocab), marginals[j]))
             for j in range(GAMMA + 1)]
    stats += [(f"pair={j + 1}", *chi_square(torch.bincount(seq_s[:, j] * vocab + seq_s[:, j + 1],
                                                           minlength=vocab * vocab), pairs[j]))
              for j in range(GAMMA)]
    excess, where = worst_excess(stats)
    assert excess < 1.0, where


# ---------------------------------------------------------------------------------------------
# Negative controls: the same battery must reject these


def variant_accept(target_probs, draft_tokens, draft_probs, verify_lens, greedy, accept_uniforms,
                   sample_uniforms, *, ratio="min(1,p/q)", residual="max(p-q,0)", bonus_row="n"):
    """A test-local sampled-only chain sampler with one line swappable for a known bug."""
    num_reqs, rows, vocab = target_probs.shape
    gamma = rows - 1
    p_x = target_probs[:, :gamma].gather(2, draft_tokens[..., None]).squeeze(-1)  # [R, gamma]
    q_x = draft_probs.gather(2, draft_tokens[..., None]).squeeze(-1)
    accept_prob = {
        "min(1,p/q)": (p_x / q_x).clamp(max=1.0),
        "p/q": p_x / q_x,  # no min: identical for u < 1
        "q/p": (q_x / p_x).clamp(max=1.0),  # p and q swapped (gpt-fast's letters read as ours)
        "p": p_x,  # as if the draft were deterministic (q(x) = 1)
    }[ratio]
    verified = torch.arange(gamma)[None, :] < verify_lens[:, None]
    accept = (accept_uniforms < accept_prob) & verified
    n = accept.long().cumprod(1).sum(1)  # [R]
    take = lambda probs, idx: probs[torch.arange(num_reqs), idx]  # noqa: E731
    p_n, q_n = take(target_probs, n), take(draft_probs, n.clamp(max=gamma - 1))
    residual_dist = {
        "max(p-q,0)": (p_n - q_n).clamp_min(0.0),
        "|p-q|": (p_n - q_n).abs(),  # the clamp forgotten
        "p": p_n,  # resampled from the target as if nothing were known
    }[residual]
    residual_dist = torch.where(residual_dist.sum(-1, keepdim=True) > 0, residual_dist, p_n)
    bonus = take(target_probs, n if bonus_row == "n" else (n - 1).clamp_min(0))  # off by one
    dist = torch.where((n < verify_lens)[:, None], residual_dist, bonus)
    next_tokens = sample_from_probs(dist, sample_uniforms)
    slots = torch.arange(rows)[None, :]
    out = torch.where(slots < n[:, None], torch.nn.functional.pad(draft_tokens, (0, 1)), -1)
    out = torch.where(slots == n[:, None], next_tokens[:, None], out)
    return type("Result", (), dict(num_accepted=n, next_tokens=next_tokens, output_tokens=out))


def peeking_verify_len(**inputs):
    """Correct acceptance, but the verify length stops before the first draft with p(x) < q(x)."""
    p_x = inputs["target_probs"][:, :GAMMA].gather(2, inputs["draft_tokens"][..., None]).squeeze(-1)
    q_x = inputs["draft_probs"].gather(2, inputs["draft_tokens"][..., None]).squeeze(-1)
    safe_prefix = (p_x >= q_x).long().cumprod(1).sum(1)
    return chain_accept(**{**inputs, "verify_lens": torch.minimum(inputs["verify_lens"], safe_prefix)})


def test_variant_harness_matches_chain_accept():
    # The control harness with no bug switched on is chain_accept exactly (so each control differs
    # from a lossless sampler by one line). Dropping the min is no bug: u < 1 makes it identical.
    model = make_model(7, Params(), seed=11)
    inputs = draft_and_verify_inputs(model, "random", torch.Generator().manual_seed(3), num_reqs=20_000)
    expected = chain_accept(**inputs).output_tokens
    assert torch.equal(variant_accept(**inputs).output_tokens, expected)
    assert torch.equal(variant_accept(**inputs, ratio="p/q").output_tokens, expected)


NEGATIVE_CONTROLS = {
    "residual |p-q| (no clamp)": lambda **kw: variant_accept(**kw, residual="|p-q|"),
    "residual from p": lambda **kw: variant_accept(**kw, residual="p"),
    "ratio q/p (p and q swapped)": lambda **kw: variant_accept(**kw, ratio="q/p"),
    "ratio p(x) (q ignored)": lambda **kw: variant_accept(**kw, ratio="p"),
    "bonus from row n-1": lambda **kw: variant_accept(**kw, bonus_row="n-1"),
    "verify length peeks at p": peeking_verify_len,
}


@pytest.mark.parametrize("control", list(NEGATIVE_CONTROLS))
def test_negative_control_fails_the_battery(control):
    vocab, params = SETTINGS["T=1 V=7"]
    model = make_model(vocab, params, seed=11)
    excess, where = worst_excess(battery(model, NEGATIVE_CONTROLS[control], seed=12, modes=(GAMMA, "random")))
    assert excess > 1.0, f"{control} passed the battery (worst: {where}, {excess:.2f}x threshold)"
