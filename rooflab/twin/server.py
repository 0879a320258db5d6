"""The twin's OpenAI-compatible HTTP server (what inference-perf talks to).

Endpoints as vLLM serves them: ``/v1/completions`` and ``/v1/chat/completions`` (streaming with exact
``data: `` SSE framing and ``[DONE]``, or a single JSON body), ``/v1/models``, ``/health``, ``/metrics``
(vLLM's metric names), ``usage`` blocks, ``X-Request-Id``, and vLLM's error bodies and status codes.

Time: the engine runs on a virtual clock in simulated microseconds, paced against the wall clock divided
by the acceleration factor (``--accel 20``: a 2-minute workload takes 6 s). Every step starts when the
previous one ends (or when work arrives on an idle engine); traces and the engine keep simulated,
unaccelerated time. A request's journey: api.ARRIVED → (α0) → journey.QUEUED → scheduled steps →
FINISHED → (α1 + α2·n_out) → api.DEPARTED, when the last bytes are sent.

Staying responsive: the engine loop yields to the event loop at least every ``ENGINE_SLICE_S`` (2 ms), also
when it runs behind the wall clock (a high ``--accel`` or a heavy load), and a stream with a backlog yields
every ``YIELD_EVERY_CHUNKS`` chunks, so ``/health``, ``/metrics`` and disconnects are served between steps. With
``--trace`` the step and request records are serialised on the loop (~0.1 ms a step, between yields) and
written by a thread (:class:`rooflab.twin.trace_thread.BackgroundTraceWriter`: a slow disk never stalls the
loop). An idle ``/metrics`` (nothing running, waiting or being sent) answers once the writer has caught up, so
a collector that drains on ``/metrics`` finds every span of its run on disk; a graceful stop (SIGINT) writes
everything and closes the file. What exists when the server starts is frozen out of the garbage collector's
full passes (``gc.freeze``), which otherwise stop the loop for 0.1–0.5 s under a traced load.

Client disconnects: every request has a watcher on its connection (ASGI ``http.disconnect``); when the client
goes away the request is aborted in the engine (its KV blocks freed), recorded as ``api.ABORTED`` and counted
in ``vllm:request_success_total{finished_reason="abort"}`` and ``twin:request_abort_total{reason=...}``.

Validation (:mod:`rooflab.twin.validation`) follows vLLM 0.32.0: lax body types, SamplingParams' range checks
and messages, and vLLM's prompt shapes. A batch of prompts runs one engine request per prompt (``<id>-<i>``, as
vLLM names them) and answers one choice per prompt (``index`` i), usage summed; streamed, each chunk carries
its choice's index. ``n`` > 1 is rejected (a documented departure).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from rooflab.errors import InputError
from rooflab.twin import records as R
from rooflab.twin.engine import Engine, Request
from rooflab.twin.otel import TraceWriter
from rooflab.twin.tokenizer import TwinTokenizer
from rooflab.twin.trace_thread import BackgroundTraceWriter
from rooflab.twin.validation import Rejected, error_response, validate

if TYPE_CHECKING:
    from rooflab.model.engine_config import EngineConfig
    from rooflab.twin.simulate import RequestOverheads

NATURAL_LEN_MEAN = 128  # mean output length when ignore_eos is off (geometric)
TRACE_SYNC_TIMEOUT_S = 30.0  # the longest an idle /metrics waits for the trace writer
ENGINE_SLICE_S = 0.002  # the engine loop, when behind the wall clock, yields to the event loop this often
YIELD_EVERY_CHUNKS = 8  # a stream with a backlog yields to the event loop this often (disconnects, /health)


@dataclass(eq=False)
class _Live:
    """A request in flight: what the HTTP handler waits on. The prompts of one batch share one queue; an item
    is (index, "token", 1), (index, "done", status) or (index, "abort", None)."""

    req: Request
    queue: asyncio.Queue[tuple[int, str, object]] = field(default_factory=asyncio.Queue)
    index: int = 0  # the prompt's position in its batch (the choice index)
    events: list[R.RequestEvent] = field(default_factory=list)
    done: bool = False


class TwinServer:
    def __init__(self, engine: Engine, overheads: RequestOverheads, tokenizer: TwinTokenizer, *, model_name: str,
                 accel: float = 1.0, trace: TraceWriter | BackgroundTraceWriter | None = None, seed: int = 0) -> None:
        if accel <= 0:
            raise InputError(None, "accel", "time acceleration must be positive")
        if isinstance(trace, TraceWriter):  # its file written by a thread, off the event loop
            trace = BackgroundTraceWriter(trace)
        self.engine, self.overheads, self.tok = engine, overheads, tokenizer
        self.model_name, self.accel = model_name, float(accel)
        self.trace: BackgroundTraceWriter | None = trace
        self.engine.emit_tokens = True
        self.engine.record_steps = trace is not None
        self.rng = np.random.default_rng(seed)
        self.t0 = time.monotonic()
        self.vt = 0.0  # virtual time (µs) when the engine is next free
        self.pending: list[tuple[float, int, _Live]] = []  # heap of (queued_us, seq, live): API overhead not over
        self.seq = itertools.count()
        self.live: dict[str, _Live] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "preemptions": 0}
        self.finished_by_reason: dict[str, int] = {}  # vllm:request_success_total
        self.aborts: dict[str, int] = {}  # twin:request_abort_total: client_disconnect | engine | shutdown
        self.ttft: list[float] = []

    # clock ------------------------------------------------------------------------------------
    def sim_now(self) -> float:
        return (time.monotonic() - self.t0) * self.accel * 1e6

    async def sleep_until(self, sim_us: float) -> None:
        delay = (sim_us - self.sim_now()) / self.accel / 1e6
        if delay > 0:
            await asyncio.sleep(delay)

    # engine loop -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.task is None:
            # what exists now (imports, model tables, tokenizer) lives as long as the server: out of the garbage
            # collector's full passes, which otherwise stop the event loop for 0.1-0.5 s under a traced load
            gc.collect()
            gc.freeze()
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the engine loop, abort what is still in flight (reason ``shutdown``) and close the trace: the
        writer thread writes everything enqueued, closes the open step span and the file."""
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
            gc.unfreeze()
        for live in list(self.live.values()):
            self.abort(live, "shutdown")
        if self.trace is not None:
            await asyncio.to_thread(self.trace.close)

    @property
    def idle(self) -> bool:
        """Nothing in flight: no request waiting, running, or being sent."""
        return not self.live and not self.engine.has_work

    async def trace_synced(self) -> None:
        """When idle, wait until the trace writer has written every record (the run's window is on disk)."""
        if self.trace is not None and self.idle:
            self.trace.flush()
            await asyncio.to_thread(self.trace.sync, TRACE_SYNC_TIMEOUT_S)

    async def _run(self) -> None:
        eng = self.engine
        last_yield = time.monotonic()
        while True:
            start = max(self.vt, self.sim_now()) if not eng.has_work else self.vt
            while self.pending and self.pending[0][0] <= start:
                q, _, arrived = heapq.heappop(self.pending)
                if not arrived.done:
                    eng.add_request(arrived.req, q)
            if not eng.has_work:
                if self.trace is not None:
                    self.trace.flush()  # like an exporter's flush: idle engine, nothing more to batch
                self.wake.clear()
                if self.pending:
                    nxt = self.pending[0][0]
                    try:
                        await asyncio.wait_for(self.wake.wait(), max(0.0, (nxt - self.sim_now()) / self.accel / 1e6))
                    except TimeoutError:
                        pass
                    self.vt = max(self.vt, min(nxt, self.sim_now()))
                else:
                    await self.wake.wait()
                continue
            out = eng.step(start)
            if out is None:
                self.vt = start
                await asyncio.sleep(0)
                continue
            end = start + out.duration_us
            self.vt = end
            if out.record is not None and self.trace is not None:  # records are kept only with a trace
                self.trace.write_step(out.record)  # enqueued: the writer thread serialises it
            self.counters["preemptions"] += len(out.preempted)
            for ev in eng.drain_events():
                live = self.live.get(ev.request_id)
                if live is not None:
                    live.events.append(ev)
            # yield also when behind the wall clock (at least every ENGINE_SLICE_S): HTTP handlers (/health,
            # disconnects, new requests, streams) run between steps instead of after the whole backlog
            delay = (end - self.sim_now()) / self.accel / 1e6
            if delay > 0:
                await asyncio.sleep(delay)
                last_yield = time.monotonic()
            elif time.monotonic() - last_yield >= ENGINE_SLICE_S:
                await asyncio.sleep(0)
                last_yield = time.monotonic()
            for req, _finished in out.tokens:
                live = self.live.get(req.request_id)
                if live is not None:
                    live.queue.put_nowait((live.index, "token", 1))
            for req in out.finished:
                live = self.live.get(req.request_id)
                if live is not None:
                    req.departed_us = req.finished_us + self.overheads.post_us(req)
                    live.queue.put_nowait((live.index, "done", req.status))

    # requests --------------------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """vLLM's admission checks for one prompt (InputError → HTTP 400), without submitting anything."""
        self.engine.check_request(Request("check", 0.0, prompt_tokens, max_tokens))

    def submit(self, request_id: str, prompt_tokens: int, max_tokens: int, ignore_eos: bool, *,
               queue: asyncio.Queue[tuple[int, str, object]] | None = None, index: int = 0) -> _Live:
        arrival = self.sim_now()
        natural = None if ignore_eos else int(self.rng.geometric(1 / NATURAL_LEN_MEAN))
        req = Request(request_id, arrival, prompt_tokens, max_tokens, ignore_eos, natural)
        self.engine.check_request(req)
        live = _Live(req, index=index) if queue is None else _Live(req, queue, index)
        live.events.append(R.RequestEvent(request_id, R.ARRIVED, int(arrival * 1000), num_prompt_tokens=prompt_tokens,
                                          max_tokens=max_tokens))
        self.live[request_id] = live
        heapq.heappush(self.pending, (arrival + self.overheads.api_us(req), next(self.seq), live))
        self.counters["prompt_tokens"] += prompt_tokens
        self.wake.set()
        return live

    def abort(self, live: _Live, reason: str = "client_disconnect") -> None:
        """Abort a request in flight (the client left, or the server stops) and wake its handler."""
        if live.done:
            return
        self.complete(live, aborted=True, reason=reason)
        live.queue.put_nowait((live.index, "abort", None))

    def complete(self, live: _Live, aborted: bool = False, reason: str = "client_disconnect") -> None:
        """The response is out (or the client left): record DEPARTED/ABORTED and export the request. An abort
        frees the request in the engine (waiting or running) and is counted under ``reason``."""
        if live.done:
            return
        live.done = True
        req = live.req
        if aborted:
            self.aborts[reason] = self.aborts.get(reason, 0) + 1
        elif req.status == "abort":  # the engine gave up on it (larger than the KV cache)
            self.aborts["engine"] = self.aborts.get("engine", 0) + 1
        if aborted and not req.status:
            self.engine.abort(req.request_id, self.vt)
            for ev in self.engine.drain_events():
                other = self.live.get(ev.request_id)
                if other is not None:
                    other.events.append(ev)
        kind = R.ABORTED if aborted else R.DEPARTED
        t = req.departed_us if not aborted and not math.isnan(req.departed_us) else self.sim_now()
        live.events.append(R.RequestEvent(req.request_id, kind, int(t * 1000), num_prompt_tokens=req.prompt_tokens,
                                          num_output_tokens=req.output_tokens))
        self.counters["generation_tokens"] += req.output_tokens
        status = "abort" if aborted else req.status
        self.finished_by_reason[status] = self.finished_by_reason.get(status, 0) + 1
        if not math.isnan(req.first_token_us):
            self.ttft.append((req.first_token_us - req.arrival_us) / 1e6)
        self.live.pop(req.request_id, None)
        if self.trace is not None:
            self.trace.write_request(live.events)
            if not self.live:
                self.trace.flush()  # the last response is out: a run's window ends with its spans on disk

    def metrics_text(self) -> str:
        m = f'model_name="{self.model_name}"'
        lines = []

        def metric(name: str, kind: str, help_: str, value: float, labels: str = m) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(value)}"])

        eng = self.engine
        metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", eng.n_running)
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               len(eng.waiting) + sum(1 for *_, lv in self.pending if not lv.done))
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage)
        metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
               self.counters["preemptions"])
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               self.counters["prompt_tokens"])
        metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               self.counters["generation_tokens"])
        lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
                  "# TYPE vllm:request_success_total counter"]
        for reason, n in sorted(self.finished_by_reason.items()):
            lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{m}}} {float(n)}')
        lines += ["# HELP twin:request_abort_total Requests aborted before their response was out, by reason "
                  "(client_disconnect: the client went away; engine: the scheduler gave up on it; shutdown).",
                  "# TYPE twin:request_abort_total counter"]
        for reason in sorted({"client_disconnect", *self.aborts}):
            lines.append(f'twin:request_abort_total{{reason="{reason}",{m}}} {float(self.aborts.get(reason, 0))}')
        buckets = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
        lines += ["# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
                  "# TYPE vllm:time_to_first_token_seconds histogram"]
        t = np.array(self.ttft)
        for b in buckets:
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{b}",{m}}} {float((t <= b).sum())}')
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",{m}}} {float(len(t))}')
        lines.append(f"vllm:time_to_first_token_seconds_count{{{m}}} {float(len(t))}")
        lines.append(f"vllm:time_to_first_token_seconds_sum{{{m}}} {float(t.sum())}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# HTTP


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def create_app(server: TwinServer) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        yield
        await server.stop()

    app = FastAPI(title="rooflab twin (vLLM-compatible)", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        # vLLM answers malformed bodies with 400 BadRequestError
        first = exc.errors()[0] if exc.errors() else {}
        return error_response(400, str(first.get("msg", "invalid request")), "BadRequestError")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        await server.trace_synced()  # idle: the spans of everything finished are on disk before we say so
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=None)  # the annotation below is for mypy, not a response model
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": server.model_name, "parent": None, "max_model_len": server.engine.max_model_len,
            "permission": []}]}

    async def parse(http: HttpRequest) -> dict | JSONResponse:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(400, f"JSON decode error: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        return body

    def request_ids(http: HttpRequest, k: int) -> tuple[str, list[str]]:
        """The base id (X-Request-Id or random) and the engine request ids: the base for one prompt, as the
        twin's traces always had it; ``<base>-<i>`` per prompt of a batch, as vLLM names them."""
        rid = http.headers.get("x-request-id") or uuid.uuid4().hex

        def ids(base: str) -> list[str]:
            return [base] if k == 1 else [f"{base}-{i}" for i in range(k)]

        while any(x in server.live for x in ids(rid)):
            rid = f"{rid}-{uuid.uuid4().hex[:6]}"
        return rid, ids(rid)

    async def watch_disconnect(http: HttpRequest, lives: list[_Live]) -> None:
        """Abort the requests when the client goes away (ASGI ``http.disconnect``; the body is read already, so
        the next message is the disconnect — or the end of the response, when every request is done)."""
        try:
            while (await http.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the ASGI server has no more messages for this request: nothing to watch
            return
        for live in lives:
            server.abort(live, "client_disconnect")

    async def handle(http: HttpRequest, chat: bool) -> Response:
        body = await parse(http)
        if isinstance(body, JSONResponse):
            return body
        try:
            spec = validate(body, chat, model_name=server.model_name, tok=server.tok,
                            max_model_len=server.engine.max_model_len, check=server.check)
        except Rejected as exc:
            return exc.response
        except InputError as exc:
            return error_response(400, exc.problem, "BadRequestError", exc.field)
        rid, ids = request_ids(http, len(spec.prompt_tokens))
        queue: asyncio.Queue[tuple[int, str, object]] = asyncio.Queue()
        lives = [server.submit(x, p, mt, spec.ignore_eos, queue=queue, index=i)
                 for i, (x, p, mt) in enumerate(zip(ids, spec.prompt_tokens, spec.max_tokens))]
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(http, lives))
        headers = {"X-Request-Id": rid}
        created = int(time.time())
        cid = ("chatcmpl-" if chat else "cmpl-") + rid
        obj = "chat.completion.chunk" if chat else "text_completion"
        rng = np.random.default_rng(abs(hash(rid)) % (2**32))

        def usage() -> dict[str, int]:
            n_in = sum(spec.prompt_tokens)
            n_out = sum(lv.req.output_tokens for lv in lives)
            return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

        def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                        "finish_reason": finish, "stop_reason": None}
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return _sse({"id": cid, "object": obj, "created": created, "model": server.model_name,
                         "choices": choices, **extra})

        def finish_reason(status: object) -> str:
            return "stop" if status == "stop" else "length"

        if spec.stream:
            async def events() -> AsyncIterator[bytes]:
                try:
                    if chat:
                        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}])
                    remaining, sent = len(lives), 0
                    while remaining:
                        i, kind, value = await queue.get()
                        if kind == "abort":
                            return
                        if kind == "token":
                            yield chunk([choice(i, server.tok.output_tokens(rng, 1)[0], None)])
                        else:
                            await server.sleep_until(lives[i].req.departed_us)
                            if lives[i].done:  # aborted meanwhile
                                return
                            yield chunk([choice(i, "", finish_reason(value))])
                            remaining -= 1
                        sent += 1
                        if sent % YIELD_EVERY_CHUNKS == 0:  # a backlog drains without awaiting: let others in
                            await asyncio.sleep(0)
                    if spec.include_usage:
                        yield chunk([], usage=usage())
                    yield b"data: [DONE]\n\n"
                    for lv in lives:
                        server.complete(lv)
                finally:
                    watcher.cancel()
                    for lv in lives:
                        server.abort(lv, "client_disconnect")  # no-op for a request already completed

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        counts = [0] * len(lives)
        finish: list[object] = [None] * len(lives)
        try:
            remaining = len(lives)
            while remaining:
                i, kind, value = await queue.get()
                if kind == "token":
                    counts[i] += 1
                elif kind == "done":
                    finish[i] = value
                    remaining -= 1
                else:
                    break
            else:
                await server.sleep_until(max(lv.req.departed_us for lv in lives))
        except asyncio.CancelledError:
            for lv in lives:
                server.abort(lv, "client_disconnect")
            raise
        finally:
            watcher.cancel()
        if any(lv.done for lv in lives):  # the client left (vLLM answers so, to nobody)
            for lv in lives:
                server.abort(lv, "client_disconnect")
            return error_response(400, "Client disconnected", "BadRequestError")
        for lv in lives:
            server.complete(lv)
        choices: list[dict[str, Any]] = []
        for i in range(len(lives)):
            text = "".join(server.tok.output_tokens(rng, counts[i]))
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": finish_reason(finish[i]), "stop_reason": None})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason(finish[i]),
                                "stop_reason": None})
        return JSONResponse({"id": cid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": server.model_name, "choices": choices, "usage": usage()},
                            headers=headers)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Response:
        return await handle(http, chat=True)

    return app


def build_server(model: str, hardware: str, tp: int, *, accel: float = 1.0, trace_path: str | Path | None = None,
                 seed: int = 0, served_model_name: str | None = None, engine_config: EngineConfig | None = None,
                 tokenizer_path: str | Path | None = None) -> TwinServer:
    """A twin server for (model, TP, hardware) with the hidden truth model as its step timer."""
    from rooflab.model.arch import load_model
    from rooflab.model.engine_config import EngineConfig
    from rooflab.model.hardware import load_hardware
    from rooflab.twin.tokenizer import get_tokenizer
    from rooflab.twin.truth import TruthModel

    arch = load_model(model)
    hw = load_hardware(hardware)
    truth = TruthModel.from_config(hw.name, arch, tp, seed=seed)
    engine = Engine(arch, hw, tp, truth, engine_config or EngineConfig(), seed=seed)
    trace = None
    if trace_path is not None:
        from rooflab.twin.otel import TraceWriter

        trace = TraceWriter(trace_path)
    return TwinServer(engine, truth, get_tokenizer(str(tokenizer_path) if tokenizer_path else None),
                      model_name=served_model_name or arch.name, accel=accel, trace=trace, seed=seed)
