"""Predicted design rows of a candidate run (docs/spec.md §9): its batch compositions come from the twin
engine's *scheduler* (fast mode) with step times from the *current fitted coefficients*
(:class:`rooflab.model.step_timer.FittedStepTimer`, never the twin's hidden truth); its steps are featurized like
collected data, and its predicted GPU-seconds are the simulated span × TP, as the store counts them.

Simulations are cached per point and reused only under the **same** coefficients: a prediction is a function of
(point, coefficients, variant, formulas) alone, never of what was simulated before. (Reusing a simulation while
new coefficients moved its step times by < 10% made the picks depend on the process's history: a campaign
resumed after a crash, with an empty cache, picked differently from one that ran uninterrupted. Exact reuse costs
about 6 s more targeting per iteration on the default campaign's 144 training candidates — 55 s instead of 31 s
over 5 iterations on 2 cores — small next to an iteration's GPU runs.)"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rooflab.collect.workloads import point_requests
from rooflab.data.saturation import route_run, route_steps
from rooflab.data.sweep import SweepPoint
from rooflab.fit.residuals import bucket_frame
from rooflab.model.coefficients import Coefficients
from rooflab.model.engine_config import EngineConfig
from rooflab.model.features import featurize
from rooflab.model.step_timer import arch_and_hardware, make_step_timer
from rooflab.model.variants import DEFAULT_VARIANT, get_variant, resolve_formulas
from rooflab.targeting.information import STEPS_PER_RUN
from rooflab.twin.engine import Engine
from rooflab.twin.simulate import simulate

MAX_SIM_REQUESTS = 1500  # requests and steps simulated per candidate (a sample of its batch compositions);
MAX_SIM_STEPS = 3000  # the rest of the run's cost is extrapolated
CACHE_PER_POINT = 3  # simulations kept per candidate (under the last coefficients it was predicted with)


# ----------------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    point: SweepPoint
    info: np.ndarray  # (p, p) information of one run in whitened-by-σ units, before the prior
    gpu_s: float  # predicted GPU-seconds (span × TP)
    steps: int  # predicted steps the fit would use
    saturated: bool  # the predicted run would be routed out of the fit (run-level, docs/spec.md §6)
    mean_batch: float
    mean_context: float
    buckets: dict  # dimension -> bucket labels holding >= 10% of its steps (hotspot coverage)
_CACHE: dict[tuple, list] = {}  # point -> simulations under different coefficients, see predict_point


def simulate_point(point: SweepPoint, beta: dict, variant: str, formulas: str | None,
                   max_requests: int = MAX_SIM_REQUESTS,
                   max_steps: int = MAX_SIM_STEPS) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """``point`` run by the twin's scheduler with the fitted step model: (step table, request table,
    predicted GPU-seconds of the whole run). Only the first ``max_requests`` requests are simulated (a
    steady-state sample of the run's batch compositions), for at most ``max_steps`` steps; the cost of the
    rest is extrapolated: one typical request latency after the last arrival when the simulated server
    keeps up, at the simulated completion rate when its queue grows (run-level saturation)."""
    arch, hw = arch_and_hardware(point.model, point.hardware)
    timer = make_step_timer(Coefficients(dict(beta), variant=variant, formulas=resolve_formulas(variant, formulas)),
                            arch, hw, point.tp)
    options: dict[str, Any] = dict(point.engine)
    engine = Engine(arch, hw, point.tp, timer, EngineConfig(**options), seed=point.seed)
    reqs = point_requests(point)
    sim = reqs[:max_requests]
    res = simulate(engine, sim, run_id=point.key, model=point.model, hardware=point.hardware, max_steps=max_steps)
    q = res.requests
    done = q[np.isfinite(q["departed_us"].to_numpy(dtype=float))] if len(q) else q
    if not len(done):
        return res.steps, q, math.inf
    t0 = reqs[0].arrival_us
    span = (done["departed_us"].max() - t0) / 1e6
    if len(done) < len(reqs):
        if route_run(done).saturated:  # the queue grows: the rest is served at the simulated completion rate
            span *= len(reqs) / len(done)
        else:  # the server keeps up: the run ends one typical request latency after its last arrival
            e2e = (done["departed_us"] - done["arrived_us"]).median() / 1e6
            span = max(span, (reqs[-1].arrival_us - t0) / 1e6 + e2e)
    return res.steps, q, float(span) * point.tp


def predict_point(point: SweepPoint, beta: dict, variant: str = DEFAULT_VARIANT, formulas: str | None = None,
                  sigma: float = 0.05) -> Prediction:
    """Predicted information and cost of one run of ``point`` under the coefficients ``beta``.

    The simulation (batch compositions, cost) is cached per point (without its seed) and reused only under the
    same coefficients, so the result never depends on earlier calls (a resumed campaign picks exactly what an
    uninterrupted one does). The information is computed with β (ŷ = Xβ)."""
    from rooflab.data.saturation import route_run

    v = get_variant(variant)
    b = np.array([beta.get(n, 0.0) for n in v.names])
    formulas = resolve_formulas(variant, formulas)
    key = (dataclasses.replace(point, seed=0).key, variant, formulas)
    sim = next((s for s in _CACHE.get(key, ()) if np.array_equal(s[6], b)), None)  # the same β only
    if sim is None:
        steps, requests, gpu_s = simulate_point(point, beta, variant, formulas)
        X = v.design_matrix(featurize(steps, formulas)) if len(steps) else np.zeros((0, len(v.terms)))
        # what the fit would use: no step of a saturated run, no saturated step (docs/spec.md §6)
        saturated = route_run(requests).saturated if len(requests) else True
        keep = ~route_steps(steps).saturated & (not saturated) if len(steps) else np.zeros(0, bool)
        batch = (steps["prefill_reqs"] + steps["decode_reqs"]).to_numpy(dtype=float)
        ctx = ((steps["decode_context"] + steps["prefill_context"] + steps["prefill_tokens"])
               / np.maximum(batch, 1)).to_numpy(dtype=float)
        frame = bucket_frame(steps.assign(workload=point.family)) if len(steps) else None
        buckets = {} if frame is None else {  # buckets holding >= 10% of the run's steps
            dim: {str(lab) for lab, share in frame[dim].value_counts(normalize=True).items() if share >= 0.10}
            for dim in ("model", "phase_mix", "batch_size", "context", "tp", "workload")}
        sim = (X[keep], gpu_s, bool(saturated), float(np.mean(batch)) if len(batch) else 0.0,
               float(np.mean(ctx)) if len(ctx) else 0.0, buckets, b)
        kept = _CACHE.setdefault(key, [])
        kept.append(sim)
        del kept[:-CACHE_PER_POINT]  # the newest coefficients matter; bounded memory over a long campaign
    X, gpu_s, saturated, mean_batch, mean_ctx, buckets = sim[:6]
    y = X @ b
    ok = np.isfinite(y) & (y > 0)
    Z = X[ok] / y[ok, None]
    info = Z.T @ Z / max(1, len(Z)) * min(len(Z), STEPS_PER_RUN) / sigma ** 2
    return Prediction(point, info, gpu_s, int(len(Z)), saturated, mean_batch, mean_ctx, buckets)
