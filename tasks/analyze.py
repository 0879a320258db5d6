"""Calibrate from the data store (route saturation → featurize → fit β and α → health → residuals),
pick the next sweep points, decide whether to stop."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from rooflab.calibration import Calibration, Options, calibrate
from rooflab.store import Store


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_from_store(store_root: str, campaign: str, options: dict, plots_dir: str | None = None) -> Calibration:
    """β from the steps of unsaturated runs (saturated runs are kept out of the fit, SPEC §6); α from the
    requests of all complete runs; held-out (validation split) runs are reported, never fitted."""
    store = Store(store_root)
    steps = store.steps(campaign=campaign, statuses=("ok",))
    requests = store.requests(campaign=campaign, statuses=("ok", "saturated"))
    return calibrate(steps, requests if len(requests) else None, Options(**options),
                     plots_dir=Path(plots_dir) if plots_dir else None)


@task(name="pick-next-points", cache_policy=NO_CACHE)
def pick_next(calib, campaign, collected: set, batch_size: int, budget_left_s: float | None, iteration: int) -> list:
    from rooflab.targeting import choose_next

    return choose_next(calib, campaign, collected, batch_size=batch_size, budget_gpu_seconds_left=budget_left_s,
                       iteration=iteration)


@task(name="stop-rule", cache_policy=NO_CACHE)
def decide_stop(calib, campaign, *, gpu_seconds_spent: float, budget_gpu_seconds: float | None,
                iterations_done: int, max_iterations: int | None):
    """SPEC §9's stop rule; β's the campaign cannot identify at all (β4 without an MoE model, β5 without
    TP > 1) are not required, so such a campaign can still converge."""
    from rooflab.targeting import identifiable_betas, stop_rule

    return stop_rule(calib, gpu_seconds_spent=gpu_seconds_spent, budget_gpu_seconds=budget_gpu_seconds,
                     iteration=iterations_done, max_iterations=max_iterations,
                     required=tuple(identifiable_betas(campaign)))
