"""The data store and the collector: idempotent runs, resume, retries, atomic manifests, filters."""

import threading

import numpy as np
import pandas as pd
import pytest

from rooflab.collect.collector import collect
from rooflab.collect.launchers import RunResult
from rooflab.data.store import Store
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.errors import InputError


def point(rate=8, model="llama-3.1-8b", tp=1, family="W3", split="train"):
    return SweepPoint(model, tp, "H100-SXM", family, (("input_tokens", 256), ("output_tokens", 256), ("rate", rate)),
                      duration_s=10, split=split)


def tables(n=20, rid="x", saturated=False):
    steps = pd.DataFrame({"run_id": rid, "step_id": np.arange(n), "model": "llama-3.1-8b", "tp": 1,
                          "hardware": "H100-SXM", "step_time_us": 10000.0, "prefill_reqs": 0.0, "prefill_tokens": 0.0,
                          "prefill_context": 0.0, "decode_reqs": 8.0, "decode_context": 4000.0, "kv_usage": 0.2,
                          "preemptions": 0.0})
    arr = np.arange(n) * 1e5
    wait = arr * 3 if saturated else np.full(n, 100.0)  # saturated: queue wait grows with arrival time
    reqs = pd.DataFrame({"run_id": rid, "request_id": [str(i) for i in range(n)], "arrived_us": arr,
                         "queued_us": arr + 10, "scheduled_us": arr + 10 + wait, "first_token_us": arr + 20 + wait,
                         "finished_us": arr + 1e5 + wait, "departed_us": arr + 1.01e5 + wait,
                         "prompt_tokens": 256.0, "output_tokens": 256.0, "preemptions": 0.0, "status": "length"})
    if saturated:
        reqs.loc[reqs.index[-4:], "departed_us"] += 1e9  # a heavy E2E tail
    return steps, reqs


class Scripted:
    """A launcher whose outcomes are scripted per call (records what it ran)."""
    name = "scripted"

    def __init__(self, outcomes=None):
        self.outcomes = list(outcomes or [])
        self.calls = []
        self.lock = threading.Lock()

    def run(self, p, rd):
        with self.lock:
            self.calls.append(rd.run_id)
            kind = self.outcomes.pop(0) if self.outcomes else "ok"
        (rd.path / "inference-perf").mkdir()
        (rd.path / "inference-perf" / "summary.json").write_text("{}")
        if kind == "raise":
            raise RuntimeError("server said something odd\nsecond line")
        if kind == "transient":
            return RunResult("failed", "timed out", transient=True)
        if kind == "fatal":
            return RunResult("failed", "all requests rejected")
        s, r = tables(rid=rd.run_id, saturated=(kind == "saturated"))
        return RunResult("ok", steps=s, requests=r, gpu_seconds=12.5 * p.tp)


def test_completed_runs_are_never_rerun(tmp_path):
    store = Store(tmp_path)
    pts = [point(1), point(8), point(32)]
    launcher = Scripted()
    prog = collect(store, launcher, "c1", pts)
    assert prog.done == 3 and len(launcher.calls) == 3
    first = {m["run_id"]: m["ended_at"] for m in store.manifests()}
    prog = collect(store, launcher, "c1", pts)
    assert prog.skipped == 3 and prog.done == 0 and len(launcher.calls) == 3
    assert {m["run_id"]: m["ended_at"] for m in store.manifests()} == first
    m = store.manifest(run_id("c1", pts[0]))
    assert m["status"] == "ok" and m["gpu_seconds"] == 12.5 and m["counts"] == {"steps": 20, "requests": 20}
    assert set(m["files"]) >= {"point.json", "tables/steps.parquet", "tables/requests.parquet",
                               "inference-perf/summary.json"}
    assert m["versions"]["python"] and "routing" in m


