"""Prediction intervals on TTFT / ITL / E2E (issue 18): replay K coefficient sets drawn from a posterior and report
each run statistic (mean, P90, P99 of TTFT, ITL, E2E) as the median over the draws with its central interval, plus
the probability that each SLO holds. Used by ``rooflab replay --interval``, ``benchmarks/intervals.py`` and anyone
onboarding a deployment (:func:`replay_intervals` takes a trace and a :class:`Coefficients` with a posterior).

**Common random numbers.** Every draw replays the same trace — the same arrivals, request sizes and engine seed —
so the spread between draws is the coefficients' alone; the model-discrepancy factors and, with
``arrival_noise``, the arrival realisations are drawn from ``seed`` too, so two coefficient sets replayed with the
same seed see identical noise (a paired comparison).

**What the interval covers.**

* coefficient uncertainty — the posterior of β and α (:mod:`rooflab.model.posterior`), between-run dispersion
  included;
* optionally, *model-form* error — ``discrepancy``: per statistic the standard deviation of log(measured /
  predicted) on held-out, cross-validated runs (:mod:`rooflab.fit.discrepancy`); each draw multiplies each
  statistic by exp(z·sd), one z per metric and draw. Without it the interval says nothing about how wrong the
  formula is, and coverage of measured values is far below nominal (``benchmarks/intervals.py``);
* optionally, arrival noise — ``arrival_noise``: draw k replays the trace's inter-arrival gaps resampled (a
  bootstrap of the gaps, seed + k): a forecast for "this workload again", not for these exact arrivals.

**What it cannot cover.** Anything the held-out residuals did not see: a workload, load level or model unlike the
runs the discrepancy was estimated on (cross-model transfer on the real data is the example), server effects the
scheduler replay does not model (cold start, client and network jitter), and data errors in the measurement.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.model.coefficients import Coefficients
from rooflab.replay.predict import replay

METRICS = ("ttft", "itl", "e2e")
STATS = ("mean", "p90", "p99")
KEYS = tuple(f"{m}_{s}" for m in METRICS for s in STATS)
DISCREPANCY_SEED_OFFSET = 0xD15C  # the discrepancy factors' stream: seed + this (independent of the draws')
ARRIVAL_SEED_OFFSET = 0xA77  # arrival realisation k: seed + this + k


@dataclass(frozen=True)
class SLO:
    """A service-level objective on one run statistic: ``metric_stat`` ≤ ``limit_ms``."""

    metric: str
    stat: str
    limit_ms: float

    @property
    def key(self) -> str:
        return f"{self.metric}_{self.stat}"

    def __str__(self) -> str:
        return f"{self.key} ≤ {self.limit_ms:g} ms"


_SLO = re.compile(r"^\s*(ttft|itl|e2e)_(mean|p90|p99)\s*(?:=|<=|≤)\s*([0-9.]+(?:e-?[0-9]+)?)\s*(ms|s|us|µs)?\s*$",
                  re.IGNORECASE)
_UNIT_MS = {"ms": 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3}


def parse_slo(text: str, field_name: str = "--slo") -> SLO:
    """``ttft_p99=300ms``, ``e2e_mean<=2s``, ``itl_p90=25`` (ms when no unit) → :class:`SLO`."""
    m = _SLO.match(text)
    if not m:
        raise InputError(None, field_name, f"{text!r}: expected METRIC_STAT=LIMIT with METRIC ttft|itl|e2e, STAT "
                                           "mean|p90|p99 and LIMIT in ms, s or us (e.g. ttft_p99=300ms)")
    limit = float(m.group(3)) * _UNIT_MS[(m.group(4) or "ms").lower()]
    if not limit > 0:
        raise InputError(None, field_name, f"{text!r}: the limit must be > 0")
    return SLO(m.group(1).lower(), m.group(2).lower(), limit)


def _stat(values: np.ndarray, stat: str, weights: np.ndarray | None = None) -> float:
    if len(values) == 0:
        return float("nan")
    if stat == "mean":
        if weights is not None:
            return float((values * weights).sum() / weights.sum()) if weights.sum() > 0 else float("nan")
        return float(values.mean())
    return float(np.percentile(values, float(stat[1:])))


def run_statistics(frame: pd.DataFrame, *, predicted: bool = True, stats: Sequence[str] = STATS) -> dict[str, float]:
    """Per metric and statistic (``ttft_p90`` …, in ms) of a replayed frame's predictions (``predicted``) or its
    measurements, over the scored requests that succeeded in the measurement and, for predictions, in the replay
    (the requests :func:`rooflab.replay.metrics.compare` scores). The mean ITL is token-weighted (Σ(E2E − TTFT) /
    Σ(n_out − 1)), its percentiles are over requests' ITLs."""
    df = frame
    ok = np.ones(len(df), bool)
    if "scored" in df:
        ok &= df["scored"].to_numpy(dtype=bool)
    if "failed" in df:
        ok &= ~df["failed"].to_numpy(dtype=bool)
    if predicted:
        ok &= ~df["pred_failed"].to_numpy(dtype=bool)
    pre = "pred_" if predicted else ""
    out: dict[str, float] = {}
    for m in METRICS:
        col = f"{pre}{m}_us"
        if col not in df:
            continue
        v = df[col].to_numpy(dtype=float)
        k = ok & np.isfinite(v) & (v > 0)
        w = None
        if m == "itl" and "output_tokens" in df:
            w = np.clip(df["output_tokens"].to_numpy(dtype=float)[k] - 1, 0, None)
        for s in stats:
            out[f"{m}_{s}"] = _stat(v[k], s, w if s == "mean" else None) / 1e3
    return out


