"""dspark-bench and dspark-simulate: matched-throughput interpolation (hand-derived), per-request and
per-level metrics, the closed-loop driver and streaming client against a fake SGLang server on
127.0.0.1, server launch/stop by process group, and the simulator's physics and determinism.
No real SGLang server is started here."""

import json
import math
import os
import stat
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_sglang.benchmarks import bench, report, simulate
from dspark_sglang.benchmarks.curves import Curve, CurvePoint, curve_from_repeats, matched_range, matched_speedup
from dspark_sglang.benchmarks.http_stream import Endpoint, Sampling, _apportion, build_body, parse_url, send_streaming
from dspark_sglang.benchmarks.loadgen import run_closed_loop
from dspark_sglang.benchmarks.metrics import RequestRecord, percentile, summarize_level
from dspark_sglang.benchmarks.servers import (
    ManagedServer, ServerConfig, ServerError, cpu_environment, load_configs, preset_configs,
)
from dspark_sglang.benchmarks.sim_engine import RoundPool, SimSetup, parse_scheduler_spec, simulate_level, step_seconds
from dspark_sglang.confidence import CalibrationRecords
from dspark_sglang.cost_table import SpsTable


def curve(name, pts):
    return Curve(name, [CurvePoint(load, x, y) for load, x, y in pts])


# ------------------------------------------------------------------------------------------------
# Matched-throughput interpolation


BASE = curve("base", [(1, 10.0, 10.0), (2, 20.0, 8.0), (4, 40.0, 4.0)])
SPEC = curve("spec", [(1, 15.0, 20.0), (2, 30.0, 14.0), (4, 50.0, 6.0)])


def test_speed_at_is_piecewise_linear_and_undefined_outside():
    assert BASE.speed_at(15.0) == pytest.approx(9.0)  # halfway 10 -> 8... of (10,10)-(20,8)
    assert BASE.speed_at(30.0) == pytest.approx(6.0)  # halfway (20,8)-(40,4)
    assert BASE.speed_at(40.0) == pytest.approx(4.0)
    assert BASE.speed_at(9.9) is None and BASE.speed_at(40.1) is None


def test_matched_speedup_hand_derived():
    m = matched_speedup(BASE, SPEC, num_points=5)
    # Range both reach: [max(10, 15), min(40, 50)] = [15, 40]; points 15, 21.25, 27.5, 33.75, 40.
    assert (m.lo, m.hi) == (15.0, 40.0) and matched_range(BASE, SPEC) == (15.0, 40.0)
    # base(x):  9, 7.75, 6.5, 5.25, 4   (8 - 4(x-20)/20 beyond 20; 10 - 2(x-10)/10 below)
    # spec(x): 20, 17.5, 15, 12.5, 10   (20 - 6(x-15)/15 up to 30; 14 - 8(x-30)/20 beyond)
    expected = [20 / 9, 17.5 / 7.75, 15 / 6.5, 12.5 / 5.25, 10 / 4]
    assert [p.throughput for p in m.points] == pytest.approx([15, 21.25, 27.5, 33.75, 40])
    assert [p.speedup for p in m.points] == pytest.approx(expected)
    # The ratio rises monotonically here: min at the left end, max at the right end.
    assert m.min_speedup == pytest.approx(20 / 9) and m.min_at == pytest.approx(15)
    assert m.max_speedup == pytest.approx(2.5) and m.max_at == pytest.approx(40)


def test_no_overlap_and_single_point_curves():
    low = curve("low", [(1, 1.0, 5.0), (2, 2.0, 4.0)])
    m = matched_speedup(BASE, low)
    assert not m.overlaps and m.points == [] and m.min_speedup is None
    one = curve("one", [(8, 20.0, 16.0)])
    m = matched_speedup(BASE, one, num_points=5)
    assert (m.lo, m.hi) == (20.0, 20.0)
    assert [p.speedup for p in m.points] == pytest.approx([2.0])  # 16 / base(20) = 16 / 8


def test_envelope_when_throughput_turns_back():
    # Load 1 -> 2 gains throughput, load 2 -> 4 loses it (past saturation). At x = 25 the path
    # passes twice: (10,10)-(30,8) gives 8.5, (30,8)-(20,2) gives 5; the curve reads the better.
    c = curve("c", [(1, 10.0, 10.0), (2, 30.0, 8.0), (4, 20.0, 2.0)])
    assert c.speed_at(25.0) == pytest.approx(8.5)
    assert c.x_max == 30.0


