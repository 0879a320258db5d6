"""``rooflab tracking-server``: the MLflow tracking server a cluster's workers log to (``mlflow server`` with a SQL
backend and an artifact root it serves itself), started and watched by :mod:`cluster.services`. Give its URL to
``rooflab serve --tracking-uri`` / ``rooflab campaign --tracking-uri``."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from cli.app import app, check_range, check_writable_folder
from rooflab.errors import InputError


@app.command("tracking-server")
def tracking_server(
    backend: str = typer.Option("sqlite:///mlflow-server/mlflow.db", help="SQL backend store: sqlite:///PATH or "
                                "postgresql://USER:PASSWORD@HOST/DB (the database is created by the server, once)"),
    artifacts: Path = typer.Option(Path("mlflow-server/artifacts"), help="the artifact root the server writes "
                                   "(clients upload through the server: no shared folder needed)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0: reachable by other machines)"),
    port: int = typer.Option(5000, help="port (1-65535)"),
    workers: int = typer.Option(2, help="server worker processes (1-64)"),
    db_pool: int = typer.Option(50, help="database connections per server worker (1-1000; MLflow's own default, 5 "
                                "+ 10 overflow, failed 64 of 100 concurrent clients in benchmarks/scale_model.py)"),
    timeout_s: float = typer.Option(120.0, help="how long to wait for the server to answer /health"),
):
    """Run an MLflow tracking server until interrupted (Ctrl-C stops it)."""
    check_range(port, "--port", 1, 65535)
    check_range(workers, "--workers", 1, 64)
    check_range(db_pool, "--db-pool", 1, 1000)
    if not backend.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+", "mssql")):
        raise InputError(None, "--backend",
                         f"expected a SQL database URI (sqlite:///…, postgresql://…), got {backend!r}")
    if backend.startswith("sqlite:///"):
        db = Path(backend.removeprefix("sqlite:///"))
        check_writable_folder(db.parent, "--backend")
        db.parent.mkdir(parents=True, exist_ok=True)
    check_writable_folder(artifacts, "--artifacts")
    from cluster.services import start_mlflow_server

    svc = start_mlflow_server(backend, artifacts, port=port, host=host, workers=workers, timeout_s=timeout_s,
                              log=artifacts.parent / "mlflow-server.log", db_pool=db_pool)
    print(f"MLflow tracking server at {svc.url} (backend {backend}, artifacts {artifacts.resolve()}, log {svc.log})")
    print(f"log to it:  rooflab campaign --tracking-uri {svc.url} ...   |   rooflab serve --tracking-uri {svc.url} ...")
    try:
        while svc.alive:
            time.sleep(1.0)
        raise InputError(str(svc.log), None, f"the MLflow server exited with status {svc.proc.returncode}: "
                         f"{svc.last_line()}")
    except KeyboardInterrupt:
        print("stopping the MLflow server")
    finally:
        svc.stop()