@dataclass
class StatInterval:
    """One run statistic: median over the draws and its central interval (ms); the point estimate's replay; the
    measured value where the trace has one."""

    key: str
    median_ms: float
    lower_ms: float
    upper_ms: float
    point_ms: float
    measured_ms: float | None = None

    @property
    def covered(self) -> bool | None:
        if self.measured_ms is None or not np.isfinite(self.measured_ms):
            return None
        return bool(self.lower_ms <= self.measured_ms <= self.upper_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "lower_ms": self.lower_ms, "upper_ms": self.upper_ms,
                "point_ms": self.point_ms, "measured_ms": self.measured_ms, "covered": self.covered}


@dataclass
class SLOProbability:
    slo: SLO
    probability: float  # share of the draws in which the SLO holds
    point_holds: bool  # whether it holds in the point estimate's replay

    def to_dict(self) -> dict[str, Any]:
        return {"slo": str(self.slo), "key": self.slo.key, "limit_ms": self.slo.limit_ms,
                "probability": self.probability, "point_holds": self.point_holds}


@dataclass
class IntervalReplay:
    """The interval replay of one trace."""

    run_id: str
    level: float
    n_draws: int
    seed: int
    values: pd.DataFrame  # one row per draw: the statistics (ms) after the discrepancy factors
    intervals: dict[str, StatInterval]
    slos: list[SLOProbability] = field(default_factory=list)
    covers: list[str] = field(default_factory=list)  # the sources of uncertainty the interval includes
    not_covered: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    point: pd.DataFrame | None = None  # the point estimate's per-request replay

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "level": self.level, "draws": self.n_draws, "seed": self.seed,
                "intervals": {k: v.to_dict() for k, v in self.intervals.items()},
                "slo": [s.to_dict() for s in self.slos], "covers": self.covers, "not_covered": self.not_covered,
                "wall_s": self.wall_s}


