"""The inference-perf launcher: the real benchmark client against an endpoint.

Renders the point's config, checks it against inference-perf's own schema, runs ``inference-perf -c`` as
a subprocess in its own process group with a wall-clock timeout (a polling loop, so a cancel or timeout
always kills the whole group), captures its log, reads its reports, and fails the run when requests
failed or were dropped (inference-perf exits 0 even then). Then it drains the server and ingests the
server's traces for the run's window into step and request tables (server clock only).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rooflab.collect.launchers import RunResult
from rooflab.collect.launchers.endpoints import Endpoint, EndpointPool
from rooflab.data.store import RunDir
from rooflab.data.sweep import SweepPoint


def inference_perf_binary() -> str:
    local = Path(sys.executable).with_name("inference-perf")
    return str(local) if local.exists() else "inference-perf"


def run_subprocess(cmd: list[str], log_path: Path, timeout_s: float, cwd: Path | None = None) -> int | None:
    """Run ``cmd`` in its own process group; None on timeout. Always leaves no child behind."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.2)
            return proc.returncode
        finally:
            if proc.poll() is None:
                for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=wait)
                        break
                    except ProcessLookupError:
                        break
                    except subprocess.TimeoutExpired:
                        continue


def client_point(point: SweepPoint, time_scale: float) -> SweepPoint:
    """The point as the client must send it to a server running ``time_scale``× faster than the wall clock."""
    if time_scale == 1.0:
        return point
    from dataclasses import replace

    from rooflab.errors import InputError

    duration = point.duration_s / time_scale
    if duration < 1 or abs(duration - round(duration)) > 1e-9:
        raise InputError(None, "endpoint.accel",
                         f"duration_s / accel = {point.duration_s:g} / {time_scale:g} must be a "
                         "whole number of seconds >= 1 (inference-perf stage durations are integers)")
    params = dict(point.params)
    params["rate"] = float(params["rate"]) * time_scale
    return replace(point, params=tuple(params.items()), duration_s=float(round(duration)))


class InferencePerfLauncher:
    name = "inference-perf"

    def __init__(self, pool: EndpointPool, *, timeout_s: float = 1800.0, drain_timeout_s: float = 300.0):
        self.pool, self.timeout_s, self.drain_timeout_s = pool, timeout_s, drain_timeout_s

    def close(self) -> None:
        """Stop the servers this launcher started."""
        self.pool.close()

    def run(self, point: SweepPoint, rd: RunDir) -> RunResult:
        from rooflab.collect.workloads import render_config, write_config

        ep = self.pool.get(point)
        with ep.lock:
            out_dir = rd.path / "inference-perf"
            # an accelerated server (the twin) runs A simulated seconds per wall second: the client sends the
            # same requests A times faster, so the server sees the point's workload in simulated time
            client = client_point(point, ep.time_scale)
            cfg = render_config(client, base_url=ep.base_url, model_name=ep.model_name, tokenizer_dir=ep.tokenizer_dir,
                                output_dir=str(out_dir))
            write_config(cfg, rd.path / "config.yaml")
            mark = ep.trace_mark()
            rc = run_subprocess([inference_perf_binary(), "-c", str(rd.path / "config.yaml")],
                                rd.path / "logs" / "inference-perf.log", self.timeout_s, cwd=rd.path)
            engine = {"kind": "endpoint", "base_url": ep.base_url}
            if rc is None:
                return RunResult("failed", f"inference-perf timed out after {self.timeout_s:g} s", engine=engine,
                                 transient=True)
            if rc != 0:
                return RunResult("failed", f"inference-perf exited with code {rc} (see logs/inference-perf.log)",
                                 engine=engine, transient=True)
            ip = client_summary(out_dir, client.n_requests)
            if ip is None:
                return RunResult("failed", "inference-perf wrote no summary_lifecycle_metrics.json", engine=engine)
            ip["time_scale"] = ep.time_scale
            ep.drain(self.drain_timeout_s)
            steplog = ep.trace_format == "steplog"
            trace_file = rd.path / "traces" / ("steplog.jsonl" if steplog else "traces.jsonl")
            n_bytes = ep.copy_traces(mark, trace_file)
            if steplog and n_bytes:
                _prepend_engine_lines(ep, mark, trace_file)
        return run_result(point, rd, out_dir, trace_file, ip=ip, engine=engine, steplog=steplog)


def client_summary(out_dir: Path, expected: int) -> dict | None:
    """inference-perf's counts from its ``summary_lifecycle_metrics.json`` in ``out_dir`` (None: no summary)."""
    summary_path = out_dir / "summary_lifecycle_metrics.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    return {"successes": int(summary.get("successes", {}).get("count", 0)),
            "failures": int(summary.get("failures", {}).get("count", 0)), "expected": expected}


