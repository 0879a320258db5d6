"""One collection run as its own flow (``rooflab-run``), what a work-pool worker executes: each run of a campaign
that collects through a pool (``campaign_flow(pool=...)``) is a flow run of the deployment ``rooflab-run/<pool>``,
in its own process (process pool) or pod (Kubernetes pool), submitted and watched by
:mod:`flows.pool_executor`.

Order inside the run, and why:

1. take the run's **lease** in the data store first (``runs/<id>/.lease``, refreshed by a heartbeat thread): from
   then on the campaign can tell a live run from a dead one, whatever it is doing, waiting for GPUs included;
2. hold **GPU slots**, ``tp`` of ``gpu:<hardware>`` (:mod:`flows.gpu_slots`), for the launcher's whole run;
3. run the point with the collector's own retries (:func:`rooflab.collect.collector.run_one`), under that lease;
   the manifest records where it ran (``executed_by``: host, pid, the worker's pid, the flow run).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from prefect import flow
from prefect.runtime import flow_run as current_flow_run
from pydantic import BaseModel, ConfigDict

from flows.gpu_slots import gpu_slots, record_path
from rooflab.collect.collector import Launcher, leased, run_one
from rooflab.collect.launchers import RunResult
from rooflab.collect.spec import load_campaign
from rooflab.data.store import COMPLETE, RunDir, RunLeased, Store
from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError
from tasks.launch import build_launcher, emit_data_arrived

RUN_FLOW = "rooflab-run"


class RunRequest(BaseModel):
    """Everything a worker needs to run one point: plain values (it travels as the flow run's parameters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str  # the data store's root, as the worker sees it (a shared path)
    campaign: str  # the campaign spec (a path the worker can read, or a shipped name): the launcher is built from it
    launcher: str  # direct | inference-perf | kubernetes
    run_id: str
    point: dict[str, Any]  # SweepPoint.to_dict()
    replicate: int
    max_retries: int
    gpu_limit: str | None = None  # "gpu:<hardware>"; None: hold no GPU slot
    slots: int = 1  # the run's TP
    slot_timeout_s: float | None = None  # give up waiting for GPU slots after this long (None: wait)


@dataclass
class Placed:
    """The launcher, with where the run executed added to its manifest (``executed_by``)."""

    inner: Launcher
    flow_run_id: str | None

    @property
    def name(self) -> str:
        return self.inner.name

    def run(self, point: SweepPoint, rd: RunDir) -> RunResult:
        result = self.inner.run(point, rd)
        result.extra["executed_by"] = {"host": socket.gethostname(), "pid": os.getpid(), "worker_pid": os.getppid(),
                                       "flow_run_id": self.flow_run_id}
        return result

    def close(self) -> None:
        self.inner.close()


def execute_request(request: RunRequest, flow_run_id: str | None = None) -> dict[str, Any]:
    """The run flow's body (a plain function: testable without a worker). Returns the run's status line."""
    store = Store(request.store)
    rid = request.run_id
    try:
        if store.status(rid) in COMPLETE:
            return {"run_id": rid, "status": "complete", "reason": "already complete"}
    except InputError:
        pass  # a damaged manifest: the collector quarantines and redoes the run under its lease
    try:
        lease = store.lease(rid)
    except RunLeased as exc:
        return dict(leased(rid, exc.problem))
    try:
        camp = load_campaign(request.campaign)
        launcher = Placed(build_launcher(camp, request.launcher, store.root), flow_run_id)
        point = SweepPoint.from_dict(request.point)
        try:
            if request.gpu_limit:
                with gpu_slots(request.gpu_limit, request.slots, record_path(store.root, rid), flow_run_id=flow_run_id,
                               timeout_s=request.slot_timeout_s):
                    manifest = run_one(store, launcher, camp.name, rid, point, request.replicate,
                                       max_retries=request.max_retries, lease=lease)
            else:
                manifest = run_one(store, launcher, camp.name, rid, point, request.replicate,
                                   max_retries=request.max_retries, lease=lease)
        finally:
            launcher.close()
    finally:
        lease.release()
    if manifest is None:
        return {"run_id": rid, "status": store.status(rid) or "untouched", "reason": "nothing to do"}
    if manifest["status"] in COMPLETE:
        emit_data_arrived(manifest)
    return {"run_id": rid, "status": manifest["status"], "reason": str(manifest.get("reason", ""))}


@flow(name=RUN_FLOW, log_prints=True)
def run_flow(request: RunRequest) -> dict[str, Any]:
    """One sweep point into the data store, holding its GPU slots (see the module doc)."""
    fid = current_flow_run.get_id()
    out = execute_request(request, str(fid) if fid else None)
    print(f"run {request.run_id}: {out['status']}" + (f" ({out['reason']})" if out.get("reason") else ""))
    return out
