"""The worker's counters in SGLang's `/metrics` (servers started with `--enable-metrics`).

SGLang runs prometheus_client in multiprocess mode: every process writes its metrics to files under
`PROMETHEUS_MULTIPROC_DIR` and the HTTP server's `/metrics` sums them. The worker lives in a
scheduler process, so metrics it creates there appear in `/metrics` next to SGLang's own `sglang:*`
series, with the same `model_name` label.

| series | type | what |
|---|---|---|
| `dspark:rounds_total` | counter | decode rounds |
| `dspark:accept_length` | histogram | tokens committed per request-round (accepted drafts + the target's token) |
| `dspark:verify_length` | histogram | drafts verified per request-round (0 = plain decoding for that request) |
| `dspark:position_verified_total{position}` | counter | times draft position k (1-based) was verified |
| `dspark:position_accepted_total{position}` | counter | ... and accepted: their ratio is acceptance by position |
| `dspark:drafting_skipped_total{reason}` | counter | rounds not drafted: `did_not_pay` (scheduler), `caps` (no request could verify a draft) |
| `dspark:faults_total{kind}` | counter | request-rounds that fell back: `nan_draft`, `garbage_confidence`, `draft_exception` |

A round's histograms are observed from its per-value counts (one update per distinct length, not per
request); `observe_counts` does exactly what that many `observe()` calls would.
"""

from __future__ import annotations

import torch


def observe_counts(histogram, counts: dict[int, int]) -> None:
    """`histogram.observe(v)` `c` times for every (v, c) in `counts`, in one update per value."""
    buckets, total = getattr(histogram, "_buckets", None), getattr(histogram, "_sum", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if buckets is None or total is None or bounds is None:  # another prometheus_client: the public API
        for value, count in counts.items():
            for _ in range(count):
                histogram.observe(value)
        return
    for value, count in counts.items():
        if count <= 0:
            continue
        total.inc(value * count)
        index = next(i for i, bound in enumerate(bounds) if value <= bound)  # the last bound is +Inf
        buckets[index].inc(count)


class PrometheusCounters:
    """Prometheus series of one worker. `registry=None` (the server's case) registers nothing in this
    process: in multiprocess mode the values go to SGLang's metric files all the same."""

    def __init__(self, gamma: int, labels: dict[str, str], registry=None) -> None:
        from prometheus_client import Counter, Histogram

        self.gamma = gamma
        names = tuple(labels)
        self._labels = labels
        lengths = [float(v) for v in range(gamma + 2)]  # 0 .. gamma + 1, then +Inf
        self.rounds = Counter("dspark:rounds", "DSPARK decode rounds", names, registry=registry).labels(**labels)
        self.accept_length = Histogram(
            "dspark:accept_length", "Tokens committed per request-round (accepted drafts + 1)", names,
            buckets=lengths, registry=registry).labels(**labels)
        self.verify_length = Histogram(
            "dspark:verify_length", "Drafts verified per request-round", names, buckets=lengths,
            registry=registry).labels(**labels)
        self._verified = Counter("dspark:position_verified", "Times draft position k was verified",
                                 names + ("position",), registry=registry)
        self._accepted = Counter("dspark:position_accepted", "Times draft position k was accepted",
                                 names + ("position",), registry=registry)
        self._skipped = Counter("dspark:drafting_skipped", "Decode rounds not drafted, by reason",
                                names + ("reason",), registry=registry)
        self._faults = Counter("dspark:faults", "Request-rounds that fell back to fewer drafts, by fault",
                               names + ("kind",), registry=registry)
        self._verified_at = [self._verified.labels(**labels, position=str(k + 1)) for k in range(gamma)]
        self._accepted_at = [self._accepted.labels(**labels, position=str(k + 1)) for k in range(gamma)]

    def record_round(
        self,
        verify_counts: torch.Tensor,  # [gamma + 1] request-rounds by drafts verified
        accept_counts: torch.Tensor,  # [gamma + 1] request-rounds by drafts accepted
        verified_at: torch.Tensor,  # [gamma] times each draft position was verified
        accepted_at: torch.Tensor,  # [gamma] ... and accepted
    ) -> None:
        """One round, from the counts WorkerStats.record computed (nothing per request here)."""
        self.rounds.inc()
        observe_counts(self.verify_length, {v: c for v, c in enumerate(verify_counts.tolist()) if c})
        observe_counts(self.accept_length, {v + 1: c for v, c in enumerate(accept_counts.tolist()) if c})
        for k, (v, a) in enumerate(zip(verified_at.tolist(), accepted_at.tolist())):
            if v:
                self._verified_at[k].inc(v)
            if a:
                self._accepted_at[k].inc(a)

    def drafting_skipped(self, reason: str) -> None:
        self._skipped.labels(**self._labels, reason=reason).inc()

    def fault(self, kind: str, count: int) -> None:
        self._faults.labels(**self._labels, kind=kind).inc(count)
