"""The posterior over β and α of the step-level fit, its sufficient statistics, and sequential updates (issue 18).

**The linear posterior.** The step fit (:func:`rooflab.fit.beta.fit_beta`) minimises

    L(β) = (1/n) Σ_i r_i²  +  λ Σ_{j with prior} (β_j − π_j)²,      r_i = x_i·β / y_i − 1,

a relative-error least squares with a Gaussian prior. Read as a likelihood with i.i.d. step residuals of
variance σ², it is the Bayesian linear model with prior N(π_j, σ²/(nλ)) on each efficiency term, whose posterior
covariance is V_B = (σ²/n)·H⁻¹ with H = A/n + λD (A = Σ x̃x̃ᵀ, x̃ = x/y; D = 1 on the prior terms).

**Runs, not steps, are the independent unit.** Steps of one run share its workload, its server and its
model-form error, so V_B (n ~ 10⁵ steps) is far too narrow. rooflab uses the *sandwich posterior*

    V = H⁻¹ (M_runs + (σ²/n)·λD) H⁻¹,     M_runs = R/(R−1) · Σ_r (s_r − (n_r/n)·Σ s)(…)ᵀ / n²,

where s_r = Σ_{i∈r} x̃_i r_i is run r's score (exact from its Gram matrix of [x̃, 1]). Why this choice: (1) when
steps really are i.i.d., E[M_runs] = σ²A/n² and V reduces to V_B exactly — it *is* the Bayesian posterior then;
(2) otherwise its data part is the cluster-robust (run-level) covariance, so between-run dispersion enters
direction by direction (β7 may vary between runs while β1 does not), not as one scalar inflation; (3) a term the
data cannot see keeps its prior variance σ²/(nλ); (4) it needs only the per-run Gram matrices, so a sequential
update reproduces it exactly. It agrees with the whole-run bootstrap's covariance (``BetaFit.draws``) in the
tests; with one run there is no between-run information and V_B is used (said in ``method``).

**α** (α0 = mean API overhead; α1 + α2·n_out = post-decode overhead by NNLS) is linear too: the same run-level
sandwich over per-run sums (α0: Σq, n; α1, α2: the Gram matrix of [1, n_out, post]).

**Sufficient statistics and sequential updates.** :class:`FitState` holds the model form (variant, formulas,
fp8 peak, λ) and per run the Gram matrix of [x/y, 1] and the α sums. Adding a new run's statistics and solving
again (:func:`update_state`, :func:`coefficients_from_state`) gives *the same* β, α and posterior as a full refit
with the same λ on all runs — the problem only sees sums of Gram matrices — to floating-point tolerance
(``tests/test_posterior.py``). The state records its lineage (parent fit, runs added at each update).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import lsq_linear

from rooflab.data.saturation import route_steps
from rooflab.errors import InputError
from rooflab.fit.beta import AlphaFit, BetaFit, Design, _proportional_terms, solve
from rooflab.model.coefficients import ALPHA_NAMES, Coefficients
from rooflab.model.features import featurize
from rooflab.model.posterior import Posterior
from rooflab.model.variants import get_variant, resolve_formulas

STATE_FORMAT = "rooflab.fit-state/1"


@dataclass
class RunStats:
    """One run's sufficient statistics: the Gram matrix of its fitted steps' relative rows [x/y, 1] and the α
    sums of its requests (API overhead q = queued − arrived; post-decode rows [1, n_out, post])."""

    run: str
    gram: np.ndarray  # (p+1, p+1)
    rows: float  # fitted steps
    n_q: float = 0.0
    sum_q: float = 0.0
    sum_q2: float = 0.0
    post_gram: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))  # Gram of [1, n_out, post]

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "rows": self.rows, "gram": self.gram.tolist(), "n_q": self.n_q,
                "sum_q": self.sum_q, "sum_q2": self.sum_q2, "post_gram": self.post_gram.tolist()}


@dataclass
class FitState:
    """The model form and the per-run sufficient statistics of a step fit: enough to update it with new runs."""

    variant: str
    formulas: str
    fp8_peak: bool
    prior_strength: float  # λ, fixed across sequential updates (a different λ is a different model form)
    runs: list[RunStats]
    alpha_fitted: bool = True
    lineage: list[dict[str, Any]] = field(default_factory=list)  # [{kind, parent, runs_added, n_runs}]

    @property
    def form(self) -> dict[str, Any]:
        return {"variant": self.variant, "formulas": self.formulas, "fp8_peak": self.fp8_peak,
                "prior_strength": self.prior_strength}

    @property
    def run_ids(self) -> list[str]:
        return [r.run for r in self.runs]

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self.form, "alpha_fitted": self.alpha_fitted,
                "runs": [r.to_dict() for r in self.runs], "lineage": list(self.lineage)}


def state_from_doc(doc: Any, source: str = "") -> FitState:
    """Read :meth:`FitState.to_dict`; a problem is one :class:`InputError` line naming the field."""
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise InputError(source, "format", f"not a rooflab fit state (expected format {STATE_FORMAT})")
    try:
        variant = get_variant(str(doc["variant"]))
        p = len(variant.terms)
        runs = []
        for i, r in enumerate(doc["runs"]):
            g = np.array(r["gram"], dtype=np.float64)
            pg = np.array(r["post_gram"], dtype=np.float64)
            if g.shape != (p + 1, p + 1) or pg.shape != (3, 3):
                raise InputError(source, f"runs[{i}].gram", f"expected a {p + 1}×{p + 1} matrix")
            runs.append(RunStats(str(r["run"]), g, float(r["rows"]), float(r["n_q"]), float(r["sum_q"]),
                                 float(r.get("sum_q2", 0.0)), pg))
        return FitState(variant.name, str(doc["formulas"]), bool(doc["fp8_peak"]), float(doc["prior_strength"]),
                        runs, bool(doc.get("alpha_fitted", True)), list(doc.get("lineage") or []))
    except KeyError as exc:
        raise InputError(source, str(exc).strip("'"), "missing") from None
    except (TypeError, ValueError) as exc:
        raise InputError(source, "runs", f"malformed ({exc})") from None


# ---------------------------------------------------------------------------------------------------
# statistics from data


def _alpha_sums(requests: pd.DataFrame | None, run: str) -> tuple[float, float, float, np.ndarray]:
    """(n_q, Σq, Σq², Gram of [1, n_out, post]) of ``run``'s requests, with :func:`rooflab.fit.beta.fit_alpha`'s
    rows."""
    cols = ("arrived_us", "queued_us", "finished_us", "departed_us", "output_tokens", "run_id")
    if requests is None or len(requests) == 0 or not all(c in requests.columns for c in cols):
        return 0.0, 0.0, 0.0, np.zeros((3, 3))
    r = requests[requests["run_id"].astype(str).to_numpy() == run]
    q = (r["queued_us"] - r["arrived_us"]).to_numpy(dtype=float)
    post = (r["departed_us"] - r["finished_us"]).to_numpy(dtype=float)
    nout = r["output_tokens"].to_numpy(dtype=float)
    q = q[np.isfinite(q)]
    ok = np.isfinite(post) & np.isfinite(nout)
    Z = np.column_stack([np.ones(int(ok.sum())), nout[ok], post[ok]])
    return float(len(q)), float(q.sum()), float(q @ q), Z.T @ Z


def run_stats(X: np.ndarray, y: np.ndarray, run_ids: np.ndarray, requests: pd.DataFrame | None = None,
              runs: list[str] | None = None) -> list[RunStats]:
    """Per-run statistics of the fitted steps (``X`` = the variant's design matrix, ``y`` step times in µs; rows
    the fit would drop — non-finite, y ≤ 0 — are dropped here too) and of the runs' requests. ``runs``: the runs
    to return (default: those with steps or requests), in that order."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    run_ids = np.asarray(run_ids).astype(str)
    ok = np.isfinite(y) & (y > 0) & np.isfinite(X).all(axis=1)
    Z = np.column_stack([X[ok] / y[ok][:, None], np.ones(int(ok.sum()))])
    rid = run_ids[ok]
    if runs is None:
        seen = set(rid.tolist())
        if requests is not None and "run_id" in getattr(requests, "columns", ()):
            seen |= set(requests["run_id"].astype(str))
        runs = sorted(seen)
    out = []
    for run in runs:
        Zr = Z[rid == run]
        n_q, sum_q, sum_q2, pg = _alpha_sums(requests, run)
        out.append(RunStats(run, Zr.T @ Zr, float(len(Zr)), n_q, sum_q, sum_q2, pg))
    return out


