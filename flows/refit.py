"""Refit from the data store alone (no collection) and log a new MLflow run; what the ``rooflab.data.arrived``
event triggers. The fit's settings come from the campaign spec (``loop.variant``, ``loop.formulas``,
``loop.n_boot``), like the campaign's own iterations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from rooflab.collect.spec import load_campaign
from rooflab.fit.calibration import Options
from tasks.analyze import calibrate_from_store
from tracking.campaign_runs import log_refit
from tracking.store import open_tracking


@flow(name="rooflab-refit", log_prints=True)
def refit_flow(campaign: str, store: str = "store", mlruns: str = "mlruns", reason: str = "manual") -> dict[str, Any]:
    """``campaign``: the campaign spec (a path, or a name under configs/campaigns)."""
    camp = load_campaign(campaign)
    loop = camp.loop
    options = Options(variant=loop.variant, formulas=loop.formulas, n_boot=loop.n_boot)
    work = Path(mlruns) / "work" / camp.name / "refit"
    calib = calibrate_from_store(store, camp.name, options, str(work / "plots"))
    run = log_refit(open_tracking(Path(mlruns)), camp.name, calib, artifacts_dir=work, reason=reason)
    val = calib.accuracy.get("validation", {}).get("mape")
    print(f"refit of {camp.name} ({reason}): {calib.beta.n_steps} steps, train MAPE "
          f"{calib.accuracy['train']['mape']:.1%}" + (f", held-out MAPE {val:.1%}" if val is not None else "")
          + f"; MLflow run {run}")
    return {"campaign": camp.name, "mlflow_run_id": run, "coefficients": calib.beta.coefficients(),
            "validation_mape": val}
