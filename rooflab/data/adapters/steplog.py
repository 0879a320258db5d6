"""The vllm-steplog plugin's JSON lines (stock vLLM) -> step and request tables (docs/spec.md §2, source 3).

The plugin (``plugins/vllm_steplog``, format in its ``FORMAT.md``) writes, into one file shared by vLLM's
processes, lines of four kinds, all times integer ns on CLOCK_MONOTONIC (the clock inference-perf reads):

* ``engine`` — an engine core started: vLLM version, max_num_batched_tokens, block size, KV blocks, ...;
* ``step`` — one scheduler step: ``t0_ns`` (schedule() entered), ``t_sched_ns`` (it returned),
  ``t_upd_ns`` (update_from_output() entered), ``t1_ns`` (it returned), ``tokens`` scheduled, ``prefill``
  entries ``[request id, tokens this step, computed tokens before, tokens it must reach]``, ``decode`` entries
  ``[request id, context length]``, ``kv`` usage (0–1), ``preempted`` ids, ``running`` / ``waiting`` counts,
  ``finished`` (requests that finished in the step);
* ``req`` — engine lifecycle events: queued, scheduled (``resume`` after a preemption), first_token,
  preempted, finished (status, prompt and output token counts, preemptions);
* ``api`` — API-server events keyed by the external request id: arrived (HTTP handler entry), departed.

Rules
-----
* **Step time** = the measured ``t1_ns − t0_ns`` of the step (schedule + execute + update), NaN for a step
  that scheduled no token (no forward pass). It is cross-checked against the cycle time ``t0[k+1] − t0[k]``
  of consecutive steps in which the engine stayed busy: ``report["cycle_check"]`` gives the median and P90
  of the gap (cycle − measured: the engine loop's own work between steps) and of measured / cycle.
  Columns ``cycle_us``, ``schedule_us``, ``execute_us``, ``update_us`` are kept beside the table.
* **Aggregates** come from the entries through :func:`rooflab.data.tables.aggregate_entries` (exact: Σ context,
  causal pairs, last-chunk logits); a step whose entries do not add up to its ``tokens`` is counted in
  ``report["steps_token_mismatch"]``.
* **Request ids**: vLLM names a completion ``cmpl-<base>`` where ``<base>`` is the client's ``X-Request-Id``
  header when it sent one (else a random id), and the engine request ``cmpl-<base>-<i>-<8 random>``. The
  request table's ``request_id`` is ``<base>`` (what the client sent, or what it finds in the response's
  ``id``), with ``external_id`` and ``engine_request_id`` beside it. :func:`match_client_requests` joins
  inference-perf's per-request records through the response ``id``.
* **Requests**: arrived / departed from the API lines (else ``arrival_ns``, vLLM's own arrival time,
  converted to the monotonic clock); queued, first scheduled, first token, finished from the engine lines.
  A request with neither finished nor departed is excluded as incomplete; an ``ok`` request missing a
  lifecycle event, or whose events are out of order, is excluded and counted by reason.
* **Robustness**: a last line without its newline (cut mid-write) is skipped and counted; any other
  malformed line — not JSON, not an object, unknown kind, a missing or mistyped field — raises a one-line
  :class:`InputError` naming the file, line and field. An empty file, or one whose steps come from more
  than one engine process (a restart or data parallelism in one run), is an InputError.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd

from rooflab.data.adapters.inference_perf import read_per_request
from rooflab.data.tables import aggregate_entries, validate_requests, validate_steps, with_cache_hits
from rooflab.errors import InputError
from rooflab.files import input_files

SCHEMA = 1
KINDS = ("engine", "step", "req", "api")
REQ_EVENTS = ("queued", "scheduled", "first_token", "preempted", "finished")
API_EVENTS = ("arrived", "departed")
_STATUS = {"stopped": "ok", "length": "ok", "repetition": "ok", "aborted": "aborted", "error": "error",
           "ignored": "ignored"}
_EXT = re.compile(r"^(?:chatcmpl|cmpl)-(.+)-(\d+)$")


@dataclass
class SteplogTables:
    steps: pd.DataFrame
    requests: pd.DataFrame
    entries: pd.DataFrame  # one row per (step, request): phase, tokens, context_before, prompt_tokens
    engine: dict = field(default_factory=dict)  # the engine line (vLLM version, budget, KV blocks, ...)
    report: dict = field(default_factory=dict)


def base_request_id(external_id: str | None) -> str | None:
    """``cmpl-<base>-<i>`` / ``chatcmpl-<base>-<i>`` (vLLM's external id) -> ``<base>``; other ids unchanged."""
    if external_id is None:
        return None
    m = _EXT.match(str(external_id))
    return m.group(1) if m else str(external_id)


# ============================================================================================ parsing
class _Bad(Exception):
    def __init__(self, fieldname: str, problem: str) -> None:
        super().__init__(problem)
        self.field, self.problem = fieldname, problem


@overload
def _int(d: dict, key: str, *, required: Literal[True] = ..., lo: int | None = ...) -> int: ...
@overload
def _int(d: dict, key: str, *, required: bool, lo: int | None = ...) -> int | None: ...
def _int(d: dict, key: str, *, required: bool = True, lo: int | None = 0) -> int | None:
    v = d.get(key)
    if v is None:
        if required:
            raise _Bad(key, "required field is missing")
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(key, f"expected an integer, got {v!r}")
    if lo is not None and v < lo:
        raise _Bad(key, f"must be >= {lo}, got {v}")
    return v


def _str(d: dict, key: str, *, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            raise _Bad(key, "required field is missing")
        return None
    if not isinstance(v, str) or not v:
        raise _Bad(key, f"expected a non-empty string, got {v!r}")
    return v


def _entries(d: dict, key: str, width: tuple[int, ...]) -> list:
    v = d.get(key)
    if v is None:
        raise _Bad(key, "required field is missing")
    if not isinstance(v, list):
        raise _Bad(key, f"expected a list of entries, got {type(v).__name__}")
    for i, e in enumerate(v):
        if not isinstance(e, list) or len(e) not in width or not isinstance(e[0], str) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in e[1:]):
            raise _Bad(f"{key}[{i}]", f"expected [request id, {', '.join(['int'] * (width[-1] - 1))}], got {e!r}")
    return v


def _check_step(d: dict) -> dict:
    _int(d, "step")
    t0, t1 = _int(d, "t0_ns"), _int(d, "t1_ns")
    if t1 < t0:
        raise _Bad("t1_ns", f"step ends before it starts ({t1} < t0_ns {t0})")
    for k in ("t_sched_ns", "t_upd_ns"):
        v = _int(d, k, required=False)
        if v is not None and not t0 <= v <= t1:
            raise _Bad(k, f"{v} is outside the step [{t0}, {t1}]")
    _int(d, "tokens")
    _entries(d, "prefill", (3, 4))
    _entries(d, "decode", (2,))
    kv = d.get("kv")
    if kv is not None and (isinstance(kv, bool) or not isinstance(kv, (int, float)) or not 0 <= kv <= 1.000001):
        raise _Bad("kv", f"expected a KV usage in [0, 1], got {kv!r}")
    pre = d.get("preempted", [])
    if not isinstance(pre, list) or not all(isinstance(x, str) for x in pre):
        raise _Bad("preempted", f"expected a list of request ids, got {pre!r}")
    for k in ("running", "waiting", "finished", "pid"):
        _int(d, k, required=False)
    return d


def _check_req(d: dict) -> dict:
    ev = d.get("ev")
    if ev not in REQ_EVENTS:
        raise _Bad("ev", f"unknown request event {ev!r} (known: {', '.join(REQ_EVENTS)})")
    _str(d, "id")
    _int(d, "t_ns")
    _int(d, "step", required=False)
    if ev == "queued":
        _int(d, "prompt")
        _str(d, "ext", required=False)
        _int(d, "arrival_ns", required=False, lo=None)
    if ev == "finished":
        _str(d, "status")
        _int(d, "out")
        _int(d, "prompt", required=False)
        _int(d, "preemptions", required=False)
    return d


def _check_api(d: dict) -> dict:
    ev = d.get("ev")
    if ev not in API_EVENTS:
        raise _Bad("ev", f"unknown API event {ev!r} (known: {', '.join(API_EVENTS)})")
    _str(d, "ext")
    _int(d, "t_ns")
    return d


def _check_engine(d: dict) -> dict:
    s = d.get("schema", SCHEMA)
    if s != SCHEMA:
        raise _Bad("schema", f"steplog schema {s!r} is not supported by this reader (supports {SCHEMA})")
    return d


_CHECK = {"engine": _check_engine, "step": _check_step, "req": _check_req, "api": _check_api}


def _read_lines(path: Path, report: Counter[str]) -> list[dict]:
    if not path.is_file():
        raise InputError(path, None, "file not found")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(path, None, "empty steplog (did the vLLM server run with ROOFLAB_STEPLOG_PATH set and "
                                     "the vllm-steplog plugin installed?)")
    lines = data.split(b"\n")
    out = []
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"line {i + 1}"
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            if i == last:  # no newline after it: cut mid-write (a crash, or a live file)
                report["truncated_last_line"] += 1
                continue
            raise InputError(path, where, f"not a JSON line: {raw[:80]!r}") from None
        if not isinstance(d, dict):
            raise InputError(path, where, f"expected a JSON object, got {type(d).__name__}")
        kind = d.get("kind")
        if kind not in _CHECK:
            raise InputError(path, f"{where}: kind", f"unknown line kind {kind!r} (known: {', '.join(KINDS)})")
        try:
            out.append(_CHECK[kind](d))
        except _Bad as b:
            raise InputError(path, f"{where} ({kind}): {b.field}", b.problem) from None
        report[f"lines_{kind}"] += 1
    return out


# ============================================================================================ tables
def read_steplog(paths: str | Path | Iterable[str | Path], *, run_id: str, model: str, tp: int, hardware: str,
                 ) -> SteplogTables:
    """Step, request and entry tables from one run's steplog file(s) (see the module docstring)."""
    paths, source = input_files(paths, "steplog")
    counts: Counter[str] = Counter()
    lines: list[dict] = []
    for p in paths:
        lines.extend(_read_lines(p, counts))
    engines = [d for d in lines if d["kind"] == "engine"]
    steps_raw = [d for d in lines if d["kind"] == "step"]
    pids = sorted({pid for d in steps_raw if (pid := d.get("pid")) is not None})
    if len(pids) > 1:
        raise InputError(source, "pid", f"steps from {len(pids)} engine processes ({', '.join(map(str, pids))}): one "
                         "run's log must come from one engine core (a restart mid-run, or data parallelism)")
    engine = engines[-1] if engines else {}
    if pids and engines:
        engine = next((e for e in reversed(engines) if e.get("pid") == pids[0]), engine)

    # ---- steps
    seen: dict[int, dict] = {}
    for d in steps_raw:
        k = d["step"]
        if k in seen:
            if seen[k]["t0_ns"] == d["t0_ns"]:
                counts["duplicate_steps_dropped"] += 1
                continue
            raise InputError(source, f"step {k}", "step id seen twice with different start times (two engines or "
                             "a restart in one file)")
        seen[k] = d
    sids = sorted(seen)
    ent_rows = []
    for k in sids:
        d = seen[k]
        for e in d["prefill"]:
            target = e[3] if len(e) == 4 else math.nan
            ent_rows.append((k, e[0], "prefill", e[1], e[2], target))
        for e in d["decode"]:
            ent_rows.append((k, e[0], "decode", 1, e[1], math.nan))
    entries = pd.DataFrame(ent_rows, columns=["step_id", "engine_request_id", "phase", "tokens", "context_before",
                                              "prompt_tokens"])
    entries["step_id"] = entries["step_id"].astype("int64")
    entries.insert(0, "run_id", run_id)
    n = len(sids)
    arr = {c: np.full(n, np.nan) for c in ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs",
                                          "prefill_logits", "decode_reqs", "decode_context", "prefill_cached_tokens")}
    if len(entries):
        # the log holds every step from the engine's start, so a request's first entry is its first scheduling,
        # where vLLM's num_computed_tokens is its prefix-cache hits
        first = entries.groupby("engine_request_id")["step_id"].min()
        hits = with_cache_hits(entries.rename(columns={"engine_request_id": "request_id"}),
                               {str(k): int(v) for k, v in first.items()})
        entries["cached_tokens"] = hits["cached_tokens"].to_numpy()
        agg = aggregate_entries(entries, source).set_index("step_id")
        pos = {s: i for i, s in enumerate(sids)}
        idx = np.array([pos[s] for s in agg.index], dtype=np.int64)
        for c in arr:
            arr[c][idx] = agg[c].to_numpy(dtype=np.float64)
    for c in arr:  # a step with no entries scheduled nothing: zero work, not unknown
        arr[c] = np.where(np.isnan(arr[c]) & (c != "prefill_logits"), 0.0, arr[c])

    def get(key: str, default: float = np.nan) -> np.ndarray:
        return np.array([seen[s].get(key, default) if seen[s].get(key) is not None else default for s in sids],
                        dtype=np.float64)

    t0, t1 = get("t0_ns"), get("t1_ns")
    t_sched, t_upd = get("t_sched_ns"), get("t_upd_ns")
    tokens = get("tokens")
    measured = (t1 - t0) / 1e3
    has_work = tokens > 0
    step_time = np.where(has_work & (measured > 0), measured, np.nan)
    counted = arr["prefill_tokens"] + arr["decode_reqs"]
    report: dict[str, Any] = dict(counts)
    report["steps_token_mismatch"] = int((counted != tokens).sum())
    report["steps_empty"] = int((~has_work).sum())

    # cycle time of consecutive busy steps, as a cross-check of the measured time
    sid = np.array(sids, dtype=np.int64)
    running, waiting, fin = get("running"), get("waiting"), get("finished", 0.0)
    cycle = np.full(n, np.nan)
    if n > 1:
        nxt = np.r_[sid[1:] == sid[:-1] + 1, False]
        busy = (running + waiting - fin) > 0  # work left after the step: the engine went straight on
        ok = nxt & busy & has_work
        cycle[:-1] = np.where(ok[:-1], (t0[1:] - t0[:-1]) / 1e3, np.nan)
    both = np.isfinite(cycle) & np.isfinite(step_time)
    if both.any():
        gap, ratio = cycle[both] - step_time[both], step_time[both] / cycle[both]
        report["cycle_check"] = {"steps": int(both.sum()), "median_gap_us": float(np.median(gap)),
                                 "p90_gap_us": float(np.percentile(gap, 90)),
                                 "median_measured_over_cycle": float(np.median(ratio)),
                                 "p10_measured_over_cycle": float(np.percentile(ratio, 10))}
    steps = pd.DataFrame({
        "run_id": run_id, "step_id": sid, "model": model, "tp": int(tp), "hardware": hardware,
        "t_start_us": t0 / 1e3, "step_time_us": step_time, **arr,
        "kv_usage": get("kv"), "preemptions": np.array([float(len(seen[s].get("preempted") or ())) for s in sids]),
        "running": running, "waiting": waiting,
        "scheduled_tokens": tokens, "cycle_us": cycle, "schedule_us": (t_sched - t0) / 1e3,
        "execute_us": (t_upd - t_sched) / 1e3, "update_us": (t1 - t_upd) / 1e3, "agg_source": "steplog",
    })
    steps = validate_steps(steps, source)
    report["steps_total"] = n
    report["steps_with_step_time"] = int(np.isfinite(step_time).sum())

    # ---- requests
    requests, ext_of, rep = _requests(lines, run_id, source)
    report.update(rep)
    if len(entries):
        entries["request_id"] = [base_request_id(ext_of.get(r)) or r for r in entries["engine_request_id"]]
    else:
        entries["request_id"] = pd.Series(dtype="string")
    report["engine"] = {k: engine.get(k) for k in ("vllm", "plugin", "max_num_batched_tokens", "max_num_seqs",
                                                   "block_size", "num_gpu_blocks", "async_scheduling")}
    return SteplogTables(steps, requests, entries, engine, report)


