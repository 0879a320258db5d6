"""OTEL JSONL traces of inference-sim's instrumented vLLM (or of the twin) -> step and request tables.

The format (see ``rooflab/twin/otel.py`` for the full layout and the source files it was read from): one
OTLP/JSON export per line; scope ``vllm.scheduler.step`` carries ``step.BATCH_SUMMARY`` and
``step.REQUEST_SNAPSHOT`` events on long-lived ``scheduler_steps_<n>`` spans; scope ``vllm.scheduler`` one
``llm_core`` span per request with ``journey.*`` events; scope ``vllm.api`` one ``llm_request`` span per
request with ``api.*`` events. The reader dispatches on event names, so the scope layout is not load-bearing.

Rules
-----
* Clock: every table time is µs on the SERVER's monotonic clock — ``step.ts_start_ns``, journey
  ``ts.monotonic_ns`` (else ``ts.monotonic`` seconds), API ``event.ts.monotonic`` seconds. The wall-clock
  ``timeUnixNano`` and any client clock are never used.
* Requests: one row per request (the ``llm_core`` span's ``gen_ai.request.id``; API and core spans are
  joined by trace id). arrived/departed = api.ARRIVED/DEPARTED, queued = journey.QUEUED, scheduled = the
  first SCHEDULED, first_token, finished; ``aborted_us`` (extra) = api.ABORTED. Status ``ok`` (finish.status
  stopped/length), ``aborted`` (api.ABORTED or finish.status aborted), ``error``, ``ignored``. A finished
  (``ok``) request must have QUEUED, SCHEDULED, FIRST_TOKEN, FINISHED and — when the traces hold API spans —
  ARRIVED and DEPARTED, in a consistent order (after sorting by time); otherwise it is excluded and counted
  by reason. A request with no terminal event (FINISHED/DEPARTED/ABORTED) is excluded as incomplete.
* Steps: one row per step id seen in a BATCH_SUMMARY, plus one per step id that only the journey
  reconstruction covers. Aggregates (``agg_source`` column) come from, in order: the step's REQUEST_SNAPSHOTs
  when their scheduled tokens add up to ``batch.scheduled_tokens`` (exact, via
  :func:`rooflab.data.tables.aggregate_entries`); else the journey reconstruction (:func:`reconstruct_steps`);
  else the BATCH_SUMMARY counts with Σ prefill context 0 and Σ decode context estimated from the KV usage
  (the rule of ``rooflab.data.adapters.step_records``). kv_usage, preemptions (``batch.num_preempted``), running
  and waiting come from the BATCH_SUMMARY (reconstructed-only steps: PREEMPTED events, NaN).
* Phase of a scheduled request (snapshots, records, reconstruction alike): *decode* iff it has output tokens
  and only its newest token is uncomputed (``computed >= prompt + output - 1``); otherwise *prefill* — which
  includes the recompute of a preempted request (prompt + output tokens from context 0; the fork labels
  that DECODE because it has output tokens). Its "prompt" for the last-chunk count is prompt + output.
* Step time = the cycle time ``step.ts_start_ns[k+1] − step.ts_start_ns[k]`` (``step.duration_us`` is the
  CPU time of ``schedule()`` and never used), NaN and counted when: step k+1 has no BATCH_SUMMARY
  (non-consecutive ids); the engine may have gone idle after step k — ``running + waiting − finished_k <= 0``
  where finished_k = max(FINISHED journey events with ``scheduler.step == k``, ``batch.num_finished`` of step
  k+1, which the fork fills with the requests finished since step k); step k scheduled no tokens (no
  forward pass); or the difference is not positive.
* Robustness (docs/spec.md §11): a last line cut mid-write is skipped and counted; malformed lines elsewhere are
  skipped and counted, but more than ``MAX_BAD_FRACTION`` of the lines (and more than one) raises
  :class:`InputError` naming the file and the first bad line; an empty file or one with no OTLP export raises
  :class:`InputError`; a span exported twice (same trace/span id, name and times) and a repeated step event
  (same step id, request id) or journey event (same name, time, step) are dropped and counted; events are
  sorted by time; int attributes may be string-encoded. A BATCH_SUMMARY whose step id was already seen with
  another start time (an engine restart in the same files) is dropped and counted separately.
* Speed: ~60k REQUEST_SNAPSHOTs/s (~40 MB/s of trace) on the development machine.
"""

