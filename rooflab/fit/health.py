"""β health checks (docs/spec.md §8): every row of the table gives pass / warn / fail, the number behind it and
the suggested action."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from rooflab.fit.beta import BetaFit

PASS, WARN, FAIL, NA = "pass", "warn", "fail", "n/a"
_ORDER = {PASS: 0, NA: 0, WARN: 1, FAIL: 2}
MAX_DIAGNOSTIC_ROWS = 200_000


@dataclass(frozen=True)
class Check:
    check: str
    target: str  # coefficient(s) it concerns, or "design"
    status: str
    value: float
    rule: str  # thresholds, as text
    action: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value"] = None if not np.isfinite(self.value) else float(self.value)
        return d


def _grade(value: float, pass_if: Callable[[float], bool], warn_if: Callable[[float], bool]) -> str:
    if not np.isfinite(value):
        return FAIL
    return PASS if pass_if(value) else WARN if warn_if(value) else FAIL


def _scaled_design(X: np.ndarray, y: np.ndarray, cols: np.ndarray, seed: int = 0) -> np.ndarray:
    Z = X[:, cols] / y[:, None]
    if len(Z) > MAX_DIAGNOSTIC_ROWS:
        Z = Z[np.random.default_rng(seed).choice(len(Z), MAX_DIAGNOSTIC_ROWS, replace=False)]
    norms = np.linalg.norm(Z, axis=0)
    return Z / np.where(norms > 0, norms, 1.0)


def check_health(fit: BetaFit, X: np.ndarray, y: np.ndarray) -> list[Check]:
    """Run every docs/spec.md §8 check on a fit. ``X``/``y`` are the design matrix and step times it was fitted on."""
    terms = fit.variant.terms
    names = fit.names
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & (y > 0)
    X, y = X[ok], y[ok]
    tied = np.array([t.name in fit.ties for t in terms])
    present = (np.abs(X).sum(axis=0) > 0) & ~tied  # features the fit could use at all
    out: list[Check] = []
    for held, into in fit.ties.items():
        out.append(Check("proportional terms", f"{held}→{into}", WARN, 1.0, "columns proportional in the data",
                         f"{held} is held at 0 and {into} carries their shared effect: add data where they "
                         "differ (e.g. models with another layer count) to separate them"))

    # 1. physical range of the efficiency corrections
    for j, t in enumerate(terms):
        if t.prior is None:
            continue
        b = fit.beta[j]
        lo, hi = t.plausible or (0.3, 5.0)  # attention's own range: rooflab.model.variants
        status = PASS if 0.8 <= b <= hi else (WARN if lo <= b < 0.8 else FAIL)
        action = "" if status == PASS else ("below 0.8: the feature overstates the work, or another term absorbs it"
                                            if status == WARN else f"outside [{lo:g}, {hi:g}]: formula or data "
                                            f"problem — check the {t.meaning} feature and the input data")
        out.append(Check("physical range", t.name, status, b,
                         f"pass 0.8–{hi:g}, warn {lo:g}–0.8, fail <{lo:g} or >{hi:g}", action))

    draws = fit.draws
    if len(draws) >= 2:
        mean = draws.mean(axis=0)
        sd = draws.std(axis=0, ddof=1)
        # 2. bootstrap CV
        for j, t in enumerate(terms):
            if not present[j]:
                continue
            cv = sd[j] / abs(mean[j]) if mean[j] != 0 else np.inf
            status = _grade(cv, lambda v: v < 0.3, lambda v: v <= 0.5)
            out.append(Check("bootstrap CV", t.name, status, cv, "pass <30%, warn 30–50%, fail >50%",
                             "" if status == PASS else f"targeted runs that vary the {t.meaning} feature"))
        # 3. draws pinned at the lower bound
        for j, t in enumerate(terms):
            if not present[j]:
                continue
            pinned = float(np.mean(draws[:, j] <= t.lower + 1e-9 * max(1.0, abs(fit.beta[j]))))
            status = _grade(pinned, lambda v: v < 0.05, lambda v: v <= 0.2)
            out.append(Check("draws pinned at 0", t.name, status, pinned, "pass <5%, warn 5–20%, fail >20%",
                             "" if status == PASS else f"the data barely supports a positive {t.name}: "
                             f"vary the {t.meaning} feature or drop the term"))

    cols = np.flatnonzero(present)
    Zs = _scaled_design(X, y, cols)
    # 4. condition number of the column-scaled design
    sv = np.linalg.svd(Zs, compute_uv=False) if len(Zs) else np.array([np.inf])
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else np.inf
    confounded = ""
    if cond >= 30 and len(cols) > 1:
        _, _, Vt = np.linalg.svd(Zs, full_matrices=False)
        weak = np.abs(Vt[-1])
        top = cols[np.argsort(weak)[::-1][:2]]
        confounded = " and ".join(names[j] for j in top)
    status = _grade(cond, lambda v: v < 30, lambda v: v <= 100)
    out.append(Check("condition number", "design", status, cond, "pass <30, warn 30–100, fail >100",
                     "" if status == PASS else f"collinearity: vary the confounded features ({confounded})"))

    # 5. VIF, refitted on the active set (coefficients off their bound). The fit is least squares on the
    # relative rows x/y, where the per-step constant is an ordinary column (1/y), so the VIF is the
    # uncentered one of that design: VIF_j = [(ZᵀZ)⁻¹]_jj for unit-norm columns = 1 / (1 − R²_j).
    active = [k for k, j in enumerate(cols) if fit.beta[j] > terms[j].lower + 1e-12]
    if len(active) >= 2:
        Za = Zs[:, active]
        w, V = np.linalg.eigh(Za.T @ Za)
        vifs = (V ** 2 / np.clip(w, 1e-15, None)).sum(axis=1)
        for k, col in enumerate(active):
            j = cols[col]
            vif = float(vifs[k])
            status = _grade(vif, lambda v: v <= 5, lambda v: v <= 10)
            out.append(Check("VIF", names[j], status, vif, "pass ≤5, warn 5–10, fail >10",
                             "" if status == PASS else f"{names[j]} is nearly a combination of the other features: "
                             "add runs that move it independently"))

    # 6. pairwise bootstrap correlation
    if len(draws) >= 3:
        var = draws.std(axis=0) > 0
        idx = np.flatnonzero(var & present)
        if len(idx) >= 2:
            corr = np.corrcoef(draws[:, idx].T)
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    r = abs(corr[a, b])
                    status = _grade(r, lambda v: v < 0.7, lambda v: v <= 0.9)
                    if status != PASS:
                        out.append(Check("pairwise bootstrap correlation", f"{names[idx[a]]}~{names[idx[b]]}",
                                         status, r, "pass <0.7, warn 0.7–0.9, fail >0.9",
                                         "identified only jointly: add runs that move one without the other"))
            worst = max((abs(corr[a, b]) for a in range(len(idx)) for b in range(a + 1, len(idx))), default=0.0)
            if worst < 0.7:
                out.append(Check("pairwise bootstrap correlation", "all pairs", PASS, worst,
                                 "pass <0.7, warn 0.7–0.9, fail >0.9", ""))

    # 7. data vs prior precision
    for j, t in enumerate(terms):
        if t.prior is None:
            continue
        ratio = fit.data_precision[j] / fit.prior_strength if fit.prior_strength > 0 else np.inf
        status = _grade(ratio, lambda v: v > 10, lambda v: v >= 1)
        why = "feature is zero in all data" if not present[j] else "data barely constrain it"
        out.append(Check("data vs prior precision", t.name, status, ratio, "pass >10, warn 1–10, fail <1",
                         "" if status == PASS else f"the prior, not the data, set it ({why}): collect runs that "
                         f"exercise the {t.meaning} term"))

    # 8. leave-one-run-out change
    if fit.loro:
        loro = np.array(list(fit.loro.values()))
        for j, t in enumerate(terms):
            if not present[j]:
                continue
            denom = max(abs(fit.beta[j]), 1e-12)
            change = float(np.max(np.abs(loro[:, j] - fit.beta[j])) / denom)
            worst_run = list(fit.loro)[int(np.argmax(np.abs(loro[:, j] - fit.beta[j])))]
            status = _grade(change, lambda v: v < 0.2, lambda v: v <= 0.5)
            out.append(Check("leave-one-run-out change", t.name, status, change, "pass <20%, warn 20–50%, fail >50%",
                             "" if status == PASS else f"run {worst_run} alone moves {t.name}: replicate or "
                             "add runs like it"))
    return out


def overall(checks: list[Check]) -> str:
    return max((c.status for c in checks), key=lambda s: _ORDER[s], default=PASS)
