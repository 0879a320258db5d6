"""The campaign flow: the core campaign loop (:func:`rooflab.campaign.loop.run_campaign`) with its steps as
Prefect tasks — each run a ``launch-run`` task, each fit a ``calibrate`` task — and every iteration logged to
MLflow. Resumable: the loop keeps its plans in the data store, collection skips complete runs, MLflow logging
skips logged iterations.

Every loop setting comes from the campaign spec (``loop:`` in the YAML); ``overrides`` (the CLI's flags) replace
some of them for this run and are recorded as MLflow params, so a scheduled deployment and ``rooflab campaign``
run the same loop unless told otherwise.

Reliability (docs/spec.md §11): the flow holds the campaign's lock in the store for its whole run (a second start
of the same campaign is refused with ``campaign X is running in pid N on host H since T``); before collecting and
before fitting it verifies the campaign's runs and quarantines damaged ones (re-collected while their iteration is
open); and it keeps the loop's :class:`~rooflab.campaign.loop.InputLedger`, so a completed iteration whose inputs
changed is reported instead of being silently refitted under the same MLflow record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow

from rooflab.campaign.loop import (
    CampaignSteps,
    CollectOutcome,
    IterationRecord,
    run_campaign,
)
from rooflab.collect.collector import Launcher, RunExecutor
from rooflab.collect.launchers import RunResult
from rooflab.collect.launchers.factory import close_launcher
from rooflab.collect.spec import Campaign, load_campaign
from rooflab.data.locks import Claim
from rooflab.data.store import CampaignCheck, RunDir, Store, StorePlans, engine_scope, run_sources
from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError
from rooflab.fit.calibration import Calibration, Options
from rooflab.model.provenance import current_command
from rooflab.targeting.strategies import Spend, make_targeting
from tasks.analyze import calibrate_from_store, heldout_replay_error
from tasks.launch import build_launcher, collect_points
from tracking.campaign_runs import finish_campaign, iteration_folder, log_iteration, start_campaign
from tracking.store import TrackingStore, open_tracking, work_root


@dataclass
class FlowSteps(CampaignSteps):
    """The loop's steps inside the flow: the data store, Prefect tasks, MLflow."""

    campaign: Campaign
    store: Store
    launcher: Launcher
    tracking: TrackingStore
    parent_run: str
    work: Path  # local folder for plots and artifact files
    report: Callable[[str], None] = print
    lock: Claim | None = None  # the campaign's lock, held for the whole run
    executor: RunExecutor | None = None  # where runs execute: Prefect tasks of this flow (None) or a work pool
    points: dict[int, list[SweepPoint]] = field(default_factory=dict)  # each iteration's, as collected
    fitted: dict[str, str] = field(default_factory=dict)  # the runs the last calibration fitted -> fingerprint

    def verify(self) -> CampaignCheck:
        """Check the campaign's runs; quarantine the damaged ones (one warning line each)."""
        check = self.store.verify_campaign(self.campaign.name)
        for q in check.quarantined:
            self.report(f"warning: {q.line()}")
        for line in check.busy:
            self.report(f"warning: run {line}: left in place, another process holds it")
        return check

    def check_lock(self) -> None:
        """Stop if another process took the campaign's lock over (it judged this one dead: another host whose
        heartbeat stalled): two writers of one campaign must not go on."""
        if self.lock is not None and not self.lock.held():
            raise InputError(None, None, f"campaign {self.campaign.name}: this process lost the campaign's lock to "
                             "another process (its heartbeat was judged stale); stopping")

    def collect(self, iteration: int, points: list[SweepPoint]) -> CollectOutcome:
        c = self.campaign
        self.check_lock()
        self.points[iteration] = points
        self.verify()  # a damaged run of this iteration is quarantined here and collected again below
        # on a work pool every run of the iteration is submitted at once: the GPU-slot limits hold them back
        concurrency = c.collection.concurrency if self.executor is None else len(points) * c.replicates
        pool = {} if self.executor is None else {"executor": self.executor}
        prog = collect_points(self.store, self.launcher, c.name, points, concurrency=concurrency,
                              max_retries=c.collection.max_retries, replicates=c.replicates, **pool)
        for line in prog.warnings:
            self.report(f"warning: {line}")
        reasons = tuple(sorted({str(m.get("reason", "")) for m in prog.runs if m["status"] == "failed"}))
        return CollectOutcome(prog.done + prog.skipped, prog.failed, reasons, tuple(prog.leased))

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
        check = self.verify()
        if check.quarantined and iteration in self.points:  # damaged since collection: collect them again, once
            got = self.collect(iteration, self.points[iteration])
            if got.busy:
                raise InputError(None, None, f"campaign {self.campaign.name}: iteration {iteration}: {got.busy[0]}")
            check = self.verify()
        self.fitted = dict(check.good)
        return calibrate_from_store(str(self.store.root), self.campaign.name, options,
                                    str(self.work / f"iter-{iteration}" / "plots"), sorted(check.good))

    def fit_inputs(self) -> dict[str, str]:
        return dict(self.fitted)

    def missing_reason(self, run_id: str) -> str:
        quarantined = self.store.quarantine_reason(run_id)
        if quarantined:
            return quarantined
        try:
            m = self.store.manifest(run_id)
        except InputError as exc:
            return f"its manifest is damaged ({exc.problem})"
        if m is not None:
            return f"its status is now {m['status']}"
        if self.store.run_dir(run_id).path.exists():
            return f"runs/{run_id}/manifest.json is missing (deleted, or the run is being redone)"
        return f"runs/{run_id} is gone from the store"

    def replay_error(self, calib: Calibration) -> dict[str, Any]:
        return heldout_replay_error(str(self.store.root), self.campaign.name, calib)

    def record(self, record: IterationRecord) -> None:
        assert record.calibration is not None  # the flow's calibrate step always fits (or raises)
        self.check_lock()
        runs = record.calibration.beta.runs
        log_iteration(self.tracking, self.parent_run, record.iteration, record.calibration, stop=record.stop,
                      picks=record.picks, gpu_seconds=record.spend.total_s,
                      artifacts_dir=self.work / f"iter-{record.iteration}",
                      provenance={"sources": run_sources(self.store, runs), "command": current_command(),
                                  **engine_scope(self.store, runs)})


