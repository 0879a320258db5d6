"""What the onboarding benchmark (:mod:`rooflab.evaluation.onboarding`) runs, prints and writes: every target in a
worker process, the per-target table, the learning curves (median APE on the remaining experiments vs GPU-hours
spent), the predictions of record (``s2r-onboarding.csv``: every step of every strategy, every eval experiment of
the target, withheld ones included; ``real-onboarding.csv`` the same for the request traces) and the curves
(``onboarding-curves.csv``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rooflab.errors import InputError
from rooflab.evaluation.onboarding import (
    SCORED,
    SEEDS,
    OnboardingResult,
    Target,
    TargetResult,
    load_prior,
    prediction_rows,
    random_median,
    real_targets,
    run_target,
    s2r_targets,
    summary_row,
)
from rooflab.files import atomic_write_text
from rooflab.model.coefficients import coefficients_from_doc
from rooflab.targeting.onboard_stop import SHORT, TARGETS

CSV_COLUMNS = ["target", "strategy", "step", "gpu_hours", "exp_id", "metric", "predicted_ms"]


def _job(args: tuple[Target, dict[str, Any], str, float, tuple[int, ...]]) -> TargetResult:
    target, prior_doc, source, lam, seeds = args
    prior = coefficients_from_doc(prior_doc, source)
    prior.source = source
    return run_target(target, prior, lam, seeds=seeds, progress=lambda line: print(line, flush=True))


def run(prior_path: str | Path, *, workers: int = 2, seeds: tuple[int, ...] = SEEDS, real: bool = True,
        only: tuple[str, ...] = (), progress: Callable[[str], None] = print) -> OnboardingResult:
    """Every target (the kit's, then the request traces'), largest first, ``workers`` at a time."""
    t0 = time.perf_counter()
    prior, lam = load_prior(prior_path)
    targets = s2r_targets() + (real_targets() if real else [])
    if only:
        targets = [t for t in targets if t.name in only]
    targets = sorted(targets, key=lambda t: -len(t.pool) * len(t.items))
    progress(f"onboarding benchmark: {len(targets)} targets, prior {prior.source} (λ={lam:g}), random seeds "
             f"{list(seeds)}, {workers} worker(s)")
    jobs = [(t, prior.to_dict(), prior.source, lam, seeds) for t in targets]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as ex:
        results = list(ex.map(_job, jobs))
    for r in results:
        progress(f"  {r.target}: {r.seconds:.0f} s, {r.replays} replays")
    return OnboardingResult(results, time.perf_counter() - t0, prior.source, lam)


# ================================================================================================ output
def _pct(v: Any) -> str:
    return "–" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{100 * v:.1f}%"


def table(res: OnboardingResult, source: str) -> str:
    """The per-target markdown table (median APE of the whole-run means on the remaining measured experiments)."""
    head = ("| target | experiments (measured) | pool GPU-h | prior E2E / TTFT | after 1 targeted pick | after 2 | "
            "targeted picks to ≤5% E2E & ≤10% TTFT (GPU-h share) | random seeds (picks) | targeted ≤ random | "
            "stop rule: picks (E2E / TTFT there) | all, leave-one-out E2E / TTFT | verdict |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res.results:
        if r.source != source:
            continue
        s = summary_row(r)
        reach = "not reached" if s["targeted_reach"] is None else \
            f"{s['targeted_reach']} ({s['targeted_reach_share']:.0%})"
        rnd = ", ".join("–" if x is None else str(x) for x in s["random_reach"])
        stop = "never" if s["stop_step"] is None else \
            f"{s['stop_step']} ({_pct(s['stop_e2e'])} / {_pct(s['stop_ttft'])})"
        name = r.target + (" †" if "not an onboarding" in r.note else "")
        lines.append(f"| {name} | {s['experiments']} ({s['measured']}) | {s['gpu_hours_pool']:.2f} | "
                     f"{_pct(s['prior_e2e'])} / {_pct(s['prior_ttft'])} | {_pct(s['step1_e2e'])} / "
                     f"{_pct(s['step1_ttft'])} | {_pct(s['step2_e2e'])} / {_pct(s['step2_ttft'])} | {reach}"
                     f"{' ✓' if s['target_met'] else ''} | {rnd} | {s['targeted_beats_random']} | {stop} | "
                     f"{_pct(s['loo_e2e'])} / {_pct(s['loo_ttft'])} | {verdict(r)} |")
    return "\n".join(lines)


def is_onboarding(r: TargetResult) -> bool:
    """False for a fit check: a target whose experiments the prior was fitted on (left out of the medians)."""
    return "not an onboarding" not in r.note


def verdict(r: TargetResult) -> str:
    """The issue's per-target target (≤ 2 targeted picks or ≤ 25% of the pool's GPU-h reach ≤ 5% E2E and ≤ 10% TTFT
    median APE on the remaining experiments), or why this target's data cannot show it."""
    s = summary_row(r)
    n = s["measured"]
    if not is_onboarding(r):
        return "fit check (the prior was fitted on these runs)"
    if n <= 1:
        return f"cannot show: {n} measured experiment, nothing left to score after one pick"
    if s["target_met"]:
        return f"met at {s['targeted_reach']} pick(s)"
    if n == 2:
        return "not shown: 2 measured experiments, only 1 pick can be scored (on 1 experiment)"
    return "missed" + ("" if s["targeted_reach"] is None else f" (reached at {s['targeted_reach']} picks)")


