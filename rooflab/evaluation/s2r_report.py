"""What the sim-to-real benchmark prints and writes: the side-by-side tables, the predictions of record, the
parity check, the bar chart (:mod:`rooflab.evaluation.s2r` computes them)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from rooflab.data.s2r import load_kit
from rooflab.evaluation.s2r import CANDIDATES, METRICS, S2RResult, median_table, run, subsets
from rooflab.files import atomic_write_text

MAIN_METRICS = ("e2e_mean", "ttft_mean", "itl_mean", "e2e_p90", "e2e_p99", "ttft_p90", "ttft_p99")
TARGETS = {"e2e_mean": 0.05, "itl_mean": 0.05, "ttft_mean": 0.12}


def pivot(table: pd.DataFrame, metrics: tuple[str, ...] = MAIN_METRICS) -> pd.DataFrame:
    """simulator × metric cells "median (n)"."""
    cells: dict[str, dict[str, str]] = {}
    for r in table.itertuples():
        if r.metric in metrics:
            cells.setdefault(str(r.simulator), {})[str(r.metric)] = f"{r.median_ape_pct:.1f} ({r.n})"
    df = pd.DataFrame(cells).T.reindex(columns=[m for m in metrics if any(m in c for c in cells.values())])
    order = sorted(df.index, key=lambda s: (not s.startswith("rooflab"), s))
    return df.loc[order].fillna("-")


def render(res: S2RResult) -> str:
    kit = load_kit()
    lines = ["cross-validation inside the training set (leave one model out):"]
    cv = res.cv.table
    whole = cv[cv["stage"] == "overall"]
    for (v, lam), g in whole.groupby(["variant", "lambda"]):
        per = g.groupby("exp_id")["ape"].mean()
        lines.append(f"  {v:18s} λ={lam:<6g} median (TTFT+E2E)/2 APE {per.median():6.1%} over {len(per)} experiments")
    lines.append("  chosen: " + "; ".join(f"{k} = {v} λ={lam:g}" for k, (v, lam) in res.cv.choice.items()))
    lines += ["", "median APE % (n) over the eval experiments with measurements, whole run:"]
    lines.append(pivot(median_table(res.scores)).to_string())
    lines += ["", "E2E mean by GPU, median APE % (n):"]
    for gpu in ("H100", "A100", "L40S"):
        ids = sorted(set(res.scores.loc[res.scores["gpu"] == gpu, "exp_id"]))
        t = median_table(res.scores, ids, ("e2e_mean",))
        lines.append(f"  {gpu}: " + ", ".join(f"{r.simulator} {r.median_ape_pct:.1f} ({r.n})" for r in t.itertuples()))
    for name, ids in subsets(kit).items():
        if name.count("+") >= 2 or "vidur" in name:
            lines += ["", f"shared subset {name} ({len(ids)} with measurements):",
                      pivot(median_table(res.scores, ids), ("e2e_mean", "ttft_mean", "itl_mean")).to_string()]
    lines += ["", "targets (rooflab, median APE, eval with measurements):"]
    rows = median_table(res.scores)
    for s in ("rooflab blis-fitted", "rooflab rooflab-best"):
        sub = rows[rows["simulator"] == s]
        got = {str(m): float(v) for m, v in zip(sub["metric"], sub["median_ape_pct"])}
        met = [f"{m} {got[m]:.1f}% {'≤' if got[m] <= t * 100 else '>'} {t:.0%}" for m, t in TARGETS.items() if m in got]
        lines.append(f"  {s}: " + ", ".join(met))
    p = res.parity.dropna(subset=["rooflab_iter29_blis_mode", "blis_own"])
    if len(p):
        rel = (p["rooflab_iter29_blis_mode"] / p["blis_own"] - 1).abs()
        lines += ["", "parity: BLIS's iter29 coefficients replayed by rooflab on the workloads as BLIS generates them, "
                  "against BLIS's own eval predictions in the kit:"]
        for m in ("e2e_mean", "ttft_mean", "itl_mean"):
            r = rel[p["metric"] == m]
            lines.append(f"  {m}: median |rooflab/BLIS − 1| {r.median():.1%}, within 5% on {(r <= 0.05).sum()} of "
                         f"{len(r)} experiments")
    if res.replay_seconds:
        n = (len(res.predictions) + len(res.parity)) // len(METRICS)
        lines.append(f"\nreplay speed: {res.replay_steps / res.replay_seconds:,.0f} engine steps/s per worker "
                     f"({res.replay_steps:,} steps in {n} replays, {res.replay_seconds / 60:.1f} worker-min)")
    lines.append(f"runtime {res.seconds / 60:.1f} min")
    return "\n".join(lines)


def plot(res: S2RResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = median_table(res.scores, metrics=("e2e_mean", "ttft_mean", "itl_mean"))
    sims = sorted(t["simulator"].unique(), key=lambda s: (not s.startswith("rooflab"), s))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(sims)
    x = np.arange(3)
    for i, sim in enumerate(sims):
        sub = t[t["simulator"] == sim].set_index("metric")
        vals = [sub.loc[m, "median_ape_pct"] if m in sub.index else np.nan
                for m in ("e2e_mean", "ttft_mean", "itl_mean")]
        ax.bar(x + i * width, vals, width, label=sim)
    ax.set_yscale("log")
    ax.set_xticks(x + width * (len(sims) - 1) / 2, ["E2E mean", "TTFT mean", "ITL mean"])
    ax.set_ylabel("median APE over eval experiments (%, log scale)")
    for y, lab in ((5, "5%"), (12, "12%")):
        ax.axhline(y, color="grey", lw=0.7, ls="--")
        ax.text(2.95, y, f" {lab} target", fontsize=7, va="bottom")
    ax.set_title("Sim-to-real benchmark: median APE per simulator (eval experiments with measurements)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(*, workers: int = 2, quick: bool = False, out: Path = Path("benchmarks/results"),
         png: Path | None = None, progress: Callable[[str], None] = print) -> int:
    candidates = (CANDIDATES[0], CANDIDATES[-1]) if quick else CANDIDATES
    res = run(workers=workers, progress=progress, candidates=candidates)
    progress(render(res))
    out.mkdir(parents=True, exist_ok=True)
    preds = res.predictions[["exp_id", "coefficients", "metric", "predicted_ms"]].copy()
    preds["predicted_ms"] = preds["predicted_ms"].astype(float).round(4)
    atomic_write_text(out / "s2r-predictions.csv", preds.to_csv(index=False))
    scores = res.scores.copy()
    scores["ape"] = scores["ape"].astype(float).round(6)
    atomic_write_text(out / "s2r-scores.csv", scores.to_csv(index=False))
    coefs = "\n".join(f"# {k}: {c.variant} {c.source}\n" + ", ".join(f"{n}={v:.6g}" for n, v in c.beta.items())
                      + f"; alpha={tuple(round(a, 3) for a in c.alpha)}" for k, c in res.coefficients.items())
    atomic_write_text(out / "s2r-coefficients.txt", coefs + "\n")
    # the same sets, loadable (rooflab.model.coefficients.coefficients_from_doc): the onboarding benchmark's prior
    atomic_write_text(out / "s2r-fits.json", json.dumps({k: c.to_dict() for k, c in res.coefficients.items()},
                                                        indent=1) + "\n")
    progress(f"wrote {out / 's2r-predictions.csv'} ({len(preds)} rows), {out / 's2r-scores.csv'}, "
             f"{out / 's2r-coefficients.txt'}")
    if png is not None:
        progress(f"wrote {plot(res, png)}")
    assert set(METRICS) <= set(preds["metric"])
    return 0
