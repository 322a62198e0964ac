"""One streamed request to an SGLang server, timed chunk by chunk (stdlib ``http.client`` only).

Three APIs:
- ``generate``: SGLang's native ``POST /generate`` with ``"stream": true``. Every server-sent event
  carries ``meta_info`` with the cumulative ``completion_tokens`` (exact token counts per chunk)
  and, at the end, the speculative-decoding fields (``spec_verify_ct``, ``spec_accept_length``,
  ``spec_cap_length``, ...). The prompt is sent as text rendered with the model's chat template.
- ``chat``: OpenAI-compatible ``POST /v1/chat/completions`` (messages sent as they are).
- ``completions``: OpenAI-compatible ``POST /v1/completions`` (rendered text).
The OpenAI APIs report only the final token count (``stream_options.include_usage``); per-chunk
counts are then apportioned by characters, an approximation. Prefer ``generate`` for ITL.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from dspark_sglang.benchmarks.metrics import RequestRecord

__all__ = ["API_PATHS", "LOOPBACK_HOSTS", "Endpoint", "Sampling", "build_body", "send_streaming",
           "parse_url", "get_json"]

API_PATHS = {"generate": "/generate", "chat": "/v1/chat/completions", "completions": "/v1/completions"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    api: str = "generate"
    model: str = "default"  # the OpenAI "model" field
    timeout: float = 600.0  # seconds per request (socket timeout between reads)

    @property
    def path(self) -> str:
        return API_PATHS[self.api]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = False


def parse_url(url: str, *, allow_remote: bool = False) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"--url {url!r}: only http:// is supported")
    host, port = parts.hostname or "", parts.port or 80
    if host not in LOOPBACK_HOSTS and not allow_remote:
        raise ValueError(f"--url {url!r}: {host!r} is not a loopback address; pass --allow-remote to "
                         "benchmark a server on another host")
    return host, port


def get_json(host: str, port: int, path: str, timeout: float = 10.0) -> Any:
    """GET ``path`` and decode JSON; raises OSError / ValueError on failure."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise ValueError(f"GET {path}: HTTP {resp.status}: {body[:200]!r}")
        return json.loads(body) if body.strip() else None
    finally:
        conn.close()


def build_body(endpoint: Endpoint, prompt: Any, sampling: Sampling) -> dict:
    """``prompt`` is rendered text for ``generate``/``completions`` and a messages list for ``chat``."""
    if endpoint.api == "generate":
        params = {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                  "top_p": sampling.top_p, "ignore_eos": sampling.ignore_eos}
        return {"text": prompt, "sampling_params": params, "stream": True}
    body = {"model": endpoint.model, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "ignore_eos": sampling.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}
    body["messages" if endpoint.api == "chat" else "prompt"] = prompt
    return body


def _events(resp: http.client.HTTPResponse):
    """Yield the ``data:`` payloads of a server-sent-event stream as they arrive."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(b"data:"):
            yield line[5:].strip()


def _openai_text(event: dict) -> str:
    text = ""
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        text += delta.get("content") or choice.get("text") or ""
    return text


def send_streaming(endpoint: Endpoint, body: dict, record: RequestRecord,
                   clock: Callable[[], float] = time.perf_counter) -> RequestRecord:
    """Send one streamed request and fill ``record`` (times on ``clock``). Never raises for
    server or network errors: they land in ``record.error``."""
    conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=endpoint.timeout)
    char_counts: list[int] = []  # OpenAI: cumulative characters per chunk
    usage_tokens: Optional[int] = None
    try:
        record.t_send = clock()
        conn.request("POST", endpoint.path, body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            record.error = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
            return record
        for data in _events(resp):
            if data == b"[DONE]":
                break
            event = json.loads(data)
            now = clock()
            if "error" in event:
                record.error = f"server error: {str(event['error'])[:300]}"
                break
            if endpoint.api == "generate":
                meta = event.get("meta_info") or {}
                done = int(meta.get("completion_tokens", 0))
                if done > record.output_tokens:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(done)
                if meta.get("prompt_tokens") is not None:
                    record.prompt_tokens = int(meta["prompt_tokens"])
                record.spec = {k: v for k, v in meta.items() if k.startswith("spec_")}
            else:
                text = _openai_text(event)
                if text:
                    record.chunk_times.append(now)
                    char_counts.append((char_counts[-1] if char_counts else 0) + len(text))
                usage = event.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                    record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.t_end = clock()
        if endpoint.api != "generate" and char_counts:
            record.chunk_tokens = _apportion(char_counts, usage_tokens)
        if not record.chunk_times and record.error is None:
            record.error = "the stream ended without any output token"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return record


def _apportion(char_counts: list[int], total_tokens: Optional[int]) -> list[int]:
    """Cumulative tokens per chunk from cumulative characters: one token per chunk when the server
    gave no usage count (or as many tokens as chunks), else the usage total split in proportion to
    characters, each chunk at least one token while tokens remain."""
    n = len(char_counts)
    if total_tokens is None or total_tokens == n:
        return list(range(1, n + 1))
    chars = char_counts[-1] or 1
    out, prev = [], 0
    for i, c in enumerate(char_counts):
        left_after = n - 1 - i  # chunks still to come, each wanting a token
        value = max(round(total_tokens * c / chars), prev + 1)
        value = min(value, max(total_tokens - left_after, prev))
        out.append(value)
        prev = value
    out[-1] = total_tokens
    return out
