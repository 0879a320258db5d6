"""The fault suite, the part that starts processes (docs/spec.md §11): two collectors on one store, two starts of
one campaign, and first-time creation of one MLflow store by several processes at once."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rooflab.data.locks import HOST
from rooflab.data.store import LEASE, Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

COLLECTOR = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from rooflab.collect.collector import collect
from rooflab.collect.launchers.direct import DirectLauncher
from rooflab.data.store import Store
from rooflab.data.sweep import SweepPoint

class Logged(DirectLauncher):
    def run(self, p, rd):
        with open({log!r}, "a") as fh:  # O_APPEND: one line per write, both processes share the file
            fh.write(f"{{rd.run_id}} start\n")
        time.sleep(0.3)  # widen the window in which the other process could touch this run
        return super().run(p, rd)

points = [SweepPoint("llama-3.1-8b", 1, "H100-SXM", "W3", (("input_tokens", 128), ("output_tokens", 16),
                                                          ("rate", r)), duration_s=5) for r in range(1, 13)]
while time.time() < {start}:
    time.sleep(0.001)
prog = collect(Store({store!r}), Logged(), "c", points, concurrency=2)
print(json.dumps({{"done": prog.done, "skipped": prog.skipped, "failed": prog.failed, "leased": prog.leased}}))
"""


def _python(code, **kw):
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, **kw)


def _check_store(store, n):
    runs = [d for d in (store.root / "runs").iterdir()]
    assert len(runs) == n and all(d.is_dir() for d in runs)  # no stray or destroyed folder
    for d in runs:
        m = store.manifest(d.name)
        assert m is not None and m["status"] == "ok" and m["attempt"] == 1, d.name
        assert store.check_run(d.name) is None  # every manifest valid, every table as it claims
        assert not (d / LEASE).exists()  # every lease released
    assert not (store.root / "quarantine").exists()


