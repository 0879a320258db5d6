"""One calibration pass over collected data: route saturation → featurize → fit β and α → health checks
→ residual diagnostics. Pure Python; the CLI and the Prefect tasks both call it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from rooflab.data.adapters import check_step_table
from rooflab.data.saturation import route_steps
from rooflab.fit.beta import AlphaFit, BetaFit, fit_alpha, fit_beta
from rooflab.fit.coverage import IDENTIFIED_CHECK, DataCoverage, data_coverage, identification_checks
from rooflab.fit.health import FAIL, Check, check_health, overall
from rooflab.fit.posterior import FitState, posterior_from_state, state_from_fit
from rooflab.fit.residuals import (
    bucket_table,
    plot_residuals,
    run_influence,
    specification_tests,
    summary,
)
from rooflab.model.coefficients import Coefficients
from rooflab.model.features import featurize
from rooflab.model.posterior import Posterior
from rooflab.model.variants import DEFAULT_VARIANT, get_variant, resolve_formulas


@dataclass(frozen=True)
class Options:
    variant: str = DEFAULT_VARIANT
    formulas: str | None = None  # None: the variant's own (vllm for rooflab's variants, blis for BLIS's)
    prior_strength: float | str = "auto"
    n_boot: int = 200
    ci: float = 0.90
    seed: int = 0
    fp8_peak: bool = True


@dataclass
class Calibration:
    options: Options
    routing: dict  # counts of steps per set, overall and per run
    beta: BetaFit
    alpha: AlphaFit
    health: list[Check]
    residuals: pd.DataFrame  # bucket table, splits "train" (and "validation" when held-out runs exist)
    accuracy: dict  # split -> summary (steps, MAPE, median APE, P90 APE)
    influence: pd.DataFrame
    specification: dict = field(default_factory=dict)  # RESET / Breusch–Pagan on run-level aggregates
    plots: list[Path] = field(default_factory=list)
    scope: dict = field(default_factory=dict)  # what the fit covers: hardware, models, TP degrees of its steps
    coverage: DataCoverage | None = None  # what the training data can see (rooflab.fit.coverage)
    posterior: Posterior | None = None  # β and α as a distribution (rooflab.fit.posterior)
    fit_state: FitState | None = None  # per-run sufficient statistics: what a sequential refit updates

    @property
    def health_overall(self) -> str:
        return overall(self.health)

    @property
    def hotspots(self) -> pd.DataFrame:
        return self.residuals[self.residuals["hotspot"]]

    def coefficients(self) -> Coefficients:
        """The fitted coefficient set (point estimates) to predict with."""
        a = self.alpha
        fitted = a.alpha is not None
        return Coefficients({n: float(v) for n, v in self.beta.coefficients().items()},
                            tuple(float(x) for x in a.alpha) if a.alpha is not None else (0.0, 0.0, 0.0),
                            self.beta.variant.name, self.beta.formulas, "calibration", fitted,
                            [] if fitted else [f"α not fitted: replayed with α = 0 ({a.reason})"],
                            unidentified=self.unidentified, posterior=self.posterior)

    @property
    def unidentified(self) -> dict[str, str]:
        """β name -> why the training data cannot see it (the failed ``identified by the data`` checks)."""
        return {c.target: c.action for c in self.health if c.check == IDENTIFIED_CHECK and c.status == FAIL}

    def to_dict(self) -> dict:
        return {
            "options": self.options.__dict__, "routing": self.routing, "beta": self.beta.to_dict(),
            "alpha": self.alpha.to_dict(), "health": {"overall": overall(self.health),
                                                      "checks": [c.to_dict() for c in self.health]},
            "accuracy": self.accuracy, "residual_buckets": self.residuals.to_dict(orient="records"),
            "hotspots": self.hotspots.to_dict(orient="records"),
            "run_influence": self.influence.to_dict(orient="records"),
            "specification": self.specification, "scope": self.scope,
            "coverage": self.coverage.to_dict() if self.coverage is not None else None,
            "unidentified": self.unidentified,
            "plots": [str(p) for p in self.plots],
            **({"posterior": self.posterior.to_dict()} if self.posterior is not None else {}),
        }


def _routing_counts(steps: pd.DataFrame, saturated: np.ndarray, has_time: np.ndarray) -> dict:
    frame = pd.DataFrame({"run_id": steps["run_id"].astype(str).to_numpy(), "sat": saturated, "t": has_time})
    per_run = {r: {"steps": int(len(g)), "with_step_time": int(g.t.sum()), "saturated": int(g.sat.sum()),
                   "fit": int((g.t & ~g.sat).sum())} for r, g in frame.groupby("run_id")}
    return per_run


def calibrate(steps: pd.DataFrame, requests: pd.DataFrame | None = None, options: Options = Options(), *,
              plots_dir: str | Path | None = None) -> Calibration:
    """Fit and diagnose. Runs whose ``split`` column says ``validation`` are held out of the fit and
    reported separately."""
    variant = get_variant(options.variant)
    if steps is None or len(steps) == 0:
        from rooflab.errors import InputError

        raise InputError(None, "steps", "no steps to calibrate (no complete, unsaturated run with step data)")
    check_step_table(steps, "steps")
    options = replace(options, formulas=resolve_formulas(variant, options.formulas))
    assert options.formulas is not None
    routing = route_steps(steps)
    feats = featurize(steps, options.formulas, fp8_peak=options.fp8_peak)
    X = variant.design_matrix(feats)
    y = steps["step_time_us"].to_numpy(dtype=np.float64)
    has_time = np.isfinite(y) & (y > 0)
    held_out = (steps["split"].astype(str).str.lower() == "validation").to_numpy() if "split" in steps else \
        np.zeros(len(steps), bool)
    train = has_time & ~routing.saturated & ~held_out
    order = steps["step_id"].to_numpy() if "step_id" in steps else None

    beta = fit_beta(X[train], y[train], steps["run_id"].to_numpy()[train], variant, formulas=options.formulas,
                    prior_strength=options.prior_strength, n_boot=options.n_boot, ci=options.ci,
                    seed=options.seed, order=None if order is None else order[train])
    alpha = fit_alpha(requests, n_boot=options.n_boot, ci=options.ci, seed=options.seed) if requests is not None \
        else AlphaFit(None, None, None, 0, "no request data given")
    coverage = data_coverage(steps[train], feats[train], variant.terms, y[train])
    health = check_health(beta, X[train], y[train]) + identification_checks(variant.terms, coverage)

    pred = X @ beta.beta
    tables, accuracy = [], {}
    for split, mask in (("train", train), ("validation", has_time & ~routing.saturated & held_out),
                        ("saturated", has_time & routing.saturated)):
        if mask.any():
            sub = steps[mask]
            tables.append(bucket_table(sub, y[mask], pred[mask], split))
            accuracy[split] = summary(y[mask], pred[mask])
    residuals = pd.concat(tables, ignore_index=True) if tables else bucket_table(steps.iloc[:0], [], [], "train")
    influence = run_influence(beta, steps[train], X[train], y[train])

    counts = routing.counts()
    counts["with_step_time"] = int(has_time.sum())
    counts["held_out_validation"] = int((has_time & held_out).sum())
    counts["fit"] = int(train.sum())
    calib = Calibration(options, {"total": counts, "per_run": _routing_counts(steps, routing.saturated, has_time)},
                        beta, alpha, health, residuals, accuracy, influence,
                        specification_tests(steps[train], y[train], pred[train]), coverage=coverage)
    calib.fit_state = state_from_fit(beta, alpha, requests, fp8_peak=options.fp8_peak)
    calib.posterior = posterior_from_state(calib.fit_state, beta.beta, alpha.alpha)
    fitted = steps[train]
    calib.scope = {"hardware": sorted(map(str, fitted["hardware"].unique())),
                   "models": sorted(map(str, fitted["model"].unique())),
                   "tp": sorted(int(t) for t in fitted["tp"].unique()), "runs": len(beta.runs),
                   "steps": int(train.sum())}
    if plots_dir is not None:
        calib.plots = plot_residuals(steps[train], y[train], pred[train], residuals[residuals.split == "train"],
                                     plots_dir, title=f"({options.variant}, {options.formulas})")
    return calib
