"""Real components (issue 19): a real ``prefect server``, a real ``mlflow server`` (SQLite backend, served artifact
root) and two real process workers, all started and stopped here on 127.0.0.1 with bounded waits.

1. GPU slots hold runs back: a TP-2 holder of a 2-GPU limit excludes everyone; two TP-1 holders then share it.
2. A small fast-mode campaign deployed with ``deploy_to_pool`` runs through the pool with a 2-GPU limit
   (``gpu:H100-SXM``) while the campaign would submit 4 at once: runs execute on both workers, every run and
   iteration is recorded once (store, Prefect, MLflow server), the limit is never exceeded (peak recorded, from
   the server's count and from the runs' own intervals), and the result equals the same campaign run in one
   process (same seed).
3. A worker killed (SIGKILL, with its flow-run process) in the middle of a TP-2 run on the 2-GPU limit: the run is
   marked lost, its slots come back (released by the campaign well before the server's 60 s lease expiry), it is
   retried once on the other worker and counted once.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect_harness import drain_prefect_clients  # noqa: E402

from cluster.services import Service, start_mlflow_server, start_prefect_server, start_worker  # noqa: E402

pytestmark = pytest.mark.slow

POOL = "rooflab-e2e"
LIMIT = 2  # GPUs of gpu:H100-SXM
OVERRIDES = {"batch_size": 4, "max_iterations": 2, "n_boot": 30}
CAMPAIGN = """
name: pool-e2e
hardware: H100-SXM
models:
  - {model: llama-3.1-8b, tp: [1, 2]}
validation:
  models:
    - {model: qwen2.5-7b, tp: 1}
  points:
    - {family: W3, rate: 16}
families:
  W1: {input_tokens: [1024, 4096], output_tokens: 1, rate: 4}
  W3: {rate: [8, 16], input_tokens: 128, output_tokens: 128}
duration_s: 120
engine: {max_model_len: 8192}
budget_gpu_hours: 1
collection: {concurrency: 4, max_retries: 1, timeout_s: 300}
endpoint: {kind: twin, accel: 10}
"""
# one TP-2 run long enough (~6 s of simulation) to be killed in the middle
KILL = """
name: pool-kill
hardware: H100-SXM
models:
  - {model: llama-3.1-8b, tp: 2}
validation: {models: [], points: [{family: W3, rate: 64}]}
families:
  W3: {rate: [64], input_tokens: 512, output_tokens: 256}