def _requests(lines: list[dict], run_id: str, source: str) -> tuple[pd.DataFrame, dict[str, str], dict[str, Any]]:
    ev: dict[str, dict[str, dict]] = defaultdict(dict)  # engine id -> event -> first line
    n_pre: Counter[str] = Counter()
    ext_of: dict[str, str] = {}
    api: dict[str, dict[str, dict]] = defaultdict(dict)
    rep: dict[str, Any] = {"duplicate_request_events_dropped": 0, "duplicate_api_events_dropped": 0}
    for d in lines:
        if d["kind"] == "req":
            rid = d["id"]
            if d["ev"] == "preempted":
                n_pre[rid] += 1
            if d["ev"] == "queued" and d.get("ext"):
                ext_of[rid] = d["ext"]
            if d["ev"] in ev[rid]:
                if d["ev"] not in ("scheduled", "preempted"):
                    rep["duplicate_request_events_dropped"] += 1
                continue
            ev[rid][d["ev"]] = d
        elif d["kind"] == "api":
            a = api[d["ext"]]
            if d["ev"] in a:
                rep["duplicate_api_events_dropped"] += 1
                continue
            a[d["ev"]] = d
    has_api = bool(api)
    by_ext = {ext_of.get(r, r): r for r in ev}
    rows: list[dict] = []
    excluded: Counter[str] = Counter()
    for ext in list(by_ext) + [x for x in api if x not in by_ext]:
        rid = by_ext.get(ext)
        e = ev.get(rid, {}) if rid is not None else {}
        a = api.get(ext, {})
        fin = e.get("finished")
        if fin is None and "departed" not in a:
            excluded["incomplete: no finished/departed"] += 1
            continue
        if fin is not None:
            status = _STATUS.get(fin["status"], fin["status"])
        else:
            status = "aborted" if a["departed"].get("status") == "aborted" else "error"
        q = e.get("queued")
        arrived = a["arrived"]["t_ns"] if "arrived" in a else (q.get("arrival_ns") if q else None)
        ts = {"arrived_us": arrived, "queued_us": q["t_ns"] if q else None,
              "scheduled_us": e["scheduled"]["t_ns"] if "scheduled" in e else None,
              "first_token_us": e["first_token"]["t_ns"] if "first_token" in e else None,
              "finished_us": fin["t_ns"] if fin else None,
              "departed_us": a["departed"]["t_ns"] if "departed" in a else None}
        if status == "ok":
            need = ["queued", "scheduled", "first_token", "finished"]
            missing = [n for n in need if n not in e] + ([f"api.{n}" for n in API_EVENTS if n not in a]
                                                         if has_api else [])
            if missing:
                excluded[f"missing {missing[0]}"] += 1
                continue
            chain = [v for v in (ts[k] for k in ("queued_us", "scheduled_us", "first_token_us", "finished_us",
                                                 "departed_us")) if v is not None]
            arrived_us, queued_us = ts["arrived_us"], ts["queued_us"]
            if any(b < x for x, b in zip(chain, chain[1:])) or (arrived_us is not None and queued_us is not None
                                                                 and arrived_us > queued_us):
                excluded["events out of lifecycle order"] += 1
                continue
        prompt = (fin or {}).get("prompt", q["prompt"] if q else None)
        out = fin["out"] if fin else None
        pre = max(n_pre.get(rid, 0), (fin or {}).get("preemptions") or 0) if rid is not None else 0
        row: dict[str, Any] = {"run_id": run_id, "request_id": base_request_id(ext) if ext is not None else rid}
        for k, v in ts.items():
            row[k] = np.nan if v is None else v / 1e3
        row.update(prompt_tokens=np.nan if prompt is None else float(prompt),
                   output_tokens=np.nan if out is None else float(out), preemptions=float(pre), status=status,
                   external_id=ext, engine_request_id=rid)
        rows.append(row)
    cols = ["run_id", "request_id", "arrived_us", "queued_us", "scheduled_us", "first_token_us", "finished_us",
            "departed_us", "prompt_tokens", "output_tokens", "preemptions", "status", "external_id",
            "engine_request_id"]
    df = validate_requests(pd.DataFrame(rows, columns=cols), source)
    rep["requests_seen"] = len(set(by_ext) | set(api))
    rep["requests_kept"] = len(df)
    rep["requests_excluded"] = dict(excluded)
    rep["requests_by_status"] = {str(k): int(v) for k, v in df["status"].value_counts().items()}
    dup = df["request_id"].duplicated()
    if dup.any():
        raise InputError(source, "request_id", f"request id {df['request_id'][dup].iloc[0]!r} appears twice (a client "
                         "reused an X-Request-Id within one run)")
    return df, ext_of, rep


