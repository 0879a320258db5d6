"""Collection end to end: the real inference-perf against the twin (dense and MoE), the command-template
endpoint with the twin standing in for vLLM, an external endpoint, and a collector killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from rooflab.collect.collector import collect
from rooflab.collect.launchers.endpoints import CommandEndpoint, twin_command
from rooflab.collect.launchers.factory import close_launcher, make_launcher
from rooflab.collect.spec import load_campaign
from rooflab.data.store import Store
from rooflab.twin.tokenizer import ensure_tokenizer

pytestmark = pytest.mark.slow

CAMPAIGN = {
    "name": "e2e", "hardware": "H100-SXM",
    "models": [{"model": "llama-3.1-8b", "tp": 1}, {"model": "qwen3-30b-a3b", "tp": 1}],
    "families": {"W1": {"input_tokens": [128], "output_tokens": 1, "rate": 1},
                 "W2": {"input_tokens": [256], "output_tokens": 64, "rate": 0.5},
                 "W3": {"rate": [2, 8], "input_tokens": 128, "output_tokens": 32}},
    "validation": {"points": [{"family": "W3", "rate": 2}]},
    "duration_s": 10, "engine": {"max_model_len": 4096},
    "collection": {"concurrency": 1, "max_retries": 1, "timeout_s": 300},
    "endpoint": {"kind": "twin", "accel": 10},
    "designs": {"six": {"points": [
        {"model": "llama-3.1-8b", "tp": 1, "family": "W1", "input_tokens": 128},
        {"model": "llama-3.1-8b", "tp": 1, "family": "W2", "input_tokens": 256},
        {"model": "llama-3.1-8b", "tp": 1, "family": "W3", "rate": 2},
        {"model": "llama-3.1-8b", "tp": 1, "family": "W3", "rate": 8},
        {"model": "qwen3-30b-a3b", "tp": 1, "family": "W3", "rate": 2},
        {"model": "qwen3-30b-a3b", "tp": 1, "family": "W3", "rate": 8}]}},
}


def write_campaign(tmp_path, **changes):
    doc = json.loads(json.dumps(CAMPAIGN))
    doc.update(changes)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOFLAB_CACHE", str(tmp_path / "cache"))


def _check_counts(store, manifests):
    for m in manifests:
        assert m["status"] == "ok", m
        ip = m["inference_perf"]
        assert ip["failures"] == 0 and ip["successes"] == ip["expected"] == m["counts"]["requests"]
        req = store.requests(campaign=m["campaign"]).query("run_id == @m['run_id']")
        steps = store.steps(campaign=m["campaign"]).query("run_id == @m['run_id']")
        p = m["point"]["params"]
        assert (req.prompt_tokens == p["input_tokens"]).all() and (req.output_tokens == p["output_tokens"]).all()
        assert steps.prefill_tokens.sum() == len(req) * p["input_tokens"]
        assert steps.decode_reqs.sum() == len(req) * (p["output_tokens"] - 1)
        per_req = json.loads((store.root / "runs" / m["run_id"] / "inference-perf" /
                              "per_request_lifecycle_metrics.json").read_text())
        assert len(per_req) == len(req)


def test_six_points_dense_and_moe_through_inference_perf(tmp_path):
    camp = load_campaign(write_campaign(tmp_path))
    store = Store(tmp_path / "store")
    launcher = make_launcher(camp, "inference-perf", store.root)
    try:
        prog = collect(store, launcher, camp.name, camp.design("six"))
    finally:
        close_launcher(launcher)
    assert prog.done == 6 and prog.failed == 0
    _check_counts(store, prog.runs)
    runs = store.runs(campaign="e2e")
    assert set(runs.model) == {"llama-3.1-8b", "qwen3-30b-a3b"} and len(runs) == 6
    # GPU-seconds are simulated seconds × TP: about the 10 s stage of each run, not the accelerated wall time
    assert ((runs.gpu_seconds > 5) & (runs.gpu_seconds < 40)).all(), runs.gpu_seconds
    assert len(list((store.root / "servers").glob("server-*.log"))) == 2  # one server per (model, TP), reused


def test_command_endpoint_with_the_twin_standing_in_for_vllm(tmp_path):
    tok = str(ensure_tokenizer())
    template = [sys.executable, "-m", "rooflab.twin", "serve", "--model", "{model}", "--tp", "{tp}",
                "--hardware", "{hardware}", "--port", "{port}", "--trace", "{trace}", "--accel", "10"]
    camp = load_campaign(write_campaign(tmp_path, endpoint={"kind": "command", "template": template,
                                                            "tokenizer": tok, "health_timeout_s": 120}))
    store = Store(tmp_path / "store")
    launcher = make_launcher(camp, "inference-perf", store.root)
    try:
        prog = collect(store, launcher, camp.name, camp.design("six")[2:3])
    finally:
        close_launcher(launcher)
    assert prog.done == 1 and prog.failed == 0
    _check_counts(store, prog.runs)


def test_server_that_never_becomes_healthy_is_a_clear_error(tmp_path):
    ep = CommandEndpoint([sys.executable, "-c", "import time; time.sleep(30)"], model="m", tp=1, hardware="H100-SXM",
                         workdir=tmp_path, tokenizer_dir=".", health_timeout_s=2)
    from rooflab.errors import InputError

    with pytest.raises(InputError, match="never became healthy"):
        ep.start()
    ep2 = CommandEndpoint([sys.executable, "-c", "raise SystemExit(3)"], model="m", tp=1, hardware="H100-SXM",
                          workdir=tmp_path, tokenizer_dir=".", health_timeout_s=10)
    with pytest.raises(InputError, match="exited with code 3"):
        ep2.start()


def test_external_endpoint(tmp_path):
    tok = str(ensure_tokenizer())
    server = CommandEndpoint(twin_command(10), model="llama-3.1-8b", tp=1, hardware="H100-SXM",
                             workdir=tmp_path / "srv", tokenizer_dir=tok, time_scale=10)
    server.start()
    try:
        camp = load_campaign(write_campaign(tmp_path, endpoint={
            "kind": "external", "base_url": server.base_url, "trace_path": str(server.trace_path), "tokenizer": tok}))
        store = Store(tmp_path / "store")
        launcher = make_launcher(camp, "inference-perf", store.root)
        # an external server is not ours to accelerate: tell the launcher its real time scale
        orig = launcher.pool.factory
        launcher.pool.factory = lambda p: _with_scale(orig(p), 10)
        prog = collect(store, launcher, camp.name, camp.design("six")[3:4])
    finally:
        server.stop()
    assert prog.done == 1, [m.get("reason") for m in prog.runs]
    _check_counts(store, prog.runs)


def _with_scale(ep, scale):
    ep.time_scale = scale
    return ep


def test_collector_killed_mid_run_resumes_without_duplicates(tmp_path):
    """SIGKILL the collector while runs are in flight, then run the same command again."""
    camp_path = write_campaign(tmp_path, duration_s=120, endpoint={"kind": "twin", "accel": 20},
                               families={"W3": {"rate": [8, 16, 24, 32, 48, 64], "input_tokens": 256,
                                                "output_tokens": 256}},
                               validation={"points": [{"family": "W3", "rate": 8}]}, designs={})
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "cli", "collect", "--campaign", str(camp_path), "--design", "candidates",
           "--store", str(store_dir), "--launcher", "direct"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    runs = store_dir / "runs"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:  # kill once at least one run is complete and another has started
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        done = list(runs.glob("*/manifest.json")) if runs.exists() else []
        started = [d for d in runs.iterdir() if d.is_dir()] if runs.exists() else []
        if done and len(started) > len(done):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(store_dir)
    before = {m["run_id"]: m["ended_at"] for m in store.manifests()}
    partial = [d.name for d in runs.iterdir() if d.is_dir() and not (d / "manifest.json").exists()]
    assert before, "the collector was killed before finishing any run"
    n_total = len(load_campaign(camp_path).candidates())
    assert len(before) < n_total
    # a partial run is never counted as complete
    assert all(store.status(r) == "interrupted" for r in partial)
    assert len(store.runs()) == len(before)

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    after = {m["run_id"]: m["ended_at"] for m in store.manifests()}
    assert len(after) == n_total == len(store.runs())  # every run exactly once
    assert all(after[r] == t for r, t in before.items())  # completed runs were not re-run
    assert all(store.status(r) == "ok" for r in partial)  # the interrupted one was redone
    assert len(list(runs.iterdir())) == n_total  # no stray folders
