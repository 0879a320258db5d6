"""Posteriors of the fits that are *not* linear in their coefficients (issue 18): the request-level end-to-end
calibration (:mod:`rooflab.fit.request_level`) and the calibration from run summaries
(:mod:`rooflab.fit.summary_level`). Both are fixed points over replays; the replay makes latencies depend on the
coefficients through queueing, so there is no closed-form posterior, and refitting each of 100 bootstrap
resamples (minutes each) is out of reach.

Both use the **whole-run bootstrap of the linearisation at the fitted point**. With the batch compositions of one
replay at the fitted coefficients θ̂ held fixed, each fit's inner problem is a bounded linear least squares
‖Aθ − b‖² plus its prior rows (stacked per-request rows, or per-stage mean rows), made of one block (A_u, b_u) per
run / experiment u. The fixed point is not exactly this problem's solution (the compositions moved), so the
right-hand sides are first shifted by A·(θ̂ − θ_u), θ_u the unbounded solution: θ̂ is then the solution of the
shifted problem on all units. A bootstrap draw resamples whole units with replacement and solves the shifted
problem again, within the fit's bounds (a bounded solve: near-collinear terms — the per-step, per-layer and weight
terms over three models — trade off inside their bounds instead of running off along a near-null direction).
Runs, not requests, are resampled, so the between-run variance is in the draws by construction; for an unbounded
problem the draws' covariance is the run-level sandwich H⁻¹(Σ s_u s_uᵀ)H⁻¹, the same notion of uncertainty as the
step fit's posterior (:mod:`rooflab.fit.posterior`). The draws are stored whole
(:class:`rooflab.model.posterior.Posterior`, ``kind = draws``). What it leaves out: the composition feedback (a
resampled fit would replay differently — second order near θ̂), the Nelder–Mead polish, and the fixed point's
own lack of convergence (θ̂ is taken as given). Cost: one recorded replay per training window plus ``n_boot``
small bounded solves (on Gram matrices, whatever the number of requests).

:func:`linearised_loro` is the cross-validation counterpart (the shifted problem without one run), which the interval
benchmark uses for the model-discrepancy term of the real data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import lsq_linear

from rooflab.data.traces import Trace
from rooflab.fit.request_level import (
    ALPHA_MAX,
    PHYSICAL,
    E2EOptions,
    _windows,
    stacked_design,
    stacked_rows,
    stacked_system,
)
from rooflab.fit.summary_level import (
    SummaryOptions,
    SummaryTarget,
    _stage_rows,
    anchored_replay,
)
from rooflab.model.coefficients import ALPHA_NAMES, Coefficients
from rooflab.model.posterior import Posterior
from rooflab.model.variants import get_variant
from rooflab.replay.predict import replay

Unit = tuple[np.ndarray, np.ndarray]  # (A_u, b_u) of one run / experiment over θ = (β, α0, α1, α2)


def _theta(c: Coefficients) -> np.ndarray:
    return np.array([c.beta[n] for n in get_variant(c.variant).names] + list(c.alpha), dtype=np.float64)


def _from_theta(c: Coefficients, theta: np.ndarray) -> Coefficients:
    names = get_variant(c.variant).names
    return c.with_values(beta=dict(zip(names, map(float, theta[:len(names)]))),
                         alpha=tuple(map(float, theta[len(names):])))


def _run_of(window_id: str) -> str:
    """The run a calibration window belongs to (``run@120s#2`` → ``run``)."""
    return re.split(r"[@#]", window_id, maxsplit=1)[0]


def _root(G: np.ndarray) -> np.ndarray:
    """R with RᵀR = G (G symmetric PSD)."""
    w, V = np.linalg.eigh((G + G.T) / 2)
    return np.sqrt(np.clip(w, 0, None))[:, None] * V.T


@dataclass(frozen=True)
class LinearisedSystem:
    """The linearised problem at θ̂, shifted so that θ̂ solves it: per-unit augmented Gram matrices of
    [A_u, b̃_u] (free coefficients; fixed ones moved to the right-hand side), the prior's, the bounds."""

    theta: np.ndarray  # θ̂, all coefficients
    free: np.ndarray  # bool mask of the estimated coefficients
    grams: np.ndarray  # (U, f+1, f+1)
    prior: np.ndarray  # (f+1, f+1)
    lower: np.ndarray
    upper: np.ndarray

    def solve(self, counts: np.ndarray) -> np.ndarray:
        """The bounded least-squares solution with unit u counted ``counts[u]`` times (θ̂ for all ones)."""
        G = np.tensordot(counts, self.grams, axes=1) + self.prior
        R = _root(G)
        A, b = R[:, :-1], R[:, -1]
        scale = np.sqrt((A ** 2).sum(axis=0))
        scale = np.where(scale > 0, scale, 1.0)
        f = self.free
        res = lsq_linear(A / scale, b, bounds=(self.lower[f] * scale, self.upper[f] * scale), method="bvls",
                         lsmr_tol="auto")
        out = self.theta.copy()
        out[f] = res.x / scale
        return np.clip(out, self.lower, self.upper)  # the solver's bounds hold to rounding only

    def bootstrap(self, n_boot: int, seed: int) -> np.ndarray:
        U = len(self.grams)
        rng = np.random.default_rng(seed)
        return np.array([self.solve(np.bincount(rng.integers(0, U, U), minlength=U).astype(float))
                         for _ in range(n_boot)]).reshape(n_boot, len(self.theta))


def linearised_system(units: Sequence[Unit], P: np.ndarray, q: np.ndarray, theta: np.ndarray, free: np.ndarray,
                      lower: np.ndarray, upper: np.ndarray) -> LinearisedSystem:
    """:class:`LinearisedSystem` of the units (A_u, b_u) and prior rows (P, q) at ``theta`` (module docstring)."""
    f = free
    fixed = ~free
    blocks = [(A[:, f], b - A[:, fixed] @ theta[fixed]) for A, b in units]
    blocks_p = (P[:, f], q - P[:, fixed] @ theta[fixed])
    A_all = np.vstack([a for a, _ in blocks] + [blocks_p[0]])
    b_all = np.concatenate([b for _, b in blocks] + [blocks_p[1]])
    scale = np.sqrt((A_all ** 2).sum(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    x, *_ = np.linalg.lstsq(A_all / scale, b_all, rcond=None)
    delta = theta[f] - x / scale  # θ̂ − θ_u: shifting b by A·δ makes θ̂ the solution

    def aug(A: np.ndarray, b: np.ndarray) -> np.ndarray:
        Z = np.column_stack([A, b + A @ delta])
        return Z.T @ Z

    return LinearisedSystem(theta, free, np.array([aug(a, b) for a, b in blocks]), aug(*blocks_p), lower, upper)


def _posterior(c: Coefficients, draws: np.ndarray, runs: list[str], method: str, lower: np.ndarray,
               upper: np.ndarray) -> Posterior:
    names = get_variant(c.variant).names + list(ALPHA_NAMES)
    cov = np.cov(draws, rowvar=False) if len(draws) > 1 else np.zeros((len(names), len(names)))
    return Posterior(names, _theta(c), np.atleast_2d(cov), method, lower, upper, draws,
                     lineage={"runs": sorted(set(runs)), "kind": "full", "parent": None, "added_runs": []})


# ---------------------------------------------------------------------------------------------------
# request level


def stacked_designs(traces: Sequence[Trace], coefs: Coefficients, options: E2EOptions) -> list[dict]:
    """The stacked per-request designs of the calibration windows of ``traces`` at ``coefs`` (one recorded replay
    per window; ``design["run"]`` is the window's id)."""
    win = _windows(list(traces), options)
    seen: dict[str, int] = {}
    for tr in win:
        k = seen[tr.run_id] = seen.get(tr.run_id, 0) + 1
        if k > 1:
            tr.run_id = f"{tr.run_id}#{k}"
    return [stacked_design(tr, replay(tr, coefs, record=True), coefs.variant, coefs.formulas) for tr in win]


def e2e_system(designs: Sequence[dict], coefs: Coefficients, options: E2EOptions = E2EOptions()
               ) -> tuple[LinearisedSystem, list[str]]:
    """The linearised end-to-end problem at ``coefs`` (the rows and prior of
    :func:`rooflab.fit.request_level.fit_stacked`), one unit per run; and the runs."""
    variant = get_variant(coefs.variant)
    p = len(variant.terms)
    runs = sorted({_run_of(d["run"]) for d in designs})
    units = []
    for r in runs:
        parts = [stacked_system(d) for d in designs if _run_of(d["run"]) == r and len(d["ttft"])]
        if parts:
            units.append((np.vstack([a for a, _ in parts]), np.concatenate([b for _, b in parts])))
    prior = [j for j, t in enumerate(variant.terms) if t.prior is not None] \
        if options.fit_beta and options.prior_strength > 0 else []
    P = np.zeros((len(prior), p + 3))
    q = np.zeros(len(prior))
    for k, j in enumerate(prior):
        P[k, j] = np.sqrt(options.prior_strength)
        q[k] = np.sqrt(options.prior_strength) * float(variant.terms[j].prior or 0.0)
    free = np.array([options.fit_beta] * p + [True] * 3)
    lo = np.array([PHYSICAL[0] if t.prior is not None else 0.0 for t in variant.terms] + [0.0] * 3)
    hi = np.array([PHYSICAL[1] if t.prior is not None else np.inf for t in variant.terms] + list(ALPHA_MAX))
    kept = [r for r in runs if any(_run_of(d["run"]) == r and len(d["ttft"]) for d in designs)]
    return linearised_system(units, P, q, _theta(coefs), free, lo, hi), kept


def e2e_posterior(traces: Sequence[Trace], coefs: Coefficients, options: E2EOptions = E2EOptions(), *,
                  n_boot: int = 100, seed: int = 0) -> tuple[Posterior, list[dict]]:
    """The posterior of an end-to-end calibration's result ``coefs`` (module docstring) and the designs it used."""
    designs = stacked_designs(traces, coefs, options)
    system, runs = e2e_system(designs, coefs, options)
    how = (f"whole-run bootstrap ({n_boot} draws over {len(runs)} runs) of the stacked per-request "
           "linearisation at the fitted coefficients"
           + ("; one run: no between-run information, so no spread" if len(runs) < 2 else ""))
    return _posterior(coefs, system.bootstrap(n_boot, seed), runs, how, system.lower, system.upper), designs


def linearised_loro(designs: Sequence[dict], coefs: Coefficients, options: E2EOptions = E2EOptions(), *,
                    groups: Mapping[str, str] | None = None) -> dict[str, Coefficients]:
    """run -> ``coefs`` as the linearised problem moves it when that run is left out; with ``groups`` (run ->
    group, e.g. its model) the run's whole group is left out (leave-one-model-out: the error of a model the fit
    has not seen)."""
    system, runs = e2e_system(designs, coefs, options)
    group = {r: (groups or {}).get(r, r) for r in runs}
    out = {}
    for r in runs:
        counts = np.array([0.0 if group[q] == group[r] else 1.0 for q in runs])
        if counts.any():
            out[r] = _from_theta(coefs, system.solve(counts))
    return out


# ---------------------------------------------------------------------------------------------------
# summary level


def summary_rows(targets: Sequence[SummaryTarget], coefs: Coefficients, options: SummaryOptions
                 ) -> list[tuple[str, np.ndarray, np.ndarray, float, float, float]]:
    """The per-stage mean rows :func:`rooflab.fit.summary_level.solve_summaries` solves, from one anchored replay
    of each experiment at ``coefs``."""
    rows = []
    for t in targets:
        res, _ = anchored_replay(t, coefs, options)
        Xt, Xe, kept = stacked_rows(t.trace, res, coefs.variant, coefs.formulas)
        for k, (ut, ue, n_out) in _stage_rows(t.trace, res.requests, Xt, Xe, kept,
                                              t.stage_keys(options.per_stage)).items():
            ttft, e2e = t.means_us[k]
            rows.append((t.name or t.trace.run_id, ut, ue, n_out, ttft, e2e))
    return rows


def summary_system(rows: Sequence[tuple[str, np.ndarray, np.ndarray, float, float, float]], coefs: Coefficients,
                   centre: Coefficients, options: SummaryOptions) -> tuple[LinearisedSystem, list[str]]:
    """The linearised summary problem at ``coefs``: the rows, weights and prior of
    :func:`rooflab.fit.summary_level.solve_summaries` (kept in step with it by ``tests/test_posterior.py``), one
    unit per experiment."""
    p = len(get_variant(coefs.variant).terms)
    a2_ttft = 1.0 if coefs.formulas == "blis" else 0.0
    exps = sorted({r[0] for r in rows})
    units = []
    for e in exps:
        mine = [r for r in rows if r[0] == e]
        w = 1.0 / np.sqrt(2.0 * len(mine))
        A, b = [], []
        for _, ut, ue, n_out, ttft, e2e in mine:
            A += [np.r_[ut, 1.0, 0.0, a2_ttft] / ttft * w, np.r_[ue, 1.0, 1.0, n_out] / e2e * w]
            b += [w, w]
        units.append((np.array(A), np.array(b)))
    theta0 = _theta(centre)
    scale = np.r_[[abs(v) if abs(v) > 0 else 1.0 for v in theta0[:p]], options.alpha_prior_scale_us]
    lam = np.sqrt(options.prior_strength)
    P = np.diag(lam / scale)
    q = lam * theta0 / scale
    lo = np.zeros(p + 3)
    hi = np.r_[np.full(p, np.inf), ALPHA_MAX]
    return linearised_system(units, P, q, _theta(coefs), np.ones(p + 3, bool), lo, hi), exps


def summary_posterior(targets: Sequence[SummaryTarget], coefs: Coefficients,
                      options: SummaryOptions = SummaryOptions(), *, prior: Coefficients | None = None,
                      n_boot: int = 100, seed: int = 0) -> Posterior:
    """The posterior of a summary-level calibration's result ``coefs``, experiments resampled whole. ``prior``: the
    centre of the fit's prior (``calibrate_from_summaries``' ``prior``, else its ``start``); default ``coefs``."""
    system, exps = summary_system(summary_rows(targets, coefs, options), coefs, prior or coefs, options)
    how = (f"whole-experiment bootstrap ({n_boot} draws over {len(exps)} experiments) of the per-stage mean "
           "rows at the fitted coefficients")
    return _posterior(coefs, system.bootstrap(n_boot, seed), exps, how, system.lower, system.upper)
