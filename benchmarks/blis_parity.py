"""Request-level parity with BLIS's own simulator (issue 13): replay BLIS's 15 training experiments with BLIS's
iter29 coefficients through rooflab's BLIS variant and compare with BLIS's *simulated* outputs.

``../shared/data/s2r/src/trained_physics_iter29.json`` holds, per experiment, the workload spec, the vLLM settings
(KV blocks, max_num_seqs, max_num_batched_tokens) and what BLIS's simulator predicted with the iter29 coefficients
(mean / p90 / p99 TTFT and E2E, completed requests). rooflab generates each workload the way BLIS does
(``rooflab.data.workload_spec``, mode ``blis``: closed-loop multi-turn sessions, system-prompt prefix groups),
replays it with BLIS's step time and α semantics (``blis-tp10``), and reports the relative difference of mean TTFT
and mean E2E; target: within 5% on at least 13 of 15. Workload randomness is rooflab's own (not Go's streams):
``--seeds N`` replays each experiment with N workload seeds and reports the spread.

    .venv/bin/python benchmarks/blis_parity.py [--seeds 1] [--out benchmarks/results/blis-parity.csv]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rooflab.data.s2r import load_kit
from rooflab.data.traces import Trace
from rooflab.data.workload_spec import generate, to_trace
from rooflab.model.coefficients import Coefficients
from rooflab.model.variants import get_variant
from rooflab.paths import S2R_DIR
from rooflab.replay.predict import replay

ITER29 = S2R_DIR / "src" / "trained_physics_iter29.json"
TOLERANCE = 0.05


def iter29() -> tuple[Coefficients, list[dict]]:
    doc = json.loads(ITER29.read_text())
    variant = "blis-tp11" if len(doc["beta_coeffs"]) == 11 else "blis-tp10"
    coefs = Coefficients(dict(zip(get_variant(variant).names, map(float, doc["beta_coeffs"]))),
                         tuple(map(float, doc["alpha_coeffs"])), variant, "blis", str(ITER29))
    return coefs, doc["experiments"]


def blis_trace(exp: dict, seed: int | None = None) -> Trace:
    """The experiment's workload as BLIS generates it, under the engine BLIS simulated (its exact KV blocks;
    prefix caching on, as BLIS always has it)."""
    kit_exp = next(x for x in load_kit().experiments if str(x.exp_id) == exp["id"])
    tr = to_trace(generate(kit_exp.workload, "blis", seed=seed), kit_exp)
    tr.engine.update({"num_gpu_blocks": int(exp["total_kv_blocks"]), "max_num_seqs": int(exp["max_num_seqs"]),
                      "max_num_batched_tokens": int(exp["max_num_batched_tokens"]), "enable_prefix_caching": True})
    tr.engine.pop("max_model_len", None)  # BLIS derives it from the model; no workload request comes near it
    return tr


def parity(exp: dict, coefs: Coefficients, seed: int | None = None) -> dict:
    t0 = time.perf_counter()
    res = replay(blis_trace(exp, seed), coefs)
    q = res.requests
    ok = ~q["pred_failed"].to_numpy(dtype=bool)
    ttft, e2e = q["pred_ttft_us"].to_numpy()[ok] / 1e3, q["pred_e2e_us"].to_numpy()[ok] / 1e3
    x = exp["expected"]
    row = {"exp_id": exp["id"], "model": exp["model"], "tp": exp["tp"], "seed": seed,
           "completed": int(ok.sum()), "blis_completed": x["completed_requests"],
           "ttft_mean_ms": float(ttft.mean()), "blis_ttft_mean_ms": x["ttft_mean_ms"],
           "e2e_mean_ms": float(e2e.mean()), "blis_e2e_mean_ms": x["e2e_mean_ms"],
           "ttft_p99_ms": float(np.percentile(ttft, 99)), "blis_ttft_p99_ms": x["ttft_p99_ms"],
           "e2e_p99_ms": float(np.percentile(e2e, 99)), "blis_e2e_p99_ms": x["e2e_p99_ms"],
           "steps": res.n_steps, "wall_s": time.perf_counter() - t0}
    row["ttft_diff"] = row["ttft_mean_ms"] / row["blis_ttft_mean_ms"] - 1
    row["e2e_diff"] = row["e2e_mean_ms"] / row["blis_e2e_mean_ms"] - 1
    row["within_5pct"] = bool(abs(row["ttft_diff"]) <= TOLERANCE and abs(row["e2e_diff"]) <= TOLERANCE)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="workload seeds per experiment (the spec's own seed first)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/blis-parity.csv"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    coefs, exps = iter29()
    rows = [parity(e, coefs, None if s == 0 else s) for e in exps for s in range(args.seeds)]
    df = pd.DataFrame(rows)
    first = df[df["seed"].isna()]
    pd.set_option("display.width", 200)
    print(first[["exp_id", "model", "tp", "completed", "ttft_mean_ms", "blis_ttft_mean_ms", "ttft_diff",
                 "e2e_mean_ms", "blis_e2e_mean_ms", "e2e_diff", "within_5pct"]].to_string(
        index=False, formatters={"ttft_diff": "{:+.1%}".format, "e2e_diff": "{:+.1%}".format,
                                 "ttft_mean_ms": "{:.1f}".format, "blis_ttft_mean_ms": "{:.1f}".format,
                                 "e2e_mean_ms": "{:.0f}".format, "blis_e2e_mean_ms": "{:.0f}".format}))
    n = int(first["within_5pct"].sum())
    print(f"\nwithin {TOLERANCE:.0%} of BLIS on mean TTFT and mean E2E: {n} of {len(first)} (target: 13 of 15)")
    if args.seeds > 1:
        spread = df.groupby("exp_id").agg(ttft_min=("ttft_diff", "min"), ttft_max=("ttft_diff", "max"),
                                          ttft_mean=("ttft_diff", "mean"), e2e_min=("e2e_diff", "min"),
                                          e2e_max=("e2e_diff", "max"))
        print(f"\nspread over {args.seeds} workload seeds (relative difference to BLIS):")
        print(spread.to_string(float_format=lambda v: f"{v:+.1%}"))
    steps, wall = int(df["steps"].sum()), float(df["wall_s"].sum())
    print(f"\nreplayed {len(df)} runs, {steps} steps in {wall:.1f} s ({steps / wall:,.0f} steps/s); "
          f"total {time.perf_counter() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.round(6).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
