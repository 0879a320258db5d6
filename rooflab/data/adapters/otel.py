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
* Robustness (SPEC §11): a last line cut mid-write is skipped and counted; malformed lines elsewhere are
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
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from rooflab.data.adapters.step_records import BLOCK_SIZE
from rooflab.data.tables import aggregate_entries, validate_requests, validate_steps
from rooflab.errors import InputError
from rooflab.files import input_files

try:  # orjson ships with the pinned environment (prefect); json is the fallback
    import orjson

    _loads = orjson.loads
    _JSON_ERRORS: tuple = (orjson.JSONDecodeError, ValueError, TypeError)
except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSON_ERRORS = (ValueError, TypeError)

MAX_BAD_FRACTION = 0.05
JOURNEY_NAMES = ("QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED")
_RANK = {n: i for i, n in enumerate(JOURNEY_NAMES)}
_FINISH_TO_STATUS = {"stopped": "ok", "stop": "ok", "length": "ok", "aborted": "aborted", "abort": "aborted",
                     "error": "error", "ignored": "ignored"}
_AGG_COLS = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
             "decode_reqs", "decode_context")


@dataclass
class OtelTables:
    steps: pd.DataFrame
    requests: pd.DataFrame
    report: dict = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class JourneyEvent:
    """One ``journey.*`` event of a request, parsed (name without the ``journey.`` prefix)."""

    name: str
    ts_ns: int
    step: int | None
    prefill_done: int = 0
    prefill_total: int = 0
    decode_done: int = 0
    decode_max: int = 0
    num_preemptions: int = 0
    schedule_kind: str = ""
    finish_status: str = ""


@dataclass
class Reconstruction:
    """Output of :func:`reconstruct_steps`: per-(step, request) entries and what could not be used."""

    entries: pd.DataFrame  # step_id, request_id, phase, tokens, context_before, prompt_tokens
    preempted: dict[int, int]  # step id -> PREEMPTED events
    skipped: dict[str, int]  # reason -> requests left out of the reconstruction
    inconsistent: dict[str, int]  # reason -> segments whose token counts did not add up


def _sort_key(e: JourneyEvent):
    return (e.ts_ns, -1 if e.step is None else e.step, _RANK.get(e.name, 9))


def entry_phase(prompt, computed, output):
    """Vectorised phase rule (see the module docstring): returns (is_decode, effective prompt)."""
    prompt = np.asarray(prompt, dtype=np.float64)
    computed = np.asarray(computed, dtype=np.float64)
    output = np.asarray(output, dtype=np.float64)
    is_decode = (output > 0) & (computed >= prompt + output - 1)
    return is_decode, prompt + output


# =============================================================================================
# journey reconstruction


