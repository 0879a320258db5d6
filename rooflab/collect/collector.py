"""The collector: runs sweep points into the data store, idempotently (docs/spec.md §4, §11). It is the one
owner of retries and concurrency.

run id = hash(campaign, sweep point, replicate). A complete run (manifest status ok/saturated) is never
re-run; an interrupted one (folder without manifest) is cleared and redone; a failed one is retried up
to ``max_retries`` attempts in total (across invocations — the manifest keeps the count), and only
when the failure is transient (timeout, server exit) — a deterministic failure (all requests rejected,
bad config) is recorded once with its reason. Every finished run gets step-level and run-level
saturation routing in its manifest.

Several collectors may share one store (two ``rooflab collect`` of one design, a work pool): a run is worked on
only under its lease (:meth:`rooflab.data.store.Store.lease`). A run another live process holds is skipped and
reported (status ``leased``: "run R is leased by pid N on host H since T"); a stale lease (its owner died) is taken
over with a warning. A run whose manifest is damaged is quarantined and redone.

Runs go through a :class:`RunExecutor`: by default a thread pool in this process; the Prefect flow passes one
that submits each run as a Prefect task (``tasks/launch.py``), so the UI shows every run, while the retry and
concurrency policy stays here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rooflab.collect.launchers import RunResult, one_line
from rooflab.data.locks import Claim
from rooflab.data.saturation import route_run, route_steps, routing_counts
from rooflab.data.store import COMPLETE, LEASED, RunDir, RunLeased, Store
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.errors import InputError

Manifest = dict[str, Any]
log = logging.getLogger("rooflab.collect")
_IN_FLIGHT: set[tuple[str, str]] = set()  # (store, run id) being run by a thread of this process
_IN_FLIGHT_LOCK = threading.Lock()


class Launcher(Protocol):
    """Turns a sweep point into a finished run in its run folder. Owned here, by the collector that calls it;
    implemented by the direct launcher (twin fast mode) and the inference-perf launcher."""

    name: str

    def run(self, point: SweepPoint, rd: RunDir) -> RunResult: ...

    def close(self) -> None:
        """Release what the launcher started (servers)."""
        ...


@dataclass(frozen=True)
class RunJob:
    """One run to bring to a final state: everything a worker needs, nothing it must share."""

    store_root: str
    launcher: Launcher
    campaign: str
    run_id: str
    point: SweepPoint
    replicate: int
    max_retries: int


class ResultHandle(Protocol):
    def result(self) -> Manifest | None: ...


class RunExecutor(Protocol):
    """Executes :class:`RunJob`s (:func:`execute`); ``submit`` returns a handle whose ``result()`` waits."""

    def submit(self, job: RunJob) -> ResultHandle: ...


class ThreadExecutor:
    """Runs jobs on a thread pool of this process (the default)."""

    def __init__(self, workers: int = 1):
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def submit(self, job: RunJob) -> Future[Manifest | None]:
        return self.pool.submit(execute, job)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass
class Progress:
    total: int
    done: int = 0  # completed this call
    skipped: int = 0  # already complete in the store
    failed: int = 0
    gpu_seconds: float = 0.0
    runs: list[Manifest] = field(default_factory=list)  # manifests written this call
    leased: list[str] = field(default_factory=list)  # "run R is leased by pid N on host H since T", one per run
    warnings: list[str] = field(default_factory=list)  # one line each: stale leases taken over, quarantined runs

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.skipped - self.failed - len(self.leased)


def plan(campaign: str, points: list[SweepPoint], replicates: int = 1) -> list[tuple[str, SweepPoint, int]]:
    """(run_id, point, replicate) for every run of the design, in design order (a repeated point once)."""
    out = {run_id(campaign, p, r): (p, r) for p in points for r in range(replicates)}
    return [(rid, p, r) for rid, (p, r) in out.items()]


def _routing(result: RunResult) -> tuple[dict[str, Any], bool]:
    step_routing = route_steps(result.steps) if result.steps is not None and len(result.steps) else None
    if result.requests is None or not len(result.requests):
        return {"steps": step_routing.counts() if step_routing else {}}, False
    run_routing = route_run(result.requests)
    counts = routing_counts(step_routing, run_routing, len(result.requests))
    return {"run": run_routing.to_dict(), "counts": counts}, bool(run_routing.saturated)


def leased(rid: str, reason: str) -> Manifest:
    """What :func:`run_one` returns for a run that another live process holds (no manifest is written)."""
    return {"run_id": rid, "status": LEASED, "reason": reason, "gpu_seconds": 0.0}


def run_one(store: Store, launcher: Launcher, campaign: str, rid: str, point: SweepPoint, replicate: int, *,
            max_retries: int = 2, lease: Claim | None = None) -> Manifest | None:
    """Bring one run to a final state in the store, retrying transient failures up to ``max_retries``
    attempts in total; returns the manifest written, None if untouched (complete, or failed for good), or a
    :func:`leased` record when another live process holds the run. ``lease``: the run's lease, already taken by
    the caller (a work-pool run takes it first, so that its whole life — waiting for GPU slots included — is
    visible to the campaign that submitted it); the caller releases it."""
    try:
        if store.status(rid) in COMPLETE:
            return None
    except InputError:
        pass  # a damaged manifest: decided under the lease below
    key = (str(store.root), rid)
    with _IN_FLIGHT_LOCK:
        if key in _IN_FLIGHT:
            return leased(rid, f"run {rid} is being collected by another thread of this process")
        _IN_FLIGHT.add(key)
    try:
        own = lease is None
        try:
            claim = store.lease(rid) if lease is None else lease
        except RunLeased as exc:
            return leased(rid, exc.problem)
        try:
            return _run_leased(store, launcher, campaign, rid, point, replicate, max_retries, claim)
        except RunLeased as exc:  # our lease was taken over while the launcher ran: nothing was recorded
            return leased(rid, exc.problem)
        finally:
            if own:
                claim.release()
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(key)


def _run_leased(store: Store, launcher: Launcher, campaign: str, rid: str, point: SweepPoint, replicate: int,
                max_retries: int, lease: Claim) -> Manifest | None:
    notes = []
    if lease.previous is not None:
        notes.append(f"run {rid}: took over the stale lease of {lease.previous.describe()}")
    try:  # read again under the lease: another process may have finished the run meanwhile
        status = store.status(rid)
    except InputError as exc:
        q = store.quarantine(rid, str(exc), lease=lease)
        notes.append(q.line())
        status = None
    for line in notes:
        log.warning(line)
    if status in COMPLETE:
        return None
    attempt = 0
    if status == "failed":
        m = store.manifest(rid)
        assert m is not None  # the "failed" status was read from this manifest
        attempt = int(m.get("attempt", 1))
        if attempt >= max_retries or not m.get("transient", False):
            return None
    manifest = None
    while attempt < max_retries:
        attempt += 1
        rd = store.begin(rid, point, campaign, replicate, attempt, lease=lease)
        started = datetime.now(UTC).isoformat()
        try:
            result = launcher.run(point, rd)
        except Exception as exc:  # a launcher bug or an unexpected server answer: recorded, never lost
            result = RunResult("failed", one_line(exc), transient=False)
        extra = {"transient": result.transient, **result.extra}
        if notes:
            extra["warnings"] = notes
        status = result.status
        if status == "ok":
            routing, saturated = _routing(result)
            extra["routing"] = routing
            if saturated:
                status = "saturated"
        manifest = store.finish(rd, point=point, campaign=campaign, replicate=replicate, attempt=attempt,
                                status=status, reason=result.reason, steps=result.steps, requests=result.requests,
                                gpu_seconds=result.gpu_seconds, launcher=launcher.name,
                                engine=result.engine, started_at=started, extra=extra)
        if status != "failed" or not result.transient:
            break
    return manifest


def execute(job: RunJob) -> Manifest | None:
    """Run one job (what a worker executes): :func:`run_one` on the job's store."""
    return run_one(Store(job.store_root), job.launcher, job.campaign, job.run_id, job.point, job.replicate,
                   max_retries=job.max_retries)


