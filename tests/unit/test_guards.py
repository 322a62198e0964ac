"""Worker guards and fault fallback (pure parts, no engine): sanitizing confidences, cutting chains
at non-finite drafts, the testing-only fault injector and its setting, the zero-budget cost tables,
and the worker's draft step with a misbehaving drafter."""

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dspark_sglang.cost_table import load_cost_table
from dspark_sglang.draft_cost import MeasuredDraftCost
from dspark_sglang.drafters.interface import DraftBlock
from dspark_sglang.schedulers import make_scheduler
from dspark_sglang.sglang.guards import (
    GARBAGE_CONFIDENCES, FaultInjector, InjectedFault, sanitize_confidences, usable_draft_prefix,
)
from dspark_sglang.sglang.settings import PluginSettingsError, load_settings, parse_fault_spec
from dspark_sglang.sglang.state import WorkerStats

TABLES = Path(__file__).resolve().parents[1] / "fixtures" / "cost_tables"
GAMMA, VOCAB = 4, 11


def block(num_reqs=3, seed=0) -> DraftBlock:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(num_reqs, GAMMA, VOCAB, generator=g), dim=-1)  # [R, gamma, V]
    tokens = torch.multinomial(probs.view(-1, VOCAB), 1, generator=g).view(num_reqs, GAMMA)
    return DraftBlock(tokens, probs, probs.gather(2, tokens[..., None]).squeeze(-1), torch.randn(num_reqs, GAMMA))


def test_usable_prefix_stops_at_the_first_non_finite_distribution_or_bad_token():
    b = block(num_reqs=5)
    assert usable_draft_prefix(b.probs, b.tokens, VOCAB).tolist() == [GAMMA] * 5
    probs, tokens = b.probs.clone(), b.tokens.clone()
    probs[0, 0] = math.nan  # whole first distribution: plain decoding
    probs[1, 2, 7] = math.inf  # one entry of q_3: the first two drafts stay usable
    probs[2, 3, 0] = math.nan  # last position only
    tokens[3, 1] = VOCAB  # out of the target vocabulary
    tokens[4, 0] = -1
    assert usable_draft_prefix(probs, tokens, VOCAB).tolist() == [0, 2, 3, 1, 0]


def test_sanitize_maps_garbage_into_the_unit_interval_and_flags_the_row():
    c = torch.tensor([[0.0, 0.5, 1.0, 0.25],  # valid: passed through exactly
                      [math.nan, 0.5, 0.5, 0.5],
                      [math.inf, -math.inf, 1e30, -3.0],
                      [0.9, 1.0000001, 0.2, 0.1]])
    clean, garbage = sanitize_confidences(c)
    assert garbage.tolist() == [False, True, True, True]
    assert torch.equal(clean[0], c[0])
    assert clean[1].tolist() == [0.0, 0.5, 0.5, 0.5]  # NaN: no evidence, no speculation from there
    assert clean[2].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert clean[3, 1] == 1.0 and bool(((clean >= 0) & (clean <= 1)).all())


@pytest.mark.parametrize("kind", ["lagged", "algorithm1"])
def test_schedules_stay_defined_on_sanitized_garbage(kind):
    sched = make_scheduler(kind, load_cost_table(str(TABLES / "zero_budget_lone_request.json")), max_verify_len=GAMMA)
    garbage = torch.tensor(GARBAGE_CONFIDENCES[:4]).repeat(4, 1)  # [4, 4]
    clean, flagged = sanitize_confidences(garbage)
    for _ in range(3):
        lens = sched.schedule(torch.arange(4), clean)
        assert bool(flagged.all()) and lens.dtype == torch.int64 and bool(((lens >= 0) & (lens <= GAMMA)).all())


@pytest.mark.parametrize("kind", ["lagged", "algorithm1"])
def test_zero_budget_tables(kind):
    """zero_budget.json: nothing verified at any batch size, even at confidence 1; the lone-request
    table: nothing for one request, drafts verified from two requests on."""
    zero = make_scheduler(kind, load_cost_table(str(TABLES / "zero_budget.json")), max_verify_len=GAMMA)
    lone = make_scheduler(kind, load_cost_table(str(TABLES / "zero_budget_lone_request.json")), max_verify_len=GAMMA)
    for num_reqs in (1, 2, 3, 8, 33, 64):
        sure = torch.ones(num_reqs, GAMMA)
        for _ in range(3):  # the lagged budget reads survivals from 2 rounds back
            assert zero.schedule(torch.arange(num_reqs), sure).sum() == 0
            lens = lone.schedule(torch.arange(num_reqs), sure)
        assert (lens.sum() == 0) if num_reqs == 1 else bool((lens == GAMMA).all()), (num_reqs, lens)


