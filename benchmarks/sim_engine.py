"""Discrete-time serving simulator: the real schedulers, replayed drafter rounds, a steps/s curve.

Each decode round of the simulated engine:
1. every running request takes its next recorded round (a row of ``dspark-eval``'s calibration
   records: the drafter's confidence logits for γ drafts, how many were verified and how many were
   accepted); its calibrated confidences c = sigmoid(logit / T_sts) go to the scheduler;
2. the scheduler (``dspark_sglang.schedulers.make_scheduler``: the same code the worker runs)
   returns verify lengths ℓ_r; the round costs 1 / SPS(R, Σ_r (1 + ℓ_r)) seconds on the cost table
   (beyond its last probe: step time extended linearly, ``step_seconds``),
   plus, for speculative configurations, the optional drafter cost (``draft_seconds +
   draft_seconds_per_req · R``, on rounds that draft) and the optional worker overhead
   (``worker_overhead.seconds(R, C)`` = a + b·R + c·C ms on every decode round, C the running
   requests' context: prompt_len + tokens so far each). The overhead is the worker's own host time
   around its two forwards (acceptance, commit, bookkeeping), fitted to a round-cost measurement
   (``worker_overhead.py``). A round that skips drafting pays it too: the worker still runs its
   acceptance and commit over the anchor rows (the fit, over windows >= 2, likely overstates it there).
   The schedulers do not see it (the worker does not price it either). Plain SGLang rounds
   (``none``) pay nothing extra: SGLang's own overhead is inside the measured step time;
3. request r commits min(a, ℓ_r) + 1 tokens, where a is the recorded round's accepted count — the
   prefix structure of chain acceptance makes that exact whenever ℓ_r ≤ the recorded verify length.
   When the scheduler verifies beyond what was recorded and the recorded round accepted everything
   it verified (censored), the extra positions are accepted with the pool's measured conditional
   acceptance per position. Acceptance is thus consistent with the confidences the scheduler saw.

Replay order: ``sequential`` (default) starts each request at a random row of its pool and walks
forward, so consecutive rounds come from the same recorded generation as far as possible (the
records are stored prompt by prompt); ``iid`` samples a row per round. Requests take pools (prompt
sets) in turn, as the benchmark interleaves its sets.

Serving around the rounds: a request's prefill runs as its own step (all waiting requests together,
up to ``max_running``), costing 1 / SPS(n, n · prompt_len) (free when prompt_len is 0) and producing
its first token; then decode rounds until it has ``output_len`` tokens. Closed loop: C users, each
sending the next request when the previous ends (at most ``max_requests``, none started after
``max_seconds`` of simulated time). Open loop: Poisson arrivals at ``rate`` per second. The records
produced are the benchmark's ``RequestRecord``s, summarised by the same code.

Determinism: everything random flows from one ``numpy`` generator seeded per level; the same seed
gives the same result for every scheduler (common random numbers make comparisons sharper).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from dspark_sglang.benchmarks.metrics import RequestRecord
from dspark_sglang.benchmarks.worker_overhead import WorkerOverhead
from dspark_sglang.confidence import CalibrationRecords, apply_sts
from dspark_sglang.cost_table import CostTable
from dspark_sglang.draft_cost import DraftCost, FixedDraftCost
from dspark_sglang.schedulers import make_scheduler

__all__ = ["SchedulerSpec", "parse_scheduler_spec", "RoundPool", "SimSetup", "simulate_level", "step_seconds",
           "SPEC_KINDS"]

SPEC_KINDS = ("none", "fixed", "verify-all", "lagged", "algorithm1")


@dataclass(frozen=True)
class SchedulerSpec:
    """A named scheduler configuration: ``kind`` for make_scheduler, and its options."""

    name: str
    kind: str
    opts: tuple[tuple[str, object], ...] = ()

    @property
    def speculative(self) -> bool:
        return self.kind != "none"

    def build(self, cost_table: CostTable, draft_cost: Optional[DraftCost] = None):
        opts = dict(self.opts)
        if opts.get("draft_cost") == "none":  # lagged:draft_cost=none, the paper's objective
            opts.pop("draft_cost")
        elif draft_cost is not None and self.kind == "lagged":
            opts.setdefault("draft_cost", draft_cost)  # the worker's default: it weighs draft time
        return make_scheduler(self.kind, cost_table, **opts)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "opts": dict(self.opts)}


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_scheduler_spec(text: str) -> SchedulerSpec:
    """``[NAME=]KIND[:OPTS]``: KIND one of none, fixed, verify-all, lagged, algorithm1; OPTS a
    comma list of key=value (``fixed:3`` is short for ``fixed:verify_len=3``). Examples: ``none``,
    ``fixed:3``, ``lagged``, ``lagged:lag=1,min_verify_len=1``, ``conf=lagged``,
    ``paper=lagged:draft_cost=none`` (a lagged scheduler that ignores the draft cost)."""
    raw = text.strip()
    name, sep, rest = raw.partition("=")
    if not sep or ":" in name:
        name, rest = "", raw
    kind, _, opt_text = rest.partition(":")
    kind = kind.strip().lower().replace("_", "-")
    if kind not in SPEC_KINDS:
        raise ValueError(f"scheduler {text!r}: unknown kind {kind!r}; expected one of {', '.join(SPEC_KINDS)}")
    opts: dict[str, object] = {}
    for item in (s.strip() for s in opt_text.split(",") if s.strip()):
        key, eq, val = item.partition("=")
        if not eq:
            if kind == "fixed" and not opts:
                opts["verify_len"] = _value(key)
                continue
            raise ValueError(f"scheduler {text!r}: option {item!r} is not key=value")
        opts[key.strip()] = _value(val.strip())
    if kind == "fixed" and "verify_len" not in opts:
        raise ValueError(f"scheduler {text!r}: fixed needs a length, e.g. fixed:3")
    if not name:
        name = kind if kind != "fixed" else f"fixed-{opts['verify_len']}"
        extra = [f"{k}={v}" for k, v in opts.items() if not (kind == "fixed" and k == "verify_len")]
        if extra:
            name += "(" + ",".join(extra) + ")"
    return SchedulerSpec(name.strip(), kind, tuple(sorted(opts.items())))


class RoundPool:
    """The recorded rounds of one prompt set: confidences, verify lengths, accepted counts."""

    def __init__(self, name: str, records: CalibrationRecords,
                 temperatures: Optional[Sequence[float]] = None):
        if len(records) == 0:
            raise ValueError(f"{records.path}: no recorded rounds")
        self.name, self.gamma = name, records.gamma
        temps = [1.0] * self.gamma if temperatures is None else list(temperatures)
        # [n, gamma] float32 calibrated confidences
        self.confidences = apply_sts(records.conf_logits, temps).contiguous()
        self.accepted = records.num_accepted.numpy().astype(np.int64)  # [n]
        self.verified = records.verify_lens.numpy().astype(np.int64)  # [n]
        self.conditional = self._conditional_acceptance()  # [gamma]

    def __len__(self) -> int:
        return len(self.accepted)

    def _conditional_acceptance(self) -> np.ndarray:
        """P(accept position k | positions < k accepted), over rounds where k was verified."""
        pos = np.arange(1, self.gamma + 1)[None, :]
        reached = (self.verified[:, None] >= pos) & (self.accepted[:, None] >= pos - 1)
        passed = reached & (self.accepted[:, None] >= pos)
        counts = reached.sum(0)
        return np.where(counts > 0, passed.sum(0) / np.maximum(counts, 1), 0.0)

    @property
    def tau_verify_all(self) -> float:
        """Mean committed tokens per round when every draft is verified (uncensored rows)."""
        return float(np.mean(self.accepted + 1))

    def outcome(self, rows: np.ndarray, lens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Accepted drafts for each (recorded row, verify length) pair (module doc, step 3)."""
        acc = np.minimum(self.accepted[rows], lens)
        censored = np.nonzero((self.accepted[rows] == self.verified[rows]) & (lens > self.verified[rows]))[0]
        for i in censored:
            k = int(self.verified[rows[i]])
            while k < lens[i] and rng.random() < self.conditional[k]:
                k += 1
            acc[i] = k
        return acc


