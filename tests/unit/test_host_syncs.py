"""HostSyncCounter (dspark_sglang/host_syncs.py): it sees every kind of host read a GPU would stall
on, attributes each to its line, and leaves host-side tensors alone. The negative controls are the
point: one injected `.item()` must move the count by exactly one."""

from __future__ import annotations

import torch

from dspark_sglang.host_syncs import HostSyncCounter


def _round_like(x: torch.Tensor, lens_cpu: torch.Tensor, inject: bool = False) -> torch.Tensor:
    """Device math plus host bookkeeping, like a decode round (one deliberate read: the tolist)."""
    y = (x * 2).cumsum(0)  # device
    host = (lens_cpu + 1).tolist()  # host tensor: no sync
    if inject:
        y.sum().item()  # the injected sync
    z = torch.zeros(3, device=x.device)  # device factory
    z += y[:3]
    return z.tolist() + host  # one sync


def test_counts_exactly_the_device_reads():
    x = torch.arange(6, dtype=torch.float32)
    lens = torch.tensor([3, 4])
    HostSyncCounter.mark_host(lens)  # like SGLang's seq_lens_cpu
    with HostSyncCounter() as counter:
        _round_like(x, lens)
    assert counter.count() == 1
    assert [e.kind for e in counter.events] == ["tolist"]
    assert counter.events[0].ours is False  # a test file, not package code
    assert "test_host_syncs.py" in counter.events[0].where and "_round_like" in counter.events[0].where


def test_injected_item_is_seen_negative_control():
    x = torch.arange(6, dtype=torch.float32)
    lens = torch.tensor([3, 4])
    HostSyncCounter.mark_host(lens)
    with HostSyncCounter() as base:
        _round_like(x, lens)
    with HostSyncCounter() as injected:
        _round_like(x, lens, inject=True)
    assert injected.count() == base.count() + 1
    assert sorted(e.kind for e in injected.events) == ["item", "tolist"]


def test_every_kind_of_sync():
    x = torch.arange(5)
    total = int(x.sum())
    with HostSyncCounter() as c:
        m = x > 2
        x[0].item()
        x.tolist()
        bool(x[1])
        int(x[1])
        float(x[1])
        x.cpu()
        x.to("cpu", torch.int64)
        x.to(x.device)  # follows another tensor: on a GPU server, a device tensor (no sync)
        x.to(device=torch.arange(2, device="cpu").device)
        x.numpy()
        x[m]
        x.nonzero()
        torch.repeat_interleave(x, x)
        x.repeat_interleave(x, output_size=total)  # output_size known: no sync of its own
        x[m] = 0
        torch.where(m)
        range(x[2])
    kinds = [e.kind for e in c.events]
    assert kinds == ["item", "tolist", "__bool__", "__int__", "__float__", "cpu", "to(cpu)", "numpy",
                     "bool-mask index", "nonzero", "repeat_interleave", "bool-mask assign", "where(cond)", "__index__"]


def test_host_tensors_and_what_derives_from_them_never_count():
    device_lens = torch.arange(4)
    sglang_cpu_copy = torch.arange(4)
    HostSyncCounter.mark_host(sglang_cpu_copy)
    with HostSyncCounter() as c:
        a = device_lens.cpu()  # one sync: the copy itself
        (a + 1).tolist()
        a[a > 1].sum().item()
        (sglang_cpu_copy * 2).to(torch.int64).tolist()
        torch.tensor([1, 2]).tolist()
    assert [e.kind for e in c.events] == ["cpu"]


def test_excluded_files_are_not_counted_and_package_code_is_ours():
    from dspark_sglang.sampling import process_logits

    logits = torch.randn(2, 8)
    ones = torch.ones(2)
    with HostSyncCounter(exclude=("test_host_syncs.py",)) as c:
        torch.arange(3, device="cpu").tolist()
    assert c.count() == 0
    with HostSyncCounter(exclude=("test_host_syncs.py:_round_like",)) as c:
        _round_like(torch.arange(6.0), torch.tensor([1]))
        torch.arange(3, device="cpu").tolist()  # device= : a device tensor
    assert c.count() == 1  # only the sync outside _round_like
    with HostSyncCounter() as c:
        process_logits(logits, ones, torch.full((2,), 8), ones, torch.zeros(2))
    assert c.count(ours=False) == 0
    assert c.count() == c.count(ours=True)
    assert sum(c.by_site().values()) == c.count()


def test_round_sync_log_from_env_records_and_reports():
    from dspark_sglang.host_syncs import RoundSyncLog

    assert RoundSyncLog.from_env({}) is None
    log = RoundSyncLog.from_env({"DSPARK_COUNT_HOST_SYNCS": "1"})
    x = torch.arange(4)
    for extra in (0, 2):
        with log.counter() as c:
            x.tolist()
            for _ in range(extra):
                x.sum().item()
        log.record(c, batch_size=3)
    report = log.as_dict()
    assert (report["rounds"], report["max_ours"]) == (2, 0)  # a test file's syncs are not the package's
    assert [r["others"] for r in report["per_round"]] == [1, 3]


def test_extra_sync_fault_adds_exactly_one_host_read():
    from dspark_sglang.sglang.guards import FaultInjector
    from dspark_sglang.sglang.settings import parse_fault_spec

    injector = FaultInjector(parse_fault_spec("extra_sync"))
    probs = torch.rand(2, 3)
    with HostSyncCounter() as c:
        injector.maybe_extra_sync(probs)
    assert [e.kind for e in c.events] == ["item"] and c.events[0].ours
    assert injector.injected == {"extra_sync": 1}
