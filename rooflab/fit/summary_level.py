"""Calibration from run summaries (issue 14): fit β and α to experiments described by their workload, their engine
and measured aggregates — per stage mean TTFT and mean E2E, what inference-perf's summary reports — alone or
together with per-request traces.

Most users hold inference-perf summaries, not traces or step records. A summary's means are produced by the
scheduler running the step-time model, and, with one replay's batch compositions held fixed, they are *linear*
in the coefficients: a request's TTFT is α0 plus the feature vectors of the steps from its queue entry to its
first token times β; its E2E adds the steps to its last token and α1 + α2·n_out (BLIS's α: α2 on TTFT as well).
The mean over a stage's requests is the mean of those rows. So each iteration replays every training experiment
with the current coefficients, averages the stacked rows per stage (:func:`rooflab.fit.request_level.stacked_rows`)
and solves one bounded least-squares problem; re-replaying with the solution lets the compositions follow the
coefficients (a fixed point, like the request-level calibration).

Saturation makes the plain fixed point unstable: a coefficient set that overloads a run in the replay (queues
growing, batches far larger than measured) yields rows of a regime the measurement never saw, and the next solve
overshoots the other way. So every replay is first *anchored at the measured operating point*: the step times
are scaled by one factor per experiment until the replayed mean E2E matches the measured one (a few replays,
bisection in log space), and the rows come from that replay — batch compositions at the load the measurement
had, whatever the current coefficients. The solve then fits the coefficients to those compositions.

The loss: squared relative error of every stage's mean TTFT and mean E2E, each experiment weighted equally (its
stages share its weight), TTFT and E2E equally, plus a Gaussian prior of strength λ toward the starting
coefficients in the same units (docs/spec.md §7) — BLIS's trainer minimised the RMSE over experiments of the
TTFT-mean APE plus the E2E-mean APE; per-stage rows see the load dependence that the whole-run mean averages
away. Per-request traces add their rows (:func:`rooflab.fit.request_level.stacked_design`) with the same
per-run weight. The variant, λ and the stage weighting are chosen by cross-validation over experiments by the
caller (the sim-to-real benchmark does so inside its training set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import lsq_linear

from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.fit.request_level import ALPHA_MAX, stacked_rows
from rooflab.model.coefficients import Coefficients
from rooflab.model.variants import get_variant
from rooflab.replay.predict import ReplayResult, replay

OVERALL = "overall"


@dataclass(frozen=True)
class SummaryTarget:
    """One training experiment: its request stream and engine (``trace``, with a ``stage`` column where it has
    stages) and the measured means in µs: stage key (``overall``, ``stage_0``, …) -> (mean TTFT, mean E2E)."""

    trace: Trace
    means_us: dict[str, tuple[float, float]]
    name: str = ""

    def stage_keys(self, per_stage: bool) -> list[str]:
        keys = [k for k in self.means_us if k != OVERALL]
        return keys if (per_stage and keys) else [OVERALL]


def trace_target(trace: Trace, name: str = "") -> SummaryTarget:
    """A per-request trace as one more training experiment of a summary-level fit: the measured mean TTFT and E2E
    (µs) of its successful requests, over the whole run and per stage where the trace has a ``stage`` column."""
    q = trace.requests
    ok = ~q["failed"].to_numpy(dtype=bool) if "failed" in q else np.ones(len(q), bool)
    for col in ("ttft_us", "e2e_us"):
        if col not in q or not np.isfinite(q[col].to_numpy(dtype=float)[ok]).any():
            raise InputError(trace.source or None, col, f"run {trace.run_id}: no measured {col} to calibrate to")
    ttft, e2e = q["ttft_us"].to_numpy(dtype=float), q["e2e_us"].to_numpy(dtype=float)
    good = ok & np.isfinite(ttft) & np.isfinite(e2e)
    means = {OVERALL: (float(ttft[good].mean()), float(e2e[good].mean()))}
    if "stage" in q:
        stage = q["stage"].to_numpy()
        for k in sorted(set(stage[good].tolist())):
            m = good & (stage == k)
            means[f"stage_{int(k)}"] = (float(ttft[m].mean()), float(e2e[m].mean()))
    return SummaryTarget(trace, means, name or trace.run_id)


@dataclass(frozen=True)
class SummaryOptions:
    prior_strength: float = 1e-2  # λ: squared relative error one unit of (θ − θ_prior)/scale is worth
    iterations: int = 2  # anchored replay → solve rounds
    anchor_tolerance: float = 0.02  # |replayed / measured mean E2E − 1| that ends the anchoring
    anchor_replays: int = 8  # at most this many replays per experiment to anchor it
    per_stage: bool = True  # fit each stage's means (False: the whole run's only, as BLIS's trainer)
    alpha_prior_scale_us: tuple[float, float, float] = (5000.0, 1000.0, 20.0)  # α prior widths (µs, µs, µs/token)


@dataclass
class SummaryFit:
    coefficients: Coefficients
    history: list[dict] = field(default_factory=list)  # per iteration: training loss and coefficients


def _stage_rows(target: Trace, result_requests: pd.DataFrame, Xt: np.ndarray, Xe: np.ndarray, kept: np.ndarray,
                keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Mean TTFT and E2E rows per stage (over the requests the replay completed)."""
    out = {}
    stage = result_requests["stage"].to_numpy()[kept] if "stage" in result_requests else np.zeros(int(kept.sum()))
    n_out = result_requests["output_tokens"].to_numpy(dtype=float)[kept]
    for k in keys:
        m = np.ones(len(stage), bool) if k == OVERALL else (stage == int(k.split("_")[-1]))
        if m.any():
            out[k] = (Xt[m].mean(axis=0), Xe[m].mean(axis=0), float(n_out[m].mean()))
    return out


