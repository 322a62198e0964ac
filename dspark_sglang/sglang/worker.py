"""`DSparkPluginWorker`: the speculative worker SGLang's scheduler drives for DSPARK / DSPARK_PLUGIN.

Synchronous ("spec V2" without overlap): each call handles one scheduler batch.

Prefill (EXTEND batch): the target runs as usual (SGLang samples the first token) while capturing
the drafter's target layers; the features of every newly computed position go into the drafter's
context cache.

Decode round (DECODE batch, KV slots already reserved by the scheduler):
1. the drafter proposes a full block of gamma drafts per request (q and confidences with it);
2. confidences -> verify length per request (the configured lossless scheduler);
3. one target EXTEND forward over every request's [anchor, x_1..x_len] (verify.py; a plain DECODE forward
   when no request verifies a draft);
4. chain acceptance (lossless speculative sampling, seeded uniforms);
5. commit: accepted drafts + one target token per request; the drafter gets the target features
   of [anchor, accepted drafts] (the new anchor has none yet).

The scheduler consumes `next_token_ids` ([bs * stride], first accept_len of each row valid),
`accept_lens`, `new_seq_lens`, and handles EOS / stop / max_new_tokens inside an accepted run.

Per-request logit adjustments stay exact (logit_adjust.py): logit_bias applies to every verify row;
requests with penalties, a grammar or a custom logit processor are verified with length 0 (plain
decoding for that request, adjusted by SGLang's own code). Decode-round logprobs (committed tokens,
top-k, token ids) are raw-logit logprobs, like SGLang's default. return_hidden_states is served for every
committed token, in prefill and decode, from the same forward (verify.plain_hidden_states).
A radix-cache prefix hit gives the drafter zero features for the cached prefix (lossless, lower acceptance).
"""

from __future__ import annotations

import logging
import time

import torch

from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import (
    CaptureHiddenMode,
    get_required_capture_hidden_mode,
    get_server_return_hidden_states_mode,
)
from sglang.srt.runtime_context import get_parallel, get_serving, get_spec
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

# Fused Triton kernel on CUDA tensors, the torch reference otherwise (DSPARK_KERNELS=auto|triton|torch).
from dspark_sglang.acceptance import AcceptanceResult, greedy_chain_accept
from dspark_sglang.kernels import dispatch as kernel_dispatch
from dspark_sglang.kernels.dispatch import chain_accept
from dspark_sglang.confidence import ProposalProbEstimator, StsCalibration, head_less_feature
from dspark_sglang.cost_table import from_probes, load_cost_table
from dspark_sglang.draft_cost import parse_draft_cost
from dspark_sglang.drafters.interface import DraftBlock, TargetSpec
from dspark_sglang.drafters.loader import load_drafter
from dspark_sglang.host_syncs import HostSyncCounter, RoundSyncLog
from dspark_sglang.request_control import verify_cap
from dspark_sglang.sampling import GREEDY_EPS, SamplingBatch, process_logits, sanitize_logits
from dspark_sglang.schedulers import make_scheduler
from dspark_sglang.sglang import cpu_gemm, test_breaks
from dspark_sglang.sglang.feature_pool import KvSlotFeatures, kv_slot_count
from dspark_sglang.sglang.guards import FaultInjector, sanitize_confidences, usable_draft_prefix
from dspark_sglang.sglang.logit_adjust import adjust_verify_logits, has_adjustments, plain_decoding_rows
from dspark_sglang.sglang.round_probe import RoundProbe
from dspark_sglang.sglang.settings import parse_fault_spec
from dspark_sglang.sglang.spec_class import resolve_plugin_config
from dspark_sglang.sglang.state import RoundRelay, SlotRegistry, WorkerStats
from dspark_sglang.sglang.tensor_parallel import full_vocab_rows
from dspark_sglang.sglang.verify import (
    every_position_logits,
    fast_verify_attention,
    capture_target_layers,
    layout_windows,
    lm_head_weight,
    plain_hidden_states,
    turn_into_verify_extend,
)
from dspark_sglang.verify_tiers import parse_tiers, pick_width

logger = logging.getLogger("dspark_sglang")


def sampling_batch(sampling_info) -> SamplingBatch:
    """SGLang's per-request sampling parameters, [bs] each.

    SGLang rewrites a greedy request to (temperature 1, top_k 1). We hand greedy rows on as
    (temperature 0, top_k off): the same rows are greedy (`sampling.is_greedy`), and the top-k sort
    over the whole vocabulary is skipped when no sampled row needs it.
    """
    temperatures = sampling_info.temperatures.reshape(-1).float()
    top_ks = sampling_info.top_ks.reshape(-1).long()
    greedy = (temperatures < GREEDY_EPS) | (top_ks == 1)
    # SGLang's host flags say whether any row filters (a greedy row's top_k of 1 counts as top-k).
    flags = ("need_top_k_sampling", "need_top_p_sampling", "need_min_p_sampling", "is_all_greedy")
    filtering = all_greedy = None
    if all(isinstance(getattr(sampling_info, f, None), bool) for f in flags):
        all_greedy = sampling_info.is_all_greedy  # every request has top_k 1 (greedy ones are rewritten so)
        filtering = not all_greedy and (
            sampling_info.need_top_k_sampling or sampling_info.need_top_p_sampling or sampling_info.need_min_p_sampling)
    return SamplingBatch(
        temperatures=torch.where(greedy, 0.0, temperatures),
        top_ks=torch.where(greedy, -1, top_ks),
        top_ps=torch.where(greedy, 1.0, sampling_info.top_ps.reshape(-1).float()),
        min_ps=torch.where(greedy, 0.0, sampling_info.min_ps.reshape(-1).float()),
        filtering=filtering,
        all_greedy=all_greedy,
    )


