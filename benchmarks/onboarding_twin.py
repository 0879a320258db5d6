"""Onboarding on the twin (issue 16), to see further than the measured data reach: for every twin truth
(``configs/twin/*.yaml``: H100-SXM, H200, A100-80GB, L40S, B200), GPU-hours to the onboarding stop rule when the loop
starts from a prior fitted on *other* setups, against the same loop from scratch and against rooflab's step-level
campaign from scratch, and the accuracy each reaches on held-out runs of the new setup.

* **priors**: the seed's static plan on the default campaign's training combos (Llama-3.1-8B TP1/2, Llama-3.1-70B
  TP4, Mixtral-8x7B TP2, Mixtral-8x22B TP8, DeepSeek-V2-Lite TP1; its held-out combos left out) collected on a twin
  truth (direct launcher; a combo that does not fit the GPU — Mixtral-8x7B TP2 on L40S — is left out), fitted by
  the step-level calibration (``roofline7+layers``, β and α);
* **new model** (one per truth): Qwen3-14B TP1 on that truth (in none of the prior's runs), from the prior fitted on
  the other models *on the same truth*;
* **new GPU** (one per truth but H100-SXM): Llama-3.1-8B TP1 on that truth (its own datasheet and efficiencies),
  from the prior fitted on H100-SXM;
* each onboarding is :func:`rooflab.campaign.onboard.onboard` with the twin's direct launcher in the collect step
  (the template ``configs/campaigns/onboard.yaml``, 2 runs per iteration, at most 8 iterations), λ of the
  sim-to-real benchmark's rooflab-best set when its fits file exists (else 0.01) — from the fitted prior, and from
  scratch (the same loop, prior centre = the neutral coefficients, same λ);
* and rooflab's step-level campaign from scratch on the new setup (D-optimal, 6 runs per iteration, the campaign
  stop rule; the default campaign's candidate space with the same model at TP 2 held out, as that stop rule needs
  held-out runs; a budget of 3 GPU-h);
* held-out: 5 runs of the new setup outside the onboarding's candidate space (W1 at 1024 and 4096 tokens, W2 at
  2048, W3 at 8 and 32 req/s), scored by the median APE of their mean E2E and TTFT, replayed with each iteration's
  coefficients; and the GPU-hours after which they are first within the issue's targets (≤ 5% E2E, ≤ 10% TTFT:
  0 when the prior alone is).

    .venv/bin/python benchmarks/onboarding_twin.py [--workers 1] [--seeds 1] [--truths H100-SXM,H200,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANT = "roofline7+layers"
STARTS = ("fitted prior", "scratch", "campaign from scratch")
TRUTHS = ("H100-SXM", "H200", "A100-80GB", "L40S", "B200")  # configs/twin/*.yaml
PRIOR_GPU_OF_NEW_GPU = "H100-SXM"  # the new-GPU scenarios start from the prior fitted on this truth
NEW_MODEL, NEW_GPU_MODEL = ("qwen3-14b", 1), ("llama-3.1-8b", 1)


def scenarios(truths: tuple[str, ...]) -> dict[str, tuple[str, int, str, str]]:
    """name -> (model, TP, hardware, the truth its prior was fitted on)."""
    out = {f"new model on {t}": (*NEW_MODEL, t, t) for t in truths}
    out.update({f"new GPU {t}": (*NEW_GPU_MODEL, t, PRIOR_GPU_OF_NEW_GPU) for t in truths
                if t != PRIOR_GPU_OF_NEW_GPU})
    return out
HELD_OUT = (("W1", 1024, 1, 0.5), ("W1", 4096, 1, 0.5), ("W2", 2048, 512, 0.05), ("W3", 256, 256, 8.0),
            ("W3", 256, 256, 32.0))


def fit_prior(workdir: Path, seed: int, truth: str) -> dict:
    """The step-level fit of the static plan's training runs on the ``truth`` twin (see the module doc)."""
    from rooflab.collect.collector import collect
    from rooflab.collect.launchers.direct import DirectLauncher
    from rooflab.collect.spec import parse_campaign, static99
    from rooflab.data.store import Store
    from rooflab.errors import InputError
    from rooflab.fit.calibration import Options, calibrate

    doc = yaml.safe_load((ROOT / "configs" / "campaigns" / "default.yaml").read_text())
    doc.update(name=f"prior-{truth}-{seed}", seed=seed, hardware=truth)
    dropped = []
    while True:  # a training combo that does not fit this GPU (Mixtral-8x7B on 2× L40S) is left out, and said so
        try:
            camp = parse_campaign(doc, source=f"<prior on {truth}>")
            break
        except InputError as exc:
            if "infeasible" not in str(exc) or not doc["models"]:
                raise
            idx = int(str(exc).split("models[")[1].split("]")[0])
            dropped.append(doc["models"].pop(idx)["model"])
    if dropped:
        print(f"prior on {truth}: left out {', '.join(dropped)} (does not fit the GPU)", flush=True)
    points = [p for p in static99(camp) if p.split == "train"]
    store = Store(workdir / f"prior-store-{truth}-{seed}")
    collect(store, DirectLauncher(), camp.name, points)
    runs = store.runs(campaign=camp.name, statuses=("ok",))["run_id"].tolist()
    calib = calibrate(store.steps(run_id=runs, statuses=("ok",)), store.requests(run_id=runs, statuses=("ok",)),
                      Options(variant=VARIANT, n_boot=10))
    c = calib.coefficients()
    c.source = f"twin prior: static plan, {len(runs)} training runs on {truth} (seed {seed})"
    return {"coefficients": c.to_dict(), "runs": len(runs),
            "gpu_hours": float(store.gpu_seconds(campaign=camp.name)) / 3600}