def solve_summaries(rows: list[tuple[str, np.ndarray, np.ndarray, float, float, float]], start: Coefficients,
                    options: SummaryOptions, blis_alpha: bool) -> Coefficients:
    """Bounded least squares over stage rows ``(experiment, u_ttft, u_e2e, mean n_out, TTFT µs, E2E µs)``; the
    prior is centred on ``start`` (its β and α), with widths |start| (β; 1 where 0) and
    ``options.alpha_prior_scale_us``."""
    variant = get_variant(start.variant)
    names = variant.names
    p = len(names)
    per_exp: dict[str, int] = {}
    for r in rows:
        per_exp[r[0]] = per_exp.get(r[0], 0) + 1
    A, b = [], []
    a2_ttft = 1.0 if blis_alpha else 0.0  # BLIS adds α2 to TTFT once
    for exp, ut, ue, n_out, ttft, e2e in rows:
        w = 1.0 / np.sqrt(2.0 * per_exp[exp])
        A.append(np.r_[ut, 1.0, 0.0, a2_ttft] / ttft * w)
        b.append(w)
        A.append(np.r_[ue, 1.0, 1.0, n_out] / e2e * w)
        b.append(w)
    theta0 = np.array([start.beta.get(n, 0.0) for n in names] + list(start.alpha), dtype=float)
    scale = np.r_[[abs(v) if abs(v) > 0 else 1.0 for v in theta0[:p]], options.alpha_prior_scale_us]
    lam = np.sqrt(options.prior_strength)
    for j in range(p + 3):
        prior_row = np.zeros(p + 3)
        prior_row[j] = lam / scale[j]
        A.append(prior_row)
        b.append(lam * theta0[j] / scale[j])
    M, y = np.vstack(A), np.array(b)
    lo = np.zeros(p + 3)
    hi = np.r_[np.full(p, np.inf), ALPHA_MAX]
    cs = np.where(np.abs(M).max(axis=0) > 0, np.abs(M).max(axis=0), 1.0)  # column scaling for the solver
    res = lsq_linear(M / cs, y, bounds=(lo * cs, hi * cs), method="bvls")
    theta = res.x / cs
    return Coefficients(dict(zip(names, map(float, theta[:p]))), tuple(map(float, theta[p:])), variant.name,
                        start.formulas, "summary calibration", True,
                        [f"fitted to run summaries (λ={options.prior_strength:g}, per stage: {options.per_stage})"])