OutputLen = Union[int, Sequence[int]]


@dataclass
class SimSetup:
    """Everything about the simulated engine except the scheduler and the load."""

    cost_table: CostTable  # the hardware: seconds per round = 1 / SPS(R, B)
    pools: list[RoundPool]
    output_len: OutputLen = 128  # tokens per request, or a list sampled uniformly
    prompt_len: int = 0  # prefill tokens per request (0: prefill is free)
    draft_seconds: float = 0.0  # per speculative round
    draft_seconds_per_req: float = 0.0  # per request in a speculative round
    max_running: int = 4096
    replay: str = "sequential"  # or "iid"
    scheduler_cost_table: Optional[CostTable] = None  # what the scheduler believes (default: cost_table)
    scheduler_sees_draft_cost: bool = True  # lagged: weigh the draft time above (the worker measures it)
    worker_overhead: Optional[WorkerOverhead] = None  # speculative rounds' host time (None: free)

    def __post_init__(self) -> None:
        if not self.pools:
            raise ValueError("the simulator needs at least one pool of recorded rounds")
        gammas = {p.gamma for p in self.pools}
        if len(gammas) != 1:
            raise ValueError(f"recorded rounds disagree on gamma: {sorted(gammas)}")
        if self.replay not in ("sequential", "iid"):
            raise ValueError(f"replay must be 'sequential' or 'iid', got {self.replay!r}")
        lens = [self.output_len] if isinstance(self.output_len, int) else list(self.output_len)
        if not lens or any(int(n) < 1 for n in lens):
            raise ValueError("output lengths must be >= 1")
        self._lens = np.asarray(lens, dtype=np.int64)
        self._fixed_len = bool((self._lens == self._lens[0]).all())
        if self.prompt_len < 0 or self.max_running < 1:
            raise ValueError("prompt_len must be >= 0 and max_running >= 1")

    @property
    def gamma(self) -> int:
        return self.pools[0].gamma

    def sample_output_len(self, rng: np.random.Generator) -> int:
        if self._fixed_len:  # no draw: a fixed length leaves the random stream alone
            return int(self._lens[0])
        return int(self._lens[rng.integers(len(self._lens))])


