"""Per-request timelines and the per-level summary (one implementation for measured and simulated runs).

A request's timeline is its streamed chunks: ``chunk_times[i]`` (seconds, one clock per level) and
``chunk_tokens[i]``, the cumulative output tokens delivered by chunk i. With speculative decoding a
chunk may carry several tokens (one verify round).

Per request:
- TTFT = first chunk time − send time.
- decode speed = (output tokens after the first chunk) / (end − first chunk time): the speed a user
  sees once the answer has started (the first chunk carries the prefill's token).
- inter-token latency (ITL): each chunk's gap to the previous chunk, divided by its token count and
  counted once per token, so a 4-token round 80 ms after the previous one gives four 20 ms ITLs.

Per level (closed loop, C clients sending back to back):
- the steady window runs from the moment every client has its first answer started (the latest
  first-chunk time over the clients' first requests) to the moment the first client runs out of
  work (the earliest end over the clients' last requests). Throughout it all C clients are active.
  Open loop (no clients): from the arrival of the 10th-percentile request to the last arrival.
- aggregate throughput = output tokens delivered inside the window / window length;
- per-user speed (the curve's y) = the decode speed of every request while inside the window,
  pooled: each request contributes the tokens of its chunks after its first chunk in the window,
  up to its last chunk in the window, and the time between those two chunks (chunk to chunk, so
  a window edge cutting a gap biases nothing); per-user = Σ tokens / Σ time. This uses every
  request that decodes inside the window, not only those wholly inside it;
- ``per_user_request_mean`` / ``per_user_p50``: mean and median of the per-request decode speed
  over the requests whose decode lies wholly inside the window (``num_steady``);
- with too few requests for a window (or no request decoding inside it) the whole run is used and
  ``window`` says ``"full"``;
- TTFT and ITL percentiles over the steady requests; spec metrics from ``meta_info`` when present
  (accept length = Σ output tokens / Σ ``spec_verify_ct``, SGLang's definition).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

__all__ = ["RequestRecord", "LevelSummary", "summarize_level", "percentile"]

_EPS = 1e-9


@dataclass
class RequestRecord:
    prompt_id: str
    client: Optional[int]  # closed-loop client index; None for open-loop arrivals
    t_send: float
    t_end: float = math.nan
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)  # cumulative output tokens per chunk
    prompt_tokens: Optional[int] = None
    error: Optional[str] = None
    spec: dict = field(default_factory=dict)  # spec_* fields of the final meta_info

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times) and math.isfinite(self.t_end)

    @property
    def output_tokens(self) -> int:
        return self.chunk_tokens[-1] if self.chunk_tokens else 0

    @property
    def t_first(self) -> float:
        return self.chunk_times[0] if self.chunk_times else math.nan

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_send

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first chunk over the time since it; NaN when there are none."""
        if not self.ok:
            return math.nan
        tokens = self.output_tokens - self.chunk_tokens[0]
        span = self.t_end - self.t_first
        return tokens / span if tokens > 0 and span > _EPS else math.nan

    def itls(self) -> list[float]:
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            n = self.chunk_tokens[i] - self.chunk_tokens[i - 1]
            if n > 0:
                out.extend([(self.chunk_times[i] - self.chunk_times[i - 1]) / n] * n)
        return out

    def to_dict(self, timeline: bool = False) -> dict:
        out = {
            "prompt_id": self.prompt_id, "client": self.client, "t_send": self.t_send, "t_end": self.t_end,
            "t_first": self.t_first, "output_tokens": self.output_tokens, "prompt_tokens": self.prompt_tokens,
            "ttft": self.ttft, "decode_tokens_per_s": self.decode_tokens_per_s, "error": self.error,
            "spec": self.spec,
        }
        if timeline:
            out["chunk_times"], out["chunk_tokens"] = list(self.chunk_times), list(self.chunk_tokens)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


@dataclass
class LevelSummary:
    num_requests: int
    num_errors: int
    num_steady: int  # requests whose decode lies in the steady window
    window: str  # "steady" or "full"
    window_seconds: float
    throughput: float  # aggregate output tokens/s in the window
    per_user: float  # pooled in-window decode tokens/s (module doc)
    per_user_request_mean: float  # mean per-request decode tokens/s of the steady requests
    per_user_p50: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    mean_output_tokens: float
    mean_prompt_tokens: Optional[float]
    spec_accept_length: Optional[float]  # Σ output tokens / Σ spec_verify_ct
    spec_verify_ct: Optional[int]
    spec_cap_length: Optional[float]  # mean over requests that report it
    errors: list[str] = field(default_factory=list)  # first few distinct error messages

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    data = sorted(v for v in values if math.isfinite(v))
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _window(records: Sequence[RequestRecord]) -> tuple[float, float, str]:
    ok = [r for r in records if r.ok]
    clients: dict[int, list[RequestRecord]] = {}
    for r in ok:
        if r.client is not None:
            clients.setdefault(r.client, []).append(r)
    if clients:
        firsts = [min(rs, key=lambda r: r.t_send) for rs in clients.values()]
        lasts = [max(rs, key=lambda r: r.t_send) for rs in clients.values()]
        start = max(r.t_first for r in firsts)
        stop = min(r.t_end for r in lasts)
    else:
        arrivals = sorted(r.t_send for r in ok)
        start = arrivals[int(0.1 * (len(arrivals) - 1))] if arrivals else math.nan
        stop = arrivals[-1] if arrivals else math.nan
    if math.isfinite(start) and math.isfinite(stop) and stop - start > _EPS:
        return start, stop, "steady"
    if not ok:
        return math.nan, math.nan, "full"
    return min(r.t_send for r in ok), max(r.t_end for r in ok), "full"