def training_rows(steps: pd.DataFrame, variant: str, formulas: str, fp8_peak: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, run ids) of the steps :func:`rooflab.fit.calibration.calibrate` fits: step time known, not
    saturated (docs/spec.md §6), not in a held-out (``validation``) run."""
    v = get_variant(variant)
    if len(steps) == 0:
        return np.zeros((0, len(v.terms))), np.zeros(0), np.zeros(0, dtype=str)
    routing = route_steps(steps)
    X = v.design_matrix(featurize(steps, resolve_formulas(v, formulas), fp8_peak=fp8_peak))
    y = steps["step_time_us"].to_numpy(dtype=np.float64)
    held = (steps["split"].astype(str).str.lower() == "validation").to_numpy() if "split" in steps else \
        np.zeros(len(steps), bool)
    train = np.isfinite(y) & (y > 0) & ~routing.saturated & ~held
    return X[train], y[train], steps["run_id"].astype(str).to_numpy()[train]


def state_from_fit(beta: BetaFit, alpha: AlphaFit, requests: pd.DataFrame | None, *, fp8_peak: bool = True
                   ) -> FitState:
    """The state of a finished full fit: its per-run Gram matrices (``BetaFit.run_gram``) and λ, plus the α sums
    of ``requests`` (the table :func:`rooflab.fit.beta.fit_alpha` was given)."""
    stats = []
    req_runs = sorted(set(requests["run_id"].astype(str))) if requests is not None and len(requests) else []
    for run, g, rows in zip(beta.runs, beta.run_gram, beta.run_rows):
        n_q, sum_q, sum_q2, pg = _alpha_sums(requests, run)
        stats.append(RunStats(run, np.asarray(g, dtype=np.float64), float(rows), n_q, sum_q, sum_q2, pg))
    p = len(beta.variant.terms)
    for run in req_runs:  # runs with requests but no fitted steps (saturated, held out): α only
        if run not in beta.runs:
            n_q, sum_q, sum_q2, pg = _alpha_sums(requests, run)
            stats.append(RunStats(run, np.zeros((p + 1, p + 1)), 0.0, n_q, sum_q, sum_q2, pg))
    return FitState(beta.variant.name, beta.formulas, fp8_peak, float(beta.prior_strength), stats,
                    alpha.alpha is not None, [{"kind": "full", "parent": None, "runs_added": list(beta.runs),
                                               "n_runs": len(stats)}])


def update_state(state: FitState, new: list[RunStats], *, parent: str | None = None) -> FitState:
    """``state`` with the runs ``new`` added (a run it already holds is refused: its data would count twice)."""
    have = set(state.run_ids)
    p = len(get_variant(state.variant).terms)
    for s in new:
        if s.run in have:
            raise InputError(None, f"runs.{s.run}", "already in the fit: a sequential update adds new runs only")
        if s.gram.shape != (p + 1, p + 1):
            raise InputError(None, f"runs.{s.run}.gram", f"expected {p + 1}×{p + 1} for variant {state.variant}")
    runs = state.runs + list(new)
    entry = {"kind": "sequential", "parent": parent, "runs_added": [s.run for s in new], "n_runs": len(runs)}
    return FitState(state.variant, state.formulas, state.fp8_peak, state.prior_strength, runs,
                    state.alpha_fitted or any(s.n_q > 0 for s in new), [*state.lineage, entry])


# ---------------------------------------------------------------------------------------------------
# solving from the statistics


def design_from_state(state: FitState) -> Design:
    """The fit's :class:`~rooflab.fit.beta.Design` with whole runs as units (what :func:`solve` needs: column
    scales, active set and ties come from the summed Gram matrix exactly as in :func:`build_design`)."""
    variant = get_variant(state.variant)
    fitted = [r for r in state.runs if r.rows > 0]
    if not fitted:
        raise InputError(None, "steps", "no usable steps to fit (after saturation routing and missing step times)")
    gram = np.stack([r.gram for r in fitted])
    total = gram.sum(axis=0)
    norms = np.sqrt(np.clip(np.diag(total)[:-1], 0.0, None))
    has_prior = np.array([t.prior is not None for t in variant.terms])
    ties = _proportional_terms(total[:-1, :-1], norms, has_prior, variant)
    tied = np.array([t.name in ties for t in variant.terms])
    active = ((norms > 0) | has_prior) & ~tied
    return Design(variant, gram, np.arange(len(fitted)), [r.run for r in fitted], "run",
                  np.array([r.rows for r in fitted]), np.where(norms > 0, norms, 1.0), active, ties)


def solve_alpha(state: FitState) -> np.ndarray | None:
    """α from the summed statistics: α0 = max(0, mean q); (α1, α2) = NNLS of post on [1, n_out]."""
    n_q = sum(r.n_q for r in state.runs)
    pg = sum((r.post_gram for r in state.runs), np.zeros((3, 3)))
    if n_q == 0 and pg[0, 0] == 0:
        return None
    a0 = max(0.0, sum(r.sum_q for r in state.runs) / n_q) if n_q else 0.0
    if pg[0, 0] == 0:
        return np.array([a0, 0.0, 0.0])
    w, V = np.linalg.eigh(pg)
    R = np.sqrt(np.clip(w, 0, None))[:, None] * V.T  # RᵀR = Gram of [1, n_out, post]
    s = np.sqrt(np.clip(np.diag(pg)[:2], 1e-300, None))
    res = lsq_linear(R[:, :2] / s, R[:, 2], bounds=(0.0, np.inf), method="bvls")
    return np.r_[a0, res.x / s]


def _inv(H: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric PSD matrix, scale-free (near-singular directions get ~0 weight, not ∞)."""
    d = np.sqrt(np.clip(np.diag(H), 1e-300, None))
    C = H / np.outer(d, d)
    w, V = np.linalg.eigh(C)
    inv = (V / np.clip(w, 1e-12 * max(1.0, float(w.max(initial=0.0))), None)) @ V.T
    return inv / np.outer(d, d)


