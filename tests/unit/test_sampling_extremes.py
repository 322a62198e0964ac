"""Losslessness at extreme sampling parameters (chain_accept + process_logits).

Reuses the chi-square battery of test_acceptance_distribution.py: a Markov-chain target and a noisy
drafter, both processed with the same parameters; every emitted sequence (completed from the
target) must follow the processed target chain's exact marginals and pair laws, Bonferroni-corrected
at family level 1e-3, with 100,000 requests per verify mode. Degenerate laws (one-hot rows) are
covered too: an impossible token makes the statistic infinite.
"""

import pytest
import torch

from dspark_sglang.acceptance import chain_accept
from dspark_sglang.sampling import is_greedy, process_logits
from test_acceptance_distribution import GAMMA, Params, battery, make_model, worst_excess

EXTREMES = {
    "T=0 (greedy)": (7, Params(temperature=0.0)),
    "T=1e4": (7, Params(temperature=1e4)),
    "T=1e4 top_k=3": (9, Params(temperature=1e4, top_k=3)),
    "top_p=1e-6": (7, Params(top_p=1e-6)),
    "top_k=1": (7, Params(top_k=1)),
    "top_k=V": (7, Params(top_k=7)),
    "min_p=1.0": (7, Params(min_p=1.0)),
    "T=1e-5 top_p=1e-6 min_p=1.0": (6, Params(temperature=1e-5, top_p=1e-6, min_p=1.0)),
}
MODES = (GAMMA, "random")  # all drafts verified, and a random token-independent verify length


def checked_sampler(params: Params, vocab: int):
    """chain_accept with the greedy flag the worker would set, checking every result's ranges."""

    def sampler(**inputs):
        num_reqs = inputs["verify_lens"].shape[0]
        greedy = is_greedy(torch.full((num_reqs,), params.temperature), torch.full((num_reqs,), params.top_k))
        result = chain_accept(**{**inputs, "greedy": greedy})
        assert ((result.next_tokens >= 0) & (result.next_tokens < vocab)).all()
        emitted = result.output_tokens[result.output_tokens >= 0]
        assert (emitted < vocab).all()
        assert ((result.num_accepted >= 0) & (result.num_accepted <= inputs["verify_lens"])).all()
        return result

    return sampler


@pytest.mark.parametrize("setting", list(EXTREMES))
def test_extreme_parameters_are_lossless(setting):
    vocab, params = EXTREMES[setting]
    model = make_model(vocab, params, seed=31)
    for probs in (model.target, model.draft):
        assert torch.isfinite(probs).all() and (probs >= 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(vocab))
    excess, where = worst_excess(battery(model, checked_sampler(params, vocab), seed=32, modes=MODES))
    assert excess < 1.0, f"{setting}: {where} exceeds the Bonferroni threshold ({excess:.2f}x)"


@pytest.mark.parametrize("setting", ["top_p=1e-6", "top_k=1", "min_p=1.0", "T=0 (greedy)"])
def test_degenerate_parameters_keep_only_the_argmax(setting):
    vocab, params = EXTREMES[setting]
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(4))
    n = logits.shape[0]
    probs = process_logits(logits, torch.full((n,), params.temperature), torch.full((n,), params.top_k),
                           torch.full((n,), params.top_p), torch.full((n,), params.min_p))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), vocab).float())


def test_huge_temperature_is_near_uniform_and_finite():
    vocab = 11
    logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(5)) * 50
    logits[0, 3] = float("inf")
    logits[1, 2] = float("nan")
    n = logits.shape[0]
    probs = process_logits(logits, torch.full((n,), 1e4), torch.full((n,), -1), torch.ones(n), torch.zeros(n))
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(n))
    assert (probs[2:] - 1 / vocab).abs().max() < 0.02