def test_curve_from_repeats_mean_and_sample_std():
    c = curve_from_repeats("c", [1, 2], [[(10.0, 5.0), (14.0, 7.0)], [None]])
    assert len(c.points) == 1  # a load with no successful repeat is dropped
    p = c.points[0]
    assert (p.throughput, p.per_user) == (12.0, 6.0)
    assert p.throughput_std == pytest.approx(math.sqrt(8)) and p.per_user_std == pytest.approx(math.sqrt(2))


# ------------------------------------------------------------------------------------------------
# Metrics


def rec(client, t_send, chunks, end=None, **kw):
    r = RequestRecord("p", client, t_send, **kw)
    r.chunk_times = [t for t, _ in chunks]
    r.chunk_tokens = [n for _, n in chunks]
    r.t_end = chunks[-1][0] if end is None else end
    return r


def test_request_metrics_hand_derived():
    r = rec(0, 0.5, [(1.0, 1), (1.2, 3), (1.3, 4)])
    assert r.ttft == pytest.approx(0.5)
    assert r.decode_tokens_per_s == pytest.approx(3 / 0.3)  # 3 tokens after the first chunk in 0.3 s
    assert r.itls() == pytest.approx([0.1, 0.1, 0.1])  # 0.2 s for 2 tokens, then 0.1 s for 1
    assert percentile([1, 2, 3, 4], 50) == 2.5 and math.isnan(percentile([], 50))


def test_level_window_two_clients():
    # Client 0: requests [0, 2] and [2, 4]; client 1: [0, 3] and [3, 5].
    recs = [
        rec(0, 0.0, [(0.5, 1), (1.0, 5), (2.0, 9)]),
        rec(1, 0.0, [(1.0, 1), (2.0, 5), (3.0, 9)]),
        rec(0, 2.0, [(2.5, 1), (3.0, 5), (4.0, 9)]),
        rec(1, 3.0, [(3.5, 1), (4.0, 5), (5.0, 9)]),
    ]
    s = summarize_level(recs)
    # Window: from the latest first chunk of the first requests (1.0) to the earliest end of the
    # last requests (4.0). Chunks in (1, 4]: 4 @2.0, 4 @2.0, 4 @3.0, 1 @2.5, 4 @3.0, 4 @4.0,
    # 1 @3.5, 4 @4.0 = 26 tokens in 3 s.
    assert s.window == "steady" and s.window_seconds == pytest.approx(3.0)
    assert s.throughput == pytest.approx(26 / 3)
    # Per-user, pooled chunk to chunk inside [1, 4] after each request's first chunk: #0 1.0->2.0
    # (4 tokens, 1 s), #1 1.0->3.0 (8, 2 s), #2 2.5->4.0 (8, 1.5 s), #3 3.5->4.0 (4, 0.5 s).
    assert s.per_user == pytest.approx(24 / 5.0)
    # Steady requests (decode wholly within [1, 4]): #1 (8 tok / 2 s) and #2 (8 / 1.5).
    assert s.num_steady == 2
    assert s.per_user_request_mean == pytest.approx((4.0 + 8 / 1.5) / 2)
    assert s.mean_output_tokens == 9 and s.spec_accept_length is None


def test_level_spec_metrics_and_errors():
    a = rec(0, 0.0, [(0.1, 1), (0.2, 10)], spec={"spec_verify_ct": 3, "spec_cap_length": 4.0})
    b = rec(0, 0.3, [(0.4, 1), (0.5, 5)], spec={"spec_verify_ct": 2, "spec_cap_length": 2.0})
    bad = RequestRecord("p", 0, 0.6, error="HTTP 500: boom")
    s = summarize_level([a, b, bad])
    assert s.spec_accept_length == pytest.approx(15 / 5)  # Σ output tokens / Σ verify count
    assert s.spec_verify_ct == 5 and s.spec_cap_length == pytest.approx(3.0)
    assert s.num_errors == 1 and s.errors == ["HTTP 500: boom"]
    json.dumps(s.to_dict(), allow_nan=False)


# ------------------------------------------------------------------------------------------------
# Fake SGLang server (stdlib, 127.0.0.1, chunked server-sent events with known timings)


