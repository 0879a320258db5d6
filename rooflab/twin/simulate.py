"""Fast mode: the one discrete-event loop that runs requests through a twin engine — no HTTP, no sleeping.

Every consumer runs this loop: the direct launcher and the benchmarks (the engine with the hidden truth model
as its step timer), targeting's candidate predictions and replay (the engine with a fitted step model).

Arrivals reach the engine after the API overhead (α0); every step advances the clock by its step time;
finished requests depart after the post-decode overhead (α1 + α2·n_out). Optional: client timeouts (a request
still unfinished ``timeout_us`` after its arrival is aborted, as vLLM aborts a disconnected request), an OTEL
trace writer, a step cap. :func:`simulate` returns the step and request tables (rooflab schemas);
:func:`run_requests` the raw loop result for callers that build their own tables (replay).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from rooflab.data.tables import validate_requests, validate_steps
from rooflab.errors import InputError
from rooflab.twin import records as R
from rooflab.twin.engine import Engine, Request

AGGREGATES = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
              "decode_reqs", "decode_context", "kv_usage", "preemptions", "running", "waiting", "prefill_prompt_pairs")


class RequestOverheads(Protocol):
    """What a request costs outside the engine's steps (the α terms). Owned here, by the loop that calls it:
    ``api_us`` — arrival to queue entry; ``post_us`` — last token to departure; ``first_token_us`` — what the
    client sees added to the first token's time without delaying the engine (BLIS's α2 on TTFT; 0 for vLLM's
    own timing)."""

    def api_us(self, req: Request) -> float: ...

    def post_us(self, req: Request) -> float: ...

    def first_token_us(self, req: Request) -> float: ...


class TraceSink(Protocol):
    """Where per-step records and per-request event lists go (``rooflab.twin.otel.TraceWriter``)."""

    def write_step(self, record: R.StepRecord) -> None: ...

    def write_request(self, events: list[R.RequestEvent]) -> None: ...


class NoOverheads:
    def api_us(self, req: Request) -> float:
        return 0.0

    def post_us(self, req: Request) -> float:
        return 0.0

    def first_token_us(self, req: Request) -> float:
        return 0.0


class ConstantOverheads:
    """α0 before the queue, α1 + α2·n_out after the last token: a fitted α."""

    def __init__(self, alpha: tuple[float, float, float] | list[float]):
        self.a0, self.a1, self.a2 = map(float, alpha)

    def api_us(self, req: Request) -> float:
        return self.a0

    def post_us(self, req: Request) -> float:
        return self.a1 + self.a2 * req.output_tokens

    def first_token_us(self, req: Request) -> float:
        return 0.0


class BlisOverheads:
    """BLIS's α semantics (docs/blis.md §5): each α truncated to whole µs; α0 delays queue entry; α2 is added
    once to TTFT and once to every inter-token interval, α1 once at the end — so E2E = last token + α2·n_out
    + α1, as :class:`ConstantOverheads`, and TTFT gains α2 — none of which delays the simulated GPU."""

    def __init__(self, alpha: tuple[float, float, float] | list[float]):
        self.a0, self.a1, self.a2 = (float(math.trunc(a)) for a in alpha)

    def api_us(self, req: Request) -> float:
        return self.a0

    def post_us(self, req: Request) -> float:
        return (self.a1 if req.output_tokens > 0 else 0.0) + self.a2 * req.output_tokens

    def first_token_us(self, req: Request) -> float:
        return self.a2


class RecordedOverheads:
    """Per-request overheads by request id (replaying a run with the overheads it had)."""

    def __init__(self, api: dict[str, float], post: dict[str, float]):
        self.api, self.post = api, post

    def api_us(self, req: Request) -> float:
        return float(self.api[req.request_id])

    def post_us(self, req: Request) -> float:
        return float(self.post[req.request_id])

    def first_token_us(self, req: Request) -> float:
        return 0.0


@dataclass
class LoopResult:
    n_steps: int
    end_us: float
    step_ids: list[int] = field(default_factory=list)
    starts_us: list[float] = field(default_factory=list)
    durations_us: list[float] = field(default_factory=list)
    aggregates: list[tuple] = field(default_factory=list)
    max_waiting: int = 0
    aborted: int = 0
    rejected: int = 0

    def step_arrays(self) -> dict[str, np.ndarray]:
        a = np.array(self.aggregates, dtype=np.float64).reshape(-1, len(AGGREGATES))
        return {"t_start_us": np.array(self.starts_us, dtype=np.float64),
                "step_time_us": np.array(self.durations_us, dtype=np.float64),
                **{c: a[:, i] for i, c in enumerate(AGGREGATES)}}


def run_requests(engine: Engine, requests: list[Request], *, overheads: RequestOverheads | None = None,
                 trace: TraceSink | None = None, timeout_us: float | None = None, record: bool = True,
                 max_steps: int | None = None) -> LoopResult:
    """Run ``requests`` to completion (or ``max_steps``). ``record``: keep every step's start, duration and
    aggregates (steps with a forward pass). ``trace`` turns on the engine's per-step records."""
    ovh: RequestOverheads = overheads or NoOverheads()
    engine.record_steps = trace is not None
    heap: list[tuple[float, int, Request]] = []
    for seq, req in enumerate(requests):
        heapq.heappush(heap, (req.arrival_us + ovh.api_us(req), seq, req))
    pending: dict[str, list[R.RequestEvent]] = {}
    if trace is not None:
        for r in requests:
            pending[r.request_id] = [R.RequestEvent(r.request_id, R.ARRIVED, int(r.arrival_us * 1000),
                                                    num_prompt_tokens=r.prompt_tokens, max_tokens=r.max_tokens)]
    by_deadline = sorted(requests, key=lambda r: r.arrival_us) if timeout_us is not None else []
    di = 0
    res = LoopResult(0, 0.0)
    now = 0.0
    while True:
        while heap and heap[0][0] <= now:
            queued_at, _, req = heapq.heappop(heap)
            try:
                engine.add_request(req, queued_at)
            except InputError:  # what vLLM answers with HTTP 400: the request fails, the run goes on
                req.status = "rejected"
                res.rejected += 1
        if timeout_us is not None:
            while di < len(by_deadline) and by_deadline[di].arrival_us + timeout_us <= now:
                req = by_deadline[di]
                di += 1
                if not req.status and not math.isnan(req.queued_us) and engine.abort(req.request_id, now):
                    res.aborted += 1
                    req.departed_us = req.arrival_us + timeout_us
        if not engine.has_work:
            if not heap:
                break
            now = heap[0][0]
            continue
        out = engine.step(now)
        if out is None:
            if not heap:
                break
            now = heap[0][0]
            continue
        if record and out.aggregates is not None and out.duration_us > 0:
            res.step_ids.append(out.step_id)
            res.starts_us.append(now)
            res.durations_us.append(out.duration_us)
            res.aggregates.append(out.aggregates)
        if trace is not None and out.record is not None:
            trace.write_step(out.record)
        w = len(engine.waiting)
        if w > res.max_waiting:
            res.max_waiting = w
        now += out.duration_us
        for req in out.finished:
            if math.isnan(req.departed_us):  # a timed-out request departed when its client gave up
                req.departed_us = req.finished_us + ovh.post_us(req)
        if trace is not None:
            for ev in engine.drain_events():
                pending[ev.request_id].append(ev)
            for req in out.finished:
                evs = pending.pop(req.request_id)
                evs.append(R.RequestEvent(req.request_id, R.DEPARTED if req.status != "abort" else R.ABORTED,
                                          int(req.departed_us * 1000), num_prompt_tokens=req.prompt_tokens,
                                          num_output_tokens=req.output_tokens))
                trace.write_request(evs)
        res.n_steps += 1
        if max_steps is not None and res.n_steps >= max_steps:
            break
    if trace is None:
        engine.drain_events()
    res.end_us = now
    return res