# ============================================================================================ client side
def client_requests(per_request_path: str | Path) -> pd.DataFrame:
    """inference-perf's ``per_request_lifecycle_metrics.json`` -> one row per request: ``request_id`` (from the
    response's ``id``), ``client_start_us``, ``client_first_chunk_us``, ``client_end_us`` (monotonic clock),
    ``client_output_tokens`` (the server's ``usage.completion_tokens``: the client's own count re-tokenizes the
    text, which differs for random-weight output that does not round-trip through the tokenizer; NaN without
    usage), ``client_error``."""
    r = read_per_request(per_request_path)
    return pd.DataFrame({"request_id": r["request_id"], "client_start_us": r["start_s"] * 1e6,
                         "client_first_chunk_us": r["first_chunk_s"] * 1e6, "client_end_us": r["end_s"] * 1e6,
                         "client_output_tokens": r["server_output_tokens"], "client_error": r["error"]})


def match_client_requests(requests: pd.DataFrame, client: pd.DataFrame, tolerance_us: float = 2000.0
                          ) -> tuple[pd.DataFrame, dict]:
    """Join the server's request table with the client's records on ``request_id`` and check that the two
    clocks tell one story: client send <= server arrival, server departure <= client end, server first token
    <= client first chunk (each within ``tolerance_us``), equal output token counts. Returns the joined frame
    and a report (counts of matched / unmatched requests and of each violated rule)."""
    m = requests.merge(client, on="request_id", how="outer", indicator=True)
    rep: dict[str, Any] = {"server_requests": int(len(requests)), "client_requests": int(len(client)),
                           "matched": int((m["_merge"] == "both").sum()),
                           "client_only": int((m["_merge"] == "right_only").sum()),
                           "server_only": int((m["_merge"] == "left_only").sum())}
    b = m[m["_merge"] == "both"]
    tol = tolerance_us
    checks = {
        "send_after_arrival": b["arrived_us"] < b["client_start_us"] - tol,
        "departure_after_client_end": b["departed_us"] > b["client_end_us"] + tol,
        "first_token_after_client_first_chunk": b["first_token_us"] > b["client_first_chunk_us"] + tol,
        "output_tokens_differ": (b["output_tokens"] != b["client_output_tokens"]) & b["client_output_tokens"].notna(),
    }
    rep["violations"] = {k: int(v.sum()) for k, v in checks.items()}
    if len(b):
        rep["median_client_to_arrival_us"] = float((b["arrived_us"] - b["client_start_us"]).median())
        rep["median_departure_to_client_end_us"] = float((b["client_end_us"] - b["departed_us"]).median())
        ttft_c = b["client_first_chunk_us"] - b["client_start_us"]
        ttft_s = b["first_token_us"] - b["arrived_us"]
        rep["median_ttft_client_us"] = float(ttft_c.median())
        rep["median_ttft_server_us"] = float(ttft_s.median())
    return m.drop(columns=["_merge"]), rep