def summary_loss(targets: list[SummaryTarget], coefs: Coefficients, per_stage: bool = True) -> float:
    """The calibration's loss at ``coefs`` on full replays: RMS over experiments of the relative error of each
    stage's mean TTFT and mean E2E (the stage errors of an experiment averaged in quadrature)."""
    errs = []
    for t in targets:
        q = replay(t.trace, coefs).requests
        ok = ~q["pred_failed"].to_numpy(dtype=bool)
        stage = q["stage"].to_numpy() if "stage" in q else np.zeros(len(q))
        e = []
        for k in t.stage_keys(per_stage):
            m = ok & ((stage == int(k.split("_")[-1])) if k != OVERALL else True)
            if m.any():
                ttft, e2e = t.means_us[k]
                e += [(q["pred_ttft_us"][m].mean() - ttft) / ttft, (q["pred_e2e_us"][m].mean() - e2e) / e2e]
        errs.append(float(np.mean(np.square(e))) if e else 1.0)
    return float(np.sqrt(np.mean(errs)))


def scaled(coefs: Coefficients, factor: float) -> Coefficients:
    """``coefs`` with every β multiplied by ``factor`` (step times scale by it; α unchanged)."""
    return coefs.with_values(beta={k: v * factor for k, v in coefs.beta.items()})


def anchored_replay(target: SummaryTarget, coefs: Coefficients, options: SummaryOptions,
                    factor: float = 1.0) -> tuple[ReplayResult, float]:
    """Replay ``target`` with ``coefs`` scaled so that its mean E2E matches the measured one (see the module
    docstring); returns the recorded replay and the factor used."""
    want = target.means_us[OVERALL][1] if OVERALL in target.means_us else None
    lo, hi = 0.0, np.inf
    best: tuple[float, ReplayResult, float] | None = None
    for _ in range(max(1, options.anchor_replays)):
        res = replay(target.trace, scaled(coefs, factor), record=True)
        q = res.requests
        ok = ~q["pred_failed"].to_numpy(dtype=bool)
        if want is None or not ok.any():
            return res, factor
        ratio = float(q["pred_e2e_us"].to_numpy()[ok].mean()) / want
        if best is None or abs(np.log(ratio)) < best[0]:
            best = (abs(np.log(ratio)), res, factor)
        if abs(ratio - 1) <= options.anchor_tolerance:
            break
        if ratio > 1:
            hi = factor
        else:
            lo = factor
        proposal = factor / ratio  # E2E grows at least proportionally with the step time
        if lo < proposal < hi or not (lo > 0 and np.isfinite(hi)):
            factor = proposal
        else:  # bracketed but the proportional guess overshoots (queueing feedback): bisect in log space
            factor = float(np.sqrt(lo * hi))
    assert best is not None
    return best[1], best[2]


def calibrate_from_summaries(targets: list[SummaryTarget], start: Coefficients,
                             options: SummaryOptions = SummaryOptions(), *, prior: Coefficients | None = None,
                             progress: Callable[[str], None] | None = None) -> SummaryFit:
    """Fit ``start``'s variant to the measured means of ``targets`` (anchored replays → one bounded least-squares
    solve, repeated; see the module docstring). The prior is centred on ``prior`` (default: ``start``)."""
    if not targets:
        raise InputError(None, "experiments", "no training experiment with measured summaries")
    centre = prior or start
    coefs = start
    fit = SummaryFit(start)
    blis_alpha = start.formulas == "blis"
    factors = {id(t): 1.0 for t in targets}
    for it in range(options.iterations):
        rows = []
        for t in targets:
            res, factors[id(t)] = anchored_replay(t, coefs, options, factors[id(t)])
            Xt, Xe, kept = stacked_rows(t.trace, res, coefs.variant, coefs.formulas)
            for k, (ut, ue, n_out) in _stage_rows(t.trace, res.requests, Xt, Xe, kept,
                                                  t.stage_keys(options.per_stage)).items():
                ttft, e2e = t.means_us[k]
                rows.append((t.name or t.trace.run_id, ut, ue, n_out, ttft, e2e))
        if not rows:
            raise InputError(None, "experiments", "no training request completed in the replay")
        coefs = solve_summaries(rows, centre, options, blis_alpha)
        fit.history.append({"iteration": it, "beta": dict(coefs.beta), "alpha": list(coefs.alpha),
                            "anchor_factors": {t.name: factors[id(t)] for t in targets}})
        if progress:
            progress(f"summary calibration iteration {it}: " + " ".join(f"{n}={v:.4g}" for n, v in coefs.beta.items())
                     + "; anchors " + " ".join(f"{factors[id(t)]:.2f}" for t in targets))
    fit.coefficients = coefs
    return fit
