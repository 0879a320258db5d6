"""``rooflab replay`` and ``rooflab calibrate-e2e``: request-level validation of a coefficient set against
measured request traces, and end-to-end calibration of β/α from request data only.

Before any replay both say what they assumed (:mod:`cli.replay_inputs`): an ``assumed:`` line per engine
setting filled with vLLM's defaults, a ``note:`` line per remark of a trace's reader (a BLIS trace's warnings, a
client concurrency cap), and a ``warning:`` line (stderr) when the coefficient set's own health check failed or
a fitted α sits at a bound. ``--out`` / ``--json`` carry the same under each run (``setup``) plus the measured
and predicted P50 / P90 / P99 of every metric.

``replay --interval 0.9`` replays posterior draws of the coefficient set (:mod:`rooflab.replay.intervals`) and
prints each statistic as the median with its interval, the probability of each ``--slo``, and what the interval
covers (:mod:`cli.replay_intervals`).

``replay --blis-results PATH`` writes the predictions as BLIS SimResult JSON
(:func:`rooflab.replay.blis_output.write_blis_results`): with one trace to ``PATH``; with several, one file per
run, ``<PATH stem>.<run>.json`` beside ``PATH``; when ``PATH`` is an existing folder, ``PATH/<run>.json``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import typer

from cli.app import app, check_range
from cli.replay_inputs import (
    REQ_HELP,
    announce,
    coefficient_warnings,
    engine_overrides,
    load_traces,
    setup_of,
)
from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.model.variants import DEFAULT_VARIANT, get_variant

QUANTILES = (50, 90, 99)
_VLLM_HELP = "vLLM version the traces ran on: its server defaults fill unstated engine settings (default 0.15.1)"
_GMU_HELP = "fraction of GPU memory vLLM may use; sizes the KV cache where a trace gives no block count"
_CAP_HELP = "replay with a closed-loop client of at most N requests in flight (overrides a cap found in a trace)"


def add_percentiles(c: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    """``c`` (:func:`rooflab.replay.metrics.compare` of ``frame``) with the measured and predicted P50 / P90 / P99
    of each metric in ms (``measured_p90_ms``, ``predicted_p90_ms``, …), over the requests compare scores."""
    df = frame[frame["scored"].to_numpy(dtype=bool)] if "scored" in frame else frame
    both = ~df["failed"].to_numpy(dtype=bool) & ~df["pred_failed"].to_numpy(dtype=bool)
    for m in ("ttft", "itl", "e2e"):
        x = c.get(m)
        if not isinstance(x, dict) or not x.get("n"):
            continue
        y = df[f"{m}_us"].to_numpy(dtype=float)
        p = df[f"pred_{m}_us"].to_numpy(dtype=float)
        k = both & np.isfinite(y) & np.isfinite(p) & (y > 0)
        for q in QUANTILES:
            x.setdefault(f"measured_p{q}_ms", float(np.percentile(y[k], q)) / 1e3)
            x.setdefault(f"predicted_p{q}_ms", float(np.percentile(p[k], q)) / 1e3)
    return c


def blis_results_paths(path: Path, runs: list[str]) -> dict[str, Path]:
    """Where ``--blis-results`` writes each run (the module docstring)."""
    def safe(run: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", run)

    if path.is_dir():
        return {r: path / f"{safe(r)}.json" for r in runs}
    if len(runs) == 1:
        return {runs[0]: path}
    return {r: path.with_name(f"{path.stem}.{safe(r)}{path.suffix or '.json'}") for r in runs}


@app.command()
def replay(
    coefficients: Path = typer.Option(..., "--coefficients", help="fitted coefficients: `rooflab fit --out` JSON, "
                                      "`rooflab export --format json`, `calibrate-e2e --out`, a BLIS YAML, or a "
                                      "registered calibration models:/NAME@champion (or /VERSION) in --mlruns"),
    requests: list[str] = typer.Option(..., "--requests", help=REQ_HELP),
    root: Path | None = typer.Option(None, help="real data folder (default ../shared/data/real)"),
    prefix: str = typer.Option("prompt", help="real runs: prefix cache groups prompt | system | none"),
    model: str | None = typer.Option(None), tp: int | None = typer.Option(None),
    hardware: str | None = typer.Option(None, help="GPU where the trace does not say (default H100-SXM)"),
    vllm_version: str | None = typer.Option(None, "--vllm-version", help=_VLLM_HELP),
    max_num_seqs: int | None = typer.Option(None), max_num_batched_tokens: int | None = typer.Option(None),
    num_gpu_blocks: int | None = typer.Option(None), max_model_len: int | None = typer.Option(None),
    gpu_memory_utilization: float | None = typer.Option(None, "--gpu-memory-utilization", help=_GMU_HELP),
    prefix_caching: bool | None = typer.Option(None, "--prefix-caching/--no-prefix-caching"),
    max_concurrency: int | None = typer.Option(None, "--max-concurrency", help=_CAP_HELP),
    mlruns: Path = typer.Option(Path("mlruns"), "--mlruns", help="the MLflow store of a models:/ --coefficients"),
    window: str | None = typer.Option(None, help="replay only requests arriving in START:END seconds "
                                                    "(after a 30 s warm-up that is not scored)"),
    no_timeout: bool = typer.Option(False, "--no-timeout", help="never abort requests at the client timeout"),
    plot: Path | None = typer.Option(None, help="predicted-vs-measured plot (PNG)"),
    out: Path | None = typer.Option(None, help="write metrics (JSON) here"),
    per_request: Path | None = typer.Option(None, help="write per-request predictions (.parquet/.csv)"),
    blis_results: Path | None = typer.Option(None, "--blis-results", help="write the predictions as BLIS "
                                             "SimResult JSON (`blis calibrate --sim-results`): one trace to PATH; "
                                             "several to <PATH stem>.<run>.json beside it; an existing folder "
                                             "gets <run>.json per run"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of the table"),
    interval: float | None = typer.Option(None, "--interval", help="also replay posterior draws and report each "
                                          "statistic's median with this central interval (e.g. 0.9)"),
    draws: int = typer.Option(30, "--draws", help="--interval: posterior draws replayed per run (2-1000)"),
    slo: list[str] | None = typer.Option(None, "--slo", help="--interval: an SLO whose probability to report, "
                                         "METRIC_STAT=LIMIT (ttft|itl|e2e, mean|p90|p99, ms|s|us), e.g. "
                                         "ttft_p99=300ms; repeatable"),
    no_discrepancy: bool = typer.Option(False, "--no-discrepancy", help="--interval: leave the coefficient set's "
                                        "model-discrepancy term out (coefficient uncertainty only)"),
    arrival_noise: bool = typer.Option(False, "--arrival-noise", help="--interval: each draw also resamples the "
                                       "inter-arrival gaps (a forecast for the same workload, not these arrivals)"),
    seed: int = typer.Option(0, "--seed", help="--interval: seed of the draws (common to every run)"),
):
    """Replay request traces through the twin's scheduler with the fitted step-time model and α; compare the
    predicted TTFT / ITL / E2E with the measured ones (per run: APE of mean / P90 / P99, per-request APE,
    Pearson r, grade). Engine settings a trace does not give are vLLM's defaults, each one printed. With
    --interval, each statistic also gets a prediction interval from the coefficient set's posterior."""
    from rooflab import replay as rp
    from rooflab.replay.blis_output import write_blis_results
    from rooflab.replay.intervals import parse_slo, replay_intervals

    check_range(interval, "--interval", 0.01, 0.999)
    check_range(draws, "--draws", 2, 1000)
    slos = [parse_slo(t) for t in slo or []]
    if slos and interval is None:
        raise InputError(None, "--slo", "needs --interval (the SLO probability is over posterior draws)")

    engine = engine_overrides(max_num_seqs, max_num_batched_tokens, num_gpu_blocks, max_model_len, prefix_caching,
                              gpu_memory_utilization)
    registered = str(coefficients).startswith("models:")
    if registered:
        from tracking.registry import coefficients_from_model_uri
        from tracking.store import existing_tracking

        coefs = coefficients_from_model_uri(existing_tracking(mlruns), str(coefficients))
    else:
        coefs = rp.load_coefficients(coefficients)
    traces = load_traces(requests, root=root, prefix=prefix, model=model, tp=tp, hardware=hardware, engine=engine,
                         window=window, max_concurrency=max_concurrency, vllm_version=vllm_version)
    warnings = coefficient_warnings(None if registered else coefficients, coefs)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not as_json:
        for note in coefs.notes:
            print(f"note: {note}")
    announce(traces, as_json)
    blis_paths = blis_results_paths(blis_results, [tr.run_id for tr, _ in traces]) if blis_results else {}
    if interval is not None and coefs.posterior is None:
        raise InputError(coefficients, "posterior", "this coefficient set has no posterior, so --interval has "
                         "nothing to draw from (refit with `rooflab fit`, or use a registered calibration)")
    results, frames, ivs = {}, {}, {}
    for tr, assumed in traces:
        res = rp.replay(tr, coefs, timeout=not no_timeout)
        c = add_percentiles(rp.compare(res), res.requests)
        if interval is not None:
            ivs[tr.run_id] = iv = replay_intervals(tr, coefs, level=interval, draws=draws, seed=seed, slos=slos,
                                                   use_posterior_discrepancy=not no_discrepancy,
                                                   arrival_noise=arrival_noise, timeout=not no_timeout)
            c["intervals"] = iv.to_dict()
        c["replay"] = {"steps": res.n_steps, "wall_s": round(res.wall_s, 3), "steps_per_s": round(res.steps_per_s),
                       "sim_s": res.sim_time_s, **res.stats}
        if c["measured_failed"] or c["predicted_failed"]:
            c["saturation"] = rp.saturation_report(res)
        c["setup"] = setup_of(tr, assumed)
        if tr.run_id in blis_paths:
            c["blis_results"] = str(write_blis_results(res.requests, blis_paths[tr.run_id]))
        results[tr.run_id] = c
        frames[tr.run_id] = res.requests
    doc = {"coefficients": coefs.to_dict(), "warnings": warnings, "runs": results}
    if plot:
        rp.plot_replay(frames, plot)
    if per_request:
        df = pd.concat([f.assign(run_id=k) for k, f in frames.items()], ignore_index=True)
        df["prefix_group"] = df["prefix_group"].astype("string")
        per_request.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(per_request, index=False) if per_request.suffix == ".csv" else df.to_parquet(per_request)
    if out:
        atomic_write_text(out, json_dumps(doc))
    if as_json:
        print(json_dumps(doc))
        return
    print(replay_table(results))
    if ivs:
        from cli.replay_intervals import interval_notes, interval_table

        print()
        print(interval_table(ivs))
        for line in interval_notes(ivs):
            print(line)
    for run, c in results.items():
        if "blis_results" in c:
            print(f"wrote {c['blis_results']} (BLIS SimResult JSON of {run})")


