"""Prefect's test harness with a bounded exit.

``prefect.testing.utilities.prefect_test_harness`` (Prefect 3.8.8) drains its log and event workers before it
stops the temporary server, and that drain has no timeout: on this 2-core machine it once waited forever after
``tests/test_refit_registry.py`` had passed (the log worker's last batch never acknowledged). Here the drain gets
``DRAIN_TIMEOUT_S``; what it has not delivered by then is logs and events of tests that already finished.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import prefect.testing.utilities as harness_module
from prefect.testing.utilities import prefect_test_harness

DRAIN_TIMEOUT_S = 60.0


@contextmanager
def bounded_prefect_harness(home: Path, startup_timeout_s: int = 120) -> Iterator[None]:
    """``prefect_test_harness`` with ``PREFECT_HOME`` at ``home`` and a drain on exit bounded by DRAIN_TIMEOUT_S."""
    os.environ["PREFECT_HOME"] = str(home)
    unbounded = harness_module.run_coro_as_sync

    def bounded(coro, *args, **kwargs):  # type: ignore[no-untyped-def]
        async def guarded():  # type: ignore[no-untyped-def]
            try:
                return await asyncio.wait_for(coro, DRAIN_TIMEOUT_S)
            except TimeoutError:
                warnings.warn(f"Prefect's log/event drain gave up after {DRAIN_TIMEOUT_S:g} s", stacklevel=1)
                return None
        return unbounded(guarded(), *args, **kwargs)

    with mock.patch.object(harness_module, "run_coro_as_sync", bounded):
        with prefect_test_harness(server_startup_timeout=startup_timeout_s):
            yield


def drain_prefect_clients(timeout_s: float = 30.0) -> None:
    """Deliver what this process's Prefect log and event workers still hold, while their server is up, waiting at
    most ``timeout_s`` each. A test that stops a Prefect server must call it first: items left for a server that is
    gone make the workers' drain at interpreter exit retry for hours, and pytest never exits."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout_s)
        except RuntimeError:  # never started in this process
            pass
