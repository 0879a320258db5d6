"""Refit and registry steps as Prefect tasks (issue 18): the scope of a campaign's data, the sequential update of a
registered fit with the runs that arrived since, the held-out errors the promotion rule compares, and the
registration with its decision."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from rooflab.data.store import Store, run_sources
from rooflab.data.trace_readers import read_store_trace
from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.fit.discrepancy import loro_residuals, with_cv_discrepancy
from rooflab.fit.posterior import FitState, coefficients_from_state, run_stats, training_rows, update_state
from rooflab.model.coefficients import Coefficients
from rooflab.model.provenance import Source, provenance_record, with_provenance
from rooflab.model.variants import get_variant
from rooflab.replay.heldout import store_replay_error
from rooflab.replay.interval_plots import plot_calibration, plot_intervals
from rooflab.replay.intervals import coverage, coverage_curve, replay_intervals
from rooflab.replay.promotion import Decision, PromotionRule, decide, run_error
from tracking.registry import RegisteredCalibration, campaign_scope, promote, record_decision, register
from tracking.store import open_tracking, work_root

FIT_STATUSES = ("ok",)  # runs whose steps are fitted (as tasks.analyze.calibrate_from_store)
ALPHA_STATUSES = ("ok", "saturated")  # runs whose requests feed α


store_scope = task(name="store-scope", cache_policy=NO_CACHE)(campaign_scope)


def new_runs(store_root: str, campaign: str, state: FitState) -> list[str]:
    """Runs of the campaign (fitted or α-only) the state does not hold yet."""
    runs = Store(store_root).runs(campaign=campaign, statuses=ALPHA_STATUSES)
    have = set(state.run_ids)
    return [r for r in runs["run_id"].astype(str).tolist() if r not in have]


def parent_runs_present(store_root: str, campaign: str, state: FitState) -> bool:
    """Whether every run the state was fitted on is still a complete run of the store (else a sequential update
    would keep data the store no longer has: refit from scratch)."""
    runs = set(Store(store_root).runs(campaign=campaign, statuses=ALPHA_STATUSES)["run_id"].astype(str))
    return set(state.run_ids) <= runs


@task(name="sequential-refit", cache_policy=NO_CACHE)
def sequential_refit(store_root: str, campaign: str, parent: RegisteredCalibration
                     ) -> tuple[Coefficients, FitState, list[str]] | None:
    """Update the parent's posterior with the runs that arrived since it was fitted (None when there are none):
    their steps' Gram matrices and requests' α sums are added to the parent's statistics (same model form, same
    λ) — the same answer as a full refit on all runs (:mod:`rooflab.fit.posterior`)."""
    assert parent.state is not None
    state = parent.state
    added = new_runs(store_root, campaign, state)
    if not added:
        return None
    st = Store(store_root)
    steps = st.steps(campaign=campaign, statuses=FIT_STATUSES, run_id=added, verify=True)
    requests = st.requests(campaign=campaign, statuses=ALPHA_STATUSES, run_id=added, verify=True)
    X, y, rid = training_rows(steps, state.variant, state.formulas, state.fp8_peak)
    stats = run_stats(X, y, rid, requests if len(requests) else None, runs=added)
    new_state = update_state(state, stats, parent=parent.ref)
    coefs = coefficients_from_state(
        new_state, source=f"sequential refit of {parent.ref} with {len(added)} new runs",
        notes=[f"updated from {parent.ref} (runs added: {', '.join(added)}); health and identification checks were "
               "not re-run (they need a full refit)"], unidentified=parent.coefficients.unidentified)
    return coefs, new_state, added


@task(name="held-out-run-errors", cache_policy=NO_CACHE)
def heldout_run_errors(store_root: str, campaign: str, coefs: Coefficients) -> dict[str, float]:
    """run -> held-out replay error (mean over TTFT/ITL/E2E of the APE of the run's mean) on the campaign's
    validation runs."""
    out = store_replay_error(store_root, coefs, campaign=campaign, split="validation")
    return {r: run_error(c) for r, c in out["runs"].items() if "error" not in c}


def provenance_of(coefs: Coefficients, scope: dict[str, Any], store_root: str, run_ids: list[str], run_id: str,
                  lineage: list[dict[str, Any]]) -> dict[str, Any]:
    """The provenance record of a registered coefficient set (its coefficients with the posterior's ci95, its
    scope, the runs and their hashes, the MLflow run, the lineage)."""
    doc = coefs.to_dict()  # its alpha block is already the fit-result layout; β gets units and meanings
    terms = {t.name: t for t in get_variant(coefs.variant).terms}
    doc["beta"] = {"variant": coefs.variant, "formulas": coefs.formulas, "coefficients": {
        k: {"value": v, "unit": terms[k].unit if k in terms else None,
            "meaning": terms[k].meaning if k in terms else None} for k, v in coefs.beta.items()}}
    doc["scope"] = scope
    sources = [Source(s["kind"], s["id"], s["sha256"]) for s in run_sources(Store(store_root), run_ids)]
    rec = provenance_record(with_provenance(doc, sources=sources, mlflow_run_id=run_id,
                                            vllm_version=scope.get("vllm_version")))
    rec["lineage"] = lineage
    return rec


@task(name="register-and-decide", cache_policy=NO_CACHE)
def register_and_decide(mlruns: str, name: str, coefs: Coefficients, state: FitState | None, *, run_id: str,
                        scope: dict[str, Any], provenance: dict[str, Any], tags: dict[str, Any],
                        champion: RegisteredCalibration | None, champion_errors: dict[str, float] | None,
                        challenger_errors: dict[str, float], rule: PromotionRule
                        ) -> tuple[RegisteredCalibration, Decision]:
    """Register the refit as a new version (alias ``challenger``), decide on the held-out errors, promote it to
    ``champion`` when the rule says so, and log the decision with its before/after table."""
    ts = open_tracking(mlruns)
    reg = register(ts, name, coefs, state, run_id=run_id, scope=scope, provenance=provenance, tags=tags)
    decision = decide(champion_errors if champion is not None else None, challenger_errors, rule)
    if decision.promote:
        promote(ts, name, reg.version)
        reg.aliases.append("champion")
    record_decision(ts, run_id, reg, decision, champion.ref if champion is not None else None)
    return reg, decision


@task(name="model-discrepancy", cache_policy=NO_CACHE)
def with_model_discrepancy(store_root: str, campaign: str, coefs: Coefficients, state: FitState) -> Coefficients:
    """``coefs`` with the model-discrepancy term of its posterior estimated from leave-one-run-out residuals of its
    training runs (:mod:`rooflab.fit.discrepancy`: each run replayed with the fit that left it out)."""
    if coefs.posterior is None:
        return coefs
    st = Store(store_root)
    traces = {}
    for r in state.runs:
        if r.rows > 0:
            try:
                traces[r.run] = read_store_trace(st, r.run)
            except InputError:  # a run without a request table: no replay, no residual
                continue
    res = loro_residuals(state, traces)
    post = with_cv_discrepancy(coefs.posterior, res, "leave-one-run-out residuals of the training runs")
    return replace(coefs, posterior=post)


INTERVAL_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@task(name="interval-report", cache_policy=NO_CACHE)
def interval_report(store_root: str, campaign: str, coefs: Coefficients, out_dir: str, *, draws: int = 20,
                    seed: int = 0) -> dict[str, Any]:
    """Prediction intervals of ``coefs`` on the campaign's held-out runs: the calibration plot (nominal vs
    empirical coverage), predicted-vs-measured with interval bars, and the coverage figures (``coverage.json``)."""
    st = Store(store_root)
    ids = st.runs(campaign=campaign, split="validation")["run_id"].astype(str).tolist()
    if coefs.posterior is None or not ids:
        return {}
    results = [replay_intervals(read_store_trace(st, rid), coefs, level=0.9, draws=draws, seed=seed) for rid in ids]
    out = Path(out_dir)
    curve = coverage_curve(results, INTERVAL_LEVELS)
    plot_calibration({"held-out runs": curve}, np.array(INTERVAL_LEVELS), out / "calibration.png")
    plot_intervals(results, out / "pred_vs_measured.png", title="held-out runs, 90% intervals")
    doc = {"level": 0.9, "draws": draws, "coverage": coverage(results),
           "curve": dict(zip(map(str, INTERVAL_LEVELS), map(float, curve))),
           "runs": {r.run_id: r.to_dict() for r in results}}
    atomic_write_text(out / "coverage.json", json_dumps(doc))
    return doc


def work_dir(mlruns: str, campaign: str) -> Path:
    return work_root(mlruns) / campaign / "refit"