def test_fault_spec_parsing_and_validation():
    assert parse_fault_spec("nan_draft:0.5, draft-exception") == {"nan_draft": 0.5, "draft_exception": 1.0}
    assert parse_fault_spec("") == {}
    assert load_settings(environ={"DSPARK_TEST_FAULT": "garbage_confidence:0.25"}).test_fault == "garbage_confidence:0.25"
    assert load_settings(environ={}).test_fault is None  # unset: the worker builds no injector
    for bad, message in [("nan_drafts", "unknown fault"), ("nan_draft:0", r"\(0, 1\]"), ("nan_draft:1.5", r"\(0, 1\]"),
                         ("nan_draft:x", r"\(0, 1\]"), ("nan_draft:nan", r"\(0, 1\]"),
                         ("nan_draft,nan_draft:0.5", "twice")]:
        with pytest.raises(PluginSettingsError, match=message):
            load_settings(environ={"DSPARK_TEST_FAULT": bad})


def test_injected_faults_are_all_caught_by_the_guards():
    inj = FaultInjector({"nan_draft": 0.5, "garbage_confidence": 0.5}, seed=3)
    caught = {"nan_draft": 0, "garbage_confidence": 0}
    for seed in range(40):
        b = inj.corrupt_block(block(num_reqs=4, seed=seed))
        caught["nan_draft"] += int((usable_draft_prefix(b.probs, b.tokens, VOCAB) < GAMMA).sum())
        _, garbage = sanitize_confidences(inj.corrupt_confidences(torch.rand(4, GAMMA)))
        caught["garbage_confidence"] += int(garbage.sum())
    assert caught == inj.injected and min(caught.values()) > 40  # ~80 each expected
    # Seeded: the same spec and seed inject the same faults.
    again = FaultInjector({"nan_draft": 0.5, "garbage_confidence": 0.5}, seed=3)
    for seed in range(40):
        again.corrupt_block(block(num_reqs=4, seed=seed))
        again.corrupt_confidences(torch.rand(4, GAMMA))
    assert again.injected == inj.injected
    raising = FaultInjector({"draft_exception": 1.0})
    with pytest.raises(InjectedFault):
        raising.maybe_raise(3)
    assert raising.injected == {"draft_exception": 3}  # request-rounds, as the worker counts its fallbacks
    FaultInjector({"nan_draft": 1.0}).maybe_raise(3)  # no exception fault configured: never raises


def test_fault_is_counted_per_kind_and_logged_once(caplog):
    stats = WorkerStats(gamma=GAMMA, log_every=0)
    with caplog.at_level(logging.WARNING, logger="dspark_sglang"):
        for _ in range(5):
            stats.fault("nan_draft", 2)
        stats.fault("draft_exception", 3, RuntimeError("boom"))
        stats.fault("draft_exception", 3, RuntimeError("boom"))
    assert stats.faults == {"nan_draft": 10, "draft_exception": 6}
    assert stats.as_dict()["faults"] == stats.faults and "fallbacks" in stats.summary()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "nan_draft" in messages[0] and "boom" in messages[1]


class _Drafter:
    """Proposes a fixed block (or raises), like a drafter gone wrong."""

    def __init__(self, result):
        self.result = result

    def propose(self, *args, **kwargs):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def draft_step_worker(result, scheduler="verify_all", faults=None):
    from dspark_sglang.sglang.worker import DSparkPluginWorker

    worker = DSparkPluginWorker.__new__(DSparkPluginWorker)  # only the draft step
    worker.drafter, worker.gamma, worker.vocab_size = _Drafter(result), GAMMA, VOCAB
    worker.device, worker.generator, worker.sts = torch.device("cpu"), None, None
    worker.scheduler = make_scheduler(scheduler)
    worker.stats, worker.faults = WorkerStats(GAMMA, log_every=0), faults
    worker.draft_cost = MeasuredDraftCost()
    return worker


def draft_step(worker, num_reqs):
    slots = torch.arange(num_reqs)
    return worker._draft_step(slots.tolist(), slots, torch.zeros(num_reqs, dtype=torch.int64),
                              torch.full((num_reqs,), 7), SimpleNamespace())


