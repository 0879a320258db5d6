"""End to end: the real inference-perf binary against `rooflab twin serve` on 127.0.0.1, and the server's
traces ingested back into step and request tables that match inference-perf's own report."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rooflab.collect.launchers.endpoints import free_port, wait_healthy
from rooflab.data.adapters.otel import read_otel_traces
from rooflab.twin.tokenizer import ensure_tokenizer

pytestmark = pytest.mark.slow
N_REQ, PROMPT, OUTPUT = 30, 200, 24


def test_inference_perf_against_the_twin(tmp_path):
    cache = tmp_path / "cache"
    tok = ensure_tokenizer(cache / "tokenizer")
    port = free_port()
    trace = tmp_path / "traces.jsonl"
    env = {**os.environ, "ROOFLAB_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "rooflab.twin", "serve", "--model", "llama-3.1-8b", "--tp", "1",
                             "--port", str(port), "--accel", "20", "--trace", str(trace), "--seed", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, 120, "twin")
        out = tmp_path / "ip-out"
        cfg = {
            "api": {"type": "completion", "streaming": True},
            "data": {"type": "random",
                     "input_distribution": {"type": "fixed", "mean": PROMPT, "min": PROMPT, "max": PROMPT,
                                            "std_dev": 0},
                     "output_distribution": {"type": "fixed", "mean": OUTPUT, "min": OUTPUT, "max": OUTPUT,
                                             "std_dev": 0}},
            "load": {"type": "constant", "stages": [{"rate": 10, "duration": N_REQ // 10}]},
            "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": True}},
            "storage": {"local_storage": {"path": str(out)}},
            "server": {"type": "vllm", "model_name": "llama-3.1-8b", "base_url": base, "ignore_eos": True},
            "tokenizer": {"pretrained_model_name_or_path": str(tok)},
        }
        cfg_path = tmp_path / "config.yml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        binary = Path(sys.executable).with_name("inference-perf")
        ip = subprocess.run([str(binary), "-c", str(cfg_path)], capture_output=True, text=True, timeout=300, env=env)
        assert ip.returncode == 0, ip.stdout[-3000:] + ip.stderr[-3000:]
    finally:
        proc.send_signal(signal.SIGINT)  # graceful: the server closes its trace file
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    summary = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    assert summary["successes"]["count"] == N_REQ
    assert summary.get("failures", {}).get("count", 0) == 0
    per_req = json.loads((out / "per_request_lifecycle_metrics.json").read_text())
    assert len(per_req) == N_REQ and all(r["error"] is None for r in per_req)
    usage = [json.loads(r["response"].strip().split("\n\n")[-2][6:])["usage"] for r in per_req]
    assert all(u["prompt_tokens"] == PROMPT and u["completion_tokens"] == OUTPUT for u in usage)

    tables = read_otel_traces(trace, run_id="e2e", model="llama-3.1-8b", tp=1, hardware="H100-SXM",
                              max_num_batched_tokens=2048)
    req = tables.requests
    assert len(req) == N_REQ and (req.prompt_tokens == PROMPT).all() and (req.output_tokens == OUTPUT).all()
    steps = tables.steps
    assert steps.prefill_tokens.sum() == N_REQ * PROMPT  # every prompt token computed exactly once
    assert steps.decode_reqs.sum() == N_REQ * (OUTPUT - 1)  # the first token comes from the prefill step
    assert steps.step_time_us.notna().sum() > 0.5 * len(steps)
    # α signals are there: API overhead and post-decode overhead, on the server clock
    assert ((req.queued_us - req.arrived_us) > 0).all() and ((req.departed_us - req.finished_us) > 0).all()
