"""The model-discrepancy term of prediction intervals (issue 18), from cross-validated residuals.

A coefficient posterior describes how well the data pin the coefficients *of this formula*; it says nothing about
how wrong the formula is. On held-out runs that error dominates (``benchmarks/intervals.py``: coefficient-only
90% intervals cover a small share of measured statistics). So the interval gets an explicit model-form term: for
each training run, refit without it (leave-one-run-out — exact and cheap from the fit's per-run sufficient
statistics, :mod:`rooflab.fit.posterior`), replay it, and take log(measured / predicted) of each statistic;
the term's standard deviation per statistic is :func:`rooflab.replay.intervals.discrepancy_sd` of those
residuals. The result is stored in the coefficient set's posterior (``Posterior.discrepancy``) so every later
interval replay uses it.
"""

from __future__ import annotations

from collections.abc import Mapping

from rooflab.data.traces import Trace
from rooflab.fit.posterior import FitState, coefficients_from_state
from rooflab.model.posterior import Posterior
from rooflab.replay.intervals import discrepancy_sd, log_residuals, run_statistics
from rooflab.replay.predict import replay


def without_run(state: FitState, run: str) -> FitState:
    """``state`` less one run (its steps and its requests)."""
    return FitState(state.variant, state.formulas, state.fp8_peak, state.prior_strength,
                    [r for r in state.runs if r.run != run], state.alpha_fitted, list(state.lineage))


def loro_residuals(state: FitState, traces: Mapping[str, Trace]) -> dict[str, dict[str, float]]:
    """run -> log(measured / predicted) per statistic, each run replayed with the fit that left it out. Runs of
    ``traces`` that the state does not hold are replayed with the whole fit (they are held out already)."""
    out = {}
    for run, trace in traces.items():
        st = without_run(state, run) if run in state.run_ids else state
        if not any(r.rows > 0 for r in st.runs):
            continue
        res = replay(trace, coefficients_from_state(st)).requests
        out[run] = log_residuals(run_statistics(res, predicted=False), run_statistics(res))
    return out


def with_cv_discrepancy(posterior: Posterior, residuals: Mapping[str, Mapping[str, float]], what: str) -> Posterior:
    """``posterior`` with the model-discrepancy term estimated from ``residuals`` (run -> log residual per
    statistic); ``what`` says how they were obtained (stored as the term's source)."""
    sd = discrepancy_sd([dict(r) for r in residuals.values()])
    return posterior.with_discrepancy(sd, f"{what}: {len(residuals)} runs ({', '.join(sorted(residuals))})")
