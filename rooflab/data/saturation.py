"""Saturation routing (docs/spec.md §6). A saturated step mixes GPU physics with scheduler policy (cache
pressure, recompute), so it is kept out of the β fit — and kept for α fitting and simulator validation.

Two levels: :func:`route_steps` (per step: KV usage, preemptions) and :func:`route_run` (per run, post-hoc
from the request table: failures, queue-wait growth, preemptions, TTFT growth, E2E tail; ≥ 2 flags = a
saturated run). :func:`routing_counts` reports how many steps and requests of a run went to each set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

KV_USAGE_LIMIT = 0.95


@dataclass(frozen=True)
class StepRouting:
    saturated: np.ndarray  # bool per step
    by_kv: int
    by_preemption: int

    @property
    def n_saturated(self) -> int:
        return int(self.saturated.sum())

    @property
    def n_unsaturated(self) -> int:
        return int((~self.saturated).sum())

    def counts(self) -> dict:
        return {"steps": len(self.saturated), "unsaturated": self.n_unsaturated, "saturated": self.n_saturated,
                "saturated_kv_usage": self.by_kv, "saturated_preemption": self.by_preemption}


def route_steps(steps: pd.DataFrame, kv_limit: float = KV_USAGE_LIMIT) -> StepRouting:
    """A step is saturated if its KV usage exceeds ``kv_limit`` or it preempted any request."""
    kv = steps["kv_usage"].to_numpy(dtype=np.float64) if "kv_usage" in steps else np.full(len(steps), np.nan)
    pre = steps["preemptions"].to_numpy(dtype=np.float64) if "preemptions" in steps else np.zeros(len(steps))
    by_kv = np.nan_to_num(kv, nan=0.0) > kv_limit
    by_pre = np.nan_to_num(pre, nan=0.0) > 0
    return StepRouting(by_kv | by_pre, int(by_kv.sum()), int(by_pre.sum()))


# ---------------------------------------------------------------------------------------------------
# Run level (docs/spec.md §6): post-hoc, from a run's request table alone — no coefficients needed.
#
# Each check returns ``{"flag", "value", "threshold", "available", ...}``; a check whose inputs are
# missing (all-NaN timestamps, no preemption counts, too few requests) is *not available* and never flags.
# Thresholds are the SPEC's and are strict (``>``): a value exactly at the threshold does not flag.

FAILURE_RATE_LIMIT = 0.05
QUEUE_GROWTH_R2_LIMIT = 0.5
PREEMPTION_RATE_LIMIT = 0.15
TTFT_GROWTH_LIMIT = 2.0
TTFT_WINDOW = 0.20
E2E_TAIL_LIMIT = 10.0
RUN_FLAGS_LIMIT = 2  # this many flags or more = saturated run
FAILED_STATUSES = frozenset({"failed", "aborted", "rejected", "error", "timeout"})
_ERROR_COLUMNS = ("error", "has_error")


def _column(requests: pd.DataFrame, name: str) -> np.ndarray:
    if name not in requests:
        return np.full(len(requests), np.nan)
    return pd.to_numeric(requests[name], errors="coerce").to_numpy(dtype=np.float64)


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    f = float(x)
    return f if np.isfinite(f) else None


def _result(flag: bool, value: float | None, threshold: float, available: bool, **extra: Any) -> dict:
    return {"flag": bool(flag and available), "value": value, "threshold": threshold,
            "available": bool(available), **extra}


def failed_mask(requests: pd.DataFrame) -> np.ndarray:
    """Failed requests: status failed/aborted/rejected (or error/timeout), or a true ``error``/``has_error``."""
    failed = np.zeros(len(requests), dtype=bool)
    if "status" in requests:
        status = requests["status"].astype("string").str.strip().str.lower()
        failed |= status.isin(FAILED_STATUSES).fillna(False).to_numpy(dtype=bool)
    for col in _ERROR_COLUMNS:
        if col in requests:
            failed |= requests[col].fillna(False).astype(bool).to_numpy()
    return failed


def check_failure_rate(requests: pd.DataFrame, failures: int | None = None) -> dict:
    """Failed / all requests (failed included) > 5%.

    ``failures``: the failure count another source reports for the run (e.g. inference-perf's
    ``failures.count``), for failed requests the table may not hold (a server-side trace never sees a
    request refused at the door). The run's failures are then max(failures, failed rows), over
    (successful rows + failures): the same rate whether or not the table holds the failed requests.
    """
    failed = failed_mask(requests)
    n_failed, n_ok = int(failed.sum()), int((~failed).sum())
    if failures is not None:
        if failures < 0:
            raise ValueError("failures must be >= 0")
        n_failed = max(int(failures), n_failed)
    total = n_ok + n_failed
    if total == 0:
        return _result(False, None, FAILURE_RATE_LIMIT, False, failed=0, requests=0)
    rate = n_failed / total
    return _result(rate > FAILURE_RATE_LIMIT, rate, FAILURE_RATE_LIMIT, True, failed=n_failed, requests=total)


def _queue_wait(requests: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Queue wait per request in µs: scheduled − queued where the table has both for any request,
    otherwise TTFT (first_token − arrived) as the proxy. Returns (values, source)."""
    wait = _column(requests, "scheduled_us") - _column(requests, "queued_us")
    if np.isfinite(wait).any():
        return wait, "scheduled_us - queued_us"
    return _column(requests, "first_token_us") - _column(requests, "arrived_us"), "ttft (first_token_us - arrived_us)"


