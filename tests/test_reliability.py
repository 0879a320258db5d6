"""The fault suite, in-process part (docs/spec.md §11): run leases and the campaign lock (live, stale and lost
owners), corrupted or incomplete store data entering a campaign (quarantine, re-collection, the guard on completed
iterations), duplicated fit rows, a TP vLLM would refuse, tables that do not depend on --direct-traces, and
targeting that picks the same after a resume (the two campaign-length tests are marked slow). The parts that
start processes are in tests/test_reliability_processes.py."""

import json
import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest
import yaml

from rooflab.collect.collector import collect, run_one
from rooflab.collect.launchers.direct import DirectLauncher
from rooflab.data import locks
from rooflab.data.locks import HOST, MACHINE, Claim, proc_start
from rooflab.data.store import LEASE, LEASED, RunLeased, Store, sha256
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.errors import InputError


def point(rate=8, model="llama-3.1-8b", tp=1, family="W3"):
    return SweepPoint(model, tp, "H100-SXM", family, (("input_tokens", 128), ("output_tokens", 16), ("rate", rate)),
                      duration_s=5)


class Direct(DirectLauncher):
    """The direct launcher, recording what it ran."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def run(self, p, rd):
        self.calls.append(rd.run_id)
        return super().run(p, rd)


@pytest.fixture
def live_pid():
    """A live process on this host that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.2)
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_owner(path, pid, *, host=HOST, machine=MACHINE, heartbeat=None, since="2026-01-02T03:04:05+00:00"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "machine": machine, "proc_start": proc_start(pid),
                                "started_at": since, "heartbeat": time.time() if heartbeat is None else heartbeat,
                                "token": uuid.uuid4().hex}))


# ---------------------------------------------------------------------------------------------- leases
def test_a_live_lease_is_never_cleared_and_its_run_is_skipped_and_reported(tmp_path, live_pid):
    store = Store(tmp_path)
    p = point()
    rid = run_id("c", p)
    folder = store.run_dir(rid).path
    write_owner(folder / LEASE, live_pid)
    (folder / "traces").mkdir()
    (folder / "traces" / "traces.jsonl").write_text("being written\n")
    with pytest.raises(RunLeased, match=f"run {rid} is leased by pid {live_pid} on host {HOST} since 2026"):
        store.begin(rid, p, "c", 0, 1)
    assert (folder / "traces" / "traces.jsonl").read_text() == "being written\n"  # nothing deleted
    assert store.status(rid) == "running"
    launcher = Direct()
    prog = collect(store, launcher, "c", [p, point(4)])
    assert launcher.calls == [run_id("c", point(4))]  # the leased run was not executed
    assert prog.done == 1 and prog.failed == 0 and prog.remaining == 0
    assert prog.leased == [f"run {rid} is leased by pid {live_pid} on host {HOST} since 2026-01-02T03:04:05+00:00"]
    assert (folder / "traces" / "traces.jsonl").exists() and store.manifest(rid) is None


def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, dead_pid):
    store = Store(tmp_path)
    pts = [point(1), point(2), point(4)]
    rids = [run_id("c", p) for p in pts]
    write_owner(store.run_dir(rids[0]).path / LEASE, dead_pid)  # this host, owner gone
    write_owner(store.run_dir(rids[1]).path / LEASE, 1, host="gpu-node-7", machine="other",
                heartbeat=time.time() - 3600)  # another host, heartbeat an hour old
    write_owner(store.run_dir(rids[2]).path / LEASE, 1, host="gpu-node-8", machine="other")  # fresh heartbeat
    (store.run_dir(rids[0]).path / "half-written").write_text("x")
    launcher = Direct()
    prog = collect(store, launcher, "c", pts)
    assert launcher.calls == rids[:2] and prog.done == 2
    assert prog.leased == [f"run {rids[2]} is leased by pid 1 on host gpu-node-8 since 2026-01-02T03:04:05+00:00"]
    assert any(f"took over the stale lease of pid {dead_pid} on host {HOST}" in w for w in prog.warnings)
    assert any("pid 1 on host gpu-node-7" in w for w in prog.warnings)
    for rid in rids[:2]:
        m = store.manifest(rid)
        assert m["status"] == "ok" and "warnings" in m
        assert not (store.run_dir(rid).path / LEASE).exists()  # released
        assert not (store.run_dir(rid).path / "half-written").exists()  # the dead owner's partial files went
        assert not any(LEASE in f for f in m["files"])


def test_leases_heartbeat_and_a_lost_lease_records_nothing(tmp_path, monkeypatch, live_pid):
    monkeypatch.setenv("ROOFLAB_HEARTBEAT_S", "0.05")
    store = Store(tmp_path)
    claim = store.lease("r1")
    first = locks.read_owner(store.run_dir("r1").path / LEASE).heartbeat
    time.sleep(1.2)
    assert locks.read_owner(store.run_dir("r1").path / LEASE).heartbeat > first  # refreshed while held
    claim.release()
    assert not (store.run_dir("r1").path / LEASE).exists()

    class Stolen(Direct):  # another process takes the lease over while this one runs (it judged us dead)
        def run(self, p, rd):
            write_owner(rd.path / LEASE, live_pid)
            return super().run(p, rd)

    p = point()
    out = run_one(store, Stolen(), "c", run_id("c", p), p, 0)
    assert out["status"] == LEASED and f"lease lost to pid {live_pid}" in out["reason"]
    assert store.manifest(run_id("c", p)) is None  # nothing recorded as the run's result
    assert locks.read_owner(store.run_dir(run_id("c", p)).path / LEASE).pid == live_pid  # theirs, untouched


def test_the_campaign_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, live_pid, dead_pid):
    store = Store(tmp_path)
    lock = tmp_path / "campaigns" / "demo" / ".lock"
    write_owner(lock, live_pid)
    with pytest.raises(InputError) as err:
        with store.campaign_lock("demo"):
            pass
    assert str(err.value) == (f"campaign demo is running in pid {live_pid} on host {HOST} "
                              "since 2026-01-02T03:04:05+00:00")
    write_owner(lock, dead_pid)
    with store.campaign_lock("demo") as claim:
        assert claim.previous.pid == dead_pid
        with store.campaign_lock("demo") as inner:  # the same process nests (the CLI, then the flow)
            assert inner is claim
        assert json.loads(lock.read_text())["pid"] != dead_pid
    assert not lock.exists()


def test_a_campaign_that_lost_its_lock_stops(tmp_path, live_pid):
    from flows.campaign import FlowSteps
    from rooflab.collect.spec import load_campaign

    store = Store(tmp_path / "store")
    camp = load_campaign(write_campaign(tmp_path))
    with store.campaign_lock(camp.name) as claim:
        steps = FlowSteps(camp, store, None, None, "parent", tmp_path / "work", lock=claim)
        steps.check_lock()  # still ours
        write_owner(store.root / "campaigns" / camp.name / ".lock", live_pid)  # taken over by another host's view
        with pytest.raises(InputError, match="^campaign rel: this process lost the campaign's lock"):
            steps.collect(0, [])
    assert locks.read_owner(store.root / "campaigns" / camp.name / ".lock").pid == live_pid  # not removed by us


def test_a_claim_file_never_written_by_rooflab_is_not_overwritten(tmp_path):
    """O_CREAT|O_EXCL: the claim appears between the check and the creation (simulated) → refused, not clobbered."""
    path, guard = tmp_path / "x" / LEASE, tmp_path / ".lock"
    real = locks.read_owner
    calls = []

    def first_none(p):
        calls.append(p)
        if len(calls) == 1:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("someone else's")
            return None
        return real(p)

    locks.read_owner = first_none
    try:
        with pytest.raises(locks.ClaimHeld, match="appeared meanwhile"):
            Claim.acquire(path, guard, what="run x")
    finally:
        locks.read_owner = real
    assert path.read_text() == "someone else's"


# ------------------------------------------------------------------------------- corruption: the store
def _collect_three(tmp_path):
    store = Store(tmp_path / "store")
    pts = [point(1), point(2), point(4)]
    collect(store, DirectLauncher(), "c", pts)
    return store, [run_id("c", p) for p in pts]


def _truncate(store, rid):
    f = store.run_dir(rid).path / "tables" / "steps.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _strip_manifest(store, rid, *fields):
    m = json.loads(store.run_dir(rid).manifest_path.read_text())
    for k in fields:
        del m[k]
    store.run_dir(rid).manifest_path.write_text(json.dumps(m))