def beta_covariance(state: FitState, design: Design, beta: np.ndarray) -> tuple[np.ndarray, str]:
    """The sandwich posterior covariance of β (module docstring) and a one-line description of it."""
    p = design.p
    fitted = [r for r in state.runs if r.rows > 0]
    G = sum((r.gram for r in fitted), np.zeros((p + 1, p + 1)))
    n = float(sum(r.rows for r in fitted))
    act = np.flatnonzero(design.active)
    cov = np.zeros((p, p))
    if len(act) == 0:
        return cov, "no active coefficient"
    lam = state.prior_strength
    prior = np.array([t.prior is not None for t in design.variant.terms])[act].astype(float)
    theta = np.r_[beta, -1.0]
    sigma2 = float(theta @ G @ theta) / max(n - len(act), 1.0)  # mean squared relative residual
    H = G[np.ix_(act, act)] / n + lam * np.diag(prior)
    Hinv = _inv(H)
    R = len(fitted)
    if R >= 2:
        scores = np.array([r.gram[act, :] @ theta for r in fitted])  # (R, |act|): Σ_i x̃_i r_i per run
        share = np.array([r.rows for r in fitted]) / n
        centred = scores - share[:, None] * scores.sum(axis=0)
        M = R / (R - 1) * centred.T @ centred / n ** 2
        how = (f"linear posterior, run-level sandwich over {R} runs (between-run dispersion included; "
               f"λ={lam:g}, σ_rel={np.sqrt(sigma2):.3g})")
    else:
        M = sigma2 * G[np.ix_(act, act)] / n ** 2
        how = f"linear posterior, i.i.d. steps (one run: no between-run information; λ={lam:g})"
    V = Hinv @ (M + sigma2 / n * lam * np.diag(prior)) @ Hinv
    cov[np.ix_(act, act)] = (V + V.T) / 2
    return cov, how


