"""A scale model on paper (issue 19): how long a 99-run and a 1,000-run campaign take on N GPUs, and where the
bottleneck moves, from per-run overheads **measured here** (no GPU, no cluster: a 2-core machine):

* scheduling — a run as a flow run of ``rooflab-run/<pool>`` on a real Prefect server with one process worker:
  the submission call, creation → Running (the worker's poll and the process start), and the flow run's time
  beyond the launcher's own (imports, store lease, GPU slots, manifest);
* ingestion — reading a 120 s run's OTEL trace (the twin's, written in the instrumented-vLLM format) into step
  and request tables, and the store's manifest write (tables, checksums);
* fitting — one calibration from the store as a function of the runs it fits (the loop's default bootstrap);
* tracking — a real ``mlflow server`` (SQLite backend, served artifacts) under 100 clients logging at once, each
  what one campaign iteration logs (a child run, ~60 metrics, ~20 params, tags, one small artifact).

What is **assumed**, not measured (printed with the table): each run's GPU time (its sweep point's duration, 120 s
by default), and the vLLM server's start per run on a cluster (image pull + weight load), ``--server-start-s``.

    .venv/bin/python benchmarks/scale_model.py            # ~3-4 min on 2 cores; --quick skips the servers
"""

from __future__ import annotations

