"""Held-out request-level error from the data store: replay a split's runs with a coefficient set (the
campaign's optional replay stop criterion, the validate flow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rooflab.data.store import Store
from rooflab.data.trace_readers import read_store_trace
from rooflab.errors import InputError
from rooflab.model.coefficients import (
    Coefficients,
    load_coefficients,
)
from rooflab.replay.metrics import METRICS, compare
from rooflab.replay.predict import replay


def store_replay_error(store: Store | str | Path, coefficients: Coefficients | str | Path, *,
                       campaign: str | None = None, split: str | None = "validation", runs: list[str] | None = None,
                       metric: str = "mean_ape") -> dict[str, Any]:
    """Replay the data store's runs (those of ``split``, or the ``runs`` given) with ``coefficients`` and
    report the held-out request-level error: per run :func:`compare`, and the median over runs of
    ``metric`` (default: APE of the run's mean) for TTFT, ITL and E2E (NaN when there is no such run).

    ``coefficients``: :class:`Coefficients` (``Calibration.coefficients()``) or a coefficients / fit file."""

    st = store if isinstance(store, Store) else Store(store)
    coefs = coefficients if isinstance(coefficients, Coefficients) else load_coefficients(coefficients)
    if runs is None:
        table = st.runs(campaign=campaign, split=split)
        runs = table["run_id"].tolist()
    per_run: dict[str, dict[str, Any]] = {}
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
