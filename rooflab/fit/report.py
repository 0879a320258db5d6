"""Plain-text rendering of a calibration for terminals and logs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rooflab.fit.calibration import Calibration
from rooflab.fit.health import overall


def _num(v: float | None, digits: int = 4) -> str:
    if v is None or not np.isfinite(v):
        return "inf" if v is not None and np.isinf(v) else "-"
    return f"{v:.{digits}g}"


def _table(rows: Sequence[Sequence[object]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]

    def line(r: Sequence[object]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(c: Calibration, top_buckets: int = 40) -> str:
    b = c.beta
    out = []
    t = c.routing["total"]
    out.append(f"rooflab calibration — variant {b.variant.name}, formulas {b.formulas}, "
               f"prior strength λ={b.prior_strength:g} ({b.prior_selection['method']})")
    out.append(f"steps: {t['steps']} total, {t['with_step_time']} with a step time, {t['saturated']} saturated "
               f"(KV>95%: {t['saturated_kv_usage']}, preemption: {t['saturated_preemption']}), "
               f"{t['held_out_validation']} held out for validation, {t['fit']} fitted; runs: {len(b.runs)}")
    out.append(f"bootstrap: {len(b.draws)} draws over {b.n_units} {b.unit_kind}s"
               + (" (fewer than 5 runs: contiguous blocks within runs)" if b.unit_kind == "block" else ""))
    out.append("")
    rows: list[list[object]] = [[tm.name, _num(v), f"[{_num(lo)}, {_num(hi)}]", tm.unit, tm.meaning]
                                for tm, v, lo, hi in zip(b.variant.terms, b.beta, b.lower, b.upper)]
    out.append(_table(rows, ["coef", "value", f"{int(b.ci * 100)}% interval", "unit", "term"]))
    for held, into in b.ties.items():
        out.append(f"note: {held} and {into} are proportional in this data; {held} is held at 0 and {into} "
                   "carries both")
    a = c.alpha.to_dict()
    out.append("")
    if a["fitted"]:
        out.append("α: " + ", ".join(f"{k} = {_num(v['value'])} {v['unit']} [{_num(v['lower'])}, {_num(v['upper'])}]"
                                     for k, v in a["coefficients"].items()))
    else:
        out.append(f"α: not fitted ({a['reason']})")
    out.append("")
    out.append(f"health: {overall(c.health).upper()}")
    rows = [[h.check, h.target, h.status.upper() if h.status != "pass" else h.status, _num(h.value, 3), h.rule,
             h.action] for h in c.health]
    out.append(_table(rows, ["check", "target", "status", "value", "rule", "action"]))
    out.append("")
    for split, s in c.accuracy.items():
        out.append(f"accuracy [{split}]: {s['steps']} steps, MAPE {s['mape']:.2%}, median APE {s['median_ape']:.2%}, "
                   f"P90 APE {s['p90_ape']:.2%}")
    spec = c.specification
    if spec.get("reset"):
        out.append(f"specification (run-level cells: {spec['cells']}): RESET curvature the linear fit misses "
                   f"{spec['reset']['rms_gain']:.1%} of residual RMS (p={spec['reset']['p_value']:.2g}); "
                   f"Breusch-Pagan: prediction explains {spec['breusch_pagan']['r2']:.1%} of the squared relative "
                   f"error (p={spec['breusch_pagan']['p_value']:.2g})")
    elif spec:
        out.append(f"specification tests skipped: {spec.get('skipped')}")
    out.append("")
    r = c.residuals
    r = r[r["dimension"] != "run_id"].head(top_buckets)
    rows = [[x.split, x.dimension, x.bucket, x.steps, f"{x.mape:.2%}", f"{x.median_ape:.2%}", f"{x.bias:+.2%}",
             "HOTSPOT" if x.hotspot else ""] for x in r.itertuples()]
    out.append("residual buckets (hotspot: MAPE > 15% with ≥ 20 steps)")
    out.append(_table(rows, ["split", "dimension", "bucket", "steps", "MAPE", "median APE", "bias", ""]))
    if len(c.influence):
        out.append("")
        inf = c.influence
        rows = [[x.run_id, x.steps, f"{x.mape:.2%}", _pct(getattr(x, "prediction_shift", np.nan)),
                 _pct(getattr(x, "max_beta_change", np.nan))] for x in inf.itertuples()]
        out.append("run influence (refit without the run)")
        out.append(_table(rows, ["run", "steps", "MAPE", "Δprediction", "max |Δβ|/β"]))
    if c.plots:
        out.append("")
        out.append("plots: " + ", ".join(str(p) for p in c.plots))
    return "\n".join(out)


def _pct(v: float | None) -> str:
    return f"{v:.1%}" if v is not None and np.isfinite(v) else "-"


def render_evaluation(table: pd.DataFrame) -> str:
    rows = [[x.variant, x.formulas, x.kind, x.held_out, x.steps, f"{x.median_ape:.2%}", f"{x.mape:.2%}",
             f"{x.prior_strength:g}"] for x in table.itertuples()]
    return _table(rows, ["variant", "formulas", "evaluation", "held out", "steps", "median APE", "MAPE", "λ"])