def heldout_runs(workdir: Path, model: str, tp: int, hardware: str, engine: dict, seed: int) -> list[tuple]:
    """The held-out runs of the new setup (collected once per job), as (label, trace, measured means)."""
    from rooflab.campaign.onboard import measured_means
    from rooflab.collect.collector import run_one
    from rooflab.collect.launchers.direct import DirectLauncher
    from rooflab.collect.workloads import make_params
    from rooflab.data.store import Store
    from rooflab.data.sweep import SweepPoint, run_id
    from rooflab.data.trace_readers import read_store_trace

    store = Store(workdir / "heldout")
    out = []
    for fam, inp, outp, rate in HELD_OUT:
        p = SweepPoint(model, tp, hardware, fam, tuple(make_params(inp, outp, rate).items()), duration_s=120,
                       seed=seed, split="validation", engine=tuple(engine.items()))
        rid = run_id("heldout", p)
        run_one(store, DirectLauncher(), "heldout", rid, p, 0)
        if store.status(rid) != "ok":
            continue
        tr = read_store_trace(store, rid)
        means = measured_means(tr.requests)
        if means is not None:
            out.append((p.label(), tr, means))
    return out


def score(coefs, held: list[tuple]) -> dict:
    from rooflab.campaign.onboard import apes
    from rooflab.targeting.summary_information import forecast

    errs = [apes(forecast(tr, coefs), means) for _, tr, means in held]
    return {m: float(np.median([e[m] for e in errs])) for m in ("e2e_mean", "ttft_mean")}


HELD_OUT_TARGETS = {"e2e_mean": 0.05, "ttft_mean": 0.10}  # the onboarding targets, on the held-out runs
CAMPAIGN_BUDGET_H = 3.0  # the step-level campaign from scratch stops here if its stop rule does not fire first
VALIDATION_TP = 2  # its held-out combo: the same model at TP 2 (the campaign's stop rule needs held-out runs)