def medians_over_targets(res: OnboardingResult, source: str) -> pd.DataFrame:
    """Per number of picks: the median over targets (onboardings with ≥ 1 measured experiment left at that step) of
    each target's median APE on its remaining experiments — targeted, and random (each target's median over
    seeds) — and whether targeted ≤ random there."""
    rows = []
    rs = [r for r in res.results if r.source == source and is_onboarding(r)]
    top = max((len(r.path("targeted")) for r in rs), default=0)
    for k in range(top):
        t: dict[str, list[float]] = {m: [] for m in SCORED}
        rnd: dict[str, list[float]] = {m: [] for m in SCORED}
        names = []
        for r in rs:
            path = r.path("targeted")
            if k >= len(path) or not path[k].remaining_ape:
                continue
            names.append(r.target)
            for m in SCORED:
                t[m].append(path[k].median(m))
                rnd[m].append(random_median(r, k, m))
        if not names:
            continue
        row: dict[str, Any] = {"picks": k, "targets": len(names)}
        for m in SCORED:
            row[f"targeted_{m}"] = float(np.nanmedian(t[m]))
            row[f"random_{m}"] = float(np.nanmedian(rnd[m]))
        row["targeted_le_random"] = bool(k == 0 or all(row[f"targeted_{m}"] <= row[f"random_{m}"] + 1e-12
                                                       for m in SCORED))
        row["met"] = bool(all(row[f"targeted_{m}"] <= TARGETS[m] for m in SCORED))
        row["which"] = ", ".join(names)
        rows.append(row)
    return pd.DataFrame(rows)


def median_table(res: OnboardingResult, source: str) -> str:
    df = medians_over_targets(res, source)
    lines = ["| picks | targets with experiments left | targeted E2E / TTFT | random E2E / TTFT | targeted ≤ random | "
             "≤ 5% E2E & ≤ 10% TTFT |", "|---|---|---|---|---|---|"]
    for row in df.to_dict("records"):
        le = "–" if row["picks"] == 0 else ("yes" if row["targeted_le_random"] else "no")
        lines.append(f"| {row['picks']} | {row['targets']} | {_pct(row['targeted_e2e_mean'])} / "
                     f"{_pct(row['targeted_ttft_mean'])} | {_pct(row['random_e2e_mean'])} / "
                     f"{_pct(row['random_ttft_mean'])} | {le} | {'yes' if row['met'] else 'no'} |")
    return "\n".join(lines)


