"""The campaign loop — bootstrap → collect → calibrate → diagnose → target → collect → … until the stop rule
(docs/spec.md §9) — written once. The Prefect flow (``flows/campaign.py``: each step a Prefect task, every
iteration logged to MLflow), the CLI (through that flow) and the sample-efficiency benchmark (plain steps, no
Prefect) all run this function; they differ only in the :class:`CampaignSteps` they pass.

Resumable by construction: each iteration's plan (its picks) is saved through the :class:`PlanBook` before it
is collected and marked complete after it is recorded; collection skips complete runs; recording skips recorded
iterations; calibration is deterministic given the data. Killing the process anywhere and calling again
continues where it was, with no run collected twice and no iteration recorded twice.

Inputs of completed iterations are guarded (docs/spec.md §11). When the steps also keep an :class:`InputLedger`
(the flow does), each completed plan records the runs its calibration fitted (run id → fingerprint of its status
and table checksums). A later calibration that no longer has one of them, or has it changed (a run deleted,
quarantined as damaged, re-collected with other data), would fit a different answer than the one recorded under
that iteration in MLflow: the loop stops with a one-line error naming the run and why, unless called with
``accept_changed_inputs`` — then it says so, records the change in the plans, and goes on fitting the data the
store holds now (the completed iterations' records stay what they were: true of the data they had).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rooflab.collect.spec import Campaign
from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError
from rooflab.fit.calibration import Calibration
from rooflab.targeting.candidates import Pick
from rooflab.targeting.stop import StopDecision, identifiable_betas, stop_rule
from rooflab.targeting.strategies import Spend, Targeting


@dataclass(frozen=True)
class CollectOutcome:
    ok: int  # runs complete (ok or saturated)
    failed: int
    reasons: tuple[str, ...] = ()  # one line per distinct failure
    busy: tuple[str, ...] = ()  # runs another process is collecting ("run R is leased by pid N on host H ...")
    pending: tuple[str, ...] = ()  # runs collected outside rooflab (a person, a cluster job) and not in yet


@dataclass
class IterationRecord:
    """What one iteration produced; the tracker logs it (MLflow in the flow)."""

    iteration: int
    calibration: Calibration | None  # None only where a step may decline to fit (too little data)
    stop: StopDecision
    picks: list[Pick]  # the next batch (empty when the campaign stops)
    spend: Spend  # cumulative, after this iteration's collection
    collected: CollectOutcome
    replay: dict[str, Any] | None = None  # held-out request-level error, when the stop rule uses it


class CampaignSteps(Protocol):
    """What the loop needs from its surroundings. Owned here: implementations live in the flow and the
    benchmark."""

    def collect(self, iteration: int, points: list[SweepPoint]) -> CollectOutcome:
        """Bring every run of ``points`` (× the campaign's replicates) to a final state."""
        ...

    def collected_keys(self) -> set[str]:
        """Keys of the points this campaign has collected (failed ones too: never picked again)."""
        ...

    def spend(self) -> Spend: ...

    def has_fit_data(self) -> bool:
        """At least one unsaturated training run is complete."""
        ...

    def calibrate(self, iteration: int) -> Calibration | None: ...

    def replay_error(self, calib: Calibration) -> dict[str, Any]:
        """Held-out request-level error (``rooflab.replay.heldout.store_replay_error`` without the runs)."""
        ...

    def record(self, record: IterationRecord) -> None: ...


@runtime_checkable
class InputLedger(Protocol):
    """Optional, on the :class:`CampaignSteps`: what each calibration fitted, to guard completed iterations."""

    def fit_inputs(self) -> dict[str, str]:
        """The runs the last :meth:`CampaignSteps.calibrate` fitted: run id -> fingerprint."""
        ...

    def missing_reason(self, run_id: str) -> str:
        """Why ``run_id`` is not among the fitted runs now (one line: quarantined to …, manifest missing, …)."""
        ...


class PlanBook(Protocol):
    """Where iteration plans persist: ``{"iteration", "points": [Pick.to_dict()], "complete", ...}``."""

    def plans(self) -> list[dict[str, Any]]: ...

    def save(self, iteration: int, plan: dict[str, Any]) -> None: ...


@dataclass
class MemoryPlans:
    """Plans kept in memory (a benchmark's loop, which is not resumed)."""

    saved: dict[int, dict[str, Any]] = field(default_factory=dict)

    def plans(self) -> list[dict[str, Any]]:
        return [self.saved[k] for k in sorted(self.saved)]

    def save(self, iteration: int, plan: dict[str, Any]) -> None:
        self.saved[iteration] = {**plan, "iteration": iteration}


@dataclass
class CampaignOutcome:
    campaign: str
    iterations: int  # iterations completed
    stopped: bool  # the campaign is finished (stop rule, budget, cap or no candidate left)
    stop: StopDecision | None  # the last decision (None when resumed after it had already stopped)
    stop_reason: str
    spend: Spend
    records: list[IterationRecord] = field(default_factory=list)  # iterations completed by this call
    waiting: tuple[str, ...] = ()  # the pending runs (CollectOutcome.pending) the loop paused for: call again later

    @property
    def converged(self) -> bool:
        return bool(self.stop is not None and self.stop.converged)


def _points(plan: dict[str, Any]) -> list[SweepPoint]:
    return [SweepPoint.from_dict(p["point"]) for p in plan["points"]]


def _beta_line(calib: Calibration) -> str:
    return " ".join(f"{n}={v:.3g}" for n, v in zip(calib.beta.names, calib.beta.beta))


def _changed_inputs(name: str, saved: dict[int, dict[str, Any]], ledger: InputLedger, plans: PlanBook, *,
                    accept: bool, report: Callable[[str], None]) -> list[str]:
    """Check the inputs recorded by completed iterations against those just fitted (see the module doc)."""
    now = ledger.fit_inputs()
    problems: dict[int, list[str]] = {}
    for i, plan in sorted(saved.items()):
        if not plan.get("complete"):
            continue
        for rid, fp in sorted((plan.get("inputs") or {}).items()):
            if rid not in now:
                problems.setdefault(i, []).append(f"run {rid} is missing: {ledger.missing_reason(rid)}")
            elif now[rid] != fp:
                problems.setdefault(i, []).append(f"run {rid} changed (its status or tables differ from those fitted)")
    if not problems:
        return []
    first = min(problems)
    n = sum(len(v) for v in problems.values())
    head = (f"campaign {name}: iteration {first} (complete, recorded in MLflow) was fitted on data the store no longer "
            f"holds: {problems[first][0]}" + (f" (+{n - 1} more)" if n > 1 else ""))
    if not accept:
        raise InputError(None, None, f"{head}; continuing would fit a different answer under the same record. "
                         "Restore the run, or resume accepting the change (rooflab campaign --accept-changed-inputs) "
                         "to fit the data the store holds now in new iterations")
    report(f"warning: {head}; accepted: new iterations fit the data the store holds now")
    for i, lines in problems.items():
        plan = saved[i]
        inputs = {r: now[r] for r in plan.get("inputs") or {} if r in now}
        plans.save(i, {**plan, "inputs": inputs, "inputs_changed": list(plan.get("inputs_changed") or []) + lines})
    return [line for lines in problems.values() for line in lines]


def run_campaign(campaign: Campaign, steps: CampaignSteps, plans: PlanBook, targeting: Targeting, *,
                 report: Callable[[str], None] = print, accept_changed_inputs: bool = False,
                 decide: Callable[..., StopDecision] = stop_rule) -> CampaignOutcome:
    """Run (or resume) ``campaign`` until it stops. Settings come from ``campaign.loop`` and the campaign's
    budget; ``report`` gets one line per event (the flow's log, the CLI's output). ``accept_changed_inputs``: go
    on when a completed iteration's inputs changed (see the module doc) instead of stopping with an error.
    ``decide``: the stop rule, called like :func:`rooflab.targeting.stop.stop_rule` (onboarding passes its own).
    A collection with ``pending`` runs (collected outside rooflab) pauses the loop: it returns with ``waiting`` set,
    and a later call resumes that iteration."""
    loop = campaign.loop
    budget_s = campaign.budget_gpu_hours * 3600 if campaign.budget_gpu_hours else None
    heldout = tuple(sorted({c.model for c in campaign.validation_combos}))
    required = identifiable_betas(campaign)
    saved = {int(p["iteration"]): p for p in plans.plans()}
    if 0 not in saved:
        picks = targeting.pick(None, campaign, steps.collected_keys(), batch_size=loop.batch_size,
                               budget_left_s=budget_s, iteration=0, spend=steps.spend())
        plans.save(0, {"points": [p.to_dict() for p in picks], "complete": False})
        saved = {int(p["iteration"]): p for p in plans.plans()}
    it = min((i for i, p in saved.items() if not p.get("complete")), default=max(saved) + 1)
    outcome = CampaignOutcome(campaign.name, sum(bool(p.get("complete")) for p in saved.values()), False, None, "",
                              steps.spend())
    last = saved[max(saved)]
    if last.get("complete") and last.get("stop"):  # already finished earlier
        outcome.stopped, outcome.stop_reason = True, str(last.get("stop_reason", ""))
    while it in saved and not saved[it].get("complete"):
        points = _points(saved[it])
        report(f"iteration {it}: collecting {len(points)} runs")
        got = steps.collect(it, points)
        if got.busy:
            raise InputError(None, None, f"campaign {campaign.name}: iteration {it}: {len(got.busy)} run(s) are being "
                             f"collected by another process ({got.busy[0]}); run the campaign again when they are done")
        if got.pending:  # collected outside rooflab: pause until they are in (a later call resumes here)
            report(f"iteration {it}: waiting for {len(got.pending)} run(s) collected outside rooflab")
            outcome.waiting = got.pending
            break
        if not steps.has_fit_data():
            raise InputError(None, "campaign", f"{campaign.name}: no unsaturated run has completed, nothing to "
                             f"calibrate ({got.failed} failed: {'; '.join(got.reasons)[:300]})")
        spend = steps.spend()
        calib = steps.calibrate(it)
        ledger = steps if isinstance(steps, InputLedger) else None
        changed = _changed_inputs(campaign.name, saved, ledger, plans, accept=accept_changed_inputs,
                                  report=report) if ledger is not None else []
        if changed:
            saved = {int(p["iteration"]): p for p in plans.plans()}
        replay = steps.replay_error(calib) if (loop.replay_stop and calib is not None) else None
        stop = decide(calib, gpu_seconds_spent=spend.total_s, budget_gpu_seconds=budget_s, iteration=it + 1,
                         max_iterations=loop.max_iterations, required=required, heldout_models=heldout,
                         replay=replay)
        nxt: list[Pick] = []
        if not stop.stop:
            left = None if budget_s is None else budget_s - spend.total_s
            nxt = targeting.pick(calib, campaign, steps.collected_keys(), batch_size=loop.batch_size,
                                 budget_left_s=left, iteration=it + 1, spend=spend)
            if not nxt:
                stop = stop.with_reason(True, "no candidate left that fits the budget")
        record = IterationRecord(it, calib, stop, nxt, spend, got, replay)
        steps.record(record)
        if nxt:
            plans.save(it + 1, {"points": [p.to_dict() for p in nxt], "complete": False})
        acc = calib.accuracy if calib is not None else {}
        plans.save(it, {**saved[it], "complete": True, "stop": stop.stop, "stop_reason": stop.reason,
                        "gpu_seconds": spend.total_s, "train_mape": (acc.get("train") or {}).get("mape"),
                        "validation_mape": (acc.get("validation") or {}).get("mape"),
                        "beta": calib.beta.coefficients() if calib is not None else None,
                        **({"inputs": ledger.fit_inputs()} if ledger is not None else {}),
                        **({"inputs_changed": changed} if changed else {})})
        val = (acc.get("validation") or {}).get("mape")
        line = (f"iteration {it}: {got.ok} runs ok, {got.failed} failed; GPU-h {spend.total_s / 3600:.3f}"
                + (f" of {campaign.budget_gpu_hours:g}" if campaign.budget_gpu_hours else ""))
        if calib is not None:
            line += f"; train MAPE {calib.accuracy['train']['mape']:.1%}"
            line += (f", held-out MAPE {val:.1%}" if val is not None else "") + f"; {_beta_line(calib)}"
        report(line)
        report(f"iteration {it}: {'STOP — ' + stop.reason if stop.stop else 'next: ' + str(len(nxt)) + ' points'}")
        for p in nxt:
            report(f"    + {p.point.label()}: {p.reason}")
        outcome.records.append(record)
        outcome.iterations = it + 1
        outcome.stop, outcome.stop_reason, outcome.stopped = stop, stop.reason, stop.stop
        saved = {int(p["iteration"]): p for p in plans.plans()}
        it += 1
    outcome.spend = steps.spend()
    return outcome