@dataclass(frozen=True)
class OnWorkers:
    """The launcher's place in a campaign whose runs execute on a work pool: named, never run here."""

    name: str

    def run(self, point: SweepPoint, rd: RunDir) -> RunResult:
        raise RuntimeError(f"runs of a work-pool campaign execute on the pool's workers, not in the campaign's flow "
                           f"({self.name})")

    def close(self) -> None:
        pass


def pool_executor(camp: Campaign, campaign: str, launcher: str, pool: str) -> RunExecutor:
    """The executor that sends the campaign's runs to ``pool``, after checking that every combo fits its GPU limit
    (``gpu:<hardware>``) — one line before anything is submitted otherwise."""
    from flows.gpu_slots import check_fits
    from flows.pool_executor import PoolExecutor

    for combo in camp.combos:
        check_fits(combo.hardware, combo.tp)
    return PoolExecutor(pool, campaign, launcher)


@flow(name="rooflab-campaign", log_prints=True)
def campaign_flow(campaign: str = "demo", store: str = "store", mlruns: str = "mlruns",
                  launcher: str = "inference-perf", overrides: dict[str, Any] | None = None,
                  accept_changed_inputs: bool = False, pool: str | None = None) -> dict[str, Any]:
    """Run (or resume) a campaign until the stop rule. ``overrides``: loop settings that replace the spec's
    (``batch_size``, ``max_iterations``, ``variant``, ``formulas``, ``targeting``, ``n_boot``, ``replay_stop``).
    ``accept_changed_inputs``: go on when a completed iteration's inputs changed (see
    :mod:`rooflab.campaign.loop`). ``mlruns``: a folder, or a tracking server's URL. ``pool``: run each collection
    run as a flow run of ``rooflab-run/<pool>`` on that work pool's workers (each in its own process or pod, holding
    ``tp`` slots of ``gpu:<hardware>``) instead of as tasks of this flow; ``store`` and ``campaign`` must then be
    paths the workers see."""
    camp = load_campaign(campaign)
    if overrides:
        camp = camp.with_loop(**overrides)
    st = Store(store)
    with st.campaign_lock(camp.name) as lock:
        if lock.previous is not None:
            print(f"warning: campaign {camp.name}: took over the stale lock of {lock.previous.describe()}")
        executor = pool_executor(camp, campaign, launcher, pool) if pool else None
        return _run(camp, st, mlruns, launcher, overrides, accept_changed_inputs, lock, executor)


def _run(camp: Campaign, st: Store, mlruns: str, launcher: str, overrides: dict[str, Any] | None,
         accept_changed_inputs: bool, lock: Claim, executor: RunExecutor | None = None) -> dict[str, Any]:
    lau: Launcher = build_launcher(camp, launcher, st.root) if executor is None else OnWorkers(launcher)
    ts = open_tracking(mlruns)
    loop = camp.loop
    parent = start_campaign(ts, camp.name, params={
        "campaign": camp.name, "launcher": launcher, "budget_gpu_hours": camp.budget_gpu_hours,
        "combos": ", ".join(f"{c.model}/tp{c.tp}" for c in camp.combos), **loop.model_dump(),
        "overrides": ", ".join(sorted(overrides or {})) or "none"})
    steps = FlowSteps(camp, st, lau, ts, parent, work_root(mlruns) / camp.name, lock=lock, executor=executor)
    try:
        steps.verify()  # before the loop reads the store: damaged runs go to quarantine first
        outcome = run_campaign(camp, steps, StorePlans(st, camp.name), make_targeting(loop.targeting, seed=camp.seed),
                               accept_changed_inputs=accept_changed_inputs)
    finally:
        close_launcher(lau)
    spent = steps.spend()
    if outcome.stopped:
        finish_campaign(ts, parent, stop_reason=outcome.stop_reason,
                        summary={"iterations": outcome.iterations, "gpu_hours": spent.total_s / 3600,
                                 "converged": outcome.converged})
    last = iteration_folder(steps.work / f"iter-{outcome.iterations - 1}", outcome.iterations - 1) \
        if outcome.iterations else None  # the latest calibration's files: what a user takes to BLIS
    return {"campaign": camp.name, "iterations": outcome.iterations, "stop_reason": outcome.stop_reason,
            "converged": outcome.converged, "gpu_hours": spent.total_s / 3600, "parent_run_id": parent,
            "blis_coefficients": str(last / "blis_coefficients.yaml") if last else None,
            "provenance": str(last / "blis_coefficients.provenance.json") if last else None,
            "coefficients": str(last / "coefficients.json") if last else None}
