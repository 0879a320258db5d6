"""Runs executed by a work pool: the collector's executor (:class:`rooflab.collect.collector.RunExecutor`) for a
campaign whose runs go to workers. Each run is submitted as a flow run of ``rooflab-run/<pool>`` (:mod:`flows.run`)
and watched until it ends; the collector keeps its policy (what to run, transient retries, accounting).

A run is **lost** when its flow run ends Crashed / Failed / Cancelled, when the process that holds its lease in the
data store is gone (same machine: its pid; another machine: a heartbeat older than ``ROOFLAB_LEASE_TIMEOUT_S``), or
when it stays Pending / Running without ever taking that lease for ``start_grace_s``. A lost run is marked Crashed
on the server, its GPU slots are released (:func:`flows.gpu_slots.release_recorded`), and it is submitted again —
``lost_retries`` times (once by default). The new attempt takes over the stale lease, clears the partial folder and
writes the run's one manifest: a run is counted once however many times it was submitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Crashed

from flows.gpu_slots import limit_name, record_path, release_recorded
from flows.run import RUN_FLOW, RunRequest
from rooflab.collect.collector import Manifest, RunJob, leased
from rooflab.data.store import Store
from rooflab.errors import InputError


def run_deployment_name(pool: str) -> str:
    """The run flow's deployment on ``pool``: ``rooflab-run/<pool>``."""
    return f"{RUN_FLOW}/{pool}"


@dataclass(frozen=True)
class Submission:
    run_id: str
    flow_run_id: str
    attempt: int  # 1, then 2 for a resubmission of a lost run
    submitted_at: float  # time.time()


@dataclass
class PoolExecutor:
    """Submits each :class:`RunJob` to the pool and returns a handle whose ``result()`` waits for the run."""

    pool: str
    campaign_spec: str  # as the workers will read it (a shared path or a shipped name)
    launcher: str
    gpu_slots: bool = True  # hold tp slots of gpu:<hardware> per run
    lost_retries: int = 1
    poll_s: float = 1.0
    start_grace_s: float = 600.0  # Pending/Running this long without the run's lease: lost
    timeout_s: float | None = None  # per submission; None: wait (a queue of runs waiting for GPUs is normal)
    job_variables: Callable[[RunJob], dict[str, Any]] | None = None  # e.g. a Kubernetes pool's per-run resources
    report: Callable[[str], None] = print
    submissions: list[Submission] = field(default_factory=list)

    def request(self, job: RunJob) -> RunRequest:
        p = job.point
        return RunRequest(store=job.store_root, campaign=self.campaign_spec, launcher=self.launcher, run_id=job.run_id,
                          point=p.to_dict(), replicate=job.replicate, max_retries=job.max_retries,
                          gpu_limit=limit_name(p.hardware) if self.gpu_slots else None, slots=p.tp)

    def start(self, job: RunJob, attempt: int) -> Submission:
        fr = run_deployment(name=run_deployment_name(self.pool), parameters={"request": self.request(job).model_dump()},
                            timeout=0, as_subflow=False, flow_run_name=f"{job.run_id} (attempt {attempt})",
                            tags=[f"rooflab.campaign:{job.campaign}"],
                            job_variables=self.job_variables(job) if self.job_variables else None)
        sub = Submission(job.run_id, str(fr.id), attempt, time.time())
        self.submissions.append(sub)
        return sub

    def submit(self, job: RunJob) -> PoolRun:
        return PoolRun(self, job, self.start(job, 1))


def _age_s(fr: FlowRun) -> float:
    ts = fr.state.timestamp if fr.state is not None else None
    return (datetime.now(UTC) - ts).total_seconds() if ts is not None else 0.0


@dataclass
class PoolRun:
    """One run on the pool: ``result()`` waits for it (resubmitting it when lost) and returns what the collector
    expects of :func:`rooflab.collect.collector.run_one` — the manifest, None, or a leased record."""

    ex: PoolExecutor
    job: RunJob
    sub: Submission
    dead: set[str] = field(default_factory=set)  # tokens of the leases of lost attempts (left stale in the store)

    @property
    def store(self) -> Store:
        return Store(self.job.store_root)

    def lost(self, fr: FlowRun) -> str | None:
        """Why the flow run is lost, None while it is alive or ended well."""
        st = fr.state
        if st is None:
            return None
        if st.is_final():
            return None if st.is_completed() else f"its flow run ended {st.type.value}: {(st.message or '')[:200]}"
        owner = self.store.lease_owner(self.job.run_id)
        if owner is not None and owner.token not in self.dead:  # a lost attempt's lease says nothing of this one
            if owner.alive():
                return None
            self.dead.add(owner.token)
            return f"the process that held it died ({owner.describe()})"
        if (st.is_running() or st.is_pending()) and _age_s(fr) > self.ex.start_grace_s:
            return f"{st.type.value.lower()} for {_age_s(fr):.0f} s without taking the run's lease"
        return None

    def outcome(self) -> Manifest | None:
        """What the store holds for the run once its flow run ended."""
        rid = self.job.run_id
        try:
            m = self.store.manifest(rid)
        except InputError:
            m = None
        if m is not None:
            return m
        owner = self.store.lease_owner(rid)
        if owner is not None and owner.alive():
            return leased(rid, f"run {rid} is leased by {owner.describe()}")
        return None

    def give_up(self, reason: str) -> None:
        """Mark the lost flow run Crashed (force: its process cannot) and give back its GPU slots."""
        fid = self.sub.flow_run_id
        owner = self.store.lease_owner(self.job.run_id)
        if owner is not None and not owner.alive():
            self.dead.add(owner.token)
        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(UUID(fid))
            if fr.state is None or not fr.state.is_final():
                client.set_flow_run_state(UUID(fid), Crashed(message=f"rooflab: run lost: {reason}"), force=True)
        released = release_recorded(record_path(self.job.store_root, self.job.run_id), flow_run_id=fid)
        self.ex.report(f"warning: run {self.job.run_id} (attempt {self.sub.attempt}) lost: {reason}"
                       + (f"; released its {released.slots} slot(s) of {released.limit}" if released else ""))

    def result(self) -> Manifest | None:
        deadline = None if self.ex.timeout_s is None else time.time() + self.ex.timeout_s
        while True:
            with get_client(sync_client=True) as client:
                fr = client.read_flow_run(UUID(self.sub.flow_run_id))
            reason = self.lost(fr)
            if reason is None and deadline is not None and time.time() > deadline:
                reason = f"not finished after {self.ex.timeout_s:.0f} s"
            if reason is not None:
                self.give_up(reason)
                if self.sub.attempt <= self.ex.lost_retries:
                    self.sub = self.ex.start(self.job, self.sub.attempt + 1)
                    deadline = None if self.ex.timeout_s is None else time.time() + self.ex.timeout_s
                    continue
                return self.outcome()
            if fr.state is not None and fr.state.is_final():
                return self.outcome()
            time.sleep(self.ex.poll_s)
