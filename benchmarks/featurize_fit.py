"""Benchmark: featurize and fit 1,000,000 synthetic steps (target ≤ 10 s on 2 cores).

Run: .venv/bin/python benchmarks/featurize_fit.py [--steps 1000000] [--boot 200]
Prints the seconds of each stage. Steps come from rooflab.data.synthetic (6 settings: dense, MoE, TP 1–8), 100
runs, step times from known β with 3% noise; the fit includes λ selection by leave-one-run-out and the
200-draw whole-run bootstrap.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from rooflab.data.synthetic import TRUE_BETA, synthetic_steps, with_step_times
from rooflab.fit.beta import fit_beta
from rooflab.model.features import featurize
from rooflab.model.variants import get_variant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--boot", type=int, default=200)
    args = ap.parse_args()
    steps = with_step_times(synthetic_steps(n_runs=args.runs, steps_per_run=args.steps // args.runs))
    v = get_variant("roofline7")
    print(f"steps: {len(steps):,} in {args.runs} runs; cores: {os.cpu_count()}")

    t0 = time.perf_counter()
    feats = featurize(steps)
    t1 = time.perf_counter()
    X = v.design_matrix(feats)
    fit = fit_beta(X, steps["step_time_us"].to_numpy(), steps["run_id"].to_numpy(), v, n_boot=args.boot)
    t2 = time.perf_counter()
    err = np.max(np.abs(fit.beta / TRUE_BETA - 1))
    print(f"featurize: {t1 - t0:.2f} s")
    print(f"fit (λ by leave-one-run-out over {len(fit.runs)} runs, {args.boot} bootstrap draws): {t2 - t1:.2f} s")
    print(f"total: {t2 - t0:.2f} s (target ≤ 10 s)   max |β/β_true − 1| = {err:.3f}")


if __name__ == "__main__":
    main()
