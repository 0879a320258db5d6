"""Validation flows: run the V1 design for a model/TP and report the accuracy of the current
coefficients on it; and the new-model trigger (V1 first, then a full sweep if V1 MAPE > 10%)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow

from flows.refit import refit_flow
from rooflab.collect.collector import plan
from rooflab.collect.launchers.factory import close_launcher, make_launcher
from rooflab.collect.spec import Campaign, load_campaign, static99
from rooflab.data.store import COMPLETE, Store
from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError
from rooflab.fit.calibration import Calibration, Options
from rooflab.replay.heldout import store_replay_error
from tasks.analyze import calibrate_from_store
from tasks.launch import collect_points
from tracking.campaign_runs import log_refit
from tracking.store import open_tracking, work_root

NEW_MODEL_MAPE_LIMIT = 0.10


def v1_points(camp: Campaign, model: str, tp: int, hardware: str | None = None) -> list[SweepPoint]:
    """The campaign's V1 validation points (as the static plan runs them on its held-out combos),
    retargeted to (model, TP): W2 at 1024 and W3 at a low and a high rate, split "validation"."""
    v1 = [p for p in static99(camp) if p.split == "validation"]
    first = (v1[0].model, v1[0].tp) if v1 else None
    return [replace(p, model=model, tp=tp, hardware=hardware or p.hardware) for p in v1 if (p.model, p.tp) == first]


@flow(name="rooflab-validate", log_prints=True)
def validate_flow(campaign: str, model: str, tp: int, hardware: str | None = None, store: str = "store",
                  mlruns: str = "mlruns", launcher: str = "inference-perf") -> dict[str, Any]:
    camp = load_campaign(campaign)
    st = Store(store)
    points = v1_points(camp, model, tp, hardware)
    lau = make_launcher(camp, launcher, st.root)
    try:
        collect_points(st, lau, camp.name, points, concurrency=camp.collection.concurrency,
                       max_retries=camp.collection.max_retries)
    finally:
        close_launcher(lau)
    loop = camp.loop
    calib = calibrate_from_store(str(st.root), camp.name,
                                 Options(variant=loop.variant, formulas=loop.formulas, n_boot=50),
                                 str(work_root(mlruns) / camp.name / "validate"))
    ids = {rid for rid, _, _ in plan(camp.name, points) if st.status(rid) in COMPLETE}
    table = calib.residuals
    rows = table[(table.split == "validation") & (table.dimension == "run_id") & table.bucket.isin(ids)]
    mape = float((rows.mape * rows.steps).sum() / rows.steps.sum()) if len(rows) else float("nan")
    run = log_refit(open_tracking(mlruns), camp.name, calib,
                    artifacts_dir=work_root(mlruns) / camp.name / "validate",
                    reason=f"validate {model} tp{tp}: V1 MAPE {mape:.1%}")
    print(f"V1 on {model} TP{tp}: {len(ids)} runs, step-time MAPE {mape:.1%} with the current coefficients")
    replay = replay_verdict(st, calib, sorted(ids))
    print(f"V1 replay on {model} TP{tp}: {replay['verdict']}")
    return {"model": model, "tp": tp, "v1_mape": mape, "runs": sorted(ids), "mlflow_run_id": run, "replay": replay}


REPLAY_TARGETS = {"ttft": 0.12, "itl": 0.05, "e2e": 0.05}  # docs/spec.md §12: median held-out MAPE


def replay_verdict(store: Store, calib: Calibration, run_ids: list[str]) -> dict[str, Any]:
    """The request-level verdict (issue 7): replay the V1 runs' requests through the scheduler with the current
    coefficients and compare TTFT / ITL / E2E with the measured ones (median over runs of the APE of the run's
    mean) against docs/spec.md §12's targets."""
    try:
        err = store_replay_error(store, calib.coefficients(), runs=run_ids)
    except InputError as exc:
        return {"verdict": f"no replay ({exc})", "passed": None}
    if not err["n_runs"]:
        return {**err, "verdict": "no replayable runs", "passed": None}
    passed = all(err[m] <= t for m, t in REPLAY_TARGETS.items())
    text = ", ".join(f"{m.upper()} {err[m]:.1%} (≤ {t:.0%})" for m, t in REPLAY_TARGETS.items())
    return {**err, "passed": passed, "verdict": f"{'pass' if passed else 'fail'}: {text} over {err['n_runs']} runs"}


@flow(name="rooflab-new-model", log_prints=True)
def new_model_flow(campaign: str, model: str, tp: int, hardware: str | None = None, store: str = "store",
                   mlruns: str = "mlruns", launcher: str = "inference-perf") -> dict[str, Any]:
    """The seed's trigger for a new model/hardware entry: V1 first; a full sweep of the combo only when the
    current coefficients miss V1 by more than 10% MAPE."""
    result = validate_flow(campaign, model, tp, hardware, store, mlruns, launcher)
    if not result["v1_mape"] > NEW_MODEL_MAPE_LIMIT:
        print(f"V1 MAPE {result['v1_mape']:.1%} ≤ {NEW_MODEL_MAPE_LIMIT:.0%}: the coefficients transfer, no sweep")
        return {**result, "swept": False}
    camp = load_campaign(campaign)
    template = [p for p in static99(camp) if p.split == "train"]
    first = (template[0].model, template[0].tp)
    sweep = [replace(p, model=model, tp=tp, hardware=hardware or p.hardware)
             for p in template if (p.model, p.tp) == first]
    print(f"V1 MAPE {result['v1_mape']:.1%} > {NEW_MODEL_MAPE_LIMIT:.0%}: "
          f"full sweep of {len(sweep)} runs on {model} TP{tp}")
    st = Store(store)
    lau = make_launcher(camp, launcher, st.root)
    try:
        collect_points(st, lau, camp.name, sweep, concurrency=camp.collection.concurrency,
                       max_retries=camp.collection.max_retries)
    finally:
        close_launcher(lau)
    refit = refit_flow(campaign, store, mlruns, reason=f"new model {model} tp{tp}")
    return {**result, "swept": True, "refit": refit}