def _drop_step_time(store, rid):
    """Rewrite the steps table without step_time_us and fix the manifest's checksum: only the columns tell."""
    f = store.run_dir(rid).path / "tables" / "steps.parquet"
    pd.read_parquet(f).drop(columns=["step_time_us"]).to_parquet(f)
    m = json.loads(store.run_dir(rid).manifest_path.read_text())
    m["files"]["tables/steps.parquet"] = sha256(f)
    store.run_dir(rid).manifest_path.write_text(json.dumps(m))


def test_verification_quarantines_each_kind_of_damage(tmp_path):
    store, (a, b, c) = _collect_three(tmp_path)
    assert store.check_run(a) is None
    _truncate(store, a)
    _strip_manifest(store, b, "status")
    _drop_step_time(store, c)
    assert "checksum does not match" in store.check_run(a)
    assert store.check_run(b) == "manifest.json: status: required manifest field is missing"
    assert store.check_run(c) == "tables/steps.parquet: step_time_us: required column is missing"
    # readers give one-line errors instead of a KeyError or a pyarrow traceback
    with pytest.raises(InputError, match="manifest.json: status: required manifest field is missing"):
        store.runs(campaign="c")
    _strip_manifest(store, b, "point")  # verification reads what it can: the campaign comes from point.json then
    check = store.verify_campaign("c")
    assert check.good == {} and sorted(q.run_id for q in check.quarantined) == sorted([a, b, c])
    for q in check.quarantined:
        assert q.path.parent == store.root / "quarantine" and q.path.name.startswith(q.run_id + "-")
        assert (q.path / "reason.txt").read_text().splitlines()[0] == q.reason
        assert not store.run_dir(q.run_id).path.exists()  # gone from runs/, so never loaded again
        assert (q.path / "tables" / "requests.parquet").exists()  # kept whole for a post-mortem
    assert store.runs(campaign="c").empty
    assert "quarantined to quarantine/" in store.quarantine_reason(a)
    # and the collector redoes them
    prog = collect(store, DirectLauncher(), "c", [point(1), point(2), point(4)])
    assert prog.done == 3 and store.verify_campaign("c").good.keys() == {a, b, c}


def test_verified_loading_is_a_one_line_error(tmp_path):
    store, (a, _, _) = _collect_three(tmp_path)
    _truncate(store, a)
    with pytest.raises(InputError, match=f"runs/{a}: tables/steps.parquet: checksum does not match"):
        store.steps(campaign="c", verify=True)


def test_the_collector_quarantines_a_damaged_manifest_and_redoes_the_run(tmp_path):
    store, (a, b, _) = _collect_three(tmp_path)
    _strip_manifest(store, a, "status", "files")
    launcher = Direct()
    prog = collect(store, launcher, "c", [point(1), point(2), point(4)])
    assert launcher.calls == [a] and prog.done == 1 and prog.skipped == 2
    assert any("quarantined to" in w and "status: required manifest field is missing" in w for w in prog.warnings)
    assert store.status(a) == "ok" and len(list((store.root / "quarantine").iterdir())) == 1


# ---------------------------------------------------------------------- corruption: during a campaign
CAMPAIGN = {
    "name": "rel", "hardware": "H100-SXM",
    "models": [{"model": "llama-3.1-8b", "tp": [1, 2]}],
    "validation": {"models": [{"model": "qwen2.5-7b", "tp": 1}], "points": [{"family": "W3", "rate": 4}]},
    "families": {"W1": {"input_tokens": [128, 512, 1024], "output_tokens": 1, "rate": 1},
                 "W3": {"rate": [1, 2, 4, 8], "input_tokens": 128, "output_tokens": 32}},
    "duration_s": 10, "engine": {"max_model_len": 4096}, "budget_gpu_hours": 1.0,
    "collection": {"concurrency": 1, "max_retries": 1, "timeout_s": 300},
    "endpoint": {"kind": "twin", "accel": 10},
    "loop": {"batch_size": 4, "max_iterations": 3, "targeting": "d-optimal", "n_boot": 20},
}


def write_campaign(tmp_path, **changes):
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump({**CAMPAIGN, **changes}))
    return path


