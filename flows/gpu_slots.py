"""GPU slots: a campaign cannot start more runs than the cluster has GPUs of the right kind. Each kind of GPU is a
Prefect global concurrency limit named ``gpu:<hardware>`` (``gpu:H100-SXM``) whose limit is the number of such GPUs;
a run holds ``tp`` slots of it for as long as it runs (:func:`gpu_slots`), so a TP-8 run waits for eight free GPUs.

Slots come back on every ending of a run:

* normally, and on an exception or a graceful cancellation, by the ``finally`` of :func:`gpu_slots`;
* when the run's process dies without a ``finally`` (SIGKILL, a node lost), by the campaign that submitted it: the
  run records its slot lease in the data store (``slots/<run_id>.json``, :class:`SlotLease`) and the campaign,
  seeing the run's store lease go stale, releases that lease (:func:`release_recorded`);
* and if nobody does, by the Prefect server itself: the holder renews its slot lease every 0.75 × ``lease_s``
  (Prefect's minimum is 60 s) and the server's repossessor service revokes a lease that was not renewed in time.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.concurrency._sync import acquire_concurrency_slots_with_lease, release_concurrency_slots_with_lease
from prefect.exceptions import ObjectNotFound

from rooflab.errors import InputError
from rooflab.files import atomic_write_bytes

GPU_PREFIX = "gpu:"
LEASE_S = 60.0  # the shortest slot lease Prefect's server accepts


def limit_name(hardware: str) -> str:
    """The global concurrency limit of one kind of GPU: ``gpu:<hardware>``."""
    return f"{GPU_PREFIX}{hardware}"


def set_gpus(hardware: str, gpus: int) -> str:
    """Create or update ``gpu:<hardware>`` with ``gpus`` slots (``prefect gcl create gpu:H100-SXM --limit 16`` does
    the same). Returns the limit's name."""
    if gpus < 1:
        raise InputError(None, "--gpus", f"{hardware}: the number of GPUs must be >= 1 (got {gpus})")
    name = limit_name(hardware)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, gpus)
    return name


def gpus_of(hardware: str) -> int | None:
    """The slots of ``gpu:<hardware>`` on the Prefect server, None when there is no such limit."""
    with get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(limit_name(hardware)).limit)
        except ObjectNotFound:
            return None


def active_slots(name: str) -> int:
    """Slots of limit ``name`` held now (the server's count)."""
    with get_client(sync_client=True) as client:
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


def check_fits(hardware: str, tp: int) -> None:
    """A run of ``tp`` GPUs can ever start: ``gpu:<hardware>`` exists and has at least ``tp`` slots (one line
    otherwise, before anything is submitted: a run that waits for more GPUs than exist would wait forever)."""
    gpus = gpus_of(hardware)
    if gpus is None:
        raise InputError(None, limit_name(hardware), f"no such global concurrency limit on the Prefect server; create "
                         f"it with the cluster's number of {hardware} GPUs: rooflab serve --gpus {hardware}=N (or "
                         f"prefect gcl create {limit_name(hardware)} --limit N)")
    if tp > gpus:
        raise InputError(None, limit_name(hardware), f"a TP-{tp} run needs {tp} GPUs but the limit has {gpus}")


@dataclass(frozen=True)
class SlotLease:
    """What a run records while it holds GPU slots, so that someone else can give them back if it dies."""

    lease_id: str
    limit: str
    slots: int
    flow_run_id: str | None
    pid: int
    host: str
    acquired_at: str

    @classmethod
    def read(cls, path: Path) -> SlotLease | None:
        try:
            doc = json.loads(path.read_text())
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None


def record_path(store_root: str | Path, run_id: str) -> Path:
    """Where a run records its slot lease: ``<store>/slots/<run_id>.json`` (outside the run's folder, which the
    store clears when the run begins)."""
    return Path(store_root) / "slots" / f"{run_id}.json"


@contextmanager
def gpu_slots(limit: str, slots: int, record: Path, *, flow_run_id: str | None = None, lease_s: float = LEASE_S,
              timeout_s: float | None = None) -> Iterator[SlotLease]:
    """Hold ``slots`` slots of ``limit`` for the block: wait for them (at most ``timeout_s``), record the lease in
    ``record``, keep it renewed, and release it (and remove the record) however the block ends."""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)) if flow_run_id else None
    got = acquire_concurrency_slots_with_lease([limit], slots, timeout_seconds=timeout_s, lease_duration=lease_s,
                                               strict=True, holder=holder)
    lease = SlotLease(str(got.lease_id), limit, slots, flow_run_id, os.getpid(), socket.gethostname(),
                      datetime.now(UTC).isoformat())
    try:
        atomic_write_bytes(record, json.dumps(asdict(lease), indent=1).encode())
        with maintain_concurrency_lease(got.lease_id, lease_s, raise_on_lease_renewal_failure=False):
            yield lease
    finally:
        try:
            release_concurrency_slots_with_lease(got.lease_id)
        finally:
            record.unlink(missing_ok=True)


def release_recorded(record: Path, *, flow_run_id: str | None = None) -> SlotLease | None:
    """Give back the slots a dead run recorded in ``record`` (only the lease of flow run ``flow_run_id`` when
    given: a newer attempt's lease is left alone). Returns the lease released, None if there was none."""
    lease = SlotLease.read(record)
    if lease is None or (flow_run_id is not None and lease.flow_run_id != flow_run_id):
        return None
    with get_client(sync_client=True) as client:
        try:
            client.release_concurrency_slots_with_lease(UUID(lease.lease_id))
        except ObjectNotFound:  # already revoked (expired) or released
            pass
    record.unlink(missing_ok=True)
    return lease