duration_s: 1200
engine: {max_model_len: 8192}
collection: {concurrency: 1, max_retries: 1, timeout_s: 300}
endpoint: {kind: twin, accel: 10}
"""


@dataclass
class Cluster:
    base: Path
    prefect: Service
    mlflow: Service
    workers: dict[str, Service]
    campaign: Path
    kill: Path

    @property
    def store(self) -> Path:
        return self.base / "store"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from flows.deployments import deploy_to_pool
    from flows.gpu_slots import set_gpus
    from flows.work_pool import ensure_pool

    base = tmp_path_factory.mktemp("pool")
    (base / "pool-e2e.yaml").write_text(CAMPAIGN)
    (base / "pool-kill.yaml").write_text(KILL)
    services: list[Service] = []
    t0 = time.monotonic()
    try:
        srv = start_prefect_server(base / "prefect", timeout_s=180,
                                   env={"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"})
        services.append(srv)
        ml = start_mlflow_server(f"sqlite:///{base}/mlflow/mlflow.db", base / "mlflow" / "artifacts", timeout_s=180)
        services.append(ml)
        with temporary_settings(updates={PREFECT_API_URL: srv.url}):
            ensure_pool(POOL, "process")
            set_gpus("H100-SXM", LIMIT)
            deploy_to_pool(str(base / "pool-e2e.yaml"), POOL, store=str(base / "store"), mlruns=ml.url,
                           launcher="direct", triggers=False)
            workers = {}
            for name in ("w1", "w2"):
                workers[name] = start_worker(POOL, name, srv.url, base / "prefect", limit=2, timeout_s=120,
                                             env={"PREFECT_WORKER_QUERY_SECONDS": "1"})
                services.append(workers[name])
            print(f"\nservices up in {time.monotonic() - t0:.1f} s")
            yield Cluster(base, srv, ml, workers, base / "pool-e2e.yaml", base / "pool-kill.yaml")
            drain_prefect_clients()  # while the server is up: nothing left for the interpreter's exit
    finally:
        for s in reversed(services):
            s.stop()


def _in_thread(fn, *args):
    """Run ``fn`` in a thread that sees this context's Prefect settings; returns (thread, result box)."""
    box: dict = {}
    ctx = contextvars.copy_context()

    def target():
        try:
            box["value"] = ctx.run(fn, *args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


class SlotPoller:
    """Polls a limit's active slots on the server; ``peak`` is the most seen."""

    def __init__(self, name: str, every_s: float = 0.1):
        from flows.gpu_slots import active_slots

        self.peak, self.samples, self.stop = 0, 0, threading.Event()

        def loop():
            while not self.stop.is_set():
                self.peak = max(self.peak, active_slots(name))
                self.samples += 1
                self.stop.wait(every_s)

        self.thread, self.box = _in_thread(loop)

    def done(self) -> int:
        self.stop.set()
        self.thread.join(10)
        assert "error" not in self.box, self.box.get("error")
        return self.peak


def _peak_overlap(intervals: list[tuple[float, float, int]]) -> int:
    """The most slots held at once by intervals (start, end, slots)."""
    events = sorted([(s, w) for s, _, w in intervals] + [(e, -w) for _, e, w in intervals], key=lambda x: (x[0], x[1]))
    cur = peak = 0
    for _, w in events:
        cur += w
        peak = max(peak, cur)
    return peak


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_gpu_slots_hold_runs_back(cluster, tmp_path):
    """A TP-2 holder of a 2-GPU limit excludes the others; the two TP-1 holders then run side by side."""
    from flows.gpu_slots import gpu_slots, set_gpus

    name = set_gpus("L40S", 2)
    spans: dict[str, tuple[float, float]] = {}

    def hold(label: str, slots: int, secs: float):
        with gpu_slots(name, slots, tmp_path / f"{label}.json", timeout_s=60):
            t = time.time()
            time.sleep(secs)
            spans[label] = (t, time.time())

    first, box = _in_thread(hold, "tp2", 2, 1.5)
    deadline = time.time() + 30
    while not (tmp_path / "tp2.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "tp2.json").exists(), "the TP-2 holder never got its slots"
    others = [_in_thread(hold, f"tp1-{i}", 1, 1.0) for i in range(2)]
    for th, b in [(first, box), *others]:
        th.join(60)
        assert "error" not in b, b.get("error")
    end2 = spans["tp2"][1]
    assert all(spans[k][0] >= end2 - 0.05 for k in ("tp1-0", "tp1-1")), spans  # waited for the TP-2 run
    a, b = spans["tp1-0"], spans["tp1-1"]
    assert min(a[1], b[1]) > max(a[0], b[0]), spans  # the two TP-1 runs overlapped
    assert not list(tmp_path.glob("*.json"))  # every slot record removed on release


def test_campaign_on_two_workers_equals_the_single_process_campaign(cluster):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    from flows.campaign import campaign_flow
    from rooflab.data.store import COMPLETE, Store
    from tracking import campaign_runs as track
    from tracking.store import ROLE, experiment_name, open_tracking

    poller = SlotPoller("gpu:H100-SXM")
    t0 = time.monotonic()
    fr = run_deployment("rooflab-campaign/pool-e2e", parameters={"overrides": OVERRIDES}, timeout=420)
    took = time.monotonic() - t0
    peak_server = poller.done()
    assert fr.state is not None and fr.state.is_completed(), f"campaign flow run ended {fr.state}"

    st = Store(cluster.store)
    plans = st.iterations("pool-e2e")
    assert [p["iteration"] for p in plans] == [0, 1] and all(p["complete"] for p in plans)
    manifests = st.manifests("pool-e2e")
    planned = {json.dumps(q["point"], sort_keys=True) for p in plans for q in p["points"]}
    assert len(manifests) == len(planned) == sum(len(p["points"]) for p in plans)  # each run once
    assert all(m["status"] in COMPLETE and m["attempt"] == 1 for m in manifests)
    where = [m["executed_by"] for m in manifests]
    assert {w["worker_pid"] for w in where} == {s.proc.pid for s in cluster.workers.values()}  # both workers
    assert len({w["flow_run_id"] for w in where}) == len(manifests)  # one flow run (process) per run
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[POOL])))
    assert len(runs) == len(manifests) and all(r.state.is_completed() for r in runs)  # submitted once each
    peak_runs = _peak_overlap([(_ts(m["started_at"]), _ts(m["ended_at"]), int(m["tp"])) for m in manifests])
    print(f"\npool campaign: {took:.1f} s, {len(manifests)} runs on 2 workers; GPU slots in use at once: "
          f"peak {peak_server} (server, {poller.samples} samples), {peak_runs} (runs' own intervals); limit {LIMIT}")
    assert 1 <= peak_server <= LIMIT and 1 <= peak_runs <= LIMIT

    # every iteration logged once, through the tracking server (artifacts uploaded through it too)
    ts = open_tracking(cluster.mlflow.url)
    exp = ts.client.get_experiment_by_name(experiment_name("pool-e2e"))
    logged = ts.client.search_runs([exp.experiment_id])
    parents = [r for r in logged if r.data.tags.get(ROLE) == "campaign"]
    assert len(parents) == 1
    children = track.logged_iterations(ts, parents[0].info.run_id)
    assert sorted(children) == [0, 1] and len([r for r in logged if r.data.tags.get(ROLE) == "iteration"]) == 2
    assert "coefficients.json" in {a.path for a in ts.client.list_artifacts(children[1])}

    # the same campaign in one process (same seed): the same plans, the same coefficients
    t1 = time.monotonic()
    single = campaign_flow(campaign=str(cluster.campaign), store=str(cluster.base / "store-single"),
                           mlruns=str(cluster.base / "mlruns-single"), launcher="direct", overrides=OVERRIDES)
    print(f"single-process campaign: {time.monotonic() - t1:.1f} s")
    ref = Store(cluster.base / "store-single").iterations("pool-e2e")
    assert [[q["point"] for q in p["points"]] for p in plans] == [[q["point"] for q in p["points"]] for p in ref]
    assert [p["stop_reason"] for p in plans] == [p["stop_reason"] for p in ref]
    for p, r in zip(plans, ref):
        assert p["beta"].keys() == r["beta"].keys()
        for k in p["beta"]:
            assert p["beta"][k] == pytest.approx(r["beta"][k], rel=1e-9, abs=1e-12), (p["iteration"], k)
        assert p["train_mape"] == pytest.approx(r["train_mape"], rel=1e-9)
    assert single["iterations"] == len(plans)


