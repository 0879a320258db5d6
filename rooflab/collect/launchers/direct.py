"""The direct launcher: a sweep point through the twin's fast mode (no HTTP, no sleeping).

Same run folder layout and tables as a real run: the tables come from the engine itself (exact step
times, server-clock lifecycles); traces are written only on request (``traces=True``), since full
per-request snapshots cost ~0.3 ms per step. GPU-seconds = simulated span (first arrival to last
departure) × TP.
"""

from __future__ import annotations

from typing import Any

from rooflab.collect.launchers import RunResult
from rooflab.data.store import RunDir
from rooflab.data.sweep import SweepPoint
from rooflab.model.arch import load_model
from rooflab.model.hardware import load_hardware


class DirectLauncher:
    name = "direct"

    def __init__(self, *, traces: bool = False):
        self.traces = traces

    def close(self) -> None:
        """Nothing to stop: the direct launcher starts no server."""

    def run(self, point: SweepPoint, rd: RunDir) -> RunResult:
        from rooflab.collect.workloads import point_requests
        from rooflab.model.engine_config import EngineConfig
        from rooflab.twin.engine import Engine
        from rooflab.twin.otel import TraceWriter
        from rooflab.twin.simulate import simulate
        from rooflab.twin.truth import TruthModel

        arch, hw = load_model(point.model), load_hardware(point.hardware)
        seed = point.seed
        truth = TruthModel.from_config(hw.name, arch, point.tp, seed=seed)
        options: dict[str, Any] = dict(point.engine)
        engine = Engine(arch, hw, point.tp, truth, EngineConfig(**options), seed=seed)
        reqs = point_requests(point, seed=seed)
        if self.traces:
            with TraceWriter(rd.sub("traces", "traces.jsonl"), seed=seed) as w:
                res = simulate(engine, reqs, overheads=truth, trace=w, run_id=rd.run_id)
        else:
            res = simulate(engine, reqs, overheads=truth, run_id=rd.run_id)
        q = res.requests
        rejected = int((q["status"] == "rejected").sum())
        span = (q["departed_us"].max() - q["arrived_us"].min()) / 1e6 if len(q) else 0.0
        engine_info = {"kind": "twin-direct", "num_gpu_blocks": engine.num_blocks,
                       "max_model_len": engine.max_model_len}
        if rejected:
            return RunResult("failed", f"{rejected} of {len(q)} requests were rejected by the server (HTTP 400)",
                             steps=res.steps, requests=q, gpu_seconds=float(span) * point.tp, engine=engine_info)
        return RunResult("ok", steps=res.steps, requests=q, gpu_seconds=float(span) * point.tp, engine=engine_info,
                         extra={"simulated_steps": res.n_steps})