def run_result(point: SweepPoint, rd: RunDir, out_dir: Path, trace_file: Path, *, ip: dict, engine: dict,
               steplog: bool) -> RunResult:
    """The run from what it left in its folder — inference-perf's reports in ``out_dir`` (counts ``ip``, from
    :func:`client_summary`) and the server's trace for the run in ``trace_file`` — failed when requests failed or
    were dropped or the server traced nothing; else its step and request tables (server clock only). Shared by
    every launcher that runs the real inference-perf (here, and a Kubernetes Job's)."""
    from rooflab.data.adapters.otel import read_otel_traces

    ok, failed, expected = ip["successes"], ip["failures"], ip["expected"]
    n_bytes = trace_file.stat().st_size if trace_file.is_file() else 0
    if failed:
        return RunResult("failed", f"{failed} of {ok + failed} requests failed (inference-perf exits 0 regardless)",
                         engine=engine, extra={"inference_perf": ip})
    if ok < expected:
        return RunResult("failed", f"only {ok} of {expected} requests were sent or completed (dropped: "
                         "prompt too long for the tokenizer, or the stage ended early)", engine=engine,
                         extra={"inference_perf": ip})
    if n_bytes == 0:
        return RunResult("failed", "the server wrote no traces for this run", engine=engine,
                         extra={"inference_perf": ip})
    if steplog:
        return _steplog_result(trace_file, rd, point, ip, engine, out_dir)
    budget = dict(point.engine).get("max_num_batched_tokens")
    tables = read_otel_traces(trace_file, run_id=rd.run_id, model=point.model,
                              tp=point.tp, hardware=point.hardware,
                              max_num_batched_tokens=int(budget) if budget is not None else None)
    req = tables.requests
    span = (req["departed_us"].max() - req["arrived_us"].min()) / 1e6 if len(req) else 0.0
    if len(req) != ok:
        ip["trace_requests"] = len(req)
    return RunResult("ok", steps=tables.steps, requests=req, gpu_seconds=float(span) * point.tp, engine=engine,
                     extra={"inference_perf": ip, "ingest": tables.report})


def _prepend_engine_lines(ep: Endpoint, mark: int, trace_file: Path) -> None:
    """The vllm-steplog ``engine`` line (vLLM version, token budget, KV blocks) is written when the server
    starts, before any run's window: copy it in front of the run's lines so each run folder is self-contained.
    It is among the file's first lines (one file per started server), so only the first MiB is read."""
    if ep.trace_path is None:  # no trace file: nothing was copied, nothing to prepend
        return
    head = b""
    with open(ep.trace_path, "rb") as fh:
        for line in fh.read(min(mark, 1 << 20)).split(b"\n"):
            if line.startswith(b'{"kind":"engine"'):
                head += line + b"\n"
    if head:
        trace_file.write_bytes(head + trace_file.read_bytes())


def _steplog_result(trace_file: Path, rd: RunDir, point: SweepPoint, ip: dict, engine: dict,
                    out_dir: Path) -> RunResult:
    """Stock vLLM: tables from the vllm-steplog lines, joined with inference-perf's per-request records
    through the response ``id`` (= ``cmpl-<X-Request-Id or vLLM's id>``) and checked against them."""
    from rooflab.data.adapters.steplog import (
        client_requests,
        match_client_requests,
        read_steplog,
    )

    tables = read_steplog(trace_file, run_id=rd.run_id, model=point.model, tp=point.tp, hardware=point.hardware)
    req = tables.requests
    report = dict(tables.report)
    per_req = out_dir / "per_request_lifecycle_metrics.json"
    if per_req.is_file():
        joined, match = match_client_requests(req, client_requests(per_req))
        report["client_match"] = match
        cols = ["request_id", "client_start_us", "client_first_chunk_us", "client_end_us"]
        req = req.merge(joined[cols].dropna(subset=["request_id"]), on="request_id", how="left")
    engine = {**engine, "kind": "vllm", "vllm": tables.engine.get("vllm"),
              "steplog_plugin": tables.engine.get("plugin")}
    span = (req["departed_us"].max() - req["arrived_us"].min()) / 1e6 if len(req) else 0.0
    if len(req) != ip["successes"]:
        ip["trace_requests"] = len(req)
    return RunResult("ok", steps=tables.steps, requests=req, gpu_seconds=float(span) * point.tp, engine=engine,
                     extra={"inference_perf": ip, "ingest": report})