def campaign_from_scratch(setup: tuple[str, int, str], scenario: str, seed: int, wd: Path, held: list[tuple]
                          ) -> dict:
    """rooflab's step-level campaign (D-optimal, the campaign stop rule) on the new setup alone, from an empty store
    (``benchmarks/sample_efficiency.py``'s loop): the default campaign's candidate space and loop, the same model at
    TP 2 held out."""
    import sample_efficiency as se

    from rooflab.collect.spec import parse_campaign
    from rooflab.targeting.strategies import DOptimal

    model, tp, hw = setup
    tpl = yaml.safe_load((ROOT / "configs" / "campaigns" / "default.yaml").read_text())
    doc = {**tpl, "name": f"scratch-{scenario.replace(' ', '-')}-{seed}", "hardware": hw, "seed": seed,
           "models": [{"model": model, "tp": tp}],
           "validation": {**tpl["validation"], "models": [{"model": model, "tp": VALIDATION_TP}]},
           "budget_gpu_hours": CAMPAIGN_BUDGET_H}
    camp = parse_campaign(doc, source=f"<{doc['name']}>")
    data = se.Data(camp, wd / "campaign-store")
    r = se.run_strategy(data, camp, DOptimal(), CAMPAIGN_BUDGET_H, VARIANT)
    curve = [{"iteration": i, "gpu_hours": g / 3600, **(score(c.coefficients(), held) if c is not None else {})}
             for i, (g, c) in enumerate(r["curve"])]
    return {"iterations": len(r["curve"]), "runs": r["runs"], "gpu_hours": r["gpu_s"] / 3600,
            "converged": r["converged"], "stop_reason": r["stop_reason"], "curve": curve}


