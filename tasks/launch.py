"""Launch one sweep point into the data store (launch → ingest → saturation routing → manifest)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from rooflab.collect.collector import run_one
from rooflab.data.store import COMPLETE, Store
from rooflab.data.sweep import SweepPoint, run_id


class TransientRunError(RuntimeError):
    """A run failed for a reason worth retrying (timeout, server exit): Prefect retries the task."""


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except TransientRunError:
        return True
    except Exception:
        return False
    return False


def _emit_data_arrived(manifest: dict) -> None:
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


@task(name="launch-sweep-point", retries=3, retry_delay_seconds=2, retry_condition_fn=_retry_transient,
      cache_policy=NO_CACHE, task_run_name="launch {point.family} {point.model} tp{point.tp}")
def launch_point(store_root: str, launcher, campaign: str, point: SweepPoint, replicate: int = 0,
                 max_retries: int = 2) -> dict:
    """One attempt per task try: a transient failure raises TransientRunError (Prefect retries, up to the
    campaign's max_retries attempts in total); deterministic failures are recorded and returned."""
    store = Store(store_root)
    rid = run_id(campaign, point, replicate)
    if store.status(rid) in COMPLETE:
        return store.manifest(rid)
    before = store.manifest(rid)
    previous = int(before["attempt"]) if before is not None and before["status"] == "failed" else 0
    if previous >= max_retries:
        return before
    manifest = run_one(store, launcher, campaign, rid, point, replicate, max_retries=previous + 1)
    manifest = manifest or store.manifest(rid)
    if manifest["status"] == "failed" and manifest.get("transient") and manifest["attempt"] < max_retries:
        raise TransientRunError(f"{rid}: {manifest['reason']}")
    if manifest["status"] in COMPLETE:
        _emit_data_arrived(manifest)
    return manifest
