"""The twin engine's own record of a run (its step records and request events) as rooflab tables: the
reference that reading the twin's OTEL traces back (:func:`rooflab.data.adapters.otel.read_otel_traces`) must
reproduce, used by the trace round-trip tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from rooflab.data.adapters.otel_journeys import (
    AGGREGATE_COLUMNS,
    JourneyEvent,
    OtelTables,
    aggregate_by_step,
    request_rows,
    requests_frame,
    snapshot_entries,
)
from rooflab.data.tables import validate_steps
from rooflab.twin.otel import FINISH_STATUS
from rooflab.twin.records import RequestEvent, StepRecord


def journeys_from_request_events(request_events: Iterable[Any],
                                 ) -> tuple[dict[str, list[JourneyEvent]], dict[str, dict[str, int]]]:
    """Twin RequestEvents -> (journeys by request id, API event times by request id), with the journey
    attributes the trace writer derives (``prefill.done_tokens`` high-water mark, fork finish statuses)."""
    by_rid: dict[str, list[RequestEvent]] = defaultdict(list)
    for ev in _flatten(request_events):
        by_rid[ev.request_id].append(ev)
    journeys: dict[str, list[JourneyEvent]] = {}
    api: dict[str, dict[str, int]] = {}
    for rid, evs in by_rid.items():
        evs.sort(key=lambda e: e.ts_ns)
        hw = 0
        for e in evs:
            kind = e.kind
            if kind.startswith("api."):
                api.setdefault(rid, {}).setdefault(kind[4:], int(e.ts_ns))
                continue
            prompt = int(e.num_prompt_tokens)
            hw = prompt if (kind == "journey.FIRST_TOKEN" or e.num_output_tokens > 0) else max(
                hw, min(int(e.num_computed_tokens), prompt))
            journeys.setdefault(rid, []).append(JourneyEvent(
                name=kind[8:], ts_ns=int(e.ts_ns), step=None if e.step_id is None else int(e.step_id),
                prefill_done=hw, prefill_total=prompt, decode_done=int(e.num_output_tokens),
                decode_max=int(e.max_tokens), num_preemptions=int(e.num_preemptions),
                schedule_kind=str(e.schedule_kind or "").upper(),
                finish_status=FINISH_STATUS.get(e.finish_status, e.finish_status or "") if e.finish_status else ""))
    return journeys, api


def _flatten(items: Iterable[Any]) -> Iterator[RequestEvent]:
    """Request events, from lists nested to any depth."""
    for x in items:
        if isinstance(x, (list, tuple)):
            yield from _flatten(x)
        else:
            yield x


def tables_from_records(step_records: Iterable[StepRecord], request_events: Iterable[Any], run_id: str, model: str,
                        tp: int, hardware: str) -> OtelTables:
    """The engine's own record of the steps and requests as rooflab tables — the reference a trace read
    back with :func:`read_otel_traces` must reproduce. Step time here is the record's true
    ``ts_end_ns − ts_start_ns``; the reader's cycle time must equal it wherever it is not excluded."""
    recs = sorted(step_records, key=lambda r: r.step_id)
    snaps = [(r.step_id, e.request_id, e.num_prompt_tokens, e.num_computed_tokens, e.num_output_tokens,
              e.scheduled_tokens) for r in recs for e in r.entries if e.scheduled_tokens > 0]
    agg = aggregate_by_step(snapshot_entries(snaps, run_id) if snaps else None, run_id)
    sid = np.array([r.step_id for r in recs], dtype=np.int64)
    aggr = agg.reindex(sid)
    steps = pd.DataFrame({
        "run_id": run_id, "step_id": sid, "model": model, "tp": int(tp), "hardware": hardware,
        "t_start_us": np.array([r.ts_start_ns for r in recs], dtype=np.float64) / 1e3,
        "step_time_us": np.array([r.ts_end_ns - r.ts_start_ns for r in recs], dtype=np.float64) / 1e3,
        **{c: aggr[c].to_numpy(dtype=np.float64) for c in AGGREGATE_COLUMNS},
        "kv_usage": np.array([r.kv_usage for r in recs], dtype=np.float64),
        "preemptions": np.array([r.num_preempted for r in recs], dtype=np.float64),
        "running": np.array([r.running_depth for r in recs], dtype=np.float64),
        "waiting": np.array([r.waiting_depth for r in recs], dtype=np.float64),
        "agg_source": "records",
    })
    empty = ~np.isin(sid, agg.index.to_numpy())
    for c in ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "decode_reqs",
              "decode_context"):
        steps.loc[empty, c] = 0.0
    journeys, api = journeys_from_request_events(request_events)
    rows, excluded = request_rows(journeys, api, bool(api), run_id)
    requests = requests_frame(rows, "<records>")
    return OtelTables(validate_steps(steps, "<records>"), requests,
                      {"source": "records", "requests_excluded": dict(excluded)})
