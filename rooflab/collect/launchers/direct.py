"""The direct launcher: a sweep point through the twin's fast mode (no HTTP, no sleeping).

Same run folder layout and tables as a real run: the tables come from the engine itself (exact step
times, server-clock lifecycles); traces are written only on request (``traces=True``), since full
per-request snapshots cost ~0.3 ms per step. GPU-seconds = simulated span (first arrival to last
departure) × TP.

The tables do not depend on whether traces are written: a traced step also samples the scheduler's CPU time
(the trace's ``step.duration_us``), which must not consume the truth model's random stream (its step-time noise,
stragglers, MoE routing and request overheads). So that sample comes from a second truth model of its own seed
(:class:`_TracedTimer`), and one run id holds the same tables with and without ``--direct-traces``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from rooflab.collect.launchers import RunResult
from rooflab.data.store import RunDir
from rooflab.data.sweep import SweepPoint
from rooflab.model.arch import load_model
from rooflab.model.hardware import load_hardware

if TYPE_CHECKING:
    from rooflab.twin.truth import TruthModel


CPU_SEED_OFFSET = 0x5EED  # the scheduler-CPU sampler's seed: the point's seed + this


class _TracedTimer:
    """The engine's step timer when traces are written: step times from the truth model, the scheduler CPU time
    of each traced step from a separate sampler (see the module doc)."""

    def __init__(self, truth: TruthModel, cpu: TruthModel):
        self.truth, self.cpu = truth, cpu

    def step_time_us(self, decode_contexts: np.ndarray, prefills: list[tuple[int, int, int]], n_logits: int) -> float:
        return float(self.truth.step_time_us(decode_contexts, prefills, n_logits))

    def scheduler_cpu_us(self, n_requests: int) -> float:
        return float(self.cpu.scheduler_cpu_us(n_requests))


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
        timer = truth if not self.traces else _TracedTimer(
            truth, TruthModel.from_config(hw.name, arch, point.tp, seed=seed + CPU_SEED_OFFSET))
        engine = Engine(arch, hw, point.tp, timer, EngineConfig(**options), seed=seed)
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
