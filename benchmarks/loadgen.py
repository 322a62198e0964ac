"""Closed-loop load: C clients, each sending its next request as soon as the previous one ends.

Bounded in count and in time: clients stop taking new requests once ``max_requests`` have been
issued or ``max_seconds`` have passed since the level started; requests already in flight finish
(each bounded by the endpoint's timeout). Prompts are taken in order from the list, cycling, from
``offset`` on, so a level is reproducible and repeats can use different prompts.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Optional, Sequence

from dspark_sglang.benchmarks.metrics import RequestRecord

__all__ = ["run_closed_loop"]

# send(prompt, record) fills the record (times on the shared clock) and returns it.
SendFn = Callable[[object, RequestRecord], RequestRecord]


def run_closed_loop(
    send: SendFn,
    prompts: Sequence,
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    offset: int = 0,
    prompt_id: Callable[[object], str] = lambda p: str(getattr(p, "id", p)),
    on_done: Optional[Callable[[RequestRecord], None]] = None,
    clock: Callable[[], float] = time.perf_counter,
    join_timeout: Optional[float] = None,
) -> list[RequestRecord]:
    """Run one level and return its records in issue order.

    ``join_timeout`` bounds the wait for in-flight requests after the deadline (default:
    ``max_seconds`` more); clients still running after it are abandoned (their records are marked
    with an error) so the caller never hangs.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    if not prompts:
        raise ValueError("no prompts to send")
    lock = threading.Lock()
    records: list[Optional[RequestRecord]] = [None] * max_requests
    state = {"issued": 0}
    start = clock()

    def take() -> Optional[int]:
        with lock:
            if state["issued"] >= max_requests or clock() - start >= max_seconds:
                return None
            index = state["issued"]
            state["issued"] += 1
            return index

    def client(cid: int) -> None:
        while (index := take()) is not None:
            prompt = prompts[(offset + index) % len(prompts)]
            record = RequestRecord(prompt_id=prompt_id(prompt), client=cid, t_send=clock())
            records[index] = record
            try:
                send(prompt, record)
            except Exception as exc:  # a bug in send must not kill the level silently
                record.error = f"{type(exc).__name__}: {exc}"
            if on_done is not None:
                on_done(record)

    threads = [threading.Thread(target=client, args=(c,), daemon=True, name=f"client-{c}")
               for c in range(concurrency)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + max_seconds + (max_seconds if join_timeout is None else join_timeout)
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    out = [r for r in records[: state["issued"]] if r is not None]
    if any(t.is_alive() for t in threads):
        for r in out:
            if not math.isfinite(r.t_end):  # still in flight
                r.error = r.error or "abandoned: still in flight after the level's time bound"
    return out
