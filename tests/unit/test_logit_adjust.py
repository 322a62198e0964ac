"""Verify-window logit adjustments (dspark_sglang/sglang/logit_adjust.py) against a hand-built
SGLang-like sampling info: anchor rows get SGLang's full adjustment, draft rows get logit_bias only,
and requests whose adjustments depend on generated tokens are marked for plain decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from dspark_sglang.sglang.logit_adjust import adjust_verify_logits, needs_plain_decoding, plain_decoding_rows


def request(output_len=3, grammar=None, custom=None, **params):
    defaults = dict(frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0)
    return SimpleNamespace(sampling_params=SimpleNamespace(**{**defaults, **params}), output_ids=[1] * output_len,
                           grammar=grammar, custom_logit_processor=custom)


@pytest.mark.parametrize("req,plain", [
    (request(), False),
    (request(frequency_penalty=0.5), True),
    (request(presence_penalty=-0.1), True),
    (request(repetition_penalty=1.2), True),
    (request(min_new_tokens=5, output_len=4), True),
    (request(min_new_tokens=5, output_len=5), False),  # reached: the penalizer no longer acts
    (request(grammar=object()), True),
    (request(custom="serialized processor"), True),
])
def test_which_requests_decode_plainly(req, plain):
    assert needs_plain_decoding(req) is plain


def test_plain_decoding_rows_is_a_cpu_bool_mask():
    rows = plain_decoding_rows([request(), request(frequency_penalty=1.0)])
    assert rows.dtype == torch.bool and rows.tolist() == [False, True]


class FakeSamplingInfo:
    """SGLang's apply_logits_bias semantics on [R, V]: a per-request additive penalty, then logit_bias."""

    def __init__(self, penalty, logit_bias=None):
        self.penalty, self.logit_bias, self.vocab_size = penalty, logit_bias, penalty.shape[1]
        self.calls = 0

    def apply_logits_bias(self, logits):
        assert logits.shape == self.penalty.shape
        self.calls += 1
        logits.add_(self.penalty)
        if self.logit_bias is not None:
            logits.add_(self.logit_bias)


def test_anchor_rows_get_everything_draft_rows_get_logit_bias():
    torch.manual_seed(0)
    widths = torch.tensor([3, 1, 2])  # request 1 decodes plainly this round
    starts = torch.cumsum(widths, 0) - widths
    logits = torch.randn(int(widths.sum()), 5)
    penalty = torch.zeros(3, 5)
    penalty[1] = torch.tensor([-1.0, 0, 2, 0, 0])  # only the penalized request has one
    bias = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    expected = logits.clone()
    for r, (s, w) in enumerate(zip(starts.tolist(), widths.tolist())):
        expected[s] += penalty[r]
        expected[s : s + w] += bias[r]
    info = FakeSamplingInfo(penalty, bias)
    adjust_verify_logits(logits, starts, widths, info)
    assert info.calls == 1
    torch.testing.assert_close(logits, expected)


def test_without_logit_bias_only_anchor_rows_change():
    widths = torch.tensor([4, 1])
    starts = torch.tensor([0, 4])
    logits = torch.zeros(5, 3)
    penalty = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, -5.0]])
    adjust_verify_logits(logits, starts, widths, FakeSamplingInfo(penalty))
    assert logits[4].tolist() == [5.0, 0.0, -5.0]
    assert logits[:4].abs().sum() == 0


def test_vocabulary_mismatch_is_refused():
    info = FakeSamplingInfo(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="7"):
        adjust_verify_logits(torch.zeros(1, 5), torch.tensor([0]), torch.tensor([1]), info)
