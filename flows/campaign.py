"""The campaign flow: the core campaign loop (:func:`rooflab.campaign.loop.run_campaign`) with its steps as
Prefect tasks — each run a ``launch-run`` task, each fit a ``calibrate`` task — and every iteration logged to
MLflow. Resumable: the loop keeps its plans in the data store, collection skips complete runs, MLflow logging
skips logged iterations.

Every loop setting comes from the campaign spec (``loop:`` in the YAML); ``overrides`` (the CLI's flags) replace
some of them for this run and are recorded as MLflow params, so a scheduled deployment and ``rooflab campaign``
run the same loop unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from rooflab.campaign.loop import (
    CampaignSteps,
    CollectOutcome,
    IterationRecord,
    run_campaign,
)
from rooflab.collect.collector import Launcher
from rooflab.collect.launchers.factory import close_launcher, make_launcher
from rooflab.collect.spec import Campaign, load_campaign
from rooflab.data.store import Store, StorePlans, engine_scope, run_sources
from rooflab.data.sweep import SweepPoint
from rooflab.fit.calibration import Calibration, Options
from rooflab.model.provenance import current_command
from rooflab.targeting.strategies import Spend, make_targeting
from tasks.analyze import calibrate_from_store, heldout_replay_error
from tasks.launch import collect_points
from tracking.campaign_runs import finish_campaign, log_iteration, start_campaign
from tracking.store import TrackingStore, open_tracking


@dataclass
class FlowSteps(CampaignSteps):
    """The loop's steps inside the flow: the data store, Prefect tasks, MLflow."""

    campaign: Campaign
    store: Store
    launcher: Launcher
    tracking: TrackingStore
    parent_run: str
    work: Path  # local folder for plots and artifact files

    def collect(self, iteration: int, points: list[SweepPoint]) -> CollectOutcome:
        c = self.campaign
        prog = collect_points(self.store, self.launcher, c.name, points, concurrency=c.collection.concurrency,
                              max_retries=c.collection.max_retries, replicates=c.replicates)
        reasons = tuple(sorted({str(m.get("reason", "")) for m in prog.runs if m["status"] == "failed"}))
        return CollectOutcome(prog.done + prog.skipped, prog.failed, reasons)

    def collected_keys(self) -> set[str]:
        return self.store.collected_keys(self.campaign.name)

    def spend(self) -> Spend:
        runs = self.store.runs(campaign=self.campaign.name)
        by_split = runs.groupby("split")["gpu_seconds"].sum().to_dict() if len(runs) else {}
        return Spend(float(by_split.get("train", 0.0)), float(by_split.get("validation", 0.0)))

    def has_fit_data(self) -> bool:
        return not self.store.runs(campaign=self.campaign.name, statuses=("ok",)).empty

    def calibrate(self, iteration: int) -> Calibration:
        loop = self.campaign.loop
        options = Options(variant=loop.variant, formulas=loop.formulas, n_boot=loop.n_boot)
        return calibrate_from_store(str(self.store.root), self.campaign.name, options,
                                    str(self.work / f"iter-{iteration}" / "plots"))

    def replay_error(self, calib: Calibration) -> dict[str, Any]:
        return heldout_replay_error(str(self.store.root), self.campaign.name, calib)

    def record(self, record: IterationRecord) -> None:
        assert record.calibration is not None  # the flow's calibrate step always fits (or raises)
        runs = record.calibration.beta.runs
        log_iteration(self.tracking, self.parent_run, record.iteration, record.calibration, stop=record.stop,
                      picks=record.picks, gpu_seconds=record.spend.total_s,
                      artifacts_dir=self.work / f"iter-{record.iteration}",
                      provenance={"sources": run_sources(self.store, runs), "command": current_command(),
                                  **engine_scope(self.store, runs)})


@flow(name="rooflab-campaign", log_prints=True)
def campaign_flow(campaign: str = "demo", store: str = "store", mlruns: str = "mlruns",
                  launcher: str = "inference-perf", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a campaign until the stop rule. ``overrides``: loop settings that replace the spec's
    (``batch_size``, ``max_iterations``, ``variant``, ``formulas``, ``targeting``, ``n_boot``, ``replay_stop``)."""
    camp = load_campaign(campaign)
    if overrides:
        camp = camp.with_loop(**overrides)
    st = Store(store)
    lau = make_launcher(camp, launcher, st.root)
    ts = open_tracking(Path(mlruns))
    loop = camp.loop
    parent = start_campaign(ts, camp.name, params={
        "campaign": camp.name, "launcher": launcher, "budget_gpu_hours": camp.budget_gpu_hours,
        "combos": ", ".join(f"{c.model}/tp{c.tp}" for c in camp.combos), **loop.model_dump(),
        "overrides": ", ".join(sorted(overrides or {})) or "none"})
    steps = FlowSteps(camp, st, lau, ts, parent, Path(mlruns) / "work" / camp.name)
    try:
        outcome = run_campaign(camp, steps, StorePlans(st, camp.name), make_targeting(loop.targeting, seed=camp.seed))
    finally:
        close_launcher(lau)
    spent = steps.spend()
    if outcome.stopped:
        finish_campaign(ts, parent, stop_reason=outcome.stop_reason,
                        summary={"iterations": outcome.iterations, "gpu_hours": spent.total_s / 3600,
                                 "converged": outcome.converged})
    return {"campaign": camp.name, "iterations": outcome.iterations, "stop_reason": outcome.stop_reason,
            "converged": outcome.converged, "gpu_hours": spent.total_s / 3600, "parent_run_id": parent}
