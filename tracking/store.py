"""The MLflow tracking store rooflab logs to: a SQLite database ``<root>/mlflow.db`` with artifacts under
``<root>/artifacts``, opened through :class:`TrackingStore` (an explicit client and its root — MLflow's active
run is per thread, so nothing here uses ``mlflow.start_run``), and one experiment per campaign,
``rooflab/<campaign>``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Experiment, Run, ViewType
from mlflow.exceptions import MlflowException

from rooflab.data.locks import file_lock
from rooflab.errors import InputError

EXPERIMENT_PREFIX = "rooflab/"
ROLE = "rooflab.role"
ITERATION = "rooflab.iteration"
CAMPAIGN = "rooflab.campaign"
STOP_REASON = "rooflab.stop_reason"
HEALTH = "rooflab.health"


def tracking_uri(root: Path | str = Path("mlruns")) -> str:
    """``sqlite:///<absolute root>/mlflow.db``."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_root(root: Path | str = Path("mlruns")) -> Path:
    return Path(root).resolve() / "artifacts"


@dataclass(frozen=True)
class TrackingStore:
    """An MLflow client on rooflab's store under ``root``. Tracking and registry URIs are passed explicitly,
    so ``MLFLOW_TRACKING_URI`` and the global ``mlflow.set_tracking_uri`` do not matter."""

    root: Path
    client: MlflowClient

    @property
    def uri(self) -> str:
        return tracking_uri(self.root)


def open_tracking(root: Path | str = Path("mlruns")) -> TrackingStore:
    """The tracking store under ``root`` (created if missing). Creating the database (MLflow's schema and its
    migrations) is not safe for two processes at once, so the client is created and made to open its stores under
    an inter-process lock, ``<root>/.lock``: two campaigns starting together on a new ``mlruns/`` both succeed."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    artifact_root(root).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(root)
    if (root / "mlflow.db").is_file() and not os.access(root, os.W_OK):  # read-only (rooflab compare): no lock
        return TrackingStore(root, MlflowClient(tracking_uri=uri, registry_uri=uri))
    with file_lock(root / ".lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # may open the store (and create it) at once
        client.search_experiments(max_results=1)  # forces the tracking store (schema creation, migrations)
        client.search_registered_models(max_results=1)  # and the model registry's, on the same database
    return TrackingStore(root, client)


def existing_tracking(root: Path | str) -> TrackingStore:
    """The tracking store under ``root``, which must exist (a one-line error otherwise)."""
    root = Path(root)
    if not (root / "mlflow.db").is_file():
        raise InputError(root, None, "no MLflow store here (expected mlflow.db; run a campaign first)")
    return open_tracking(root)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "campaign"


def experiment_name(campaign: str) -> str:
    return f"{EXPERIMENT_PREFIX}{campaign}"


def experiment(ts: TrackingStore, campaign: str, create: bool = True) -> Experiment | None:
    """The campaign's experiment (restored if deleted; created when ``create``)."""
    c = ts.client
    name = experiment_name(campaign)
    exp = c.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
        exp = c.get_experiment(exp.experiment_id)
    if exp is None and create:
        location = (artifact_root(ts.root) / _slug(campaign)).as_uri()
        try:
            c.create_experiment(name, artifact_location=location, tags={
                CAMPAIGN: campaign,
                "mlflow.experimentKind": "custom_model_development",  # the UI's "model training" layout
                "mlflow.note.content": f"rooflab campaign {campaign}: the parent run is the campaign, each "
                                       "child run one iteration (fit, health, residuals, next points)."})
        except MlflowException:  # created concurrently
            pass
        exp = c.get_experiment_by_name(name)
    return exp


def search_all(ts: TrackingStore, experiment_ids: list[str], filter_string: str,
               order_by: list[str] | None = None) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = ts.client.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                     max_results=1000, order_by=order_by, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs
