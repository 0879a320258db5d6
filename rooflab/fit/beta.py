"""Fitting β (step time) and α (request overheads), docs/spec.md §7.

β: bounded least squares with relative-error weighting and a Gaussian prior toward 1 on the
efficiency corrections, both in the same dimensionless units::

    loss(β) = mean_i ((x_i·β − y_i) / y_i)²  +  λ · Σ_{j with prior} (β_j − prior_j)²

λ ("prior strength") is the mean squared relative error that one unit of (β_j − 1)² is worth; it is
chosen on held-out *runs* (leave-one-run-out) when there are several. The data enter only through the
Gram matrix of the relative rows ``[x_i/y_i, 1]`` of each resampling unit, so the fit, the bootstrap of
whole runs (200 draws), leave-one-run-out refits and λ selection all cost a few small solves, whatever
the number of steps.

α: α0 = API overhead (queued − arrived), α1 + α2·n_out = post-decode overhead (departed − finished),
non-negative least squares on request rows, bootstrapped the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import lsq_linear, nnls

from rooflab.errors import InputError
from rooflab.model.terms import Variant
from rooflab.model.variants import DEFAULT_VARIANT, get_variant

DEFAULT_PRIOR_STRENGTH = 1e-3
PRIOR_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MIN_RUNS_FOR_RUN_BOOTSTRAP = 5
BLOCKS_PER_RUN = 40  # block bootstrap within runs when there are too few runs to resample whole runs


@dataclass
class Design:
    """Relative-error design of one fit: per-unit Gram matrices of [X/y, 1] plus what the checks need."""

    variant: Variant
    gram: np.ndarray  # (U, p+1, p+1) per resampling unit
    unit_run: np.ndarray  # (U,) run index of each unit
    runs: list[str]
    unit_kind: str  # "run" or "block"
    n_rows: np.ndarray  # (U,) rows per unit
    scale: np.ndarray  # (p,) column norms of X/y (1 where a column is all zero)
    active: np.ndarray  # (p,) bool: column has data or a prior, and is not tied
    ties: dict  # held term -> term that takes the shared effect (proportional columns, no priors)

    @property
    def p(self) -> int:
        return len(self.variant.terms)

    def total(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        w = np.ones(len(self.gram)) if weights is None else weights
        return np.tensordot(w, self.gram, axes=1), float(w @ self.n_rows)


def build_design(X: np.ndarray, y: np.ndarray, run_ids: np.ndarray, variant: Variant,
                 order: np.ndarray | None = None, min_runs_for_run_bootstrap: int = MIN_RUNS_FOR_RUN_BOOTSTRAP
                 ) -> Design:
    """Group rows into resampling units (whole runs, or contiguous blocks within runs when there are
    fewer than ``min_runs_for_run_bootstrap`` runs) and reduce each to a Gram matrix."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(y) == 0:
        raise InputError(None, "steps", "no usable steps to fit (after saturation routing and missing step times)")
    Z = np.column_stack([X / y[:, None], np.ones(len(y))])
    runs, run_idx = np.unique(np.asarray(run_ids).astype(str), return_inverse=True)
    sort = np.lexsort((order if order is not None else np.arange(len(y)), run_idx))
    Z, run_idx = Z[sort], run_idx[sort]
    starts = np.searchsorted(run_idx, np.arange(len(runs)))
    ends = np.append(starts[1:], len(run_idx))
    unit_kind = "run" if len(runs) >= min_runs_for_run_bootstrap else "block"
    bounds, unit_run = [], []
    for r, (a, b) in enumerate(zip(starts, ends)):
        if unit_kind == "run":
            cuts = np.array([a, b])
        else:
            cuts = np.unique(np.linspace(a, b, min(BLOCKS_PER_RUN, b - a) + 1).round().astype(int))
        bounds += list(zip(cuts[:-1], cuts[1:]))
        unit_run += [r] * (len(cuts) - 1)
    gram = np.stack([Z[a:b].T @ Z[a:b] for a, b in bounds])
    n_rows = np.array([b - a for a, b in bounds], dtype=np.float64)
    norms = np.sqrt(np.diag(gram.sum(axis=0))[:-1])
    has_prior = np.array([t.prior is not None for t in variant.terms])
    ties = _proportional_terms(gram.sum(axis=0)[:-1, :-1], norms, has_prior, variant)
    tied = np.array([t.name in ties for t in variant.terms])
    active = ((norms > 0) | has_prior) & ~tied
    scale = np.where(norms > 0, norms, 1.0)
    return Design(variant, gram, np.array(unit_run), [str(r) for r in runs], unit_kind, n_rows, scale, active,
                  ties)


