"""The sim-to-real kit's run-summary metrics, computed from per-request results exactly as the kit defines them
(``s2r/README.md`` "How the measurements were taken"; ``/work/notes/s2r.md`` §3.6 and §5):

* a request belongs to the stage it was **sent** in (inference-perf buckets by ``stage_id``); ``overall`` is the
  whole run;
* only successful requests count (inference-perf's ``error is None``; a request the client timed out on is
  excluded); E2E = end − start, TTFT = first streamed token − start;
* mean, p90 and p99 of TTFT and E2E; percentiles by ``numpy.percentile`` with its default linear interpolation;
* ITL is derived from means, not measured per token: ``(mean E2E − mean TTFT) / (mean output length − 1)``, per
  stage and overall; there is no ITL p90 / p99 (the kit's ``itl_p90`` / ``itl_p99`` are null);
* APE = ``|pred − actual| / actual × 100``; the published "MAPE" is the median APE over experiments, whole run.

Units: inputs in µs (the replay's ``*_us`` columns), :meth:`RunSummary.to_ms_dict` in the kit's ms layout
(:data:`rooflab.data.s2r.METRIC_NAMES`). The kit's measured ITL divides by the client's *re-tokenised* mean
output length (notes §3.7), not by the generated ``max_tokens``; pass ``output_len_mean`` to reproduce it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rooflab.data.s2r import METRIC_NAMES, OVERALL, SCORED_METRICS, stage_key
from rooflab.errors import InputError


@dataclass(frozen=True)
class StageSummary:
    """One stage's (or the whole run's) summary; latencies in ms, NaN where no request succeeded."""

    sent: int
    completed: int  # successful requests
    failed: int
    ttft_mean: float
    ttft_p90: float
    ttft_p99: float
    e2e_mean: float
    e2e_p90: float
    e2e_p99: float
    itl_mean: float
    output_len_mean: float

    def to_ms_dict(self) -> dict[str, float | None]:
        """The kit's layout (``itl_p90`` / ``itl_p99`` None, NaN → None)."""
        d = {m: getattr(self, m, None) for m in METRIC_NAMES}
        return {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in d.items()}


@dataclass(frozen=True)
class RunSummary:
    stages: dict[str, StageSummary]  # "overall", "stage_0", …

    @property
    def overall(self) -> StageSummary:
        return self.stages[OVERALL]

    def to_ms_dict(self) -> dict[str, dict[str, float | None]]:
        """``{"overall": {e2e_mean, …, itl_p99}, "stage_0": {…}, …}``, as ``experiments.json`` ``metrics``."""
        return {k: s.to_ms_dict() for k, s in self.stages.items()}


def assign_stages(send_us: Sequence[float] | np.ndarray, stage_starts_us: Sequence[float]) -> np.ndarray:
    """Stage index of each request by its send time: the last stage whose start is ≤ the send time
    (``stage_starts_us`` ascending; a request sent before the first start is stage 0)."""
    starts = np.asarray(stage_starts_us, dtype=float)
    if len(starts) == 0 or np.any(np.diff(starts) < 0):
        raise InputError(None, "stage_starts_us", "expected at least one ascending stage start")
    return np.maximum(np.searchsorted(starts, np.asarray(send_us, dtype=float), side="right") - 1, 0)


