"""Held-out accuracy of a calibration: leave-one-run-out and leave-one-model-out step-time error.
Held-out units are whole runs or whole models, never random steps (steps of one run are correlated)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from rooflab.data.saturation import route_steps
from rooflab.fit.beta import fit_beta
from rooflab.fit.calibration import Options
from rooflab.fit.residuals import summary
from rooflab.model.features import featurize
from rooflab.model.variants import get_variant, resolve_formulas


def _usable(steps: pd.DataFrame) -> np.ndarray:
    y = steps["step_time_us"].to_numpy(dtype=np.float64)
    return np.isfinite(y) & (y > 0) & ~route_steps(steps).saturated


def held_out_errors(steps: pd.DataFrame, groups: list[tuple[str, np.ndarray, np.ndarray]], options: Options,
                    features: pd.DataFrame | None = None) -> pd.DataFrame:
    """For each (label, train mask, test mask): fit on train (no bootstrap), report test-step error."""
    variant = get_variant(options.variant)
    options = replace(options, formulas=resolve_formulas(variant, options.formulas))
    assert options.formulas is not None
    feats = featurize(steps, options.formulas, fp8_peak=options.fp8_peak) if features is None else features
    X = variant.design_matrix(feats)
    y = steps["step_time_us"].to_numpy(dtype=np.float64)
    run = steps["run_id"].astype(str).to_numpy()
    ok = _usable(steps)
    rows = []
    for label, train, test in groups:
        tr, te = train & ok, test & ok
        fit = fit_beta(X[tr], y[tr], run[tr], variant, formulas=options.formulas,
                       prior_strength=options.prior_strength, n_boot=0, seed=options.seed)
        rows.append({"held_out": label, "variant": options.variant, "formulas": options.formulas,
                     "train_steps": int(tr.sum()), **summary(y[te], X[te] @ fit.beta),
                     "prior_strength": fit.prior_strength})
    return pd.DataFrame(rows)


def leave_one_run_out(steps: pd.DataFrame, options: Options, within_model: str | None = None,
                      features: pd.DataFrame | None = None) -> pd.DataFrame:
    run = steps["run_id"].astype(str).to_numpy()
    scope = (steps["model"].astype(str).to_numpy() == within_model) if within_model else np.ones(len(run), bool)
    groups = [(f"run {r}", scope & (run != r), scope & (run == r)) for r in np.unique(run[scope])]
    return held_out_errors(steps, groups, options, features)


def leave_one_model_out(steps: pd.DataFrame, options: Options, features: pd.DataFrame | None = None) -> pd.DataFrame:
    model = steps["model"].astype(str).to_numpy()
    groups = [(f"model {m} (trained on {', '.join(sorted(set(model) - {m}))})", model != m, model == m)
              for m in np.unique(model)]
    return held_out_errors(steps, groups, options, features)


def evaluate(steps: pd.DataFrame, options: Options, variants: Sequence[str] = ("roofline7", "roofline7+layers"),
             formulas: Sequence[str] = ("vllm", "design")) -> pd.DataFrame:
    """Leave-one-model-out, leave-one-run-out within each model with ≥ 2 runs, and pooled in-sample, for each
    model variant (and ``options.variant``, when it is not among them) under each feature formula set it can use
    (a variant whose formulas are none of ``formulas``, e.g. BLIS's basis, under its own)."""
    model = steps["model"].astype(str).to_numpy()
    run = steps["run_id"].astype(str).to_numpy()
    names = list(dict.fromkeys([*variants, options.variant]))
    combos = [(v, f) for v in names for f in (
        [f for f in formulas if f in get_variant(v).formulas] or [get_variant(v).default_formulas])]
    tables = []
    for form in dict.fromkeys(f for _, f in combos):
        feats = featurize(steps, form, fp8_peak=options.fp8_peak)
        for v in [v for v, f in combos if f == form]:
            opt = Options(**{**options.__dict__, "variant": v, "formulas": form})
            everything = np.ones(len(steps), bool)
            tables.append(held_out_errors(steps, [("pooled (in-sample)", everything, everything)], opt, feats)
                          .assign(kind="in-sample"))
            if len(np.unique(model)) >= 2:
                tables.append(leave_one_model_out(steps, opt, feats).assign(kind="leave-one-model-out"))
            for m in np.unique(model):
                if len(np.unique(run[model == m])) >= 2:
                    tables.append(leave_one_run_out(steps, opt, m, feats).assign(kind=f"leave-one-run-out ({m})"))
    return pd.concat(tables, ignore_index=True)