@pytest.fixture
def plain_flow(monkeypatch):
    """The campaign flow's body without Prefect's engine: the same FlowSteps, lock, verification and MLflow
    logging; runs through the plain collector and fits called directly (tests/test_flows.py runs the real flow)."""
    import flows.campaign as fc

    def collect_points(store, launcher, campaign, points, *, concurrency, max_retries, replicates=1):
        return collect(store, launcher, campaign, points, replicates=replicates, concurrency=concurrency,
                       max_retries=max_retries)

    monkeypatch.setattr(fc, "collect_points", collect_points)
    monkeypatch.setattr(fc, "calibrate_from_store", fc.calibrate_from_store.fn)
    monkeypatch.setattr(fc, "heldout_replay_error", fc.heldout_replay_error.fn)
    return fc


def _iteration_rids(store, name, i):
    return [run_id(name, SweepPoint.from_dict(p["point"]), 0) for p in store.iterations(name)[i]["points"]]


@pytest.mark.slow
def test_a_campaign_quarantines_damaged_runs_recollects_open_ones_and_guards_completed_ones(tmp_path, plain_flow,
                                                                                            monkeypatch, capsys):
    from tracking import campaign_runs as track
    from tracking.store import open_tracking

    camp = str(write_campaign(tmp_path))
    store_dir, mlruns = tmp_path / "store", tmp_path / "mlruns"
    real_log = plain_flow.log_iteration

    def crash_on_iteration_1(ts, parent, iteration, *a, **kw):
        if iteration == 1:
            raise KeyboardInterrupt("killed while logging iteration 1")
        return real_log(ts, parent, iteration, *a, **kw)

    monkeypatch.setattr(plain_flow, "log_iteration", crash_on_iteration_1)
    with pytest.raises(KeyboardInterrupt):
        plain_flow.campaign_flow.fn(campaign=camp, store=str(store_dir), mlruns=str(mlruns), launcher="direct")
    monkeypatch.setattr(plain_flow, "log_iteration", real_log)
    store = Store(store_dir)
    plans = store.iterations("rel")
    assert plans[0]["complete"] and not plans[1]["complete"]
    assert set(_iteration_rids(store, "rel", 0)) <= set(plans[0]["inputs"])  # what iteration 0 fitted

    # iteration 1 (open, collected): one run truncated, one manifest without fields, one steps table without
    # step_time_us; iteration 0 (complete, logged): one run's manifest deleted
    open_rids = [r for r in _iteration_rids(store, "rel", 1) if store.status(r) == "ok"]
    truncated, stripped, no_time = open_rids[:3]
    _truncate(store, truncated)
    _strip_manifest(store, stripped, "status")
    _drop_step_time(store, no_time)
    gone = _iteration_rids(store, "rel", 0)[0]
    store.run_dir(gone).manifest_path.unlink()
    capsys.readouterr()

    with pytest.raises(InputError) as err:
        plain_flow.campaign_flow.fn(campaign=camp, store=str(store_dir), mlruns=str(mlruns), launcher="direct")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("campaign rel: iteration 0 (complete, recorded in MLflow) was fitted on "
                                              f"data the store no longer holds: run {gone} is missing: runs/{gone}/"
                                              "manifest.json is missing")
    assert "--accept-changed-inputs" in msg
    out = capsys.readouterr().out
    for rid, why in ((truncated, "checksum does not match"), (stripped, "status: required manifest field"),
                     (no_time, "step_time_us: required column is missing")):
        assert f"warning: run {rid} quarantined to {store.root}/quarantine/{rid}-" in out and why in out
        assert store.status(rid) == "ok" and store.check_run(rid) is None  # collected again: its iteration is open
    assert not store.iterations("rel")[1]["complete"]  # nothing was refitted under the old records

    result = plain_flow.campaign_flow.fn(campaign=camp, store=str(store_dir), mlruns=str(mlruns), launcher="direct",
                                         accept_changed_inputs=True)
    assert result["iterations"] == 3
    plans = store.iterations("rel")
    assert any(gone in line for line in plans[0]["inputs_changed"]) and gone not in plans[0]["inputs"]
    assert all(p["complete"] for p in plans) and {truncated, stripped, no_time} <= set(plans[1]["inputs"])
    ts = open_tracking(mlruns)
    parent = track.start_campaign(ts, "rel", params={})
    assert sorted(track.logged_iterations(ts, parent)) == [0, 1, 2]  # each iteration logged once