def reconstruct_steps(journeys: Mapping[str, Sequence[JourneyEvent]],
                      max_num_batched_tokens: int | None) -> Reconstruction:
    """Teacher-forced batch membership from journey events (SPEC §2).

    Each request is active from its SCHEDULED step: its first prefill runs through the FIRST_TOKEN step,
    then it decodes one token per step through FINISHED (inclusive) or to the step before a PREEMPTED
    (preemption by recompute: the request is not in the batch of the step that preempts it). A RESUME with
    ``d`` output tokens recomputes prompt + d tokens from context 0; the number of recompute steps follows
    from the output tokens made by the segment's end (one per decode step, plus one by the last recompute
    chunk). A prefill that spans one step gets its exact tokens; a multi-step one is distributed greedily in
    step order: in each step, after one token per decode and the known tokens of single-step prefills and
    last chunks, the other active prefills in order of joining the batch take what the
    ``max_num_batched_tokens`` budget leaves (at least 1 token, keeping 1 per remaining step); a segment's
    last step takes its remainder. Without a budget the tokens are split evenly. Prefix-cache hits are
    not visible in journeys and are assumed absent.
    """
    skipped: Counter = Counter()
    bad: Counter = Counter()
    preempted: Counter = Counter()
    dec: list[tuple[str, int, int, int, int]] = []  # rid, start, end, out0, prompt
    pf: list[list] = []  # [rid, start, end, need|None, prompt_eff, join_key, done]

    for rid, evs in journeys.items():
        evs = sorted(evs, key=_sort_key)
        if not any(e.name == "SCHEDULED" for e in evs):
            skipped["never scheduled"] += 1
            continue
        if any(e.step is None for e in evs if e.name != "QUEUED"):
            skipped["journey event without scheduler.step"] += 1
            continue
        prompt = max((e.prefill_total for e in evs), default=0)
        state = None  # None | "prefill" | "decode" | "resume"
        start = 0
        join = (0, 0)
        done0 = 0
        d_r = 0
        out0 = 0
        ok = True
        local_dec, local_pf = [], []

        def close_resume(end_step: int, d_end: int):
            length = end_step - start + 1
            if length < 1:
                return
            produced = d_end - d_r
            if produced >= 1:
                l_rc, need = length - (produced - 1), prompt + d_r
            else:
                l_rc, need = length, None
            if l_rc < 1:
                bad["resume: more output tokens than active steps"] += 1
                l_rc = 1
            local_pf.append([rid, start, start + l_rc - 1, need, prompt + d_r, join, 0])
            if start + l_rc <= end_step:
                local_dec.append((rid, start + l_rc, end_step, d_r + 1, prompt))

        for e in evs:
            if e.name == "PREEMPTED":
                preempted[e.step] += 1
            if e.name == "SCHEDULED":
                if state is not None:
                    ok = False
                    break
                start, join = e.step, (e.step, e.ts_ns)
                if e.decode_done > 0:
                    state, d_r = "resume", e.decode_done
                else:
                    state, done0 = "prefill", e.prefill_done
            elif e.name == "FIRST_TOKEN":
                if state != "prefill" or e.step < start:
                    ok = False
                    break
                local_pf.append([rid, start, e.step, prompt, prompt, join, 0])
                state, start, out0 = "decode", e.step + 1, max(1, e.decode_done)
            elif e.name in ("PREEMPTED", "FINISHED"):
                end = e.step - 1 if e.name == "PREEMPTED" else e.step
                if state == "prefill":
                    if end >= start:
                        # recompute restarts at 0: the tokens done in this segment are the high-water mark
                        # if it rose (or this is the first segment); otherwise unknown
                        rose = e.prefill_done > done0 or done0 == 0
                        need = e.prefill_done if rose and e.prefill_done > 0 else None
                        local_pf.append([rid, start, end, need, prompt, join, 0])
                elif state == "decode":
                    if end >= start:
                        local_dec.append((rid, start, end, out0, prompt))
                        if e.decode_done != out0 + (end - start) + 1:
                            bad["decode tokens != active decode steps"] += 1
                elif state == "resume":
                    close_resume(end, e.decode_done)
                state = None
                if e.name == "FINISHED":
                    break
        if not ok:
            skipped["inconsistent journey order"] += 1
            continue
        if state is not None:  # still running at the end of the trace: unknown end, leave it out
            skipped["no FINISHED (still active)"] += 1
            continue
        dec.extend(local_dec)
        pf.extend(local_pf)

    # decode entries, vectorised
    frames = []
    if dec:
        d_rid = np.array([d[0] for d in dec], dtype=object)
        d_start = np.array([d[1] for d in dec], dtype=np.int64)
        d_end = np.array([d[2] for d in dec], dtype=np.int64)
        d_out0 = np.array([d[3] for d in dec], dtype=np.int64)
        d_prompt = np.array([d[4] for d in dec], dtype=np.int64)
        lens = d_end - d_start + 1
        seg = np.repeat(np.arange(len(dec)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        steps = d_start[seg] + offs
        frames.append(pd.DataFrame({
            "step_id": steps, "request_id": d_rid[seg], "phase": "decode", "tokens": 1.0,
            "context_before": (d_prompt[seg] + d_out0[seg] - 1 + offs).astype(np.float64),
            "prompt_tokens": d_prompt[seg].astype(np.float64)}))
        lo, hi = int(steps.min()), int(steps.max())
        n_dec = np.bincount(steps - lo, minlength=hi - lo + 1)
    else:
        lo, n_dec = 0, np.zeros(0, dtype=np.int64)

    def decodes_at(step: int) -> int:
        i = step - lo
        return int(n_dec[i]) if 0 <= i < len(n_dec) else 0

    # prefill entries, step by step in order of joining the batch
    by_step: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(pf):
        for st in range(s[1], s[2] + 1):
            by_step[st].append(i)
    rows = []
    for st in sorted(by_step):
        budget = None if max_num_batched_tokens is None else int(max_num_batched_tokens) - decodes_at(st)
        fixed, greedy = [], []
        for i in sorted(by_step[st], key=lambda j: (pf[j][5], pf[j][0])):
            need, s1, done = pf[i][3], pf[i][2], pf[i][6]
            # a single-step prefill or the last chunk of one has known tokens; a non-last chunk stopped at
            # the budget, so it takes what the known ones and the decodes leave, in order of joining
            (fixed if need is not None and s1 == st else greedy).append(i)
        for i in fixed:
            tok = pf[i][3] - pf[i][6]
            if budget is not None:
                budget -= tok
            if tok > 0:
                rows.append((st, pf[i][0], tok, pf[i][6], pf[i][4]))
                pf[i][6] += tok
            elif tok < 0:
                bad["prefill tokens < active prefill steps"] += 1
        for i in greedy:
            rid, s0, s1, need, p_eff, _, done = pf[i]
            after = s1 - st
            if need is not None:
                remaining = need - done
                if budget is None:
                    tok = -(-remaining // (after + 1))
                else:
                    tok = min(max(budget, 1), remaining - after)
                if tok < 1:
                    bad["prefill tokens < active prefill steps"] += 1
                    tok = 1 if remaining > 0 else 0
            else:
                if budget is None:
                    bad["unknown prefill tokens without a budget"] += 1
                    continue
                tok = max(budget, 1)
            if tok <= 0:
                continue
            rows.append((st, rid, tok, done, p_eff))
            pf[i][6] = done + tok
            if budget is not None:
                budget -= tok
    if rows:
        frames.append(pd.DataFrame({
            "step_id": np.array([r[0] for r in rows], dtype=np.int64),
            "request_id": np.array([r[1] for r in rows], dtype=object), "phase": "prefill",
            "tokens": np.array([r[2] for r in rows], dtype=np.float64),
            "context_before": np.array([r[3] for r in rows], dtype=np.float64),
            "prompt_tokens": np.array([r[4] for r in rows], dtype=np.float64)}))
    if frames:
        entries = pd.concat(frames, ignore_index=True).sort_values(["step_id", "phase"], kind="stable")
    else:
        entries = pd.DataFrame({"step_id": np.array([], dtype=np.int64), "request_id": [], "phase": [],
                                "tokens": [], "context_before": [], "prompt_tokens": []})
    return Reconstruction(entries.reset_index(drop=True), dict(preempted), dict(skipped), dict(bad))


# =============================================================================================
# requests


def _request_rows(journeys: Mapping[str, Sequence[JourneyEvent]], api: Mapping[str, Mapping[str, int]],
                  require_api: bool, run_id: str) -> tuple[list[dict], Counter]:
    rows, excluded = [], Counter()
    for rid in list(journeys) + [r for r in api if r not in journeys]:
        evs = sorted(journeys.get(rid, ()), key=_sort_key)
        a = api.get(rid, {})
        first: dict[str, JourneyEvent] = {}
        for e in evs:
            first.setdefault(e.name, e)
        fin = first.get("FINISHED")
        if fin is None and "DEPARTED" not in a and "ABORTED" not in a:
            excluded["incomplete: no FINISHED/DEPARTED/ABORTED"] += 1
            continue
        finish = fin.finish_status if fin is not None else ""
        if "ABORTED" in a:
            status = "aborted"
        elif fin is not None:
            status = _FINISH_TO_STATUS.get(finish, "ok" if not finish else finish)
        else:
            status = "ok"
        ts = {"arrived_us": a.get("ARRIVED"), "queued_us": first["QUEUED"].ts_ns if "QUEUED" in first else None,
              "scheduled_us": first["SCHEDULED"].ts_ns if "SCHEDULED" in first else None,
              "first_token_us": first["FIRST_TOKEN"].ts_ns if "FIRST_TOKEN" in first else None,
              "finished_us": fin.ts_ns if fin is not None else None, "departed_us": a.get("DEPARTED"),
              "aborted_us": a.get("ABORTED")}
        if status == "ok":
            need = ["QUEUED", "SCHEDULED", "FIRST_TOKEN", "FINISHED"]
            missing = [f"journey.{n}" for n in need if n not in first]
            if require_api:
                missing += [f"api.{n}" for n in ("ARRIVED", "DEPARTED") if n not in a]
            if missing:
                excluded[f"missing {missing[0]}"] += 1
                continue
            chain = [ts[k] for k in ("arrived_us", "queued_us", "scheduled_us", "first_token_us", "finished_us",
                                     "departed_us") if ts[k] is not None]
            steps = [first[n].step for n in ("SCHEDULED", "FIRST_TOKEN", "FINISHED")]
            if any(b < x for x, b in zip(chain, chain[1:])) or any(
                    s is None for s in steps) or not steps[0] <= steps[1] <= steps[2]:
                excluded["events out of lifecycle order"] += 1
                continue
        elif not evs and not a:
            excluded["no events"] += 1
            continue
        prompt = max((e.prefill_total for e in evs), default=None)
        out = fin.decode_done if fin is not None else max((e.decode_done for e in evs), default=None)
        n_pre = sum(1 for e in evs if e.name == "PREEMPTED")
        if evs:
            n_pre = max(n_pre, max(e.num_preemptions for e in evs))
        row = {"run_id": run_id, "request_id": rid}
        for k, v in ts.items():
            row[k] = np.nan if v is None else v / 1e3
        row.update(prompt_tokens=np.nan if prompt is None else float(prompt),
                   output_tokens=np.nan if out is None else float(out), preemptions=float(n_pre), status=status)
        rows.append(row)
    return rows, excluded


def _requests_frame(rows: list[dict], source: str) -> pd.DataFrame:
    cols = ["run_id", "request_id", "arrived_us", "queued_us", "scheduled_us", "first_token_us", "finished_us",
            "departed_us", "prompt_tokens", "output_tokens", "preemptions", "status", "aborted_us"]
    df = pd.DataFrame(rows, columns=cols)
    return validate_requests(df, source)


# =============================================================================================
# steps


def _snapshot_entries(rows: Sequence[tuple], run_id: str) -> pd.DataFrame:
    """rows: (step_id, request_id, prompt, computed, output, scheduled) with scheduled > 0."""
    arr = np.array([r[2:] for r in rows], dtype=np.float64).reshape(-1, 4)
    is_dec, p_eff = entry_phase(arr[:, 0], arr[:, 1], arr[:, 2])
    return pd.DataFrame({"run_id": run_id, "step_id": np.array([r[0] for r in rows], dtype=np.int64),
                         "phase": np.where(is_dec, "decode", "prefill"), "tokens": arr[:, 3],
                         "context_before": arr[:, 1], "prompt_tokens": p_eff})


def _agg_by_step(entries: pd.DataFrame, run_id: str) -> pd.DataFrame:
    if entries is None or len(entries) == 0:
        return pd.DataFrame(columns=list(_AGG_COLS), index=pd.Index([], dtype=np.int64, name="step_id"))
    e = entries if "run_id" in entries.columns else entries.assign(run_id=run_id)
    agg = aggregate_entries(e)
    return agg.drop(columns=["run_id"]).set_index("step_id")


def _steps_frame(summ: Mapping[int, dict], snap_agg: pd.DataFrame, rec_agg: pd.DataFrame | None,
                 rec_preempted: Mapping[int, int], finished_at: Mapping[int, int] | None,
                 meta: dict, report: dict) -> pd.DataFrame:
    ids = sorted(set(summ) | (set(rec_agg.index) if rec_agg is not None else set()))
    n = len(ids)
    sid = np.array(ids, dtype=np.int64)

    def s_col(key):
        return np.array([_num(summ[i].get(key)) if i in summ else np.nan for i in ids], dtype=np.float64)

    has_summ = np.array([i in summ for i in ids], dtype=bool)
    ts_start = s_col("step.ts_start_ns")
    out = {c: np.full(n, np.nan) for c in _AGG_COLS}
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
        for c in _AGG_COLS:
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

    # cycle time
    cycle = np.full(n, np.nan)
    reasons = Counter()
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
        **{c: out[c] for c in _AGG_COLS},
        "kv_usage": s_col("kv.usage_gpu_ratio"), "preemptions": np.nan_to_num(preempt, nan=0.0),
        "running": running, "waiting": waiting, "agg_source": source.astype(str),
    })
    return steps


# =============================================================================================
# parsing


def _attrs(lst) -> dict:
    out = {}
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


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return np.nan


def _first(v):
    """The scalar of an OTLP AnyValue ({"intValue": "42"} -> "42")."""
    return next(iter(v.values()))


def _int(x, default=None):
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
        s = at.get("ts.monotonic")
        try:
            s = float(s)
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
    def __init__(self):
        self.summ: dict[int, dict] = {}
        self.snap: dict[tuple[int, str], tuple] = {}
        self.core: dict[str, dict] = {}  # trace id / rid key -> {"rid", "trace", "events": {key: ev}}
        self.api: dict[str, dict] = {}  # trace id -> {"rid", "events": {name: ts}}
        self.seen_spans: set = set()
        self.c = Counter()

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

    def _snapshot(self, lst) -> None:
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
            vals = (_int(at.get("request.num_prompt_tokens")), _int(at.get("request.num_computed_tokens")),
                    _int(at.get("request.num_output_tokens")), _int(at.get("request.scheduled_tokens_this_step")))
            if sid is None or rid is None or None in vals:
                self.c["bad_events"] += 1
                return
            key = (sid, str(rid))
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
        if short not in _RANK:
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
    rows, excluded = _request_rows(journeys, api, require_api, run_id)
    requests = _requests_frame(rows, source)
    report["requests_seen"] = len(set(journeys) | set(api))
    report["requests_kept"] = len(requests)
    report["requests_excluded"] = dict(excluded)
    report["requests_by_status"] = {str(k): int(v) for k, v in requests["status"].value_counts().items()}

    # steps
    budget = max_num_batched_tokens
    if budget is None and col.summ:
        seen = [_int(a.get("batch.scheduled_tokens"), 0) for a in col.summ.values()]
        budget = max(seen) if seen and max(seen) > 0 else None
    rec = reconstruct_steps(journeys, budget) if journeys else None
    rec_agg = _agg_by_step(rec.entries, run_id) if rec is not None else None
    if rec is not None:
        report["reconstruction_skipped"] = rec.skipped
        report["reconstruction_inconsistent"] = rec.inconsistent
    snap_rows = [(sid, rid) + v for (sid, rid), v in col.snap.items() if v[3] > 0]
    snap_agg = _agg_by_step(_snapshot_entries(snap_rows, run_id) if snap_rows else None, run_id)
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
    steps = _steps_frame(col.summ, snap_agg, rec_agg, rec.preempted if rec else {}, finished_at, meta, report)
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


# =============================================================================================
# the engine's own record of the steps, as tables (for round-trip tests)


def journeys_from_request_events(request_events) -> tuple[dict[str, list[JourneyEvent]], dict[str, dict[str, int]]]:
    """Twin RequestEvents -> (journeys by request id, API event times by request id), with the journey
    attributes the trace writer derives (``prefill.done_tokens`` high-water mark, fork finish statuses)."""
    from rooflab.twin.otel import FINISH_STATUS

    by_rid: dict[str, list] = defaultdict(list)
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


def _flatten(items):
    for x in items:
        if isinstance(x, (list, tuple)):
            yield from _flatten(x)
        else:
            yield x


def tables_from_records(step_records, request_events, run_id: str, model: str, tp: int,
                        hardware: str) -> OtelTables:
    """The engine's own record of the steps and requests as rooflab tables — the reference a trace read
    back with :func:`read_otel_traces` must reproduce. Step time here is the record's true
    ``ts_end_ns − ts_start_ns``; the reader's cycle time must equal it wherever it is not excluded."""
    recs = sorted(step_records, key=lambda r: r.step_id)
    rows = [(r.step_id, e.request_id, e.num_prompt_tokens, e.num_computed_tokens, e.num_output_tokens,
             e.scheduled_tokens) for r in recs for e in r.entries if e.scheduled_tokens > 0]
    agg = _agg_by_step(_snapshot_entries(rows, run_id) if rows else None, run_id)
    sid = np.array([r.step_id for r in recs], dtype=np.int64)
    aggr = agg.reindex(sid)
    steps = pd.DataFrame({
        "run_id": run_id, "step_id": sid, "model": model, "tp": int(tp), "hardware": hardware,
        "t_start_us": np.array([r.ts_start_ns for r in recs], dtype=np.float64) / 1e3,
        "step_time_us": np.array([r.ts_end_ns - r.ts_start_ns for r in recs], dtype=np.float64) / 1e3,
        **{c: aggr[c].to_numpy(dtype=np.float64) for c in _AGG_COLS},
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
    rows, excluded = _request_rows(journeys, api, bool(api), run_id)
    requests = _requests_frame(rows, "<records>")
    return OtelTables(validate_steps(steps, "<records>"), requests,
                      {"source": "records", "requests_excluded": dict(excluded)})
