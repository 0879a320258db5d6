"""What an iteration logs to MLflow: metric and param names MLflow accepts, the metrics and params of one
calibration, and batched logging within MLflow's limits.

What the MLflow UI (3.17.2) does with them, and why the names and order are as they are:

* The compare-runs view's parallel-coordinates plot starts with the first three params, sorted by name, whose
  values differ between the compared runs, and the first metric the runs share, in the order the runs logged
  their metrics. So an iteration logs its headline metrics first (held-out MAPE, then train MAPE) and keeps
  per-iteration counts (steps saturated or held out, runs, bootstrap units) as metrics (``n_*``), not params:
  params are the fit's setup; the few that change between iterations (``data.steps``, ``data.requests``,
  ``prior_strength``) are the axes worth plotting.
* The parent run's learning curves (:func:`parent_metrics`) are the per-iteration metrics a person reads first.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag

from rooflab.files import json_dumps
from rooflab.fit.calibration import Calibration
from rooflab.model import export
from tracking.store import TrackingStore

BATCH = 900  # metrics per log_batch (MLflow's limit is 1000 entities per call, 100 params/tags)
HEADLINE = ("mape.validation", "mape.train")  # logged first: the compare view plots a run's first metric
SKIP_BUCKET_DIMENSIONS = ("run_id",)  # one metric per run would flood the UI; the CSV artifact has them


def metric_key(*parts) -> str:
    """A metric/param name from parts joined by '.', with characters MLflow rejects replaced
    (``<512`` → ``lt512``, ``>=8K`` → ``ge8K``, anything else outside ``[A-Za-z0-9_.- ]`` → ``_``)."""
    out = []
    for p in parts:
        s = str(p)
        for a, b in (("<=", "le"), (">=", "ge"), ("<", "lt"), (">", "gt"), ("+", "plus"), ("%", "pct")):
            s = s.replace(a, b)
        s = re.sub(r"[^A-Za-z0-9_.\- ]", "_", s)
        s = re.sub(r"\.{2,}", ".", s).strip(". ") or "_"
        out.append(s)
    return ".".join(out)[:250]


def finite(v) -> bool:
    return numeric(v) and math.isfinite(v)


def numeric(v) -> bool:
    """A number MLflow can store (±inf is stored as ±max float; NaN is skipped)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and not math.isnan(v)


def log_batch(ts: TrackingStore, run_id: str, metrics: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None, step: int = 0) -> None:
    """log_batch in chunks within MLflow's limits; NaN / non-numeric metrics are skipped."""
    now_ms = int(time.time() * 1000)
    ms = [Metric(k, float(v), now_ms, step) for k, v in (metrics or {}).items() if numeric(v)]
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    tg = [RunTag(k, str(v)[:8000]) for k, v in (tags or {}).items()]
    for i in range(0, len(ms), BATCH):
        ts.client.log_batch(run_id, metrics=ms[i:i + BATCH])
    for i in range(0, max(len(ps), len(tg)), 100):
        if ps[i:i + 100] or tg[i:i + 100]:
            ts.client.log_batch(run_id, params=ps[i:i + 100], tags=tg[i:i + 100])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat(v, key))
        else:
            out[key] = v
    return out


def dumps(obj) -> str:
    return json_dumps(obj) + "\n"


def _cv(calib: Calibration) -> dict[str, float]:
    """Bootstrap CV (sd / |mean| of the draws) per β."""
    draws = calib.beta.draws
    if len(draws) < 2:
        return {}
    mean, sd = draws.mean(axis=0), draws.std(axis=0, ddof=1)
    return {n: (float(s / abs(m)) if m != 0 else (0.0 if s == 0 else math.inf))
            for n, m, s in zip(calib.beta.names, mean, sd)}


