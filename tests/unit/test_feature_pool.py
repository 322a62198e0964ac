"""KV-slot feature store (dspark_sglang/sglang/feature_pool.py): rows written at KV slots are read
back at those slots, later writes to a reused slot win, nothing is allocated before the first write."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from dspark_sglang.sglang.feature_pool import KvSlotFeatures


def test_rows_come_back_from_their_slots():
    store = KvSlotFeatures(num_kv_slots=lambda: 10, dtype=torch.float32, device="cpu")
    assert store.read(torch.tensor([1])) is None and store.nbytes == 0
    feats = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    store.write(torch.tensor([7, 2, 5]), feats)
    assert store.nbytes == 10 * 4 * 4
    torch.testing.assert_close(store.read(torch.tensor([2, 5, 7])), feats[[1, 2, 0]])
    # A slot freed and reused by another token holds the newer features.
    store.write(torch.tensor([5]), torch.full((1, 4), -1.0))
    assert store.read(torch.tensor([5])).tolist() == [[-1.0] * 4]
    assert store.read(torch.tensor([0])).abs().sum() == 0  # never written: zeros


def test_rows_are_kept_in_the_model_dtype():
    store = KvSlotFeatures(num_kv_slots=lambda: 4, dtype=torch.bfloat16, device="cpu")
    store.write(torch.tensor([3]), torch.tensor([[1.0, 2.0]], dtype=torch.float32))
    assert store.read(torch.tensor([3])).dtype == torch.bfloat16


class RecordingDrafter:
    """The drafter-context calls `_append_prefill_context` makes, recorded per slot."""

    def __init__(self):
        self.context = {}  # slot -> (features [n, W], positions [n], tokens [n])

    def context_length(self, slot):
        return len(self.context.get(slot, ((), (), ()))[1])

    def truncate_context(self, slot, n):
        f, p, t = self.context[slot]
        self.context[slot] = (f[:n], p[:n], t[:n])

    def release(self, slot):
        self.context.pop(slot, None)

    def append_context(self, slots, feats, positions, tokens):
        for s, f, p, t in zip(slots, feats, positions, tokens):
            old = self.context.get(s)
            self.context[s] = (f, p, t) if old is None else (
                torch.cat([old[0], f]), torch.cat([old[1], p]), torch.cat([old[2], t]))


def prefill_worker(keep_radix_cache: bool):
    from types import SimpleNamespace

    from dspark_sglang.sglang.state import SlotRegistry, WorkerStats
    from dspark_sglang.sglang.worker import DSparkPluginWorker

    worker = DSparkPluginWorker.__new__(DSparkPluginWorker)  # only the prefill-context path
    worker.drafter = RecordingDrafter()
    worker.slots = SlotRegistry(worker.drafter.release)
    worker.stats = WorkerStats(gamma=2, log_every=0)
    worker._warned_prefix = False
    worker.kv_features = KvSlotFeatures(lambda: 32, torch.float32, "cpu") if keep_radix_cache else None
    req_to_token = torch.zeros(4, 16, dtype=torch.int64)
    req_to_token[0, :5] = torch.tensor([11, 12, 13, 14, 15])  # request A's KV slots
    req_to_token[1, :5] = torch.tensor([11, 12, 13, 14, 20])  # request B: A's first 4 cached, 1 new
    pool = SimpleNamespace(req_to_token=req_to_token)

    def prefill(rid, slot, prompt, prefix, features):
        n = len(prompt) - prefix
        batch = SimpleNamespace(
            reqs=[SimpleNamespace(rid=rid, full_untruncated_fill_ids=prompt)],
            input_ids=torch.tensor(prompt[prefix:]), req_pool_indices=torch.tensor([slot]),
            extend_lens=[n], prefix_lens=[prefix], req_to_token_pool=pool,
            out_cache_loc=req_to_token[slot, prefix : prefix + n],
        )
        worker._append_prefill_context(batch, features)
        if worker.kv_features is not None:
            worker.kv_features.write(batch.out_cache_loc, features)
        return worker.drafter.context[slot]

    return worker, prefill


@pytest.mark.parametrize("keep_radix_cache", [True, False])
def test_a_radix_hit_gets_the_features_its_prefix_was_computed_with(keep_radix_cache):
    worker, prefill = prefill_worker(keep_radix_cache)
    prompt = [5, 6, 7, 8, 9]
    cold = torch.randn(5, 3)
    prefill("A", 0, prompt, 0, cold)
    fresh = torch.randn(1, 3)
    feats, positions, tokens = prefill("B", 1, prompt, 4, fresh)  # cached: positions 0..3
    assert positions.tolist() == [0, 1, 2, 3, 4] and tokens.tolist() == prompt
    if keep_radix_cache:  # the store: exactly the cold run's features
        torch.testing.assert_close(feats, torch.cat([cold[:4], fresh]))
        assert worker.stats.prefix_features_reused == 4 and worker.stats.prefill_fallbacks == 0
    else:  # no store (the negative control): zeros, counted as a fallback
        assert feats[:4].abs().sum() == 0 and worker.stats.prefill_fallbacks == 1
