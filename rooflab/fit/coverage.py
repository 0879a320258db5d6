"""What the training data can see: the share of the step time each efficiency term explains, and the batch
statistics behind it (prefill share, prefill tokens per step, prefix-cache hits, context range).

A fit always returns a number for every β; whether the data *determined* it is another matter. A term that
is a visible share of the step time in too few steps (at its typical physical value: β = 1, the datasheet peak,
for GEMM-like terms; β = 4 for attention, which runs at ~25% of the peak) cannot be told from the
fit's noise and the other terms' errors, so its fitted value is a guess — real vLLM runs whose prompts recur
are served from the prefix cache, and a β1 of 0.03 fitted there says nothing about the prefill of a new prompt.
The check ``identified by the data`` (:func:`identification_checks`) flags such a β with the reason in words; the stop
rule never counts it as identified, targeting asks for the runs that fix it, and replay and export warn
(rule and thresholds: docs/spec.md §8 and the README, "What the data can see").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from rooflab.fit.health import FAIL, PASS, Check
from rooflab.model.terms import Term

# A β is identified by the data when at least MIN_SHOWING_STEPS training steps show its term at ≥ SHOWING_SHARE
# of their step time (at β = visible_at(term)): fewer, and its value is set by noise and by the other terms' errors.
SHOWING_SHARE = 0.05
MIN_SHOWING_STEPS = 50
IDENTIFIED_CHECK = "identified by the data"
PREFILL_FEATURES = ("f_prefill", "f_pf_dense", "f_pf_attn")


@dataclass(frozen=True)
class DataCoverage:
    """Batch statistics of the steps a fit was trained on."""

    steps: int
    prefill_step_share: float  # share of steps that run a prefill chunk
    prefill_tokens_per_step: float  # median computed prefill tokens over those steps
    prompt_reach_p90: float  # P90 over prefill steps of the mean (context + chunk) per prefill request
    decode_context_p90: float  # P90 over decode steps of the mean decode context
    cache_hit_share: float | None  # share of prompt tokens served from the prefix cache; None: unknown
    cache_hits_known_share: float  # share of prefill steps whose source reports cache hits
    term_share: dict[str, float]  # β name -> Σ feature (at β = 1) / Σ step time, efficiency terms only
    term_showing_steps: dict[str, int]  # β name -> steps whose feature is ≥ SHOWING_SHARE of their step time
    # β name -> P90 over steps of feature / step time, every term: how much of a step one unit of the β moves
    unit_effect_p90: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}

    def cache_text(self) -> str:
        if self.cache_hit_share is None:
            return "prefix-cache hits unknown (the step source does not report them)"
        known = "" if self.cache_hits_known_share >= 0.999 else \
            f" (known on {self.cache_hits_known_share:.0%} of prefill steps)"
        return f"{self.cache_hit_share:.0%} of prompt tokens were prefix-cache hits{known}"


def visible_at(term: Term) -> float:
    """The β at which the data's view of ``term`` is judged: its typical physical value (attention: 4, i.e. 25% of
    the bf16 peak), else its prior (1: the datasheet peak)."""
    return float(term.typical if term.typical is not None else (term.prior if term.prior is not None else 1.0))


def _p90(x: np.ndarray) -> float:
    return float(np.percentile(x, 90)) if len(x) else float("nan")


def data_coverage(steps: pd.DataFrame, features: pd.DataFrame | dict, terms: Sequence[Term],
                  y: np.ndarray) -> DataCoverage:
    """Coverage of the training ``steps`` (their feature rows and step times ``y``, all aligned)."""
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    P = steps["prefill_reqs"].to_numpy(dtype=np.float64)
    T = steps["prefill_tokens"].to_numpy(dtype=np.float64)
    C = steps["prefill_context"].to_numpy(dtype=np.float64)
    D = steps["decode_reqs"].to_numpy(dtype=np.float64)
    Cd = steps["decode_context"].to_numpy(dtype=np.float64)
    pf = T > 0
    cached = (steps["prefill_cached_tokens"].to_numpy(dtype=np.float64) if "prefill_cached_tokens" in steps
              else np.full(n, np.nan))
    known = pf & np.isfinite(cached)
    hits = float(np.nansum(cached[known]))
    computed = float(T[known].sum())
    total_y = float(y.sum()) if n else 0.0
    share, showing, unit = {}, {}, {}
    for t in terms:
        x = np.asarray(features[t.feature], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            unit[t.name] = _p90(np.abs(x[y > 0]) / y[y > 0])
        if t.prior is None:
            continue
        share[t.name] = float(x.sum() / total_y) if total_y > 0 else float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            showing[t.name] = int(np.sum(visible_at(t) * x >= SHOWING_SHARE * y))
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = (C[pf] + T[pf]) / np.maximum(P[pf], 1.0)
        dctx = Cd[D > 0] / D[D > 0]
    return DataCoverage(
        steps=int(n), prefill_step_share=float(pf.mean()) if n else float("nan"),
        prefill_tokens_per_step=float(np.median(T[pf])) if pf.any() else 0.0,
        prompt_reach_p90=_p90(reach), decode_context_p90=_p90(dctx),
        cache_hit_share=(hits / (hits + computed) if known.any() and hits + computed > 0 else None),
        cache_hits_known_share=float(known.sum() / pf.sum()) if pf.any() else 0.0,
        term_share=share, term_showing_steps=showing, unit_effect_p90=unit)


def _why(term: Term, cov: DataCoverage) -> str:
    """The batch statistics that explain a low share, in words."""
    if term.feature in PREFILL_FEATURES:
        return (f"{cov.prefill_step_share:.0%} of steps run prefill, median {cov.prefill_tokens_per_step:.0f} "
                f"computed prefill tokens per such step, prompt reach P90 {cov.prompt_reach_p90:.0f} tokens; "
                f"{cov.cache_text()}")
    if term.feature == "f_decode":
        return f"decode context P90 {cov.decode_context_p90:.0f} tokens per request"
    if term.feature == "f_weight_moe":
        return "no or few MoE steps"
    if term.feature == "f_tp":
        return "no or few steps at TP > 1"
    return f"its feature ({term.feature}) is small in these steps"


def not_identified_reason(term: Term, cov: DataCoverage) -> str | None:
    """None when the data can see ``term`` (or its feature is zero everywhere: the ``data vs prior precision``
    check reports that); else why not, in words."""
    n = cov.term_showing_steps.get(term.name)
    s = cov.term_share.get(term.name, float("nan"))
    if n is None or n >= MIN_SHOWING_STEPS or s == 0:
        return None
    return (f"{term.name} not identified by this data: {n} of {cov.steps} steps show its {term.meaning} term at "
            f"≥ {SHOWING_SHARE:.0%} of the step time (needs {MIN_SHOWING_STEPS}; {s:.1%} of all step time); "
            f"{_why(term, cov)}")


def identification_checks(terms: Sequence[Term], cov: DataCoverage) -> list[Check]:
    """One ``identified by the data`` row per efficiency term: fail with the reason when the data cannot see it."""
    out = []
    for t in terms:
        if t.prior is None:
            continue
        why = not_identified_reason(t, cov)
        out.append(Check(IDENTIFIED_CHECK, t.name, FAIL if why else PASS,
                         float(cov.term_showing_steps.get(t.name, 0)),
                         f"fail: fewer than {MIN_SHOWING_STEPS} steps show the term at ≥ {SHOWING_SHARE:.0%} of "
                         f"their step time (β = {visible_at(t):g})", why or ""))
    return out
