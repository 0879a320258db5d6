"""Screenshot the MLflow UI of a rooflab tracking store with headless Chromium.

Starts ``mlflow ui`` on a loopback address (a free port unless given), waits for ``/health``, loads a
campaign's page as :func:`tracking.campaign_runs.experiment_url` links it — the "Model training" layout with
rooflab's saved view: the chart view of the learning curves (``--view charts``, the default), the runs table
(``--view runs``), or the compare-runs view of its iterations (``--view compare``) — in headless Chromium,
writes the PNG and stops the server (process group) whatever happens.

    .venv/bin/python benchmarks/mlflow_screenshot.py --mlruns mlruns --campaign smoke --out shot.png
    .venv/bin/python benchmarks/mlflow_screenshot.py --demo --out /tmp/mlflow_demo.png   # builds a small store

On Linux the server listens on 127.0.0.2 (still loopback): MLflow's UI opens its Assistant panel over a third
of the page on a first visit to ``localhost``/``127.0.0.1``, and a fresh Chromium profile is always a first
visit. ``--host 127.0.0.1`` keeps the plain address.

Needs a Chromium (``apt-get install -y chromium``); exits 2 with a one-line message when none is found.
Run it from the repository root (``--demo`` imports ``tracking.campaign_runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from rooflab.collect.launchers.endpoints import free_port, wait_healthy  # noqa: E402

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUMS) if p), None)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (gunicorn/uvicorn workers too)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def page_url(ts: Any, base: str, campaign: str, experiment_id: str, view: str, run_ids: list[str]) -> str:
    from tracking.campaign_runs import experiment_url

    if view == "compare" and run_ids:
        q = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id]),
                                    "workflowType": "machine_learning"})
        return f"{base}/#/compare-runs?{q}"
    return experiment_url(ts, campaign, base, charts=view == "charts")


def screenshot(chromium: str, url: str, png: Path, *, size=(1600, 1100), budget_ms: int = 15000,
               timeout: float = 120) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
               f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (status {proc.returncode}): {proc.stderr.strip()[-500:]}")


def build_demo_store(root: Path) -> str:
    """A small store like the tests build: one campaign, 4 iterations of a synthetic calibration on a growing
    set of runs (one seed, as a campaign has)."""
    sys.path.insert(0, str(ROOT))
    from rooflab.data.synthetic import synthetic_steps, with_step_times
    from rooflab.fit.calibration import Options, calibrate
    from rooflab.targeting.stop import StopDecision
    from tracking import campaign_runs as track
    from tracking.store import open_tracking

    steps = with_step_times(synthetic_steps(8, 200))
    steps["split"] = "train"
    steps.loc[steps.run_id.isin(["run06", "run07"]), "split"] = "validation"
    c = open_tracking(root)
    parent = track.start_campaign(c, "demo", params={"budget_gpu_hours": 9.5, "hardware": "H100-SXM"})
    n_it = 4
    for it in range(n_it):
        runs = [f"run{r:02d}" for r in range(it + 3)] + ["run06", "run07"]
        calib = calibrate(steps[steps.run_id.isin(runs)], None, Options(n_boot=20, seed=0),
                          plots_dir=root / "plots" / str(it))
        track.log_iteration(c, parent, it, calib, picks=[], gpu_seconds=1800.0 * (it + 1),
                            stop=StopDecision(it == n_it - 1, "demo", {}), artifacts_dir=root / "local_artifacts")
    track.finish_campaign(c, parent, stop_reason="demo finished", summary={"iterations": n_it})
    return "demo"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mlruns", type=Path, default=Path("mlruns"), help="tracking store folder (mlflow.db)")
    ap.add_argument("--campaign", help="campaign name (experiment rooflab/<campaign>); default: the first one")
    ap.add_argument("--view", choices=("charts", "runs", "compare"), default="charts",
                    help="charts: the parent run's learning curves; runs: the runs table; compare: the iterations")
    ap.add_argument("--out", type=Path, default=Path("mlflow_ui.png"))
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    ap.add_argument("--host", default="127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1",
                    help="loopback address of the server (127.0.0.2 on Linux: no Assistant panel)")
    ap.add_argument("--budget-ms", type=int, default=60000,
                    help="Chromium virtual-time budget for the page's JS (the chart view needs ~60 s to draw)")
    ap.add_argument("--demo", action="store_true", help="build a small demo store in a temporary folder first")
    args = ap.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print("error: no Chromium found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    tmp = None
    if args.demo:
        tmp = tempfile.TemporaryDirectory(prefix="rooflab-mlflow-demo-")
        args.mlruns = Path(tmp.name) / "mlruns"
        args.campaign = build_demo_store(args.mlruns)
    t_store = time.monotonic()
    db = args.mlruns.resolve() / "mlflow.db"
    if not db.is_file():
        print(f"error: {args.mlruns}: no MLflow store here (expected mlflow.db)", file=sys.stderr)
        return 2
    uri = f"sqlite:///{db}"

    sys.path.insert(0, str(ROOT))
    from tracking.store import open_tracking

    ts = open_tracking(args.mlruns)
    client = ts.client
    exps = [e for e in client.search_experiments(filter_string="name LIKE 'rooflab/%'")
            if args.campaign is None or e.name == f"rooflab/{args.campaign}"]
    if not exps:
        print(f"error: no rooflab campaign {args.campaign or ''} in {uri}".replace("  ", " "), file=sys.stderr)
        return 2
    exp = exps[0]
    run_ids = [r.info.run_id for r in client.search_runs([exp.experiment_id],
                                                         filter_string="tags.`rooflab.role` = 'iteration'")]
    port = args.port or free_port()
    base = f"http://{args.host}:{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                             "--host", args.host, "--port", str(port),
                             "--allowed-hosts", f"{args.host},{args.host}:{port},localhost,127.0.0.1",
                             "--cors-allowed-origins", base],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(base, proc, 90, "mlflow ui")
        t_up = time.monotonic()
        url = page_url(ts, base, exp.name.removeprefix("rooflab/"), exp.experiment_id, args.view, run_ids)
        screenshot(chromium, url, args.out, budget_ms=args.budget_ms)
        t_shot = time.monotonic()
    except Exception as exc:
        log.seek(0)
        tail = log.read().decode(errors="replace")[-1500:]
        print(f"error: {exc}\n--- mlflow ui output ---\n{tail}", file=sys.stderr)
        return 1
    finally:
        stop(proc)
        log.close()
        if tmp is not None:
            tmp.cleanup()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) of {url}")
    print(f"timings: store {t_store - t0:.1f} s, server up {t_up - t_store:.1f} s, screenshot {t_shot - t_up:.1f} s, "
          f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
