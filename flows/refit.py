"""Refit from the data store alone (no collection) and log a new MLflow run; what the
``rooflab.data.arrived`` event triggers."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from rooflab.model.variants import DEFAULT_VARIANT
from tasks.analyze import calibrate_from_store
from tracking import campaign_runs as track


@flow(name="rooflab-refit", log_prints=True)
def refit_flow(campaign: str, store: str = "store", mlruns: str = "mlruns", variant: str = DEFAULT_VARIANT,
               formulas: str = "vllm", n_boot: int = 100, reason: str = "manual") -> dict:
    options = {"variant": variant, "formulas": formulas, "n_boot": n_boot}
    work = Path(mlruns) / "work" / campaign / "refit"
    calib = calibrate_from_store(store, campaign, options, str(work / "plots"))
    client = track.client(Path(mlruns))
    run = track.log_refit(client, campaign, calib, artifacts_dir=work, reason=reason)
    val = calib.accuracy.get("validation", {}).get("mape")
    print(f"refit of {campaign} ({reason}): {calib.beta.n_steps} steps, train MAPE "
          f"{calib.accuracy['train']['mape']:.1%}" + (f", held-out MAPE {val:.1%}" if val is not None else "")
          + f"; MLflow run {run}")
    return {"campaign": campaign, "mlflow_run_id": run, "coefficients": calib.beta.coefficients(),
            "validation_mape": val}