from __future__ import annotations

import gc
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, overload

import numpy as np
import pandas as pd

from rooflab.data.adapters.otel_journeys import (
    AGGREGATE_COLUMNS,
    JOURNEY_NAMES,
    JourneyEvent,
    OtelTables,
    aggregate_by_step,
    first_scheduled_steps,
    reconstruct_steps,
    request_rows,
    requests_frame,
    snapshot_entries,
)
from rooflab.data.adapters.step_records import BLOCK_SIZE
from rooflab.data.tables import validate_steps
from rooflab.errors import InputError
from rooflab.files import input_files

_loads: Callable[[str | bytes], Any]
try:  # orjson ships with the pinned environment (prefect); json is the fallback
    import orjson

    _loads = orjson.loads
    _JSON_ERRORS: tuple = (orjson.JSONDecodeError, ValueError, TypeError)
except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSON_ERRORS = (ValueError, TypeError)

MAX_BAD_FRACTION = 0.05


def _steps_frame(summ: Mapping[int, dict], snap_agg: pd.DataFrame, rec_agg: pd.DataFrame | None,
                 rec_preempted: Mapping[int, int], finished_at: Mapping[int, int] | None,
                 meta: dict, report: dict) -> pd.DataFrame:
    ids = sorted(set(summ) | (set(rec_agg.index) if rec_agg is not None else set()))
    n = len(ids)
    sid = np.array(ids, dtype=np.int64)

    def s_col(key: str) -> np.ndarray:
        return np.array([_num(summ[i].get(key)) if i in summ else np.nan for i in ids], dtype=np.float64)

    has_summ = np.array([i in summ for i in ids], dtype=bool)
    ts_start = s_col("step.ts_start_ns")
    out = {c: np.full(n, np.nan) for c in AGGREGATE_COLUMNS}
    source = np.full(n, "summary", dtype=object)
    pos = {i: k for k, i in enumerate(ids)}
    done = np.zeros(n, dtype=bool)
    for agg, name in ((snap_agg, "snapshot"), (rec_agg, "journey")):
        if agg is None or len(agg) == 0:
            continue
        idx = np.array([pos[i] for i in agg.index if i in pos], dtype=np.int64)
        keep = np.array([i in pos for i in agg.index])
        sub = agg[keep]
        take = ~done[idx]
        for c in AGGREGATE_COLUMNS:
            out[c][idx[take]] = sub[c].to_numpy(dtype=np.float64)[take]
        source[idx[take]] = name
        done[idx[take]] = True
    # summary-only steps: batch counts, Σ context estimated
    rest = ~done & has_summ
    if rest.any():
        n_pf, n_dc = s_col("batch.num_prefill_reqs"), s_col("batch.num_decode_reqs")
        t_pf = s_col("batch.prefill_tokens")
        kv_tokens = s_col("kv.usage_gpu_ratio") * s_col("kv.blocks_total_gpu") * BLOCK_SIZE
        est = np.where(n_dc > 0, np.clip(kv_tokens - t_pf - n_dc - 0.5 * BLOCK_SIZE * (n_pf + n_dc), n_dc, None), 0.0)
        out["prefill_reqs"][rest] = n_pf[rest]
        out["prefill_tokens"][rest] = t_pf[rest]
        out["prefill_context"][rest] = 0.0
        out["decode_reqs"][rest] = n_dc[rest]
        out["decode_context"][rest] = est[rest]
    report["steps_total"] = n
    report["steps_with_summary"] = int(has_summ.sum())
    report["steps_with_snapshots"] = int((source == "snapshot").sum())
    report["steps_from_journeys"] = int((source == "journey").sum())
    report["steps_journey_only_no_summary"] = int(((source == "journey") & ~has_summ).sum())
    report["steps_summary_only"] = int(rest.sum())
    # prefix-cache hits are known where the step's entries and the requests' first SCHEDULED step are
    report["steps_prefix_cache_hits_known"] = int(np.isfinite(out["prefill_cached_tokens"]).sum())

    # cycle time
    cycle = np.full(n, np.nan)
    reasons: Counter[str] = Counter()
    running, waiting = s_col("queue.running_depth"), s_col("queue.waiting_depth")
    sched_tok = s_col("batch.scheduled_tokens")
    n_fin_next = s_col("batch.num_finished")
    for k in range(n):
        if not has_summ[k]:
            continue
        if k + 1 >= n or not has_summ[k + 1] or sid[k + 1] != sid[k] + 1:
            reasons["non-consecutive step ids"] += 1
            continue
        fin = finished_at.get(int(sid[k]), 0) if finished_at is not None else 0
        if np.isfinite(n_fin_next[k + 1]):
            fin = max(fin, int(n_fin_next[k + 1]))
        if np.isfinite(running[k]) and np.isfinite(waiting[k]) and running[k] + waiting[k] - fin <= 0:
            reasons["engine may have gone idle"] += 1
            continue
        if sched_tok[k] == 0:
            reasons["empty step (no tokens scheduled)"] += 1
            continue
        dt = (ts_start[k + 1] - ts_start[k]) / 1e3
        if not dt > 0:
            reasons["non-positive cycle"] += 1
            continue
        cycle[k] = dt
    report["cycle_times_computed"] = int(np.isfinite(cycle).sum())
    report["cycle_times_excluded"] = dict(reasons)

    preempt = s_col("batch.num_preempted")
    if rec_preempted:
        fill = np.array([float(rec_preempted.get(i, 0)) for i in ids])
        preempt = np.where(has_summ, preempt, fill)
    steps = pd.DataFrame({
        "run_id": meta["run_id"], "step_id": sid, "model": meta["model"], "tp": int(meta["tp"]),
        "hardware": meta["hardware"], "t_start_us": ts_start / 1e3, "step_time_us": cycle,
        **{c: out[c] for c in AGGREGATE_COLUMNS},
        "kv_usage": s_col("kv.usage_gpu_ratio"), "preemptions": np.nan_to_num(preempt, nan=0.0),
        "running": running, "waiting": waiting, "agg_source": source.astype(str),
    })
    return steps