def test_interrupted_run_is_cleared_and_redone(tmp_path):
    store = Store(tmp_path)
    p = point(8)
    rid = run_id("c1", p)
    partial = store.begin(rid, p, "c1", 0, 1)
    (partial.path / "tables").mkdir()
    (partial.path / "tables" / "steps.parquet").write_bytes(b"half-written")
    assert store.status(rid) == "interrupted"
    assert store.runs().empty  # an incomplete run is never loaded
    collect(store, Scripted(), "c1", [p])
    assert store.status(rid) == "ok" and len(store.steps()) == 20


def test_transient_failures_retry_up_to_the_limit(tmp_path):
    store = Store(tmp_path)
    p = point(8)
    launcher = Scripted(["transient", "transient", "ok"])
    prog = collect(store, launcher, "c1", [p], max_retries=2)
    assert prog.failed == 1 and len(launcher.calls) == 2
    m = store.manifest(run_id("c1", p))
    assert m["status"] == "failed" and m["attempt"] == 2 and m["reason"] == "timed out"
    # the limit holds across invocations; a larger one lets the run finish
    collect(store, launcher, "c1", [p], max_retries=2)
    assert len(launcher.calls) == 2
    collect(store, launcher, "c1", [p], max_retries=3)
    assert store.status(run_id("c1", p)) == "ok" and len(launcher.calls) == 3


def test_deterministic_failures_and_exceptions_are_recorded_once(tmp_path):
    store = Store(tmp_path)
    a, b = point(1), point(8)
    launcher = Scripted(["fatal", "raise"])
    prog = collect(store, launcher, "c1", [a, b], max_retries=3)
    assert prog.failed == 2 and len(launcher.calls) == 2
    assert store.manifest(run_id("c1", b))["reason"] == "RuntimeError: server said something odd"
    collect(store, launcher, "c1", [a, b], max_retries=3)
    assert len(launcher.calls) == 2


def test_run_level_saturation_is_stored(tmp_path):
    store = Store(tmp_path)
    p = point(128)
    collect(store, Scripted(["saturated"]), "c1", [p])
    m = store.manifest(run_id("c1", p))
    assert m["status"] == "saturated" and m["routing"]["run"]["saturated"]
    assert len(store.runs()) == 1 and len(store.runs(statuses=("ok",))) == 0


def test_concurrent_collection_has_no_duplicates(tmp_path):
    store = Store(tmp_path)
    pts = [point(r) for r in (1, 2, 4, 8, 16, 32)]
    launcher = Scripted()
    collect(store, launcher, "c1", pts, concurrency=3, replicates=2)
    assert len(launcher.calls) == 12 == len(set(launcher.calls)) == len(store.runs())


def test_loading_filters_and_checksums(tmp_path):
    store = Store(tmp_path)
    pts = [point(8), point(8, model="mixtral-8x7b", tp=2), point(1, family="W3", split="validation")]
    collect(store, Scripted(), "c1", pts)
    collect(store, Scripted(), "c2", [point(64)])
    assert len(store.runs()) == 4 and len(store.runs(campaign="c1")) == 3
    assert set(store.steps(model="mixtral-8x7b").tp) == {2}
    assert len(store.requests(split="validation")) == 20
    assert store.gpu_seconds(campaign="c1") == pytest.approx(12.5 * 4)
    s = store.steps(campaign="c2", verify=True)
    assert (s.campaign == "c2").all() and (s.family == "W3").all()
    victim = store.root / "runs" / run_id("c2", point(64)) / "tables" / "steps.parquet"
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(InputError, match="checksum"):
        store.steps(campaign="c2", verify=True)


def test_manifest_is_written_atomically(tmp_path, monkeypatch):
    """A crash while writing the manifest leaves no manifest (and no temp file counted as one)."""
    import rooflab.files as st

    store = Store(tmp_path)
    p = point(8)
    real_replace = st.os.replace

    def crash(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(st.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        collect(store, Scripted(), "c1", [p])
    monkeypatch.setattr(st.os, "replace", real_replace)
    rid = run_id("c1", p)
    assert store.status(rid) == "interrupted" and store.manifests() == []
    assert not list((store.root / "runs" / rid).glob("*.tmp"))
    collect(store, Scripted(), "c1", [p])
    assert store.status(rid) == "ok"