def _host_pool_indices(batch) -> torch.Tensor:
    """[R] int64 request-pool rows on the host: SGLang keeps a host copy beside the device tensor."""
    host = getattr(batch, "req_pool_indices_cpu", None)
    if host is not None and host.numel() == len(batch.reqs):
        return host.to(torch.int64)
    return torch.tensor([req.req_pool_idx for req in batch.reqs], dtype=torch.int64)


def _build_scheduler(settings, gamma: int, max_verify_len: int, draft_cost):
    kind = settings.scheduler.replace("-", "_")
    if kind == "fixed":
        return make_scheduler("fixed", verify_len=min(settings.fixed_len, max_verify_len))
    if kind in ("verify_all", "none"):
        return make_scheduler(kind)
    if settings.cost_table:
        table = load_cost_table(settings.cost_table)
    else:
        # No profiled curve: a flat one, under which the throughput argmax verifies every draft
        # that has any survival (SGLang's built-in does the same without a table).
        logger.warning("dspark: no cost table (DSPARK_COST_TABLE); the %s scheduler verifies all drafts", kind)
        table = from_probes([(1, 1.0)])
        draft_cost = None  # a draft time in seconds means nothing next to a unitless flat curve
    opts = {"max_verify_len": max_verify_len}
    if kind == "lagged":
        opts["lag"] = settings.lag
        opts["draft_cost"] = draft_cost
    return make_scheduler(kind, table, **opts)


def _vocab_label(drafter) -> str:
    vocab = getattr(drafter, "draft_vocab", None)
    if vocab is not None:
        return f"{vocab.size} of {vocab.vocab_size}"
    draft_ids = getattr(drafter, "draft_ids", None)  # a SpecForge Eagle3 checkpoint's own d2t
    return f"{draft_ids.numel()} of {drafter.info.vocab_size}" if draft_ids is not None else "full"


def _committed_rows(layout, stride: int) -> torch.Tensor:
    """[R, stride] int64 on the host: the verify row that produced committed token j of request r
    (row starts[r] + j; past the window, its last row, as padding SGLang never reads)."""
    offsets = torch.arange(stride)[None, :].clamp(max=layout.widths[:, None] - 1)  # [R, stride]
    return layout.starts[:, None] + offsets


