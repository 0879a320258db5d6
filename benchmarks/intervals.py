"""Prediction-interval coverage (issue 18): how often the 90% interval of a replayed statistic (mean / P90 / P99 of
TTFT, ITL, E2E) covers the measured value of a *held-out* run.

    .venv/bin/python benchmarks/intervals.py [--quick] [--draws 30] [--skip-real]      # make bench-intervals

Runtime: about 9 minutes on 2 shared cores (twin ~3, real ~6); ``--quick`` about 3.

**Twin** (truth known, richer than the fitted formula): 24 twin runs of two dense models (Llama-3.1-8B,
Qwen2.5-7B, TP1, H100) with random Poisson workloads (rate 2–30 req/s, lognormal prompts 150–2,500 and outputs
40–400 tokens, 45 s each); fit on 10 runs (step records + requests, ``calibrate``), hold out 14. Each held-out run is
replayed with K posterior draws (common random numbers) for three intervals: coefficients only; coefficients +
the model-discrepancy term estimated from leave-one-run-out residuals of the *training* runs; and the same with
the discrepancy estimated on the held-out runs themselves (an oracle, to show the ceiling).

**Real** (``../shared/data/real``, request-level runs, the split of ``benchmarks/replay_real.py``): β/α
calibrated end to end on the 6 training runs (stacked fixed point, no polish, for time), posterior by the whole-run
bootstrap of the stacked design; discrepancy from linearised leave-one-run-out residuals of the training runs, and,
for a model the fit has not seen, from leave-one-model-out residuals; coverage on the 3 held-out runs of trained
models and on the 3 runs of the held-out model (Llama-2-7B), each replayed on a 240 s window (after a 30 s unscored
warm-up).

Prints the figures, writes ``benchmarks/results/intervals-coverage.csv`` (one row per run × statistic × interval
kind) and the pictures ``docs/intervals_calibration.png`` (nominal vs empirical coverage) and
``docs/intervals_pred_vs_measured.png`` (predicted vs measured with interval bars).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rooflab.data.trace_readers import trace_from_request_table  # noqa: E402
from rooflab.data.traces import Trace  # noqa: E402
from rooflab.fit.calibration import Options, calibrate  # noqa: E402
from rooflab.fit.discrepancy import loro_residuals, with_cv_discrepancy  # noqa: E402
from rooflab.model.arch import load_model  # noqa: E402
from rooflab.model.engine_config import EngineConfig  # noqa: E402
from rooflab.model.hardware import load_hardware  # noqa: E402
from rooflab.replay.interval_plots import plot_calibration, plot_intervals  # noqa: E402
from rooflab.replay.intervals import (  # noqa: E402
    KEYS,
    IntervalReplay,
    coverage,
    coverage_curve,
    discrepancy_sd,
    log_residuals,
    replay_intervals,
    run_statistics,
)
from rooflab.replay.predict import replay  # noqa: E402
from rooflab.twin.engine import Engine, Request  # noqa: E402
from rooflab.twin.simulate import simulate  # noqa: E402
from rooflab.twin.truth import TruthModel  # noqa: E402

LEVEL = 0.9
TWIN_MODELS = ("llama-3.1-8b", "qwen2.5-7b")
ENGINE = {"max_num_seqs": 128, "max_num_batched_tokens": 2048, "max_model_len": 4096}
HW = "H100-SXM"
KINDS = ("coefficients", "coefficients+discrepancy", "oracle discrepancy")
LOMO = "coefficients+cross-model disc."  # discrepancy from leave-one-model-out residuals (real data)


def twin_run(model: str, seed: int, duration_s: float) -> tuple[pd.DataFrame, pd.DataFrame, Trace, dict]:
    """One twin run with a random workload: (steps, requests, trace, workload)."""
    rng = np.random.default_rng(seed)
    rate = float(np.exp(rng.uniform(np.log(2), np.log(30))))
    pmean = float(np.exp(rng.uniform(np.log(150), np.log(2500))))
    omean = float(np.exp(rng.uniform(np.log(40), np.log(400))))
    n = max(20, int(rate * duration_s))
    arr = np.cumsum(rng.exponential(1e6 / rate, n))
    prompt = np.clip(rng.lognormal(np.log(pmean), 0.5, n), 16, 3500).astype(int)
    out = np.clip(rng.lognormal(np.log(omean), 0.5, n), 2, 500).astype(int)
    arch, hw = load_model(model), load_hardware(HW)
    truth = TruthModel.from_config(HW, arch, 1, seed=seed)
    engine = Engine(arch, hw, 1, truth, EngineConfig(**ENGINE), seed=seed)
    reqs = [Request(f"r{i}", float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arr, prompt, out))]
    run_id = f"twin-{model}-{seed}"
    sim = simulate(engine, reqs, overheads=truth, run_id=run_id)
    steps = sim.steps.assign(workload="random", split="train")
    trace = trace_from_request_table(sim.requests, run_id=run_id, model=model, tp=1, hardware=HW, engine=dict(ENGINE))
    return steps, sim.requests, trace, {"rate": rate, "prompt_mean": pmean, "output_mean": omean, "requests": n}


def rows_of(kind: str, results: list[IntervalReplay], group: str, source: str) -> list[dict]:
    return [{"source": source, "group": group, "interval": kind, "run": r.run_id, "statistic": k,
             "lower_ms": iv.lower_ms, "median_ms": iv.median_ms, "upper_ms": iv.upper_ms, "point_ms": iv.point_ms,
             "measured_ms": iv.measured_ms, "covered": iv.covered, "draws": r.n_draws, "level": r.level}
            for r in results for k, iv in r.intervals.items()]


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.0f}%"


def width(results: list[IntervalReplay]) -> float:
    """Median relative width of the intervals, (upper − lower) / median: how sharp they are."""
    w = [(iv.upper_ms - iv.lower_ms) / iv.median_ms for r in results for iv in r.intervals.values()
         if iv.median_ms and np.isfinite(iv.median_ms)]
    return float(np.median(w)) if w else float("nan")


def print_coverage(title: str, table: dict[str, list[IntervalReplay]]) -> None:
    print(f"\n{title}: share of held-out statistics inside their {LEVEL:.0%} interval; width = median "
          "(upper − lower) / median")
    print(f"  {'interval':31s} {'cells':>5s} {'all':>5s} {'width':>6s} " + " ".join(f"{k:>9s}" for k in KEYS))
    for kind, res in table.items():
        c = coverage(res)
        print(f"  {kind:31s} {c['cells']:5d} {_pct(c['coverage']):>5s} {_pct(width(res)):>6s} "
              + " ".join(f"{_pct(c['per_statistic'][k]):>9s}" for k in KEYS))


# ---------------------------------------------------------------------------------------------------
# twin


def twin(draws: int, quick: bool, log=print) -> tuple[dict[str, list[IntervalReplay]], list[dict], dict]:
    t0 = time.perf_counter()
    n_train, n_held = (6, 6) if quick else (10, 14)
    duration = 30.0 if quick else 45.0
    runs = [twin_run(TWIN_MODELS[i % 2], 100 + i, duration) for i in range(n_train + n_held)]
    train, held = runs[:n_train], runs[n_train:]
    t_sim = time.perf_counter() - t0
    steps = pd.concat([r[0] for r in train], ignore_index=True)
    requests = pd.concat([r[1] for r in train], ignore_index=True)
    calib = calibrate(steps, requests, Options(n_boot=100))
    assert calib.fit_state is not None and calib.posterior is not None
    log(f"twin: {len(runs)} runs simulated in {t_sim:.0f} s; fit on {n_train} runs ({calib.beta.n_steps} steps): "
        + ", ".join(f"{n}={v:.3g}±{s:.2g}" for n, v, s in zip(calib.posterior.names, calib.posterior.mean,
                                                                calib.posterior.sd)))
    coefs = calib.coefficients()
    cv = loro_residuals(calib.fit_state, {r[2].run_id: r[2] for r in train})
    post_cv = with_cv_discrepancy(calib.posterior, cv, "leave-one-run-out residuals of the training runs")
    log("twin: discrepancy sd (log scale) " + ", ".join(f"{k}={v:.3f}" for k, v in post_cv.discrepancy.items()))
    plain = replace(coefs, posterior=calib.posterior)
    with_cv = replace(coefs, posterior=post_cv)
    results: dict[str, list[IntervalReplay]] = {k: [] for k in KINDS}
    for _, _, tr, _ in held:
        results[KINDS[0]].append(replay_intervals(tr, plain, level=LEVEL, draws=draws, seed=1,
                                                  use_posterior_discrepancy=False))
        results[KINDS[1]].append(replay_intervals(tr, with_cv, level=LEVEL, draws=draws, seed=1))
    # oracle: the discrepancy estimated on the held-out runs themselves (the ceiling a perfect estimate reaches)
    held_res = [log_residuals({k: np.nan if iv.measured_ms is None else iv.measured_ms
                               for k, iv in r.intervals.items()},
                              {k: iv.point_ms for k, iv in r.intervals.items()}) for r in results[KINDS[0]]]
    oracle = replace(coefs, posterior=calib.posterior.with_discrepancy(
        discrepancy_sd(held_res), "oracle: the held-out runs' own residuals"))
    for _, _, tr, _ in held:
        results[KINDS[2]].append(replay_intervals(tr, oracle, level=LEVEL, draws=draws, seed=1))
    info = {"runs": len(runs), "train": n_train, "held_out": n_held, "seconds": time.perf_counter() - t0,
            "discrepancy": post_cv.discrepancy}
    rows = [row for kind, res in results.items() for row in rows_of(kind, res, "held-out runs", "twin")]
    return results, rows, info


# ---------------------------------------------------------------------------------------------------
# real


def real(draws: int, quick: bool, log=print) -> tuple[dict[str, dict[str, list[IntervalReplay]]], list[dict], dict]:
    from benchmarks.replay_real import HELD_OUT_MODEL, HELD_OUT_RUNS, TRAIN
    from rooflab.data.adapters.real_requests import DEFAULT_ROOT
    from rooflab.data.trace_readers import read_real_trace
    from rooflab.fit.replay_posterior import e2e_posterior, linearised_loro
    from rooflab.fit.request_level import E2EOptions, calibrate_e2e
    from rooflab.model.coefficients import Coefficients

    t0 = time.perf_counter()
    root = Path(DEFAULT_ROOT)
    if not (root / "requests").is_dir():
        log(f"real: {root} not found, skipped")
        return {}, [], {}
    train = [read_real_trace(n, root) for n in TRAIN]
    opts = E2EOptions(iterations=2 if quick else 3, polish_evals=0, window_s=120.0 if quick else 180.0)
    e2e = calibrate_e2e(train, None, opts)
    log(f"real: end-to-end calibration on {len(train)} runs in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{k}={v:.3g}" for k, v in e2e.coefficients.beta.items())
        + ", α=" + ", ".join(f"{a:.3g}" for a in e2e.coefficients.alpha))
    post, designs = e2e_posterior(train, e2e.coefficients, opts, n_boot=60 if quick else 100, seed=0)
    coefs = replace(e2e.coefficients, posterior=post)
    window = 120.0 if quick else 240.0

    def win(tr: Trace) -> Trace:
        span = (tr.requests["arrival_us"].max() - tr.requests["arrival_us"].min()) / 1e6
        t = max(30.0, span / 2 - window / 2)
        return tr.window(t, t + window, 30.0)

    def residuals(left_out: dict[str, Coefficients]) -> dict[str, dict[str, float]]:
        out = {}
        for tr in train:
            res = replay(win(tr), left_out[tr.run_id]).requests
            out[tr.run_id] = log_residuals(run_statistics(res, predicted=False), run_statistics(res))
        return out

    cv = residuals(linearised_loro(designs, e2e.coefficients, opts))
    post_cv = with_cv_discrepancy(post, cv, "linearised leave-one-run-out residuals of the training runs")
    # leave-one-model-out: what the formula gets wrong for a model the fit has not seen
    lomo = residuals(linearised_loro(designs, e2e.coefficients, opts, groups={tr.run_id: tr.model for tr in train}))
    post_lomo = with_cv_discrepancy(post, lomo, "linearised leave-one-model-out residuals of the training runs")
    log("real: posterior " + post.method)
    for what, p in (("leave-one-run-out", post_cv), ("leave-one-model-out", post_lomo)):
        log(f"real: {what} discrepancy sd " + ", ".join(f"{k}={v:.3f}" for k, v in p.discrepancy.items()))
    with_cv = replace(coefs, posterior=post_cv)
    with_lomo = replace(coefs, posterior=post_lomo)
    groups = {"held-out runs": HELD_OUT_RUNS, "held-out model": HELD_OUT_MODEL}
    out: dict[str, dict[str, list[IntervalReplay]]] = {}
    rows = []
    for g, names in groups.items():
        out[g] = {KINDS[0]: [], KINDS[1]: []}
        if g == "held-out model":
            out[g][LOMO] = []
        for n in names[:2] if quick else names:
            tr = win(read_real_trace(n, root))
            out[g][KINDS[0]].append(replay_intervals(tr, coefs, level=LEVEL, draws=draws, seed=1,
                                                     use_posterior_discrepancy=False))
            out[g][KINDS[1]].append(replay_intervals(tr, with_cv, level=LEVEL, draws=draws, seed=1))
            if g == "held-out model":
                out[g][LOMO].append(replay_intervals(tr, with_lomo, level=LEVEL, draws=draws, seed=1))
            log(f"real: {g} {n[16:]} done ({time.perf_counter() - t0:.0f} s)")
        rows += [row for kind, res in out[g].items() for row in rows_of(kind, res, g, "real")]
    info = {"seconds": time.perf_counter() - t0, "discrepancy": post_cv.discrepancy,
            "discrepancy_cross_model": post_lomo.discrepancy, "posterior": post.method}
    return out, rows, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=30, help="posterior draws replayed per run and interval")
    ap.add_argument("--quick", action="store_true", help="fewer and shorter runs (a smoke check, ~2 minutes)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "intervals-coverage.csv")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tw, rows, tinfo = twin(args.draws, args.quick)
    print_coverage(f"twin ({tinfo['held_out']} held-out runs, {args.draws} draws)", tw)
    curves = {f"twin: {k}": tw[k] for k in KINDS}
    rinfo: dict = {}
    if not args.skip_real:
        rl, rrows, rinfo = real(args.draws, args.quick)
        rows += rrows
        for g, table in rl.items():
            print_coverage(f"real, {g} ({args.draws} draws)", table)
            curves[f"real {g}: {KINDS[1]}"] = table[KINDS[1]]
            if LOMO in table:
                curves[f"real {g}: {LOMO}"] = table[LOMO]
    levels = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    plot_calibration({k: coverage_curve(v, levels) for k, v in curves.items()}, levels,
                     args.docs / "intervals_calibration.png")
    plot_intervals(tw[KINDS[1]], args.docs / "intervals_pred_vs_measured.png",
                   title=f"twin held-out runs, {LEVEL:.0%} intervals (coefficients + discrepancy)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False, float_format="%.6g")
    import os

    print(f"\nwrote {args.out}, {args.docs / 'intervals_calibration.png'}, "
          f"{args.docs / 'intervals_pred_vs_measured.png'}")
    print(f"runtime {time.perf_counter() - t0:.0f} s (twin {tinfo['seconds']:.0f} s"
          + (f", real {rinfo['seconds']:.0f} s" if not args.skip_real and rinfo else "")
          + f") on {os.cpu_count()} cores, {args.draws} draws per interval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
