"""Analysis steps as Prefect tasks: calibrate from the data store, and the held-out request-level error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from rooflab.data.store import Store
from rooflab.fit.calibration import Calibration, Options, calibrate
from rooflab.replay.heldout import store_replay_error


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_from_store(store_root: str, campaign: str, options: Options, plots_dir: str | None = None,
                         run_ids: list[str] | None = None) -> Calibration:
    """β from the steps of unsaturated runs (saturated runs are kept out of the fit, docs/spec.md §6); α from the
    requests of all complete runs; held-out (validation split) runs are reported, never fitted. ``run_ids``: only
    these runs (the verified ones, :meth:`rooflab.data.store.Store.verify_campaign`), each checked again as it is
    read (a one-line error if one changed meanwhile)."""
    store = Store(store_root)
    only: dict[str, Any] = {} if run_ids is None else {"run_id": list(run_ids), "verify": True}
    steps = store.steps(campaign=campaign, statuses=("ok",), **only)
    requests = store.requests(campaign=campaign, statuses=("ok", "saturated"), **only)
    return calibrate(steps, requests if len(requests) else None, options,
                     plots_dir=Path(plots_dir) if plots_dir else None)


@task(name="held-out-replay", cache_policy=NO_CACHE)
def heldout_replay_error(store_root: str, campaign: str, calib: Calibration) -> dict[str, Any]:
    """Request-level error of the current coefficients on the held-out runs (replay)."""
    out = store_replay_error(store_root, calib.coefficients(), campaign=campaign, split="validation")
    return {k: v for k, v in out.items() if k != "runs"}
