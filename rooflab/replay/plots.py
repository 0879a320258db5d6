"""Predicted-vs-measured plots of replayed runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rooflab.replay.metrics import METRICS


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_replay(results: dict, path: str | Path, title: str = "") -> Path:
    """Predicted vs measured (per-request, sub-sampled) scatter for TTFT, ITL and E2E, all runs in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, m in zip(axes, METRICS):
        lo, hi = np.inf, 0.0
        for run, df in results.items():
            k = ~df["failed"].to_numpy(dtype=bool) & ~df["pred_failed"].to_numpy(dtype=bool)
            if "scored" in df:
                k &= df["scored"].to_numpy(dtype=bool)
            y = df[f"{m}_us"].to_numpy(dtype=float)[k] / 1e3
            p = df[f"pred_{m}_us"].to_numpy(dtype=float)[k] / 1e3
            good = np.isfinite(y) & np.isfinite(p) & (y > 0) & (p > 0)
            y, p = y[good], p[good]
            if len(y) > 2000:
                idx = np.random.default_rng(0).choice(len(y), 2000, replace=False)
                y, p = y[idx], p[idx]
            if len(y):
                ax.scatter(y, p, s=3, alpha=0.35, label=str(run)[-34:])
                lo, hi = min(lo, y.min(), p.min()), max(hi, y.max(), p.max())
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"measured {m.upper()} (ms)")
        ax.set_ylabel(f"predicted {m.upper()} (ms)")
        ax.set_title(f"{m.upper()} {title}".strip())
    axes[-1].legend(fontsize=6, markerscale=3, loc="upper left")
    return save_figure(fig, path)