class FakeServer:
    def __init__(self, chunks=4, tokens_per_chunk=2, first_delay=0.02, delay=0.03, status=200):
        self.chunks, self.per, self.first_delay, self.delay, self.status = chunks, tokens_per_chunk, first_delay, delay, status
        self.lock = threading.Lock()
        self.requests = 0
        self.bodies = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _chunk(self, data: bytes):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def do_GET(self):
                payload = {"/health": None, "/model_info": {"model_path": "fake", "tokenizer_path": None,
                                                            "served_model_name": "fake-model"},
                           "/server_info": {"version": "fake", "speculative_algorithm": None}}
                if self.path not in payload:
                    self.send_error(404)
                    return
                body = b"" if payload[self.path] is None else json.dumps(payload[self.path]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    outer.bodies.append((self.path, body))
                if outer.status != 200:
                    msg = b"boom"
                    self.send_response(outer.status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(outer.chunks):
                    time.sleep(outer.first_delay if i == 0 else outer.delay)
                    done = 1 + outer.per * i
                    if self.path == "/generate":
                        meta = {"completion_tokens": done, "prompt_tokens": 7}
                        if i == outer.chunks - 1:
                            meta.update(spec_verify_ct=outer.chunks - 1, spec_accept_length=2.5)
                        event = {"text": "x" * done, "meta_info": meta}
                    else:
                        event = {"choices": [{"delta": {"content": "ab"}}]}
                    self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                if self.path != "/generate":
                    usage = {"choices": [], "usage": {"completion_tokens": 1 + outer.per * (outer.chunks - 1),
                                                      "prompt_tokens": 7}}
                    self._chunk(b"data: " + json.dumps(usage).encode() + b"\n\n")
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_streaming_generate_counts_tokens_and_timings():
    with FakeServer(chunks=4, tokens_per_chunk=2, first_delay=0.02, delay=0.05) as srv:
        ep = Endpoint("127.0.0.1", srv.port, "generate")
        body = build_body(ep, "hello", Sampling(max_new_tokens=16, temperature=0.0))
        r = send_streaming(ep, body, RequestRecord("p0", 0, 0.0))
    assert r.ok, r.error
    assert r.chunk_tokens == [1, 3, 5, 7] and r.prompt_tokens == 7
    assert r.spec == {"spec_verify_ct": 3, "spec_accept_length": 2.5}
    assert srv.bodies[0][1]["stream"] is True and srv.bodies[0][1]["sampling_params"]["max_new_tokens"] == 16
    # Timings are checked as identities of the recorded chunk times, plus the one bound a busy
    # machine cannot break: the server slept 20 ms + 3 x 50 ms before its last chunk, all after the
    # request was sent. (Single gaps have no safe bound: a late chunk makes the next gap short.)
    assert r.decode_tokens_per_s == pytest.approx(6 / (r.t_end - r.t_first))
    gaps = [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    assert len(r.itls()) == 6 and r.itls() == pytest.approx([g / 2 for g in gaps for _ in range(2)])
    assert r.t_end - r.t_send >= 0.17 and r.ttft == r.t_first - r.t_send > 0


def test_streaming_chat_apportions_usage_and_reports_http_errors():
    with FakeServer(chunks=3, tokens_per_chunk=3) as srv:
        ep = Endpoint("127.0.0.1", srv.port, "chat", model="m")
        r = send_streaming(ep, build_body(ep, [{"role": "user", "content": "hi"}], Sampling()), RequestRecord("p", 0, 0.0))
    assert r.ok and r.output_tokens == 7 and r.chunk_tokens[-1] == 7 and len(r.chunk_tokens) == 3
    assert r.chunk_tokens == sorted(set(r.chunk_tokens))  # strictly increasing
    assert _apportion([2, 4, 6], None) == [1, 2, 3]
    with FakeServer(status=500) as srv:
        ep = Endpoint("127.0.0.1", srv.port, "generate")
        r = send_streaming(ep, build_body(ep, "x", Sampling()), RequestRecord("p", 0, 0.0))
    assert not r.ok and r.error.startswith("HTTP 500")
    ep = Endpoint("127.0.0.1", 9, "generate", timeout=2.0)  # nothing listens on port 9
    r = send_streaming(ep, build_body(ep, "x", Sampling()), RequestRecord("p", 0, 0.0))
    assert not r.ok and r.error


def test_parse_url_is_loopback_only_by_default():
    assert parse_url("http://127.0.0.1:30000") == ("127.0.0.1", 30000)
    assert parse_url("localhost:8000") == ("localhost", 8000)
    with pytest.raises(ValueError, match="loopback"):
        parse_url("http://10.0.0.5:30000")
    assert parse_url("http://10.0.0.5:30000", allow_remote=True) == ("10.0.0.5", 30000)


def test_closed_loop_keeps_concurrency_and_bounds():
    with FakeServer(chunks=3, tokens_per_chunk=2, first_delay=0.01, delay=0.02) as srv:
        ep = Endpoint("127.0.0.1", srv.port, "generate")
        lock, in_flight, max_in_flight, issued = threading.Lock(), [0], [0], [0]
        # The first three requests wait for each other: three clients must hold them at once, however
        # late a loaded machine starts a client thread (it times out, and fails, with fewer clients).
        meet = threading.Barrier(3, timeout=60.0)

        def send(prompt, record):
            # Counted on the client side: the server's own count also holds a finished request's
            # handler thread until it returns, after the client may already have sent the next one.
            with lock:
                in_flight[0] += 1
                max_in_flight[0] = max(max_in_flight[0], in_flight[0])
                first_three = issued[0] < 3
                issued[0] += 1
            try:
                if first_three:
                    meet.wait()
                return send_streaming(ep, build_body(ep, prompt, Sampling()), record)
            finally:
                with lock:
                    in_flight[0] -= 1

        done = []
        records = run_closed_loop(send, ["a", "b", "c"], concurrency=3, max_requests=9, max_seconds=30.0,
                                  offset=1, on_done=done.append)
        assert len(records) == 9 == len(done) and srv.requests == 9
        assert max_in_flight[0] == 3  # three clients, back to back, never more
        assert [r.prompt_id for r in records[:3]] == ["b", "c", "a"]  # cycling from the offset
        assert {r.client for r in records} == {0, 1, 2}
        s = summarize_level(records)
        assert s.num_errors == 0 and s.num_requests == 9
        # Over the whole level (the steady window can be a sliver on a loaded machine): each request
        # streams 5 tokens in >= 0.05 s and 3 run at once -> at most 300 tok/s, however slow the machine.
        span = max(r.t_end for r in records) - min(r.t_send for r in records)
        assert 0.0 < sum(r.output_tokens for r in records) / span <= 300.0
    # Time bound: stop issuing after 0.3 s although 100 requests were allowed. Every request takes
    # >= 0.5 s, so each of the 2 clients issues at most one; in-flight ones may finish (join_timeout).
    with FakeServer(chunks=3, tokens_per_chunk=2, first_delay=0.5, delay=0.02) as srv:
        ep = Endpoint("127.0.0.1", srv.port, "generate")
        records = run_closed_loop(lambda prompt, record: send_streaming(ep, build_body(ep, prompt, Sampling()), record),
                                  ["a"], concurrency=2, max_requests=100, max_seconds=0.3, join_timeout=60.0)
        assert 1 <= len(records) <= 2 and all(r.ok for r in records)


def test_bench_run_and_report_end_to_end(tmp_path, monkeypatch):
    class P:
        def __init__(self, i):
            self.id, self.messages, self.meta = f"p{i}", [{"role": "user", "content": f"q{i}"}], {}

    monkeypatch.setattr(bench, "load_prompt_pool", lambda sets, n: [P(i) for i in range(4)])
    with FakeServer(chunks=3, tokens_per_chunk=2, first_delay=0.005, delay=0.01) as srv:
        args = ["run", "--url", f"http://127.0.0.1:{srv.port}", "--name", "fake", "--api", "chat",
                "--concurrency", "1,2", "--repeats", "2", "--min-requests", "4", "--warmup", "1",
                "--out", str(tmp_path / "a"), "--no-progress"]
        assert bench.main(args) == 0
    doc = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert (tmp_path / "a" / "bench.png").stat().st_size > 10_000
    assert [lvl["load"] for lvl in doc["configs"][0]["levels"]] == [1, 2]
    assert all(len(lvl["repeats"]) == 2 for lvl in doc["configs"][0]["levels"])
    rep = doc["configs"][0]["levels"][0]["repeats"][0]
    assert rep["load_avg_before"] is not None and rep["num_errors"] == 0 and len(rep["requests"]) == 4
    assert doc["configs"][0]["server_info"] == {"version": "fake", "speculative_algorithm": None}
    # Merge with a renamed copy: the copy is 2x slower per user at the same throughput.
    other = json.loads(json.dumps(doc))
    other["configs"][0]["name"] = "slow"
    for lvl in other["configs"][0]["levels"]:
        for r in lvl["repeats"]:
            r["per_user"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert bench.main(["report", str(tmp_path / "a" / "bench.json"), str(tmp_path / "b.json"),
                       "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "bench.json").read_text())
    (m,) = merged["matched"]
    assert m["config"] == "slow" and m["baseline"] == "fake"
    assert [p["speedup"] for p in m["points"]] == pytest.approx([0.5] * len(m["points"]))
    assert "slow 0.50–0.50x" in merged["summary"]


def test_bench_launch_interleaves_configurations(tmp_path, monkeypatch):
    """--launch --interleave: repeat 1 of every configuration, then repeat 2 (servers restarted)."""
    class P:
        id, messages, meta = "p", [{"role": "user", "content": "q"}], {}

    starts = []

    class InProcessServer:  # stands in for ManagedServer: a fake SGLang in this process
        def __init__(self, model_path, config, **kw):
            self.config, self.kw, self.fake = config, kw, FakeServer(chunks=2, first_delay=0.002, delay=0.004)
            self.host, self.port, self.startup_seconds = "127.0.0.1", self.fake.port, 0.1

        def __enter__(self):
            starts.append((self.config.name, self.kw["log_path"].name, self.kw["environ"]["SGLANG_USE_CPU_ENGINE"]))
            self.fake.__enter__()
            return self

        def __exit__(self, *exc):
            self.fake.__exit__()

    monkeypatch.setattr(bench, "load_prompt_pool", lambda sets, n: [P()])
    monkeypatch.setattr(bench, "ManagedServer", InProcessServer)
    args = ["run", "--launch", "--model-path", "m", "--drafter", "D", "--fixed-lens", "2", "--cpu", "yes",
            "--api", "chat", "--concurrency", "1", "--repeats", "2", "--min-requests", "2", "--warmup", "0",
            "--interleave", "--out", str(tmp_path), "--no-progress"]
    assert bench.main(args) == 0
    assert starts == [("no-spec", "server_no-spec_rep1.log", "1"), ("fixed-2", "server_fixed-2_rep1.log", "1"),
                      ("no-spec", "server_no-spec_rep2.log", "1"), ("fixed-2", "server_fixed-2_rep2.log", "1")]
    doc = json.loads((tmp_path / "bench.json").read_text())
    for cfg in doc["configs"]:
        assert [r["repeat"] for r in cfg["levels"][0]["repeats"]] == [0, 1]
        assert cfg["startup_seconds"] == [0.1, 0.1] and "--device" in cfg["common_args"]
    assert doc["configs"][1]["env"] == {"DSPARK_SCHEDULER": "fixed", "DSPARK_FIXED_LEN": "2"}


# ------------------------------------------------------------------------------------------------
# Server configurations and launch/stop


def test_configs_from_file_and_preset(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"name": "a"}, {"name": "b", "args": ["--x", "1"], "env": {"K": 3}}]))
    a, b = load_configs(path)
    assert a == ServerConfig("a") and b.args == ("--x", "1") and b.env == {"K": "3"} and b.speculative is False
    path.write_text(json.dumps([{"name": "a"}, {"name": "a"}]))
    with pytest.raises(ServerError, match="twice"):
        load_configs(path)
    path.write_text(json.dumps([{"name": "a", "argz": []}]))
    with pytest.raises(ServerError, match=r"c.json\[0\]: unknown keys \['argz'\]"):
        load_configs(path)
    for text in ("[" * 200_000, '[{"name": "a", "env": {"K": ' + "9" * 5000 + "}}]"):  # nesting, 5000 digits
        path.write_text(text)
        with pytest.raises(ServerError, match="c.json: not valid JSON"):
            load_configs(path)
        with pytest.raises(ValueError, match="c.json: not valid JSON"):
            report.read_document(path)
    names = [c.name for c in preset_configs("D", [3, 7], "sps.json")]
    assert names == ["no-spec", "fixed-3", "fixed-7", "lagged"]
    lagged = preset_configs("D", [], "sps.json")[-1]
    assert lagged.speculative and lagged.env == {"DSPARK_SCHEDULER": "lagged", "DSPARK_COST_TABLE": "sps.json"}
    with pytest.raises(ServerError, match="--drafter"):
        preset_configs(None, [3])


def test_cpu_environment_sets_engine_and_shim():
    src = {"PYTHONPATH": "/x"}
    env = cpu_environment(src)
    assert src == {"PYTHONPATH": "/x"}  # a copy is prepared; the caller's mapping is untouched
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    first = env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(first) / "common_ops.py").is_file() and "/x" in env["PYTHONPATH"].split(os.pathsep)


FAKE_LAUNCHER = textwrap.dedent("""\
    import http.server, os, subprocess, sys, time
    # Usage as `python -m sglang.launch_server ... --port P`; spawns a child like SGLang does.
    port = int(sys.argv[sys.argv.index("--port") + 1])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(os.environ["FAKE_PIDS"], "w").write(f"{os.getpid()} {child.pid}")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a): pass
    time.sleep(0.3)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False


def test_managed_server_starts_healthy_and_kills_its_group(tmp_path):
    script = tmp_path / "fakepython"
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    # A stand-in interpreter: ignores "-m sglang.launch_server" and runs the fake launcher.
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'launcher.py'} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    pids = tmp_path / "pids"
    cfg = ServerConfig("fake", ("--speculative-algorithm", "DSPARK"), {"FAKE_PIDS": str(pids)})
    server = ManagedServer("model", cfg, environ=dict(os.environ), log_path=tmp_path / "log",
                           health_timeout=30.0, stop_grace=5.0, python=str(script))
    with server:
        assert server.startup_seconds is not None and server.port > 0
        assert "--speculative-algorithm" in server.command and server.command[-1] == "DSPARK"
        leader, child = map(int, pids.read_text().split())
        assert _alive(leader) and _alive(child)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(leader) and not _alive(child)


def test_managed_server_reports_early_exit(tmp_path):
    script = tmp_path / "dies"
    script.write_text("#!/bin/sh\necho 'fatal: no model' >&2\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(ServerError, match=r"exited with code 3[\s\S]*fatal: no model"):
        with ManagedServer("m", ServerConfig("x"), log_path=tmp_path / "log", python=str(script)):
            pass


# ------------------------------------------------------------------------------------------------
# Simulator


FLAT_THEN_LINEAR = SpsTable([1, 64, 128, 640, 1280], [100.0, 100.0, 50.0, 10.0, 5.0], 1280, interpolation="linear")
# 100 steps/s up to 64 batch tokens, then step time B/6400 s (the probes above 64 are exactly 6400/B).


def fixed_pool(gamma=4, accepted=3, rounds=64, conf=0.9, verified=None):
    logits = torch.full((rounds, gamma), math.log(conf / (1 - conf)))
    recs = CalibrationRecords(logits, torch.full((rounds,), accepted), torch.full((rounds,), verified or gamma))
    return RoundPool("fixed", recs)


def sim(spec, setup, **kw):
    return summarize_level(simulate_level(setup, parse_scheduler_spec(spec), **kw))


def test_sim_batch_one_flat_region_gives_tau_speedup():
    # Every round accepts 3 of 4 verified drafts: verify-all commits 4 tokens per round at B = 5
    # (flat region, 100 rounds/s) -> 400 tok/s per user; no speculation commits 1 -> 100 tok/s;
    # fixed:2 commits min(3, 2) + 1 = 3 -> 300 tok/s. Output 1 + 48 tokens: no truncated round.
    setup = SimSetup(FLAT_THEN_LINEAR, [fixed_pool()], output_len=1 + 48)
    none = sim("none", setup, seed=0, concurrency=1, max_requests=4)
    va = sim("verify-all", setup, seed=0, concurrency=1, max_requests=4)
    fx = sim("fixed:2", setup, seed=0, concurrency=1, max_requests=4)
    assert none.per_user == pytest.approx(100.0)
    assert va.per_user == pytest.approx(400.0) and fx.per_user == pytest.approx(300.0)
    assert va.spec_accept_length == pytest.approx(49 / 12)  # SGLang's: output tokens / rounds
    lagged = sim("lagged", setup, seed=0, concurrency=1, max_requests=4)
    assert lagged.per_user == pytest.approx(400.0)  # flat region: verifying everything is free


def test_sim_saturation_verify_all_loses_by_tau_over_block():
    # 128 users: no speculation runs B = 128 -> 0.02 s per round, 1 token each: 50 tok/s per user.
    # Verify-all runs B = 640 -> 0.1 s per round, 4 tokens each: 40 tok/s. Ratio τ/(1+γ) = 4/5, in
    # per-user speed and in aggregate throughput (same tokens, rounds 5x longer for 4x the tokens).
    setup = SimSetup(FLAT_THEN_LINEAR, [fixed_pool()], output_len=1 + 4 * 5)
    none = sim("none", setup, seed=0, concurrency=128, max_requests=384)
    va = sim("verify-all", setup, seed=0, concurrency=128, max_requests=384)
    assert none.per_user == pytest.approx(50.0) and va.per_user == pytest.approx(40.0)
    assert va.throughput / none.throughput == pytest.approx(0.8)
    lagged = sim("lagged", setup, seed=0, concurrency=128, max_requests=384)
    assert lagged.throughput >= 0.99 * none.throughput  # the budget shrinks towards no speculation


def test_sim_known_acceptance_gives_known_tau():
    # Conditional acceptance 0.8 at every position, γ = 4, everything verified: τ = 1 + .8 + .8² +
    # .8³ + .8⁴ = 3.3616 tokens per round; at batch 1 in the flat region -> 336 tok/s per user.
    pool = simulate.synthetic_pool([0.8] * 4, rounds=20000, seed=1)
    assert pool.tau_verify_all == pytest.approx(3.3616, rel=0.02)
    setup = SimSetup(FLAT_THEN_LINEAR, [pool], output_len=2001)
    s = sim("verify-all", setup, seed=3, concurrency=1, max_requests=4)
    assert s.per_user == pytest.approx(336.16, rel=0.03)


def test_sim_is_deterministic_given_a_seed():
    pool = simulate.synthetic_pool([0.9, 0.7, 0.5], rounds=500, seed=0)
    setup = SimSetup(FLAT_THEN_LINEAR, [pool], output_len=[20, 40, 60], prompt_len=16)
    run = lambda seed: [(r.t_end, tuple(r.chunk_tokens)) for r in
                        simulate_level(setup, parse_scheduler_spec("lagged"), seed=seed, concurrency=8, max_requests=40)]
    assert run(7) == run(7)
    assert run(7) != run(8)
    poisson = lambda seed: [r.t_send for r in simulate_level(setup, parse_scheduler_spec("none"), seed=seed,
                                                              rate=50.0, max_requests=30)]
    assert poisson(1) == poisson(1) and len(poisson(1)) == 30


def test_sim_censored_rounds_continue_with_measured_acceptance():
    # Rows 0-1 verified all 4 drafts (accepted 4 and 1); rows 2-3 verified 2 and accepted both.
    recs = CalibrationRecords(torch.zeros(4, 4), torch.tensor([4, 1, 2, 2]), torch.tensor([4, 4, 2, 2]))
    pool = RoundPool("p", recs)
    # Position 1: reached by all 4, all accepted. Position 2: reached by all 4 (verified >= 2 and
    # position 1 accepted), rejected by row 1 -> 3/4. Positions 3 and 4: reached by row 0 only.
    assert pool.conditional.tolist() == pytest.approx([1.0, 0.75, 1.0, 1.0])
    rng = np.random.default_rng(0)
    acc = pool.outcome(np.array([0, 1, 2, 3, 2]), np.array([2, 4, 1, 4, 2]), rng)
    assert acc.tolist() == [2, 1, 1, 4, 2]  # row 3 verified to 4: continues with P = 1, 1


def test_step_time_extends_linearly_beyond_the_table():
    table = SpsTable([1, 64, 128], [100.0, 100.0, 50.0], 128, interpolation="linear")
    assert step_seconds(table, 1, 32) == pytest.approx(0.01)
    assert step_seconds(table, 1, 128) == pytest.approx(0.02)
    # Past the last probe the step time keeps its last slope, (0.02 - 0.01) / 64 s per token:
    # 256 tokens -> 0.04 s (a rate-linear extension would have hit the rate floor instead).
    assert step_seconds(table, 1, 256) == pytest.approx(0.04)


def test_parse_scheduler_spec():
    assert parse_scheduler_spec("fixed:3").to_dict() == {"name": "fixed-3", "kind": "fixed", "opts": {"verify_len": 3}}
    s = parse_scheduler_spec("conf=lagged:lag=1,min_verify_len=1")
    assert s.name == "conf" and dict(s.opts) == {"lag": 1, "min_verify_len": 1} and s.speculative
    assert parse_scheduler_spec("verify_all").kind == "verify-all"
    assert not parse_scheduler_spec("none").speculative
    with pytest.raises(ValueError, match="unknown kind"):
        parse_scheduler_spec("eagle")
    with pytest.raises(ValueError, match="needs a length"):
        parse_scheduler_spec("fixed")


def test_simulate_cli_and_validation_against_itself(tmp_path):
    pool_path = tmp_path / "records_d_T0_gsm8k.safetensors"
    simulate.synthetic_pool([0.9, 0.8, 0.7, 0.6], rounds=400, seed=0).confidences  # smoke
    logits = torch.randn(400, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    acc = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(1))
    CalibrationRecords(logits, acc, torch.full((400,), 4)).save(pool_path)
    sps = tmp_path / "sps.json"
    sps.write_text(FLAT_THEN_LINEAR.to_json())
    out = tmp_path / "sim"
    args = ["run", "--sps", str(sps), "--eval-dir", str(tmp_path), "--scheduler", "none", "--scheduler", "fixed:2",
            "--scheduler", "lagged", "--concurrency", "1,4,32", "--repeats", "2", "--min-requests", "8",
            "--output-len", "33", "--out", str(out), "--no-progress"]
    assert simulate.main(args) == 0
    doc = json.loads((out / "simulate.json").read_text())
    assert [c["name"] for c in doc["configs"]] == ["none", "fixed-2", "lagged"]
    assert doc["engine"]["pools"][0]["name"] == "gsm8k" and (out / "simulate.png").is_file()
    assert simulate.main(args) == 0 and json.loads((out / "simulate.json").read_text())["curves"] == doc["curves"]

    # A "measured" run that the simulator reproduces exactly: relabel the simulated document as a
    # bench result (fixed output lengths, request counts) and validate it -> zero error.
    measured = json.loads(json.dumps(doc))
    measured["tool"] = "dspark-bench"
    env = {"none": None, "fixed-2": {"DSPARK_SCHEDULER": "fixed", "DSPARK_FIXED_LEN": "2"}, "lagged": {}}
    for cfg in measured["configs"]:
        cfg["env"] = env[cfg["name"]] or {}
        for lvl in cfg["levels"]:
            for r in lvl["repeats"]:
                r["requests"] = [{"error": None, "output_tokens": 33, "prompt_tokens": None}]
    (tmp_path / "bench.json").write_text(json.dumps(measured))
    assert simulate.main(["validate", "--bench", str(tmp_path / "bench.json"), "--sps", str(sps), "--eval-dir",
                          str(tmp_path), "--repeats", "2", "--out", str(tmp_path / "val")]) == 0
    val = json.loads((tmp_path / "val" / "validate.json").read_text())["validation"]
    assert val["throughput_mape"] == pytest.approx(0.0, abs=1e-9)
    assert val["per_user_mape"] == pytest.approx(0.0, abs=1e-9)
    assert val["speedup_mape"] == pytest.approx(0.0, abs=1e-9)


def test_simulate_cli_errors_are_clear(tmp_path, capsys):
    assert simulate.main(["run", "--sps", "builtin:nope", "--acceptance", "0.5"]) == 1
    assert "unknown built-in curve 'nope'" in capsys.readouterr().err
    assert simulate.main(["run", "--sps", "builtin:h100-qwen3-8b-roofline"]) == 1
    assert "no drafter rounds" in capsys.readouterr().err
    assert simulate.main(["curves"]) == 0 and "mi355x" in capsys.readouterr().out


def test_report_documents_are_strict_json(tmp_path):
    doc = report.new_document("dspark-bench", "concurrency", {"x": float("inf")}, "a")
    doc["configs"] = [{"name": "a", "levels": [{"load": 1, "repeats": [{"throughput": 10.0, "per_user": 5.0}]}]},
                      {"name": "b", "levels": [{"load": 1, "repeats": [{"throughput": float("nan"), "per_user": 1.0}]}]}]
    report.analyze(doc)
    assert doc["matched"][0]["lo"] is None  # b has no valid point
    path = report.write_document(doc, tmp_path / "d.json")
    assert json.loads(path.read_text())["args"]["x"] is None


def test_recorded_model_path_names_no_machine_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "cache" / "models" / "smollm2-135m"
    model.mkdir(parents=True)
    assert bench._recorded_path(str(model)) == "<dspark-models cache>/smollm2-135m"
    assert bench._recorded_path("/opt/models/x") == "/opt/models/x"  # elsewhere: as given
