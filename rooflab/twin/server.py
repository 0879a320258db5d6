"""The twin's OpenAI-compatible HTTP server (what inference-perf talks to).

Endpoints as vLLM serves them: ``/v1/completions`` and ``/v1/chat/completions`` (streaming with exact
``data: `` SSE framing and ``[DONE]``, or a single JSON body), ``/v1/models``, ``/health``, ``/metrics``
(vLLM's metric names), ``usage`` blocks, ``X-Request-Id``, and vLLM's error bodies and status codes.

Time: the engine runs on a virtual clock in simulated microseconds, paced against the wall clock divided
by the acceleration factor (``--accel 20``: a 2-minute workload takes 6 s). Every step starts when the
previous one ends (or when work arrives on an idle engine); traces and the engine keep simulated,
unaccelerated time. A request's journey: api.ARRIVED → (α0) → journey.QUEUED → scheduled steps →
FINISHED → (α1 + α2·n_out) → api.DEPARTED, when the last bytes are sent.
"""

from __future__ import annotations

import asyncio
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
from rooflab.twin.tokenizer import TwinTokenizer

if TYPE_CHECKING:
    from rooflab.model.engine_config import EngineConfig
    from rooflab.twin.otel import TraceWriter
    from rooflab.twin.simulate import RequestOverheads