def alpha_covariance(state: FitState, alpha: np.ndarray) -> np.ndarray:
    """Run-level sandwich covariance of (α0, α1, α2) from the per-run sums (i.i.d. requests with one run)."""
    runs = [r for r in state.runs if r.n_q > 0 or r.post_gram[0, 0] > 0]
    n_q = sum(r.n_q for r in runs)
    pg = sum((r.post_gram for r in runs), np.zeros((3, 3)))
    theta = np.r_[alpha[1:], -1.0]
    H = np.zeros((3, 3))
    H[0, 0] = n_q if n_q else 1.0
    H[1:, 1:] = pg[:2, :2] if pg[0, 0] else np.eye(2)
    scores = np.array([np.r_[r.sum_q - r.n_q * alpha[0], r.post_gram[:2, :] @ theta] for r in runs])
    if len(runs) >= 2:
        weight = np.array([[r.n_q / n_q if n_q else 0.0] + [r.post_gram[0, 0] / pg[0, 0] if pg[0, 0] else 0.0] * 2
                           for r in runs])
        centred = scores - weight * scores.sum(axis=0)
        M = len(runs) / (len(runs) - 1) * centred.T @ centred
    else:  # one run: i.i.d. requests
        M = np.zeros((3, 3))
        if runs:
            r = runs[0]
            M[0, 0] = max(0.0, r.sum_q2 - 2 * alpha[0] * r.sum_q + r.n_q * alpha[0] ** 2)
        s2 = float(theta @ pg @ theta) / max(pg[0, 0] - 2, 1.0) if pg[0, 0] else 0.0
        M[1:, 1:] = s2 * pg[:2, :2]
    Hinv = _inv(H)
    V = Hinv @ M @ Hinv
    return (V + V.T) / 2


