"""The worker's Prometheus series: names, types, labels and values after a few rounds."""

import pytest
import torch

prometheus_client = pytest.importorskip("prometheus_client")  # installed with sglang (its /metrics)

from prometheus_client import CollectorRegistry, Histogram  # noqa: E402

from dspark_sglang.sglang.prometheus import PrometheusCounters, observe_counts  # noqa: E402
from dspark_sglang.sglang.state import WorkerStats  # noqa: E402

LABELS = {"model_name": "smollm2"}


def samples(registry) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in registry.collect() for s in metric.samples}


def value(registry, name, **labels) -> float:
    return samples(registry)[(name, tuple(sorted({**LABELS, **labels}.items())))]


def test_observe_counts_equals_repeated_observe():
    a, b = CollectorRegistry(), CollectorRegistry()
    bounds = [0, 1, 2, 3]
    ha = Histogram("h", "h", buckets=bounds, registry=a)
    hb = Histogram("h", "h", buckets=bounds, registry=b)
    counts = {0: 3, 2: 5, 3: 1, 9: 2}  # 9 lands in +Inf
    for v, c in counts.items():
        for _ in range(c):
            ha.observe(v)
    observe_counts(hb, counts)
    assert samples(a).keys() == samples(b).keys()
    assert {k: v for k, v in samples(a).items() if "created" not in k[0]} == \
        {k: v for k, v in samples(b).items() if "created" not in k[0]}


def test_worker_stats_feed_the_series():
    registry = CollectorRegistry()
    gamma = 3
    stats = WorkerStats(gamma, log_every=0, sink=PrometheusCounters(gamma, LABELS, registry=registry))
    # Round 1: verify lengths 3, 1, 0; accepted 2, 1, 0. Round 2: one request verifies 3, accepts 3.
    stats.record(torch.tensor([3, 1, 0]), torch.tensor([2, 1, 0]), {"draft": 0.0})
    stats.record(torch.tensor([3]), torch.tensor([3]), {"draft": 0.0})
    stats.skip_drafting("did_not_pay")
    stats.skip_drafting("caps")
    stats.skip_drafting("caps")
    stats.fault("nan_draft", 2)

    assert value(registry, "dspark:rounds_total") == 2
    assert value(registry, "dspark:verify_length_count") == 4
    assert value(registry, "dspark:verify_length_sum") == 3 + 1 + 0 + 3
    assert value(registry, "dspark:verify_length_bucket", le="0.0") == 1
    assert value(registry, "dspark:verify_length_bucket", le="1.0") == 2
    assert value(registry, "dspark:verify_length_bucket", le="3.0") == 4
    # Accept length counts the target's token: 3, 2, 1 and 4.
    assert value(registry, "dspark:accept_length_sum") == 3 + 2 + 1 + 4
    assert value(registry, "dspark:accept_length_bucket", le="1.0") == 1
    assert value(registry, "dspark:accept_length_bucket", le="+Inf") == 4
    # Position k verified by requests with verify_len >= k, accepted by those with accepted >= k.
    assert [value(registry, "dspark:position_verified_total", position=str(k)) for k in (1, 2, 3)] == [3, 2, 2]
    assert [value(registry, "dspark:position_accepted_total", position=str(k)) for k in (1, 2, 3)] == [3, 2, 1]
    assert value(registry, "dspark:drafting_skipped_total", reason="did_not_pay") == 1
    assert value(registry, "dspark:drafting_skipped_total", reason="caps") == 2
    assert value(registry, "dspark:faults_total", kind="nan_draft") == 2
    # The server's own counters agree.
    d = stats.as_dict()
    assert d["drafting_skipped"] == 1 and d["drafting_skipped_by_caps"] == 2 and d["rounds"] == 2
