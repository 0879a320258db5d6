"""Held-out request-level error from the data store: replay a split's runs with a coefficient set (the
campaign's optional replay stop criterion, the validate flow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rooflab.data.store import Store
from rooflab.data.traces import read_store_trace
from rooflab.errors import InputError
from rooflab.model.coefficients import (
    Coefficients,
    coefficients_from_doc,
    load_coefficients,
)
from rooflab.replay.metrics import METRICS, compare
from rooflab.replay.predict import replay


def as_coefficients(coefficients) -> Coefficients:
    """A :class:`Coefficients` from itself, a file path, a ``Calibration`` or a fit-result dict."""
    if isinstance(coefficients, Coefficients):
        return coefficients
    if isinstance(coefficients, (str, Path)):
        return load_coefficients(coefficients)
    if hasattr(coefficients, "to_dict"):
        coefficients = coefficients.to_dict()
    return coefficients_from_doc(coefficients, "coefficients")


def store_replay_error(store, coefficients, *, campaign: str | None = None, split: str | None = "validation",
                       runs=None, metric: str = "mean_ape") -> dict:
    """Replay the data store's runs (those of ``split``, or the ``runs`` given) with ``coefficients`` and
    report the held-out request-level error: per run :func:`compare`, and the median over runs of
    ``metric`` (default: APE of the run's mean) for TTFT, ITL and E2E (NaN when there is no such run).

    ``coefficients``: :class:`Coefficients`, a coefficients/fit file, a ``Calibration`` or its dict."""

    st = store if isinstance(store, Store) else Store(store)
    coefs = as_coefficients(coefficients)
    if runs is None:
        table = st.runs(campaign=campaign, split=split)
        runs = table["run_id"].tolist()
    per_run = {}
    for rid in runs:
        try:
            trace = read_store_trace(st, rid)
        except InputError as exc:
            per_run[rid] = {"error": str(exc)}
            continue
        per_run[rid] = compare(replay(trace, coefs))
    out = {"runs": per_run, "n_runs": sum(1 for v in per_run.values() if "error" not in v), "metric": metric}
    for m in METRICS:
        vals = [v[m][metric] for v in per_run.values() if "error" not in v and (v.get(m) or {}).get("n")]
        out[m] = float(np.median(vals)) if vals else float("nan")
    return out