def _proportional_terms(G: np.ndarray, norms: np.ndarray, has_prior: np.ndarray, variant: Variant) -> dict:
    """Prior-free terms whose columns are proportional in this data (e.g. the per-step constant and the
    per-layer term when every step comes from one layer count) cannot be told apart: the term declared
    later (the more specific one) takes the shared effect and the earlier one is held at its bound."""
    ties = {}
    names = variant.names
    for j in range(len(names)):
        if has_prior[j] or norms[j] == 0:
            continue
        for k in range(len(names) - 1, j, -1):
            if has_prior[k] or norms[k] == 0 or names[k] in ties:
                continue
            if G[j, k] / (norms[j] * norms[k]) > 1 - 1e-9:
                ties[names[j]] = names[k]
                break
    return ties


def _gram_root(G: np.ndarray) -> np.ndarray:
    """A matrix R with RᵀR = G for a PSD Gram matrix (eigen-decomposition, robust when singular)."""
    w, V = np.linalg.eigh(G)
    return np.sqrt(np.clip(w, 0, None))[:, None] * V.T


def solve(design: Design, G: np.ndarray, n: float, lam: float) -> np.ndarray:
    """Minimise mean relative squared error + λ·prior penalty under the bounds, from a Gram matrix."""
    terms = design.variant.terms
    act = np.flatnonzero(design.active)
    p = design.p
    s = design.scale
    R = _gram_root(G)
    q = np.r_[act, p]
    A = R[:, q][:, :-1] / np.sqrt(n) / s[act]
    b = R[:, p] / np.sqrt(n)  # Z·[β; −1] = X·β/y − 1
    prior_rows, prior_b = [], []
    for k, j in enumerate(act):
        if terms[j].prior is not None and lam > 0:
            row = np.zeros(len(act))
            row[k] = np.sqrt(lam) / s[j]
            prior_rows.append(row)
            prior_b.append(np.sqrt(lam) * terms[j].prior)
    if prior_rows:
        A = np.vstack([A, np.array(prior_rows)])
        b = np.r_[b, prior_b]
    lo = np.array([terms[j].lower for j in act]) * s[act]
    hi = np.array([terms[j].upper for j in act]) * s[act]
    res = lsq_linear(A, b, bounds=(lo, hi), method="bvls", lsmr_tol="auto")
    beta = np.zeros(p)
    beta[act] = res.x / s[act]
    return beta


def conditional_precision(design: Design, G: np.ndarray, n: float) -> np.ndarray:
    """Data precision of each β given the others (1 / diag of the inverse Hessian of the data term)."""
    H = G[:-1, :-1] / n
    act = np.flatnonzero(design.active)
    out = np.zeros(design.p)
    if len(act) == 0:
        return out
    Hs = H[np.ix_(act, act)]
    d = np.sqrt(np.clip(np.diag(Hs), 1e-300, None))
    C = Hs / np.outer(d, d)  # scale-free inversion
    w, V = np.linalg.eigh(C)
    inv_diag = (V ** 2 / np.clip(w, 1e-12, None)).sum(axis=1)  # near-singular directions -> ~0 precision
    out[act] = (d ** 2) / inv_diag
    out[np.diag(H) <= 0] = 0.0  # a feature that is zero in all data carries no information
    return out


