"""Collection as Prefect tasks: each run of an iteration is a task (visible in the Prefect UI), submitted by the
collector through :class:`PrefectExecutor`. The collector (``rooflab.collect.collector``) owns retries and
concurrency; these tasks have no Prefect retries of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from rooflab.collect.collector import (
    Launcher,
    Manifest,
    Progress,
    RunExecutor,
    RunJob,
    collect,
    execute,
)
from rooflab.collect.launchers.factory import make_launcher
from rooflab.collect.spec import Campaign
from rooflab.data.store import COMPLETE, Store
from rooflab.data.sweep import SweepPoint


def emit_data_arrived(manifest: Manifest) -> None:
    """Tell Prefect's event system that a run landed (the refit deployment listens for this)."""
    try:
        from prefect.events import emit_event

        emit_event(event="rooflab.data.arrived",
                   resource={"prefect.resource.id": f"rooflab.run.{manifest['run_id']}",
                             "rooflab.campaign": manifest["campaign"]},
                   payload={"campaign": manifest["campaign"], "run_id": manifest["run_id"],
                            "status": manifest["status"], "model": manifest["model"], "tp": manifest["tp"]})
    except Exception:  # events are best effort; the data is already safe in the store
        pass


@task(name="launch-run", cache_policy=NO_CACHE,
      task_run_name="launch {job.point.family} {job.point.model} tp{job.point.tp} r{job.replicate}")
def launch_run(job: RunJob) -> Manifest | None:
    """One run, with the collector's retries: launch → ingest → saturation routing → manifest."""
    manifest = execute(job)
    if manifest is not None and manifest["status"] in COMPLETE:
        emit_data_arrived(manifest)
    return manifest


def build_launcher(campaign: Campaign, kind: str, workdir: str | Path) -> Launcher:
    """The launcher ``kind`` for ``campaign``: the core's (``direct``, ``inference-perf``) or ``kubernetes`` (a vLLM
    Deployment + Service and an inference-perf Job per run, :mod:`cluster.k8s_launcher`)."""
    if kind == "kubernetes":
        from cluster.k8s_launcher import kubernetes_launcher

        return kubernetes_launcher(campaign)
    return make_launcher(campaign, kind, workdir)


class PrefectExecutor:
    """Submits each run as a :func:`launch_run` task of the running flow."""

    def submit(self, job: RunJob) -> PrefectFuture[Any]:
        return launch_run.submit(job)


def collect_points(store: Store, launcher: Launcher, campaign: str, points: list[SweepPoint], *, concurrency: int,
                   max_retries: int, replicates: int = 1, executor: RunExecutor | None = None) -> Progress:
    """Collect ``points`` inside a flow: the collector's policy, one Prefect task per run (or, with
    ``executor``, wherever it sends them: a work pool, :mod:`flows.pool_executor`)."""
    return collect(store, launcher, campaign, points, replicates=replicates, concurrency=concurrency,
                   max_retries=max_retries, executor=executor or PrefectExecutor())
