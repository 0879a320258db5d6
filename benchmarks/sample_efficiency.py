"""Sample efficiency of rooflab's active learning against the seed's static plan and random selection.

On the twin (direct launcher, fast mode), for each twin truth setting (the H100-SXM and H200 ground truths,
different GPUs with their own datasheets and efficiencies) and each seed (arrivals and the truth's noise,
stragglers and MoE routing draws), three strategies calibrate `roofline7+layers` (vllm formulas) from the
default campaign's candidate space:

* **static**: the seed's static 99-run plan (`static99`), all of it, then one fit;
* **random**: batches of 6 points drawn uniformly from the candidate space (training and held-out combos
  alike), refit after each batch, until the stop rule or the budget;
* **active**: rooflab's loop (`rooflab.targeting.doptimal.choose_next_doptimal`, batch 6, the same stop rule), from
  an empty store.

The budget of random and active is a third of the static plan's own measured GPU-hours (`--budget-share`):
the target is a quarter, and the curves show what a little more buys. Every strategy is scored on
the same held-out runs: the static plan's 9 V1 runs on the 3 held-out combos (no strategy fits them; the
active loop may collect some of them as its own validation picks, and pays for them). Reported per
strategy: GPU-hours until the stop rule (or the budget), held-out step-time MAPE and median APE, the worst
held-out bucket MAPE, and β errors against a reference β: the same variant fitted to the pooled static
plans of all seeds of that truth setting (the twin's truth is not of the model's form, so this best fit is
the "truth-implied" β). Prints a table and saves `reports/sample_efficiency.png` (GPU-hours vs held-out
MAPE) and `reports/sample_efficiency.json`.

    .venv/bin/python benchmarks/sample_efficiency.py [--seeds 5] [--truths H100-SXM,H200] [--workers 2]
                                                     [--budget-share 0.333]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rooflab.model.variants import DEFAULT_VARIANT  # noqa: E402
from rooflab.targeting.stop import RANGE_BETAS  # noqa: E402

FORMULAS, BATCH, N_BOOT = "vllm", 6, 50
MAX_ITERATIONS = 40


def _campaign(truth: str, seed: int, workdir: Path):
    """The default campaign on ``truth``'s GPU. A combo whose TP does not fit that GPU (Mixtral-8x7B TP2 on a 48 GB
    L40S) gets the next TP that fits, as a user would choose, and the substitution is printed."""
    import yaml

    from rooflab.collect.spec import load_campaign
    from rooflab.errors import InputError

    text = (ROOT / "configs" / "campaigns" / "default.yaml").read_text()
    text = re.sub(r"(?m)^hardware: .*$", f"hardware: {truth}", text)
    text = re.sub(r"(?m)^seed: .*$", f"seed: {seed}", text)
    text = re.sub(r"(?m)^name: .*$", f"name: se-{truth}-{seed}", text)
    path = workdir / f"se-{truth}-{seed}.yaml"
    doc = yaml.safe_load(text)
    for _ in range(8):
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        try:
            return load_campaign(str(path))
        except InputError as exc:
            m = re.fullmatch(r"(models|validation\.models)\[(\d+)\]\.tp", exc.field or "")
            if m is None or "infeasible" not in exc.problem:
                raise
            section = doc["models"] if m.group(1) == "models" else doc["validation"]["models"]
            entry = section[int(m.group(2))]
            tps = entry["tp"] if isinstance(entry["tp"], list) else [entry["tp"]]
            entry["tp"] = [t * 2 for t in tps] if isinstance(entry["tp"], list) else tps[0] * 2
            print(f"  {truth}: {entry['model']} TP {tps} does not fit; using TP {entry['tp']}", flush=True)
    return load_campaign(str(path))


class Data:
    """Runs collected once per (truth, seed) and shared by the strategies (a point is the same run with
    the same seed whoever asks for it); each strategy keeps its own list of runs and pays for them."""

    def __init__(self, campaign, root: Path):
        from rooflab.collect.launchers.direct import DirectLauncher
        from rooflab.data.store import Store

        self.c, self.store, self.launcher = campaign, Store(root), DirectLauncher()
        self.runs: dict[str, dict] = {}

    def get(self, point) -> dict:
        from rooflab.collect.collector import run_one
        from rooflab.data.sweep import run_id

        rid = run_id(self.c.name, point, 0)
        if rid not in self.runs:
            run_one(self.store, self.launcher, self.c.name, rid, point, 0, max_retries=1)
            m = self.store.manifest(rid)
            entry = {"status": m["status"], "gpu_s": float(m.get("gpu_seconds") or 0.0), "split": point.split,
                     "key": point.key}
            if m["status"] in ("ok", "saturated"):
                entry["steps"] = self.store.steps(run_id=rid, statuses=(m["status"],))
                entry["requests"] = self.store.requests(run_id=rid, statuses=(m["status"],))
            self.runs[rid] = entry
        return self.runs[rid] | {"run_id": rid}

    def tables(self, rids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        ok = [self.runs[r] for r in rids if self.runs[r]["status"] == "ok"]
        req = [self.runs[r]["requests"] for r in rids if self.runs[r]["status"] in ("ok", "saturated")]
        steps = pd.concat([e["steps"] for e in ok], ignore_index=True) if ok else pd.DataFrame()
        return steps, (pd.concat(req, ignore_index=True) if req else None)


def _fit(data: Data, rids: list[str], variant: str):
    from rooflab.fit.calibration import Options, calibrate

    steps, req = data.tables(rids)
    if not len(steps) or not (steps["split"] != "validation").any():
        return None
    try:
        return calibrate(steps, req, Options(variant=variant, formulas=FORMULAS, n_boot=N_BOOT))
    except Exception as exc:  # too little data for a fit (e.g. a single run): keep collecting
        print(f"    fit skipped: {exc}", file=sys.stderr)
        return None


class BenchSteps:
    """The campaign loop's steps for one strategy over the shared data (no Prefect, no MLflow): collection takes
    runs from :class:`Data`, the record step keeps the learning curve."""

    def __init__(self, data: Data, variant: str):
        self.data, self.variant = data, variant
        self.rids: list[str] = []
        self.curve: list[tuple[float, object]] = []
        self.first_but_hot: float | None = None  # GPU-seconds when every criterion but "no hotspot" was first met

    def collect(self, iteration, points):
        from rooflab.campaign.loop import CollectOutcome

        got = [self.data.get(p) for p in points]
        self.rids += [g["run_id"] for g in got]
        failed = sum(g["status"] == "failed" for g in got)
        return CollectOutcome(len(got) - failed, failed)

    def collected_keys(self):
        return {self.data.runs[r]["key"] for r in self.rids}

    def spend(self):
        from rooflab.targeting.strategies import Spend

        by = {s: sum(self.data.runs[r]["gpu_s"] for r in self.rids if self.data.runs[r]["split"] == s)
              for s in ("train", "validation")}
        return Spend(by["train"], by["validation"])

    def has_fit_data(self):
        return any(self.data.runs[r]["status"] == "ok" for r in self.rids)

    def calibrate(self, iteration):
        return _fit(self.data, self.rids, self.variant)

    def replay_error(self, calib):
        raise NotImplementedError("the benchmark's loop does not use the replay stop criterion")

    def record(self, record):
        self.curve.append((record.spend.total_s, record.calibration))
        if record.calibration is not None and self.first_but_hot is None and \
                not [u for u in record.stop.unmet if "hotspot" not in u]:
            self.first_but_hot = record.spend.total_s


def run_strategy(data: Data, campaign, targeting, budget_gpu_h: float | None, variant: str) -> dict:
    """One strategy through the core campaign loop (:func:`rooflab.campaign.loop.run_campaign`)."""
    from rooflab.campaign.loop import MemoryPlans, run_campaign

    camp = campaign.with_loop(batch_size=BATCH, max_iterations=MAX_ITERATIONS, variant=variant, formulas=FORMULAS,
                              n_boot=N_BOOT).with_budget(budget_gpu_h)
    steps = BenchSteps(data, variant)
    out = run_campaign(camp, steps, MemoryPlans(), targeting, report=lambda line: None)
    reason = out.stop_reason or "iteration cap"
    last = steps.curve[-1][1] if steps.curve else None
    return {"rids": steps.rids, "gpu_s": steps.spend().total_s, "runs": len(steps.rids), "converged": out.converged,
            "stop_reason": reason, "calib": last, "curve": steps.curve, "all_but_hotspots_gpu_s": steps.first_but_hot}


def _evaluate(calib, eval_steps: pd.DataFrame, variant: str) -> dict:
    from rooflab.fit.residuals import bucket_table, summary
    from rooflab.model.features import featurize
    from rooflab.model.variants import get_variant

    if calib is None:
        return {"heldout_mape": np.nan, "heldout_median_ape": np.nan, "worst_bucket_mape": np.nan}
    v = get_variant(variant)
    y = eval_steps["step_time_us"].to_numpy(dtype=float)
    pred = v.predict(featurize(eval_steps, FORMULAS), calib.beta.beta)
    s = summary(y, pred)
    buckets = bucket_table(eval_steps, y, pred, "validation")
    buckets = buckets[(buckets["dimension"] != "run_id") & (buckets["steps"] >= 20)]
    out = {"heldout_mape": s["mape"], "heldout_median_ape": s["median_ape"],
           "worst_bucket_mape": float(buckets["mape"].max()),
           "worst_bucket": f"{buckets.loc[buckets['mape'].idxmax(), 'dimension']}="
                           f"{buckets.loc[buckets['mape'].idxmax(), 'bucket']}",
           "beta": calib.beta.coefficients()}
    return out


def job(truth: str, seed: int, workdir: str, budget_share: float, variant: str) -> dict:
    from rooflab.targeting.strategies import DOptimal, RandomOrder, StaticPlan

    t0 = time.time()
    wd = Path(workdir) / f"{truth}-{seed}"
    wd.mkdir(parents=True, exist_ok=True)
    campaign = _campaign(truth, seed, wd)
    data = Data(campaign, wd / "store")
    static = run_strategy(data, campaign, StaticPlan(), None, variant)
    budget_h = static["gpu_s"] * budget_share / 3600
    eval_rids = [r for r in static["rids"] if data.runs[r]["split"] == "validation" and data.runs[r]["status"] == "ok"]
    eval_keys = {data.runs[r]["key"] for r in eval_rids}
    eval_steps, _ = data.tables(eval_rids)
    res = {"static": static, "active": run_strategy(data, campaign, DOptimal(), budget_h, variant),
           "random": run_strategy(data, campaign, RandomOrder(seed), budget_h, variant)}
    out = {"truth": truth, "seed": seed, "budget_gpu_s": budget_h * 3600, "static_gpu_s": static["gpu_s"],
           "eval_runs": len(eval_rids), "eval_steps": int(len(eval_steps)), "seconds": 0.0, "strategies": {}}
    for name, r in res.items():
        curve = [(g / 3600, _evaluate(c, eval_steps, variant)["heldout_mape"]) for g, c in r["curve"]]
        ev = _evaluate(r["calib"], eval_steps, variant)
        but = r["all_but_hotspots_gpu_s"]
        out["strategies"][name] = {"gpu_h": r["gpu_s"] / 3600, "runs": r["runs"], "converged": r["converged"],
                                   "all_but_hotspots_gpu_h": np.nan if but is None else but / 3600,
                                   "unmet": (r["stop_reason"].split("unmet: ")[-1]
                                             if "unmet" in r["stop_reason"] else ""),
                                   "stop_reason": r["stop_reason"], "curve": curve,
                                   "uses_eval_runs": sum(data.runs[x]["key"] in eval_keys for x in r["rids"]), **ev}
    # pooled static data of this truth+seed, for the reference β (pooled over seeds by the parent)
    steps, _ = data.tables([r for r in static["rids"] if data.runs[r]["split"] == "train"])
    out["static_steps_path"] = str(wd / "static_train_steps.parquet")
    steps.to_parquet(out["static_steps_path"])
    out["seconds"] = time.time() - t0
    print(f"  {truth} seed {seed}: {out['seconds']:.0f} s — " + ", ".join(
        f"{k} {v['gpu_h']:.2f} GPU-h {'converged' if v['converged'] else 'not converged'} "
        f"held-out MAPE {v['heldout_mape']:.1%}" for k, v in out["strategies"].items()), flush=True)
    return out


def reference_betas(results: list[dict], variant: str) -> dict:
    from rooflab.fit.calibration import Options, calibrate

    refs = {}
    for truth in sorted({r["truth"] for r in results}):
        steps = pd.concat([pd.read_parquet(r["static_steps_path"]) for r in results if r["truth"] == truth],
                          ignore_index=True)
        calib = calibrate(steps, None, Options(variant=variant, formulas=FORMULAS, n_boot=10))
        refs[truth] = calib.beta.coefficients()
    return refs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed … first-seed + seeds − 1")
    ap.add_argument("--truths", default="H100-SXM,H200")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variant", default=DEFAULT_VARIANT, help="model variant every strategy calibrates")
    ap.add_argument("--budget-share", type=float, default=1 / 3,
                    help="GPU budget of random and active, as a share of the static plan's measured GPU-hours")
    ap.add_argument("--out", default=str(ROOT / "reports"))
    ap.add_argument("--keep", action="store_true", help="keep the per-job data stores (in a temp folder)")
    args = ap.parse_args()
    t0 = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="rooflab-se-"))
    jobs = [(t, s) for s in range(args.first_seed, args.first_seed + args.seeds) for t in args.truths.split(",")]
    print(f"sample efficiency of {args.variant}: {len(jobs)} jobs ({args.truths} × {args.seeds} seeds), "
          f"{args.workers} workers")
    try:
        with ProcessPoolExecutor(max_workers=args.workers) as ex:
            results = list(ex.map(job, [t for t, _ in jobs], [s for _, s in jobs], [str(workdir)] * len(jobs),
                                  [args.budget_share] * len(jobs), [args.variant] * len(jobs)))
        refs = reference_betas(results, args.variant)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for r in results:
        ref = refs[r["truth"]]
        for name, s in r["strategies"].items():
            errs = {k: abs(s["beta"][k] - ref[k]) / abs(ref[k]) for k in RANGE_BETAS
                    if "beta" in s and ref.get(k)}
            rows.append({"truth": r["truth"], "seed": r["seed"], "strategy": name, "gpu_h": s["gpu_h"],
                         "runs": s["runs"], "converged": s["converged"], "heldout_mape": s["heldout_mape"],
                         "heldout_median_ape": s["heldout_median_ape"], "worst_bucket_mape": s["worst_bucket_mape"],
                         "worst_bucket": s.get("worst_bucket", ""),
                         "max_beta1_5_err": max(errs.values()) if errs else np.nan,
                         "all_but_hotspots_gpu_h": s["all_but_hotspots_gpu_h"], "unmet_at_end": s["unmet"],
                         "static_gpu_h": r["static_gpu_s"] / 3600, "stop_reason": s["stop_reason"]})
    df = pd.DataFrame(rows)
    df["ratio_vs_static"] = df["gpu_h"] / df["static_gpu_h"]
    df["but_hot_ratio"] = df["all_but_hotspots_gpu_h"] / df["static_gpu_h"]
    pd.set_option("display.width", 200)
    cols = ["truth", "seed", "strategy", "runs", "gpu_h", "ratio_vs_static", "converged", "but_hot_ratio",
            "heldout_mape", "heldout_median_ape", "worst_bucket_mape", "max_beta1_5_err"]
    fmt = {"gpu_h": "{:.2f}".format, "ratio_vs_static": "{:.2f}".format, "but_hot_ratio": "{:.2f}".format,
           "heldout_mape": "{:.1%}".format,
           "heldout_median_ape": "{:.1%}".format, "worst_bucket_mape": "{:.1%}".format,
           "max_beta1_5_err": "{:.1%}".format}
    print("\nper job")
    print(df[cols].to_string(index=False, formatters=fmt))
    agg = df.groupby(["truth", "strategy"]).agg(
        runs=("runs", "median"), gpu_h=("gpu_h", "median"), ratio_vs_static=("ratio_vs_static", "median"),
        converged=("converged", "sum"), but_hot_ratio=("but_hot_ratio", "median"),
        heldout_mape=("heldout_mape", "median"),
        heldout_median_ape=("heldout_median_ape", "median"), worst_bucket_mape=("worst_bucket_mape", "median"),
        max_beta1_5_err=("max_beta1_5_err", "median")).reset_index()
    agg["converged"] = agg["converged"].astype(int).astype(str) + f"/{args.seeds}"
    print("\nper job: why the loops stopped")
    for r in df.itertuples():
        print(f"  {r.truth} seed {r.seed} {r.strategy}: {r.stop_reason[:160]}")
    print("\nmedian over seeds (converged: seeds that reached the stop rule; but_hot_ratio: GPU-hours, as a share "
          "of static's, when every criterion except 'no hotspot' was first met)")
    print(agg.to_string(index=False, formatters=fmt))
    print("\nreference β (pooled static plans): " + "; ".join(
        f"{t}: " + " ".join(f"{k}={v:.3g}" for k, v in b.items()) for t, b in refs.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sample_efficiency.json").write_text(json.dumps(
        {"rows": df.to_dict(orient="records"), "reference_beta": refs,
         "curves": {f"{r['truth']}|{r['seed']}|{k}": s["curve"] for r in results for k, s in r["strategies"].items()}},
        indent=1, default=float))
    _plot(results, out / "sample_efficiency.png")
    print(f"\nwrote {out / 'sample_efficiency.json'} and {out / 'sample_efficiency.png'}; "
          f"total {time.time() - t0:.0f} s")


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truths = sorted({r["truth"] for r in results})
    fig, axes = plt.subplots(1, len(truths), figsize=(6 * len(truths), 4.2), squeeze=False)
    colors = {"static": "tab:gray", "random": "tab:orange", "active": "tab:blue"}
    for ax, truth in zip(axes[0], truths):
        for r in (r for r in results if r["truth"] == truth):
            for name, s in r["strategies"].items():
                xs, ys = zip(*s["curve"]) if s["curve"] else ((), ())
                kw = dict(color=colors[name], alpha=0.7, label=name if r["seed"] == 0 else None)
                if name == "static":
                    ax.scatter(xs, ys, marker="s", **kw)
                else:
                    ax.plot(xs, ys, marker=".", **kw)
                if s["converged"] and name != "static":
                    ax.scatter([xs[-1]], [ys[-1]], marker="*", s=120, color=colors[name], zorder=5)
        ax.axhline(0.10, color="k", lw=0.6, ls=":")
        ax.set_title(f"twin truth {truth} (★ = stop rule met)")
        ax.set_xlabel("GPU-hours collected")
        ax.set_ylabel("held-out step-time MAPE (static plan's V1 runs)")
        ax.set_ylim(0, 0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
