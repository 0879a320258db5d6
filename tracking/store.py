"""The MLflow tracking store rooflab logs to, opened through :class:`TrackingStore` (an explicit client — MLflow's
active run is per thread, so nothing here uses ``mlflow.start_run``), with one experiment per campaign,
``rooflab/<campaign>``. Either

* a folder ``<root>``: a SQLite database ``<root>/mlflow.db`` with artifacts under ``<root>/artifacts`` (one
  machine), or
* a tracking server's URL (``http://host:5000``, what ``--tracking-uri`` / ``--mlruns`` take on a cluster): every
  worker logs through the server (``mlflow server`` with a SQL backend and an artifact root,
  :mod:`cluster.services`), none opens a database file itself; artifacts go where the server puts them.
"""

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


SERVER_SCHEMES = ("http://", "https://")


def is_server(where: Path | str) -> bool:
    """Whether ``where`` names a tracking server (an http(s) URL) rather than a local folder."""
    return str(where).startswith(SERVER_SCHEMES)


def tracking_uri(root: Path | str = Path("mlruns")) -> str:
    """``sqlite:///<absolute root>/mlflow.db`` for a folder; a server's URL as it is."""
    if is_server(root):
        return str(root).rstrip("/")
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def work_root(where: Path | str) -> Path:
    """A local folder for the files a flow writes before logging them (plots, coefficients): ``<root>/work`` for a
    folder store; for a server, ``$ROOFLAB_WORK`` (default: ``rooflab-work`` in the temporary folder) — the files
    that matter are logged to the server as artifacts."""
    if is_server(where):
        import tempfile

        return Path(os.environ.get("ROOFLAB_WORK") or Path(tempfile.gettempdir()) / "rooflab-work")
    return Path(where) / "work"


def artifact_root(root: Path | str = Path("mlruns")) -> Path:
    return Path(root).resolve() / "artifacts"


@dataclass(frozen=True)
class TrackingStore:
    """An MLflow client on rooflab's store under ``root``. Tracking and registry URIs are passed explicitly,
    so ``MLFLOW_TRACKING_URI`` and the global ``mlflow.set_tracking_uri`` do not matter."""

    root: Path | None  # None for a tracking server
    client: MlflowClient
    server: str | None = None  # the tracking server's URL

    @property
    def uri(self) -> str:
        return self.server if self.server is not None else tracking_uri(self.root or Path("mlruns"))


def open_tracking(root: Path | str = Path("mlruns")) -> TrackingStore:
    """The tracking store under ``root`` (created if missing), or the tracking server ``root`` names
    (:func:`is_server`; it must answer). Creating the database (MLflow's schema and its migrations) is not safe
    for two processes at once, so the client is created and made to open its stores under an inter-process lock,
    ``<root>/.lock``: two campaigns starting together on a new ``mlruns/`` both succeed. A server creates its
    database once, itself."""
    if is_server(root):
        uri = tracking_uri(root)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            client.search_experiments(max_results=1)
        except MlflowException as exc:
            raise InputError(uri, None, f"the MLflow tracking server does not answer: {str(exc).splitlines()[0]}") \
                from None
        return TrackingStore(None, client, uri)
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
    if is_server(root):
        return open_tracking(root)
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
        # a server puts artifacts under its own artifact root (proxied: workers need no shared folder)
        location = None if ts.root is None else (artifact_root(ts.root) / _slug(campaign)).as_uri()
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