def job(args: tuple) -> dict:
    scenario, (model, tp, hw, _), start, prior_doc, lam, seed, workdir = args
    from rooflab.campaign.onboard import onboard
    from rooflab.campaign.onboard_state import OnboardSetup, create_state
    from rooflab.collect.launchers.direct import DirectLauncher
    from rooflab.evaluation.s2r import neutral_coefficients
    from rooflab.model.coefficients import coefficients_from_doc

    t0 = time.time()
    wd = Path(workdir) / f"{scenario.replace(' ', '-')}-{start}-{seed}"
    wd.mkdir(parents=True, exist_ok=True)
    tpl = yaml.safe_load((ROOT / "configs" / "campaigns" / "onboard.yaml").read_text())
    tpl["seed"] = seed
    (wd / "template.yaml").write_text(yaml.safe_dump(tpl))
    prior = coefficients_from_doc(prior_doc, "twin prior") if start == "fitted prior" else \
        neutral_coefficients(VARIANT)
    setup = OnboardSetup(model, hw, tp, budget_gpu_hours=None, prior_strength=lam, batch_size=2, max_iterations=8,
                         template=str(wd / "template.yaml"))
    state = create_state(wd / "state", setup, prior)
    held = heldout_runs(wd, model, tp, hw, state.campaign.engine, seed)
    if start == "campaign from scratch":
        c = campaign_from_scratch((model, tp, hw), scenario, seed, wd, held)
        c["curve"].insert(0, {"iteration": -1, "gpu_hours": 0.0, **{m: float("nan") for m in ("e2e_mean",
                                                                                                "ttft_mean")}})
        res = {"scenario": scenario, "start": start, "seed": seed, "setup": f"{model} TP{tp} on {hw}",
               "heldout_runs": len(held), "seconds": time.time() - t0, **c}
        print(f"  {scenario} {start} (seed {seed}): {res['runs']} runs, {res['gpu_hours']:.3f} GPU-h: "
              f"{res['stop_reason'][:140]} ({res['seconds']:.0f} s)", flush=True)
        return res
    out = onboard(state, launcher=DirectLauncher(), report=lambda line: None)
    curve = [{"iteration": -1, "gpu_hours": 0.0, **score(prior, held)}]
    for f in state.fits():
        curve.append({"iteration": f["iteration"], "gpu_hours": f["gpu_hours"],
                      **score(coefficients_from_doc(f["coefficients"], "fit"), held), "stop": f["stop"]["stop"]})
    runs = len(state.store.runs(campaign=state.campaign.name, statuses=("ok", "saturated", "failed")))
    res = {"scenario": scenario, "start": start, "seed": seed, "setup": f"{model} TP{tp} on {hw}",
           "iterations": out.iterations, "runs": runs, "gpu_hours": out.spend.total_s / 3600,
           "converged": out.converged,
           "stop_reason": out.stop_reason, "curve": curve, "heldout_runs": len(held), "seconds": time.time() - t0}
    print(f"  {scenario} from {start} (seed {seed}): {res['runs']} runs, {res['gpu_hours']:.3f} GPU-h, "
          f"{'converged' if out.converged else 'stopped'}: {out.stop_reason[:140]} ({res['seconds']:.0f} s)",
          flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--truths", default=",".join(TRUTHS), help="comma-separated twin truths (configs/twin)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onboarding-twin.csv")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    truths = tuple(t for t in args.truths.split(",") if t)
    unknown = [t for t in truths if t not in TRUTHS]
    if unknown:
        sys.exit(f"error: --truths: no twin truth {unknown[0]!r} (have: {', '.join(TRUTHS)})")
    sc = scenarios(truths)
    lam = 1e-2
    fits = ROOT / "benchmarks" / "results" / "s2r-fits.json"
    if fits.is_file():
        from rooflab.evaluation.onboarding import load_prior

        lam = load_prior(fits)[1]
    workdir = Path(tempfile.mkdtemp(prefix="rooflab-onb-twin-"))
    try:
        priors: dict[tuple[str, int], dict] = {}
        for seed in range(args.seeds):
            for truth in sorted({v[3] for v in sc.values()}):
                priors[truth, seed] = fit_prior(workdir, seed, truth)
                print(f"prior on {truth} (seed {seed}): {priors[truth, seed]['runs']} runs, "
                      f"{priors[truth, seed]['gpu_hours']:.2f} GPU-h, {time.time() - t0:.0f} s", flush=True)
        jobs = [(name, setup, start, priors[setup[3], seed]["coefficients"], lam, seed, str(workdir))
                for seed in range(args.seeds) for name, setup in sc.items() for start in STARTS]
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as ex:
            results = list(ex.map(job, jobs))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for r in results:
        last = r["curve"][-1]
        reach = next((c for c in r["curve"] if c.get("e2e_mean", np.nan) <= HELD_OUT_TARGETS["e2e_mean"]
                      and c.get("ttft_mean", np.nan) <= HELD_OUT_TARGETS["ttft_mean"]), None)
        rows.append({"scenario": r["scenario"], "setup": r["setup"], "start": r["start"], "seed": r["seed"],
                     "runs": r["runs"], "gpu_hours": round(r["gpu_hours"], 4), "converged": r["converged"],
                     "heldout_e2e_before": round(r["curve"][0]["e2e_mean"], 4),
                     "heldout_ttft_before": round(r["curve"][0]["ttft_mean"], 4),
                     "heldout_e2e_at_stop": round(last["e2e_mean"], 4),
                     "heldout_ttft_at_stop": round(last["ttft_mean"], 4),
                     "gpu_hours_to_heldout_target": None if reach is None else round(reach["gpu_hours"], 4),
                     "stop_reason": r["stop_reason"], "curve": json.dumps(r["curve"])})
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 240)
    print(df.drop(columns=["curve", "stop_reason"]).to_string(index=False))
    for r in rows:
        print(f"  {r['scenario']} from {r['start']} seed {r['seed']}: {r['stop_reason'][:200]}")
    print("\nmedian over scenarios (and seeds):")
    for start, g in df.groupby("start", sort=False):
        print(f"  {start}: {g['runs'].median():g} runs, {g['gpu_hours'].median():.3f} GPU-h, converged "
              f"{int(g['converged'].sum())}/{len(g)}; held-out E2E / TTFT median APE before "
              f"{g['heldout_e2e_before'].median():.1%} / {g['heldout_ttft_before'].median():.1%}, at the stop "
              f"{g['heldout_e2e_at_stop'].median():.1%} / {g['heldout_ttft_at_stop'].median():.1%}; held-out within "
              f"5% / 10% in {int(g['gpu_hours_to_heldout_target'].notna().sum())}/{len(g)}, at a median "
              f"{g['gpu_hours_to_heldout_target'].median():.3f} GPU-h of those")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"wrote {args.out}; lambda {lam:g}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
