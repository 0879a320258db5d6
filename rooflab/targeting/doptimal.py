"""Information-optimal targeting (SPEC §9): pick the next sweep points that most reduce β uncertainty per
predicted GPU-second. Pure Python.

**Predicted design rows** — :func:`predict_point`: a candidate's batch compositions come from the twin
engine's *scheduler* (fast mode) with step times from the *current fitted coefficients*
(:class:`rooflab.replay.replay.FittedStepTimer`, never the twin's hidden truth); its steps are featurized like
collected data, and its predicted GPU-seconds are the simulated span × TP, as the store counts them.
Simulations are cached per point and reused while the coefficients move its step times by < 10%.

**Information** — Bayesian, in the fit's relative-error units. Each step row contributes
``z zᵀ / σ²`` with ``z = x / ŷ`` (σ: the fit's relative residual RMS, floored at 2%). Steps of one run
share conditions and the bootstrap resamples whole runs, so a run counts as at most
:data:`STEPS_PER_RUN` independent steps: its information is its mean ``z zᵀ`` × min(steps, 100) / σ².
The prior: efficiency corrections β1–β5 ~ N(1, 0.5²) (the physical range [0.3, 5] is ±2σ on a log
scale around 1); overhead terms (β6, β7, β_L) ~ N(β̂, β̂²) — weak, so their information comes from data.
``M = prior + Σ collected runs``.

**Score** — D-optimal gain ``log det(M + M_c) − log det(M)`` (SPEC §9's ``log det(I + Σ Xcᵀ W Xc)``
in whitened form) plus the same gain restricted to the βs the health checks flag (Dₛ-optimality on
the flagged subset), divided by the predicted GPU-seconds; × :data:`HOTSPOT_BOOST` for a candidate that
falls in a residual hotspot's bucket (D-optimality cannot see a wrong model shape; the hotspot can).
**Greedy**: each pick adds its information to ``M`` before the next is scored.

**Validation** — ~20% of each batch's predicted GPU-seconds goes to held-out points, space-filling over
the held-out combos (the campaign's V1 points first; the same order as :mod:`rooflab.targeting.menu`).

Every pick carries a one-line reason: the β whose posterior standard deviation it shrinks most (and by
how much), the hotspot it covers, its expected gain and its predicted cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rooflab.collect.spec import Campaign
from rooflab.fit.health import FAIL, WARN
from rooflab.data.sweep import SweepPoint
from rooflab.model.variants import get_variant
from rooflab.model.variants import DEFAULT_VARIANT
from rooflab.model.features import DEFAULT_FORMULAS

STEPS_PER_RUN = 100  # a run counts as at most this many independent step observations
MIN_SIGMA = 0.02  # relative residual floor (the fit's noise can look smaller than the model error)
PRIOR_SD = 0.5  # efficiency corrections β1–β5 ~ N(1, 0.5²) for targeting
HOTSPOT_BOOST = 2.0
MAX_SIM_REQUESTS = 1500  # requests and steps simulated per candidate (a sample of its batch compositions);
MAX_SIM_STEPS = 3000  # the rest of the run's cost is extrapolated
REUSE_TOLERANCE = 0.10  # a simulation is reused while the coefficients move its step times by < 10%
CACHE_PER_POINT = 3  # simulations kept per candidate
VALIDATION_SHARE = 0.20
# Starting coefficients before any fit (iteration 0): efficiency corrections at their prior 1 and the
# overhead terms at the magnitudes of the real H100 fit (`make real`), rounded.
START_BETA = {"beta1": 1.0, "beta2": 1.0, "beta3": 1.0, "beta4": 1.0, "beta5": 1.0, "beta6": 10.0,
              "beta7": 300.0, "beta_layer": 20.0}
FLAG_CHECKS = ("data vs prior precision", "bootstrap CV", "draws pinned at 0", "leave-one-run-out change",
               "physical range")


# ----------------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    point: SweepPoint
    info: np.ndarray  # (p, p) information of one run in whitened-by-σ units, before the prior
    gpu_s: float  # predicted GPU-seconds (span × TP)
    steps: int  # predicted steps the fit would use
    saturated: bool  # the predicted run would be routed out of the fit (run-level, SPEC §6)
    mean_batch: float
    mean_context: float
    buckets: dict  # dimension -> bucket labels holding >= 10% of its steps (hotspot coverage)


_CACHE: dict[tuple, list] = {}  # point -> simulations under different coefficients, see predict_point


def _close(sim: tuple, beta: np.ndarray) -> bool:
    """A cached simulation serves coefficients whose step times differ from those it ran with by less
    than :data:`REUSE_TOLERANCE` on its sampled steps (batch compositions follow step times)."""
    sample, old = sim[7], sim[6]
    if not len(sample):
        return bool(np.allclose(beta, old))
    t_old, t_new = sample @ old, sample @ beta
    ok = t_old > 0
    return bool(ok.any() and np.max(np.abs(t_new[ok] / t_old[ok] - 1)) < REUSE_TOLERANCE)


def simulate_point(point: SweepPoint, beta: dict, variant: str, formulas: str, max_requests: int = MAX_SIM_REQUESTS,
                   max_steps: int = MAX_SIM_STEPS) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """``point`` run by the twin's scheduler with the fitted step model: (step table, request table,
    predicted GPU-seconds of the whole run). Only the first ``max_requests`` requests are simulated (a
    steady-state sample of the run's batch compositions), for at most ``max_steps`` steps; the cost of the
    rest is extrapolated: one typical request latency after the last arrival when the simulated server
    keeps up, at the simulated completion rate when its queue grows (run-level saturation)."""
    from rooflab.replay.replay import Coefficients, FittedStepTimer, arch_and_hardware
    from rooflab.twin.engine import Engine
    from rooflab.model.engine_config import EngineConfig
    from rooflab.twin.simulate import simulate
    from rooflab.collect.workloads import point_requests

    arch, hw = arch_and_hardware(point.model, point.hardware)
    timer = FittedStepTimer(Coefficients(dict(beta), variant=variant, formulas=formulas), arch, hw, point.tp)
    engine = Engine(arch, hw, point.tp, timer, EngineConfig(**dict(point.engine)), seed=point.seed)
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
        from rooflab.data.saturation import route_run

        if route_run(done).saturated:  # the queue grows: the rest is served at the simulated completion rate
            span *= len(reqs) / len(done)
        else:  # the server keeps up: the run ends one typical request latency after its last arrival
            e2e = (done["departed_us"] - done["arrived_us"]).median() / 1e6
            span = max(span, (reqs[-1].arrival_us - t0) / 1e6 + e2e)
    return res.steps, q, float(span) * point.tp


def predict_point(point: SweepPoint, beta: dict, variant: str = DEFAULT_VARIANT, formulas: str = DEFAULT_FORMULAS,
                  sigma: float = 0.05) -> Prediction:
    """Predicted information and cost of one run of ``point`` under the coefficients ``beta``.

    The simulation (batch compositions, cost) is cached per point (without its seed) and reused while
    the coefficients change its step times by < 10%: compositions follow step times. The information is
    always computed with the exact β (ŷ = Xβ)."""
    import dataclasses

    from rooflab.model.features import featurize
    from rooflab.fit.residuals import bucket_frame
    from rooflab.data.saturation import route_run, route_steps

    v = get_variant(variant)
    b = np.array([beta.get(n, 0.0) for n in v.names])
    key = (dataclasses.replace(point, seed=0).key, variant, formulas)
    sim = next((s for s in _CACHE.get(key, ()) if _close(s, b)), None)
    if sim is None:
        steps, requests, gpu_s = simulate_point(point, beta, variant, formulas)
        X = v.design_matrix(featurize(steps, formulas)) if len(steps) else np.zeros((0, len(v.terms)))
        # what the fit would use: no step of a saturated run, no saturated step (SPEC §6)
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
               float(np.mean(ctx)) if len(ctx) else 0.0, buckets, b, X[:: max(1, len(X) // 200)])
        kept = _CACHE.setdefault(key, [])
        kept.append(sim)
        del kept[:-CACHE_PER_POINT]  # the newest coefficients matter; bounded memory over a long campaign
    X, gpu_s, saturated, mean_batch, mean_ctx, buckets = sim[:6]
    y = X @ b
    ok = np.isfinite(y) & (y > 0)
    Z = X[ok] / y[ok, None]
    info = Z.T @ Z / max(1, len(Z)) * min(len(Z), STEPS_PER_RUN) / sigma ** 2
    return Prediction(point, info, gpu_s, int(len(Z)), saturated, mean_batch, mean_ctx, buckets)


# ----------------------------------------------------------------------------------------- information
def prior_precision(variant: str, beta: dict) -> np.ndarray:
    """Diagonal prior precision of the targeting posterior (see the module doc)."""
    v = get_variant(variant)
    d = []
    for t in v.terms:
        if t.prior is not None:
            d.append(1.0 / PRIOR_SD ** 2)
        else:
            scale = abs(beta.get(t.name, 0.0)) or START_BETA.get(t.name, 1.0)
            d.append(1.0 / scale ** 2)
    return np.diag(d)


def data_information(fit, sigma: float) -> np.ndarray:
    """Information of the fitted training steps (measured step times), from the fit's per-run Gram
    matrices of the relative rows ``x/y``; each run capped at :data:`STEPS_PER_RUN` steps (module doc)."""
    if fit is None or fit.run_gram is None or not len(fit.run_rows):
        return 0.0
    n = np.maximum(fit.run_rows, 1.0)
    w = np.minimum(fit.run_rows, STEPS_PER_RUN) / n
    return np.tensordot(w, fit.run_gram[:, :-1, :-1], axes=1) / sigma ** 2


def _logdet(M: np.ndarray) -> float:
    sign, val = np.linalg.slogdet(M)
    return float(val) if sign > 0 else -math.inf


def _subset_logdet(M: np.ndarray, idx: list[int]) -> float:
    """log det of the marginal posterior precision of the βs ``idx`` (Dₛ-optimality)."""
    if not idx:
        return 0.0
    cov = np.linalg.inv(M)
    return -_logdet(cov[np.ix_(idx, idx)])


def gain(M: np.ndarray, Mc: np.ndarray, flagged: list[int]) -> tuple[float, float]:
    """(D gain, Dₛ gain on the flagged βs) of adding information ``Mc`` to the posterior precision ``M``."""
    d = _logdet(M + Mc) - _logdet(M)
    ds = _subset_logdet(M + Mc, flagged) - _subset_logdet(M, flagged) if flagged else 0.0
    return d, ds


# ----------------------------------------------------------------------------------------- selection
@dataclass
class Scored:
    pred: Prediction
    d_gain: float
    ds_gain: float
    hotspot: str | None
    score: float  # (d_gain + ds_gain) / cost × hotspot boost
    shrink: np.ndarray | None = None  # relative reduction of each β's posterior sd by this pick


def greedy(M: np.ndarray, preds: list[Prediction], *, n: int, budget: float = math.inf, replicates: int = 1,
           flagged: list[int] = (), hotspots: list = ()) -> list[Scored]:
    """Greedy batch selection: repeatedly take the candidate with the highest (D gain + Dₛ gain on the
    ``flagged`` βs) per GPU-second (× :data:`HOTSPOT_BOOST` when it covers one of ``hotspots``, given as
    (dimension, bucket, ...) tuples), add its information to ``M`` and score the rest again. Candidates
    whose cost exceeds the budget left are skipped; a saturated prediction carries no information."""
    flagged = list(flagged)
    left = float(budget)
    pool = list(preds)
    out: list[Scored] = []
    while len(out) < n and pool:
        best = None
        for pr in pool:
            cost = pr.gpu_s * replicates
            if cost > left + 1e-9 or not cost > 0 or not np.isfinite(cost):
                continue
            d, ds = gain(M, pr.info * replicates, flagged)
            covers = next((f"{h[0]}={h[1]}" for h in hotspots if h[1] in pr.buckets.get(h[0], ())), None)
            score = (d + ds) / cost * (HOTSPOT_BOOST if covers else 1.0)
            if best is None or score > best.score:
                best = Scored(pr, d, ds, covers, score)
        if best is None or not best.score > 0:
            break
        before = np.sqrt(np.diag(np.linalg.inv(M)))
        M = M + best.pred.info * replicates
        best.shrink = 1 - np.sqrt(np.diag(np.linalg.inv(M))) / before
        out.append(best)
        left -= best.pred.gpu_s * replicates
        pool.remove(best.pred)
    return out


def _flagged(calib, names: list[str]) -> list[str]:
    if calib is None:
        return []
    out = []
    for c in calib.health:
        if c.check in FLAG_CHECKS and c.status in (FAIL, WARN) and c.target in names and c.target not in out:
            out.append(c.target)
    return out


def _hotspot_buckets(calib) -> list[tuple[str, str, float]]:
    if calib is None:
        return []
    from rooflab.targeting.menu import _hotspots

    hot = _hotspots(calib)
    return [(str(r.dimension), str(r.bucket), float(r.mape)) for r in hot.itertuples()]


def sigma_of(calib) -> float:
    if calib is None:
        return 0.05
    mape = (calib.accuracy.get("train") or {}).get("mape")
    # RMS relative error ≈ 1.25 × mean absolute relative error (Gaussian residuals)
    return max(MIN_SIGMA, 1.25 * float(mape) if mape is not None and np.isfinite(mape) else 0.05)


def beta_of(calib, variant: str) -> dict:
    if calib is None:
        names = get_variant(variant).names
        return {n: START_BETA.get(n, 1.0) for n in names}
    return calib.beta.coefficients()


def choose_next_doptimal(calib, campaign: Campaign, collected: set[str], *,
                         batch_size: int, budget_gpu_seconds_left: float | None,
                         variant: str = DEFAULT_VARIANT, formulas: str = DEFAULT_FORMULAS,
                         heldout_gpu_s: float = 0.0, train_gpu_s: float = 0.0) -> list:
    """The next batch (SPEC §9): greedy Bayesian D-optimal gain per predicted GPU-second over the
    training candidates, priorities for flagged βs and hotspots, ~20% of the batch's GPU-seconds on
    space-filling held-out points. The collected data enter through ``calib`` (its per-run Gram matrices;
    ``None`` before the first fit), whose variant and formulas then override ``variant`` / ``formulas``.
    ``heldout_gpu_s`` / ``train_gpu_s``: GPU-seconds spent so far on each split (the validation share is
    kept over the whole campaign). Returns :class:`rooflab.targeting.menu.Pick` objects with the gain and cost
    in ``details``."""
    from rooflab.targeting.menu import Pick, _candidates, _validation_order, _State, _desc, _points_from_keys

    if batch_size <= 0:
        return []
    if calib is not None:
        variant, formulas = calib.beta.variant.name, calib.beta.formulas
    v = get_variant(variant)
    names = v.names
    beta = beta_of(calib, variant)
    sigma = sigma_of(calib)
    M = prior_precision(variant, beta) + data_information(calib.beta if calib is not None else None, sigma)
    flagged = _flagged(calib, names)
    fidx = [names.index(n) for n in flagged]
    hot = _hotspot_buckets(calib)
    reps = max(1, int(campaign.replicates))
    left = math.inf if budget_gpu_seconds_left is None else float(budget_gpu_seconds_left)

    cands = _candidates(campaign, collected)
    train = [p for p in cands.values() if p.split == "train"]
    val = [p for p in cands.values() if p.split == "validation"]
    preds = {p.key: predict_point(p, beta, variant, formulas, sigma) for p in train}

    heldout_behind = heldout_gpu_s < VALIDATION_SHARE * (heldout_gpu_s + train_gpu_s) or heldout_gpu_s == 0
    reserve = min(len(val), max(1, int(round(VALIDATION_SHARE * batch_size)))) if val and heldout_behind else 0
    reserve = min(reserve, batch_size - 1) if batch_size > 1 else reserve
    chosen = greedy(M, list(preds.values()), n=batch_size - reserve, budget=left, replicates=reps,
                    flagged=fidx, hotspots=hot)
    picks: list = []
    batch_cost = 0.0
    for c in chosen:
        pr, cost, shrink = c.pred, c.pred.gpu_s * reps, c.shrink
        j = int(np.argmax(shrink))
        serves = names[j]
        if flagged:
            jf = max(fidx, key=lambda i: shrink[i])
            if shrink[jf] > 0.25 * shrink[j]:
                serves = names[jf]
        top = [serves] + [names[i] for i in np.argsort(-shrink) if names[i] != serves and shrink[i] >= 0.25][:2]
        why = ["shrinks the posterior sd of " + ", ".join(f"{n} by {shrink[names.index(n)]:.0%}" for n in top)]
        if serves in flagged:
            why.append(f"{serves} flagged by the health checks")
        if c.hotspot:
            why.append(f"covers hotspot {c.hotspot}")
        reason = (f"D-optimal: {_desc(pr.point)} (~{pr.mean_batch:.0f}-request batches, ~{pr.mean_context:.0f}-token "
                  f"contexts) {'; '.join(why)}; gain {c.d_gain + c.ds_gain:.2f} nats for "
                  f"{cost / 3600:.3f} GPU-h predicted")
        details = {"d_gain": c.d_gain, "ds_gain": c.ds_gain, "flagged": flagged, "hotspot": c.hotspot,
                   "predicted_gpu_s": cost, "predicted_steps": pr.steps, "score_per_gpu_s": c.score,
                   "sd_shrink": {n: float(x) for n, x in zip(names, shrink)}}
        picks.append(Pick(pr.point, reason, f"hotspot {c.hotspot}" if c.hotspot and serves not in flagged
                          else serves, cost, round(c.score * 3600, 4), details))
        batch_cost += cost
        left -= cost

    # validation: space-filling held-out points, keeping their GPU-seconds at ~20% of the campaign's
    order = _validation_order(campaign)
    state = _State(_points_from_keys(collected or ()), set())
    target = VALIDATION_SHARE / (1 - VALIDATION_SHARE) * (train_gpu_s + batch_cost) - heldout_gpu_s
    spent = 0.0
    while val and len(picks) < batch_size and (spent < target or spent == 0 and reserve):
        p = min(val, key=lambda q: order(q, state))
        val.remove(p)
        cost = float(campaign.gpu_seconds([p])) * reps
        if cost > left + 1e-9:
            continue
        picks.append(Pick(p, f"validation (~{VALIDATION_SHARE:.0%} of GPU-seconds held out, space-filling): "
                          f"held-out {_desc(p)} measures the held-out MAPE", "validation", cost, 0.0,
                          {"planned_gpu_s": cost}))
        state.add(p)
        spent += cost
        left -= cost
    return picks


__all__ = ["Prediction", "Scored", "choose_next_doptimal", "data_information", "gain", "greedy", "predict_point",
           "prior_precision",
           "simulate_point", "HOTSPOT_BOOST", "STEPS_PER_RUN", "VALIDATION_SHARE"]
