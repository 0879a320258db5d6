"""OTEL traces in the instrumented-vLLM format: the twin's writer and the adapter that reads them back.

The twin engine is not used here: ``mini_engine`` (below) is a small vLLM-v1-like scheduler written for these
tests (decodes first, token budget, chunked prefill, paged KV, preemption by recompute), producing
StepRecords and RequestEvents with the semantics the trace format assumes.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pytest

from rooflab.data.adapters.otel import read_otel_traces
from rooflab.data.adapters.otel_journeys import JourneyEvent, reconstruct_steps
from rooflab.errors import InputError
from rooflab.twin.otel import TraceWriter
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
    StepEntry,
    StepRecord,
)
from rooflab.twin.reference_tables import journeys_from_request_events, tables_from_records

META = dict(run_id="r1", model="llama-2-7b", tp=1, hardware="H100-SXM")
EPOCH = 1_700_000_000_000_000_000
QUEUE_DELAY = 20_000  # ns from api.ARRIVED to journey.QUEUED
STEP_COLS = ["step_id", "t_start_us", "prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs",
             "prefill_logits", "decode_reqs", "decode_context", "kv_usage", "preemptions", "running", "waiting"]
REQ_COLS = ["request_id", "arrived_us", "queued_us", "scheduled_us", "first_token_us", "finished_us",
            "departed_us", "prompt_tokens", "output_tokens", "preemptions", "status"]


# ---------------------------------------------------------------------------------------------------
# a tiny vLLM-v1-like engine producing consistent records


@dataclass
class _Req:
    rid: str
    arrival: int
    prompt: int
    max_tokens: int
    computed: int = 0
    out: int = 0
    blocks: int = 0
    npre: int = 0
    events: list = field(default_factory=list)

    @property
    def num_tokens(self):
        return self.prompt + self.out

    def ev(self, kind, ts, step=None, **kw):
        self.events.append(RequestEvent(self.rid, kind, int(ts), step, num_prompt_tokens=self.prompt,
                                        num_output_tokens=self.out, num_computed_tokens=self.computed,
                                        num_preemptions=self.npre, max_tokens=self.max_tokens, **kw))


def mini_engine(specs, *, budget, kv_blocks, block=4, max_seqs=None, t0=5_000_000_000):
    """specs: (request id, arrival ns, prompt, max_tokens). Returns (records, {rid: events}, finish order)."""
    max_seqs = max_seqs or budget - 1
    reqs = [_Req(*s) for s in specs]
    pending = sorted(reqs, key=lambda r: r.arrival)
    waiting, running, records, done_order = deque(), [], [], []
    free, k, t, finished_prev = kv_blocks, 0, t0, 0
    while pending or waiting or running:
        idle = not waiting and not running
        if idle:
            t = max(t, pending[0].arrival + QUEUE_DELAY)
        while pending and pending[0].arrival + QUEUE_DELAY <= t:
            r = pending.pop(0)
            r.ev(ARRIVED, r.arrival)
            r.ev(QUEUED, r.arrival + QUEUE_DELAY, step=k)
            waiting.append(r)
        k += 1
        start = t + (10_000 if idle else 0)
        sched: dict[str, tuple] = {}
        preempted: list[str] = []
        bud = budget

        def preempt(v):
            nonlocal free, bud
            free += v.blocks
            v.blocks = 0
            v.ev(PREEMPTED, start + 500, step=k)
            v.computed, v.npre = 0, v.npre + 1
            waiting.appendleft(v)
            preempted.append(v.rid)
            if v.rid in sched:
                bud += sched.pop(v.rid)[1]

        def alloc(r, n):
            nonlocal free
            while True:
                nb = -(-(r.computed + n) // block) - r.blocks
                if nb <= free:
                    free -= nb
                    r.blocks += nb
                    return True
                victim = running.pop()
                preempt(victim)
                if victim is r:
                    return False

        for r in list(running):  # decodes first
            if r in running and r.out > 0 and r.computed == r.num_tokens - 1 and alloc(r, 1):
                sched[r.rid] = (r, 1, r.computed, r.out)
                bud -= 1
        for r in list(running):  # then running prefills / recomputes, in running order
            if r not in running or r.rid in sched or bud <= 0:
                continue
            n = min(r.num_tokens - r.computed, bud)
            if alloc(r, n):
                sched[r.rid] = (r, n, r.computed, r.out)
                bud -= n
        if not preempted:  # then waiting, FCFS
            while waiting and bud > 0 and len(running) < max_seqs:
                r = waiting[0]
                n = min(r.num_tokens - r.computed, bud)
                nb = -(-(r.computed + n) // block) - r.blocks
                if nb > free:
                    break
                waiting.popleft()
                free -= nb
                r.blocks += nb
                running.append(r)
                r.ev(SCHEDULED, start + 1_000 + 100 * len(sched), step=k,
                     schedule_kind="RESUME" if r.npre else "FIRST")
                sched[r.rid] = (r, n, r.computed, r.out)
                bud -= n
        total = sum(v[1] for v in sched.values())
        step_ns = 2_000_000 + 5_000 * total + 997 * k % 3_000
        entries = [StepEntry(rid, "PREFILL" if o == 0 else "DECODE", r.prompt, c, o, n)
                   for rid, (r, n, c, o) in sched.items()]
        pf = [e for e in entries if e.num_output_tokens == 0]
        records.append(StepRecord(
            step_id=k, ts_start_ns=start, ts_end_ns=start + step_ns, duration_us=300 + k % 7,
            running_depth=len(running), waiting_depth=len(waiting), num_prefill_reqs=len(pf),
            num_decode_reqs=len(entries) - len(pf), scheduled_tokens=total,
            prefill_tokens=sum(e.scheduled_tokens for e in pf),
            decode_tokens=total - sum(e.scheduled_tokens for e in pf), num_finished=finished_prev,
            num_preempted=len(preempted), kv_usage=(kv_blocks - free) / kv_blocks, kv_blocks_total=kv_blocks,
            kv_blocks_free=free, entries=entries, preempted_ids=list(preempted)))
        t = start + step_ns
        finished_prev = 0
        for r, n, _, _ in sched.values():
            r.computed += n
            if r.computed == r.num_tokens:
                r.out += 1
                if r.out == 1:
                    r.ev(FIRST_TOKEN, t, step=k)
                if r.out >= r.max_tokens:
                    r.ev(FINISHED, t + 10, step=k, finish_status="length")
                    free += r.blocks
                    r.blocks = 0
                    running.remove(r)
                    r.ev(DEPARTED, t + 200_000 + 3_000 * r.out)
                    finished_prev += 1
                    done_order.append((k, r.rid))
    return records, {r.rid: r.events for r in reqs}, done_order


def run_scenario(specs, **kw):
    return mini_engine(specs, **kw)


def write_trace(path, records, events, done, **kw):
    """Steps and requests interleaved the way a running twin would: a request is written when it departs."""
    by_step = {}
    for k, rid in done:
        by_step.setdefault(k, []).append(rid)
    kw.setdefault("epoch_offset_ns", EPOCH)
    kw.setdefault("seed", 7)
    with TraceWriter(path, **kw) as w:
        for rec in records:
            w.write_step(rec)
            for rid in by_step.get(rec.step_id, []):
                w.write_request(events[rid])
    return path


# The hand scenario: budget 8 tokens, 8 KV blocks of 4 tokens.
#   a (prompt 12) is chunked over steps 1-2 (8 + 4 tokens, 4 more from b in step 2),
#   c arrives during step 2; the cache runs out in step 5 and c (last in the running list) is preempted
#   while decoding (1 output token), then resumes in step 6 as a recompute of 5 + 1 tokens; c finishes in
#   step 8, the engine goes idle, d arrives late and runs in steps 9-10.
SMALL = [("a", 4_999_000_000, 12, 4), ("b", 4_999_500_000, 7, 5), ("c", 5_002_500_000, 5, 4),
         ("d", 5_200_000_000, 3, 2)]
SMALL_KW = dict(budget=8, kv_blocks=8, block=4)


@pytest.fixture(scope="module")
def small():
    return run_scenario(SMALL, **SMALL_KW)


def _expected(records, events):
    return tables_from_records(records, list(events.values()), **META)


# ---------------------------------------------------------------------------------------------------
# the scenario itself (so a reader of the test can check the numbers by hand)


def test_small_scenario_is_what_the_comments_say(small):
    records, events, _ = small
    by = {r.step_id: r for r in records}
    assert 9 <= len(records) <= 16
    assert [(e.request_id, e.scheduled_tokens) for e in by[1].entries] == [("a", 8)]
    assert sorted((e.request_id, e.scheduled_tokens) for e in by[2].entries) == [("a", 4), ("b", 4)]
    assert sum(r.num_preempted for r in records) == 1
    pre = [r for r in records if r.num_preempted]
    assert pre[0].preempted_ids == ["c"]
    kinds = [e.kind for e in events["c"]]
    assert kinds.count(PREEMPTED) == 1 and kinds.count(SCHEDULED) == 2
    # the engine goes idle before d arrives
    assert by[9].ts_start_ns - by[8].ts_end_ns > 100_000_000
    assert all(by[k + 1].ts_start_ns == by[k].ts_end_ns for k in by if k + 1 in by and k != 8)


# ---------------------------------------------------------------------------------------------------
# format


BATCH_KEYS = ["step.id", "step.ts_start_ns", "step.ts_end_ns", "step.duration_us", "queue.running_depth",
              "queue.waiting_depth", "batch.num_prefill_reqs", "batch.num_decode_reqs", "batch.scheduled_tokens",
              "batch.prefill_tokens", "batch.decode_tokens", "batch.num_finished", "batch.num_preempted",
              "kv.usage_gpu_ratio", "kv.blocks_total_gpu", "kv.blocks_free_gpu"]
SNAP_KEYS = ["step.id", "request.id", "request.phase", "request.num_prompt_tokens", "request.num_computed_tokens",
             "request.num_output_tokens", "request.num_preemptions", "request.scheduled_tokens_this_step",
             "kv.blocks_allocated_gpu", "kv.blocks_cached_gpu"]


def test_lines_are_otlp_json_exports_in_the_fork_layout(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done, closure_interval=4)
    lines = path.read_text().splitlines()
    assert len(lines) >= 3
    scopes, span_names, ev = set(), set(), {}
    for line in lines:
        obj = json.loads(line)
        for rs in obj["resourceSpans"]:
            res = {a["key"]: a["value"] for a in rs["resource"]["attributes"]}
            assert res["service.name"] == {"stringValue": "vllm"}
            for ss in rs["scopeSpans"]:
                scopes.add(ss["scope"]["name"])
                for sp in ss["spans"]:
                    span_names.add((ss["scope"]["name"], sp["name"].rstrip("0123456789")))
                    assert len(sp["traceId"]) == 32 and len(sp["spanId"]) == 16
                    assert isinstance(sp["startTimeUnixNano"], str) and sp["kind"] in (1, 2)
                    for e in sp["events"]:
                        assert isinstance(e["timeUnixNano"], str)
                        ev.setdefault(e["name"], []).append((sp, e))
    assert scopes == {"vllm.api", "vllm.scheduler", "vllm.scheduler.step"}
    assert span_names == {("vllm.api", "llm_request"), ("vllm.scheduler", "llm_core"),
                          ("vllm.scheduler.step", "scheduler_steps_")}
    assert set(ev) == {"step.BATCH_SUMMARY", "step.REQUEST_SNAPSHOT", "api.ARRIVED", "api.DEPARTED",
                       "journey.QUEUED", "journey.SCHEDULED", "journey.FIRST_TOKEN", "journey.PREEMPTED",
                       "journey.FINISHED"}
    # BATCH_SUMMARY: exactly the fork's attributes, ints string-encoded, ts_end - ts_start = duration_us
    sp, b = ev["step.BATCH_SUMMARY"][0]
    assert [a["key"] for a in b["attributes"]] == BATCH_KEYS
    a = {x["key"]: x["value"] for x in b["attributes"]}
    assert isinstance(a["step.id"]["intValue"], str) and "doubleValue" in a["kv.usage_gpu_ratio"]
    assert int(a["step.ts_end_ns"]["intValue"]) - int(a["step.ts_start_ns"]["intValue"]) == \
        int(a["step.duration_us"]["intValue"]) * 1000
    assert int(b["timeUnixNano"]) == EPOCH + int(a["step.ts_end_ns"]["intValue"])
    span_attrs = {x["key"] for x in sp["attributes"]}
    assert span_attrs == {"scheduler.span_sequence", "scheduler.step_range_start", "scheduler.closure_interval",
                          "scheduler.step_range_end"}
    _, s = ev["step.REQUEST_SNAPSHOT"][0]
    assert [x["key"] for x in s["attributes"]] == SNAP_KEYS
    # journey events: ts.monotonic in seconds (double) and ns, the fork's attribute names
    sp, q = ev["journey.SCHEDULED"][0]
    qa = {x["key"]: x["value"] for x in q["attributes"]}
    assert set(qa) == {"event.type", "ts.monotonic", "ts.monotonic_ns", "scheduler.step", "phase",
                       "prefill.done_tokens", "prefill.total_tokens", "decode.done_tokens", "decode.max_tokens",
                       "num_preemptions", "schedule.kind"}
    assert qa["ts.monotonic"]["doubleValue"] == pytest.approx(int(qa["ts.monotonic_ns"]["intValue"]) / 1e9)
    assert qa["schedule.kind"]["stringValue"] in ("FIRST", "RESUME")
    assert {x["key"] for x in sp["attributes"]} == {"gen_ai.request.id"}
    fin = {x["key"]: x["value"] for x in ev["journey.FINISHED"][0][1]["attributes"]}
    assert fin["finish.status"] == {"stringValue": "length"}
    # the core span is the API span's child in the same trace
    api_spans = {sp["traceId"]: sp["spanId"] for sp, _ in ev["api.ARRIVED"]}
    core = ev["journey.QUEUED"][0][0]
    assert core["parentSpanId"] == api_spans[core["traceId"]]
    _, arr = ev["api.ARRIVED"][0]
    assert [x["key"] for x in arr["attributes"]] == ["event.ts.monotonic"]
    # the scheduler_steps span closes every closure_interval steps
    seqs = sorted(int({x["key"]: x["value"] for x in sp["attributes"]}["scheduler.span_sequence"]["intValue"])
                  for sp, _ in {id(sp): (sp, e) for sp, e in ev["step.BATCH_SUMMARY"]}.values())
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == math.ceil(len(records) / 4)


# ---------------------------------------------------------------------------------------------------
# round trip


def _assert_steps_equal(got, exp, cols=STEP_COLS):
    g = got.set_index("step_id").sort_index()
    e = exp.set_index("step_id").sort_index()
    assert list(g.index) == list(e.index)
    for c in cols:
        if c == "step_id":
            continue
        np.testing.assert_allclose(g[c].to_numpy(dtype=float), e[c].to_numpy(dtype=float), rtol=1e-12,
                                   atol=1e-6, equal_nan=True, err_msg=c)


def _assert_requests_equal(got, exp):
    g = got.set_index("request_id").sort_index()
    e = exp.set_index("request_id").sort_index()
    assert list(g.index) == list(e.index)
    for c in REQ_COLS[1:]:
        if c == "status":
            assert list(g[c]) == list(e[c])
        else:
            np.testing.assert_allclose(g[c].to_numpy(dtype=float), e[c].to_numpy(dtype=float), atol=1e-3,
                                       equal_nan=True, err_msg=c)


def test_round_trip_reproduces_the_records(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done, closure_interval=4)
    got = read_otel_traces(path, **META)
    exp = _expected(records, events)
    _assert_steps_equal(got.steps, exp.steps)
    _assert_requests_equal(got.requests, exp.requests)
    assert set(got.steps["agg_source"]) == {"snapshot"}
    # cycle time = the true step time wherever it is not excluded; the idle gap before d and the last step
    # (no successor) are excluded
    st = got.steps.set_index("step_id")["step_time_us"]
    true = exp.steps.set_index("step_id")["step_time_us"]
    ok = st.notna()
    np.testing.assert_allclose(st[ok], true[ok], rtol=1e-12)
    rep = got.report
    assert rep["cycle_times_excluded"] == {"engine may have gone idle": 1, "non-consecutive step ids": 1}
    assert rep["cycle_times_computed"] == len(records) - 2
    assert rep["requests_kept"] == 4 and rep["requests_excluded"] == {}
    assert rep["truncated_last_lines"] == 0 and rep["bad_lines_skipped"] == 0
    assert rep["reconstruction_check"]["decode_reqs_exact"] == 1.0
    # by hand: step 1 is a's first 8-token chunk (causal pairs 8*9/2 = 36, no logits); step 2 finishes a
    # (4 tokens at context 8: 4*8 + 4*5/2 = 42 pairs) and starts b (4 tokens: 10 pairs)
    s = got.steps.set_index("step_id")
    assert (s.loc[1, "prefill_tokens"], s.loc[1, "prefill_attn_pairs"], s.loc[1, "prefill_logits"]) == (8, 36, 0)
    assert (s.loc[2, "prefill_reqs"], s.loc[2, "prefill_tokens"], s.loc[2, "prefill_context"]) == (2, 8, 8)
    assert (s.loc[2, "prefill_attn_pairs"], s.loc[2, "prefill_logits"]) == (52, 1)
    # the preempted request resumes as a recompute of prompt + outputs from context 0
    r = got.requests.set_index("request_id")
    assert r.loc["c", "preemptions"] == 1 and r.loc["a", "preemptions"] == 0
    assert (r.loc["a", "prompt_tokens"], r.loc["a", "output_tokens"]) == (12, 4)
    assert (r["status"] == "ok").all()
    ev_c = {e.kind: e for e in events["c"]}
    assert r.loc["c", "arrived_us"] == ev_c[ARRIVED].ts_ns / 1e3
    assert r.loc["c", "departed_us"] == pytest.approx(ev_c[DEPARTED].ts_ns / 1e3, abs=1e-3)


def test_request_table_feeds_alpha_fit(small, tmp_path):
    from rooflab.fit.beta import fit_alpha

    records, events, done = small
    got = read_otel_traces(write_trace(tmp_path / "t.jsonl", records, events, done), **META)
    fit = fit_alpha(got.requests, n_boot=20)
    assert fit.n_requests == 4
    # α0 = QUEUED − ARRIVED = 20 µs; DEPARTED − FINISHED = 199.99 µs + 3 µs per output token (mini_engine)
    assert fit.alpha[0] == pytest.approx(20.0, abs=1e-3)
    assert fit.alpha[1] == pytest.approx(199.99, abs=1e-3) and fit.alpha[2] == pytest.approx(3.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# robustness


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_truncated_last_line_is_skipped_and_counted(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done, closure_interval=4)
    full = read_otel_traces(path, **META)
    lines = _lines(path)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    got = read_otel_traces(cut, **META)
    assert got.report["truncated_last_lines"] == 1 and got.report["bad_lines_skipped"] == 0
    assert got.report["lines_ok"] == len(lines) - 1
    assert 0 < len(got.steps) < len(full.steps)


def test_duplicate_exports_are_dropped(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done, closure_interval=4)
    lines = _lines(path)
    dup = tmp_path / "dup.jsonl"
    dup.write_bytes(b"".join(lines[:2] + lines[1:] + lines[-1:]))
    got, ref = read_otel_traces(dup, **META), read_otel_traces(path, **META)
    assert got.report["duplicate_spans_dropped"] > 0
    _assert_steps_equal(got.steps, ref.steps, STEP_COLS + ["step_time_us"])
    _assert_requests_equal(got.requests, ref.requests)
    # the same file twice is the same run, once
    twice = read_otel_traces([path, path], **META)
    _assert_steps_equal(twice.steps, ref.steps, STEP_COLS + ["step_time_us"])
    assert twice.report["files"] == 2


def test_events_out_of_order_are_sorted(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done, closure_interval=3)
    rng = random.Random(3)
    out = []
    for line in reversed(_lines(path)):
        obj = json.loads(line)
        for rs in obj["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                rng.shuffle(ss["spans"])
                for sp in ss["spans"]:
                    rng.shuffle(sp["events"])
        out.append(json.dumps(obj) + "\n")
    shuffled = tmp_path / "shuf.jsonl"
    shuffled.write_text("".join(out))
    got, ref = read_otel_traces(shuffled, **META), read_otel_traces(path, **META)
    _assert_steps_equal(got.steps, ref.steps, STEP_COLS + ["step_time_us"])
    _assert_requests_equal(got.requests, ref.requests)


def _edit_events(path, out, drop):
    """Rewrite a trace without the events for which drop(span, event) is true."""
    lines = []
    for line in _lines(path):
        obj = json.loads(line)
        for rs in obj["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for sp in ss["spans"]:
                    sp["events"] = [e for e in sp["events"] if not drop(sp, e)]
        lines.append(json.dumps(obj) + "\n")
    out.write_text("".join(lines))
    return out


def _rid(sp):
    return next(a["value"]["stringValue"] for a in sp["attributes"] if a["key"] == "gen_ai.request.id")


def test_requests_missing_events_are_excluded_with_reasons(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done)
    edited = _edit_events(path, tmp_path / "e.jsonl", lambda sp, e: (
        (e["name"] == "journey.FIRST_TOKEN" and _rid(sp) == "a")
        or (e["name"] == "api.DEPARTED" and _rid(sp) == "b")))
    got = read_otel_traces(edited, **META)
    assert sorted(got.requests["request_id"]) == ["c", "d"]
    assert got.report["requests_excluded"] == {"missing journey.FIRST_TOKEN": 1, "missing api.DEPARTED": 1}
    # b's journey is complete, so it still counts in the step reconstruction; steps come from snapshots
    assert len(got.steps) == len(records)


def test_events_in_an_impossible_order_exclude_the_request(small, tmp_path):
    records, events, done = small
    evs = [RequestEvent(e.request_id, e.kind, e.ts_ns, e.step_id, e.num_prompt_tokens, e.num_output_tokens,
                        e.num_computed_tokens, e.num_preemptions, e.schedule_kind, e.finish_status, e.max_tokens)
           for e in events["d"]]
    fin = next(e for e in evs if e.kind == FINISHED)
    fin.ts_ns = next(e for e in evs if e.kind == QUEUED).ts_ns - 1  # finished before queued
    bad = dict(events, d=evs)
    got = read_otel_traces(write_trace(tmp_path / "t.jsonl", records, bad, done), **META)
    assert "d" not in set(got.requests["request_id"])
    assert got.report["requests_excluded"] == {"events out of lifecycle order": 1}


def test_aborted_request_is_kept_with_its_status(tmp_path):
    evs = [RequestEvent("x", ARRIVED, 1_000_000), RequestEvent("x", QUEUED, 1_020_000, 0, 9, max_tokens=4),
           RequestEvent("x", FINISHED, 2_000_000, 0, 9, finish_status="abort", max_tokens=4),
           RequestEvent("x", ABORTED, 2_100_000)]
    with TraceWriter(tmp_path / "a.jsonl", epoch_offset_ns=EPOCH, seed=1) as w:
        w.write_request(evs)
    got = read_otel_traces(tmp_path / "a.jsonl", **META)
    r = got.requests.set_index("request_id").loc["x"]
    assert r["status"] == "aborted" and math.isnan(r["departed_us"]) and r["aborted_us"] == 2_100.0
    assert r["queued_us"] == 1_020.0 and len(got.steps) == 0


def test_one_malformed_middle_line_is_skipped(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done, closure_interval=2)
    lines = _lines(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:2] + [b'{"resourceSpans": [ this is not json\n'] + lines[2:]))
    got = read_otel_traces(bad, **META)
    assert got.report["bad_lines_skipped"] == 1 and got.report["first_bad_line"].endswith(":3")
    assert len(got.steps) == len(records)


def test_many_bad_lines_raise_naming_file_and_line(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done, closure_interval=2)
    lines = _lines(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:1] + [b"garbage\n", b"{}\n"] + lines[1:]))
    with pytest.raises(InputError) as ei:
        read_otel_traces(bad, **META)
    msg = str(ei.value)
    assert "\n" not in msg and "bad.jsonl" in msg and "line 2" in msg


@pytest.mark.parametrize("content", [b"", b"\n\n", bytes(range(256)) * 8, b"hello world\nnot json\n",
                                     b'{"a": 1}\n[1, 2]\n'])
def test_garbage_or_empty_file_raises_naming_the_file(tmp_path, content):
    p = tmp_path / "junk.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError) as ei:
        read_otel_traces(p, **META)
    assert "junk.jsonl" in str(ei.value) and "\n" not in str(ei.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl"):
        read_otel_traces(tmp_path / "nope.jsonl", **META)


def test_string_or_int_encoded_ints_and_foreign_layout(tmp_path):
    """ints as JSON numbers or strings, events under an unexpected scope: the reader dispatches on names."""
    def attrs(**kv):
        out = []
        for k, v in kv.items():
            k = k.replace("__", ".")
            out.append({"key": k, "value": {"doubleValue": v} if isinstance(v, float) else
                        ({"stringValue": v} if isinstance(v, str) else {"intValue": v if k != "step.id" else str(v)})})
        return out

    def summary(i, t):
        return {"timeUnixNano": "1", "name": "step.BATCH_SUMMARY", "attributes": attrs(
            step__id=i, step__ts_start_ns=t, step__ts_end_ns=t + 300_000, step__duration_us=300,
            queue__running_depth=1, queue__waiting_depth=0, batch__num_prefill_reqs=0, batch__num_decode_reqs=1,
            batch__scheduled_tokens=1, batch__prefill_tokens=0, batch__decode_tokens=1, batch__num_finished=0,
            batch__num_preempted=0, kv__usage_gpu_ratio=0.5, kv__blocks_total_gpu=100, kv__blocks_free_gpu=50)}

    line = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "something.else"}, "spans": [
        {"traceId": "1" * 32, "spanId": "2" * 16, "name": "x", "events": [summary(7, 10_000_000),
                                                                          summary(8, 25_000_000)]}]}]}]}
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps(line) + "\n")
    got = read_otel_traces(p, **META)
    s = got.steps.set_index("step_id")
    assert list(s.index) == [7, 8] and s.loc[7, "step_time_us"] == 15_000.0
    assert set(s["agg_source"]) == {"summary"}
    # Σ decode context from the KV usage: 0.5*100*16 − 0 − 1 − 8*1 = 791
    assert s.loc[7, "decode_context"] == 791.0 and s.loc[7, "decode_reqs"] == 1


# ---------------------------------------------------------------------------------------------------
# journey reconstruction


def _bigger():
    rng = random.Random(11)
    specs, t = [], 5_000_000_000
    for i in range(70):
        t += int(rng.expovariate(1 / 4_000_000))
        specs.append((f"q{i:03d}", t, rng.choice([3, 17, 40, 90, 150, 260]), rng.randint(1, 40)))
    return run_scenario(specs, budget=64, kv_blocks=120, block=8, max_seqs=24)


@pytest.fixture(scope="module")
def bigger():
    return _bigger()


def test_bigger_scenario_exercises_chunking_and_preemption(bigger):
    records, events, _ = bigger
    assert sum(r.num_preempted for r in records) >= 3
    chunked = {e.request_id for r in records for e in r.entries
               if e.num_output_tokens == 0 and e.num_computed_tokens > 0}
    assert len(chunked) >= 5
    assert len(records) > 150


def test_reconstruction_without_step_events_matches_the_records(bigger, tmp_path):
    records, events, done = bigger
    path = write_trace(tmp_path / "t.jsonl", records, events, done, sample_rate=0.0)  # no step events at all
    got = read_otel_traces(path, **META, max_num_batched_tokens=64)
    exp = _expected(records, events).steps.set_index("step_id")
    s = got.steps.set_index("step_id")
    assert set(s["agg_source"]) == {"journey"} and s["step_time_us"].isna().all()
    worked = exp[(exp["prefill_reqs"] + exp["decode_reqs"]) > 0]
    assert list(s.index) == list(worked.index)  # every step with work, and only those
    # membership is teacher-forced: decode counts and Σ decode context exact, prefill counts exact
    for c in ("decode_reqs", "decode_context", "prefill_reqs", "preemptions"):
        np.testing.assert_array_equal(s[c].to_numpy(), worked[c].to_numpy(), err_msg=c)
    # prefill tokens: greedy under the budget reproduces this engine's chunking exactly (decodes first, then
    # prefills in batch order); a real engine may differ a little, so report the agreement
    err = (s["prefill_tokens"] - worked["prefill_tokens"]).abs()
    print(f"reconstruction: prefill tokens exact in {100 * (err == 0).mean():.1f}% of steps, "
          f"rel. error {100 * err.sum() / worked['prefill_tokens'].sum():.4f}%")
    assert err.sum() == 0
    for c in ("prefill_context", "prefill_attn_pairs", "prefill_logits"):
        np.testing.assert_array_equal(s[c].to_numpy(), worked[c].to_numpy(), err_msg=c)
    # and the requests do not need step events at all
    _assert_requests_equal(got.requests, _expected(records, events).requests)


def test_sampled_summaries_without_snapshots_use_the_journeys(bigger, tmp_path):
    records, events, done = bigger
    path = write_trace(tmp_path / "t.jsonl", records, events, done, sample_rate=0.3, rich_subsample_rate=0.0,
                       seed=5)
    got = read_otel_traces(path, **META, max_num_batched_tokens=64)
    s = got.steps.set_index("step_id")
    has = s["t_start_us"].notna()
    assert 0.2 < has.mean() < 0.4 and set(s["agg_source"]) == {"journey"}
    chk = got.report["reconstruction_check"]
    # against BATCH_SUMMARY counts, which follow the fork's phase rule (a recompute counts as decode)
    assert chk["steps_compared"] == int(has.sum()) and chk["decode_reqs_exact"] > 0.9
    exp = _expected(records, events).steps.set_index("step_id")
    st = s["step_time_us"].dropna()
    assert len(st) > 10
    np.testing.assert_allclose(st, exp.loc[st.index, "step_time_us"], rtol=1e-12)
    np.testing.assert_array_equal(s.loc[has, "running"], exp.loc[s.index[has], "running"])


def test_reconstruct_steps_rules():
    """One request chunked under the budget next to a decoding one, then preempted while decoding and
    resumed as a recompute of prompt + outputs."""
    J = JourneyEvent
    a = [J("QUEUED", 1, 0, 0, 20), J("SCHEDULED", 2, 1, 0, 20), J("FIRST_TOKEN", 3, 3, 20, 20, 1),
         J("PREEMPTED", 4, 6, 20, 20, 3, num_preemptions=1),
         J("SCHEDULED", 5, 8, 20, 20, 3, num_preemptions=1, schedule_kind="RESUME"),
         J("FINISHED", 6, 12, 20, 20, 6, num_preemptions=1, finish_status="length")]
    b = [J("QUEUED", 1, 0, 0, 4), J("SCHEDULED", 1, 1, 0, 4), J("FIRST_TOKEN", 3, 1, 4, 4, 1),
         J("FINISHED", 6, 9, 4, 4, 9, finish_status="length")]
    rec = reconstruct_steps({"a": a, "b": b}, max_num_batched_tokens=10)
    e = rec.entries
    got = {(int(r.step_id), r.request_id): (r.phase, r.tokens, r.context_before) for r in e.itertuples()}
    # step 1: b's whole prompt (single-step, exact: 4) and a's first chunk: 10 − 4 = 6
    assert got[(1, "b")] == ("prefill", 4, 0) and got[(1, "a")] == ("prefill", 6, 0)
    # step 2: b decodes (context 4), a takes the rest of the budget: 9; step 3: a's last 5 tokens
    assert got[(2, "b")] == ("decode", 1, 4) and got[(2, "a")] == ("prefill", 9, 6)
    assert got[(3, "a")] == ("prefill", 5, 15)
    # a decodes in steps 4-5 (contexts 20, 21), is preempted in step 6, absent in 6-7
    assert got[(4, "a")] == ("decode", 1, 20) and got[(5, "a")] == ("decode", 1, 21)
    assert (6, "a") not in got and (7, "a") not in got
    # resumed at 8 with 3 outputs and 6 at FINISHED in step 12: 5 active steps make 3 tokens, so 2 decode
    # steps (11, 12) and a 3-step recompute of 20 + 3 tokens from context 0 (8, 9 next to b's decode: 9
    # each; 10: the last 5)
    assert [got[(k, "a")] for k in (8, 9, 10)] == [("prefill", 9, 0), ("prefill", 9, 9), ("prefill", 5, 18)]
    assert got[(11, "a")] == ("decode", 1, 23) and got[(12, "a")] == ("decode", 1, 24)
    assert rec.preempted == {6: 1} and rec.skipped == {} and rec.inconsistent == {}
    assert (e["prompt_tokens"][(e["request_id"] == "a") & (e["step_id"] == 10)] == 23).all()
    # b decodes steps 2..9: contexts 4..11
    assert [got[(k, "b")][2] for k in range(2, 10)] == list(range(4, 12))


def test_journeys_from_request_events_match_what_the_trace_carries(small, tmp_path):
    records, events, done = small
    j, api = journeys_from_request_events(list(events.values()))
    path = write_trace(tmp_path / "t.jsonl", records, events, done)
    rec_direct = reconstruct_steps(j, 8).entries
    got = read_otel_traces(path, **META, max_num_batched_tokens=8)
    assert got.report["reconstruction_check"]["prefill_tokens_exact"] == 1.0
    assert set(api) == set(events) and len(rec_direct) == sum(len(r.entries) for r in records)


# ---------------------------------------------------------------------------------------------------
# writer speed (reported, loosely bounded)


def test_writer_throughput(tmp_path):
    rng = random.Random(0)
    entries = [StepEntry(f"req-{i}", "DECODE", 500 + i, 600 + i, 100 + i, 1) for i in range(100)]
    recs = [StepRecord(k, 10_000_000 * k, 10_000_000 * k + 9_000_000, 400, 100, 5, 0, 100, 100, 0, 100, 0, 0,
                       rng.random(), 5000, 2500, entries) for k in range(1, 2001)]
    light = [StepRecord(r.step_id, r.ts_start_ns, r.ts_end_ns, 400, 100, 5, 0, 100, 100, 0, 100, 0, 0, 0.5,
                        5000, 2500) for r in recs]
    res = {}
    for name, rs, kw in (("summary+100 snapshots", recs, {}), ("summary only", light, {}),
                         ("1% rich subsample", recs, {"rich_subsample_rate": 0.01})):
        t = time.perf_counter()
        with TraceWriter(tmp_path / f"{len(res)}.jsonl", seed=1, **kw) as w:
            for r in rs:
                w.write_step(r)
        res[name] = len(rs) / (time.perf_counter() - t)
    print("writer steps/s:", {k: round(v) for k, v in res.items()})
    assert res["summary only"] > 5_000 and res["summary+100 snapshots"] > 500


def test_reused_step_ids_with_other_times_are_flagged(small, tmp_path):
    records, events, done = small
    path = write_trace(tmp_path / "t.jsonl", records, events, done)
    later = [StepRecord(**{**{f: getattr(r, f) for f in r.__slots__}, "ts_start_ns": r.ts_start_ns + 10**12,
                           "ts_end_ns": r.ts_end_ns + 10**12}) for r in records[:3]]
    other = write_trace(tmp_path / "u.jsonl", later, {}, [], seed=8)
    got = read_otel_traces([path, other], **META)
    assert got.report["conflicting_step_ids_dropped"] == 3  # (their snapshots carry no time: plain duplicates)
    assert len(got.steps) == len(records)