class DSparkPluginWorker(BaseSpecWorker):
    # Optional parts, off unless __init__ turns them on (class defaults keep partial constructions,
    # e.g. unit tests of one phase, from reaching __getattr__'s delegation to the target).
    probe: RoundProbe | None = None  # benchmarks/round_cost.py only
    uses_context_pool = False
    context_pool = None
    sync_log = None
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None  # the drafter is a plain module, not an SGLang worker
        self.model_runner = target_worker.model_runner
        self.device = self.model_runner.device
        self.config = resolve_plugin_config(server_args)
        settings = self.config.settings

        spec = get_spec()
        self.speculative_num_steps, self.topk = 1, 1
        # The row stride of next_token_ids, and what the KV reserve was sized from.
        self.speculative_num_draft_tokens = int(spec.speculative_num_draft_tokens)
        self.max_verify_len = self.config.max_verify_len
        if self.speculative_num_draft_tokens < self.max_verify_len + 1:
            raise ValueError(
                f"speculative_num_draft_tokens={self.speculative_num_draft_tokens} is below the verify "
                f"window {self.max_verify_len + 1}; the plugin's handle_server_args should have set it"
            )

        model = self.model_runner.model
        hf_config = self.model_runner.model_config.hf_config
        self.vocab_size = int(self.model_runner.model_config.vocab_size)
        tp_group = get_parallel().tp_group  # vocabulary-parallel tables are gathered whole on every rank
        target = TargetSpec(
            hidden_size=int(hf_config.hidden_size),
            vocab_size=self.vocab_size,
            num_hidden_layers=int(hf_config.num_hidden_layers),
            embed_tokens=full_vocab_rows(model.model.embed_tokens.weight, self.vocab_size, tp_group),
            lm_head=full_vocab_rows(lm_head_weight(model), self.vocab_size, tp_group),
        )
        t0 = time.perf_counter()
        self.drafter = load_drafter(self.config.drafter_path, target, dtype=self.model_runner.dtype, device=self.device,
                                    draft_vocab=settings.draft_vocab)
        if hasattr(self.drafter, "use_kernels"):
            # Fused Triton block attention + sequential head on CUDA tensors; torch references on CPU.
            self.drafter.use_kernels(kernel_dispatch.block_attention, kernel_dispatch.sample_sequential,
                                     kernel_dispatch.paged_block_attention)
        self._weight_load_time = time.perf_counter() - t0
        self.gamma = self.drafter.info.gamma
        capture_target_layers(model, self.drafter.info.target_layer_ids)
        # Fixed-width verify tiers (static shapes for graphs), or None: ragged windows.
        self.verify_tiers = parse_tiers(settings.verify_tiers, min(self.gamma, self.max_verify_len))

        # What a draft step costs (measured online by default): the lagged budget weighs it, and
        # skips drafting where it does not pay (on a CPU a draft step costs about a target step).
        self.draft_cost = parse_draft_cost(settings.draft_cost)
        self.scheduler = _build_scheduler(settings, self.gamma, self.max_verify_len, self.draft_cost)
        # The scheduler runs on the host on every server, on one copy of the confidences per round:
        # compile its fused CPU path now, not in the first round.
        t0 = time.perf_counter()
        self.scheduler.warm_up()
        logger.info("dspark worker: scheduler warmed up in %.1f s", time.perf_counter() - t0)
        self.sts = StsCalibration.load(settings.sts) if settings.sts else None
        if self.sts is not None and self.sts.gamma != self.gamma:
            raise ValueError(f"{settings.sts}: {self.sts.gamma} STS temperatures for a drafter of gamma {self.gamma}")
        self.estimator = (
            ProposalProbEstimator.load(settings.estimator) if settings.estimator
            else ProposalProbEstimator.identity(self.gamma)
        )
        if self.estimator.gamma != self.gamma:
            raise ValueError(f"{settings.estimator}: estimator for {self.estimator.gamma} positions, drafter gamma {self.gamma}")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(settings.seed)
        self.slots = SlotRegistry(self._release_slot)
        # [pool rows] int64 on the host: each request's verify-length cap (custom_params, read once at
        # prefill), indexed by its request-pool row like everything else per request; grown on demand.
        self.verify_caps = torch.empty(0, dtype=torch.int64)
        HostSyncCounter.mark_host(self.verify_caps)
        self.stats = WorkerStats(self.gamma, log_every=settings.stats_every, sink=self._prometheus_sink(server_args))
        faults = parse_fault_spec(settings.test_fault or "")
        self.faults = FaultInjector(faults, seed=settings.seed) if faults else None
        if self.faults is not None:
            logger.warning("dspark: DSPARK_TEST_FAULT=%s: injecting faults (testing only)", settings.test_fault)
        self.test_break = settings.test_break  # None in production: a negative control's wrong acceptance
        if self.test_break is not None:
            logger.warning("dspark: DSPARK_TEST_BREAK=%s: acceptance is WRONG ON PURPOSE (testing only)", self.test_break)
        self.probe = RoundProbe.from_env()  # benchmarks/round_cost.py only; None otherwise
        self.sync_log = RoundSyncLog.from_env()  # DSPARK_COUNT_HOST_SYNCS=1; None otherwise
        if self.probe is not None:
            logger.warning("dspark: round-cost probe on (verify windows %s): benchmarking only", self.probe.windows)
        self._warned_prefix = False
        self._zero_block: DraftBlock | None = None  # reused by _no_drafts, grown on demand
        # Block drafters keep their context K/V in a pool indexed by SGLang's KV slots (built with the
        # first prefill, when SGLang's pool exists); a radix-cache hit finds the prefix's rows there.
        self.uses_context_pool = hasattr(self.drafter, "use_kv_slot_context")
        self.context_pool = None
        # Other drafters (Eagle3) keep per-request caches; with the radix cache kept on, their
        # target features live next to the KV they belong to (feature_pool.py).
        self.kv_features = (
            KvSlotFeatures(lambda: kv_slot_count(self.model_runner), self.model_runner.dtype, self.device)
            if settings.keep_radix_cache and not self.uses_context_pool else None
        )
        logger.info(
            "dspark worker: drafter %s (%s/%s, gamma %d, layers %s, draft vocabulary %s) loaded in %.1f s; "
            "scheduler %s, max verify %d, STS %s",
            self.config.drafter_path, self.drafter.info.family, self.drafter.info.format, self.gamma,
            list(self.drafter.info.target_layer_ids), _vocab_label(self.drafter), self._weight_load_time,
            settings.scheduler, self.max_verify_len, settings.sts or "none",
        )
        if self.verify_tiers is not None:
            logger.info("dspark worker: fixed-width verify tiers %s (rows past a request's verify length are "
                        "computed and ignored)", list(self.verify_tiers))

    def _prometheus_sink(self, server_args):
        """The worker's series in SGLang's /metrics, when the server exports metrics (prometheus.py)."""
        if not getattr(server_args, "enable_metrics", False):
            return None
        from dspark_sglang.sglang.prometheus import PrometheusCounters

        # The label SGLang's own sglang:* series carry, so dashboards join them.
        return PrometheusCounters(self.gamma, {"model_name": str(get_serving().served_model_name)})

    # ---- what the scheduler reads besides forward_batch_generation ----------------------------

    @property
    def weight_load_time(self) -> float:
        return self._weight_load_time

    def dspark_plugin_stats(self) -> dict:
        """The worker's counters, for `/server_info` (plugin.py hooks them into internal_states)."""
        stats = self.stats.as_dict()
        weighed = getattr(self.scheduler, "draft_cost", None) is not None
        stats["draft_cost"] = self.draft_cost.describe() if weighed else "not weighed by this scheduler"
        if self.faults is not None:
            stats["faults_injected"] = dict(self.faults.injected)
        if self.probe is not None:
            stats["round_probe"] = self.probe.as_dict()
        if self.sync_log is not None:
            stats["host_syncs"] = self.sync_log.as_dict()
        stats["cpu_gemm"] = cpu_gemm.active_kernel()
        stats["verify_tiers"] = list(self.verify_tiers) if self.verify_tiers is not None else "off"
        if self.context_pool is not None:
            stats["context_pool"] = {"bytes": self.context_pool.nbytes, "bytes_per_kv_slot": self.context_pool.bytes_per_slot,
                                     "kv_slots": int(self.context_pool.keys.shape[1])}
        return stats

    def clear_cache_pool(self) -> None:
        self.slots.clear()

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        self.slots.release_rid(rid)

    def __getattr__(self, name: str):
        # Anything else the scheduler asks a worker for (e.g. get_memory_pool) is the target's.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._target_worker, name)

    def _release_slot(self, slot: int) -> None:
        self.drafter.release(slot)
        self.scheduler.release(torch.tensor([slot], dtype=torch.int64))

    # ---- forward -------------------------------------------------------------------------------

    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        if batch.forward_mode.is_extend():
            result = self._prefill(batch)
        elif batch.forward_mode.is_decode():
            if self.sync_log is None:
                result = self._decode_round(batch)
            else:  # benchmarks and tests: count the round's host syncs (host_syncs.py)
                with self.sync_log.counter() as counter:
                    HostSyncCounter.mark_host(batch.seq_lens_cpu, getattr(batch, "req_pool_indices_cpu", None))
                    result = self._decode_round(batch)
                self.sync_log.record(counter, len(batch.reqs))
        elif batch.forward_mode.is_idle():
            result = self._idle_round(batch)
        else:
            raise NotImplementedError(f"dspark worker: forward mode {batch.forward_mode!r}")
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        return result

    @torch.no_grad()
    def _idle_round(self, batch) -> GenerationBatchResult:
        """A round with no requests (an attention-DP rank without work this step). The target still
        runs its IDLE forward, so this rank joins the collectives of the busy ranks' forward; nothing
        is drafted, verified or committed."""
        self.target_worker.forward_batch_generation(batch)
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        return GenerationBatchResult(
            logits_output=None,
            next_token_ids=empty,
            accept_lens=empty.to(torch.int32),
            new_seq_lens=batch.seq_lens,
            next_draft_input=RoundRelay(),
            speculative_num_draft_tokens=self.speculative_num_draft_tokens,
            can_run_cuda_graph=False,
        )

    @torch.no_grad()
    def _prefill(self, batch) -> GenerationBatchResult:
        want_hidden = bool(batch.return_hidden_states)  # some request asked for return_hidden_states
        with plain_hidden_states(self.model_runner.model, active=want_hidden) as hidden:
            result = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.FULL)
        out = result.logits_output
        if self.uses_context_pool:
            self._prefill_context_pool(batch, out.hidden_states)  # [T, k*H] packed target features
        else:
            self._append_prefill_context(batch, out.hidden_states)
        if self.kv_features is not None:
            self.kv_features.write(batch.out_cache_loc, out.hidden_states)
        out.hidden_states = self._prefill_hidden_rows(batch, hidden.rows) if want_hidden else None
        out.last_hidden_states = None
        self._note_request_caps(batch.reqs, _host_pool_indices(batch).tolist())
        bs = len(batch.reqs)
        result.accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        result.new_seq_lens = batch.seq_lens  # unchanged: the scheduler skips the copy
        result.next_draft_input = RoundRelay()
        result.speculative_num_draft_tokens = self.speculative_num_draft_tokens
        return result

    @staticmethod
    def _prefill_hidden_rows(batch, rows: torch.Tensor) -> torch.Tensor:
        """The rows SGLang's prefill output processing reads: every extended position ([T, H]) when it
        captures FULL, else each request's last one ([R, H]), as its own forward would have kept."""
        mode = get_required_capture_hidden_mode(
            max(batch.return_hidden_states_mode, get_server_return_hidden_states_mode()), batch.spec_info)
        if mode.is_full():
            return rows
        ends = torch.cumsum(torch.as_tensor(batch.extend_lens, dtype=torch.int64), 0) - 1  # [R]
        return rows[ends.to(rows.device)]

    def _note_request_caps(self, reqs, pool_rows: list[int]) -> None:
        """Each request's verify-length cap from its custom_params (validated when it arrived)."""
        for req, row in zip(reqs, pool_rows):
            try:
                cap = verify_cap(getattr(req.sampling_params, "custom_params", None))
            except ValueError as exc:  # only a path around SGLang's request check gets here: never crash
                logger.warning("dspark: request %s: %s; served without a cap", req.rid, exc)
                cap = None
            if row >= self.verify_caps.numel():
                grown = torch.full((max(2 * row + 1, 64),), self.max_verify_len, dtype=torch.int64)
                grown[: self.verify_caps.numel()] = self.verify_caps
                self.verify_caps = grown
                HostSyncCounter.mark_host(grown)  # a host table: reading it never waits on a GPU
            self.verify_caps[row] = self.max_verify_len if cap is None else min(cap, self.max_verify_len)

    def _ensure_context_pool(self, batch):
        if self.context_pool is None:
            self.context_pool = self.drafter.use_kv_slot_context(
                kv_slot_count(self.model_runner), batch.req_to_token_pool.req_to_token)
            logger.info("dspark: drafter context in a KV-slot pool: %d slots x %d bytes = %.1f MB",
                        self.context_pool.keys.shape[1], self.context_pool.bytes_per_slot, self.context_pool.nbytes / 2**20)
        return self.context_pool

    def _write_context_rows(self, pool, features: torch.Tensor, kv_slots: torch.Tensor, starts: torch.Tensor,
                            counts: torch.Tensor) -> None:
        """Drafter K/V of T rows (request r's rows at positions starts[r] .. starts[r] + counts[r] - 1)
        computed in one batch and stored at their KV slots. features [T, k*H], kv_slots [T]."""
        row_offsets = torch.cumsum(counts, 0) - counts  # [R] first row of each request
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(row_offsets, counts)  # [T]
        positions = torch.repeat_interleave(starts, counts) + within  # [T]
        keys, values = self.drafter.context_rows(features, positions)
        pool.write_rows(kv_slots, keys, values)

    def _prefill_context_pool(self, batch, features: torch.Tensor) -> None:
        """Prefill into the KV-slot pool: every computed position's rows at its KV slot; a cached
        prefix (radix-cache hit) is adopted as it stands, its rows written by the forward that computed it."""
        pool = self._ensure_context_pool(batch)
        prefix = torch.as_tensor(batch.prefix_lens, dtype=torch.int64)  # [R]
        extend = torch.as_tensor(batch.extend_lens, dtype=torch.int64)  # [R]
        self._write_context_rows(pool, features, batch.out_cache_loc, prefix, extend)
        for req, slot, p, n in zip(batch.reqs, batch.req_pool_indices.tolist(), prefix.tolist(), extend.tolist()):
            self.slots.claim(slot, req.rid)
            have = pool.length(slot)
            if have < p:
                self.stats.prefix_rows_adopted += p - have
            pool.set_length(slot, p + n)

    def _append_prefill_context(self, batch, features: torch.Tensor) -> None:
        """Give the drafter the target features of every position this extend computed.

        Chunked prefill continues a request's context chunk by chunk. A prefix the drafter has not
        seen (a radix-cache hit) gets its features from the KV-slot store when the radix cache is
        kept (feature_pool.py), else zeros: drafts get worse, outputs stay exact.
        """
        slots, feats, positions, tokens = [], [], [], []
        input_ids = batch.input_ids.to(torch.int64)
        pool_indices = batch.req_pool_indices.tolist()
        offset = 0
        for i, req in enumerate(batch.reqs):
            n, prefix, slot = int(batch.extend_lens[i]), int(batch.prefix_lens[i]), pool_indices[i]
            rows, toks = features[offset : offset + n], input_ids[offset : offset + n]
            offset += n
            self.slots.claim(slot, req.rid)
            have = self.drafter.context_length(slot)
            if have > prefix:
                self.drafter.truncate_context(slot, prefix)
                have = prefix
            if have < prefix:
                missing = torch.tensor(list(req.full_untruncated_fill_ids[have:prefix]), dtype=torch.int64)
                rows = torch.cat([self._cached_prefix_features(batch, slot, have, prefix, rows), rows])
                toks = torch.cat([missing.to(toks.device), toks])
            slots.append(slot)
            feats.append(rows)
            positions.append(torch.arange(have, prefix + n, dtype=torch.int64))
            tokens.append(toks)
        self.drafter.append_context(slots, feats, positions, tokens)

    def _cached_prefix_features(self, batch, slot: int, have: int, prefix: int, like: torch.Tensor) -> torch.Tensor:
        """[prefix - have, k*H] features of cached positions have..prefix-1 of request slot `slot`."""
        if self.kv_features is not None:
            kv_slots = batch.req_to_token_pool.req_to_token[slot, have:prefix]
            stored = self.kv_features.read(kv_slots)
            if stored is not None:
                self.stats.prefix_features_reused += prefix - have
                return stored.to(like.dtype)
        self.stats.prefill_fallbacks += 1
        if not self._warned_prefix:
            logger.warning("dspark: cached prefix without drafter features (radix hit?); using zeros")
            self._warned_prefix = True
        return like.new_zeros(prefix - have, like.shape[1])

    def _confidences(self, block) -> torch.Tensor:
        """[R, gamma] calibrated P(x_k accepted | x_<k accepted); reads x_<k only."""
        if block.confidence_logits is not None:
            raw = block.confidence_logits.float()
            return self.sts.apply(raw) if self.sts is not None else torch.sigmoid(raw)
        return self.estimator.confidences(head_less_feature(block))

    def _draft_step(self, slots, slots_cpu, anchors, seq_lens, sampling) -> tuple[DraftBlock, torch.Tensor]:
        """Draft a block and schedule it: (block, [R] int64 CPU verify lengths before per-request caps).

        Guards (guards.py) cut each chain before its first non-finite draft distribution and
        sanitize the confidences; either fault is counted per request-round.
        """
        if self.probe is None and self.scheduler.skip_round(slots_cpu):
            # Judged on earlier rounds alone, drafting does not pay this round (no draft would be
            # verified, or the draft step costs more than its drafts bring): do not draft.
            # Lossless: decided before drafting.
            self.stats.skip_drafting("did_not_pay")
            return self._no_drafts(len(slots)), torch.zeros(len(slots), dtype=torch.int64)
        faults = self.faults  # None unless DSPARK_TEST_FAULT is set: the production path skips it
        t0 = time.perf_counter()
        block = self.drafter.propose(slots, anchors.to(self.device), seq_lens.to(self.device), sampling, self.generator)
        if faults is not None:
            faults.maybe_raise(len(slots))
            faults.maybe_extra_sync(block.probs)
            block = faults.corrupt_block(block)
        usable = usable_draft_prefix(block.probs, block.tokens, self.vocab_size)  # [R]
        confidences = self._confidences(block)  # [R, gamma]
        if faults is not None:
            confidences = faults.corrupt_confidences(confidences)
        confidences, garbage = sanitize_confidences(confidences)  # [R, gamma], [R] bool
        # The round's first host sync, its only one before the verify: the scheduler runs on the host,
        # on one copy of what it needs and of the guards' verdicts. [R, gamma + 2]
        packed = torch.cat([confidences, usable[:, None].float(), garbage[:, None].float()], dim=1).to("cpu")
        usable_cpu, garbage_cpu = packed[:, self.gamma].long(), packed[:, self.gamma + 1] > 0
        # Unusable drafts get confidence 0, so the budget goes to other requests' drafts; the cap
        # below also holds for schedulers that ignore confidences (fixed, verify_all).
        unusable_cpu = torch.arange(self.gamma)[None, :] >= usable_cpu[:, None]  # [R, gamma]
        confidences = packed[:, : self.gamma].masked_fill(unusable_cpu, 0.0)
        verify_lens = self.scheduler.schedule(slots_cpu, confidences).to(torch.int64)
        HostSyncCounter.mark_host(verify_lens)  # host in, host out (its own factories name a device)
        if self.probe is not None:  # the probe's window, from the round count only
            verify_lens = torch.full_like(verify_lens, self.probe.window() - 1)
        verify_lens = torch.minimum(verify_lens, usable_cpu)
        broken, bad_conf = int((usable_cpu < self.gamma).sum()), int(garbage_cpu.sum())
        # What a skipped draft step saves (after the sync, so a GPU's queued work is counted too).
        self.draft_cost.observe(len(slots), time.perf_counter() - t0)
        if broken:
            self.stats.fault("nan_draft", broken)
            # Zero the unusable rows: verification never reads them, but no NaN should travel on.
            unusable = unusable_cpu.to(block.probs.device)
            block = DraftBlock(block.tokens, block.probs.masked_fill(unusable[..., None], 0.0),
                               block.token_probs.masked_fill(unusable, 0.0), block.confidence_logits,
                               block.top1_probs)
        if bad_conf:
            self.stats.fault("garbage_confidence", bad_conf)
        return block, verify_lens

    def _no_drafts(self, num_reqs: int) -> DraftBlock:
        """A zero block for a round that verifies nothing. Its values are never read or written: the
        probabilities are one zero row broadcast to [R, gamma, V] (a view: no vocabulary-sized memory),
        and the small tensors are one buffer reused by every such round."""
        zero = self._zero_block
        if zero is None or zero.tokens.shape[0] < num_reqs:
            rows = max(num_reqs, 2 * (0 if zero is None else zero.tokens.shape[0]))
            zero = self._zero_block = DraftBlock(
                tokens=torch.zeros(rows, self.gamma, dtype=torch.int64, device=self.device),
                probs=torch.zeros(1, 1, self.vocab_size, device=self.device).expand(rows, self.gamma, -1),
                token_probs=torch.zeros(rows, self.gamma, device=self.device),
                confidence_logits=None,
            )
        return DraftBlock(zero.tokens[:num_reqs], zero.probs[:num_reqs], zero.token_probs[:num_reqs], None)

    def _remaining_budget(self, reqs) -> torch.Tensor:
        """[R] drafts that could still be emitted after this round's target token: verifying more
        is wasted work. Depends on lengths only (never on draft values): lossless."""
        left = [req.sampling_params.max_new_tokens - len(req.output_ids) - 1 for req in reqs]
        return torch.tensor(left, dtype=torch.int64).clamp_min(0)

    @torch.no_grad()
    def _decode_round(self, batch) -> GenerationBatchResult:
        start = time.perf_counter()
        reqs = batch.reqs
        num_reqs = len(reqs)
        slots_cpu = _host_pool_indices(batch)  # [R] int64 on the host
        slots = slots_cpu.tolist()
        seq_lens_dev = batch.seq_lens
        seq_lens = (batch.seq_lens_cpu if batch.seq_lens_cpu is not None else seq_lens_dev.cpu()).to(torch.int64)
        anchors = torch.tensor([req.output_ids[-1] for req in reqs], dtype=torch.int64)  # [R]
        sampling = sampling_batch(batch.sampling_info)
        greedy = sampling.is_greedy()  # [R]
        if self.probe is not None:  # the plain decode step of this very batch, timed apart (benchmarks only)
            so_far = time.perf_counter() - start
            idle = torch.zeros(num_reqs, dtype=torch.int64)
            plain_seconds = self.probe.time_plain_decode(
                self.target_worker, batch, layout_windows(anchors, idle[:, None].expand(-1, self.gamma), idle, seq_lens),
                slots_cpu)
            start = time.perf_counter() - so_far

        # 1-2. draft a full block, then choose how many drafts to verify. A failure anywhere in this
        # step costs the round its speculation, never the round: verify nothing, commit the target's token.
        # Per-request caps known before drafting (custom_params, lengths, SGLang's logit adjustments):
        # lossless, and when no request may verify a draft the draft step is not run at all.
        plain = plain_decoding_rows(reqs)  # [R] penalties / grammar / custom processors: exact only unspeculated
        caps = torch.minimum(self.verify_caps[slots_cpu], self._remaining_budget(reqs)).masked_fill(plain, 0)  # [R]
        if not bool(caps.any()):
            self.stats.skip_drafting("caps")
            block, verify_lens = self._no_drafts(num_reqs), torch.zeros(num_reqs, dtype=torch.int64)
        else:
            try:
                block, verify_lens = self._draft_step(slots, slots_cpu, anchors, seq_lens, sampling)
            except Exception as exc:  # noqa: BLE001 - any drafter/scheduler failure
                self.stats.fault("draft_exception", num_reqs, exc)
                block, verify_lens = self._no_drafts(num_reqs), torch.zeros(num_reqs, dtype=torch.int64)
        verify_lens = torch.minimum(verify_lens.clamp(0, self.max_verify_len), caps)
        drafts = block.tokens
        if self._tp_size > 1:  # rank 0's verify lengths and drafts (a device broadcast, then a host copy)
            verify_lens, drafts = self._tp_agree(verify_lens, drafts)
            verify_lens = verify_lens.to("cpu")
        t_draft = time.perf_counter()

        # 3. one EXTEND forward over the windows [anchor, x_1..x_len]: ragged, or all as wide as the
        # round's verify tier (rows past a request's length are computed and never accepted).
        width = None if self.verify_tiers is None else pick_width(int(verify_lens.max()) + 1, self.verify_tiers)
        layout = layout_windows(anchors.to(self.device), drafts, verify_lens, seq_lens, width=width)
        return_logprob = batch.return_logprob
        want_hidden = bool(batch.return_hidden_states)  # read before the batch becomes a verify batch
        logprob_asks = (batch.top_logprobs_nums, batch.token_ids_logprobs) if return_logprob else None
        sampling_info = batch.sampling_info
        turn_into_verify_extend(batch, layout, slots_cpu)
        extend = layout.num_tokens > num_reqs  # else a DECODE forward, whose logits are every position's
        with fast_verify_attention(self.model_runner.attn_backend), \
                every_position_logits(self.model_runner.model, active=extend), \
                plain_hidden_states(self.model_runner.model, active=want_hidden) as hidden:
            target_out = self.target_worker.forward_batch_generation(
                batch, is_verify=True, capture_hidden_mode=CaptureHiddenMode.FULL
            )
        out = target_out.logits_output
        # [T, V]; a float32 copy, since logit_bias below adjusts in place
        logits = out.next_token_logits[:, : self.vocab_size].to(torch.float32, copy=True)
        if has_adjustments(sampling_info, plain):
            adjust_verify_logits(logits, layout.starts, layout.widths, sampling_info)
        t_verify = time.perf_counter()

        # 4. lossless chain acceptance over the widest window W only (rows past each request's
        # window stay zero, never read): a round that verifies few drafts does not pay for
        # gamma + 1 rows of V probabilities per request.
        window = int(layout.widths.max())  # W = 1 + the longest verify length
        accept = self._accept(logits, layout, window, block, drafts, verify_lens, greedy, sampling)
        num_accepted, output_tokens = self._tp_agree(accept.num_accepted, accept.output_tokens)
        num_accepted_cpu = num_accepted.to("cpu", torch.int64)
        t_accept = time.perf_counter()

        # 5. commit: drafter context grows by the target features of [anchor, accepted drafts].
        features = out.hidden_states  # [T, k*H]
        commit = num_accepted_cpu + 1
        if self.uses_context_pool:
            # Every window row's K/V at its KV slot in one batch (rejected rows' slots are rewritten
            # when SGLang reuses them, as the target's K/V are); the committed rows become context.
            pool = self.context_pool
            self._write_context_rows(pool, features, batch.out_cache_loc, seq_lens, layout.widths)
            for slot, length in zip(slots, (seq_lens + commit).tolist()):
                pool.set_length(slot, length)
        else:
            if self.kv_features is not None:
                self.kv_features.write(batch.out_cache_loc, features)  # the window's KV slots, same order
            self.drafter.append_context(
                slots,
                [features[s : s + c] for s, c in zip(layout.starts.tolist(), commit.tolist())],
                [torch.arange(p, p + c) for p, c in zip(seq_lens.tolist(), commit.tolist())],
                [layout.tokens[s : s + c] for s, c in zip(layout.starts.tolist(), commit.tolist())],
            )
        stride = self.speculative_num_draft_tokens
        # SGLang reads committed token j of request r from row r * stride + j (window row j produced it).
        out.hidden_states = hidden.rows[_committed_rows(layout, stride).reshape(-1).to(hidden.rows.device)] \
            if want_hidden else None  # [R * stride, H]
        out.last_hidden_states = None

        next_tokens = output_tokens.new_zeros(num_reqs, stride)
        width = min(stride, output_tokens.shape[1])
        next_tokens[:, :width] = output_tokens[:, :width].clamp_min(0)
        accept_lens = (num_accepted + 1).to(torch.int32)
        if return_logprob:
            self._output_logprobs(out, logits, layout, next_tokens, *logprob_asks)
        t_end = time.perf_counter()
        phases = {"draft": t_draft - start, "verify": t_verify - t_draft, "accept": t_accept - t_verify,
                  "commit": t_end - t_accept}
        self.stats.record(verify_lens, num_accepted_cpu, phases, verify_rows=None if width is None else layout.num_tokens)
        if self.probe is not None:
            self.probe.record(batch=num_reqs, context_tokens=int(seq_lens.sum()), window=self.probe.window(),
                              verify_tokens=layout.num_tokens, accepted=int(num_accepted_cpu.sum()),
                              plain_decode=plain_seconds, **phases)
        return GenerationBatchResult(
            logits_output=out,
            next_token_ids=next_tokens.reshape(-1),
            accept_lens=accept_lens,
            cap_lens=(verify_lens + 1).to(torch.int32),  # verify window incl. the anchor row
            new_seq_lens=seq_lens_dev + accept_lens.to(device=seq_lens_dev.device, dtype=seq_lens_dev.dtype),
            next_draft_input=RoundRelay(),
            speculative_num_draft_tokens=stride,
            can_run_cuda_graph=False,
        )

    def _accept(self, logits, layout, window: int, block: DraftBlock, drafts, verify_lens, greedy,
                sampling: SamplingBatch) -> AcceptanceResult:
        """Chain acceptance of the round over its widest window W: logits [T, V] of the flat verify
        rows, drafts [R, gamma], verify_lens [R] on the host; output_tokens [R, W]."""
        num_reqs = drafts.shape[0]
        # Row t of the flat verify batch is cell (owner[t], offsets[t]) of the [R, W] block: host
        # indices from host lengths, so nothing here waits on the device.
        block_rows = (layout.owner * window + layout.offsets).to(self.device)
        # Uniforms drawn for the full block, so the random stream does not depend on W (nor on
        # whether this round took the greedy path).
        accept_uniforms = torch.rand(num_reqs, self.gamma, generator=self.generator, device=self.device)
        sample_uniforms = torch.rand(num_reqs, generator=self.generator, device=self.device)
        used = window - 1
        if sampling.all_greedy and self.test_break is None:
            # Every row greedy: the target's argmax per verify row is all acceptance reads (what
            # process_logits would put its one-hot at), so no [R, W, V] probabilities are built.
            row_tokens = sanitize_logits(logits).argmax(dim=-1)  # [T]
            target_tokens = row_tokens.new_zeros(num_reqs * window)  # [R * W]; cells past a window unread
            target_tokens[block_rows] = row_tokens
            accept = greedy_chain_accept(target_tokens.view(num_reqs, window), drafts[:, :used],
                                         verify_lens.to(self.device))
        else:
            owner = layout.owner.to(self.device)
            row_params = [t[owner] for t in (sampling.temperatures, sampling.top_ks, sampling.top_ps, sampling.min_ps)]
            if self.test_break is not None:
                row_params[0] = test_breaks.break_temperatures(self.test_break, row_params[0])
            probs = process_logits(logits, *row_params, filtering=sampling.filtering)  # [T, V]
            target_probs = probs.new_zeros(num_reqs * window, self.vocab_size)  # [R * W, V]
            target_probs[block_rows] = probs
            target_probs = target_probs.view(num_reqs, window, self.vocab_size)  # [R, W, V]
            accept = chain_accept(
                target_probs, drafts[:, :used].contiguous(), block.probs[:, :used].contiguous(),
                verify_lens.to(self.device), greedy, accept_uniforms[:, :used].contiguous(), sample_uniforms,
            )
            if self.test_break is not None:
                accept = test_breaks.break_residual(self.test_break, accept, target_probs, verify_lens, greedy,
                                                    sample_uniforms)
        return accept

    def _output_logprobs(
        self,
        out,
        logits: torch.Tensor,  # [T, V] verify logits
        layout,
        next_tokens: torch.Tensor,  # [R, stride] committed tokens (padding past accept_len)
        top_logprobs_nums: list[int] | None,  # [R] top-k logprobs asked per request
        token_ids_logprobs: list[list[int] | None] | None,  # [R] token ids asked per request
    ) -> None:
        """Target log-probabilities (raw logits, no temperature) of the committed tokens, plus the
        top-k and asked-for token ids of each position: output token j of request r was predicted by
        window row j. SGLang reads the top-k / token-id lists flat, entry r * stride + j."""
        rows = _committed_rows(layout, next_tokens.shape[1]).to(logits.device)  # [R, stride]
        stride = rows.shape[1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
        out.next_token_logprobs = logprobs[rows, next_tokens.to(logits.device)]  # [R, stride]
        if top_logprobs_nums and any(top_logprobs_nums):
            vals, idxs = [], []
            for r, k in enumerate(top_logprobs_nums):
                top = logprobs[rows[r]].topk(k, dim=-1) if k else None  # [stride, k]
                for j in range(stride):
                    vals.append(top.values[j] if k else logprobs.new_empty(0))
                    idxs.append(top.indices[j] if k else rows.new_empty(0))
            out.next_token_top_logprobs_val, out.next_token_top_logprobs_idx = vals, idxs
        if token_ids_logprobs and any(ids is not None for ids in token_ids_logprobs):
            vals, idxs = [], []
            for r, ids in enumerate(token_ids_logprobs):
                picked = logprobs[rows[r]][:, list(ids)] if ids else None  # [stride, n]
                for j in range(stride):
                    vals.append(picked[j] if ids else logprobs.new_empty(0))
                    idxs.append(list(ids) if ids else [])
            out.next_token_token_ids_logprobs_val, out.next_token_token_ids_logprobs_idx = vals, idxs

    @property
    def _tp_size(self) -> int:
        group = get_parallel().tp_group
        return 1 if group is None else group.world_size

    def _tp_agree(self, *tensors: torch.Tensor):
        """With tensor parallelism, every rank must commit the same tokens: rank 0 decides
        (drafts and verify lengths before the verify, acceptance after) and broadcasts."""
        group = get_parallel().tp_group
        if group is None or group.world_size <= 1:
            return tensors
        synced = []
        for t in tensors:
            t = t.to(self.device).contiguous()
            group.broadcast(t, src=0)
            synced.append(t)
        return tuple(synced)
