"""Per-request bookkeeping and worker metrics for `DSparkPluginWorker`.

Slots. The drafter's context cache and the lagged scheduler's history are keyed by SGLang's
`req_pool_idx` (a small integer reused once a request leaves). `SlotRegistry` remembers which rid
owns each slot, so a reused index (a new request, or a retracted request re-prefilled elsewhere)
starts from an empty drafter context, and so `note_request_finished(rid)` can find the slot to free.
Requests that finish at prefill (max_new_tokens=1) or are aborted before any decode round never
reach `note_request_finished`; their slot is cleared when the index is next reused.

`RoundRelay` is what the scheduler carries between rounds in `batch.spec_info`. The worker needs
nothing from it (in sync mode the anchor is `req.output_ids[-1]` and its position `seq_lens`), but
the scheduler filters and merges it with the batch, so it implements those as no-ops.
"""

from __future__ import annotations

import logging
import time

import torch

from sglang.srt.speculative.spec_info import SpecInput, SpecInputType

logger = logging.getLogger("dspark_sglang")


class RoundRelay(SpecInput):
    """Between-round marker: no forward ever runs on it (hence the PP relay type: neither a
    draft nor a verify input, so no attention backend or graph runner branches on it)."""

    def __init__(self) -> None:
        super().__init__(SpecInputType.PP_SPEC_RELAY)

    def filter_batch(self, new_indices=None, new_indices_cpu=None, **_) -> None:
        pass

    def merge_batch(self, other) -> None:
        pass


class SlotRegistry:
    """slot (req_pool_idx) <-> rid; calls `on_release(slot)` whenever a slot's owner changes."""

    def __init__(self, on_release) -> None:
        self._rid_of: dict[int, str] = {}
        self._slot_of: dict[str, int] = {}
        self._on_release = on_release

    def claim(self, slot: int, rid: str) -> bool:
        """Make `rid` the owner of `slot`. Returns True if the slot changed hands (fresh context)."""
        if self._rid_of.get(slot) == rid:
            return False
        self.release_slot(slot)
        old = self._slot_of.get(rid)
        if old is not None:  # the same request moved (retraction, then a new pool index)
            self.release_slot(old)
        self._rid_of[slot], self._slot_of[rid] = rid, slot
        return True

    def owner(self, slot: int) -> str | None:
        return self._rid_of.get(slot)

    def release_rid(self, rid: str) -> None:
        slot = self._slot_of.get(rid)
        if slot is not None:
            self.release_slot(slot)

    def release_slot(self, slot: int) -> None:
        rid = self._rid_of.pop(slot, None)
        if rid is not None:
            self._slot_of.pop(rid, None)
        self._on_release(slot)

    def clear(self) -> None:
        for slot in list(self._rid_of):
            self.release_slot(slot)

    def __len__(self) -> int:
        return len(self._rid_of)


