"""The real-data request-level evaluation of issue 7 (``make replay``; ``python -m benchmarks.replay_real``).

Split by run, never by request, of the 12 non-overloaded real H100 runs (``../shared/data/real``):

* **training runs** (6): the ``general`` and ``codegen`` runs of Llama-2-70B TP4, Mixtral-8x7B TP2 and
  CodeLlama-34B TP2 — they include the 3 runs that have step records;
* **held-out runs** (3): the ``roleplay`` run of each of those models (another workload: longer prompts, a
  150-token system prompt, a lower rate);
* **held-out model** (3): all of Llama-2-7B TP1 (general, codegen, roleplay) — never seen in any fit;
* the 4 overloaded ``reasoning`` runs: saturation behaviour only.

Coefficient sets, each replayed on the full held-out runs:

* (a) **step fit**: β fitted on the real step records only (``rooflab fit``, roofline7+layers), α = 0
  (step records carry no request timestamps), and (a′) the same β with α calibrated by replay on the
  training runs (β fixed);
* (b) **end-to-end**: β and α calibrated by replay of the training runs' request data
  (:func:`rooflab.fit.request_level.calibrate_e2e`), started from (a′);
* (c) **BLIS trained-physics** (``blis/defaults.yaml``) mapped onto rooflab's features
  (:func:`rooflab.replay.predict.blis_coefficients`).

Writes ``reports/replay-real/results.json``, ``table.md`` and predicted-vs-measured plots.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rooflab.data.trace_readers import read_real_trace
from rooflab.files import atomic_write_text, json_dumps
from rooflab.model.coefficients import Coefficients, load_coefficients
from rooflab.model.variants import DEFAULT_VARIANT
from rooflab.replay.metrics import METRICS, compare, saturation_report
from rooflab.replay.plots import plot_replay
from rooflab.replay.predict import replay

TRAIN = ("20260217-202857-llama-2-70b-tp4-general", "20260217-203421-llama-2-70b-hf-tp4-codegen",
         "20260218-130541-mixtral-8x7b-v0-1-tp2-general", "20260218-120914-mixtral-8x7b-v0-1-tp2-codegen",
         "20260218-150304-codellama-34b-tp2-general", "20260218-150956-codellama-34b-tp2-codegen")
HELD_OUT_RUNS = ("20260218-084319-llama-2-70b-tp4-roleplay", "20260218-141024-mixtral-8x7b-v0-1-tp2-roleplay",
                 "20260218-155500-codellama-34b-tp2-roleplay")
HELD_OUT_MODEL = ("20260217-231439-llama-2-7b-tp1-general", "20260217-155451-llama-2-7b-tp1-codegen",
                  "20260217-162547-llama-2-7b-tp1-roleplay")
OVERLOADED = ("20260217-170634-llama-2-7b-tp1-reasoning", "20260218-065057-llama-2-70b-hf-tp4-reasoning",
              "20260218-135247-mixtral-8x7b-v0-1-tp2-reasoning", "20260218-160939-codellama-34b-tp2-reasoning")


def step_fit(root: Path, variant: str = DEFAULT_VARIANT, n_boot: int = 20) -> Coefficients:
    """(a): β from the real step records (all three step-record runs are training runs), α not fitted."""
    from rooflab.data.adapters import read_steps
    from rooflab.fit.calibration import Options, calibrate
    from rooflab.model.coefficients import coefficients_from_doc

    steps = read_steps(root / "steps" / "h100_step_records.parquet")
    runs = set(steps["run_id"].astype(str))
    assert runs <= set(TRAIN), f"step-record runs outside the training split: {runs - set(TRAIN)}"
    calib = calibrate(steps, None, Options(variant=variant, n_boot=n_boot))
    c = coefficients_from_doc(calib.to_dict(), "step fit on the real step records")
    c.notes = ["α not fitted: step records carry no request timestamps (α = 0)"]
    return c


def _fmt(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"


def evaluate(root: Path, out_dir: Path, *, polish: int = 8, iterations: int = 3, log=print) -> dict:
    from rooflab.fit.request_level import E2EOptions, calibrate_e2e

    t0 = time.perf_counter()
    traces = {}

    def trace(name):
        if name not in traces:
            traces[name] = read_real_trace(name, root)
        return traces[name]

    sets: dict[str, Coefficients] = {}
    log("(a) step fit on the real step records …")
    sets["a_step"] = step_fit(root)
    train = [trace(n) for n in TRAIN]
    log("(a') α by replay, β of the step fit …")
    alpha_only = calibrate_e2e(train, sets["a_step"], E2EOptions(fit_beta=False, iterations=2, polish_evals=0), log=log)
    sets["a_step_alpha"] = alpha_only.coefficients
    log("(b) end-to-end calibration …")
    e2e = calibrate_e2e(train, sets["a_step_alpha"], E2EOptions(iterations=iterations, polish_evals=polish), log=log)
    sets["b_e2e"] = e2e.coefficients
    sets["c_blis"] = load_coefficients(root / "blis" / "defaults.yaml")
    t_cal = time.perf_counter() - t0

    groups = {"held-out runs": HELD_OUT_RUNS, "held-out model": HELD_OUT_MODEL}
    results: dict = {k: {} for k in sets}
    frames: dict = {k: {} for k in sets}
    replay_s, replay_steps = 0.0, 0
    for key, coefs in sets.items():
        names = list(HELD_OUT_RUNS + HELD_OUT_MODEL)
        if key == "b_e2e":
            names += list(TRAIN)
        if key in ("b_e2e", "c_blis"):
            names += list(OVERLOADED)
        for name in names:
            res = replay(trace(name), coefs)
            replay_s += res.wall_s
            replay_steps += res.n_steps
            cm = compare(res)
            cm["group"] = ("training" if name in TRAIN else "overloaded" if name in OVERLOADED else
                           next(g for g, runs in groups.items() if name in runs))
            cm["replay"] = {"steps": res.n_steps, "wall_s": res.wall_s, "sim_s": res.sim_time_s, **res.stats}
            if name in OVERLOADED:
                cm["saturation"] = saturation_report(res)
            results[key][name] = cm
            frames[key][name] = res.requests
            log(f"  {key:13s} {name[16:]:36s} TTFT {_fmt(cm['ttft'].get('mean_ape'))} ITL "
                f"{_fmt(cm['itl'].get('mean_ape'))} E2E {_fmt(cm['e2e'].get('mean_ape'))}  ({res.wall_s:.1f} s)")
        held = {n: frames[key][n] for n in HELD_OUT_RUNS + HELD_OUT_MODEL}
        plot_replay(held, out_dir / f"pred_vs_measured_{key}.png", title=f"({key}, held out)")

    summary = {}
    for key in sets:
        summary[key] = {}
        for g, runs in {"held-out (all 6)": HELD_OUT_RUNS + HELD_OUT_MODEL, **groups, "training": TRAIN}.items():
            rows = [results[key][n] for n in runs if n in results[key]]
            if not rows:
                continue
            summary[key][g] = {m: {stat: float(np.median([r[m][stat] for r in rows]))
                                   for stat in ("mean_ape", "p90_ape", "p99_ape", "request_mape", "pearson_r")}
                               for m in METRICS}
    doc = {"split": {"training": TRAIN, "held_out_runs": HELD_OUT_RUNS, "held_out_model": HELD_OUT_MODEL,
                     "overloaded": OVERLOADED},
           "coefficients": {k: c.to_dict() for k, c in sets.items()},
           "e2e_history": e2e.history, "alpha_only_history": alpha_only.history,
           "summary": summary, "runs": results,
           "timing": {"calibration_s": t_cal, "total_s": time.perf_counter() - t0, "replay_s": replay_s,
                      "replay_steps": replay_steps,
                      "replay_steps_per_s": replay_steps / replay_s if replay_s else None}}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json_dumps(doc))
    atomic_write_text(out_dir / "table.md", render(doc))
    return doc


LABELS = {"a_step": "(a) step records only, α = 0", "a_step_alpha": "(a′) step-record β + replay-fitted α",
          "b_e2e": "(b) end-to-end calibration", "c_blis": "(c) BLIS trained-physics, mapped"}


def render(doc: dict) -> str:
    lines = ["| coefficients | held out | TTFT | ITL | E2E | TTFT P90 | E2E P90 | E2E per-request MAPE |",
             "|---|---|---|---|---|---|---|---|"]
    for key, groups in doc["summary"].items():
        for g, s in groups.items():
            lines.append(f"| {LABELS.get(key, key)} | {g} | {_fmt(s['ttft']['mean_ape'])} "
                         f"| {_fmt(s['itl']['mean_ape'])} "
                         f"| {_fmt(s['e2e']['mean_ape'])} | {_fmt(s['ttft']['p90_ape'])} | {_fmt(s['e2e']['p90_ape'])} "
                         f"| {_fmt(s['e2e']['request_mape'])} |")
    lines += ["",
              "Per run (APE of the run's mean; grade from per-request MAPE and Pearson r, BLIS calibrate rule):", "",
              "| coefficients | run | group | TTFT | ITL | E2E | E2E grade | measured / predicted failures |",
              "|---|---|---|---|---|---|---|---|"]
    for key, runs in doc["runs"].items():
        for name, c in runs.items():
            lines.append(f"| {LABELS.get(key, key)} | {name[16:]} | {c['group']} | {_fmt(c['ttft'].get('mean_ape'))} "
                         f"| {_fmt(c['itl'].get('mean_ape'))} | {_fmt(c['e2e'].get('mean_ape'))} "
                         f"| {c['e2e'].get('grade', 'n/a')} | {c['measured_failed']} / {c['predicted_failed']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from rooflab.data.adapters.real_requests import DEFAULT_ROOT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the real data folder (../shared/data/real)")
    ap.add_argument("--out", type=Path, default=Path("reports/replay-real"))
    ap.add_argument("--polish", type=int, default=8, help="Nelder–Mead replay evaluations of the e2e calibration")
    ap.add_argument("--iterations", type=int, default=3, help="stacked fixed-point iterations")
    args = ap.parse_args(argv)
    doc = evaluate(args.root, args.out, polish=args.polish, iterations=args.iterations)
    print()
    print(render(doc))
    t = doc["timing"]
    print(f"calibration {t['calibration_s']:.0f} s, total {t['total_s']:.0f} s; replay {t['replay_steps']} steps at "
          f"{t['replay_steps_per_s']:.0f} steps/s; results in {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