def check_queue_growth(requests: pd.DataFrame) -> dict:
    """Queue wait regressed on arrival time (OLS): slope > 0 and R² > 0.5. ``value`` is R²; ``slope`` is in
    µs of wait per second of arrival time; ``source`` says whether the real queue wait or TTFT was used."""
    wait, source = _queue_wait(requests)
    arrived = _column(requests, "arrived_us")
    ok = np.isfinite(wait) & np.isfinite(arrived)
    x, y = arrived[ok] / 1e6, wait[ok]
    extra: dict[str, Any] = {"source": source, "slope": None, "n": int(ok.sum())}
    if len(x) < 3 or np.ptp(x) == 0:
        return _result(False, None, QUEUE_GROWTH_R2_LIMIT, False, **extra)
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    slope = sxy / sxx
    r2 = sxy * sxy / (sxx * syy) if syy > 0 else 0.0
    extra["slope"] = slope
    return _result(slope > 0 and r2 > QUEUE_GROWTH_R2_LIMIT, r2, QUEUE_GROWTH_R2_LIMIT, True, **extra)


def check_preemption_rate(requests: pd.DataFrame) -> dict:
    """Share of requests with ≥ 1 preemption > 15%, over the requests whose count is known (NaN = unknown);
    not available when no request has a count."""
    pre = _column(requests, "preemptions")
    known = np.isfinite(pre)
    if not known.any():
        return _result(False, None, PREEMPTION_RATE_LIMIT, False, n=0)
    rate = float((pre[known] >= 1).mean())
    return _result(rate > PREEMPTION_RATE_LIMIT, rate, PREEMPTION_RATE_LIMIT, True, n=int(known.sum()))


def check_ttft_growth(requests: pd.DataFrame) -> dict:
    """Median TTFT of the last 20% of requests by arrival > 2× that of the first 20%. Only requests with a
    measured TTFT take part (a request that failed before its first token has none); each window holds
    max(1, ⌊0.2·n⌋) of them. ``value`` = last / first."""
    arrived = _column(requests, "arrived_us")
    ttft = _column(requests, "first_token_us") - arrived
    ok = np.isfinite(ttft) & np.isfinite(arrived)
    n = int(ok.sum())
    if n < 2:
        return _result(False, None, TTFT_GROWTH_LIMIT, False, n=n, first_median_us=None, last_median_us=None)
    order = np.argsort(arrived[ok], kind="stable")
    t = ttft[ok][order]
    k = max(1, int(np.floor(TTFT_WINDOW * n)))
    first, last = float(np.median(t[:k])), float(np.median(t[-k:]))
    ratio = last / first if first > 0 else (np.inf if last > 0 else np.nan)
    return _result(last > TTFT_GROWTH_LIMIT * first and last > 0, _finite_or_none(ratio), TTFT_GROWTH_LIMIT, True,
                   n=n, window=k, first_median_us=first, last_median_us=last)


