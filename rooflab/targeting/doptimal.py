"""Information-optimal targeting (docs/spec.md §9): pick the next sweep points that most reduce β uncertainty per
predicted GPU-second. Pure Python.

**Score** — D-optimal gain ``log det(M + M_c) − log det(M)`` (docs/spec.md §9's ``log det(I + Σ Xcᵀ W Xc)``
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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rooflab.collect.spec import Campaign
from rooflab.fit.calibration import Calibration
from rooflab.fit.coverage import IDENTIFIED_CHECK
from rooflab.fit.health import FAIL, WARN
from rooflab.model.variants import DEFAULT_VARIANT, get_variant, resolve_formulas
from rooflab.targeting.candidates import (
    VALIDATION_SHARE,
    CandidateState,
    Pick,
    describe,
    hotspot_rows,
    open_candidates,
    points_from_keys,
    validation_order,
)
from rooflab.targeting.information import (
    beta_of,
    data_information,
    gain,
    prior_precision,
    sigma_of,
)
from rooflab.targeting.prediction import Prediction, predict_point

HOTSPOT_BOOST = 2.0
FLAG_CHECKS = ("data vs prior precision", "bootstrap CV", "draws pinned at 0", "leave-one-run-out change",
               "physical range", IDENTIFIED_CHECK)


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
           flagged: Sequence[int] = (), hotspots: Sequence[tuple] = ()) -> list[Scored]:
    """Greedy batch selection: repeatedly take the candidate with the highest (D gain + Dₛ gain on the
    ``flagged`` βs) per GPU-second (× :data:`HOTSPOT_BOOST` when it covers one of ``hotspots``, given as
    (dimension, bucket, ...) tuples), add its information to ``M`` and score the rest again. Candidates
    whose cost exceeds the budget left are skipped; a saturated prediction carries no information."""
    flagged_idx = list(flagged)
    left = float(budget)
    pool = list(preds)
    out: list[Scored] = []
    while len(out) < n and pool:
        best = None
        for pr in pool:
            cost = pr.gpu_s * replicates
            if cost > left + 1e-9 or not cost > 0 or not np.isfinite(cost):
                continue
            d, ds = gain(M, pr.info * replicates, flagged_idx)
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


def _flagged(calib: Calibration | None, names: list[str]) -> list[str]:
    if calib is None:
        return []
    out = []
    for c in calib.health:
        if c.check in FLAG_CHECKS and c.status in (FAIL, WARN) and c.target in names and c.target not in out:
            out.append(c.target)
    return out


def _hotspot_buckets(calib: Calibration | None) -> list[tuple[str, str, float]]:
    if calib is None:
        return []
    hot = hotspot_rows(calib)
    return [(str(r["dimension"]), str(r["bucket"]), float(r["mape"])) for r in hot.to_dict("records")]


def choose_next_doptimal(calib: Calibration | None, campaign: Campaign, collected: set[str], *,
                         batch_size: int, budget_gpu_seconds_left: float | None,
                         variant: str = DEFAULT_VARIANT, formulas: str | None = None,
                         heldout_gpu_s: float = 0.0, train_gpu_s: float = 0.0) -> list[Pick]:
    """The next batch (docs/spec.md §9): greedy Bayesian D-optimal gain per predicted GPU-second over the
    training candidates, priorities for flagged βs and hotspots, ~20% of the batch's GPU-seconds on
    space-filling held-out points. The collected data enter through ``calib`` (its per-run Gram matrices;
    ``None`` before the first fit), whose variant and formulas then override ``variant`` / ``formulas``.
    ``heldout_gpu_s`` / ``train_gpu_s``: GPU-seconds spent so far on each split (the validation share is
    kept over the whole campaign). Returns :class:`rooflab.targeting.menu.Pick` objects with the gain and cost
    in ``details``."""
    if batch_size <= 0:
        return []
    if calib is not None:
        variant, formulas = calib.beta.variant.name, calib.beta.formulas
    formulas = resolve_formulas(variant, formulas)
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

    cands = open_candidates(campaign, collected)
    train = [p for p in cands.values() if p.split == "train"]
    val = [p for p in cands.values() if p.split == "validation"]
    preds = {p.key: predict_point(p, beta, variant, formulas, sigma) for p in train}

    heldout_behind = heldout_gpu_s < VALIDATION_SHARE * (heldout_gpu_s + train_gpu_s) or heldout_gpu_s == 0
    reserve = min(len(val), max(1, int(round(VALIDATION_SHARE * batch_size)))) if val and heldout_behind else 0
    reserve = min(reserve, batch_size - 1) if batch_size > 1 else reserve
    chosen = greedy(M, list(preds.values()), n=batch_size - reserve, budget=left, replicates=reps,
                    flagged=fidx, hotspots=hot)
    picks: list[Pick] = []
    batch_cost = 0.0
    for c in chosen:
        pr, cost, shrink = c.pred, c.pred.gpu_s * reps, c.shrink
        assert shrink is not None  # greedy sets it on every pick
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
        reason = (f"D-optimal: {describe(pr.point)} (~{pr.mean_batch:.0f}-request batches, "
                  f"~{pr.mean_context:.0f}-token contexts) {'; '.join(why)}; gain {c.d_gain + c.ds_gain:.2f} nats for "
                  f"{cost / 3600:.3f} GPU-h predicted")
        details = {"d_gain": c.d_gain, "ds_gain": c.ds_gain, "flagged": flagged, "hotspot": c.hotspot,
                   "predicted_gpu_s": cost, "predicted_steps": pr.steps, "score_per_gpu_s": c.score,
                   "sd_shrink": {n: float(x) for n, x in zip(names, shrink)}}
        picks.append(Pick(pr.point, reason, f"hotspot {c.hotspot}" if c.hotspot and serves not in flagged
                          else serves, cost, round(c.score * 3600, 4), details))
        batch_cost += cost
        left -= cost

    # validation: space-filling held-out points, keeping their GPU-seconds at ~20% of the campaign's
    order = validation_order(campaign)
    state = CandidateState(points_from_keys(collected or ()), set())
    target = VALIDATION_SHARE / (1 - VALIDATION_SHARE) * (train_gpu_s + batch_cost) - heldout_gpu_s
    spent = 0.0
    while val and len(picks) < batch_size and (spent < target or spent == 0 and reserve):
        p = min(val, key=lambda q: order(q, state))
        val.remove(p)
        cost = float(campaign.gpu_seconds([p])) * reps
        if cost > left + 1e-9:
            continue
        picks.append(Pick(p, f"validation (~{VALIDATION_SHARE:.0%} of GPU-seconds held out, space-filling): "
                          f"held-out {describe(p)} measures the held-out MAPE", "validation", cost, 0.0,
                          {"planned_gpu_s": cost}))
        state.add(p)
        spent += cost
        left -= cost
    return picks
