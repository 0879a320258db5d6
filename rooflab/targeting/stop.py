"""The stop rule (docs/spec.md §9): stop when β1–β5 are identified by the data and lie in [0.3, 5], every β's
bootstrap CV is < 30%, the held-out (validation split) step MAPE is < 10% and no residual bucket is a hotspot
(> 15% MAPE over ≥ 20 steps) — or when the GPU budget is spent, or the iteration cap is reached. The decision
carries a one-line reason and every criterion with its value and threshold."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rooflab.collect.spec import Campaign
from rooflab.fit.calibration import Calibration
from rooflab.fit.residuals import HOTSPOT_MAPE
from rooflab.model.variants import get_variant
from rooflab.targeting.candidates import hotspot_rows, model_arch, model_layers
from rooflab.targeting.information import PRIOR_SD, STEPS_PER_RUN, sigma_of

# stop rule thresholds (docs/spec.md §9)
BETA_RANGE = (0.3, 5.0)
MAX_CV = 0.30
MAX_VALIDATION_MAPE = 0.10
# an overhead term whose CV fails still passes when its whole 90% interval moves a step by less than this
MAX_OVERHEAD_EFFECT = 0.02
REPLAY_TARGETS = {"ttft": 0.12, "itl": 0.05, "e2e": 0.05}  # docs/spec.md §12, median over held-out runs (optional)
MIN_DATA_PRIOR_PRECISION = 1.0  # below: the prior, not the data, set the β ("not identified")
# efficiency corrections that must be identified and in range (those a variant lacks are skipped)
RANGE_BETAS = ("beta1", "beta1_attn", "beta2", "beta3", "beta4", "beta5")


# ================================================================================================ stop rule
@dataclass(frozen=True)
class Criterion:
    """One criterion of the stop rule: met or not, a one-line text, the value and threshold behind it."""

    met: bool
    text: str
    value: Any = None
    threshold: Any = None
    identified: bool | None = None  # β range criteria: whether the data (not the prior) set the β
    worst_mape: float | None = None  # hotspots: the worst bucket's MAPE

    def to_dict(self) -> dict[str, Any]:
        d = {"met": self.met, "value": self.value, "threshold": self.threshold, "text": self.text}
        if self.identified is not None:
            d["identified"] = self.identified
        if self.worst_mape is not None:
            d["worst_mape"] = self.worst_mape
        return d


LIMIT_CRITERIA = ("budget", "iteration_cap")  # limits, not convergence criteria


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str  # one line
    criteria: dict[str, Criterion]
    converged: bool = False  # every convergence criterion met (the campaign may also stop on a limit)

    @property
    def unmet(self) -> list[str]:
        return [c.text for k, c in self.criteria.items() if k not in LIMIT_CRITERIA and not c.met]

    def with_reason(self, stop: bool, reason: str) -> StopDecision:
        return replace(self, stop=stop, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return {"stop": self.stop, "reason": self.reason, "converged": self.converged,
                "criteria": {k: c.to_dict() for k, c in self.criteria.items()}}


def _pct(v: float) -> str:
    return f"{v:.1%}" if abs(v) < 0.1 else f"{v:.0%}"


def _num(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def identifiable_betas(campaign: Campaign) -> tuple[str, ...]:
    """β1–β5 the campaign's training combos can identify at all: β4 needs an MoE model, β5 a TP > 1 combo.
    Pass it as ``stop_rule(..., required=...)`` for a campaign that cannot ever move some β off its prior."""
    out = ["beta1", "beta1_attn", "beta2", "beta3"]
    if any(model_arch(c.model).is_moe for c in campaign.train_combos):
        out.append("beta4")
    if any(c.tp > 1 for c in campaign.train_combos):
        out.append("beta5")
    return tuple(out)


def data_prior_ratio(calib: Calibration, j: int) -> float:
    """How much more the collected data say about β_j (given the other βs) than a physical prior does:
    the data precision of the fit's relative-error design, with each training run counting as at most
    :data:`rooflab.targeting.doptimal.STEPS_PER_RUN` independent steps of noise σ (the fit's residual level), over the
    precision of the efficiency prior N(1, 0.5²) that targeting uses (:mod:`rooflab.targeting.doptimal`).

    Deliberately not the fit's own λ: λ is chosen by leave-one-run-out for *prediction*, and a strong λ
    that wins on held-out MAPE says nothing about whether the data alone would pin the β."""
    fit = calib.beta
    n_eff = float(np.minimum(fit.run_rows, STEPS_PER_RUN).sum())
    return float(fit.data_precision[j] * n_eff / sigma_of(calib) ** 2 * PRIOR_SD ** 2)


def stop_rule(calib: Calibration | None, *, gpu_seconds_spent: float, budget_gpu_seconds: float | None, iteration: int,
              max_iterations: int | None, required: tuple[str, ...] = RANGE_BETAS,
              heldout_models: tuple[str, ...] = (), replay: dict | None = None) -> StopDecision:
    """Decide whether the campaign stops after this calibration (docs/spec.md §9).

    ``iteration``: iterations completed so far (collect + refit, the bootstrap counting as the first);
    the cap is reached when ``iteration >= max_iterations``. ``required``: the βs of β1–β5 that must be
    identified and in range (default all five; see :func:`identifiable_betas`). A β counts as identified
    when its data/prior precision (:func:`data_prior_ratio`) is ≥ 1 — a β whose feature is zero in all
    data, or that the prior dominates, is not. Variants with β_L·L judge β7 + β_L·L's CV together.
    Bootstrap CVs count only from a whole-run bootstrap (≥ 5 training runs: a block bootstrap within
    fewer runs cannot see run-to-run variation). ``heldout_models``: the held-out MAPE counts only once
    every one of them has held-out data (one lucky held-out run is not a space-filling validation).
    ``replay``: optionally, the held-out request-level error (:func:`rooflab.replay.predict.store_replay_error`);
    it adds a criterion with docs/spec.md §12's targets (TTFT ≤ 12%, ITL ≤ 5%, E2E ≤ 5% median over held-out runs).
    Criteria ``budget`` and ``iteration_cap`` say whether that limit is reached."""
    crit: dict[str, Criterion] = {}
    if calib is None:
        crit["calibration"] = Criterion(met=False, value=None, threshold=None, text="no calibration yet")
    else:
        fit = calib.beta
        names = fit.names
        terms = {t.name: t for t in get_variant(calib.options.variant).terms}
        # 1. β1–β5 identified and in [0.3, 5] (or the term's own plausible range)
        for name in required:
            if name not in names:
                continue
            j = names.index(name)
            b = float(fit.beta[j])
            ratio = data_prior_ratio(calib, j)
            # no data on the feature at all -> not identified
            identified = bool(fit.data_precision[j] > 0 and ratio >= MIN_DATA_PRIOR_PRECISION)
            lo, hi = (terms[name].plausible if name in terms else None) or BETA_RANGE
            in_range = lo <= b <= hi
            unseen = calib.unidentified.get(name)  # the data cannot see it (rooflab.fit.coverage)
            identified = identified and unseen is None
            if unseen is not None:
                text = unseen
            elif not identified:
                why = "feature zero in all data" if fit.data_precision[j] <= 0 else \
                    f"prior-dominated: data/prior precision {ratio:.2g} < 1"
                text = f"{name} not identified ({why})"
            elif not in_range:
                text = f"{name} {b:.3g} outside [{lo:g}, {hi:g}]"
            else:
                text = f"{name} {b:.3g} in [{lo:g}, {hi:g}]"
            crit[f"{name}_range"] = Criterion(met=bool(identified and in_range), value=_num(b),
                                     threshold=[lo, hi], identified=identified, text=text)
        # 2. every β's bootstrap CV < 30%
        cvs = [c for c in calib.health if c.check == "bootstrap CV"]
        if len(fit.draws) < 2:
            crit["bootstrap_cv"] = Criterion(met=False, value=None, threshold=MAX_CV, text="no bootstrap draws")
        elif fit.unit_kind != "run":
            crit["bootstrap_cv"] = Criterion(met=False, value=len(fit.runs), threshold=MAX_CV,
                                    text=f"bootstrap over blocks of {len(fit.runs)} training run"
                                            f"{'s' if len(fit.runs) != 1 else ''} (whole runs need ≥ 5)")
        split = _per_step_overhead_cv(calib)
        if split is not None:  # β7 and β_L·L are one per-step overhead, judged together (see the README)
            cvs = [c for c in cvs if c.target not in ("beta7", "beta_layer")]
            cv, L = split
            met = bool(np.isfinite(cv) and cv < MAX_CV)
            crit["per_step_overhead_cv"] = Criterion(
                met=met, value=_num(cv), threshold=MAX_CV,
                text=f"per-step overhead β7 + β_L·L CV {_pct(cv)} {'<' if met else '>'} {MAX_CV:.0%} (worst at L={L})"
                if np.isfinite(cv) else "per-step overhead β7 + β_L·L CV undefined (0)")
        for c in cvs:
            met = bool(np.isfinite(c.value) and c.value < MAX_CV)
            text = f"{c.target} CV {_pct(c.value)} {'<' if met else '>'} {MAX_CV:.0%}" if np.isfinite(c.value) else \
                f"{c.target} CV undefined (β at 0)"
            effect = _overhead_effect(calib, c.target)
            if not met and effect is not None and effect < MAX_OVERHEAD_EFFECT:
                met = True  # an overhead near 0: its CV says nothing, its whole interval barely moves a step
                text += f", but its 90% interval moves a step by ≤ {effect:.1%} (< {MAX_OVERHEAD_EFFECT:.0%})"
            crit[f"{c.target}_cv"] = Criterion(met=met, value=_num(c.value), threshold=MAX_CV, text=text)
        # 3. held-out step MAPE < 10%
        val = calib.accuracy.get("validation")
        if not val or not val.get("steps"):
            crit["validation_mape"] = Criterion(met=False, value=None, threshold=MAX_VALIDATION_MAPE,
                                       text="no held-out data yet")
        else:
            m = float(val["mape"])
            met = bool(m < MAX_VALIDATION_MAPE)
        res = calib.residuals
        seen = set(res.loc[(res["split"] == "validation") & (res["dimension"] == "model") & (res["steps"] > 0),
                           "bucket"].astype(str))
        missing = [m_ for m_ in heldout_models if m_ not in seen]
        if missing:
            crit["validation_coverage"] = Criterion(met=False, value=len(heldout_models) - len(missing),
                                           threshold=len(heldout_models),
                                           text=f"no held-out data on {', '.join(missing)} yet")
        if val and val.get("steps"):
            crit["validation_mape"] = Criterion(met=met, value=m, threshold=MAX_VALIDATION_MAPE,
                                       text=f"validation MAPE {m:.1%} {'<' if met else '>'} "
                                               f"{MAX_VALIDATION_MAPE:.0%}")
        # 3b. (optional) held-out request-level replay error
        if replay is not None:
            vals = {m: replay.get(m, np.nan) for m in REPLAY_TARGETS}
            if not replay.get("n_runs"):
                crit["replay"] = Criterion(met=False, value=None, threshold=dict(REPLAY_TARGETS),
                                  text="no held-out run to replay yet")
            else:
                bad = [m for m, t in REPLAY_TARGETS.items() if not (np.isfinite(vals[m]) and vals[m] <= t)]
                crit["replay"] = Criterion(met=not bad, value={m: _num(v) for m, v in vals.items()},
                                  threshold=dict(REPLAY_TARGETS),
                                  text="held-out replay " + ", ".join(
                                      f"{m.upper()} {vals[m]:.1%} {'>' if m in bad else '≤'} {t:.0%}"
                                      for m, t in REPLAY_TARGETS.items()))
        # 4. no hotspot
        hot = hotspot_rows(calib)
        if len(hot):
            worst = [f"{r.dimension}={r.bucket} {r.mape:.0%} ({r.split})" for r in hot.itertuples()]
            text = f"hotspot{'s' if len(worst) > 1 else ''} > {HOTSPOT_MAPE:.0%}: " + ", ".join(worst[:3]) + \
                (f" +{len(worst) - 3} more" if len(worst) > 3 else "")
        else:
            text = f"no bucket > {HOTSPOT_MAPE:.0%} MAPE"
        crit["hotspots"] = Criterion(met=not len(hot), value=int(len(hot)), threshold=0,
                            worst_mape=_num(float(hot["mape"].max())) if len(hot) else None, text=text)

    converged = all(c.met for c in crit.values())
    budget_hit = budget_gpu_seconds is not None and gpu_seconds_spent >= budget_gpu_seconds
    cap_hit = max_iterations is not None and iteration >= max_iterations
    crit["budget"] = Criterion(
        met=bool(budget_hit), value=float(gpu_seconds_spent),
        threshold=None if budget_gpu_seconds is None else float(budget_gpu_seconds),
        text=f"{gpu_seconds_spent / 3600:.2f} of "
             + ("unlimited" if budget_gpu_seconds is None else f"{budget_gpu_seconds / 3600:.2f}") + " GPU-h")
    crit["iteration_cap"] = Criterion(
        met=bool(cap_hit), value=int(iteration), threshold=max_iterations,
        text=f"iteration {iteration} of " + ("unlimited" if max_iterations is None else str(max_iterations)))
    unmet = "unmet: " + ", ".join(StopDecision(False, "", crit).unmet)
    if converged:
        return StopDecision(True, "converged: all criteria met", crit, converged=True)
    if budget_hit or cap_hit:
        parts = []
        if budget_hit and budget_gpu_seconds is not None:
            parts.append(f"budget spent: {gpu_seconds_spent / 3600:.2f} of {budget_gpu_seconds / 3600:.2f} GPU-h")
        if cap_hit:
            parts.append(f"iteration cap {max_iterations} reached")
        return StopDecision(True, "; ".join(parts + [unmet]), crit)
    return StopDecision(False, f"continue ({crit['iteration_cap'].text}, {crit['budget'].text}); {unmet}", crit)


def _overhead_effect(calib: Calibration, name: str) -> float | None:
    """For an overhead term (no physical prior: β6 per request, β7 per step, β_L per layer), the half-width of
    its 90% bootstrap interval times the P90 over training steps of its feature / step time: the most its
    uncertainty moves a typical-to-large step. None for efficiency terms (their CV is meaningful: β ≈ 1) and
    when the coverage is unknown. A relative CV is undefined for a β near 0; this is what prediction needs."""
    fit, cov = calib.beta, calib.coverage
    if cov is None or name not in fit.names or name not in cov.unit_effect_p90:
        return None
    j = fit.names.index(name)
    if fit.variant.terms[j].prior is not None or len(fit.draws) < 2:
        return None
    return float((fit.upper[j] - fit.lower[j]) / 2 * cov.unit_effect_p90[name])


def _per_step_overhead_cv(calib: Calibration) -> tuple[float, int] | None:
    """Variants with a per-layer term split the per-step overhead into β7 + β_L·L; within the training
    models the two are nearly collinear (few distinct L), so each alone has a large bootstrap CV while
    their sum — what a step pays — is pinned. Returns (worst CV of the sum over the training models' L,
    that L), or None when the variant has no per-layer term."""
    fit = calib.beta
    if "beta_layer" not in fit.names or "beta7" not in fit.names or len(fit.draws) < 2:
        return None
    res = calib.residuals
    models = res.loc[(res["split"] == "train") & (res["dimension"] == "model") & (res["steps"] > 0), "bucket"]
    layers = sorted({L for L in (model_layers(str(m)) for m in models) if L})
    if not layers:
        return None
    j7, jl = fit.names.index("beta7"), fit.names.index("beta_layer")
    worst = (-1.0, layers[0])
    for L in layers:
        tot = fit.draws[:, j7] + fit.draws[:, jl] * L
        m = float(np.mean(tot))
        cv = float(np.std(tot, ddof=1) / abs(m)) if m != 0 else np.inf
        worst = max(worst, (cv, L))
    return worst
