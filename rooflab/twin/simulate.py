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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from rooflab.data.tables import validate_requests, validate_steps
from rooflab.errors import InputError
from rooflab.twin import records as R
from rooflab.twin.engine import Engine, Request

AGGREGATES = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
              "decode_reqs", "decode_context", "kv_usage", "preemptions", "running", "waiting", "prefill_prompt_pairs",
              "prefill_cached_tokens")


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

    def __init__(self, alpha: Sequence[float]) -> None:
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

    def __init__(self, alpha: Sequence[float]) -> None:
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
class ClientPlan:
    """How the client releases requests beyond their open-loop arrival times:

    * closed-loop rounds (``depends_on``): a request is sent ``think_us`` after the request it depends on has
      produced its last token (BLIS's completion time); a round whose predecessor failed is cancelled, like
      the rest of its session;
    * sequential stages (``stages``, inference-perf's multi-stage runs): stage k+1 starts ``stage_gap_us`` after
      the last response of stage k; its requests arrive at that start + their ``stage_offset_us``.
    """

    depends_on: dict[str, str] = field(default_factory=dict)
    think_us: dict[str, float] = field(default_factory=dict)
    stages: list[list[str]] = field(default_factory=list)  # request ids per stage, in order
    stage_offset_us: dict[str, float] = field(default_factory=dict)
    stage_gap_us: float = 0.0


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
    cancelled: int = 0  # closed-loop rounds never sent because an earlier round of their session failed

    def step_arrays(self) -> dict[str, np.ndarray]:
        a = np.array(self.aggregates, dtype=np.float64).reshape(-1, len(AGGREGATES))
        return {"t_start_us": np.array(self.starts_us, dtype=np.float64),
                "step_time_us": np.array(self.durations_us, dtype=np.float64),
                **{c: a[:, i] for i, c in enumerate(AGGREGATES)}}


def run_requests(engine: Engine, requests: list[Request], *, overheads: RequestOverheads | None = None,
                 trace: TraceSink | None = None, timeout_us: float | None = None, record: bool = True,
                 max_steps: int | None = None, max_concurrency: int | None = None,
                 client: ClientPlan | None = None) -> LoopResult:
    """Run ``requests`` to completion (or ``max_steps``). ``record``: keep every step's start, duration and
    aggregates (steps with a forward pass). ``trace`` turns on the engine's per-step records.
    ``max_concurrency``: a closed-loop client that keeps at most this many requests in flight — a request is
    sent at its arrival or, when all slots are busy, the moment a response completes (its ``arrival_us`` becomes
    that send time, which the client's TTFT and E2E count from). ``client``: closed-loop rounds and sequential
    stages (:class:`ClientPlan`)."""
    if max_concurrency and client:
        raise InputError(None, "max_concurrency", "a concurrency-capped client cannot also have closed-loop rounds "
                         "or sequential stages")
    ovh: RequestOverheads = overheads or NoOverheads()
    engine.record_steps = trace is not None
    heap: list[tuple[float, int, Request]] = []  # (queue-entry time, seq, request) of sent requests
    deadlines: list[tuple[float, int, Request]] = []  # (arrival + client timeout, seq, request)
    pending: dict[str, list[R.RequestEvent]] = {}
    unsent = sorted(requests, key=lambda r: r.arrival_us) if max_concurrency else []
    frees: list[float] = []  # when busy client slots free up (capped runs)
    seq = 0

    def send(req: Request) -> None:
        nonlocal seq
        heapq.heappush(heap, (req.arrival_us + ovh.api_us(req), seq, req))
        if timeout_us is not None:
            heapq.heappush(deadlines, (req.arrival_us + timeout_us, seq, req))
        if trace is not None:
            pending[req.request_id] = [R.RequestEvent(req.request_id, R.ARRIVED, int(req.arrival_us * 1000),
                                                      num_prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens)]
        seq += 1

    res = LoopResult(0, 0.0)
    plan = client or ClientPlan()
    by_id = {r.request_id: r for r in requests} if client else {}
    children: dict[str, list[Request]] = {}
    for rid, dep in plan.depends_on.items():
        children.setdefault(dep, []).append(by_id[rid])
    stage_of = {rid: k for k, ids in enumerate(plan.stages) for rid in ids}
    left_in_stage = [len(ids) for ids in plan.stages]
    stage_end = [0.0] * len(plan.stages)
    held = set(plan.depends_on) | {rid for ids in plan.stages[1:] for rid in ids}

    def release_stage(k: int, t0: float) -> None:
        for rid in plan.stages[k]:
            if rid not in plan.depends_on:
                req = by_id[rid]
                req.arrival_us = t0 + plan.stage_offset_us.get(rid, 0.0)
                send(req)
        if not plan.stages[k]:
            finish_stage(k, t0)

    def finish_stage(k: int, t: float) -> None:
        if k + 1 < len(plan.stages):
            release_stage(k + 1, t + plan.stage_gap_us)

    def done(req: Request, t: float, ok: bool) -> None:
        """``req``'s response completed (``ok``) or failed at ``t``: free its client slot, release or cancel the
        rounds that wait on it, and close its stage when it was the last."""
        if max_concurrency:
            heapq.heappush(frees, t)
        if not client:
            return
        for nxt in children.get(req.request_id, ()):
            if ok:
                nxt.arrival_us = req.finished_us + plan.think_us.get(nxt.request_id, 0.0)
                send(nxt)
            else:
                nxt.status = "cancelled"
                res.cancelled += 1
                done(nxt, t, False)
        k = stage_of.get(req.request_id)
        if k is not None:
            left_in_stage[k] -= 1
            stage_end[k] = max(stage_end[k], t)
            if left_in_stage[k] == 0:
                finish_stage(k, stage_end[k])

    if max_concurrency:
        for req in unsent[:max_concurrency]:
            send(req)
        ui = min(max_concurrency, len(unsent))
    else:
        for req in requests:
            if req.request_id not in held:
                send(req)
        ui = 0
    now = 0.0
    while True:
        while frees and frees[0] <= now and ui < len(unsent):
            t = heapq.heappop(frees)
            req = unsent[ui]
            ui += 1
            req.arrival_us = max(req.arrival_us, t)
            send(req)
        while heap and heap[0][0] <= now:
            queued_at, _, req = heapq.heappop(heap)
            try:
                engine.add_request(req, queued_at)
            except InputError:  # what vLLM answers with HTTP 400: the request fails, the run goes on
                req.status = "rejected"
                res.rejected += 1
                done(req, queued_at, False)
        while deadlines and deadlines[0][0] <= now:
            deadline, _, req = heapq.heappop(deadlines)
            if not req.status and not math.isnan(req.queued_us) and engine.abort(req.request_id, now):
                res.aborted += 1
                req.departed_us = deadline
                done(req, deadline, False)
        if not engine.has_work:
            nxt = min(heap[0][0] if heap else math.inf, frees[0] if (frees and ui < len(unsent)) else math.inf)
            if nxt == math.inf:
                break
            now = max(now, nxt)
            continue
        out = engine.step(now)
        if out is None:
            nxt = min(heap[0][0] if heap else math.inf, frees[0] if (frees and ui < len(unsent)) else math.inf)
            if nxt == math.inf:
                break
            now = max(now, nxt)
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
                done(req, req.departed_us, req.status != "abort")
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
