"""The collector: runs sweep points into the data store, idempotently (SPEC §4, §11).

run id = hash(campaign, sweep point, replicate). A complete run (manifest status ok/saturated) is never
re-run; an interrupted one (folder without manifest) is cleared and redone; a failed one is retried up
to ``max_retries`` attempts in total (across invocations — the manifest keeps the count), and only
when the failure is transient (timeout, server exit) — a deterministic failure (all requests rejected,
bad config) is recorded once with its reason. Every finished run gets step-level and run-level
saturation routing in its manifest.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from rooflab.collect.launchers import RunResult, one_line
from rooflab.data.store import COMPLETE, Store
from rooflab.data.sweep import SweepPoint, run_id


@dataclass
class Progress:
    total: int
    done: int = 0  # completed this call
    skipped: int = 0  # already complete in the store
    failed: int = 0
    gpu_seconds: float = 0.0
    runs: list = field(default_factory=list)  # manifests written this call

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.skipped - self.failed


def plan(store: Store, campaign: str, points: list[SweepPoint], replicates: int = 1) -> list[tuple]:
    """(run_id, point, replicate) for every run of the design, in design order."""
    return [(run_id(campaign, p, r), p, r) for p in points for r in range(replicates)]


def _routing(result: RunResult) -> tuple[dict, bool]:
    from rooflab.data.saturation import route_run, route_steps, routing_counts

    step_routing = route_steps(result.steps) if result.steps is not None and len(result.steps) else None
    if result.requests is None or not len(result.requests):
        return {"steps": step_routing.counts() if step_routing else {}}, False
    run_routing = route_run(result.requests)
    counts = routing_counts(step_routing, run_routing, len(result.requests))
    return {"run": run_routing.to_dict(), "counts": counts}, bool(run_routing.saturated)


def run_one(store: Store, launcher, campaign: str, rid: str, point: SweepPoint, replicate: int, *,
            max_retries: int = 2) -> dict | None:
    """Bring one run to a final state in the store; returns the manifest written (None if untouched)."""
    status = store.status(rid)
    if status in COMPLETE:
        return None
    attempt = 0
    if status == "failed":
        m = store.manifest(rid)
        attempt = int(m.get("attempt", 1))
        if attempt >= max_retries or not m.get("transient", False):
            return None
    manifest = None
    while attempt < max_retries:
        attempt += 1
        rd = store.begin(rid, point, campaign, replicate, attempt)
        started = datetime.now(timezone.utc).isoformat()
        try:
            result = launcher.run(point, rd)
        except Exception as exc:  # a launcher bug or an unexpected server answer: recorded, never lost
            result = RunResult("failed", one_line(exc), transient=False)
        extra = {"transient": result.transient, **result.extra}
        status = result.status
        if status == "ok":
            routing, saturated = _routing(result)
            extra["routing"] = routing
            if saturated:
                status = "saturated"
        manifest = store.finish(rd, point=point, campaign=campaign, replicate=replicate, attempt=attempt,
                                status=status, reason=result.reason, steps=result.steps, requests=result.requests,
                                gpu_seconds=result.gpu_seconds, launcher=getattr(launcher, "name", ""),
                                engine=result.engine, started_at=started, extra=extra)
        if status != "failed" or not result.transient:
            break
    return manifest


def collect(store: Store, launcher, campaign: str, points: list[SweepPoint], *, replicates: int = 1,
            concurrency: int = 1, max_retries: int = 2,
            on_progress: Callable[[Progress], None] | None = None,
            on_run: Callable[[dict], None] | None = None) -> Progress:
    """Run every (point, replicate) not yet complete. Safe to interrupt and call again."""
    todo = plan(store, campaign, points, replicates)
    progress = Progress(total=len(todo))
    lock = threading.Lock()
    pending = []
    for rid, p, r in todo:
        if store.status(rid) in COMPLETE:
            progress.skipped += 1
        else:
            pending.append((rid, p, r))
    if on_progress:
        on_progress(progress)

    def account(manifest):
        with lock:
            if manifest is None:
                progress.failed += 1  # failed earlier and out of retries (or not retryable)
            elif manifest["status"] == "failed":
                progress.failed += 1
            else:
                progress.done += 1
            if manifest is not None:
                progress.gpu_seconds += manifest["gpu_seconds"]
                progress.runs.append(manifest)
        if on_run and manifest is not None:
            on_run(manifest)
        if on_progress:
            on_progress(progress)

    if concurrency <= 1:
        for rid, p, r in pending:
            account(run_one(store, launcher, campaign, rid, p, r, max_retries=max_retries))
    else:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(run_one, store, launcher, campaign, rid, p, r, max_retries=max_retries)
                       for rid, p, r in pending]
            for f in as_completed(futures):
                account(f.result())
    return progress