def iteration_metrics(calib: Calibration, *, gpu_seconds: float | None, n_picks: int) -> dict[str, float]:
    """The metrics of one iteration (docs/spec.md §10), headline metrics first (:data:`HEADLINE`)."""
    doc = calib.to_dict()
    m: dict[str, Any] = {}
    for split, acc in (doc.get("accuracy") or {}).items():
        if metric_key("mape", split) in HEADLINE and numeric(acc.get("mape")):
            m[metric_key("mape", split)] = acc["mape"]
    m = {k: m[k] for k in HEADLINE if k in m}
    cv = _cv(calib)
    for name, co in doc["beta"]["coefficients"].items():
        m[metric_key(name)] = co.get("value")
        m[metric_key(name, "lower")] = co.get("lower")
        m[metric_key(name, "upper")] = co.get("upper")
        if name in cv:
            m[metric_key(name, "cv")] = cv[name]
    a = doc.get("alpha") or {}
    if a.get("fitted"):
        for name, co in a["coefficients"].items():
            m[metric_key(name)] = co.get("value")
            m[metric_key(name, "lower")] = co.get("lower")
            m[metric_key(name, "upper")] = co.get("upper")
    checks = (doc.get("health") or {}).get("checks", [])
    for ch in checks:
        if ch.get("check") == "condition number":
            m["condition_number"] = ch.get("value") if ch.get("value") is not None else math.inf
    for status in ("fail", "warn"):
        m[f"health.{status}"] = sum(ch.get("status") == status for ch in checks)
    for split, acc in (doc.get("accuracy") or {}).items():
        for k in ("mape", "median_ape", "p90_ape"):
            if k in acc:
                m[metric_key(k, split)] = acc[k]
        m[metric_key("steps", split)] = acc.get("steps")
    hot = 0
    for b in doc.get("residual_buckets") or []:
        if b.get("split") not in ("train", "validation"):
            continue
        hot += bool(b.get("hotspot"))
        if b.get("dimension") in SKIP_BUCKET_DIMENSIONS:
            continue
        prefix = ("mape",) if b["split"] == "train" else ("mape", "validation")
        m[metric_key(*prefix, b["dimension"], b["bucket"])] = b.get("mape")
    m["hotspots"] = hot
    total = (doc.get("routing") or {}).get("total") or {}
    m["n_steps"] = total.get("steps")
    m["n_steps_fit"] = total.get("fit")
    m["n_steps_saturated"] = total.get("saturated")
    m["n_steps_validation"] = total.get("held_out_validation")
    m["n_runs"] = len((doc.get("routing") or {}).get("per_run") or {}) or len(doc["beta"].get("runs") or [])
    m["n_requests"] = a.get("n_requests", 0) if a.get("fitted") else 0
    m["n_bootstrap_units"] = (doc["beta"].get("bootstrap") or {}).get("units")
    if gpu_seconds is not None:
        m["gpu_hours"] = float(gpu_seconds) / 3600.0
    m["n_picks"] = n_picks
    return {k: float(v) for k, v in m.items() if numeric(v)}


def iteration_params(calib: Calibration, extra_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fit's setup, plus the data volume (``data.steps``, ``data.requests``) and the prior strength it chose:
    the params that differ between iterations are the compare view's plot axes. Counts that only describe the
    data further are metrics (``n_runs``, ``n_steps_saturated``, ``n_steps_validation``, ``n_bootstrap_units``)."""
    doc = calib.to_dict()
    b = doc["beta"]
    total = (doc.get("routing") or {}).get("total") or {}
    a = doc.get("alpha") or {}
    boot = b.get("bootstrap") or {}
    opts = doc.get("options") or {}
    p = {
        "data.steps": total.get("steps"), "data.requests": a.get("n_requests", 0) if a.get("fitted") else 0,
        "variant": b.get("variant"), "formulas": b.get("formulas"),
        "prior_strength": b.get("prior_strength"), "prior_option": opts.get("prior_strength"),
        "prior_selection": (b.get("prior_selection") or {}).get("method"),
        "bootstrap.unit": boot.get("unit"), "bootstrap.draws": boot.get("draws"), "interval": b.get("interval"),
        "seed": opts.get("seed"), "step_time_formula": export.to_json(doc)["step_time_formula"],
    }
    p.update({metric_key(k): v for k, v in flat(extra_params or {}).items()})
    return {k: v for k, v in p.items() if v is not None}


def coefficient_names(calib: Calibration) -> list[str]:
    """Metric names of the fitted coefficients: every β, then α when fitted."""
    doc = calib.to_dict()
    names = list(doc["beta"]["coefficients"])
    a = doc.get("alpha") or {}
    if a.get("fitted"):
        names += list(a["coefficients"])
    return [metric_key(n) for n in names]


def coefficient_keys(calib: Calibration) -> list[str]:
    """:func:`coefficient_names`, each followed by its interval bounds (``.lower``, ``.upper``)."""
    return [f"{n}{suffix}" for n in coefficient_names(calib) for suffix in ("", ".lower", ".upper")]


def parent_metrics(calib: Calibration, metrics: dict[str, float]) -> dict[str, float]:
    """What the campaign's parent run logs per iteration (step = iteration): its charts are the campaign's
    learning curves. Held-out and train MAPE, GPU-hours so far, every coefficient with its interval bounds,
    then the data volume and the health counters."""
    keys = [*HEADLINE, "gpu_hours", *coefficient_keys(calib), "n_steps", "n_runs", "condition_number", "hotspots",
            "n_picks"]
    return {k: metrics[k] for k in keys if k in metrics}