def _tokens_in(record: RequestRecord, start: float, stop: float) -> int:
    total, prev = 0, 0
    for t, cum in zip(record.chunk_times, record.chunk_tokens):
        if start < t <= stop:
            total += cum - prev
        prev = cum
    return total


def _windowed_decode(record: RequestRecord, start: float, stop: float) -> tuple[int, float]:
    """(tokens, seconds) of the record's decode between its first and last chunk inside
    [start, stop], after its first chunk overall."""
    inside = [i for i, t in enumerate(record.chunk_times) if max(start, record.t_first) <= t <= stop]
    if len(inside) < 2:
        return 0, 0.0
    first, last = inside[0], inside[-1]
    return (record.chunk_tokens[last] - record.chunk_tokens[first],
            record.chunk_times[last] - record.chunk_times[first])


def summarize_level(records: Sequence[RequestRecord]) -> LevelSummary:
    """Summarize one level (one concurrency or rate, one repeat). See the module doc."""
    ok = [r for r in records if r.ok]
    errors = [r for r in records if not r.ok]
    distinct_errors = list(dict.fromkeys(str(r.error or "no tokens") for r in errors))[:5]
    start, stop, kind = _window(records)
    if not ok:
        nan = math.nan
        return LevelSummary(len(records), len(errors), 0, kind, nan, nan, nan, nan, nan, nan, nan, nan, nan,
                            nan, None, None, None, None, distinct_errors)
    seconds = stop - start
    if kind == "steady":
        tokens = sum(_tokens_in(r, start, stop) for r in ok)  # chunks in (start, stop]
    else:
        tokens = sum(r.output_tokens for r in ok)
    throughput = tokens / seconds if seconds > _EPS else math.nan
    steady = [r for r in ok if r.t_first >= start - _EPS and r.t_end <= stop + _EPS]
    pooled = [_windowed_decode(r, start, stop) for r in ok]
    pooled_tokens, pooled_seconds = sum(p[0] for p in pooled), sum(p[1] for p in pooled)
    if not steady or pooled_seconds <= _EPS:
        kind = "full"
        pooled = [_windowed_decode(r, -math.inf, math.inf) for r in ok]
        pooled_tokens, pooled_seconds = sum(p[0] for p in pooled), sum(p[1] for p in pooled)
    chosen = steady if steady else ok
    speeds = [s for s in (r.decode_tokens_per_s for r in chosen) if math.isfinite(s)]
    itls = [v for r in chosen for v in r.itls()]
    ttfts = [r.ttft for r in chosen]
    prompt_lens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]

    verify = [r for r in ok if isinstance(r.spec.get("spec_verify_ct"), (int, float)) and r.spec["spec_verify_ct"] > 0]
    accept = (sum(r.output_tokens for r in verify) / sum(r.spec["spec_verify_ct"] for r in verify)) if verify else None
    caps = [float(r.spec["spec_cap_length"]) for r in ok if isinstance(r.spec.get("spec_cap_length"), (int, float))]
    return LevelSummary(
        num_requests=len(records), num_errors=len(errors), num_steady=len(steady), window=kind,
        window_seconds=seconds, throughput=throughput,
        per_user=pooled_tokens / pooled_seconds if pooled_seconds > _EPS else math.nan,
        per_user_request_mean=sum(speeds) / len(speeds) if speeds else math.nan,
        per_user_p50=percentile(speeds, 50),
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(itls, 50), itl_p99=percentile(itls, 99),
        mean_output_tokens=sum(r.output_tokens for r in ok) / len(ok),
        mean_prompt_tokens=sum(prompt_lens) / len(prompt_lens) if prompt_lens else None,
        spec_accept_length=accept,
        spec_verify_ct=int(sum(r.spec["spec_verify_ct"] for r in verify)) if verify else None,
        spec_cap_length=sum(caps) / len(caps) if caps else None,
        errors=distinct_errors,
    )