def curves(res: OnboardingResult) -> pd.DataFrame:
    rows = []
    for r in res.results:
        for s in r.steps:
            if s.strategy == "all":
                continue
            rows.append({"target": r.target, "source": r.source, "strategy": s.strategy, "step": s.step,
                         "gpu_hours": s.gpu_hours, "picked": " ".join(s.picked), "remaining": len(s.remaining_ape),
                         **{f"median_ape_{m}": s.median(m) for m in SCORED}, "reason": s.reason, "stop": s.stop})
        for k, a in r.loo.items():
            rows.append({"target": r.target, "source": r.source, "strategy": "leave-one-out", "step": len(r.loo) - 1,
                         "gpu_hours": r.total_gpu_hours - next(i["gpu_hours"] for i in r.items if i["key"] == k),
                         "picked": f"all but {k}", "remaining": 1, **{f"median_ape_{m}": a[m] for m in SCORED},
                         "reason": "", "stop": ""})
    return pd.DataFrame(rows)


def render(res: OnboardingResult) -> str:
    lines = [f"prior: {res.prior} (λ={res.lam:g}); targets: median APE ≤ {TARGETS['e2e_mean']:.0%} E2E and ≤ "
             f"{TARGETS['ttft_mean']:.0%} TTFT on the remaining experiments within 2 picks or 25% of the pool's GPU-h",
             "", "sim-to-real kit (eval split):", table(res, "s2r"), "",
             "median over the kit's targets, per number of targeted picks (random: the median of each target's seeds):",
             median_table(res, "s2r"), ""]
    if any(r.source == "real" for r in res.results):
        lines += ["request traces (../shared/data/real, prefix-cached prompts):", table(res, "real"),
                  "† the prior's training set (kit trainval) holds these runs: a fit check, not an onboarding "
                  "(left out of the medians)", "", "median over the request-trace targets:",
                  median_table(res, "real"), ""]
    lines.append("targeted picks, in order:")
    for r in res.results:
        picks = [f"{s.picked[-1]} ({s.reason.split(' shrinks')[0].removeprefix('D-optimal: ')})"
                 for s in r.path("targeted")[1:]]
        lines.append(f"  {r.target}: " + "; ".join(picks))
    lines.append(f"\nruntime {res.seconds / 60:.1f} min")
    return "\n".join(lines)


