"""Sampling-parameter processing (SGLang 0.5.23 semantics) and the inverse-CDF draw."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_sglang.sampling import SamplingBatch, draw, is_greedy, process_logits, sample_from_probs

INF = float("inf")
NAN = float("nan")


def process(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    """process_logits on a list of rows sharing one parameter set."""
    logits = torch.tensor(logits, dtype=torch.float32)
    n = logits.shape[0]
    return process_logits(
        logits,
        temperatures=torch.full((n,), float(temperature)),
        top_ks=torch.full((n,), top_k, dtype=torch.int64),
        top_ps=torch.full((n,), float(top_p)),
        min_ps=torch.full((n,), float(min_p)),
    )


def assert_probs(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# is_greedy


def test_is_greedy_uses_sglang_threshold_and_top_k_1():
    # SGLang: `0 <= temperature < 1e-6` -> greedy (sampling_params.py _SAMPLING_EPS), and greedy
    # requests reach the sampler as temperature=1, top_k=1.
    temps = torch.tensor([0.0, 5e-7, 1e-6, 1e-5, 1.0, 1.0])
    top_ks = torch.tensor([-1, -1, -1, -1, -1, 1])
    assert is_greedy(temps).tolist() == [True, True, False, False, False, False]
    assert is_greedy(temps, top_ks).tolist() == [True, True, False, False, False, True]


def test_sampling_batch_is_shared_with_the_drafter_interface():
    from dspark_sglang.drafters.interface import SamplingBatch as FromInterface

    assert FromInterface is SamplingBatch
    batch = SamplingBatch.greedy(3)
    assert batch.is_greedy().tolist() == [True, True, True]


# ---------------------------------------------------------------------------------------------
# process_logits: hand-derived cases


def test_greedy_is_one_hot_at_first_argmax():
    # T=0: one-hot at the argmax of the logits; 3.0 appears at ids 1 and 2 -> id 1.
    assert_probs(process([[1.0, 3.0, 3.0, 0.0]], temperature=0.0), [[0, 1, 0, 0]])
    # top_k=1 is SGLang's spelling of greedy: same one-hot, whatever the temperature.
    assert_probs(process([[1.0, 3.0, 3.0, 0.0]], temperature=0.7, top_k=1), [[0, 1, 0, 0]])


def test_temperature_scales_logits_before_softmax():
    logits = [[0.0, math.log(2.0), math.log(4.0)]]
    # T=1: exp(logits) = 1, 2, 4 -> /7.
    assert_probs(process(logits), [[1 / 7, 2 / 7, 4 / 7]])
    # T=0.5: logits*2 -> 1, 4, 16 -> /21.
    assert_probs(process(logits, temperature=0.5), [[1 / 21, 4 / 21, 16 / 21]])
    # T=1e6: logits/T ~ 1e-6, so uniform to ~1e-6.
    assert_probs(process(logits, temperature=1e6), [[1 / 3, 1 / 3, 1 / 3]], atol=1e-5)


def test_top_k():
    logits = [[0.0, math.log(2.0), math.log(4.0)]]
    # top_k=2 keeps 2/7 and 4/7 -> renormalised 1/3, 2/3.
    assert_probs(process(logits, top_k=2), [[0, 1 / 3, 2 / 3]])
    # top_k = V, top_k > V, top_k = -1 and SGLang's TOP_K_ALL all disable the filter.
    for k in (3, 4, -1, 0, 1 << 30):
        assert_probs(process(logits, top_k=k), [[1 / 7, 2 / 7, 4 / 7]])


def test_a_host_filtering_flag_replaces_the_device_check():
    """`filtering=True` gives what the device check gives; `False` skips the filter (so it must only be
    passed when no row filters: the host flag is SGLang's batch-level need_*_sampling)."""
    logits = torch.tensor([[0.0, math.log(2.0), math.log(4.0)], [1.0, 0.0, -1.0]])
    params = dict(temperatures=torch.ones(2), top_ks=torch.tensor([2, -1]), top_ps=torch.ones(2), min_ps=torch.zeros(2))
    checked = process_logits(logits, **params)
    torch.testing.assert_close(process_logits(logits, **params, filtering=True), checked)
    skipped = process_logits(logits, **params, filtering=False)
    assert skipped[0, 0].item() > 0.1 and checked[0, 0].item() == 0.0  # top-k 2 dropped only with the filter
    torch.testing.assert_close(skipped[1], checked[1])
    batch = SamplingBatch(**params, filtering=True)
    torch.testing.assert_close(batch.probs(logits), checked)


def test_top_p_drops_tokens_whose_preceding_mass_exceeds_top_p():
    logits = [[math.log(0.1), math.log(0.2), math.log(0.3), math.log(0.4)]]
    # Sorted 0.4, 0.3, 0.2, 0.1; mass before each: 0, 0.4, 0.7, 0.9. top_p=0.5 keeps 0.4 and 0.3.
    assert_probs(process(logits, top_p=0.5), [[0, 0, 3 / 7, 4 / 7]])
    # A tiny top_p keeps only the most likely token (nothing precedes it).
    assert_probs(process(logits, top_p=1e-6), [[0, 0, 0, 1]])
    assert_probs(process(logits, top_p=1.0), [[0.1, 0.2, 0.3, 0.4]])


def test_min_p_is_relative_to_the_top_probability():
    logits = [[math.log(0.1), math.log(0.2), math.log(0.3), math.log(0.4)]]
    # min_p=0.5: threshold 0.2; 0.1 < 0.2 dropped, 0.2 kept (not strictly below) -> /0.9.
    assert_probs(process(logits, min_p=0.5), [[0, 2 / 9, 3 / 9, 4 / 9]], atol=1e-5)
    # min_p=1 keeps exactly the tokens tied at the top.
    assert_probs(process([[0.0, 1.0, 1.0]], min_p=1.0), [[0, 0.5, 0.5]])


def test_filters_combine_on_the_unfiltered_softmax():
    logits = [[math.log(0.1), math.log(0.2), math.log(0.3), math.log(0.4)]]
    # top_k=3 keeps 0.4, 0.3, 0.2; top_p=0.6 (mass before: 0, 0.4, 0.7) keeps 0.4, 0.3;
    # min_p=0.8 (threshold 0.32) keeps 0.4 only.
    assert_probs(process(logits, top_k=3, top_p=0.6), [[0, 0, 3 / 7, 4 / 7]])
    assert_probs(process(logits, top_k=3, top_p=0.6, min_p=0.8), [[0, 0, 0, 1]])


def test_non_finite_logits_follow_sglang_sanitisation():
    # NaN -> -1e30: never sampled.
    assert_probs(process([[NAN, 0.0, 0.0]]), [[0, 0.5, 0.5]])
    # +inf -> +1e30: the +inf tokens share all the mass.
    assert_probs(process([[INF, 0.0, INF]]), [[0.5, 0, 0.5]])
    # all -inf -> all -1e30: uniform (as SGLang with SGLANG_SANITIZE_NAN_LOGITS).
    assert_probs(process([[-INF, -INF, -INF, -INF]]), [[0.25] * 4])
    # Greedy never picks a NaN (torch.argmax would: it treats NaN as the maximum).
    assert_probs(process([[NAN, 1.0, 2.0]], temperature=0.0), [[0, 0, 1]])
    assert_probs(process([[NAN, NAN]], temperature=0.0), [[1, 0]])


def test_invalid_parameters_never_produce_nan():
    # top_p <= 0 or a NaN temperature would empty the row; it falls back to the argmax.
    assert_probs(process([[0.0, 2.0, 1.0]], top_p=0.0), [[0, 1, 0]])
    assert_probs(process([[0.0, 2.0, 1.0]], temperature=NAN), [[0, 1, 0]])


def test_shape_errors_name_the_field():
    with pytest.raises(ValueError, match="top_ps"):
        process_logits(torch.zeros(2, 3), torch.ones(2), torch.ones(2, dtype=torch.long),
                       torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match="logits"):
        process_logits(torch.zeros(3), torch.ones(1), torch.ones(1, dtype=torch.long),
                       torch.ones(1), torch.zeros(1))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_rows=st.integers(0, 6),
    vocab=st.integers(1, 37),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
)
def test_rows_are_distributions(seed, num_rows, vocab, scale):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * scale
    logits[torch.rand(num_rows, vocab, generator=gen) < 0.1] = NAN
    logits[torch.rand(num_rows, vocab, generator=gen) < 0.1] = -INF
    temps = torch.tensor([0.0, 1e-7, 0.3, 1.0, 7.0, 1e6])[torch.randint(0, 6, (num_rows,), generator=gen)]
    top_ks = torch.randint(-1, vocab + 2, (num_rows,), generator=gen)
    top_ps = torch.rand(num_rows, generator=gen).clamp_min(1e-6)
    min_ps = torch.rand(num_rows, generator=gen) * (torch.rand(num_rows, generator=gen) < 0.5)
    probs = process_logits(logits, temps, top_ks, top_ps, min_ps)
    assert probs.shape == (num_rows, vocab) and probs.dtype == torch.float32
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(num_rows), atol=1e-5, rtol=0)
    # Greedy rows are one-hot.
    greedy = is_greedy(temps, top_ks)
    assert ((probs[greedy] > 0).sum(-1) == 1).all()