def _percentile(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def summarize_stage(ttft_us: np.ndarray, e2e_us: np.ndarray, output_tokens: np.ndarray, failed: np.ndarray,
                    output_len_mean: float | None = None) -> StageSummary:
    """One bucket of requests (arrays of equal length; ``failed`` bool)."""
    ok = ~failed
    e2e = e2e_us[ok & np.isfinite(e2e_us)] / 1e3
    ttft = ttft_us[ok & np.isfinite(ttft_us)] / 1e3  # inference-perf: successful and streamed
    out = output_tokens[ok & np.isfinite(output_tokens)]
    out_mean = float(output_len_mean) if output_len_mean is not None else _mean(out)
    e2e_mean, ttft_mean = _mean(e2e), _mean(ttft)
    itl = (e2e_mean - ttft_mean) / (out_mean - 1) if out_mean > 1 else float("nan")
    return StageSummary(len(failed), int(ok.sum()), int(failed.sum()), ttft_mean, _percentile(ttft, 90),
                        _percentile(ttft, 99), e2e_mean, _percentile(e2e, 90), _percentile(e2e, 99), itl, out_mean)


def summarize_run(frame: pd.DataFrame, *, ttft: str = "pred_ttft_us", e2e: str = "pred_e2e_us",
                  failed: str | None = "pred_failed", output: str = "output_tokens", stage: str | None = "stage",
                  stage_starts_us: Sequence[float] | None = None, send: str = "arrival_us",
                  output_len_mean: Mapping[str, float] | None = None) -> RunSummary:
    """The kit's summary of one run from per-request rows.

    Predicted (a replay's output, the default): ``pred_ttft_us``, ``pred_e2e_us``, ``pred_failed``; measured:
    ``summarize_run(df, ttft="ttft_us", e2e="e2e_us", failed="failed")``. A request's stage is the ``stage``
    column, or, with ``stage_starts_us``, the stage its ``send`` time falls in; ``stage=None`` and no starts → one
    stage. ``failed=None``: a request failed where its E2E is missing. ``output_len_mean`` (by stage key, e.g. the
    kit's client-side means) replaces the per-request mean in the ITL formula."""
    for col in (ttft, e2e, output):
        if col not in frame:
            raise InputError(None, col, f"missing column (have: {', '.join(map(str, frame.columns))})")
    n = len(frame)
    if stage_starts_us is not None:
        if send not in frame:
            raise InputError(None, send, "missing column (needed to assign stages by send time)")
        stages = assign_stages(frame[send].to_numpy(dtype=float), stage_starts_us)
    elif stage is not None and stage in frame:
        stages = frame[stage].to_numpy()
    elif stage is not None and stage != "stage":
        raise InputError(None, stage, "missing column")
    else:
        stages = np.zeros(n, dtype=int)
    if pd.isna(stages).any():
        raise InputError(None, stage or "stage", "a request has no stage")
    t = frame[ttft].to_numpy(dtype=float)
    e = frame[e2e].to_numpy(dtype=float)
    o = frame[output].to_numpy(dtype=float)
    if failed is not None:
        if failed not in frame:
            raise InputError(None, failed, "missing column (pass failed=None to treat a missing E2E as failed)")
        f = frame[failed].fillna(True).to_numpy(dtype=bool)
    else:
        f = ~np.isfinite(e)
    means = dict(output_len_mean or {})
    out = {OVERALL: summarize_stage(t, e, o, f, means.get(OVERALL))}
    for k in sorted(set(int(s) for s in stages)):
        m = stages == k
        out[stage_key(k)] = summarize_stage(t[m], e[m], o[m], f[m], means.get(stage_key(k)))
    return RunSummary(out)


def ape(pred: float | None, actual: float | None) -> float | None:
    """Absolute percentage error ``|pred − actual| / actual × 100``; None where either is missing or actual is 0."""
    if pred is None or actual is None:
        return None
    p, a = float(pred), float(actual)
    if not (np.isfinite(p) and np.isfinite(a)) or a == 0:
        return None
    return abs(p - a) / abs(a) * 100.0


def ape_table(pred: Mapping[str, Mapping[str, float | None]], actual: Mapping[str, Mapping[str, float | None]],
              metrics: Iterable[str] = SCORED_METRICS) -> dict[str, dict[str, float | None]]:
    """APE per stage key and metric for two kit-layout dicts (stages present in both)."""
    return {k: {m: ape(pred[k].get(m), actual[k].get(m)) for m in metrics} for k in actual if k in pred}


def median_ape(values: Iterable[float | None]) -> float | None:
    """The median of the APEs that exist (the kit's published "MAPE" over experiments); None if none do."""
    xs = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.median(xs)) if xs else None