def _parent_pid(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rsplit(")", 1)[1].split()[1])


def test_killed_worker_gives_its_slots_back_and_its_run_is_retried_once(cluster):
    from prefect import get_client

    from flows.campaign import OnWorkers
    from flows.gpu_slots import SlotLease, active_slots, record_path
    from flows.pool_executor import PoolExecutor
    from rooflab.collect.collector import collect
    from rooflab.collect.spec import load_campaign
    from rooflab.data.store import COMPLETE, Store
    from rooflab.data.sweep import run_id

    camp = load_campaign(cluster.kill)
    point = camp.candidates()[0]
    assert point.tp == LIMIT  # the retry can start only once the dead run's slots are back
    rid = run_id(camp.name, point, 0)
    st = Store(cluster.store)
    lines: list[str] = []
    ex = PoolExecutor(POOL, str(cluster.kill), "direct", poll_s=0.3, timeout_s=300, report=lines.append)
    th, box = _in_thread(lambda: collect(st, OnWorkers("direct"), camp.name, [point], concurrency=1, max_retries=1,
                                         executor=ex))
    record = record_path(cluster.store, rid)
    deadline = time.time() + 120
    while not record.exists() and time.time() < deadline:
        time.sleep(0.05)
    lease = SlotLease.read(record)
    assert lease is not None, "the run never got its GPU slots"
    victim = next(s for s in cluster.workers.values() if s.proc.pid == _parent_pid(lease.pid))
    survivor = next(s for s in cluster.workers.values() if s is not victim)
    victim.kill()  # the worker's process group ...
    try:
        os.kill(lease.pid, signal.SIGKILL)  # ... and the run's process, wherever its group is
    except ProcessLookupError:
        pass
    killed_at = time.time()
    assert st.manifest(rid) is None, "the run finished before it could be killed: make it longer"
    assert active_slots("gpu:H100-SXM") == LIMIT  # the dead run still holds them on the server

    th.join(300)
    assert not th.is_alive() and "error" not in box, box.get("error")
    prog = box["value"]
    assert (prog.done, prog.failed, prog.skipped, prog.leased) == (1, 0, 0, [])  # counted once
    subs = [s for s in ex.submissions if s.run_id == rid]
    assert [s.attempt for s in subs] == [1, 2]  # retried once
    m = st.manifest(rid)
    assert m is not None and m["status"] in COMPLETE and m["attempt"] == 1
    assert m["executed_by"]["flow_run_id"] == subs[1].flow_run_id
    assert m["executed_by"]["worker_pid"] == survivor.proc.pid
    assert any("took over the stale lease" in w for w in m.get("warnings", [])), m.get("warnings")
    assert len(st.runs(campaign=camp.name)) == 1
    assert any("lost" in x and f"released its {LIMIT} slot(s)" in x for x in lines), lines
    retried_at = _ts(m["started_at"])
    print(f"\nkilled at +0 s; retried run started at +{retried_at - killed_at:.1f} s, finished at "
          f"+{_ts(m['ended_at']) - killed_at:.1f} s")
    assert retried_at - killed_at < 60  # released by the campaign, not by the server's 60 s lease expiry
    with get_client(sync_client=True) as client:
        from uuid import UUID

        first = client.read_flow_run(UUID(subs[0].flow_run_id))
    assert first.state is not None and first.state.is_crashed()
    assert active_slots("gpu:H100-SXM") == 0 and not record.exists()