@dataclass
class _Req:
    record: RequestRecord
    slot: int
    target_tokens: int
    pool: int
    row: int
    tokens: int = 0
    rounds: int = 0


@dataclass
class _State:
    rng: np.random.Generator
    issued: int = 0
    pool_turn: int = 0
    free_slots: list = field(default_factory=list)
    next_slot: int = 0


def step_seconds(table: CostTable, num_reqs: int, tokens: int) -> float:
    """Seconds of one step: 1 / SPS, except beyond the last probe of a plain SPS table, where the
    step TIME of the last two probes is extended linearly (never falling). Step time grows
    linearly with tokens past the knee (peers-and-demand.md §3), so this is the physical
    extrapolation; the table's own lookup (clamped, or linear in rate) is what a scheduler sees,
    not what the hardware does. Prefill batches of hundreds of tokens need it."""
    probes = getattr(table, "sample_batch_tokens", None)
    if probes and len(probes) >= 2 and tokens > probes[-1]:
        x0, x1 = probes[-2], probes[-1]
        t0 = 1.0 / float(table.steps_per_second(num_reqs, x0))
        t1 = 1.0 / float(table.steps_per_second(num_reqs, x1))
        return t1 + max((t1 - t0) / (x1 - x0), 0.0) * (tokens - x1)
    rate = float(table.steps_per_second(num_reqs, int(tokens)))
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"cost table gave a non-positive rate {rate} at {num_reqs} requests, {tokens} tokens")
    return 1.0 / rate


class _Rates:
    """Memoised ``step_seconds`` (a level repeats the same (requests, tokens) shapes many times)."""

    def __init__(self, table: CostTable):
        self.table, self.memo = table, {}

    def seconds(self, num_reqs: int, tokens: int) -> float:
        key = (num_reqs, tokens)
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = step_seconds(self.table, num_reqs, tokens)
        return hit