def plot(curves_df: pd.DataFrame, summary_df: pd.DataFrame, path: Path, source: str) -> Path:
    """The learning curves of ``source``'s targets from the written ``onboarding-curves.csv`` and
    ``onboarding-summary.csv`` (so they can be drawn again without running anything: ``--replot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    summ = summary_df[(summary_df["source"] == source) & (summary_df["measured"] >= 2)]
    cv = curves_df[(curves_df["source"] == source) & (curves_df["remaining"] > 0)]
    ncol = min(4, max(1, len(summ)))
    nrow = max(1, math.ceil(len(summ) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow + 0.8), squeeze=False)
    for ax, row in zip(axes.flat, summ.to_dict("records")):
        c = cv[cv["target"] == row["target"]]
        for m, ls in (("e2e_mean", "-"), ("ttft_mean", "--")):
            col = f"median_ape_{m}"
            tg = c[c["strategy"] == "targeted"].sort_values("step")
            ax.plot(tg["gpu_hours"], 100 * tg[col], ls, marker="o", color="tab:blue", label=f"targeted {SHORT[m]}")
            rnd = c[c["strategy"].str.startswith("random-")]
            for _, g in rnd.groupby("strategy"):
                g = g.sort_values("step")
                ax.plot(g["gpu_hours"], 100 * g[col], ls, color="tab:orange", alpha=0.25, lw=0.8)
            med = rnd.groupby("step").agg(x=("gpu_hours", "median"), y=(col, "median")).reset_index()
            ax.plot(med["x"], 100 * med["y"], ls, marker="s", ms=3, color="tab:orange",
                    label=f"random {SHORT[m]} (median of seeds)")
            loo = row[f"loo_{m.split('_')[0]}"]
            if np.isfinite(loo):
                ax.scatter([row["gpu_hours_pool"]], [100 * loo], marker="*" if m == "e2e_mean" else "x", s=90,
                           color="tab:green", zorder=5, label=f"all (leave-one-out) {SHORT[m]}")
        for y in (100 * TARGETS["e2e_mean"], 100 * TARGETS["ttft_mean"]):
            ax.axhline(y, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        check = str(row.get("verdict", "")).startswith("fit check")
        ax.set_title(row["target"] + (" †" if check else ""), fontsize=9)
        ax.set_xlabel("GPU-hours spent on the target", fontsize=8)
        ax.set_ylabel("median APE on remaining (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(summ):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle("Onboarding from the trainval prior: median APE of the whole-run means\non the experiments not "
                 "run yet (solid: E2E, dashed: TTFT; dotted: the 5% and 10% targets"
                 + ("; † the prior was fitted on these runs: a fit check)" if (summ.get("verdict", pd.Series(dtype=str))
                    .astype(str).str.startswith("fit check").any()) else ")"), fontsize=9)
    fig.tight_layout(rect=(0, 0.15 / nrow, 1, 1 - 0.08 / nrow))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def replot(out: Path, png: Path, progress: Callable[[str], None] = print) -> int:
    """Draw the curves again from ``out``'s onboarding-curves.csv and onboarding-summary.csv."""
    try:
        cv = pd.read_csv(out / "onboarding-curves.csv")
        summ = pd.read_csv(out / "onboarding-summary.csv")
    except FileNotFoundError as exc:
        raise InputError(exc.filename, None, "not written yet: run the onboarding benchmark first") from None
    for source, path in (("s2r", png), ("real", png.with_name(png.stem + "-real" + png.suffix))):
        if (summ["source"] == source).any():
            progress(f"wrote {plot(cv, summ, path, source)}")
    return 0


def main(*, workers: int = 2, prior: str | Path, out: Path, png: Path | None = None, seeds: tuple[int, ...] = SEEDS,
         real: bool = True, only: tuple[str, ...] = (), progress: Callable[[str], None] = print) -> int:
    res = run(prior, workers=workers, seeds=seeds, real=real, only=only, progress=progress)
    progress(render(res))
    out.mkdir(parents=True, exist_ok=True)
    for source, name in (("s2r", "s2r-onboarding.csv"), ("real", "real-onboarding.csv")):
        rows = [row for r in res.results if r.source == source for row in prediction_rows(r)]
        if not rows:
            continue
        df = pd.DataFrame(rows, columns=CSV_COLUMNS)
        df["predicted_ms"] = df["predicted_ms"].astype(float).round(4)
        atomic_write_text(out / name, df.to_csv(index=False))
        progress(f"wrote {out / name} ({len(df)} rows)")
    cv = curves(res)
    atomic_write_text(out / "onboarding-curves.csv", cv.round(6).to_csv(index=False))
    summary = pd.DataFrame([{**summary_row(r), "verdict": verdict(r)} for r in res.results])
    atomic_write_text(out / "onboarding-summary.csv", summary.to_csv(index=False))
    med = pd.concat([medians_over_targets(res, src).assign(source=src) for src in ("s2r", "real")
                     if any(r.source == src for r in res.results)], ignore_index=True)
    atomic_write_text(out / "onboarding-medians.csv", med.round(6).to_csv(index=False))
    progress(f"wrote {out / 'onboarding-curves.csv'}, {out / 'onboarding-summary.csv'}, "
             f"{out / 'onboarding-medians.csv'}")
    if png is not None:
        replot(out, png, progress)
    return 0