import argparse
import contextvars
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAMPAIGN = """
name: scale
hardware: H100-SXM
models:
  - {model: llama-3.1-8b, tp: [1, 2]}
validation: {models: [{model: qwen2.5-7b, tp: 1}], points: [{family: W3, rate: 8}]}
families:
  W1: {input_tokens: [1024, 4096], output_tokens: 1, rate: 1}
  W3: {rate: [8, 32], input_tokens: 256, output_tokens: 256}
duration_s: 120
engine: {max_model_len: 8192}
collection: {concurrency: 4, max_retries: 1, timeout_s: 600}
endpoint: {kind: twin, accel: 10}
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


# ------------------------------------------------------------------------------------------ measurements
def measure_ingest_and_fit(work: Path) -> dict:
    from rooflab.collect.collector import run_one
    from rooflab.collect.launchers.direct import DirectLauncher
    from rooflab.collect.spec import load_campaign
    from rooflab.data.adapters.otel import read_otel_traces
    from rooflab.data.store import Store
    from rooflab.data.sweep import run_id
    from rooflab.fit.calibration import Options, calibrate

    camp = load_campaign(work / "scale.yaml")
    st = Store(work / "store")
    points = [p for p in camp.candidates() if p.split == "train"]
    finish, ingest, steps_per_run = [], [], []
    for p in points:
        traced = p.family == "W3"  # the busy runs: a trace to ingest (writing one costs ~0.3 ms a step)
        rid = run_id(camp.name, p, 0)
        t = time.perf_counter()
        m = run_one(st, DirectLauncher(traces=traced), camp.name, rid, p, 0, max_retries=1)
        finish.append(time.perf_counter() - t)
        assert m is not None and m["status"] in ("ok", "saturated"), m
        if traced:
            trace = st.run_dir(rid).path / "traces" / "traces.jsonl"
            t = time.perf_counter()
            tables = read_otel_traces(trace, run_id=rid, model=p.model, tp=p.tp, hardware=p.hardware)
            ingest.append(time.perf_counter() - t)
            steps_per_run.append(len(tables.steps))
    # fitting: the loop's defaults (n_boot 100) on growing subsets of the runs
    ids = list(st.runs(campaign=camp.name, statuses=("ok",))["run_id"])
    fit = {}
    for n in sorted({min(len(ids), k) for k in (3, len(ids))}):
        steps = st.steps(campaign=camp.name, statuses=("ok",), run_id=ids[:n])
        took = []
        for _ in range(2):  # the faster of two (the first call also pays imports)
            t = time.perf_counter()
            calibrate(steps, None, Options(n_boot=100))
            took.append(time.perf_counter() - t)
        fit[n] = min(took)
    return {"runs": len(points), "ingest_s": statistics.median(ingest), "ingest_p90_s": pct(ingest, 0.9),
            "steps_per_run": statistics.median(steps_per_run), "collect_and_store_s": statistics.median(finish),
            "fit_s_by_runs": fit}


def measure_scheduling(work: Path, n_runs: int) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cluster.services import start_prefect_server, start_worker
    from flows.deployments import deploy_to_pool
    from flows.gpu_slots import set_gpus
    from flows.pool_executor import PoolExecutor
    from flows.work_pool import ensure_pool
    from rooflab.collect.collector import RunJob
    from rooflab.collect.spec import load_campaign
    from rooflab.data.store import Store
    from rooflab.data.sweep import run_id

    t0 = time.perf_counter()
    srv = start_prefect_server(work / "prefect", timeout_s=180)
    services = [srv]
    try:
        server_up = time.perf_counter() - t0
        with temporary_settings(updates={PREFECT_API_URL: srv.url}):
            ensure_pool("scale", "process")
            set_gpus("H100-SXM", 64)
            deploy_to_pool(str(work / "scale.yaml"), "scale", store=str(work / "store-pool"),
                           mlruns=str(work / "mlruns"), launcher="direct", triggers=False)
            t1 = time.perf_counter()
            services.append(start_worker("scale", "w1", srv.url, work / "prefect", limit=2,
                                         env={"PREFECT_WORKER_QUERY_SECONDS": "1"}))
            worker_up = time.perf_counter() - t1
            camp = load_campaign(work / "scale.yaml")
            pts = [p for p in camp.candidates() if p.family == "W1"][:n_runs]
            ex = PoolExecutor("scale", str(work / "scale.yaml"), "direct", poll_s=0.2)
            submit = []
            for p in pts:  # one at a time: the latency of a run, not the queue behind the worker's limit
                job = RunJob(str(work / "store-pool"), None, camp.name, run_id(camp.name, p, 0), p, 0, 1)  # type: ignore[arg-type]
                t = time.perf_counter()
                handle = ex.submit(job)
                submit.append(time.perf_counter() - t)
                handle.result()
            st = Store(work / "store-pool")
            lat, extra, launcher = [], [], []
            with get_client(sync_client=True) as client:
                for sub in ex.submissions:
                    from uuid import UUID

                    fr = client.read_flow_run(UUID(sub.flow_run_id))
                    m = st.manifest(sub.run_id)
                    lat.append((fr.start_time - fr.created).total_seconds())
                    run_s = (fr.end_time - fr.start_time).total_seconds()
                    from datetime import datetime

                    ls = (datetime.fromisoformat(m["ended_at"])
                          - datetime.fromisoformat(m["started_at"])).total_seconds()
                    launcher.append(ls)
                    extra.append(run_s - ls)
    finally:
        for s in reversed(services):
            s.stop()
    return {"runs": len(pts), "server_start_s": server_up, "worker_start_s": worker_up,
            "submit_s": statistics.median(submit), "to_running_s": statistics.median(lat),
            "to_running_p90_s": pct(lat, 0.9), "flow_overhead_s": statistics.median(extra),
            "launcher_s": statistics.median(launcher)}


def measure_tracking(work: Path, clients: int, workers: int, db_pool: int | None = None) -> dict:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from cluster.services import start_mlflow_server

    t0 = time.perf_counter()
    ml = start_mlflow_server(f"sqlite:///{work}/mlflow/mlflow.db", work / "mlflow" / "artifacts", workers=workers,
                             timeout_s=180, db_pool=db_pool)
    up = time.perf_counter() - t0
    try:
        c = MlflowClient(tracking_uri=ml.url)
        exp = c.create_experiment("scale")
        parent = c.create_run(exp).info.run_id
        art = work / "coefficients.json"
        art.write_text(json.dumps({f"beta{i}": 1.0 + i / 10 for i in range(10)}))
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def log_iteration(client: MlflowClient, i: int) -> float:
            t = time.perf_counter()
            run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "rooflab.iteration": str(i)}).info.run_id
            now = int(time.time() * 1000)
            client.log_batch(run, metrics=[Metric(f"m{k}", float(k), now, 0) for k in range(60)],
                             params=[Param(f"p{k}", str(k)) for k in range(20)],
                             tags=[RunTag(f"t{k}", "x") for k in range(5)])
            client.log_artifact(run, str(art))
            client.set_terminated(run)
            return time.perf_counter() - t

        alone = [log_iteration(c, -1 - i) for i in range(5)]  # uncontended: one campaign's iteration
        start = threading.Barrier(clients)

        def one(i: int) -> None:
            client = MlflowClient(tracking_uri=ml.url)  # its own connections, as a separate process would have
            try:
                start.wait(60)
                took = log_iteration(client, i)
                with lock:
                    lat.append(took)
            except Exception as exc:  # counted, not hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")

        ths = [threading.Thread(target=contextvars.copy_context().run, args=(one, i)) for i in range(clients)]
        t1 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join(300)
        wall = time.perf_counter() - t1
    finally:
        ml.stop()
    return {"alone_s": statistics.median(alone), "clients": clients, "server_workers": workers, "db_pool": db_pool,
            "server_start_s": up,
            "wall_s": wall,
            "iterations_per_s": len(lat) / wall if wall else 0.0, "p50_s": statistics.median(lat) if lat else None,
            "p95_s": pct(lat, 0.95) if lat else None, "errors": len(errors), "first_error": errors[:1]}


# ------------------------------------------------------------------------------------------ the model
def makespan(tps: list[int], gpus: int, run_s: float) -> float:
    """Greedy list scheduling of equal-length runs needing ``tp`` GPUs each on ``gpus`` GPUs (what the GPU-slot
    limits do: a run starts when its slots are free)."""
    import heapq

    free_at = [0.0] * gpus  # when each GPU frees
    end = 0.0
    for tp in sorted(tps, reverse=True):
        heapq.heapify(free_at)
        taken = [heapq.heappop(free_at) for _ in range(tp)]
        start = max(taken)
        for _ in taken:
            heapq.heappush(free_at, start + run_s)
        end = max(end, start + run_s)
    return end


def model(m: dict, n_runs: int, gpus: int, batch: int, run_gpu_s: float, server_start_s: float) -> dict:
    tps = [1, 1, 2, 2, 4, 8]  # the static design's mix of TP degrees, cycled
    per_run_overhead = m["sched"]["to_running_s"] + m["sched"]["flow_overhead_s"] + m["ingest"]["ingest_s"]
    fit = m["ingest"]["fit_s_by_runs"]
    ks = sorted(fit)
    slope = (fit[ks[-1]] - fit[ks[0]]) / max(1, ks[-1] - ks[0])
    iters = math.ceil(n_runs / batch)
    gpu_wall = overhead_wall = fit_wall = track_wall = submit_wall = 0.0
    done = 0
    for _ in range(iters):
        n = min(batch, n_runs - done)
        done += n
        run_s = run_gpu_s + server_start_s + per_run_overhead
        wall = makespan([tps[k % len(tps)] for k in range(n)], gpus, run_s)
        share = (run_gpu_s + server_start_s) / run_s
        gpu_wall += wall * share
        overhead_wall += wall * (1 - share)
        submit_wall += n * m["sched"]["submit_s"]
        fit_wall += fit[ks[0]] + slope * (done - ks[0])
        track_wall += m["track"]["alone_s"]  # one campaign logs one iteration at a time
    total = gpu_wall + overhead_wall + fit_wall + track_wall + submit_wall
    parts = {"GPU (runs + server starts)": gpu_wall, "per-run overhead": overhead_wall, "fitting": fit_wall,
             "tracking": track_wall, "submission": submit_wall}
    return {"runs": n_runs, "gpus": gpus, "iterations": iters, "hours": total / 3600,
            "bottleneck": max(parts, key=lambda k: parts[k]),
            "shares": {k: v / total for k, v in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4, help="pool runs to time (scheduling), one after the other")
    ap.add_argument("--clients", type=int, default=100, help="concurrent MLflow clients")
    ap.add_argument("--server-workers", type=int, default=2, help="mlflow server worker processes")
    ap.add_argument("--db-pool", type=int, default=60, help="mlflow server: database connections per worker, as "
                    "rooflab tracking-server sets them (0: MLflow's default, 5 + 10 overflow)")
    ap.add_argument("--tracking-only", action="store_true", help="measure only the tracking server")
    ap.add_argument("--run-gpu-s", type=float, default=120.0, help="assumed: a run's GPU time (its duration)")
    ap.add_argument("--server-start-s", type=float, default=120.0,
                    help="assumed: vLLM start per run on a cluster (image pull + weight load)")
    ap.add_argument("--batch", type=int, default=50, help="runs per iteration of the 1,000-run campaign")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_model.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rooflab-scale-") as tmp:
        work = Path(tmp)
        (work / "scale.yaml").write_text(CAMPAIGN)
        if args.tracking_only:
            k = measure_tracking(work, args.clients, args.server_workers, args.db_pool or None)
            print(json.dumps(k, indent=1))
            return
        t = time.perf_counter()
        m = {"ingest": measure_ingest_and_fit(work)}
        print(f"ingestion + fitting measured in {time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
        m["sched"] = measure_scheduling(work, args.runs)
        print(f"scheduling measured in {time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
        m["track"] = measure_tracking(work, args.clients, args.server_workers, args.db_pool or None)
        print(f"tracking measured in {time.perf_counter() - t:.0f} s", flush=True)
    i, s, k = m["ingest"], m["sched"], m["track"]
    print("\nmeasured per-run overheads (this machine: 2 cores, shared)")
    print(f"  scheduling  submit {s['submit_s']:.2f} s; created -> running {s['to_running_s']:.1f} s (p90 "
          f"{s['to_running_p90_s']:.1f}); flow run beyond the launcher {s['flow_overhead_s']:.1f} s "
          f"({s['runs']} runs; server up in {s['server_start_s']:.0f} s, worker {s['worker_start_s']:.0f} s)")
    print(f"  ingestion   a 120 s run's OTEL trace ({i['steps_per_run']:.0f} steps) -> tables {i['ingest_s']:.2f} s "
          f"(p90 {i['ingest_p90_s']:.2f}); simulate (+ write the trace) + store a run {i['collect_and_store_s']:.2f} s")
    print("  fitting     " + ", ".join(f"{n} runs {v:.1f} s" for n, v in i["fit_s_by_runs"].items())
          + " (n_boot 100)")
    print(f"  tracking    one iteration's log (alone) {k['alone_s']:.2f} s; "
          f"{k['clients']} concurrent iteration logs to mlflow server ({k['server_workers']} workers, "
          f"SQLite, db pool {k['db_pool'] or 'default'}): {k['wall_s']:.1f} s wall, {k['iterations_per_s']:.1f}/s, "
          f"p50 {k['p50_s']:.2f} s, p95 {k['p95_s']:.2f} s, errors {k['errors']}"
          + (f" ({k['first_error'][0]})" if k["errors"] else ""))
    print(f"\nassumed: GPU time per run {args.run_gpu_s:g} s; vLLM start per run {args.server_start_s:g} s; "
          f"TP mix 1,1,2,2,4,8; 1,000-run campaign in iterations of {args.batch}")
    rows = []
    print(f"\n{'runs':>5} {'GPUs':>5} {'iters':>5} {'hours':>7}  bottleneck (share of wall time)")
    for n_runs, batch in ((99, 99), (1000, args.batch)):
        for gpus in (8, 32, 128, 512):
            r = model(m, n_runs, gpus, batch, args.run_gpu_s, args.server_start_s)
            rows.append(r)
            sh = ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["shares"].items(), key=lambda x: -x[1]) if v >= 0.01)
            print(f"{n_runs:>5} {gpus:>5} {r['iterations']:>5} {r['hours']:>7.2f}  {r['bottleneck']}: {sh}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"measured": m, "assumed": {"run_gpu_s": args.run_gpu_s,
                                                               "server_start_s": args.server_start_s,
                                                               "batch": args.batch}, "model": rows}, indent=1,
                                   default=str))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
