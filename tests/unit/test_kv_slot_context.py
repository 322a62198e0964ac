"""Block drafters with their context in a KV-slot pool (`KvSlotContext`, the serving path) draft
exactly what they draft from per-request buffers (`ContextCache`), ragged contexts included, and a
request that adopts rows already in the pool (a radix-cache hit) drafts like a cold start."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dspark_sglang.drafters.block import KvSlotContext
from dspark_sglang.drafters.loader import load_drafter
from tests.unit._block_drafter_helpers import FIXTURES, sampling, tiny_target

NAMES = ["deepspec_dspark_vanilla", "deepspec_dspark_rnn", "deepspec_dflash", "zlab_dflash",
         # speculators: no anchor sampling + own draft vocabulary; sliding-window layers (width 5)
         "speculators_dspark_rnn", "speculators_dspark_swa", "speculators_dflash_swa"]


def _table(num_reqs: int, width: int, num_slots: int, seed: int) -> torch.Tensor:
    """A req_to_token table with every request's positions on scattered, distinct KV slots."""
    perm = torch.randperm(num_slots - 1, generator=torch.Generator().manual_seed(seed))[: num_reqs * width] + 1
    return perm.view(num_reqs, width).to(torch.int32)


def _draft(drafter, ref, ends, seed=3):
    slots = list(range(len(ends)))
    features, tokens = ref["context_features"], ref["token_ids"]
    drafter.append_context(slots, [features[:n] for n in ends], [torch.arange(n) for n in ends], [tokens[:n] for n in ends])
    anchors = torch.stack([tokens[n] for n in ends])
    gen = torch.Generator().manual_seed(seed)
    temps = [0.0 if i % 2 == 0 else 1.0 for i in range(len(ends))]
    return drafter.propose(slots, anchors, torch.tensor(ends), sampling(temps), gen)


@pytest.mark.parametrize("name", NAMES)
def test_kv_slot_pool_drafts_what_per_request_buffers_draft(name):
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    ends = [12, 5, 16]  # ragged contexts
    want = _draft(load_drafter(FIXTURES / name, tiny_target()), ref, ends)
    pooled = load_drafter(FIXTURES / name, tiny_target())
    pooled.use_kv_slot_context(num_kv_slots=200, req_to_token=_table(3, 32, 200, seed=0))
    got = _draft(pooled, ref, ends)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.allclose(got.probs, want.probs, atol=1e-6)
    if want.confidence_logits is not None:
        assert torch.allclose(got.confidence_logits, want.confidence_logits, atol=1e-5)


def test_rows_written_by_one_request_are_adopted_by_another():
    """Request 1 shares request 0's first 10 positions on the same KV slots (a radix-cache hit):
    adopting them by length drafts exactly like appending its own copy of those positions."""
    name = "deepspec_dspark_vanilla"
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    feats, tokens = ref["context_features"], ref["token_ids"]
    table = _table(2, 32, 200, seed=1)
    table[1, :10] = table[0, :10]  # the shared prefix
    drafter = load_drafter(FIXTURES / name, tiny_target())
    pool = drafter.use_kv_slot_context(200, table)
    drafter.append_context([0], [feats[:14]], [torch.arange(14)], [tokens[:14]])
    pool.set_length(1, 10)  # adopt the cached prefix
    drafter.append_context([1], [feats[10:14]], [torch.arange(10, 14)], [tokens[10:14]])
    got = drafter.propose([0, 1], torch.stack([tokens[14], tokens[14]]), torch.tensor([14, 14]), sampling([0.0, 0.0]))
    assert torch.equal(got.tokens[0], got.tokens[1])
    assert torch.allclose(got.probs[0], got.probs[1], atol=1e-6)

    cold = load_drafter(FIXTURES / name, tiny_target())
    want = _draft(cold, ref, [14])
    assert torch.equal(got.tokens[1], want.tokens[0])


def test_pool_bookkeeping():
    table = _table(2, 8, 40, seed=2)
    pool = KvSlotContext(2, 1, 4, torch.float32, "cpu", 40, table)
    keys = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 1, 4)
    pool.append(1, keys, -keys)
    assert pool.length(1) == 3 and pool.length(0) == 0
    assert torch.equal(pool.keys[:, table[1, :3].long()], keys)
    rows, lens = pool.index([0, 1])
    assert lens == [0, 3] and rows.shape == (2, 3) and torch.equal(rows[1], table[1, :3].long())
    pool.truncate(1, 2)
    assert pool.length(1) == 2
    pool.release(1)
    assert pool.length(1) == 0
    assert pool.bytes_per_slot == 2 * 2 * 1 * 4 * 4 and pool.nbytes == 40 * pool.bytes_per_slot
    with pytest.raises(ValueError):
        pool.set_length(0, -1)


def test_memory_budget_adds_the_pool_bytes_per_token_to_sglangs_cell_size():
    from types import SimpleNamespace
    from unittest import mock

    from dspark_sglang.sglang import memory_budget

    dspark, eagle = str(FIXTURES / "deepspec_dspark_vanilla"), str(FIXTURES / "deepspec_eagle3")
    from dspark_sglang.drafters.loader import describe_drafter

    d = describe_drafter(dspark)
    assert memory_budget.context_bytes_per_token(dspark, 4) == d.num_layers * 2 * d.num_kv_heads * d.head_dim * 4 > 0
    assert memory_budget.context_bytes_per_token(eagle, 4) == 0

    def configure(path, name="DSPARK_PLUGIN", draft_worker=False):
        cfg = SimpleNamespace(_cell_size=1000)
        kvc = SimpleNamespace(spec_algorithm=SimpleNamespace(name=name), is_draft_worker=draft_worker,
                              model_dtype=torch.float32)
        with mock.patch("sglang.srt.runtime_context.get_spec",
                        return_value=SimpleNamespace(speculative_draft_model_path=path)):
            memory_budget.add_context_pool(None, cfg, kvc)
        return cfg._cell_size

    assert configure(dspark) == 1000 + memory_budget.context_bytes_per_token(dspark, 4)
    assert configure(eagle) == 1000
    assert configure(dspark, name="EAGLE") == 1000  # another algorithm: untouched
    assert configure(dspark, draft_worker=True) == 1000