class WorkerStats:
    """Counters over decode rounds, with a summary line logged every `log_every` rounds.

    Faults (guards.py) are counted per kind in request-rounds that fell back, and logged once per
    kind (a broken drafter would otherwise log every round); the counts appear in the periodic
    summary and in `/server_info` -> `internal_states[0]["dspark_plugin"]["faults"]` (plugin.py).
    """

    def __init__(self, gamma: int, log_every: int = 200, sink=None) -> None:
        self.gamma, self.log_every = gamma, log_every
        self.sink = sink  # prometheus.PrometheusCounters when the server exports metrics, else None
        self.rounds = 0
        self.requests = 0  # request-rounds
        self.committed = 0  # tokens committed (accepted drafts + 1 per request-round)
        self.verify_tokens = 0  # drafts verified (anchor rows excluded)
        self.verify_rows_padded = 0  # rows a fixed-width verify tier computed past the verify lengths
        self.verify_hist = torch.zeros(gamma + 1, dtype=torch.int64)  # [gamma+1] request-rounds by verify_len
        self.verified_at = torch.zeros(gamma, dtype=torch.int64)  # [gamma] times position k was verified
        self.accepted_at = torch.zeros(gamma, dtype=torch.int64)  # [gamma] times position k was accepted
        self.seconds = 0.0
        self.phase_seconds: dict[str, float] = {}  # draft / verify / accept / commit
        self.prefill_fallbacks = 0  # requests whose drafter context could not be rebuilt exactly
        self.prefix_features_reused = 0  # cached-prefix positions whose features came from the KV-slot store
        self.prefix_rows_adopted = 0  # cached-prefix positions whose drafter rows were found in the KV-slot pool
        self.faults: dict[str, int] = {}  # kind -> request-rounds that fell back (guards.py)
        self.drafting_skipped = 0  # rounds not drafted: drafting did not pay (scheduler.skip_round)
        # rounds not drafted: no request of the batch could verify a draft (custom_params caps of 0,
        # penalties or grammars, last tokens)
        self.drafting_skipped_by_caps = 0
        self._last_log = time.monotonic()

    FALLBACKS = {  # what each fault costs (guards.py); the output stays exact in every case
        "nan_draft": "drafts from the first non-finite draft distribution on are not verified",
        "garbage_confidence": "confidences outside [0, 1] were sanitized before scheduling",
        "draft_exception": "the draft step failed; the round verifies no drafts (plain decoding)",
    }

    def fault(self, kind: str, count: int, exc: BaseException | None = None) -> None:
        """Count `count` request-rounds that fell back because of `kind`; warn the first time only."""
        first = kind not in self.faults
        self.faults[kind] = self.faults.get(kind, 0) + count
        if self.sink is not None:
            self.sink.fault(kind, count)
        if first:
            logger.warning(
                "dspark: %s in %d request(s) of this round%s: %s; the output stays exact. Logged once "
                "per kind; counts go to the worker summary and /server_info (dspark_plugin.faults).",
                kind, count, f" ({type(exc).__name__}: {exc})" if exc is not None else "",
                self.FALLBACKS.get(kind, "fallback"), exc_info=exc,
            )

    def skip_drafting(self, reason: str) -> None:
        """A round not drafted: `did_not_pay` (the scheduler's judgement) or `caps` (no request could
        verify a draft)."""
        if reason == "caps":
            self.drafting_skipped_by_caps += 1
        else:
            self.drafting_skipped += 1
        if self.sink is not None:
            self.sink.drafting_skipped(reason)

    def record(self, verify_lens: torch.Tensor, num_accepted: torch.Tensor, phases: dict[str, float],
               verify_rows: int | None = None) -> None:
        """verify_lens, num_accepted: [R] int64 on CPU; phases: seconds spent per phase; verify_rows:
        rows the verify forward computed (R x the tier width; None: the ragged windows exactly)."""
        verify_counts = torch.bincount(verify_lens, minlength=self.gamma + 1)  # [gamma + 1] requests by length
        accept_counts = torch.bincount(num_accepted, minlength=self.gamma + 1)
        # Position k (0-based) was verified by the requests with verify_len > k: a reversed cumulative sum.
        verified_at = verify_counts.flip(0).cumsum(0).flip(0)[1:]  # [gamma]
        accepted_at = accept_counts.flip(0).cumsum(0).flip(0)[1:]
        if self.sink is not None:
            self.sink.record_round(verify_counts, accept_counts, verified_at, accepted_at)
        self.rounds += 1
        self.requests += verify_lens.numel()
        self.committed += int(num_accepted.sum()) + verify_lens.numel()
        self.verify_tokens += int(verify_lens.sum())
        if verify_rows is not None:
            self.verify_rows_padded += verify_rows - int(verify_lens.sum()) - verify_lens.numel()
        self.verify_hist += verify_counts
        self.verified_at += verified_at
        self.accepted_at += accepted_at
        self.seconds += sum(phases.values())
        for name, sec in phases.items():
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + sec
        if self.log_every and self.rounds % self.log_every == 0:
            logger.info("%s", self.summary())

    def as_dict(self) -> dict:
        n = max(self.requests, 1)
        return {
            "rounds": self.rounds,
            "request_rounds": self.requests,
            "accept_length": self.committed / n,  # tokens per request-round, bonus included
            "verify_length": self.verify_tokens / n,  # drafts verified per request-round
            "verify_rows_padded": self.verify_rows_padded,
            "verify_hist": self.verify_hist.tolist(),
            "accept_rate_at": (self.accepted_at / self.verified_at.clamp_min(1)).tolist(),
            "ms_per_round": 1000.0 * self.seconds / max(self.rounds, 1),
            "ms_per_phase": {k: 1000.0 * v / max(self.rounds, 1) for k, v in self.phase_seconds.items()},
            "prefill_fallbacks": self.prefill_fallbacks,
            "prefix_features_reused": self.prefix_features_reused,
            "prefix_rows_adopted": self.prefix_rows_adopted,
            "faults": dict(self.faults),
            "drafting_skipped": self.drafting_skipped,
            "drafting_skipped_by_caps": self.drafting_skipped_by_caps,
        }

    def summary(self) -> str:
        d = self.as_dict()
        rates = " ".join(f"{r:.2f}" for r in d["accept_rate_at"])
        return (
            f"dspark: {d['rounds']} rounds, accept len {d['accept_length']:.2f}, "
            f"verify len {d['verify_length']:.2f}, hist {d['verify_hist']}, "
            f"accept@k [{rates}], {d['ms_per_round']:.1f} ms/round ("
            + ", ".join(f"{k} {v:.1f}" for k, v in d["ms_per_phase"].items()) + ")"
            + (f", {d['drafting_skipped']} rounds not drafted (drafting did not pay)" if d["drafting_skipped"] else "")
            + (f", fallbacks {d['faults']}" if d["faults"] else "")
        )