@dataclass
class BetaFit:
    variant: Variant
    formulas: str
    beta: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    draws: np.ndarray  # (n_boot, p)
    prior_strength: float
    prior_selection: dict  # {"method": ..., "scores": {λ: held-out MAPE}}
    data_precision: np.ndarray
    n_steps: int
    runs: list[str]
    unit_kind: str
    n_units: int
    ci: float
    run_gram: np.ndarray  # (runs, p+1, p+1): Gram matrix of each run's relative rows [x/y, 1]
    run_rows: np.ndarray  # (runs,) fitted steps per run
    loro: dict[str, np.ndarray] = field(default_factory=dict)  # run -> β fitted without that run
    ties: dict[str, str] = field(default_factory=dict)  # held term -> term that took the shared effect

    @property
    def names(self) -> list[str]:
        return self.variant.names

    def predict(self, features: pd.DataFrame | dict[str, Any]) -> np.ndarray:
        return self.variant.predict(features, self.beta)

    def coefficients(self) -> dict[str, float]:
        return dict(zip(self.names, map(float, self.beta)))

    def ci95(self) -> np.ndarray:
        """(p, 2) 95% intervals from the whole-run bootstrap draws (the point estimate where there are none)."""
        if len(self.draws) < 2:
            return np.column_stack([self.beta, self.beta])
        return np.quantile(self.draws, [0.025, 0.975], axis=0).T

    def to_dict(self) -> dict:
        ci95 = self.ci95()
        return {
            "variant": self.variant.name, "formulas": self.formulas,
            "coefficients": {t.name: {"value": float(b), "lower": float(lo), "upper": float(hi),
                                      "ci95": [float(c[0]), float(c[1])], "unit": t.unit, "meaning": t.meaning}
                             for t, b, lo, hi, c in zip(self.variant.terms, self.beta, self.lower, self.upper, ci95)},
            "interval": self.ci, "prior_strength": self.prior_strength, "prior_selection": self.prior_selection,
            "bootstrap": {"unit": self.unit_kind, "units": self.n_units, "draws": int(len(self.draws))},
            "n_steps": self.n_steps, "runs": self.runs, "ties": self.ties,
        }


def _heldout_mape(design: Design, Zs_by_run: dict, lam: float) -> float:
    errs = []
    for r, Z in Zs_by_run.items():
        w = (design.unit_run != r).astype(float)
        if w.sum() == 0:
            continue
        beta = solve(design, *design.total(w), lam)
        errs.append(np.mean(np.abs(Z[:, :-1] @ beta - 1.0)))
    return float(np.mean(errs)) if errs else np.nan


def fit_beta(X: np.ndarray, y: np.ndarray, run_ids: ArrayLike, variant: str | Variant = DEFAULT_VARIANT, *,
             formulas: str = "vllm", prior_strength: float | str = "auto", n_boot: int = 200, ci: float = 0.90,
             seed: int = 0, order: np.ndarray | None = None) -> BetaFit:
    """Fit β on unsaturated steps. ``X`` = design matrix of the variant, ``y`` = step times (µs)."""
    variant = get_variant(variant)
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    run_ids = np.asarray(run_ids).astype(str)
    ok = np.isfinite(y) & (y > 0) & np.isfinite(X).all(axis=1)
    design = build_design(X[ok], y[ok], run_ids[ok], variant, None if order is None else np.asarray(order)[ok])
    runs = design.runs

    if prior_strength == "auto" and len(runs) >= 2:
        Zs = {}
        rid = np.searchsorted(runs, run_ids[ok])
        Zfull = np.column_stack([X[ok] / y[ok][:, None], np.ones(ok.sum())])
        for r in range(len(runs)):
            Zs[r] = Zfull[rid == r]
        scores = {lam: _heldout_mape(design, Zs, lam) for lam in PRIOR_GRID}
        lam = min(scores, key=lambda k: (scores[k], -k))  # ties -> stronger prior
        selection = {"method": "leave-one-run-out held-out MAPE", "scores": {str(k): v for k, v in scores.items()}}
    else:
        lam = DEFAULT_PRIOR_STRENGTH if prior_strength == "auto" else float(prior_strength)
        selection = {"method": "fixed" if prior_strength != "auto" else "default (fewer than 2 runs)"}

    G, n = design.total()
    beta = solve(design, G, n, lam)

    rng = np.random.default_rng(seed)
    U = len(design.gram)
    draws = np.empty((n_boot, design.p))
    for i in range(n_boot):
        if design.unit_kind == "run":
            counts = np.bincount(rng.integers(0, U, U), minlength=U).astype(float)
        else:  # resample blocks within each run: every run keeps its share of the data
            counts = np.zeros(U)
            for r in range(len(runs)):
                units = np.flatnonzero(design.unit_run == r)
                np.add.at(counts, rng.choice(units, len(units)), 1.0)
        draws[i] = solve(design, *design.total(counts), lam)
    alpha = (1 - ci) / 2
    lower, upper = np.quantile(draws, [alpha, 1 - alpha], axis=0) if n_boot else (beta, beta)

    loro = {}
    if len(runs) >= 2:
        for r, name in enumerate(runs):
            w = (design.unit_run != r).astype(float)
            loro[name] = solve(design, *design.total(w), lam)

    return BetaFit(variant=variant, formulas=formulas, beta=beta, lower=np.asarray(lower),
                   upper=np.asarray(upper), draws=draws, prior_strength=lam, prior_selection=selection,
                   data_precision=conditional_precision(design, G, n), n_steps=int(ok.sum()), runs=runs,
                   unit_kind=design.unit_kind, n_units=U, ci=ci, loro=loro, ties=design.ties,
                   run_gram=np.stack([design.gram[design.unit_run == r].sum(axis=0) for r in range(len(runs))]),
                   run_rows=np.bincount(design.unit_run, weights=design.n_rows, minlength=len(runs)))


