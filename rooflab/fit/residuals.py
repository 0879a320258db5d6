"""Residual diagnostics (docs/spec.md §8): MAPE and median APE per bucket (model, phase mix, batch size, context
length, TP, workload family, run), hotspots (> 15% MAPE), run-level influence, and residual plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from rooflab.data.tables import phase_mix
from rooflab.fit.beta import BetaFit

HOTSPOT_MAPE = 0.15
MIN_BUCKET_STEPS = 20
BATCH_BINS = ([0, 1, 4, 16, 64, 256, np.inf], ["1", "2-4", "5-16", "17-64", "65-256", ">256"])
CONTEXT_BINS = ([-np.inf, 512, 2048, 8192, np.inf], ["<512", "512-2K", "2K-8K", ">=8K"])
DIMENSIONS = ("model", "phase_mix", "batch_size", "context", "tp", "workload", "run_id")


def bucket_frame(steps: pd.DataFrame) -> pd.DataFrame:
    """The bucket of every step along each residual dimension."""
    B = (steps["prefill_reqs"] + steps["decode_reqs"]).to_numpy(dtype=float)
    ctx = ((steps["prefill_context"] + steps["prefill_tokens"] + steps["decode_context"]).to_numpy(dtype=float)
           / np.maximum(B, 1))
    out = pd.DataFrame({
        "model": steps["model"].astype(str).to_numpy(),
        "phase_mix": phase_mix(steps).to_numpy(),
        "batch_size": pd.cut(B, BATCH_BINS[0], labels=BATCH_BINS[1], right=True).astype(str),
        "context": pd.cut(ctx, CONTEXT_BINS[0], labels=CONTEXT_BINS[1], right=False).astype(str),
        "tp": steps["tp"].astype(str).to_numpy(),
        "workload": (steps["workload"].astype(str).to_numpy() if "workload" in steps else np.full(len(steps), "-")),
        "run_id": steps["run_id"].astype(str).to_numpy(),
    }, index=steps.index)
    return out


def ape(y: ArrayLike, pred: ArrayLike) -> np.ndarray:
    return np.abs(np.asarray(pred, float) - np.asarray(y, float)) / np.asarray(y, float)


def bucket_table(steps: pd.DataFrame, y: ArrayLike, pred: ArrayLike, split: str = "all",
                 dimensions: Sequence[str] = DIMENSIONS) -> pd.DataFrame:
    """One row per (dimension, bucket): steps, MAPE, median APE, signed mean error, hotspot flag."""
    err = ape(y, pred)
    signed = (np.asarray(pred, float) - np.asarray(y, float)) / np.asarray(y, float)
    buckets = bucket_frame(steps)
    rows = []
    for dim in dimensions:
        frame = pd.DataFrame({"b": buckets[dim].to_numpy(), "e": err, "s": signed})
        order: dict[object, int] = {b: i for i, b in enumerate(BATCH_BINS[1] + CONTEXT_BINS[1])}
        for b, g in sorted(frame.groupby("b"), key=lambda kv: (order.get(kv[0], len(order)), str(kv[0]))):
            rows.append({"split": split, "dimension": dim, "bucket": str(b), "steps": len(g),
                         "mape": float(g.e.mean()), "median_ape": float(g.e.median()), "bias": float(g.s.mean())})
    table = pd.DataFrame(rows, columns=["split", "dimension", "bucket", "steps", "mape", "median_ape", "bias"])
    table["hotspot"] = (table["mape"] > HOTSPOT_MAPE) & (table["steps"] >= MIN_BUCKET_STEPS)
    return table


def summary(y: np.ndarray, pred: np.ndarray) -> dict:
    e = ape(y, pred)
    return {"steps": int(len(e)), "mape": float(np.mean(e)) if len(e) else np.nan,
            "median_ape": float(np.median(e)) if len(e) else np.nan,
            "p90_ape": float(np.quantile(e, 0.9)) if len(e) else np.nan}


def run_influence(fit: BetaFit, steps: pd.DataFrame, X: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """Per run: its own MAPE, how much dropping it moves every prediction (mean |Δpred|/pred over all
    steps) and the largest relative β change — leverage and influence at the level of runs."""
    pred = X @ fit.beta
    run = steps["run_id"].astype(str).to_numpy()
    rows = []
    for r in fit.runs:
        m = run == r
        row = {"run_id": r, "steps": int(m.sum()), "mape": float(np.mean(ape(y[m], pred[m]))) if m.any() else np.nan}
        if r in fit.loro:
            b = fit.loro[r]
            row["prediction_shift"] = float(np.mean(np.abs(X @ b - pred) / pred))
            present = np.abs(fit.beta) > 0
            row["max_beta_change"] = float(np.max(np.abs(b[present] - fit.beta[present]) / np.abs(fit.beta[present])))
        rows.append(row)
    return pd.DataFrame(rows)


def plot_residuals(steps: pd.DataFrame, y: np.ndarray, pred: np.ndarray, table: pd.DataFrame,
                   out_dir: str | Path, title: str = "", max_points: int = 20_000) -> list[Path]:
    """Residual vs prediction scatter (coloured by phase mix) and per-bucket MAPE bars, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rel = (np.asarray(pred, float) - np.asarray(y, float)) / np.asarray(y, float)
    phase = phase_mix(steps).to_numpy()
    idx = np.arange(len(y))
    if len(idx) > max_points:
        idx = np.random.default_rng(0).choice(idx, max_points, replace=False)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ph, colour in (("decode", "tab:blue"), ("mixed", "tab:orange"), ("prefill", "tab:red"), ("empty", "grey")):
        m = idx[phase[idx] == ph]
        if len(m):
            ax.scatter(np.asarray(pred)[m] / 1e3, rel[m] * 100, s=4, alpha=0.4, label=f"{ph} ({len(m)})", color=colour)
    ax.axhline(0, color="black", lw=0.8)
    for lim in (-15, 15):
        ax.axhline(lim, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("predicted step time (ms)")
    ax.set_ylabel("residual (pred − measured) / measured (%)")
    ax.set_title(f"Residual vs prediction {title}".strip())
    ax.legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    scatter = out_dir / "residual_vs_prediction.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)

    dims = [d for d in table["dimension"].unique() if d != "run_id"]
    fig, axes = plt.subplots(len(dims), 1, figsize=(7, 1.6 * len(dims) + 0.6), squeeze=False)
    for ax, dim in zip(axes[:, 0], dims):
        t = table[table["dimension"] == dim]
        colours = ["tab:red" if h else "tab:blue" for h in t["hotspot"]]
        ax.barh([f"{b} (n={n})" for b, n in zip(t["bucket"], t["steps"])], t["mape"] * 100, color=colours)
        ax.axvline(HOTSPOT_MAPE * 100, color="grey", ls="--", lw=0.8)
        ax.set_ylabel(dim, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("MAPE (%) — red: hotspot (> 15%)")
    fig.suptitle(f"Step-time MAPE per bucket {title}".strip(), fontsize=10)
    fig.tight_layout()
    bars = out_dir / "mape_by_bucket.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [scatter, bars]


def specification_tests(steps: pd.DataFrame, y: np.ndarray, pred: np.ndarray, *, min_steps: int = 5,
                        min_cells: int = 8) -> dict:
    """RESET and Breusch–Pagan on run-level aggregates (docs/spec.md §8), judged by effect size.

    Cells are (run, phase mix, batch-size bucket) with at least ``min_steps`` steps; each contributes its
    mean measured and mean predicted step time. With 1e5 steps every p-value is ~0, so each test reports
    an effect size beside its p-value:
    * RESET: regress measured on predicted, then add predicted² and predicted³. ``rms_gain`` is the
      relative drop in the residual RMS: how much curvature the linear model misses.
    * Breusch–Pagan: relative residuals against the prediction. ``r2`` is the share of the squared
      relative error that the prediction explains: whether errors grow with step size.
    """
    import statsmodels.api as sm
    from statsmodels.stats.diagnostic import het_breuschpagan, linear_reset

    b = bucket_frame(steps)
    cells = pd.DataFrame({"run": b["run_id"].to_numpy(), "phase": b["phase_mix"].to_numpy(),
                          "batch": b["batch_size"].to_numpy(), "y": np.asarray(y, float), "p": np.asarray(pred, float)})
    agg = cells.groupby(["run", "phase", "batch"]).agg(n=("y", "size"), y=("y", "mean"), p=("p", "mean"))
    agg = agg[agg["n"] >= min_steps]
    if len(agg) < min_cells:
        return {"cells": int(len(agg)), "skipped": f"fewer than {min_cells} run-level cells with ≥ {min_steps} steps"}
    scale = float(agg["p"].mean())
    z = agg["p"].to_numpy() / scale
    yy = agg["y"].to_numpy() / scale
    linear = sm.OLS(yy, sm.add_constant(z)).fit()
    cubic = sm.OLS(yy, np.column_stack([np.ones_like(z), z, z ** 2, z ** 3])).fit()
    reset = linear_reset(linear, power=3, use_f=True)
    rms_lin, rms_cub = float(np.sqrt(np.mean(linear.resid ** 2))), float(np.sqrt(np.mean(cubic.resid ** 2)))
    rel = (agg["p"].to_numpy() - agg["y"].to_numpy()) / agg["y"].to_numpy()
    exog = sm.add_constant(z)
    _, bp_p, _, _ = het_breuschpagan(rel, exog)
    bp_r2 = float(sm.OLS(rel ** 2, exog).fit().rsquared)
    return {"cells": int(len(agg)),
            "reset": {"p_value": float(reset.pvalue), "rms_gain": (rms_lin - rms_cub) / rms_lin if rms_lin > 0 else 0.0,
                      "slope": float(linear.params[1])},
            "breusch_pagan": {"p_value": float(bp_p), "r2": bp_r2}}