def posterior_from_state(state: FitState, beta: np.ndarray, alpha: np.ndarray | None) -> Posterior:
    """The joint posterior of β and (when fitted) α; β and α come from different data and are independent."""
    design = design_from_state(state)
    variant = design.variant
    cov_b, how = beta_covariance(state, design, beta)
    names = list(variant.names)
    lower = [t.lower for t in variant.terms]
    upper = [t.upper for t in variant.terms]
    mean = list(beta)
    blocks = [cov_b]
    if alpha is not None:
        names += list(ALPHA_NAMES)
        lower += [0.0] * 3
        upper += [np.inf] * 3
        mean += list(alpha)
        blocks.append(alpha_covariance(state, alpha))
    p = len(names)
    cov = np.zeros((p, p))
    k = 0
    for b in blocks:
        cov[k:k + len(b), k:k + len(b)] = b
        k += len(b)
    last = state.lineage[-1] if state.lineage else {}
    lineage = {"runs": [r.run for r in state.runs if r.rows > 0], "alpha_runs": [r.run for r in state.runs
                                                                                if r.n_q > 0],
               "kind": last.get("kind", "full"), "parent": last.get("parent"), "added_runs": last.get("runs_added", []),
               "history": list(state.lineage)}
    return Posterior(names, np.array(mean, dtype=np.float64), cov, how, np.array(lower, dtype=np.float64),
                     np.array(upper, dtype=np.float64), lineage=lineage)


def solve_state(state: FitState) -> tuple[np.ndarray, np.ndarray | None, Posterior]:
    """(β, α or None, posterior) from the statistics alone — a full refit's answer at the state's λ."""
    design = design_from_state(state)
    G, n = design.total()
    beta = solve(design, G, n, state.prior_strength)
    alpha = solve_alpha(state)
    return beta, alpha, posterior_from_state(state, beta, alpha)


def coefficients_from_state(state: FitState, *, source: str = "", notes: list[str] | None = None,
                            unidentified: dict[str, str] | None = None) -> Coefficients:
    """The coefficient set (point estimate + posterior) of ``state``."""
    beta, alpha, post = solve_state(state)
    names = get_variant(state.variant).names
    fitted = alpha is not None
    a = tuple(map(float, alpha)) if alpha is not None else (0.0, 0.0, 0.0)
    return Coefficients(dict(zip(names, map(float, beta))), a,
                        state.variant, state.formulas, source or f"fit state of {len(state.runs)} runs", fitted,
                        list(notes or []) + ([] if fitted else ["α not fitted: replayed with α = 0 (no request data)"]),
                        dict(unidentified or {}), post)