def test_the_same_campaign_in_a_second_process_is_refused(tmp_path, plain_flow, live_pid):
    store = Store(tmp_path / "store")
    write_owner(store.root / "campaigns" / "rel" / ".lock", live_pid)
    with pytest.raises(InputError, match=f"^campaign rel is running in pid {live_pid} on host {HOST} since 2026"):
        plain_flow.campaign_flow.fn(campaign=str(write_campaign(tmp_path)), store=str(store.root),
                                    mlruns=str(tmp_path / "mlruns"), launcher="direct")
    assert store.iterations("rel") == [] and not store.manifests()  # it touched nothing


# ------------------------------------------------------------------------------------ small defects
def _steps_file(tmp_path, rows):
    df = pd.DataFrame(rows)
    path = tmp_path / "steps.parquet"
    df.to_parquet(path)
    return path


def _step_rows(n=6, run="r1", tp=1, model="llama-3.1-8b"):
    return {"run_id": [run] * n, "step_id": np.arange(n), "model": model, "tp": tp, "hardware": "H100-SXM",
            "step_time_us": 10000.0, "prefill_reqs": 0.0, "prefill_tokens": 0.0, "prefill_context": 0.0,
            "decode_reqs": 8.0, "decode_context": 4000.0}


def test_fit_refuses_duplicated_steps(tmp_path):
    from rooflab.data.adapters import read_steps
    from rooflab.fit.calibration import calibrate

    df = pd.DataFrame(_step_rows())
    df = pd.concat([df, df.iloc[[3]], df.iloc[[3]]], ignore_index=True)
    path = tmp_path / "steps.parquet"
    df.to_parquet(path)
    with pytest.raises(InputError) as err:
        read_steps(path)
    assert str(err.value) == (f"{path}: run_id, step_id: step (r1, 3) appears 3 times (3 duplicated rows in all): "
                              "each step must appear once")
    with pytest.raises(InputError, match=r"^steps: run_id, step_id: step \(r1, 3\) appears 3 times"):
        calibrate(df)
    records = pd.DataFrame({"step.id": [1, 2, 2, 3], "step.ts_start_ns": [0, 10, 10, 30], "experiment_id": "e1",
                            "batch.num_prefill_reqs": 0, "batch.num_decode_reqs": 1, "batch.prefill_tokens": 0,
                            "kv.usage_gpu_ratio": 0.1, "kv.blocks_total_gpu": 1000, "model": "llama-3.1-8b", "tp": 1})
    rec = tmp_path / "records.parquet"
    records.to_parquet(rec)
    with pytest.raises(InputError, match=rf"^{rec}: experiment_id, step.id: step \(e1, 2\) appears more than once"):
        read_steps(rec)


@pytest.mark.parametrize("model,tp,problem", [
    ("llama-3.1-8b", 3, "TP 3 does not divide llama-3.1-8b's 32 attention heads (vLLM refuses it)"),
    # 48 heads divide by 6, but 8 KV heads can neither be split 6 ways nor replicated to 6
    ("mixtral-8x22b", 6, "TP 6 and mixtral-8x22b's 8 KV heads: neither divides the other (vLLM refuses it)"),
])
def test_fit_refuses_a_tp_vllm_would_refuse(tmp_path, model, tp, problem):
    from rooflab.data.adapters import read_steps, tp_problem
    from rooflab.fit.calibration import calibrate

    path = _steps_file(tmp_path, _step_rows(model=model, tp=tp))
    with pytest.raises(InputError) as err:
        read_steps(path)
    assert str(err.value) == f"{path}: tp: {problem}"
    with pytest.raises(InputError, match="^steps: tp: TP"):
        calibrate(pd.DataFrame(_step_rows(model=model, tp=tp)))
    assert tp_problem("llama-3.1-8b", 8) is None and tp_problem("llama-3.1-8b", 16) is None  # KV heads replicated
    assert tp_problem("deepseek-v2-lite", 8) is None  # MLA: one latent KV, replicated