# ---------------------------------------------------------------------------------------------
# process_logits against SGLang's own torch sampler (imported here only: ~10 s on CPU)


def _sglang_filtered_probs(logits, temperature, top_k, top_p, min_p):
    """What sglang's pytorch sampling backend samples from, for one request per row."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in zip(temperature, top_k, top_p, min_p)]
    for param in params:
        param.verify(vocab_size=logits.shape[1])
    temps = torch.tensor([param.temperature for param in params])[:, None]
    probs = torch.softmax(logits / temps, dim=-1)
    _, probs_sort, probs_idx, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(),
        torch.tensor([param.top_k for param in params], dtype=torch.int32),
        torch.tensor([param.top_p for param in params]),
        torch.tensor([param.min_p for param in params]),
        need_min_p_sampling=True,
        sampling_seed=None,
        positions=None,
        return_filtered_probs=True,
    )
    filtered = torch.zeros_like(probs).scatter_(-1, probs_idx.long(), probs_sort)
    return filtered / filtered.sum(-1, keepdim=True)


def test_matches_sglang_torch_sampler():
    gen = torch.Generator().manual_seed(0)
    num_rows, vocab = 400, 23
    # Distinct logits (ties would let SGLang's unstable sort pick either member).
    logits = torch.randn(num_rows, vocab, generator=gen) * 2.0

    def pick(values):
        return [values[i] for i in torch.randint(0, len(values), (num_rows,), generator=gen)]

    temperature = pick([0.0, 1e-7, 0.05, 0.7, 1.0, 1.5, 1e4])
    top_k = pick([-1, 1, 2, 5, vocab - 1, vocab, vocab + 5])
    top_p = pick([1.0, 0.95, 0.5, 0.1, 1e-6])
    min_p = pick([0.0, 0.05, 0.3, 1.0])
    expected = _sglang_filtered_probs(logits, temperature, top_k, top_p, min_p)
    actual = process_logits(
        logits, torch.tensor(temperature), torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p)
    )
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    # Same support exactly (a mask disagreement would show even when its mass is tiny).
    assert torch.equal(actual > 0, expected > 0)


# ---------------------------------------------------------------------------------------------
# sample_from_probs


def test_inverse_cdf_hand_cases():
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]] * 6)
    # cdf = 0, 0, .5, 1, 1: u -> first index whose cdf exceeds u (leading and trailing zeros skipped).
    u = torch.tensor([0.0, 0.49, 0.5, 0.99, 1.0, 1.5])
    assert sample_from_probs(probs, u).tolist() == [2, 2, 3, 3, 3, 3]
    # Unnormalised weights: cdf 1, 3, 6 of total 6.
    weights = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    assert sample_from_probs(weights, torch.tensor([0.1, 0.4, 0.6])).tolist() == [0, 1, 2]
    # NaN / inf / negative weights count as zero; an all-zero row returns 0.
    weird = torch.tensor([[NAN, 1.0, INF, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert sample_from_probs(weird, torch.tensor([0.999, 0.5])).tolist() == [1, 0]
    assert sample_from_probs(torch.zeros(0, 4), torch.zeros(0)).shape == (0,)


def test_inverse_cdf_with_stratified_uniforms_reproduces_the_distribution():
    # u_j = (j + 0.5) / N: token i is drawn for the u in [cdf[i-1], cdf[i]), i.e. N * p_i +- 1 times.
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(7, generator=gen)
    probs[3] = 0.0
    probs /= probs.sum()
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    counts = torch.bincount(sample_from_probs(probs.expand(n, -1), u.float()), minlength=7)
    assert counts[3] == 0
    assert (counts.double() - n * probs.double()).abs().max() <= 1.5


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(1, 40),
    zero_frac=st.sampled_from([0.0, 0.5, 0.9]),
    tiny=st.booleans(),
)
def test_inverse_cdf_never_returns_a_zero_weight_or_out_of_range(seed, vocab, zero_frac, tiny):
    gen = torch.Generator().manual_seed(seed)
    num_rows = 64
    probs = torch.rand(num_rows, vocab, generator=gen)
    if tiny:  # weights near float32's limits, where rounding of u * total matters
        probs = probs * torch.tensor([1e-30, 1e-7, 1.0, 1e20])[torch.randint(0, 4, (num_rows, 1), generator=gen)]
    probs[torch.rand(num_rows, vocab, generator=gen) < zero_frac] = 0.0
    probs[:, 0] = torch.where(probs.sum(-1) == 0, 1.0, probs[:, 0])
    u = torch.rand(num_rows, generator=gen)
    u[:8] = torch.tensor([0.0, 1.0 - 2**-24, 1.0, 1.0 - 2**-23, 2**-24, 0.5, 1.0 - 1e-7, 1e-30])
    tokens = sample_from_probs(probs, u)
    assert tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < vocab)).all()
    assert (probs.gather(1, tokens[:, None]) > 0).all()


def test_worker_reads_the_filter_flag_off_sglangs_host_flags():
    """The worker's SamplingBatch carries SGLang's batch-level flags as `filtering` (no device check);
    an all-greedy batch never filters, whatever top_k = 1 makes need_top_k_sampling say."""
    from types import SimpleNamespace

    from dspark_sglang.sglang.worker import sampling_batch

    def info(temps, top_ks, **flags):
        n = len(temps)
        return SimpleNamespace(temperatures=torch.tensor(temps)[:, None], top_ks=torch.tensor(top_ks),
                               top_ps=torch.ones(n), min_ps=torch.zeros(n), **flags)

    flags = dict(need_top_k_sampling=True, need_top_p_sampling=False, need_min_p_sampling=False)
    assert sampling_batch(info([1.0, 1.0], [1, 1], is_all_greedy=True, **flags)).filtering is False
    assert sampling_batch(info([1.0, 0.7], [1, 20], is_all_greedy=False, **flags)).filtering is True
    none = dict(need_top_k_sampling=False, need_top_p_sampling=False, need_min_p_sampling=False)
    assert sampling_batch(info([0.7, 0.7], [1 << 30, 1 << 30], is_all_greedy=False, **none)).filtering is False
    assert sampling_batch(info([0.7], [1 << 30])).filtering is None  # no flags: process_logits checks


# ---------------------------------------------------------------------------------------------
# draw: the all-greedy shortcut


_LOGIT = st.one_of(st.floats(-50, 50, width=32), st.sampled_from([INF, -INF, NAN, 0.0, 1.0]))


def _greedy_batch(rows: int, top_k_one: list[bool]) -> SamplingBatch:
    """Greedy rows both ways SGLang marks them: temperature 0, or top_k 1 (how greedy requests arrive)."""
    return SamplingBatch(
        temperatures=torch.tensor([1.0 if k else 0.0 for k in top_k_one]),
        top_ks=torch.tensor([1 if k else -1 for k in top_k_one], dtype=torch.int64),
        top_ps=torch.ones(rows), min_ps=torch.zeros(rows), filtering=False, all_greedy=True,
    )


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_draw_shortcut_equals_the_general_path_on_greedy_batches(data):
    """NaN/inf logits and ties included: the one-hot q and the token are the very tensors the softmax +
    inverse-CDF path gives."""
    rows, vocab = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 9))
    logits = torch.tensor(data.draw(st.lists(st.lists(_LOGIT, min_size=vocab, max_size=vocab), min_size=rows,
                                             max_size=rows)), dtype=torch.float32)
    batch = _greedy_batch(rows, data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    uniforms = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=rows, max_size=rows)), dtype=torch.float32)
    q, token = draw(batch, logits, uniforms)
    general = SamplingBatch(batch.temperatures, batch.top_ks, batch.top_ps, batch.min_ps, filtering=False,
                            all_greedy=None)
    q_ref, token_ref = draw(general, logits, uniforms)
    assert torch.equal(q_ref, general.probs(logits)) and torch.equal(token_ref, sample_from_probs(q_ref, uniforms))
    assert q.dtype == q_ref.dtype == torch.float32
    assert torch.equal(q, q_ref)
    assert torch.equal(token, token_ref)


def test_draw_shortcut_is_only_exact_for_greedy_rows():
    """Negative control: flagging a sampled batch all-greedy would change its draws, so the equality above
    is not one any path passes."""
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.9]] * 64)
    uniforms = torch.linspace(0.01, 0.99, 64)
    sampled = SamplingBatch(torch.ones(64), torch.full((64,), -1), torch.ones(64), torch.zeros(64), filtering=False)
    flagged = SamplingBatch(sampled.temperatures, sampled.top_ks, sampled.top_ps, sampled.min_ps, filtering=False,
                            all_greedy=True)
    assert not torch.equal(draw(sampled, logits, uniforms)[1], draw(flagged, logits, uniforms)[1])