def collect(store: Store, launcher: Launcher, campaign: str, points: list[SweepPoint], *, replicates: int = 1,
            concurrency: int = 1, max_retries: int = 2, executor: RunExecutor | None = None,
            on_progress: Callable[[Progress], None] | None = None,
            on_run: Callable[[Manifest], None] | None = None) -> Progress:
    """Run every (point, replicate) not yet complete, at most ``concurrency`` at a time. Safe to interrupt and
    call again."""
    todo = plan(campaign, points, replicates)
    progress = Progress(total=len(todo))
    lock = threading.Lock()
    pending = []
    for rid, p, r in todo:
        try:
            complete = store.status(rid) in COMPLETE
        except InputError:  # a damaged manifest: the run quarantines and redoes it
            complete = False
        if complete:
            progress.skipped += 1
        else:
            pending.append(RunJob(str(Path(store.root)), launcher, campaign, rid, p, r, max_retries))
    if on_progress:
        on_progress(progress)

    def account(rid: str, manifest: Manifest | None) -> None:
        if manifest is None:  # untouched: completed meanwhile (by another process), or failed for good
            try:
                complete = store.status(rid) in COMPLETE
            except InputError:
                complete = False
        if manifest is not None and manifest["status"] == LEASED:
            with lock:
                progress.leased.append(str(manifest["reason"]))
            if on_progress:
                on_progress(progress)
            return
        with lock:
            progress.warnings += list((manifest or {}).get("warnings", []))
            if manifest is None and complete:
                progress.skipped += 1
            elif manifest is None or manifest["status"] == "failed":
                progress.failed += 1  # failed now, or earlier and out of retries (or not retryable)
            else:
                progress.done += 1
            if manifest is not None:
                progress.gpu_seconds += manifest["gpu_seconds"]
                progress.runs.append(manifest)
        if on_run and manifest is not None:
            on_run(manifest)
        if on_progress:
            on_progress(progress)

    own = executor is None
    ex: RunExecutor = ThreadExecutor(concurrency) if executor is None else executor
    try:
        step = max(1, concurrency)
        for i in range(0, len(pending), step):
            batch = pending[i:i + step]
            for job, handle in zip(batch, [ex.submit(job) for job in batch]):
                account(job.run_id, handle.result())
    finally:
        if own and isinstance(ex, ThreadExecutor):
            ex.shutdown()
    return progress
