"""Calibrate from the data store (route saturation → featurize → fit β and α → health → residuals),
pick the next sweep points, decide whether to stop."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from rooflab.data.store import Store
from rooflab.fit.calibration import Calibration, Options, calibrate
from rooflab.model.variants import DEFAULT_VARIANT


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
def pick_next(calib, campaign, collected: set, batch_size: int, budget_left_s: float | None, iteration: int,
              *, targeting: str = "d-optimal", store_root: str | None = None, options: dict | None = None) -> list:
    """The next batch: ``d-optimal`` (rooflab.targeting.doptimal, SPEC §9: information per predicted GPU-second given
    the collected training steps) or ``menu`` (rooflab.targeting.menu: the seed's menu driven by the diagnosis)."""
    if targeting == "menu":
        from rooflab.targeting.menu import choose_next

        return choose_next(calib, campaign, collected, batch_size=batch_size, budget_gpu_seconds_left=budget_left_s,
                           iteration=iteration)
    if targeting != "d-optimal":
        from rooflab.errors import InputError

        raise InputError(None, "targeting", f"unknown targeting {targeting!r} (known: d-optimal, menu)")
    from rooflab.targeting.doptimal import choose_next_doptimal

    opts = options or {}
    spent = {}
    if store_root is not None:
        runs = Store(store_root).runs(campaign=campaign.name)
        if len(runs):
            spent = runs.groupby("split")["gpu_seconds"].sum().to_dict()
    return choose_next_doptimal(calib, campaign, collected, batch_size=batch_size,
                                budget_gpu_seconds_left=budget_left_s, variant=opts.get("variant", DEFAULT_VARIANT),
                                formulas=opts.get("formulas", "vllm"),
                                heldout_gpu_s=float(spent.get("validation", 0.0)),
                                train_gpu_s=float(spent.get("train", 0.0)))


@task(name="held-out-replay", cache_policy=NO_CACHE)
def heldout_replay_error(store_root: str, campaign: str, calib) -> dict:
    """Request-level error of the current coefficients on the held-out runs (replay, rooflab.replay.predict)."""
    from rooflab.replay.heldout import store_replay_error

    out = store_replay_error(store_root, calib, campaign=campaign, split="validation")
    return {k: v for k, v in out.items() if k != "runs"}


@task(name="stop-rule", cache_policy=NO_CACHE)
def decide_stop(calib, campaign, *, gpu_seconds_spent: float, budget_gpu_seconds: float | None,
                iterations_done: int, max_iterations: int | None, replay: dict | None = None):
    """SPEC §9's stop rule; β's the campaign cannot identify at all (β4 without an MoE model, β5 without
    TP > 1) are not required, so such a campaign can still converge."""
    from rooflab.targeting.stop import identifiable_betas, stop_rule

    return stop_rule(calib, gpu_seconds_spent=gpu_seconds_spent, budget_gpu_seconds=budget_gpu_seconds,
                     iteration=iterations_done, max_iterations=max_iterations,
                     required=tuple(identifiable_betas(campaign)),
                     heldout_models=tuple(sorted({c.model for c in campaign.validation_combos})), replay=replay)
