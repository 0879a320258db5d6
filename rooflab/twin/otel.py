"""Write the twin's records as OTEL JSONL traces in the format of inference-sim's instrumented vLLM.

Sources of the format (read from the public repositories; no code copied):

* ``inference-sim/vllm`` — ``vllm/v1/core/sched/scheduler.py`` (``_emit_step_batch_summary``,
  ``_emit_rich_request_snapshots``, ``_open_step_span`` / ``_close_step_span``, ``_emit_journey_event``,
  ``_compute_progress_snapshot``, ``_create_core_span``), ``vllm/tracing.py`` (``SpanAttributes``: the
  attribute names), ``vllm/entrypoints/openai/engine/serving.py`` (``_create_api_span``,
  ``_finalize_api_span``), ``vllm/v1/core/sched/journey_events.py`` (finish statuses),
  ``vllm/config/observability.py`` (``step_tracing_closure_interval`` = 100, sample rates),
  ``STEP_TRACING.md``, ``JOURNEY_TRACING.md``.
* Readers of the real files (``traces.json``, one OTLP JSON export per line, written by an OTEL collector's
  file exporter): ``inference-sim/training`` — ``trace_parser.py``, ``reconstruct_steps.py``;
  ``inference-sim/inference-sim`` — ``training/generate_replay_specs.py``.

Layout, as implemented
----------------------
One line = one OTLP ``ExportTraceServiceRequest`` in OTLP/JSON::

    {"resourceSpans":[{"resource":{"attributes":[service.name="vllm", ...]},
                       "scopeSpans":[{"scope":{"name":"vllm.scheduler.step"},"spans":[...]}, ...]}]}

ints as strings (``{"intValue":"42"}``), doubles ``{"doubleValue":0.5}``, strings ``{"stringValue":..}``;
``timeUnixNano`` / ``startTimeUnixNano`` / ``endTimeUnixNano`` as decimal strings; ``kind`` 1 = INTERNAL,
2 = SERVER. A span is written when it ends (like the SDK's BatchSpanProcessor): a line holds every span
that ended since the previous line and is written when the current ``scheduler_steps_<n>`` span closes,
when ``max_export_batch_size`` spans are pending, or on :meth:`TraceWriter.flush` / ``close``. The API
span sits under its own resource entry (the API server process), the engine's spans under another.

* ``vllm.scheduler.step`` — span ``scheduler_steps_<seq>`` (INTERNAL; attributes ``scheduler.span_sequence``,
  ``scheduler.step_range_start``, ``scheduler.closure_interval``, ``scheduler.step_range_end``), closed and
  reopened every ``closure_interval`` steps (the fork's default is 100). Per sampled step one
  ``step.BATCH_SUMMARY`` event (``step.id``, ``step.ts_start_ns``, ``step.ts_end_ns``, ``step.duration_us``,
  ``queue.running_depth``, ``queue.waiting_depth``, ``batch.num_prefill_reqs``, ``batch.num_decode_reqs``,
  ``batch.scheduled_tokens``, ``batch.prefill_tokens``, ``batch.decode_tokens``, ``batch.num_finished``,
  ``batch.num_preempted``, ``kv.usage_gpu_ratio``, ``kv.blocks_total_gpu``, ``kv.blocks_free_gpu``) and, if
  rich-subsampled, one ``step.REQUEST_SNAPSHOT`` per entry (``step.id``, ``request.id``, ``request.phase``,
  ``request.num_prompt_tokens``, ``request.num_computed_tokens`` (pre-step), ``request.num_output_tokens``,
  ``request.num_preemptions``, ``request.scheduled_tokens_this_step``, ``kv.blocks_allocated_gpu``,
  ``kv.blocks_cached_gpu``). As in the fork, ``step.ts_end_ns − step.ts_start_ns`` is ``step.duration_us``
  (the CPU time of ``schedule()``), NOT the step time; the record's own ``ts_end_ns`` (the true step end) is
  not exported — the fork has no such field, so a reader must use the cycle time.
* ``vllm.scheduler`` — span ``llm_core`` per request (INTERNAL, child of the API span, same trace id,
  attribute ``gen_ai.request.id``), events ``journey.QUEUED/SCHEDULED/FIRST_TOKEN/PREEMPTED/FINISHED`` with
  ``event.type``, ``ts.monotonic`` (double seconds), ``ts.monotonic_ns`` (int), ``scheduler.step``,
  ``phase`` (WAITING for QUEUED, else PREFILL while no output token, else DECODE), ``prefill.done_tokens``
  (high-water mark of prompt tokens computed; survives preemption), ``prefill.total_tokens``,
  ``decode.done_tokens``, ``decode.max_tokens``, ``num_preemptions``, ``schedule.kind`` (FIRST|RESUME) and
  ``finish.status`` (stopped|length|aborted|error|ignored).
* ``vllm.api`` — span ``llm_request`` per request (SERVER, attribute ``gen_ai.request.id``), events
  ``api.ARRIVED``, ``api.DEPARTED``, ``api.ABORTED`` with ``event.ts.monotonic`` (double seconds).

Event ``timeUnixNano`` = ``epoch_offset_ns`` + the simulated monotonic ns (the fork stamps ``time.time_ns()``).

Assumptions / differences (the records do not carry these; stated, not invented):
* ``api.HANDOFF_TO_CORE`` and ``api.FIRST_RESPONSE_FROM_CORE`` are not written (no such times in the records);
  nor are the API span's request attributes other than ``gen_ai.request.id``.
* REQUEST_SNAPSHOT is written for the record's entries (the requests scheduled in the step); the fork also
  emits them for running requests that got 0 tokens. ``request.phase`` follows the fork's rule
  (``num_output_tokens == 0`` → PREFILL), not ``StepEntry.phase``. ``request.num_preemptions`` is counted
  from the records' ``preempted_ids``; ``kv.blocks_allocated_gpu`` = ⌈(computed + scheduled) / block_size⌉;
  ``kv.blocks_cached_gpu`` = 0 (the records carry no prefix-cache hits).
* Journey ``prefill.done_tokens`` is the running maximum of ``min(num_computed_tokens, prompt)`` over the
  request's events (equal to the prompt from FIRST_TOKEN on), so a PREEMPTED event should carry the computed
  tokens *before* the preemption reset. A QUEUED event with ``step_id`` None gets no ``scheduler.step``.
* Twin finish statuses ``stop`` / ``abort`` are written as the fork's ``stopped`` / ``aborted``.
* ``telemetry.sdk.*`` resource attributes other than language/name are omitted.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from rooflab.twin.records import (
    ABORTED,
    ARRIVED,
    DEPARTED,
    FINISHED,
    FIRST_TOKEN,
    PREEMPTED,
    QUEUED,
    SCHEDULED,
    RequestEvent,
    StepRecord,
)

SCOPE_API, SCOPE_CORE, SCOPE_STEP = "vllm.api", "vllm.scheduler", "vllm.scheduler.step"
KIND_INTERNAL, KIND_SERVER = 1, 2
DEFAULT_CLOSURE_INTERVAL = 100  # vllm/config/observability.py: step_tracing_closure_interval
DEFAULT_MAX_EXPORT_BATCH = 512  # OTEL BatchSpanProcessor's max_export_batch_size
BLOCK_SIZE = 16

FINISH_STATUS = {"stop": "stopped", "stopped": "stopped", "length": "length", "abort": "aborted",
                 "aborted": "aborted", "error": "error", "ignored": "ignored"}
_JOURNEY = (QUEUED, SCHEDULED, FIRST_TOKEN, PREEMPTED, FINISHED)
_API = (ARRIVED, DEPARTED, ABORTED)


class ByteSink(Protocol):
    """Where a TraceWriter's lines go: its file, or a writer thread around it
    (:class:`rooflab.twin.trace_thread.BackgroundTraceWriter`)."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _jfloat(x: float) -> str:
    """A double as OTLP/JSON writes it (proto3 JSON spells non-finite values as strings)."""
    x = float(x)
    if math.isfinite(x):
        return repr(x)
    return '"NaN"' if math.isnan(x) else ('"Infinity"' if x > 0 else '"-Infinity"')