def test_two_collectors_on_one_store_never_run_a_run_twice(tmp_path):
    store_dir, log = tmp_path / "store", tmp_path / "launches.log"
    start = time.time() + 4
    code = COLLECTOR.format(root=str(ROOT), log=str(log), store=str(store_dir), start=start)
    procs = [_python(code) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    progress = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    launches = log.read_text().split("\n")[:-1]
    assert len(launches) == len(set(launches)) == 12  # each run executed exactly once, by one of the two
    assert sum(p["done"] for p in progress) == 12 and all(p["failed"] == 0 for p in progress)
    assert all(p["done"] > 0 for p in progress)  # they really worked side by side
    for p in progress:
        assert p["done"] + p["skipped"] + len(p["leased"]) == 12
        assert all(" is leased by pid " in line and f"on host {HOST}" in line for line in p["leased"])
    _check_store(Store(store_dir), 12)


def test_two_cli_collects_of_one_design(tmp_path):
    camp = tmp_path / "campaign.yaml"
    camp.write_text(yaml.safe_dump({
        "name": "two", "hardware": "H100-SXM", "models": [{"model": "llama-3.1-8b", "tp": [1, 2]}],
        "families": {"W1": {"input_tokens": [128, 512, 1024], "output_tokens": 1, "rate": 1},
                     "W3": {"rate": [1, 2, 4, 8, 16], "input_tokens": 128, "output_tokens": 32}},
        "validation": {"models": [{"model": "qwen2.5-7b", "tp": 1}], "points": [{"family": "W3", "rate": 4}]},
        "duration_s": 20, "engine": {"max_model_len": 4096}, "endpoint": {"kind": "twin", "accel": 10}}))
    cmd = [sys.executable, "-m", "cli", "collect", "--campaign", str(camp), "--design", "candidates",
           "--store", str(tmp_path / "store"), "--launcher", "direct", "--concurrency", "2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-1500:] for o in outs)
    from rooflab.collect.spec import load_campaign

    _check_store(Store(tmp_path / "store"), len(load_campaign(camp).candidates()))


def test_the_same_campaign_twice_is_refused_then_resumes(tmp_path):
    camp = tmp_path / "campaign.yaml"
    camp.write_text(yaml.safe_dump({
        "name": "twice", "hardware": "H100-SXM", "models": [{"model": "llama-3.1-8b", "tp": [1, 2]}],
        "validation": {"models": [{"model": "qwen2.5-7b", "tp": 1}], "points": [{"family": "W3", "rate": 4}]},
        "families": {"W1": {"input_tokens": [128, 512, 1024], "output_tokens": 1, "rate": 1},
                     "W3": {"rate": [1, 2, 4, 8], "input_tokens": 128, "output_tokens": 32}},
        "duration_s": 10, "engine": {"max_model_len": 4096}, "budget_gpu_hours": 1.0,
        "endpoint": {"kind": "twin", "accel": 10},
        "loop": {"batch_size": 3, "max_iterations": 3, "targeting": "d-optimal", "n_boot": 20}}))
    store, mlruns = tmp_path / "store", tmp_path / "mlruns"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "cli", "campaign", "--campaign", str(camp), "--store", str(store), "--mlruns",
           str(mlruns), "--fast"]

    def start():
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    first = start()
    time.sleep(1)
    second = start()
    outs = {p.pid: p.communicate(timeout=600) for p in (first, second)}
    codes = sorted((p.returncode, p.pid) for p in (first, second))
    assert [c for c, _ in codes] == [0, 2], {pid: (o[-800:], e[-800:]) for pid, (o, e) in outs.items()}
    winner, loser = codes[0][1], codes[1][1]
    # the CLI's one line (Prefect's own log lines — the flow's failure, stopping its temporary server — go around it)
    refusal = [line for line in outs[loser][1].splitlines() if line.startswith("error: ")]
    assert len(refusal) == 1 and refusal[0].startswith(f"error: campaign twice is running in pid {winner} on host "
                                                       f"{HOST} since "), outs[loser][1][-2000:]
    assert not (store / "campaigns" / "twice" / ".lock").exists()  # released by the winner at its end

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    from tracking import campaign_runs as track
    from tracking.store import open_tracking

    st = Store(store)
    plans = st.iterations("twice")
    assert len(plans) == 3 and all(p["complete"] for p in plans)
    ts = open_tracking(mlruns)
    parent = track.start_campaign(ts, "twice", params={})
    assert sorted(track.logged_iterations(ts, parent)) == [0, 1, 2]  # each iteration logged once
    manifests = st.manifests("twice")
    assert len({m["run_id"] for m in manifests}) == len(manifests) and all(m["attempt"] == 1 for m in manifests)


TRACKING = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tracking.store import experiment, open_tracking
ready = Path({ready!r})
(ready / sys.argv[1]).touch()
while len(list(ready.iterdir())) < {n}:  # every process has imported MLflow: go together
    time.sleep(0.001)
ts = open_tracking({mlruns!r})
experiment(ts, "c")
print("ok")
"""


def test_first_time_tracking_store_creation_from_several_processes(tmp_path):
    """Before the lock, two of three processes died on MLflow's schema creation (``table … already exists``,
    ``duplicate column name``, alembic's version row) in nearly every round."""
    for round_ in range(2):
        mlruns, ready = tmp_path / f"mlruns-{round_}", tmp_path / f"ready-{round_}"
        ready.mkdir()
        code = TRACKING.format(root=str(ROOT), mlruns=str(mlruns), ready=str(ready), n=3)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(3)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outs]
        assert all(out.strip() == "ok" for out, _ in outs)


def test_rooflab_fit_refuses_duplicated_steps_and_a_bad_tp_in_one_line(tmp_path):
    import numpy as np
    import pandas as pd

    steps = pd.DataFrame({"run_id": "r1", "step_id": np.arange(6), "model": "llama-3.1-8b", "tp": 1,
                          "hardware": "H100-SXM", "step_time_us": 10000.0, "prefill_reqs": 0.0, "prefill_tokens": 0.0,
                          "prefill_context": 0.0, "decode_reqs": 8.0, "decode_context": 4000.0})
    dup, bad_tp = tmp_path / "dup.parquet", tmp_path / "tp3.parquet"
    pd.concat([steps, steps.iloc[[2]]]).to_parquet(dup)
    steps.assign(tp=3).to_parquet(bad_tp)
    for path, line in ((dup, f"error: {dup}: run_id, step_id: step (r1, 2) appears 2 times (2 duplicated rows in "
                             "all): each step must appear once"),
                       (bad_tp, f"error: {bad_tp}: tp: TP 3 does not divide llama-3.1-8b's 32 attention heads "
                                "(vLLM refuses it)")):
        out = subprocess.run([sys.executable, "-m", "cli", "fit", "--steps", str(path)], capture_output=True,
                             text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 2 and out.stderr.strip() == line, out.stderr[-1500:]