def test_direct_tables_do_not_depend_on_traces(tmp_path):
    """--direct-traces only adds the trace file: one run id, identical tables (dense and MoE)."""
    for p in (point(16, tp=1), point(8, model="mixtral-8x7b", tp=2),
              SweepPoint("llama-3.1-8b", 1, "H100-SXM", "W1", (("input_tokens", 2048), ("output_tokens", 1),
                                                              ("rate", 2)), duration_s=5,
                         engine=(("max_model_len", 8192),))):
        plain, traced = Store(tmp_path / "plain"), Store(tmp_path / "traced")
        collect(plain, DirectLauncher(), "c", [p])
        collect(traced, DirectLauncher(traces=True), "c", [p])
        rid = run_id("c", p)
        assert plain.status(rid) == traced.status(rid) == "ok"
        assert (traced.run_dir(rid).path / "traces" / "traces.jsonl").stat().st_size > 0
        assert not (plain.run_dir(rid).path / "traces").exists()
        for name in ("steps", "requests"):
            a = pd.read_parquet(plain.run_dir(rid).path / "tables" / f"{name}.parquet")
            b = pd.read_parquet(traced.run_dir(rid).path / "tables" / f"{name}.parquet")
            pd.testing.assert_frame_equal(a, b)
        assert plain.manifest(rid)["files"]["tables/steps.parquet"] == \
            traced.manifest(rid)["files"]["tables/steps.parquet"]


# ----------------------------------------------------------------------------- resume-identical targeting
class PlainSteps:
    """The loop's steps over a store, without Prefect or MLflow; ``crash_at``: die collecting that iteration."""

    def __init__(self, camp, store, crash_at=None):
        self.camp, self.store, self.crash_at = camp, store, crash_at

    def collect(self, iteration, points):
        from rooflab.campaign.loop import CollectOutcome

        if iteration == self.crash_at:
            raise KeyboardInterrupt(f"killed in iteration {iteration}")
        p = collect(self.store, DirectLauncher(), self.camp.name, points)
        return CollectOutcome(p.done + p.skipped, p.failed)

    def collected_keys(self):
        return self.store.collected_keys(self.camp.name)

    def spend(self):
        from rooflab.targeting.strategies import Spend

        r = self.store.runs(campaign=self.camp.name)
        by = r.groupby("split")["gpu_seconds"].sum().to_dict() if len(r) else {}
        return Spend(float(by.get("train", 0.0)), float(by.get("validation", 0.0)))

    def has_fit_data(self):
        return not self.store.runs(campaign=self.camp.name, statuses=("ok",)).empty

    def calibrate(self, iteration):
        from rooflab.fit.calibration import Options, calibrate

        loop = self.camp.loop
        return calibrate(self.store.steps(campaign=self.camp.name, statuses=("ok",)),
                         self.store.requests(campaign=self.camp.name, statuses=("ok", "saturated")),
                         Options(variant=loop.variant, formulas=loop.formulas, n_boot=loop.n_boot))

    def replay_error(self, calib):
        raise NotImplementedError

    def record(self, record):
        pass


@pytest.mark.slow
def test_targeting_after_a_resume_picks_what_an_uninterrupted_campaign_picks(tmp_path, monkeypatch):
    import rooflab.targeting.prediction as prediction
    from rooflab.campaign.loop import run_campaign
    from rooflab.collect.spec import load_campaign
    from rooflab.data.store import StorePlans
    from rooflab.targeting.strategies import make_targeting

    camp = load_campaign(write_campaign(tmp_path, loop={**CAMPAIGN["loop"], "batch_size": 3, "max_iterations": 4}))

    def run(root, crash_at=None):
        monkeypatch.setattr(prediction, "_CACHE", {})  # a new process
        store = Store(root)
        try:
            run_campaign(camp, PlainSteps(camp, store, crash_at), StorePlans(store, camp.name),
                         make_targeting("d-optimal"), report=lambda line: None)
        except KeyboardInterrupt:
            monkeypatch.setattr(prediction, "_CACHE", {})  # the resumed process starts with an empty cache
            run_campaign(camp, PlainSteps(camp, store), StorePlans(store, camp.name), make_targeting("d-optimal"),
                         report=lambda line: None)
        return [[(p["point"], p["reason"], p.get("details")) for p in plan["points"]]
                for plan in store.iterations(camp.name)]

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", crash_at=2)  # iteration 2's picks were predicted before the crash
    assert len(resumed) == len(straight) == 4
    for i, (a, b) in enumerate(zip(straight, resumed)):
        assert a == b, f"iteration {i} picked differently after a crash in iteration 2"
