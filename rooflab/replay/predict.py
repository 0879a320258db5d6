"""Request-level replay: run a request trace through the twin's scheduler with step times from a *fitted*
coefficient set, and predict each request's TTFT / ITL / E2E (client side, like the measurement).

A request enters the scheduler's queue α0 after its arrival, every step advances the clock by the fitted step
time, a finished request departs α1 + α2·n_out after its last token; a request the client gave up on (its
timeout) is aborted, as vLLM aborts a disconnected request. Predicted TTFT = first token − arrival,
E2E = departure − arrival, ITL = (E2E − TTFT)/(n_out − 1). The loop is :func:`rooflab.twin.simulate.run_requests`
(the twin's own); ``tests/test_replay.py`` checks that replaying a twin run with the twin's true step times and
overheads reproduces its TTFT / E2E exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rooflab.data.traces import ENGINE_KEYS, Trace, request_itl
from rooflab.errors import InputError
from rooflab.model.coefficients import Coefficients
from rooflab.model.engine_config import EngineConfig
from rooflab.model.step_timer import arch_and_hardware, make_step_timer
from rooflab.twin.engine import Engine, Request, StepTimer
from rooflab.twin.simulate import BlisOverheads, ClientPlan, ConstantOverheads, RequestOverheads, run_requests


@dataclass
class ReplayResult:
    run_id: str
    requests: pd.DataFrame  # measured and predicted per request
    steps: pd.DataFrame | None  # per-step start, duration, aggregates (record=True)
    n_steps: int
    sim_time_s: float
    wall_s: float
    stats: dict

    @property
    def steps_per_s(self) -> float:
        return self.n_steps / self.wall_s if self.wall_s > 0 else float("nan")


def engine_for(trace: Trace, timer: StepTimer, *, seed: int = 0) -> Engine:
    cfg = EngineConfig(**{k: v for k, v in trace.engine.items() if k in ENGINE_KEYS})
    arch, hw = arch_and_hardware(trace.model, trace.hardware)
    return Engine(arch, hw, trace.tp, timer, cfg, seed=seed)


def make_requests(trace: Trace) -> list[Request]:
    r = trace.requests
    groups = r["prefix_group"].to_numpy(dtype=object) if "prefix_group" in r else np.full(len(r), None)
    ptok = r["prefix_tokens"].to_numpy(dtype=float) if "prefix_tokens" in r else np.zeros(len(r))
    return [Request(str(i), float(a), int(p), int(o), True, None, g if isinstance(g, str) and g else None,
                    int(pt) if pt == pt else 0)
            for i, a, p, o, g, pt in zip(r["request_id"].to_numpy(), r["arrival_us"].to_numpy(dtype=float),
                                         r["prompt_tokens"].to_numpy(dtype=float),
                                         r["output_tokens"].to_numpy(dtype=float), groups, ptok)]


def overheads_for(coefs: Coefficients | None) -> RequestOverheads:
    """The α of a coefficient set, with its simulator's semantics (BLIS's for BLIS variants)."""
    if coefs is None:
        return ConstantOverheads((0.0, 0.0, 0.0))
    return BlisOverheads(coefs.alpha) if coefs.formulas == "blis" else ConstantOverheads(coefs.alpha)


def client_plan(trace: Trace) -> ClientPlan | None:
    """The client behaviour a trace's columns describe: closed-loop rounds (``depends_on``, ``think_time_us``)
    and sequential stages (``stage``, ``stage_offset_us``, released after the previous stage drains)."""
    r = trace.requests
    ids = r["request_id"].astype(str).to_numpy()
    plan = ClientPlan(stage_gap_us=float(trace.stage_gap_s or 0.0) * 1e6)
    if "depends_on" in r:
        dep = r["depends_on"].to_numpy(dtype=object)
        think = r["think_time_us"].to_numpy(dtype=float) if "think_time_us" in r else np.zeros(len(r))
        for i, d in enumerate(dep):
            if isinstance(d, str) and d:
                plan.depends_on[ids[i]] = d
                plan.think_us[ids[i]] = float(think[i])
    if trace.stage_gap_s is not None and "stage" in r and "stage_offset_us" in r and r["stage"].nunique() > 1:
        stage = r["stage"].to_numpy(dtype=int)
        plan.stages = [list(ids[stage == k]) for k in range(int(stage.max()) + 1)]
        plan.stage_offset_us = dict(zip(ids, r["stage_offset_us"].to_numpy(dtype=float)))
    return plan if (plan.depends_on or plan.stages) else None


def replay(trace: Trace, coefs: Coefficients | None = None, *, timer: StepTimer | None = None,
           overheads: RequestOverheads | None = None, record: bool = False,
           timeout: bool = True, max_steps: int | None = None) -> ReplayResult:
    """Replay ``trace`` with the step time of ``coefs`` (or an explicit ``timer``) and predict each request's
    TTFT / ITL / E2E (µs, client side)."""
    if timer is None:
        if coefs is None:
            raise InputError(None, "coefficients", "replay needs a coefficient set or a step timer")
        timer = make_step_timer(coefs, *arch_and_hardware(trace.model, trace.hardware), trace.tp)
    if overheads is None:
        overheads = overheads_for(coefs)
    engine = engine_for(trace, timer)
    reqs = make_requests(trace)
    t0 = time.perf_counter()
    timeout_us = trace.timeout_s * 1e6 if (timeout and trace.timeout_s) else None
    client = client_plan(trace)
    loop = run_requests(engine, reqs, overheads=overheads, timeout_us=timeout_us, record=record, max_steps=max_steps,
                        max_concurrency=trace.max_concurrency, client=client)
    wall = time.perf_counter() - t0
    arr = np.array([r.arrival_us for r in reqs])
    first = np.array([r.first_token_us for r in reqs])
    dep = np.array([r.departed_us for r in reqs])
    nout = np.array([r.output_tokens for r in reqs], dtype=float)
    status = np.array([r.status or "unfinished" for r in reqs], dtype=object)
    ok = np.isin(status, ("length", "stop"))
    ttft = np.where(ok, first - arr + np.array([overheads.first_token_us(r) for r in reqs]), np.nan)
    e2e = np.where(ok, dep - arr, np.nan)
    out = trace.requests.copy()
    if trace.max_concurrency or client:  # the client sent requests later than first listed: their send times
        out["pred_send_us"] = arr
    out["pred_ttft_us"] = ttft
    out["pred_e2e_us"] = e2e
    out["pred_itl_us"] = request_itl(ttft, e2e, nout)
    out["pred_status"] = status
    out["pred_failed"] = ~ok
    out["queued_us"] = [r.queued_us for r in reqs]
    out["scheduled_us"] = [r.scheduled_us for r in reqs]
    out["first_token_us"] = first
    out["finished_us"] = [r.finished_us for r in reqs]
    out["preemptions_pred"] = [r.preemptions for r in reqs]
    stats = {"max_waiting": loop.max_waiting, "aborted": loop.aborted, "rejected": loop.rejected,
             "cancelled": loop.cancelled,
             "blocks": engine.num_blocks, "timeout_s": trace.timeout_s if timeout_us else None,
             "preemptions": int(sum(r.preemptions for r in reqs))}
    steps_df = pd.DataFrame(loop.step_arrays()) if record else None
    return ReplayResult(trace.run_id, out, steps_df, loop.n_steps, loop.end_us / 1e6, wall, stats)