def _attrs(lst: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(lst, list):
        return out
    for a in lst:
        try:
            k, v = a["key"], a["value"]
        except (KeyError, TypeError):
            continue
        if not isinstance(v, dict):
            continue
        if "intValue" in v:
            try:
                out[k] = int(v["intValue"])
            except (TypeError, ValueError):
                pass
        elif "doubleValue" in v:
            try:
                out[k] = float(v["doubleValue"])
            except (TypeError, ValueError):
                pass
        elif "stringValue" in v:
            out[k] = v["stringValue"]
        elif "boolValue" in v:
            out[k] = bool(v["boolValue"])
    return out


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return np.nan


def _first(v: dict) -> Any:
    """The scalar of an OTLP AnyValue ({"intValue": "42"} -> "42")."""
    return next(iter(v.values()))


@overload
def _int(x: Any) -> int | None: ...
@overload
def _int(x: Any, default: int) -> int: ...
def _int(x: Any, default: int | None = None) -> int | None:
    if x is None:
        return default
    try:
        f = float(x)
    except (TypeError, ValueError):
        return default
    return int(f) if math.isfinite(f) else default


def _journey_event(name: str, at: dict) -> JourneyEvent | None:
    ts = _int(at.get("ts.monotonic_ns"))
    if ts is None or ts <= 0:
        raw = at.get("ts.monotonic")
        if raw is None:
            return None
        try:
            s = float(raw)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(s):
            return None
        ts = int(round(s * 1e9))
    return JourneyEvent(name=name, ts_ns=ts, step=_int(at.get("scheduler.step")),
                        prefill_done=_int(at.get("prefill.done_tokens"), 0),
                        prefill_total=_int(at.get("prefill.total_tokens"), 0),
                        decode_done=_int(at.get("decode.done_tokens"), 0),
                        decode_max=_int(at.get("decode.max_tokens"), 0),
                        num_preemptions=_int(at.get("num_preemptions"), 0),
                        schedule_kind=str(at.get("schedule.kind", "") or "").upper(),
                        finish_status=str(at.get("finish.status", "") or "").lower())


class _Collector:
    def __init__(self) -> None:
        self.summ: dict[int, dict] = {}
        self.snap: dict[tuple[int, str], tuple] = {}
        self.core: dict[str, dict] = {}  # trace id / rid key -> {"rid", "trace", "events": {key: ev}}
        self.api: dict[str, dict] = {}  # trace id -> {"rid", "events": {name: ts}}
        self.seen_spans: set = set()
        self.c: Counter[str] = Counter()

    def span(self, sp: dict) -> None:
        key = (sp.get("traceId"), sp.get("spanId"), sp.get("name"), sp.get("startTimeUnixNano"),
               sp.get("endTimeUnixNano"))
        if key[1] is not None:
            if key in self.seen_spans:
                self.c["duplicate_spans_dropped"] += 1
                return
            self.seen_spans.add(key)
        events = sp.get("events") or []
        span_attrs = None
        for ev in events:
            name = ev.get("name") if isinstance(ev, dict) else None
            if not isinstance(name, str):
                self.c["bad_events"] += 1
                continue
            if name == "step.REQUEST_SNAPSHOT":
                self._snapshot(ev.get("attributes"))
            elif name.startswith("step."):
                self._step_event(name, _attrs(ev.get("attributes")))
            elif name.startswith("journey.") or name.startswith("api."):
                if span_attrs is None:
                    span_attrs = _attrs(sp.get("attributes"))
                self._request_event(sp, span_attrs, name, _attrs(ev.get("attributes")))

    def _snapshot(self, lst: Any) -> None:
        """REQUEST_SNAPSHOT, the bulk of a rich trace: a fast path for well-formed attributes."""
        try:
            d = {a["key"]: a["value"] for a in lst}
            key = (int(_first(d["step.id"])), str(_first(d["request.id"])))
            vals = (int(_first(d["request.num_prompt_tokens"])), int(_first(d["request.num_computed_tokens"])),
                    int(_first(d["request.num_output_tokens"])),
                    int(_first(d["request.scheduled_tokens_this_step"])))
        except (KeyError, TypeError, ValueError, AttributeError, StopIteration):
            at = _attrs(lst)
            sid, rid = _int(at.get("step.id")), at.get("request.id")
            p, c, o, s = (_int(at.get("request.num_prompt_tokens")), _int(at.get("request.num_computed_tokens")),
                          _int(at.get("request.num_output_tokens")),
                          _int(at.get("request.scheduled_tokens_this_step")))
            if sid is None or rid is None or p is None or c is None or o is None or s is None:
                self.c["bad_events"] += 1
                return
            key, vals = (sid, str(rid)), (p, c, o, s)
        if key in self.snap:
            self.c["duplicate_events_dropped"] += 1
            return
        self.snap[key] = vals

    def _step_event(self, name: str, at: dict) -> None:
        sid = _int(at.get("step.id"))
        if sid is None:
            self.c["bad_events"] += 1
            return
        if name == "step.BATCH_SUMMARY":
            if sid in self.summ:
                same = _int(self.summ[sid].get("step.ts_start_ns")) == _int(at.get("step.ts_start_ns"))
                # a different start time: not a re-export but another engine (restart?) reusing the id
                self.c["duplicate_events_dropped" if same else "conflicting_step_ids_dropped"] += 1
                return
            if _int(at.get("step.ts_start_ns")) is None:
                self.c["bad_events"] += 1
                return
            self.summ[sid] = at

    def _request_event(self, sp: dict, span_attrs: dict, name: str, at: dict) -> None:
        trace = sp.get("traceId") or ""
        rid = span_attrs.get("gen_ai.request.id")
        if name.startswith("api."):
            rec = self.api.setdefault(trace or f"rid:{rid}", {"rid": rid, "events": {}})
            if rec["rid"] is None:
                rec["rid"] = rid
            s = at.get("event.ts.monotonic")
            if s is None:
                self.c["bad_events"] += 1
                return
            try:
                ts = int(round(float(s) * 1e9))
            except (TypeError, ValueError, OverflowError):
                self.c["bad_events"] += 1
                return
            short = name[4:]
            if short in rec["events"]:
                self.c["duplicate_events_dropped"] += 1
                return
            rec["events"][short] = ts
            return
        short = name[8:]
        if short not in JOURNEY_NAMES:
            return
        ev = _journey_event(short, at)
        if ev is None:
            self.c["bad_events"] += 1
            return
        if rid is None:
            self.c["journey_spans_without_request_id"] += 1
            return
        rec = self.core.setdefault(str(rid), {"traces": set(), "events": {}})
        if trace:
            rec["traces"].add(trace)
        key = (ev.name, ev.ts_ns, ev.step)
        if key in rec["events"]:
            self.c["duplicate_events_dropped"] += 1
            return
        rec["events"][key] = ev


def _read_file(path: Path, col: _Collector, report: dict) -> None:
    if not path.is_file():
        raise InputError(path, None, "trace file not found")
    n_lines = n_ok = 0
    bad: list[tuple[int, bool]] = []  # (line number, newline-terminated)
    last_nonblank = 0
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(path, None, f"cannot open ({exc.strerror})") from None
    with fh:
        for ln, raw in enumerate(fh, 1):
            s = raw.strip()
            if ln == 1 and s.startswith(b"\xef\xbb\xbf"):
                s = s[3:]
            if not s:
                continue
            n_lines += 1
            last_nonblank = ln
            try:
                obj = _loads(s)
            except _JSON_ERRORS:
                bad.append((ln, raw.endswith(b"\n")))
                continue
            rss = obj.get("resourceSpans") if isinstance(obj, dict) else None
            if not isinstance(rss, list):
                bad.append((ln, raw.endswith(b"\n")))
                continue
            n_ok += 1
            for rs in rss:
                try:
                    for ss in rs.get("scopeSpans") or []:
                        for sp in ss.get("spans") or []:
                            try:
                                col.span(sp)
                            except (AttributeError, TypeError, KeyError):
                                col.c["bad_spans"] += 1
                except (AttributeError, TypeError):
                    col.c["bad_spans"] += 1
    if n_lines == 0:
        raise InputError(path, None, "empty trace file (no OTLP JSON lines)")
    truncated = 1 if bad and bad[-1][0] == last_nonblank and not bad[-1][1] else 0
    mid = bad[:-1] if truncated else bad
    if n_ok == 0:
        raise InputError(path, f"line {bad[0][0]}", "not an OTLP JSON trace file (no line holds resourceSpans)")
    if len(mid) > 1 and len(mid) > MAX_BAD_FRACTION * n_lines:
        raise InputError(path, f"line {mid[0][0]}", f"malformed OTLP JSON line ({len(mid)} of {n_lines} lines "
                                                     f"bad, more than {MAX_BAD_FRACTION:.0%})")
    report["lines"] += n_lines
    report["lines_ok"] += n_ok
    report["bad_lines_skipped"] += len(mid)
    report["truncated_last_lines"] += truncated
    if mid:
        report.setdefault("first_bad_line", f"{path}:{mid[0][0]}")


def read_otel_traces(paths: str | Path | Iterable[str | Path], *, run_id: str, model: str, tp: int,
                     hardware: str, max_num_batched_tokens: int | None = None) -> OtelTables:
    """Step and request tables from one run's OTEL JSONL trace files (see the module docstring).

    ``max_num_batched_tokens``: the run's token budget, for distributing chunked prefills in the journey
    reconstruction; default: the largest ``batch.scheduled_tokens`` seen (a lower bound), else an even split.
    """
    paths, source = input_files(paths, "trace")
    report: dict = Counter()
    col = _Collector()
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of small containers, no cycles: skip the repeated full collections
    try:
        for p in paths:
            _read_file(p, col, report)
    finally:
        if gc_was_on:
            gc.enable()
    report = dict(report)
    report["files"] = len(paths)
    for k in ("duplicate_spans_dropped", "duplicate_events_dropped", "conflicting_step_ids_dropped", "bad_events",
              "bad_spans", "journey_spans_without_request_id"):
        report[k] = int(col.c.get(k, 0))

    # requests: journeys by request id, API events joined by trace id
    journeys = {rid: list(rec["events"].values()) for rid, rec in col.core.items()}
    trace_to_rid = {t: rid for rid, rec in col.core.items() for t in rec["traces"]}
    api: dict[str, dict[str, int]] = {}
    for key, rec in col.api.items():
        rid = trace_to_rid.get(key) or rec["rid"]
        if rid is None:
            continue
        api.setdefault(str(rid), {}).update(rec["events"])
    require_api = bool(col.api)
    rows, excluded = request_rows(journeys, api, require_api, run_id)
    requests = requests_frame(rows, source)
    report["requests_seen"] = len(set(journeys) | set(api))
    report["requests_kept"] = len(requests)
    report["requests_excluded"] = dict(excluded)
    report["requests_by_status"] = {str(k): int(v) for k, v in requests["status"].value_counts().items()}

    # steps
    budget = max_num_batched_tokens
    if budget is None and col.summ:
        seen = [_int(a.get("batch.scheduled_tokens"), 0) for a in col.summ.values()]
        budget = max(seen) if seen and max(seen) > 0 else None
    recon = reconstruct_steps(journeys, budget) if journeys else None
    first_sched = first_scheduled_steps(journeys) if journeys else None  # None: cache hits unknown
    rec_agg = aggregate_by_step(recon.entries, run_id, first_sched) if recon is not None else None
    if recon is not None:
        report["reconstruction_skipped"] = recon.skipped
        report["reconstruction_inconsistent"] = recon.inconsistent
    snap_rows = [(sid, rid) + v for (sid, rid), v in col.snap.items() if v[3] > 0]
    snap_agg = aggregate_by_step(snapshot_entries(snap_rows, run_id) if snap_rows else None, run_id, first_sched)
    # a step's snapshots are used only if they account for all its scheduled tokens
    if len(snap_agg):
        tok = snap_agg["prefill_tokens"] + snap_agg["decode_reqs"]
        want = pd.Series({s: _int(col.summ[s].get("batch.scheduled_tokens")) if s in col.summ else None
                          for s in snap_agg.index}, dtype="float64")
        complete = (want.isna() | (want == tok)).to_numpy()
        report["steps_snapshots_incomplete"] = int((~complete).sum())
        snap_agg = snap_agg[complete]
    finished_at = None
    if journeys:
        finished_at = Counter(e.step for evs in journeys.values() for e in evs
                              if e.name == "FINISHED" and e.step is not None)
    meta = {"run_id": run_id, "model": model, "tp": tp, "hardware": hardware}
    steps = _steps_frame(col.summ, snap_agg, rec_agg, recon.preempted if recon else {}, finished_at, meta, report)
    if rec_agg is not None and len(rec_agg):
        report["reconstruction_check"] = _compare(rec_agg, snap_agg, col.summ)
    report["max_num_batched_tokens"] = budget
    steps = validate_steps(steps, source)
    return OtelTables(steps, requests, report)


def _compare(rec_agg: pd.DataFrame, snap_agg: pd.DataFrame, summ: Mapping[int, dict]) -> dict:
    """Agreement of the journey reconstruction with the step events (snapshots, else BATCH_SUMMARY)."""
    ref = snap_agg[["prefill_tokens", "decode_reqs"]].copy()
    ref["src"] = "snapshot"
    extra = [s for s in summ if s not in ref.index]
    if extra:
        ref = pd.concat([ref, pd.DataFrame({
            "prefill_tokens": [float(summ[s].get("batch.prefill_tokens", np.nan)) for s in extra],
            "decode_reqs": [float(summ[s].get("batch.num_decode_reqs", np.nan)) for s in extra],
            "src": "summary"}, index=pd.Index(extra, dtype=np.int64))])
    # steps with work but no reconstruction count as 0 there
    r = rec_agg[["prefill_tokens", "decode_reqs"]].reindex(ref.index).fillna(0.0)
    ok = ref["decode_reqs"].notna() & ref["prefill_tokens"].notna()
    ref, r = ref[ok], r[ok]
    if not len(ref):
        return {"steps_compared": 0}
    d_dec = (r["decode_reqs"] - ref["decode_reqs"]).abs()
    d_pf = (r["prefill_tokens"] - ref["prefill_tokens"]).abs()
    tot = float(ref["prefill_tokens"].sum())
    return {"steps_compared": int(len(ref)), "against": dict(Counter(ref["src"])),
            "decode_reqs_exact": float((d_dec == 0).mean()),
            "prefill_tokens_exact": float((d_pf == 0).mean()),
            "prefill_tokens_abs_err": float(d_pf.sum()),
            "prefill_tokens_rel_err": float(d_pf.sum() / tot) if tot > 0 else 0.0}
