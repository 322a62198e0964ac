"""Round-cost probe, for `benchmarks/round_cost.py` only: each decode round's phases timed next to
a plain DECODE forward of the very same batch, in the same process.

`DSPARK_ROUND_PROBE=W1,W2,...` (verify windows, the anchor row included) switches it on. Every decode
round then
1. runs SGLang's plain DECODE forward + sampling on the scheduler's batch and times it: the step a
   non-speculative engine would run for this batch (it writes the anchors' KV slots, which the
   verify forward rewrites with the same values; its sampled tokens are discarded);
2. drafts as usual (the scheduler runs and keeps its history), then verifies W - 1 drafts for every
   request, W cycling through the windows round by round (capped like any verify length: by the
   drafts a request may still emit and by unusable drafts). The length depends on the round count
   only, never on a draft or a confidence: lossless, like the fixed scheduler.
Records (the last `capacity` rounds) go to `/server_info` -> `internal_states[0].dspark_plugin.round_probe`.
Off (the default), the worker builds no probe and pays nothing.
"""

from __future__ import annotations

import os
import time
from collections import deque

ENV = "DSPARK_ROUND_PROBE"
# What turn_into_verify_extend sets on a batch for a DECODE forward (restored after the baseline).
_DECODE_FIELDS = ("input_ids", "out_cache_loc", "forward_mode", "seq_lens", "seq_lens_cpu", "seq_lens_sum",
                  "orig_seq_lens", "req_pool_indices_cpu", "return_logprob", "return_hidden_states", "spec_info")


def parse_windows(text: str) -> tuple[int, ...]:
    try:
        windows = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        windows = ()
    if not windows or min(windows) < 1:
        raise ValueError(f"{ENV}={text!r}: expected comma-separated verify windows >= 1 (anchor row included), e.g. 1,2,4,8")
    return windows


class RoundProbe:
    def __init__(self, windows: tuple[int, ...], capacity: int = 8192):
        self.windows = windows
        self.records: deque[dict] = deque(maxlen=capacity)
        self._round = 0

    @classmethod
    def from_env(cls, environ=os.environ) -> "RoundProbe | None":
        text = environ.get(ENV, "").strip()
        return cls(parse_windows(text)) if text else None

    def window(self) -> int:
        """This round's verify window (anchor row included)."""
        return self.windows[self._round % len(self.windows)]

    def time_plain_decode(self, target_worker, batch, anchors_layout, pool_rows) -> float:
        """Seconds of SGLang's own decode step (forward + sampling) for `batch`, whose decode fields
        are set as a plain engine sets them (`anchors_layout`: every window is the anchor alone) and
        restored afterwards."""
        from dspark_sglang.sglang.verify import turn_into_verify_extend

        saved = {name: getattr(batch, name) for name in _DECODE_FIELDS}
        try:
            turn_into_verify_extend(batch, anchors_layout, pool_rows)
            start = time.perf_counter()
            target_worker.forward_batch_generation(batch)
            return time.perf_counter() - start
        finally:
            for name, value in saved.items():
                setattr(batch, name, value)

    def record(self, **fields) -> None:
        self.records.append(fields)
        self._round += 1

    def as_dict(self) -> dict:
        return {"windows": list(self.windows), "rounds": list(self.records)}