# ---------------------------------------------------------------------------------------------------
# α


@dataclass
class AlphaFit:
    alpha: np.ndarray | None  # [α0 µs, α1 µs, α2 µs/token]; None when the data has no such timestamps
    lower: np.ndarray | None
    upper: np.ndarray | None
    n_requests: int
    reason: str = ""
    draws: np.ndarray | None = None  # (n_boot, 3) bootstrap draws

    def to_dict(self) -> dict:
        if self.alpha is None or self.lower is None or self.upper is None:
            return {"fitted": False, "reason": self.reason}
        names = ("alpha0", "alpha1", "alpha2")
        units = ("µs", "µs", "µs/token")
        d = self.draws if self.draws is not None and len(self.draws) >= 2 else np.vstack([self.alpha, self.alpha])
        ci95 = np.quantile(d, [0.025, 0.975], axis=0).T
        return {"fitted": True, "n_requests": self.n_requests, "coefficients": {
            n: {"value": float(a), "lower": float(lo), "upper": float(hi), "ci95": [float(c[0]), float(c[1])],
                "unit": u}
            for n, a, lo, hi, c, u in zip(names, self.alpha, self.lower, self.upper, ci95, units)}}


def _alpha_point(q: np.ndarray, post: np.ndarray, nout: np.ndarray) -> np.ndarray:
    a0 = max(0.0, float(np.mean(q))) if len(q) else 0.0
    if len(post):
        (a1, a2), _ = nnls(np.column_stack([np.ones(len(post)), nout]), post)
    else:
        a1 = a2 = 0.0
    return np.array([a0, a1, a2])


def fit_alpha(requests: pd.DataFrame, *, n_boot: int = 200, ci: float = 0.90, seed: int = 0) -> AlphaFit:
    """α0 from queued − arrived; α1, α2 from departed − finished ~ α1 + α2·n_out (NNLS)."""
    if requests is None or len(requests) == 0:
        return AlphaFit(None, None, None, 0, "no request data")
    cols = ("arrived_us", "queued_us", "finished_us", "departed_us")
    if not all(c in requests.columns for c in cols):
        return AlphaFit(None, None, None, 0, "request data has no api/journey timestamps")
    r = requests
    q = (r["queued_us"] - r["arrived_us"]).to_numpy(dtype=float)
    post = (r["departed_us"] - r["finished_us"]).to_numpy(dtype=float)
    nout = r["output_tokens"].to_numpy(dtype=float)
    ok_q, ok_p = np.isfinite(q), np.isfinite(post) & np.isfinite(nout)
    if not ok_q.any() and not ok_p.any():
        return AlphaFit(None, None, None, 0, "request data has no ARRIVED/QUEUED or FINISHED/DEPARTED pairs")
    point = _alpha_point(q[ok_q], post[ok_p], nout[ok_p])
    rng = np.random.default_rng(seed)
    runs, run_idx = np.unique(r["run_id"].astype(str).to_numpy(), return_inverse=True)
    by_run = np.split(np.argsort(run_idx, kind="stable"), np.cumsum(np.bincount(run_idx))[:-1])
    boot = []
    for _ in range(n_boot):
        if len(runs) >= MIN_RUNS_FOR_RUN_BOOTSTRAP:
            idx = np.concatenate([by_run[k] for k in rng.integers(0, len(runs), len(runs))])
        else:
            idx = rng.integers(0, len(r), len(r))
        boot.append(_alpha_point(q[idx][ok_q[idx]], post[idx][ok_p[idx]], nout[idx][ok_p[idx]]))
    draws = np.array(boot) if boot else np.array([point])
    a = (1 - ci) / 2
    lo, hi = np.quantile(draws, [a, 1 - a], axis=0)
    return AlphaFit(point, lo, hi, int(max(ok_q.sum(), ok_p.sum())), draws=draws)