def resampled_arrivals(trace: Trace, seed: int) -> Trace:
    """``trace`` with its inter-arrival gaps resampled with replacement (first arrival kept; sizes and order of the
    requests kept) — one realisation of "the same workload again"."""
    r = trace.requests.sort_values("arrival_us", kind="stable").reset_index(drop=True)
    arr = r["arrival_us"].to_numpy(dtype=float)
    if len(arr) < 3:
        return trace
    gaps = np.diff(arr)
    rng = np.random.default_rng(seed)
    new = arr[0] + np.r_[0.0, np.cumsum(rng.choice(gaps, len(gaps)))]
    out = r.copy()
    out["arrival_us"] = new
    return Trace(trace.run_id, trace.model, trace.tp, trace.hardware, dict(trace.engine), out, trace.timeout_s,
                 trace.workload, trace.split, trace.source, list(trace.notes), trace.max_concurrency,
                 trace.stage_gap_s)


def replay_intervals(trace: Trace, coefs: Coefficients, *, level: float = 0.9, draws: int = 30, seed: int = 0,
                     discrepancy: dict[str, float] | None = None, use_posterior_discrepancy: bool = True,
                     arrival_noise: bool = False, slos: Sequence[SLO] = (), timeout: bool = True) -> IntervalReplay:
    """Replay ``trace`` with ``draws`` coefficient sets from ``coefs.posterior`` (common random numbers: module
    docstring) and summarise each statistic. ``discrepancy``: model-form sd per statistic (default: the
    posterior's own, when ``use_posterior_discrepancy``); none → coefficient uncertainty only."""
    if not 0 < level < 1:
        raise InputError(None, "--interval", f"the interval level must be between 0 and 1, got {level:g}")
    if draws < 2:
        raise InputError(None, "--draws", f"need at least 2 draws, got {draws}")
    if coefs.posterior is None:
        raise InputError(coefs.source or None, "posterior", "this coefficient set has no posterior (fit it with "
                         "`rooflab fit` or export it from a registered calibration to get one)")
    if arrival_noise and (trace.max_concurrency or trace.stage_gap_s is not None or "depends_on" in trace.requests):
        raise InputError(trace.source or trace.run_id, "arrivals", "arrival noise resamples open-loop arrivals; this "
                         "trace has a closed-loop client or sequential stages")
    if discrepancy is None and use_posterior_discrepancy:
        discrepancy = dict(coefs.posterior.discrepancy) or None
    t0 = time.perf_counter()
    point_res = replay(trace, coefs, timeout=timeout)
    point = run_statistics(point_res.requests)
    measured = run_statistics(point_res.requests, predicted=False) if "ttft_us" in trace.requests else {}
    rows = []
    for k, c in enumerate(coefs.draws(draws, seed)):
        tr = resampled_arrivals(trace, seed + ARRIVAL_SEED_OFFSET + k) if arrival_noise else trace
        rows.append(run_statistics(replay(tr, c, timeout=timeout).requests))
    values = pd.DataFrame(rows, columns=list(KEYS))
    if discrepancy:
        z = np.random.default_rng(seed + DISCREPANCY_SEED_OFFSET).standard_normal((draws, len(METRICS)))
        for i, m in enumerate(METRICS):
            for s in STATS:
                key = f"{m}_{s}"
                values[key] = values[key] * np.exp(z[:, i] * float(discrepancy.get(key, 0.0)))
    a = (1 - level) / 2
    intervals = {}
    for key in KEYS:
        v = values[key].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        lo, med, hi = np.quantile(v, [a, 0.5, 1 - a]) if len(v) else (np.nan,) * 3
        meas = measured.get(key)
        intervals[key] = StatInterval(key, float(med), float(lo), float(hi), float(point.get(key, np.nan)),
                                      None if meas is None or not np.isfinite(meas) else float(meas))
    probs = []
    for slo in slos:
        v = values[slo.key].to_numpy(dtype=float)
        ok = v[np.isfinite(v)]
        pt = point.get(slo.key, np.nan)
        probs.append(SLOProbability(slo, float((ok <= slo.limit_ms).mean()) if len(ok) else float("nan"),
                                    bool(np.isfinite(pt) and pt <= slo.limit_ms)))
    covers = [f"coefficient uncertainty ({coefs.posterior.method})"]
    if discrepancy:
        covers.append("model-form error: held-out residual spread per statistic"
                      + (f" ({coefs.posterior.discrepancy_source})" if coefs.posterior.discrepancy_source else ""))
    if arrival_noise:
        covers.append("arrival noise (inter-arrival gaps resampled per draw)")
    not_covered = ([] if discrepancy else ["model-form error (no discrepancy term: the formula's own error is not in "
                                           "the interval)"]) + \
        ([] if arrival_noise else ["arrival noise (every draw replays these exact arrivals)"]) + \
        ["workloads, loads or models unlike those the posterior and discrepancy were estimated on",
         "server effects the replay does not model (cold start, client / network jitter)"]
    return IntervalReplay(trace.run_id, level, draws, seed, values, intervals, probs, covers, not_covered,
                          time.perf_counter() - t0, point_res.requests)