def simulate_level(setup: SimSetup, spec: SchedulerSpec, *, seed: int, concurrency: Optional[int] = None,
                   rate: Optional[float] = None, max_requests: int = 256, max_seconds: float = math.inf,
                   on_done: Optional[Callable[[RequestRecord], None]] = None) -> list[RequestRecord]:
    """Simulate one level (closed loop with ``concurrency`` users, or Poisson ``rate``) and return
    the requests' records in issue order (times in simulated seconds from 0)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (Poisson)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    sched_table = setup.scheduler_cost_table or setup.cost_table
    draft_cost = (FixedDraftCost(setup.draft_seconds, setup.draft_seconds_per_req)
                  if setup.scheduler_sees_draft_cost else None)
    scheduler = spec.build(sched_table, draft_cost)
    step = _Rates(setup.cost_table)
    pool_lens = [len(p) for p in setup.pools]
    state = _State(np.random.default_rng(seed))
    records: list[RequestRecord] = []
    waiting: deque[_Req] = deque()
    running: list[_Req] = []
    t = 0.0
    next_arrival = math.inf

    def new_request(now: float, client: Optional[int]) -> Optional[_Req]:
        if state.issued >= max_requests or now >= max_seconds:
            return None
        pool_index = state.pool_turn % len(setup.pools)
        state.pool_turn += 1
        pool = setup.pools[pool_index]
        record = RequestRecord(prompt_id=f"{pool.name}#{state.issued}", client=client, t_send=now,
                               prompt_tokens=setup.prompt_len)
        state.issued += 1
        records.append(record)
        if client is not None:
            slot = client
        elif state.free_slots:
            slot = state.free_slots.pop()
        else:
            slot, state.next_slot = state.next_slot, state.next_slot + 1
        return _Req(record, slot, setup.sample_output_len(state.rng), pool_index, int(state.rng.integers(len(pool))))

    def finish(req: _Req, now: float) -> None:
        req.record.t_end = now
        if spec.speculative:
            req.record.spec = {"spec_verify_ct": req.rounds}
        scheduler.release(torch.tensor([req.slot], dtype=torch.int64))
        if req.record.client is None:
            state.free_slots.append(req.slot)
        if on_done is not None:
            on_done(req.record)
        if req.record.client is not None:
            nxt = new_request(now, req.record.client)
            if nxt is not None:
                waiting.append(nxt)

    if concurrency is not None:
        for c in range(concurrency):
            req = new_request(0.0, c)
            if req is not None:
                waiting.append(req)
    else:
        next_arrival = float(state.rng.exponential(1.0 / rate))

    gamma = setup.gamma
    while True:
        if rate is not None:
            if not running and not waiting and next_arrival < math.inf:
                t = max(t, next_arrival)
            while next_arrival <= t:
                req = new_request(next_arrival, None)
                if req is None:
                    next_arrival = math.inf
                    break
                waiting.append(req)
                next_arrival += float(state.rng.exponential(1.0 / rate))
        if not running and not waiting:
            break

        # Prefill step: admit waiting requests; each gets its first token.
        if waiting and len(running) < setup.max_running:
            admitted = [waiting.popleft() for _ in range(min(len(waiting), setup.max_running - len(running)))]
            if setup.prompt_len > 0:
                t += step.seconds(len(admitted), len(admitted) * setup.prompt_len)
            for req in admitted:
                req.tokens = 1
                req.record.chunk_times.append(t)
                req.record.chunk_tokens.append(1)
                if req.tokens >= req.target_tokens:
                    finish(req, t)
                else:
                    running.append(req)
            continue

        # Decode round.
        num = len(running)
        slots = torch.tensor([r.slot for r in running], dtype=torch.int64) if spec.speculative else None
        # A round the scheduler skips before drafting costs no draft time, and the replayed rows
        # stay where they are (no draft was made), as in the worker.
        drafted = spec.speculative and not scheduler.skip_round(slots)
        if drafted:
            rows = np.fromiter((r.row for r in running), dtype=np.int64, count=num)
            pools = np.fromiter((r.pool for r in running), dtype=np.int64, count=num)
            conf = torch.empty((num, gamma), dtype=torch.float32)
            for p_index, pool in enumerate(setup.pools):
                sel = np.nonzero(pools == p_index)[0]
                if len(sel):
                    conf[torch.from_numpy(sel)] = pool.confidences[torch.from_numpy(rows[sel])]
            lens = scheduler.schedule(slots, conf).numpy().astype(np.int64)
            accepted = np.empty(num, dtype=np.int64)
            for p_index, pool in enumerate(setup.pools):
                sel = np.nonzero(pools == p_index)[0]
                if len(sel):
                    accepted[sel] = pool.outcome(rows[sel], lens[sel], state.rng)
            seconds = setup.draft_seconds + setup.draft_seconds_per_req * num
        else:
            lens = np.zeros(num, dtype=np.int64)
            accepted = lens
            seconds = 0.0
        if spec.speculative and setup.worker_overhead is not None:
            # The round works over every running request's context: its prompt and tokens so far.
            context = num * setup.prompt_len + sum(r.tokens for r in running)
            seconds += setup.worker_overhead.seconds(num, context)
        t += seconds + step.seconds(num, int(num + lens.sum()))

        still: list[_Req] = []
        sequential = setup.replay == "sequential"
        for req, acc in zip(running, accepted.tolist()):
            req.rounds += 1
            req.tokens = min(req.target_tokens, req.tokens + acc + 1)
            req.record.chunk_times.append(t)
            req.record.chunk_tokens.append(req.tokens)
            if drafted:
                n_rows = pool_lens[req.pool]
                req.row = (req.row + 1) % n_rows if sequential else int(state.rng.integers(n_rows))
            if req.tokens >= req.target_tokens:
                finish(req, t)
            else:
                still.append(req)
        running = still
    return records