@dataclass
class SimResult:
    steps: pd.DataFrame
    requests: pd.DataFrame
    sim_time_us: float
    n_steps: int


def simulate(engine: Engine, requests: list[Request], *, overheads: RequestOverheads | None = None,
             trace: TraceSink | None = None, run_id: str = "sim", model: str | None = None,
             hardware: str | None = None, max_steps: int | None = None) -> SimResult:
    """Run ``requests`` to completion (or ``max_steps``) and return the step and request tables."""
    loop = run_requests(engine, requests, overheads=overheads, trace=trace, max_steps=max_steps)
    steps = pd.DataFrame({c: v for c, v in loop.step_arrays().items() if c in AGGREGATES})
    steps.insert(0, "run_id", run_id)
    steps.insert(1, "step_id", np.array(loop.step_ids, np.int64))
    steps["model"] = model or engine.arch.name
    steps["tp"] = engine.tp
    steps["hardware"] = hardware or engine.hardware.name
    steps["t_start_us"] = np.array(loop.starts_us)
    steps["step_time_us"] = np.array(loop.durations_us)
    reqs = pd.DataFrame({
        "run_id": run_id, "request_id": [r.request_id for r in requests],
        "arrived_us": [r.arrival_us for r in requests], "queued_us": [r.queued_us for r in requests],
        "scheduled_us": [r.scheduled_us for r in requests], "first_token_us": [r.first_token_us for r in requests],
        "finished_us": [r.finished_us for r in requests], "departed_us": [r.departed_us for r in requests],
        "prompt_tokens": [r.prompt_tokens for r in requests], "output_tokens": [r.output_tokens for r in requests],
        "preemptions": [r.preemptions for r in requests],
        "status": [r.status or "unfinished" for r in requests]})
    return SimResult(validate_steps(steps, run_id), validate_requests(reqs, run_id), loop.end_us, loop.n_steps)


def constant_rate_workload(rate_per_s: float, n: int, prompt_tokens: int, max_tokens: int, *, seed: int = 0,
                           poisson: bool = True) -> list[Request]:
    """n requests at ``rate_per_s`` (Poisson or evenly spaced) with fixed lengths (ignore_eos)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1e6 / rate_per_s, n) if poisson else np.full(n, 1e6 / rate_per_s)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Request(f"req-{i}", float(t), prompt_tokens, max_tokens) for i, t in enumerate(arrivals)]
