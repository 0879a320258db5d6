"""The services a multi-machine campaign talks to, started as local processes with bounded waits: a Prefect server,
Prefect process workers and an MLflow tracking server (``mlflow server`` with a SQL backend and an artifact root).
What ``rooflab tracking-server`` runs, and what the end-to-end test and the scale benchmark start and stop.

Each is a :class:`Service`: its own process group (so stopping it stops its children — a worker's flow-run
processes too), its output in a log file, a health URL polled until it answers or ``timeout_s`` passes (then a
one-line error with the log's last line), and :meth:`Service.stop` (SIGTERM to the group, SIGKILL after a grace).
Nothing here imports Prefect or MLflow: they run as their own commands.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rooflab.errors import InputError


def bin_path(name: str) -> str:
    """A console script of this environment (``prefect``, ``mlflow``), else whatever the PATH has."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    url: str  # where it answers (API root / tracking URI)
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def last_line(self) -> str:
        try:
            lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL to whatever is left after ``grace_s``."""
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # stragglers of the group, even if the leader exited
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once: what losing the machine looks like to everyone else."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)


def wait_healthy(service: Service, health_url: str, timeout_s: float) -> Service:
    """Poll ``health_url`` until it answers 200; a one-line error if the process exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not service.alive:
            raise InputError(str(service.log), None, f"{service.name} exited with status {service.proc.returncode} "
                             f"before answering: {service.last_line()}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as r:
                if r.status == 200:
                    return service
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    service.stop()
    raise InputError(str(service.log), None, f"{service.name} did not answer {health_url} within {timeout_s:.0f} s: "
                     f"{service.last_line()}")


def _spawn(name: str, cmd: list[str], log: Path, env: Mapping[str, str] | None, cwd: Path | None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a Prefect process of this deployment: its own ``PREFECT_HOME``, no telemetry, and the
    server's API when known."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect_server(home: Path, *, port: int | None = None, timeout_s: float = 120.0,
                         env: Mapping[str, str] | None = None) -> Service:
    """``prefect server start`` on 127.0.0.1 with its database under ``home``; ``url`` is its API
    (``http://127.0.0.1:<port>/api``)."""
    port = port or free_port()
    cmd = [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**prefect_env(home), "PREFECT_UI_ENABLED": "false", **(env or {})}
    proc = _spawn("prefect server", cmd, home / "server.log", full_env, None)
    svc = Service("prefect server", proc, f"http://127.0.0.1:{port}/api", home / "server.log")
    return wait_healthy(svc, f"{svc.url}/health", timeout_s)


def start_worker(pool: str, name: str, api_url: str, home: Path, *, limit: int | None = None,
                 timeout_s: float = 90.0, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Service:
    """``prefect worker start --pool <pool> --type process`` with its health check on a free local port."""
    port = free_port()
    cmd = [bin_path("prefect"), "worker", "start", "--pool", pool, "--name", name, "--type", "process",
           "--with-healthcheck"] + (["--limit", str(limit)] if limit else [])
    full_env = {**prefect_env(home, api_url), "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                "PREFECT_WORKER_WEBSERVER_PORT": str(port), **(env or {})}
    log = home / f"worker-{name}.log"
    svc = Service(f"worker {name}", _spawn(f"worker {name}", cmd, log, full_env, cwd), api_url, log)
    return wait_healthy(svc, f"http://127.0.0.1:{port}/health", timeout_s)


def start_mlflow_server(backend_uri: str, artifacts: Path, *, port: int | None = None, host: str = "127.0.0.1",
                        workers: int = 1, timeout_s: float = 90.0, log: Path | None = None,
                        db_pool: int | None = None) -> Service:
    """``mlflow server`` with a SQL backend (``sqlite:///…/mlflow.db``, ``postgresql://…``) and an artifact root it
    serves itself (``--serve-artifacts``: clients upload through it and need no shared folder). ``url`` is the
    tracking URI to give ``--tracking-uri`` / ``--mlruns``. ``db_pool``: database connections per server worker
    (MLflow's default is 5, plus 10 overflow; a request waits 30 s for one, then fails)."""
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [bin_path("mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
           str(artifacts.resolve()), "--serve-artifacts", "--host", host, "--port", str(port), "--workers",
           str(workers)]
    log = log or artifacts.parent / "mlflow-server.log"
    env = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(db_pool), "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(db_pool)} \
        if db_pool else None
    svc = Service("mlflow server", _spawn("mlflow server", cmd, log, env, None), f"http://{host}:{port}", log)
    return wait_healthy(svc, f"{svc.url}/health", timeout_s)