def test_rooflab_serve_registers_a_kubernetes_pool_its_gpu_limit_and_the_deployments(cluster, tmp_path, capsys):
    """``rooflab serve`` against the real server: a Kubernetes pool with rooflab's base job template, the GPU limit,
    and the campaign's deployments (the per-run flow included) — what `prefect worker start --pool` would run."""
    from prefect import get_client

    from cli.main import main

    template = tmp_path / "template.json"
    rc = main(["serve", "--campaign", str(cluster.campaign), "--store", str(cluster.store), "--tracking-uri",
               cluster.mlflow.url, "--pool", "rooflab-k8s", "--pool-type", "kubernetes", "--gpus", "L40S=3",
               "--image", "registry.example/rooflab:0.1", "--job-template-out", str(template)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "prefect worker start --pool rooflab-k8s --type kubernetes" in out
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("rooflab-k8s")
        names = {d.name for d in client.read_deployments() if d.work_pool_name == "rooflab-k8s"}
        limit = client.read_global_concurrency_limit_by_name("gpu:L40S")
    assert pool.type == "kubernetes" and "gpu_count" in pool.base_job_template["variables"]["properties"]
    assert json.loads(template.read_text()) == pool.base_job_template
    assert {"rooflab-k8s", "pool-e2e", "pool-e2e-refit", "pool-e2e-new-model"} <= names and limit.limit == 3
    # bad input: one line, status 2, before anything is registered
    assert main(["serve", "--campaign", str(cluster.campaign), "--tracking-uri", "ftp://x", "--pool", "p2"]) == 2
    assert main(["serve", "--campaign", str(cluster.campaign), "--pool-type", "docker", "--pool", "p2"]) == 2
    with get_client(sync_client=True) as client:
        assert "p2" not in {p.name for p in client.read_work_pools()}
