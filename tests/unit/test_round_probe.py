"""The round-cost probe's settings and the round_cost benchmark's summary (pure parts)."""

from __future__ import annotations

import pytest

from dspark_sglang.benchmarks.round_cost import summarize
from dspark_sglang.sglang.round_probe import RoundProbe, parse_windows


def test_windows_parse_and_cycle():
    probe = RoundProbe(parse_windows("1, 2,4"))
    seen = []
    for _ in range(5):
        seen.append(probe.window())
        probe.record(batch=1)
    assert seen == [1, 2, 4, 1, 2]
    assert RoundProbe.from_env({}) is None
    for bad in ("", "0,2", "a,b"):
        with pytest.raises(ValueError, match="DSPARK_ROUND_PROBE"):
            parse_windows(bad)


def _rec(window, batch=2, verify_tokens=None, plain=0.1, draft=0.02, verify=0.12, accept=0.002, commit=0.003):
    return dict(batch=batch, window=window, verify_tokens=batch * window if verify_tokens is None else verify_tokens,
                context_tokens=batch * 100, accepted=1, plain_decode=plain, draft=draft, verify=verify,
                accept=accept, commit=commit)


def test_summary_uses_only_full_rounds_and_reports_ratios():
    records = [_rec(1, verify=0.1), _rec(2), _rec(2, verify=9.0, verify_tokens=3),  # a capped round: ignored
               _rec(2, batch=1, verify=9.0)]  # another batch size: ignored
    out = summarize(records, batch=2, windows=[1, 2])
    assert out["rounds"] == 2 and out["plain_ms"] == pytest.approx(100.0)
    assert out["windows"]["2"]["verify_ratio"] == pytest.approx(1.2)
    assert out["windows"]["1"]["verify_ratio"] == pytest.approx(1.0)
    assert out["windows"]["2"]["round_ratio"] == pytest.approx((0.02 + 0.12 + 0.005) / 0.1)
    assert out["windows"]["2"]["bookkeeping_share"] == pytest.approx(0.005 / 0.145)
    assert summarize([], batch=2, windows=[1]) == {"windows": {}}