def coverage(results: Sequence[IntervalReplay]) -> dict[str, Any]:
    """Share of the measured statistics inside their intervals: overall, per statistic and per metric."""
    cells = [(r.run_id, k, iv.covered) for r in results for k, iv in r.intervals.items() if iv.covered is not None]
    per_key = {k: [c for _, kk, c in cells if kk == k] for k in KEYS}
    per_metric = {m: [c for _, k, c in cells if k.startswith(m + "_")] for m in METRICS}
    return {"cells": len(cells), "covered": int(sum(c for *_, c in cells)),
            "coverage": float(np.mean([c for *_, c in cells])) if cells else float("nan"),
            "per_statistic": {k: float(np.mean(v)) if v else float("nan") for k, v in per_key.items()},
            "per_metric": {m: float(np.mean(v)) if v else float("nan") for m, v in per_metric.items()}}


def coverage_curve(results: Sequence[IntervalReplay], levels: Sequence[float]) -> np.ndarray:
    """Empirical coverage at each nominal level, from the draws the replays stored (one set of replays serves
    every level): the calibration plot's points."""
    out = []
    for lv in levels:
        a = (1 - lv) / 2
        hits = []
        for r in results:
            for k, iv in r.intervals.items():
                if iv.measured_ms is None:
                    continue
                v = r.values[k].to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if len(v):
                    lo, hi = np.quantile(v, [a, 1 - a])
                    hits.append(bool(lo <= iv.measured_ms <= hi))
        out.append(float(np.mean(hits)) if hits else float("nan"))
    return np.array(out)


def log_residuals(measured: dict[str, float], predicted: dict[str, float]) -> dict[str, float]:
    """log(measured / predicted) per statistic (NaN where either is missing or ≤ 0)."""
    out = {}
    for k in KEYS:
        y, p = measured.get(k, np.nan), predicted.get(k, np.nan)
        out[k] = float(np.log(y / p)) if np.isfinite(y) and np.isfinite(p) and y > 0 and p > 0 else float("nan")
    return out


def discrepancy_sd(residuals: Sequence[dict[str, float]]) -> dict[str, float]:
    """Model-form sd per statistic from held-out log residuals: the root mean square (bias included — the
    interval is centred on the model's prediction, so a systematic error must widen it), times the Student-t /
    normal ratio of the 95% quantile for the number of residuals (few held-out runs: a wider tail)."""
    from scipy.stats import norm, t

    out = {}
    for k in KEYS:
        r = np.array([d.get(k, np.nan) for d in residuals], dtype=float)
        r = r[np.isfinite(r)]
        if len(r) == 0:
            continue
        inflate = float(t.ppf(0.95, len(r)) / norm.ppf(0.95))
        out[k] = float(np.sqrt(np.mean(r ** 2)) * inflate)
    return out
