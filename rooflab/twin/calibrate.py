"""Calibration of the twin's truth model against the real H100 cycle times (docs/spec.md §5).

    python -m rooflab.twin.calibrate [--steps PATH] [--hardware H100-SXM] [--seed 0] [--search]

Replays the batch compositions of the real step records (``rooflab.data.adapters.step_records``: Llama-2-70B
TP4 and CodeLlama-34B TP2 on H100 SXM) through :class:`rooflab.twin.truth.TruthModel` and compares the
predicted step times (with noise and stragglers) with the measured cycle times, per run: median APE,
p10 / p50 / p90 of real and predicted, and the ratio of the inter-quartile ranges.

The records hold batch aggregates only, so two assumptions rebuild per-request batches (stated again
in the output):

* **decode contexts**: the step's Σ decode context (estimated from KV usage by the adapter) is spread
  over its decodes as ``C · Dirichlet(1/cv², …, 1/cv²)`` — contexts that sum exactly to the total, spread
  around the mean with a coefficient of variation ``cv`` (default 0.5), seeded;
* **prefills**: the step's prefill tokens are split evenly over its prefill requests (remainder to the
  first ones), each with 0 tokens already computed, and each chunk is the prompt's last (needs logits).

Only steps with a known cycle time (both consecutive step ids sampled) are compared. ``--search``
re-runs the small bounded robust least-squares search over a few constants that was used once to set
``configs/twin/H100-SXM.yaml`` and prints suggested values; it never writes the file.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from rooflab.errors import InputError
from rooflab.model.arch import load_model
from rooflab.model.hardware import load_hardware
from rooflab.paths import REAL_DATA_DIR
from rooflab.twin.truth import TruthModel, load_twin_config, twin_configs_dir

DEFAULT_STEPS = REAL_DATA_DIR / "steps" / "h100_step_records.parquet"
CONTEXT_CV = 0.5

ASSUMPTIONS = (
    f"decode contexts: Σ decode context spread over the decodes as C·Dirichlet(1/cv²) (sum exact, cv={CONTEXT_CV}); "
    "prefill tokens split evenly over prefill requests with 0 computed tokens, every chunk final (logits)")

# (section, field, lower, upper) searched by --search; bounds are the physically plausible ranges.
SEARCH_SPACE = (
    ("gemm", "bw_eff", 0.80, 0.92),
    ("gemm", "m_half", 16.0, 64.0),
    ("gemm", "kernel_us", 0.5, 3.0),
    ("attention", "kv_bw_eff", 0.75, 0.92),
    ("attention", "per_request_us", 0.02, 0.3),
    ("allreduce", "bw_eff", 0.60, 0.90),
    ("allreduce", "one_shot_latency_us", 2.0, 8.0),
    ("allreduce", "two_shot_latency_us", 3.0, 12.0),
    ("allreduce", "latency_per_peer_us", 0.5, 3.0),
    ("overhead", "per_layer_us", 5.0, 25.0),
    ("cpu", "step_us", 200.0, 1000.0),
    ("cpu", "per_request_us", 0.5, 10.0),
)


@dataclass
class Batch:
    decode_contexts: np.ndarray
    prefills: list[tuple[int, int, int]]  # (tokens, context before, prompt) per prefill
    n_logits: int


def rebuild_batches(steps: pd.DataFrame, seed: int = 0, cv: float = CONTEXT_CV) -> list[Batch]:
    """Per-request batches from the aggregate step rows under the stated assumptions."""
    rng = np.random.default_rng(seed)
    shape = 1.0 / cv ** 2
    out = []
    for D, C, P, T in zip(steps["decode_reqs"].to_numpy(), steps["decode_context"].to_numpy(),
                          steps["prefill_reqs"].to_numpy(), steps["prefill_tokens"].to_numpy()):
        D, P, T = int(D), int(P), int(T)
        ctx = C * rng.dirichlet(np.full(D, shape)) if D > 1 else np.full(D, float(C))
        prefills = []
        if P > 0 and T > 0:
            base, extra = divmod(T, P)
            prefills = [(n, 0, n) for n in (base + (1 if i < extra else 0) for i in range(P)) if n > 0]
        out.append(Batch(np.floor(ctx).astype(np.float64), prefills, D + len(prefills)))
    return out


def load_real(path: Path, hardware: str = "H100-SXM") -> pd.DataFrame:
    from rooflab.data.adapters.step_records import read_step_records

    steps = read_step_records(path, hardware=hardware)
    return steps[np.isfinite(steps["step_time_us"])].reset_index(drop=True)


def predict(steps: pd.DataFrame, batches: list[Batch], config: dict, hardware: str = "H100-SXM", seed: int = 0,
            noise: bool = True) -> np.ndarray:
    hw = load_hardware(hardware)
    pred = np.empty(len(steps))
    for key, idx in steps.groupby(["model", "tp"]).indices.items():
        model, tp = cast(tuple[str, int], key)  # pandas-stubs type group keys as Hashable
        truth = TruthModel(load_model(model), hw, int(tp), config, seed=seed)
        f = truth.step_time_us if noise else truth.expected_step_time_us
        for i in idx:
            b = batches[i]
            pred[i] = f(b.decode_contexts, b.prefills, b.n_logits)
    return pred


def summarize(steps: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    rows = []
    real = steps["step_time_us"].to_numpy()
    groups = list(steps.groupby("run_id").indices.items()) + [("ALL", np.arange(len(steps)))]
    for run, idx in groups:
        r, p = real[idx], pred[idx]
        rq = np.percentile(r, [10, 25, 50, 75, 90])
        pq = np.percentile(p, [10, 25, 50, 75, 90])
        rows.append({
            "run": run, "model": "-" if run == "ALL" else steps["model"].iloc[idx[0]],
            "tp": 0 if run == "ALL" else int(steps["tp"].iloc[idx[0]]), "steps": len(idx),
            "median_ape_pct": 100 * float(np.median(np.abs(p - r) / r)),
            "mean_ape_pct": 100 * float(np.mean(np.abs(p - r) / r)),
            "bias_pct": 100 * float(np.median(p / r - 1)),
            "real_p10": rq[0], "real_p50": rq[2], "real_p90": rq[4],
            "pred_p10": pq[0], "pred_p50": pq[2], "pred_p90": pq[4],
            "iqr_ratio": float((pq[3] - pq[1]) / (rq[3] - rq[1])),
        })
    return pd.DataFrame(rows)


def format_table(tab: pd.DataFrame) -> str:
    lines = ["| run | model | TP | steps | median APE | mean APE | bias | real p10/p50/p90 (ms) "
             "| twin p10/p50/p90 (ms) | IQR twin/real |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in tab.to_dict("records"):
        lines.append(
            f"| {r['run']} | {r['model']} | {r['tp'] or '-'} | {r['steps']} | {r['median_ape_pct']:.2f}% "
            f"| {r['mean_ape_pct']:.2f}% | {r['bias_pct']:+.2f}% | "
            f"{r['real_p10'] / 1e3:.2f} / {r['real_p50'] / 1e3:.2f} / {r['real_p90'] / 1e3:.2f} | "
            f"{r['pred_p10'] / 1e3:.2f} / {r['pred_p50'] / 1e3:.2f} / {r['pred_p90'] / 1e3:.2f} | "
            f"{r['iqr_ratio']:.2f} |")
    return "\n".join(lines)


def search(steps: pd.DataFrame, batches: list[Batch], config: dict, hardware: str) -> dict:
    """Bounded robust least squares on log(expected / real) over :data:`SEARCH_SPACE`."""
    from scipy.optimize import least_squares

    real = steps["step_time_us"].to_numpy()
    runs = steps["run_id"].to_numpy()
    w = np.ones(len(real))
    for r in np.unique(runs):  # every run weighs the same
        w[runs == r] = 1.0 / np.sqrt((runs == r).sum())

    def cfg_for(x: np.ndarray) -> dict:
        c = copy.deepcopy(config)
        for (sec, f, _, _), v in zip(SEARCH_SPACE, x):
            c[sec][f] = float(v)
        return c

    def resid(x: np.ndarray) -> np.ndarray:
        return w * np.log(predict(steps, batches, cfg_for(x), hardware, noise=False) / real)

    x0 = np.array([np.clip(config[s][f], lo, hi) for s, f, lo, hi in SEARCH_SPACE])
    lo = np.array([s[2] for s in SEARCH_SPACE])
    hi = np.array([s[3] for s in SEARCH_SPACE])
    res = least_squares(resid, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.03 / np.sqrt(len(real) / 3),
                        x_scale=hi - lo, diff_step=1e-3, max_nfev=300)
    return cfg_for(res.x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rooflab.twin.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=Path, default=DEFAULT_STEPS, help="real step records (Parquet)")
    ap.add_argument("--hardware", default="H100-SXM")
    ap.add_argument("--config", type=Path, default=None, help="twin config (default configs/twin/<hardware>.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search", action="store_true", help="re-run the constant search and print suggestions")
    args = ap.parse_args(argv)
    try:
        steps = load_real(args.steps, args.hardware)
        config = load_twin_config(args.hardware, args.config)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    batches = rebuild_batches(steps, seed=args.seed)
    print(f"real data: {args.steps} ({len(steps)} steps with a cycle time)")
    print(f"twin config: {args.config or twin_configs_dir() / (args.hardware + '.yaml')}")
    print(f"assumptions: {ASSUMPTIONS}")
    if args.search:
        config = search(steps, batches, config, args.hardware)
        print("suggested constants (not written):")
        for sec, f, _, _ in SEARCH_SPACE:
            print(f"  {sec}.{f}: {config[sec][f]:.4g}")
    pred = predict(steps, batches, config, args.hardware, seed=args.seed, noise=True)
    tab = summarize(steps, pred)
    print()
    print(format_table(tab))
    worst = tab[tab.run != "ALL"]["median_ape_pct"].max()
    print(f"\nworst per-run median APE: {worst:.2f}% (target <= 10%)")
    print("\nlargest misses (bound = the step's FLOPs or weight bytes at 100% of the datasheet peak):")
    from rooflab.model.features import featurize

    real = steps["step_time_us"].to_numpy()
    worst_idx = np.argsort(-np.abs(np.log(pred / real)))[:5]
    feats = featurize(steps.iloc[worst_idx])
    bound = np.maximum((feats["F_pf_compute"] + feats["F_dc_compute"]).to_numpy(),
                       (feats["F_weight_static"] + feats["F_weight_moe"]).to_numpy())
    for j, i in enumerate(worst_idx):
        r = steps.iloc[i]
        why = "measured below the bound: cycle-time attribution" if real[i] < bound[j] else \
            "straggler" if real[i] > pred[i] else "over-predicted"
        print(f"  {r.run_id} step {r.step_id}: {int(r.decode_reqs)} decodes, {int(r.prefill_reqs)} prefills / "
              f"{int(r.prefill_tokens)} tokens: real {real[i] / 1e3:.1f} ms, twin {pred[i] / 1e3:.1f} ms, "
              f"bound {bound[j] / 1e3:.1f} ms ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
