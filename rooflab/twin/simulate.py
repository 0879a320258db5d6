"""Fast mode: a discrete-event run of a workload through the twin engine — no HTTP, no sleeping.

Arrivals reach the engine after the API overhead (α0); every step advances the clock by its step time;
finished requests depart after the post-decode overhead (α1 + α2·n_out). The result holds the step and
request tables (rooflab schemas) and, when a trace writer is given, the instrumented-vLLM traces.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from rooflab.errors import InputError
from rooflab.data.tables import validate_requests, validate_steps
from rooflab.twin import records as R
from rooflab.twin.engine import Engine, Request

_AGG = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
        "decode_reqs", "decode_context", "kv_usage", "preemptions", "running", "waiting")


class RequestOverheads(Protocol):
    def api_overhead_us(self) -> float: ...

    def post_decode_overhead_us(self, n_out: int) -> float: ...


class NoOverheads:
    def api_overhead_us(self) -> float:
        return 0.0

    def post_decode_overhead_us(self, n_out: int) -> float:
        return 0.0


@dataclass
class SimResult:
    steps: pd.DataFrame
    requests: pd.DataFrame
    sim_time_us: float
    n_steps: int


def requests_from_frame(df: pd.DataFrame) -> list[Request]:
    """Workload rows (arrival_us, prompt_tokens, max_tokens[, request_id, ignore_eos, natural_len,
    prefix_group, prefix_tokens]) → engine requests."""
    out = []
    cols = set(df.columns)
    for i, row in enumerate(df.itertuples(index=False)):
        d = row._asdict()
        out.append(Request(str(d.get("request_id", i)) if "request_id" in cols else str(i), float(d["arrival_us"]),
                           int(d["prompt_tokens"]), int(d["max_tokens"]), bool(d.get("ignore_eos", True)),
                           int(d["natural_len"]) if "natural_len" in cols and not pd.isna(d["natural_len"]) else None,
                           d.get("prefix_group") if "prefix_group" in cols else None, int(d.get("prefix_tokens", 0) or 0)))
    return out


def simulate(engine: Engine, requests: list[Request], *, overheads: RequestOverheads | None = None,
             trace=None, run_id: str = "sim", model: str | None = None, hardware: str | None = None,
             max_steps: int | None = None) -> SimResult:
    """Run ``requests`` to completion (or ``max_steps``). ``trace``: an object with ``write_step(record)``
    and ``write_request(events)`` (``rooflab.twin.otel.TraceWriter``); enables per-step records."""
    overheads = overheads or NoOverheads()
    engine.record_steps = trace is not None
    heap = []
    for seq, req in enumerate(requests):
        heapq.heappush(heap, (req.arrival_us + overheads.api_overhead_us(), seq, req))
    pending_events: dict[str, list] = {}
    if trace is not None:
        for r in requests:
            pending_events[r.request_id] = [R.RequestEvent(r.request_id, R.ARRIVED, int(r.arrival_us * 1000),
                                                           num_prompt_tokens=r.prompt_tokens, max_tokens=r.max_tokens)]
    t_start, dur, agg, ids = [], [], [], []
    now = 0.0
    n_steps = 0
    while True:
        while heap and heap[0][0] <= now:
            q, _, req = heapq.heappop(heap)
            try:
                engine.add_request(req, q)
            except InputError:  # what vLLM answers with HTTP 400: the request fails, the run goes on
                req.status = "rejected"
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
        if out.aggregates is not None and out.duration_us > 0:
            ids.append(out.step_id)
            t_start.append(now)
            dur.append(out.duration_us)
            agg.append(out.aggregates)
        if trace is not None and out.record is not None:
            trace.write_step(out.record)
        now += out.duration_us
        for req in out.finished:
            req.departed_us = req.finished_us + overheads.post_decode_overhead_us(req.output_tokens)
        if trace is not None:
            for ev in engine.drain_events():
                pending_events[ev.request_id].append(ev)
            for req in out.finished:
                evs = pending_events.pop(req.request_id)
                evs.append(R.RequestEvent(req.request_id, R.DEPARTED if req.status != "abort" else R.ABORTED,
                                          int(req.departed_us * 1000), num_prompt_tokens=req.prompt_tokens,
                                          num_output_tokens=req.output_tokens))
                trace.write_request(evs)
        n_steps += 1
        if max_steps is not None and n_steps >= max_steps:
            break
    if trace is None:
        engine.drain_events()

    a = np.array(agg, dtype=np.float64).reshape(-1, len(_AGG))
    steps = pd.DataFrame(a, columns=list(_AGG))
    steps.insert(0, "run_id", run_id)
    steps.insert(1, "step_id", np.array(ids, np.int64))
    steps["model"] = model or engine.arch.name
    steps["tp"] = engine.tp
    steps["hardware"] = hardware or engine.hardware.name
    steps["t_start_us"] = np.array(t_start)
    steps["step_time_us"] = np.array(dur)
    reqs = pd.DataFrame({
        "run_id": run_id, "request_id": [r.request_id for r in requests],
        "arrived_us": [r.arrival_us for r in requests], "queued_us": [r.queued_us for r in requests],
        "scheduled_us": [r.scheduled_us for r in requests], "first_token_us": [r.first_token_us for r in requests],
        "finished_us": [r.finished_us for r in requests], "departed_us": [r.departed_us for r in requests],
        "prompt_tokens": [r.prompt_tokens for r in requests], "output_tokens": [r.output_tokens for r in requests],
        "preemptions": [r.preemptions for r in requests],
        "status": [r.status or "unfinished" for r in requests]})
    return SimResult(validate_steps(steps, run_id), validate_requests(reqs, run_id), now, n_steps)


def constant_rate_workload(rate_per_s: float, n: int, prompt_tokens: int, max_tokens: int, *, seed: int = 0,
                           poisson: bool = True) -> list[Request]:
    """n requests at ``rate_per_s`` (Poisson or evenly spaced) with fixed lengths (ignore_eos)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1e6 / rate_per_s, n) if poisson else np.full(n, 1e6 / rate_per_s)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Request(f"req-{i}", float(t), prompt_tokens, max_tokens) for i, t in enumerate(arrivals)]
