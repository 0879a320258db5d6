"""Pictures of prediction intervals (issue 18): the calibration plot (nominal vs empirical coverage) and
predicted-vs-measured run statistics with interval bars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rooflab.replay.intervals import METRICS, STATS, IntervalReplay
from rooflab.replay.plots import save_figure


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_calibration(curves: Mapping[str, np.ndarray], levels: np.ndarray, path: str | Path,
                     title: str = "Prediction-interval calibration (held-out runs)") -> Path:
    """Empirical coverage against nominal level, one line per interval kind; the diagonal is perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, cov in curves.items():
        ax.plot(levels, cov, marker="o", label=name)
    ax.set_xlim(0.45, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("share of measured statistics inside it")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_intervals(results: Sequence[IntervalReplay], path: str | Path, title: str = "") -> Path:
    """Per metric, predicted (median of the draws, with the interval as a bar) against measured, every run and
    statistic (mean ●, P90 ▲, P99 ■); a bar that crosses the diagonal covers the measurement."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    markers = dict(zip(STATS, ("o", "^", "s")))
    for ax, m in zip(axes, METRICS):
        lo_all, hi_all = np.inf, 0.0
        for s in STATS:
            key = f"{m}_{s}"
            ivs = [r.intervals[key] for r in results if key in r.intervals and r.intervals[key].measured_ms]
            if not ivs:
                continue
            x = np.array([iv.measured_ms or np.nan for iv in ivs])
            y = np.array([iv.median_ms for iv in ivs])
            err = np.array([[iv.median_ms - iv.lower_ms for iv in ivs], [iv.upper_ms - iv.median_ms for iv in ivs]])
            colour = ["tab:blue" if iv.covered else "tab:red" for iv in ivs]
            for xi, yi, e0, e1, c in zip(x, y, err[0], err[1], colour):
                ax.errorbar(xi, yi, yerr=[[e0], [e1]], fmt=markers[s], color=c, ms=4, capsize=2, lw=1)
            ax.scatter([], [], marker=markers[s], color="grey", label=s)
            good = np.isfinite(x) & (x > 0)
            if good.any():
                lo_all = min(lo_all, float(x[good].min()), float(np.nanmin([iv.lower_ms for iv in ivs])))
                hi_all = max(hi_all, float(x[good].max()), float(np.nanmax([iv.upper_ms for iv in ivs])))
        if hi_all > 0 and np.isfinite(lo_all):
            lo_all = max(lo_all, hi_all * 1e-4)
            ax.plot([lo_all, hi_all], [lo_all, hi_all], "k--", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"measured {m.upper()} (ms)")
        ax.set_ylabel(f"predicted {m.upper()} (ms), median and interval")
        ax.set_title(f"{m.upper()} {title}".strip(), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", title="blue: covered, red: missed", title_fontsize=7)
    return save_figure(fig, path)
