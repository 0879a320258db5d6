"""Scoring a replay against the measurement: per metric (TTFT, ITL, E2E) the APE of the mean / P90 / P99, the
per-request APE distribution, Pearson r and a grade like BLIS ``calibrate``; how an overloaded run was handled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from rooflab.replay.predict import ReplayResult

METRICS = ("ttft", "itl", "e2e")
GRADES = (("excellent", 0.10, 0.95), ("good", 0.20, 0.85), ("fair", 0.35, 0.70))


def _ape(pred: float, meas: float) -> float:
    return float(abs(pred - meas) / abs(meas)) if meas and np.isfinite(meas) and np.isfinite(pred) else float("nan")


def grade(mape: float, r: float) -> str:
    """Like BLIS ``calibrate``: excellent < 10% with r > 0.95, good < 20% with r > 0.85, fair < 35% with
    r > 0.70, else poor."""
    if not (np.isfinite(mape) and np.isfinite(r)):
        return "n/a"
    for name, m, rr in GRADES:
        if mape < m and r > rr:
            return name
    return "poor"


def compare(result_or_frame: ReplayResult | pd.DataFrame, *, scored_only: bool = True) -> dict[str, Any]:
    """Metrics of one replayed run: per metric (ttft, itl, e2e) the APE of the mean / P90 / P99 (over the
    requests that succeeded both in the measurement and in the replay; the mean ITL is the mean over all
    inter-token intervals, Σ(E2E − TTFT)/Σ(n_out − 1)), the per-request APE distribution
    (mean = per-request MAPE, median, P90), Pearson r, a grade (from the per-request MAPE and r), and the
    failure counts."""
    df = result_or_frame if isinstance(result_or_frame, pd.DataFrame) else result_or_frame.requests
    if scored_only and "scored" in df:
        df = df[df["scored"].to_numpy(dtype=bool)]
    meas_ok = ~df["failed"].to_numpy(dtype=bool)
    pred_ok = ~df["pred_failed"].to_numpy(dtype=bool)
    both = meas_ok & pred_ok
    out: dict[str, Any] = {"requests": int(len(df)), "measured_failed": int((~meas_ok).sum()),
                           "predicted_failed": int((~pred_ok).sum()), "compared": int(both.sum())}
    for m in METRICS:
        y = df[f"{m}_us"].to_numpy(dtype=float)
        p = df[f"pred_{m}_us"].to_numpy(dtype=float)
        k = both & np.isfinite(y) & np.isfinite(p) & (y > 0)
        y, p = y[k], p[k]
        if len(y) == 0:
            out[m] = {"n": 0}
            continue
        ape = np.abs(p - y) / y
        r = float(np.corrcoef(p, y)[0, 1]) if len(y) > 2 and np.std(p) > 0 and np.std(y) > 0 else float("nan")
        ym, pm = float(y.mean()), float(p.mean())
        if m == "itl" and "output_tokens" in df:
            # the run's mean ITL is the mean over all inter-token intervals (what a simulator reports):
            # Σ(E2E − TTFT) / Σ(n_out − 1), not the mean of per-request ITLs, which a few requests with a
            # handful of tokens dominate
            gaps = np.clip(df["output_tokens"].to_numpy(dtype=float)[k] - 1, 1, None)
            ym, pm = float((y * gaps).sum() / gaps.sum()), float((p * gaps).sum() / gaps.sum())
        res: dict[str, Any] = {
            "n": int(len(y)), "measured_mean_ms": ym / 1e3, "predicted_mean_ms": pm / 1e3,
            "mean_ape": _ape(pm, ym), "p50_ape": _ape(np.median(p), np.median(y)),
            "p90_ape": _ape(np.percentile(p, 90), np.percentile(y, 90)),
            "p99_ape": _ape(np.percentile(p, 99), np.percentile(y, 99)),
            "request_mape": float(ape.mean()), "request_median_ape": float(np.median(ape)),
            "request_p90_ape": float(np.percentile(ape, 90)), "pearson_r": r,
            "bias": float((pm - ym) / ym)}
        res["grade"] = grade(res["request_mape"], r)
        out[m] = res
    return out


def summarize(results: dict) -> pd.DataFrame:
    """{run: compare() dict} → one row per run and metric."""
    rows = []
    for run, c in results.items():
        for m in METRICS:
            x = c.get(m) or {}
            if not x.get("n"):
                continue
            rows.append({"run": run, "metric": m, **{k: v for k, v in x.items()}})
    return pd.DataFrame(rows)


def saturation_report(res: ReplayResult) -> dict:
    """How the replay handled an overloaded run: queue growth, predicted vs measured failures (timeouts)."""
    df = res.requests
    arr = (df["arrival_us"] - df["arrival_us"].min()) / 1e6
    ok_m = ~df["failed"].to_numpy(dtype=bool)
    ok_p = ~df["pred_failed"].to_numpy(dtype=bool)
    # TTFT by 100 s arrival window: the queue growth
    bins = np.arange(0, float(arr.max()) + 100.0, 100.0)
    growth = []
    for a, b in zip(bins[:-1], bins[1:]):
        k = (arr >= a) & (arr < b)
        mt = df.loc[k & ok_m, "ttft_us"].mean() / 1e6
        pt = df.loc[k & ok_p, "pred_ttft_us"].mean() / 1e6
        growth.append({"window_s": [float(a), float(b)], "measured_ttft_s": None if mt != mt else float(mt),
                       "predicted_ttft_s": None if pt != pt else float(pt),
                       "measured_failed": int((k & ~ok_m).sum()), "predicted_failed": int((k & ~ok_p).sum())})
    return {"requests": int(len(df)), "measured_failed": int((~ok_m).sum()), "predicted_failed": int((~ok_p).sum()),
            "both_failed": int((~ok_m & ~ok_p).sum()), "max_waiting": res.stats.get("max_waiting"),
            "aborted": res.stats.get("aborted"), "timeout_s": res.stats.get("timeout_s"), "ttft_by_window": growth}
