"""Benchmark: simulated steps per second of the twin's fast (discrete-event) mode, on one core.

Run: .venv/bin/python benchmarks/twin_fast_mode.py [--model llama-3.1-8b] [--tp 1] [--seconds 120]
Each of the seed's workload families runs `--seconds` of simulated load (rate × seconds requests with
fixed lengths, Poisson arrivals) through the engine with the hidden truth model as step timer (noise,
stragglers and α overheads on). Prints steps, wall seconds and steps/s per workload, and the total.
Target (docs/spec.md §12): ≥ 20,000 simulated steps/s.
"""

from __future__ import annotations

import argparse
import time

from rooflab.model.arch import load_model
from rooflab.model.engine_config import EngineConfig
from rooflab.model.hardware import load_hardware
from rooflab.twin.engine import Engine
from rooflab.twin.simulate import constant_rate_workload, simulate
from rooflab.twin.truth import TruthModel

# (name, rate req/s, input tokens, output tokens) — the seed's families (docs/spec.md §3)
WORKLOADS = [
    ("W1 prefill 4K", 0.5, 4096, 1),
    ("W1 prefill 8K", 0.5, 8192, 1),
    ("W2 decode ctx 1K", 0.5, 1024, 512),
    ("W3 rate 8", 8, 256, 256),
    ("W3 rate 32", 32, 256, 256),
    ("W3 rate 128", 128, 256, 256),
    ("W4-A mix", 128, 1024, 4),
    ("W4-C mix", 32, 64, 1024),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--hardware", default="H100-SXM")
    ap.add_argument("--seconds", type=float, default=120)
    args = ap.parse_args()
    arch, hw = load_model(args.model), load_hardware(args.hardware)
    total_steps = total_wall = 0.0
    print(f"{'workload':18s} {'requests':>8s} {'steps':>8s} {'wall s':>7s} {'steps/s':>9s}")
    for name, rate, inp, out in WORKLOADS:
        truth = TruthModel.from_config(hw.name, arch, args.tp, seed=0)
        engine = Engine(arch, hw, args.tp, truth, EngineConfig(max_model_len=16384))
        reqs = constant_rate_workload(rate, max(1, int(rate * args.seconds)), inp, out, seed=0)
        t0 = time.perf_counter()
        res = simulate(engine, reqs, overheads=truth)
        wall = time.perf_counter() - t0
        total_steps += res.n_steps
        total_wall += wall
        print(f"{name:18s} {len(reqs):8d} {res.n_steps:8d} {wall:7.2f} {res.n_steps / wall:9.0f}")
    print(f"{'all':18s} {'':8s} {int(total_steps):8d} {total_wall:7.2f} {total_steps / total_wall:9.0f}"
          "   (target ≥ 20,000 steps/s)")


if __name__ == "__main__":
    main()