def _attr(key: str, value: object) -> str:
    if isinstance(value, bool):
        v = '{"boolValue":' + ("true" if value else "false") + "}"
    elif isinstance(value, int):
        v = f'{{"intValue":"{value:d}"}}'
    elif isinstance(value, float):
        v = '{"doubleValue":' + _jfloat(value) + "}"
    else:
        v = '{"stringValue":' + json.dumps(str(value)) + "}"
    return '{"key":' + json.dumps(key) + ',"value":' + v + "}"


def _resource(service_name: str) -> str:
    return ('{"attributes":[' + ",".join([_attr("service.name", service_name),
                                          _attr("telemetry.sdk.language", "python"),
                                          _attr("telemetry.sdk.name", "opentelemetry")]) + "]}")


class TraceWriter:
    """Writes StepRecords and per-request RequestEvents to one OTEL JSONL file (see the module docstring).

    ``epoch_offset_ns``: added to the simulated monotonic ns to make ``timeUnixNano`` (default: the wall
    clock minus the monotonic clock at construction). ``sample_rate`` / ``rich_subsample_rate``: the fork's
    two-stage step sampling (BATCH_SUMMARY per step; REQUEST_SNAPSHOTs of a sampled step); the twin's
    default is 1.0 / 1.0. ``seed``: for the samplers and the trace/span ids (default: random).
    Every line is written with one ``write`` call and flushed, so a crash leaves at most one truncated line.
    Thread-safe.
    """

    def __init__(self, path: str | Path, *, epoch_offset_ns: int | None = None,
                 closure_interval: int = DEFAULT_CLOSURE_INTERVAL, sample_rate: float = 1.0,
                 rich_subsample_rate: float = 1.0, max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH,
                 service_name: str = "vllm", block_size: int = BLOCK_SIZE, seed: int | None = None,
                 append: bool = False):
        if closure_interval < 1:
            raise ValueError("closure_interval must be >= 1")
        self.path = Path(path)
        self.epoch_offset_ns = int(epoch_offset_ns if epoch_offset_ns is not None
                                   else time.time_ns() - time.monotonic_ns())
        self.closure_interval = int(closure_interval)
        self.sample_rate = float(sample_rate)
        self.rich_subsample_rate = float(rich_subsample_rate)
        self.max_export_batch_size = int(max_export_batch_size)
        self.block_size = int(block_size)
        self._rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
        self._resource = _resource(service_name)
        self._lock = threading.Lock()
        self._fh: ByteSink = open(self.path, "ab" if append else "wb")
        self._closed = False
        # scheduler_steps span state
        self._span_seq = 0
        self._span_events: list[str] = []
        self._span_open = False
        self._span_range_start = 0
        self._span_start_ns = 0
        self._span_last_ns = 0
        self._steps_since_closure = 0
        self._emitted_since_closure = False
        self._last_step_id = 0
        # per-request state for snapshots
        self._snap_prefix: dict[str, dict] = {}
        self._npreempt: dict[str, int] = {}
        # ended spans waiting for export, by scope
        self._pending: dict[str, list] = {SCOPE_API: [], SCOPE_CORE: [], SCOPE_STEP: []}
        self._n_pending = 0

    # -- context manager --------------------------------------------------------------------------
    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ids ----------------------------------------------------------------------------------------
    def _trace_id(self) -> str:
        return "%032x" % (self._rng.getrandbits(128) or 1)

    def _span_id(self) -> str:
        return "%016x" % (self._rng.getrandbits(64) or 1)

    # -- steps --------------------------------------------------------------------------------------
    def write_step(self, record: StepRecord) -> None:
        """One scheduler step: a BATCH_SUMMARY event (+ snapshots) on the current scheduler_steps span."""
        with self._lock:
            self._check_open()
            sid = int(record.step_id)
            start = int(record.ts_start_ns)
            end_sched = start + int(record.duration_us) * 1000  # the fork's step.ts_end_ns
            t_emit = self.epoch_offset_ns + end_sched
            if not self._span_open:
                self._open_span(sid, t_emit)
            self._last_step_id = sid
            for rid in record.preempted_ids:
                self._npreempt[rid] = self._npreempt.get(rid, 0) + 1
            sampled = self.sample_rate >= 1.0 or self._rng.random() < self.sample_rate
            if sampled:
                ev = self._span_events
                if ev:
                    ev.append(",")
                ev.append(
                    f'{{"timeUnixNano":"{t_emit}","name":"step.BATCH_SUMMARY","attributes":['
                    f'{{"key":"step.id","value":{{"intValue":"{sid}"}}}},'
                    f'{{"key":"step.ts_start_ns","value":{{"intValue":"{start}"}}}},'
                    f'{{"key":"step.ts_end_ns","value":{{"intValue":"{end_sched}"}}}},'
                    f'{{"key":"step.duration_us","value":{{"intValue":"{int(record.duration_us)}"}}}},'
                    f'{{"key":"queue.running_depth","value":{{"intValue":"{int(record.running_depth)}"}}}},'
                    f'{{"key":"queue.waiting_depth","value":{{"intValue":"{int(record.waiting_depth)}"}}}},'
                    f'{{"key":"batch.num_prefill_reqs","value":{{"intValue":"{int(record.num_prefill_reqs)}"}}}},'
                    f'{{"key":"batch.num_decode_reqs","value":{{"intValue":"{int(record.num_decode_reqs)}"}}}},'
                    f'{{"key":"batch.scheduled_tokens","value":{{"intValue":"{int(record.scheduled_tokens)}"}}}},'
                    f'{{"key":"batch.prefill_tokens","value":{{"intValue":"{int(record.prefill_tokens)}"}}}},'
                    f'{{"key":"batch.decode_tokens","value":{{"intValue":"{int(record.decode_tokens)}"}}}},'
                    f'{{"key":"batch.num_finished","value":{{"intValue":"{int(record.num_finished)}"}}}},'
                    f'{{"key":"batch.num_preempted","value":{{"intValue":"{int(record.num_preempted)}"}}}},'
                    f'{{"key":"kv.usage_gpu_ratio","value":{{"doubleValue":{_jfloat(record.kv_usage)}}}}},'
                    f'{{"key":"kv.blocks_total_gpu","value":{{"intValue":"{int(record.kv_blocks_total)}"}}}},'
                    f'{{"key":"kv.blocks_free_gpu","value":{{"intValue":"{int(record.kv_blocks_free)}"}}}}]}}')
                if record.entries and (self.rich_subsample_rate >= 1.0
                                       or self._rng.random() < self.rich_subsample_rate):
                    ev.append(",")
                    ev.append(self._snapshots(record, sid, t_emit))
                self._emitted_since_closure = True
            self._span_last_ns = t_emit
            self._steps_since_closure += 1
            if self._steps_since_closure >= self.closure_interval:
                if self._emitted_since_closure:
                    self._close_span()
                self._steps_since_closure = 0
                self._emitted_since_closure = False

    def _snapshots(self, record: StepRecord, sid: int, t_emit: int) -> str:
        pre, npre = self._snap_prefix, self._npreempt
        bs1, bs = self.block_size - 1, self.block_size
        frag = {}  # request id -> its constant attributes up to num_computed_tokens' value
        for e in record.entries:
            key = (e.num_output_tokens == 0, e.num_prompt_tokens)
            mine = pre.setdefault(e.request_id, {})
            if key not in mine:
                mine[key] = (f'{json.dumps(str(e.request_id))}}}}},'
                             f'{{"key":"request.phase","value":{{"stringValue":"'
                             f'{"PREFILL" if key[0] else "DECODE"}"}}}},'
                             f'{{"key":"request.num_prompt_tokens","value":{{"intValue":"{e.num_prompt_tokens}"}}}},'
                             f'{{"key":"request.num_computed_tokens","value":{{"intValue":"')
            frag[e.request_id] = mine[key]
        head = (f'{{"timeUnixNano":"{t_emit}","name":"step.REQUEST_SNAPSHOT","attributes":['
                f'{{"key":"step.id","value":{{"intValue":"{sid}"}}}},'
                f'{{"key":"request.id","value":{{"stringValue":')
        return ",".join([
            f'{head}{frag[e.request_id]}{e.num_computed_tokens}"}}}},'
            f'{{"key":"request.num_output_tokens","value":{{"intValue":"{e.num_output_tokens}"}}}},'
            f'{{"key":"request.num_preemptions","value":{{"intValue":"{npre.get(e.request_id, 0) if npre else 0}"}}}},'
            f'{{"key":"request.scheduled_tokens_this_step","value":{{"intValue":"{e.scheduled_tokens}"}}}},'
            f'{{"key":"kv.blocks_allocated_gpu","value":{{"intValue":"'
            f'{(e.num_computed_tokens + e.scheduled_tokens + bs1) // bs}"}}}},'
            f'{{"key":"kv.blocks_cached_gpu","value":{{"intValue":"0"}}}}]}}'
            for e in record.entries])

    def _open_span(self, range_start: int, t_ns: int) -> None:
        self._span_seq += 1
        self._span_open = True
        self._span_range_start = range_start
        self._span_start_ns = t_ns
        self._span_last_ns = t_ns
        self._span_events = []

    def _close_span(self) -> None:
        if not self._span_open:
            return
        seq = self._span_seq
        attrs = ",".join([_attr("scheduler.span_sequence", seq),
                          _attr("scheduler.step_range_start", self._span_range_start),
                          _attr("scheduler.closure_interval", self.closure_interval),
                          _attr("scheduler.step_range_end", self._last_step_id)])
        head = (f'{{"traceId":"{self._trace_id()}","spanId":"{self._span_id()}",'
                f'"name":"scheduler_steps_{seq}","kind":{KIND_INTERNAL},'
                f'"startTimeUnixNano":"{self._span_start_ns}","endTimeUnixNano":"{self._span_last_ns}",'
                f'"attributes":[{attrs}],"events":[')
        self._span_events.insert(0, head)
        self._span_events.append('],"status":{}}')
        self._add_pending(SCOPE_STEP, self._span_events)
        self._span_open = False
        self._span_events = []
        self._export()

    # -- requests -----------------------------------------------------------------------------------
    def write_request(self, events: list[RequestEvent]) -> None:
        """A request that ended: its ``llm_request`` (API) and ``llm_core`` (journey) spans."""
        by_rid: dict[str, list[RequestEvent]] = {}
        for ev in events:
            by_rid.setdefault(ev.request_id, []).append(ev)
        with self._lock:
            self._check_open()
            for rid, evs in by_rid.items():
                self._write_one_request(rid, sorted(evs, key=lambda e: e.ts_ns))
                self._npreempt.pop(rid, None)
                self._snap_prefix.pop(rid, None)
            if self._n_pending >= self.max_export_batch_size:
                self._export()

    def _write_one_request(self, rid: str, evs: list[RequestEvent]) -> None:
        api = [e for e in evs if e.kind in _API]
        core = [e for e in evs if e.kind in _JOURNEY]
        trace_id = self._trace_id()
        rid_attr = _attr("gen_ai.request.id", rid)
        api_span_id = None
        off = self.epoch_offset_ns
        if api:
            api_span_id = self._span_id()
            api_events = [f'{{"timeUnixNano":"{off + int(e.ts_ns)}","name":"{e.kind}","attributes":['
                          + _attr("event.ts.monotonic", int(e.ts_ns) / 1e9) + "]}" for e in api]
            aborted = any(e.kind == ABORTED for e in api)
            status = '{"code":2}' if aborted else "{}"
            self._add_pending(SCOPE_API, (
                f'{{"traceId":"{trace_id}","spanId":"{api_span_id}","name":"llm_request","kind":{KIND_SERVER},'
                f'"startTimeUnixNano":"{off + int(api[0].ts_ns)}","endTimeUnixNano":"{off + int(api[-1].ts_ns)}",'
                f'"attributes":[{rid_attr}],"events":[' + ",".join(api_events) + f'],"status":{status}}}'))
        if core:
            hw = 0
            out = []
            for e in core:
                prompt = int(e.num_prompt_tokens)
                if e.kind == FIRST_TOKEN or e.num_output_tokens > 0:
                    hw = prompt
                else:
                    hw = max(hw, min(int(e.num_computed_tokens), prompt))
                name = e.kind.split(".", 1)[1]
                phase = "WAITING" if e.kind == QUEUED else ("PREFILL" if e.num_output_tokens == 0 else "DECODE")
                attrs = [_attr("event.type", name), _attr("ts.monotonic", int(e.ts_ns) / 1e9),
                         _attr("ts.monotonic_ns", int(e.ts_ns))]
                if e.step_id is not None:
                    attrs.append(_attr("scheduler.step", int(e.step_id)))
                attrs += [_attr("phase", phase), _attr("prefill.done_tokens", hw),
                          _attr("prefill.total_tokens", prompt),
                          _attr("decode.done_tokens", int(e.num_output_tokens)),
                          _attr("decode.max_tokens", int(e.max_tokens)),
                          _attr("num_preemptions", int(e.num_preemptions))]
                if e.kind == SCHEDULED and e.schedule_kind:
                    attrs.append(_attr("schedule.kind", str(e.schedule_kind).upper()))
                if e.kind == FINISHED and e.finish_status:
                    attrs.append(_attr("finish.status", FINISH_STATUS.get(e.finish_status, e.finish_status)))
                out.append(f'{{"timeUnixNano":"{off + int(e.ts_ns)}","name":"{e.kind}","attributes":['
                           + ",".join(attrs) + "]}")
            parent = f'"parentSpanId":"{api_span_id}",' if api_span_id else ""
            self._add_pending(SCOPE_CORE, (
                f'{{"traceId":"{trace_id}","spanId":"{self._span_id()}",{parent}"name":"llm_core",'
                f'"kind":{KIND_INTERNAL},"startTimeUnixNano":"{off + int(core[0].ts_ns)}",'
                f'"endTimeUnixNano":"{off + int(core[-1].ts_ns)}","attributes":[{rid_attr}],"events":['
                + ",".join(out) + '],"status":{}}'))

    # -- export -------------------------------------------------------------------------------------
    def _add_pending(self, scope: str, span: str | list[str]) -> None:
        self._pending[scope].append(span)
        self._n_pending += 1

    def _export(self) -> None:
        """Write every pending span as one OTLP export line: one join, one write, one flush."""
        if not self._n_pending:
            return
        p = self._pending
        parts: list[str] = ['{"resourceSpans":[']

        def add_spans(spans: list[Any]) -> None:
            for i, sp in enumerate(spans):
                if i:
                    parts.append(",")
                if isinstance(sp, list):
                    parts.extend(sp)
                else:
                    parts.append(sp)

        if p[SCOPE_API]:
            parts.append('{"resource":' + self._resource + ',"scopeSpans":[{"scope":{"name":"vllm.api"},"spans":[')
            add_spans(p[SCOPE_API])
            parts.append("]}]}")
        engine = [s for s in (SCOPE_CORE, SCOPE_STEP) if p[s]]
        if engine:
            if p[SCOPE_API]:
                parts.append(",")
            parts.append('{"resource":' + self._resource + ',"scopeSpans":[')
            for i, scope in enumerate(engine):
                parts.append(('{"scope":{"name":"%s"},"spans":[' if i == 0 else ',{"scope":{"name":"%s"},"spans":[')
                             % scope)
                add_spans(p[scope])
                parts.append("]}")
            parts.append("]}")
        parts.append("]}\n")
        self._fh.write("".join(parts).encode("utf-8"))
        self._fh.flush()
        self._pending = {SCOPE_API: [], SCOPE_CORE: [], SCOPE_STEP: []}
        self._n_pending = 0

    def flush(self, *, close: bool = False) -> None:
        """Export everything recorded so far: closes the current scheduler_steps span (the next step opens
        a new one, as the fork does at every closure) and writes the pending spans as one line. With
        ``close`` the file is closed too (the fork's shutdown). Idempotent once closed."""
        with self._lock:
            if self._closed:
                return
            if self._span_open and self._span_events:
                self._close_span()
            self._export()
            if close:
                self._fh.close()
                self._closed = True

    def close(self) -> None:
        self.flush(close=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: trace writer is closed")