def replay_table(results: dict) -> str:
    def pct(v) -> str:
        return "-" if v is None or v != v else f"{100 * v:.1f}%"

    header = ["run", "metric", "measured mean", "predicted mean", "mean APE", "P90 APE", "P99 APE",
              "per-req MAPE", "r", "grade", "failed meas/pred"]
    rows = []
    for run, c in results.items():
        for m in ("ttft", "itl", "e2e"):
            x = c.get(m) or {}
            if not x.get("n"):
                continue
            rows.append([str(run), m.upper(), f"{x['measured_mean_ms']:.1f} ms", f"{x['predicted_mean_ms']:.1f} ms",
                         pct(x["mean_ape"]), pct(x["p90_ape"]), pct(x["p99_ape"]), pct(x["request_mape"]),
                         f"{x['pearson_r']:.3f}", x["grade"], f"{c['measured_failed']}/{c['predicted_failed']}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                     for r in [header, ["-" * w for w in widths], *rows])


@app.command("calibrate-e2e")
def calibrate_e2e_cmd(
    requests: list[str] = typer.Option(..., "--requests", help="training runs' request traces. " + REQ_HELP),
    start: str = typer.Option("priors", help="start point: 'priors' or a coefficients file (e.g. a step-level "
                                             "`rooflab fit --out`)"),
    root: Path | None = typer.Option(None, help="real data folder (default ../shared/data/real)"),
    prefix: str = typer.Option("prompt", help="real runs: prefix cache groups prompt | system | none"),
    model: str | None = typer.Option(None), tp: int | None = typer.Option(None),
    hardware: str | None = typer.Option(None, help="GPU where the trace does not say (default H100-SXM)"),
    vllm_version: str | None = typer.Option(None, "--vllm-version", help=_VLLM_HELP),
    max_num_seqs: int | None = typer.Option(None), max_num_batched_tokens: int | None = typer.Option(None),
    num_gpu_blocks: int | None = typer.Option(None), max_model_len: int | None = typer.Option(None),
    gpu_memory_utilization: float | None = typer.Option(None, "--gpu-memory-utilization", help=_GMU_HELP),
    prefix_caching: bool | None = typer.Option(None, "--prefix-caching/--no-prefix-caching"),
    max_concurrency: int | None = typer.Option(None, "--max-concurrency", help=_CAP_HELP),
    variant: str = typer.Option(DEFAULT_VARIANT, help="model variant, e.g. roofline7+layers, *+attn, blis-tp10"),
    prior: float = typer.Option(1e-3, help="prior strength λ toward β1–β5 = 1"),
    iterations: int = typer.Option(4, help="stacked per-request fixed-point iterations"),
    polish: int = typer.Option(12, help="Nelder–Mead replay evaluations after the stacked fit (0: none)"),
    window_s: float = typer.Option(180.0, help="seconds of each run replayed per window during the search (0: all)"),
    windows: int = typer.Option(2, help="windows per run"),
    alpha_only: bool = typer.Option(False, "--alpha-only", help="keep β of --start, fit α only"),
    out: Path | None = typer.Option(None, help="write the coefficients (rooflab coefficients JSON) here"),
    check: bool = typer.Option(True, "--check/--no-check", help="replay the full training runs with the result"),
    posterior_draws: int = typer.Option(100, "--posterior-draws", help="whole-run bootstrap draws of the result's "
                                        "posterior (stored with the coefficients; 0: none)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """End-to-end calibration: fit β/α from request data only, by minimising the replay error (TTFT and E2E
    APE) of the training runs. Engine settings a trace does not give are vLLM's defaults, each one printed."""
    from rooflab import replay as rp
    from rooflab.fit.request_level import E2EOptions, calibrate_e2e

    check_range(posterior_draws, "--posterior-draws", 0, 10_000)
    get_variant(variant)
    engine = engine_overrides(max_num_seqs, max_num_batched_tokens, num_gpu_blocks, max_model_len, prefix_caching,
                              gpu_memory_utilization)
    loaded = load_traces(requests, root=root, prefix=prefix, model=model, tp=tp, hardware=hardware, engine=engine,
                         max_concurrency=max_concurrency, vllm_version=vllm_version)
    start_c = None if start == "priors" else rp.load_coefficients(start)
    if start_c is not None:
        for w in coefficient_warnings(Path(start), start_c):
            print(f"warning: --start: {w}", file=sys.stderr)
    announce(loaded, as_json)
    traces = [tr for tr, _ in loaded]
    opts = E2EOptions(variant=variant, prior_strength=prior, iterations=iterations, polish_evals=polish,
                      window_s=window_s or None, windows=windows, fit_beta=not alpha_only)
    res = calibrate_e2e(traces, start_c, opts, log=None if as_json else (lambda m: print(m, flush=True)))
    if posterior_draws:
        from rooflab.fit.replay_posterior import e2e_posterior

        res.coefficients.posterior, _ = e2e_posterior(traces, res.coefficients, opts, n_boot=posterior_draws)
    for w in coefficient_warnings(None, res.coefficients):
        print(f"warning: {w}", file=sys.stderr)
    doc: dict[str, Any] = {"coefficients": res.coefficients.to_dict(), "calibration": res.to_dict(),
                           "setup": {tr.run_id: setup_of(tr, assumed) for tr, assumed in loaded}}
    if check:
        full = {}
        for tr in traces:
            r = rp.replay(tr, res.coefficients)
            full[tr.run_id] = add_percentiles(rp.compare(r), r.requests)
        doc["full_replay"] = full
    if out:
        atomic_write_text(out, json_dumps(res.coefficients.to_dict()))
    if as_json:
        print(json_dumps(doc))
        return
    c = res.coefficients
    print("β: " + ", ".join(f"{k}={v:.4g}" for k, v in c.beta.items()))
    print(f"α: α0={c.alpha[0]:.4g} µs, α1={c.alpha[1]:.4g} µs, α2={c.alpha[2]:.4g} µs/token")
    print(f"{res.seconds:.0f} s")
    if check:
        print(replay_table(doc["full_replay"]))