def check_e2e_tail(requests: pd.DataFrame) -> dict:
    """P99 / P50 of E2E (departed − arrived, else finished − arrived) > 10, over the requests that did not
    fail (a failed request's E2E is its timeout or abort time, not a latency)."""
    arrived = _column(requests, "arrived_us")
    end = _column(requests, "departed_us")
    end = np.where(np.isfinite(end), end, _column(requests, "finished_us"))
    e2e = end - arrived
    ok = np.isfinite(e2e) & (e2e > 0) & ~failed_mask(requests)
    n = int(ok.sum())
    if n < 2:
        return _result(False, None, E2E_TAIL_LIMIT, False, n=n)
    p50, p99 = (float(v) for v in np.percentile(e2e[ok], [50, 99]))
    ratio = p99 / p50
    return _result(ratio > E2E_TAIL_LIMIT, ratio, E2E_TAIL_LIMIT, True, n=n, p50_us=p50, p99_us=p99)



@dataclass(frozen=True)
class RunRouting:
    flags: dict  # check name -> {"flag", "value", "threshold", "available", ...}
    n_requests: int

    @property
    def n_flags(self) -> int:
        return sum(1 for f in self.flags.values() if f["flag"])

    @property
    def saturated(self) -> bool:
        return self.n_flags >= RUN_FLAGS_LIMIT

    @property
    def raised(self) -> list[str]:
        return [name for name, f in self.flags.items() if f["flag"]]

    def to_dict(self) -> dict:
        """JSON-able (non-finite floats become None) for a run manifest."""
        def clean(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (bool, np.bool_)):
                return bool(v)
            if isinstance(v, (int, np.integer)):
                return int(v)
            if isinstance(v, (float, np.floating)):
                return _finite_or_none(v)
            return v
        return {"saturated": self.saturated, "n_flags": self.n_flags, "flags_needed": RUN_FLAGS_LIMIT,
                "raised": self.raised, "n_requests": self.n_requests, "checks": clean(self.flags)}


def route_run(requests: pd.DataFrame, *, failures: int | None = None) -> RunRouting:
    """Run-level saturation (docs/spec.md §6): five post-hoc checks on the run's request table; ≥ 2 flags =
    saturated. ``failures``: the run's failure count from another source (see :func:`check_failure_rate`)."""
    if not isinstance(requests, pd.DataFrame):
        raise TypeError("requests must be a DataFrame (the request table, docs/spec.md §2)")
    flags = {
        "failure_rate": check_failure_rate(requests, failures),
        "queue_growth": check_queue_growth(requests),
        "preemption_rate": check_preemption_rate(requests),
        "ttft_growth": check_ttft_growth(requests),
        "e2e_tail": check_e2e_tail(requests),
    }
    return RunRouting(flags, len(requests))


def routing_counts(step_routing: StepRouting | None, run_routing: RunRouting, n_requests: int) -> dict:
    """How many steps and requests of one run went to each set (docs/spec.md §6).

    Requests are routed per run: all of a saturated run's requests go to the saturated set. Steps are
    routed per step (KV > 95% or a preemption), and a saturated run sends all its steps to the saturated
    set too (``saturated_run`` counts those the step checks alone would have kept). ``steps`` is None
    when the run has no step table.
    """
    sat = run_routing.saturated
    out = {"run_saturated": sat, "run_flags": run_routing.raised, "n_flags": run_routing.n_flags,
           "requests": {"total": int(n_requests), "unsaturated": 0 if sat else int(n_requests),
                        "saturated": int(n_requests) if sat else 0},
           "steps": None}
    if step_routing is not None:
        c = step_routing.counts()
        moved = c["unsaturated"] if sat else 0
        c.update(unsaturated=c["unsaturated"] - moved, saturated=c["saturated"] + moved, saturated_run=moved)
        out["steps"] = c
    return out