def test_draft_step_cuts_broken_requests_only_and_counts_them():
    b = block(num_reqs=3)
    b.probs[0] = math.nan  # request 0: NaN from the first draft -> plain decoding
    b.probs[1, 2:] = math.inf  # request 1: the first two drafts stay verifiable
    b.confidence_logits[2, 1] = math.nan  # request 2: garbage confidence (sigmoid(NaN) = NaN)
    worker = draft_step_worker(b)
    out, lens = draft_step(worker, 3)
    assert lens.tolist() == [0, 2, GAMMA]  # verify_all ignores confidences; the cut still holds
    assert worker.stats.faults == {"nan_draft": 2, "garbage_confidence": 1}
    assert bool(torch.isfinite(out.probs).all())  # nothing non-finite travels on to acceptance


def test_draft_step_feeds_the_draft_cost():
    worker = draft_step_worker(block(num_reqs=3))
    for _ in range(6):
        draft_step(worker, 3)
    assert worker.draft_cost.count == 6 and worker.draft_cost.seconds(3) > 0


def test_draft_step_exceptions_propagate_to_the_round_fallback():
    # _decode_round catches them (verify length 0 for the whole round, e2e-tested); the draft step
    # itself must not swallow them or count anything.
    worker = draft_step_worker(RuntimeError("drafter crashed"))
    with pytest.raises(RuntimeError, match="drafter crashed"):
        draft_step(worker, 2)
    worker = draft_step_worker(block(num_reqs=2), faults=FaultInjector({"draft_exception": 1.0}))
    with pytest.raises(InjectedFault):
        draft_step(worker, 2)
    assert worker.stats.faults == {}


def test_healthy_draft_step_is_untouched():
    b = block(num_reqs=3)
    worker = draft_step_worker(b, scheduler="verify_all")
    out, lens = draft_step(worker, 3)
    assert lens.tolist() == [GAMMA] * 3 and worker.stats.faults == {}
    assert out is b  # no copy on the healthy path


def test_a_round_without_drafts_holds_no_vocabulary_sized_block():
    # batch 128, gamma 15, a 152k vocabulary: a materialized [R, gamma, V] float32 zero block would be
    # 1.2 GB, held for the server's life. The block is a broadcast view of one zero row instead.
    from dspark_sglang.sglang.worker import DSparkPluginWorker

    worker = DSparkPluginWorker.__new__(DSparkPluginWorker)
    worker.gamma, worker.vocab_size, worker.device, worker._zero_block = 15, 152_064, torch.device("cpu"), None
    block = worker._no_drafts(128)
    assert block.probs.shape == (128, 15, 152_064) and block.tokens.shape == (128, 15)
    assert block.probs.untyped_storage().nbytes() == 152_064 * 4  # one row of float32
    assert block.probs[:, :0].contiguous().numel() == 0  # what acceptance reads when nothing is verified
    assert worker._no_drafts(64).probs.untyped_storage().data_ptr() == block.probs.untyped_storage().data_ptr()


def test_an_idle_batch_is_a_round_without_requests():
    # Attention-DP ranks without work get IDLE batches; the target's forward must still run (the
    # busy ranks' collectives wait for it), and the round commits nothing.
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dspark_sglang.sglang.worker import DSparkPluginWorker

    calls = []
    worker = DSparkPluginWorker.__new__(DSparkPluginWorker)
    worker._target_worker = SimpleNamespace(forward_batch_generation=lambda batch: calls.append(batch))
    worker.device, worker.speculative_num_draft_tokens, worker.sync_log = torch.device("cpu"), 4, None
    batch = SimpleNamespace(forward_mode=ForwardMode.IDLE, seq_lens=torch.empty(0, dtype=torch.int64), reqs=[])
    published = []
    result = worker.forward_batch_generation(batch, on_publish=published.append)
    assert calls == [batch] and len(published) == 1
    assert result.next_token_ids.numel() == 0 and result.accept_lens.numel() == 0
    assert result.speculative_num_draft_tokens == 4 and not result.can_run_cuda_graph


def test_vocabulary_parallel_tables_are_gathered_whole():
    from dspark_sglang.sglang.tensor_parallel import full_vocab_rows

    full = torch.randn(10, 4)  # a padded vocabulary of 10 rows, 9 real tokens, two TP ranks
    shards = [full[:5], full[5:]]

    class TwoRanks:  # SGLang's GroupCoordinator.all_gather, as rank 0 sees it
        world_size = 2

        def all_gather(self, local, dim):
            assert torch.equal(local, shards[0]) and dim == 0
            return torch.cat(shards, dim=0)

    assert torch.equal(full_vocab_rows(shards[0], 9, TwoRanks()), full[:9])
    assert torch.equal(full_vocab_rows(full, 9, None), full[:9])  # no TP: the table itself
    with pytest.raises(ValueError, match="cannot cover"):
        full_vocab_rows(shards[0], 9, None)  # a shard alone is refused, never silently used