DEFAULT_MAX_TOKENS = 16
NATURAL_LEN_MEAN = 128  # mean output length when ignore_eos is off (geometric)


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    """vLLM's ErrorResponse body."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


@dataclass(eq=False)
class _Live:
    """A request in flight: what the HTTP handler waits on."""

    req: Request
    queue: asyncio.Queue[tuple[str, object]] = field(default_factory=asyncio.Queue)  # ("token", 1) / ("done", status)
    events: list[R.RequestEvent] = field(default_factory=list)
    done: bool = False


class TwinServer:
    def __init__(self, engine: Engine, overheads: RequestOverheads, tokenizer: TwinTokenizer, *, model_name: str,
                 accel: float = 1.0, trace: TraceWriter | None = None, seed: int = 0) -> None:
        if accel <= 0:
            raise InputError(None, "accel", "time acceleration must be positive")
        self.engine, self.overheads, self.tok = engine, overheads, tokenizer
        self.model_name, self.accel, self.trace = model_name, float(accel), trace
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
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        if self.trace is not None:
            self.trace.close()  # closes the open step span and exports everything pending

    async def _run(self) -> None:
        eng = self.engine
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
                self.trace.write_step(out.record)
            self.counters["preemptions"] += len(out.preempted)
            for ev in eng.drain_events():
                live = self.live.get(ev.request_id)
                if live is not None:
                    live.events.append(ev)
            await self.sleep_until(end)
            for req, _finished in out.tokens:
                live = self.live.get(req.request_id)
                if live is not None:
                    live.queue.put_nowait(("token", 1))
            for req in out.finished:
                live = self.live.get(req.request_id)
                if live is not None:
                    req.departed_us = req.finished_us + self.overheads.post_us(req)
                    live.queue.put_nowait(("done", req.status))

    # requests --------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_tokens: int, max_tokens: int, ignore_eos: bool) -> _Live:
        arrival = self.sim_now()
        natural = None if ignore_eos else int(self.rng.geometric(1 / NATURAL_LEN_MEAN))
        req = Request(request_id, arrival, prompt_tokens, max_tokens, ignore_eos, natural)
        self.engine.check_request(req)
        live = _Live(req)
        live.events.append(R.RequestEvent(request_id, R.ARRIVED, int(arrival * 1000), num_prompt_tokens=prompt_tokens,
                                          max_tokens=max_tokens))
        self.live[request_id] = live
        heapq.heappush(self.pending, (arrival + self.overheads.api_us(req), next(self.seq), live))
        self.counters["prompt_tokens"] += prompt_tokens
        self.wake.set()
        return live

    def complete(self, live: _Live, aborted: bool = False) -> None:
        """The response is out (or the client left): record DEPARTED/ABORTED and export the request."""
        if live.done:
            return
        live.done = True
        req = live.req
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
               len(eng.waiting) + len(self.pending))
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
    async def _invalid(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        # vLLM answers malformed bodies with 400 BadRequestError
        first = exc.errors()[0] if exc.errors() else {}
        return error_response(400, str(first.get("msg", "invalid request")), "BadRequestError")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
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
        model = body.get("model")
        if model is not None and model != server.model_name:
            return error_response(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return body

    def request_id(http: HttpRequest) -> str:
        rid = http.headers.get("x-request-id") or uuid.uuid4().hex
        while rid in server.live:
            rid = f"{rid}-{uuid.uuid4().hex[:6]}"
        return rid

    async def handle(http: HttpRequest, chat: bool) -> Response:
        body = await parse(http)
        if isinstance(body, JSONResponse):
            return body
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    return error_response(400, "messages must be a non-empty list", "BadRequestError", "messages")
                prompt_tokens = server.tok.count(server.tok.chat_prompt(messages))
                max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
                    prompt_tokens = len(prompt)
                elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt_tokens = server.tok.count(prompt[0])
                elif isinstance(prompt, str):
                    prompt_tokens = server.tok.count(prompt)
                else:
                    return error_response(400, "prompt must be a string or a list of token ids", "BadRequestError",
                                          "prompt")
                max_tokens = body.get("max_tokens")
            if max_tokens is None:
                max_tokens = DEFAULT_MAX_TOKENS if not chat else server.engine.max_model_len - prompt_tokens
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                return error_response(400, f"max_tokens must be at least 1, got {max_tokens}.", "BadRequestError",
                                      "max_tokens")
            if (body.get("n") or 1) != 1:
                return error_response(400, "n > 1 is not supported by the twin", "BadRequestError", "n")
            rid = request_id(http)
            live = server.submit(rid, prompt_tokens, int(max_tokens), bool(body.get("ignore_eos", False)))
        except InputError as exc:
            return error_response(400, exc.problem, "BadRequestError", exc.field)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        headers = {"X-Request-Id": rid}
        created = int(time.time())
        cid = ("chatcmpl-" if chat else "cmpl-") + rid
        obj = "chat.completion.chunk" if chat else "text_completion"
        rng = np.random.default_rng(abs(hash(rid)) % (2**32))

        def usage() -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": live.req.output_tokens,
                    "total_tokens": prompt_tokens + live.req.output_tokens}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                        "finish_reason": finish, "stop_reason": None}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}

        if stream:
            async def events() -> AsyncIterator[bytes]:
                try:
                    if chat:
                        yield _sse({"id": cid, "object": obj, "created": created, "model": server.model_name,
                                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
                    while True:
                        kind, value = await live.queue.get()
                        if kind == "token":
                            text = server.tok.output_tokens(rng, 1)[0]
                            yield _sse({"id": cid, "object": obj, "created": created, "model": server.model_name,
                                        "choices": [choice(text, None)]})
                        else:
                            await server.sleep_until(live.req.departed_us)
                            yield _sse({"id": cid, "object": obj, "created": created, "model": server.model_name,
                                        "choices": [choice("", "length" if value != "stop" else "stop")]})
                            if include_usage:
                                yield _sse({"id": cid, "object": obj, "created": created, "model": server.model_name,
                                            "choices": [], "usage": usage()})
                            yield b"data: [DONE]\n\n"
                            server.complete(live)
                            return
                finally:
                    server.complete(live, aborted=not live.done)

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        try:
            n = 0
            while True:
                kind, value = await live.queue.get()
                if kind == "token":
                    n += 1
                    continue
                await server.sleep_until(live.req.departed_us)
                break
        except asyncio.CancelledError:
            server.complete(live, aborted=True)
            raise
        text = "".join(server.tok.output_tokens(rng, n))
        finish = "stop" if value == "stop" else "length"
        server.complete(live)
        if chat:
            ch = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish, "stop_reason": None}
        else:
            ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        return JSONResponse({"id": cid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": server.model_name, "choices": [ch], "usage": usage()},
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
