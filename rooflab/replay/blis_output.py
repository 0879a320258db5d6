"""rooflab's replay predictions in BLIS's file formats (docs/blis.md §9), so BLIS's tools read them.

* :func:`write_blis_results` — the JSON array of SimResult objects that ``blis replay --results-path`` writes
  and ``blis calibrate --sim-results`` reads: ``{request_id (int), ttft_us, e2e_us, input_tokens, output_tokens,
  itl_mean_us}`` (plus ``slo_class`` when the trace carries one), sorted by id; only completed requests whose id
  is numeric (``N`` or ``request_N``). input_tokens is the whole prompt (prefix included), as BLIS writes it.
  rooflab's TTFT / E2E are client-side predictions (α0 holds the API-server and network time), whereas calibrate
  treats SimResult times as server-side and adds the header's ``network.measured_rtt_ms``: run calibrate with
  ``--network-rtt-us 0`` to compare rooflab's numbers as they are.
* :func:`write_blis_trace` — a minimal TraceV3 header + data CSV of a replay, the convention of BLIS's
  run/replay exports: send = arrival, first chunk = arrival + TTFT, last chunk = arrival + TTFT + decode time,
  num_chunks 0, server_input_tokens = the whole prompt (so calibrate's token check compares like with like;
  BLIS's replay sizes a prefix-group request from prefix_length + input_tokens, the same number). The decode
  time is rooflab's predicted E2E − TTFT, so the last chunk is the predicted client-side end (what an observe
  trace's last chunk measures), where BLIS's own export leaves α1 out of it.
  ``blis replay`` reads it (arrivals, prefix groups, tokens) and ``blis calibrate`` takes it as the "real" side.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from rooflab.data.adapters.blis_trace import CSV_COLUMNS, HEADER_KEYS, SERVER_KEYS, BlisTraceFiles
from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.files import atomic_write_text

_ID = re.compile(r"^(?:request_)?(\d+)$")
RESULT_COLUMNS = ("request_id", "prompt_tokens", "output_tokens", "pred_ttft_us", "pred_e2e_us")


def blis_request_id(request_id: object) -> int | None:
    """BLIS's integer id of a rooflab request id: ``"12"`` or ``"request_12"`` -> 12; anything else None."""
    if isinstance(request_id, (int, np.integer)) and not isinstance(request_id, bool):
        return int(request_id) if request_id >= 0 else None
    m = _ID.match(str(request_id).strip())
    return int(m.group(1)) if m else None


def _completed(df: pd.DataFrame, ttft: str, e2e: str, failed: str) -> np.ndarray:
    ok = np.isfinite(df[ttft].to_numpy(dtype=float)) & np.isfinite(df[e2e].to_numpy(dtype=float))
    if failed in df:
        ok &= ~df[failed].fillna(True).to_numpy(dtype=bool)
    return ok


def blis_results(result_requests: pd.DataFrame, source: str = "<replay>") -> list[dict]:
    """The SimResult objects of a replay's request frame (:func:`rooflab.replay.predict.replay` ``.requests``)."""
    missing = [c for c in RESULT_COLUMNS if c not in result_requests]
    if missing:
        raise InputError(source, missing[0], "missing column (expected a replay's request frame)")
    df = result_requests
    ok = _completed(df, "pred_ttft_us", "pred_e2e_us", "pred_failed")
    itl = df["pred_itl_us"].to_numpy(dtype=float) if "pred_itl_us" in df else np.full(len(df), np.nan)
    slo = df["slo_class"].to_numpy(dtype=object) if "slo_class" in df else np.full(len(df), None)
    out: dict[int, dict] = {}
    ttft = df["pred_ttft_us"].to_numpy(dtype=float)
    e2e = df["pred_e2e_us"].to_numpy(dtype=float)
    prompt = df["prompt_tokens"].to_numpy(dtype=float)
    n_out = df["output_tokens"].to_numpy(dtype=float)
    ids = df["request_id"].to_numpy(dtype=object)
    for i in (int(k) for k in np.flatnonzero(ok)):
        rid = blis_request_id(ids[i])
        if rid is None:
            continue
        if rid in out:
            raise InputError(source, "request_id", f"two requests map to BLIS id {rid}")
        rec = {"request_id": rid, "ttft_us": float(ttft[i]), "e2e_us": float(e2e[i]),
               "input_tokens": int(round(prompt[i])), "output_tokens": int(round(n_out[i]))}
        if isinstance(slo[i], str) and slo[i]:
            rec["slo_class"] = slo[i]
        if np.isfinite(itl[i]) and itl[i] != 0:
            rec["itl_mean_us"] = float(itl[i])
        out[rid] = rec
    return [out[k] for k in sorted(out)]


def write_blis_results(result_requests: pd.DataFrame, path: str | Path) -> Path:
    """Write a replay's predictions as ``blis calibrate --sim-results`` JSON (atomically); the path written."""
    return atomic_write_text(path, json.dumps(blis_results(result_requests, str(path)), indent=2) + "\n")


def blis_header_for(trace: Trace) -> dict:
    """A header's ``server`` block for a rooflab trace (model, TP and the engine settings BLIS records)."""
    server = {"type": "vllm", "model": trace.model, "tensor_parallel": int(trace.tp)}
    for k in ("max_num_seqs", "block_size", "gpu_memory_utilization", "max_model_len"):
        if trace.engine.get(k):
            server[k] = trace.engine[k]
    return {"server": server}


def _ids(df: pd.DataFrame) -> tuple[np.ndarray, bool]:
    parsed = [blis_request_id(r) for r in df["request_id"]]
    if all(p is not None for p in parsed) and len(set(parsed)) == len(parsed):
        return np.array(parsed, dtype=np.int64), False
    return np.arange(len(df), dtype=np.int64), True


def _warm_up(df: pd.DataFrame, ids: np.ndarray) -> int:
    """W when exactly the ids 0..W-1 are unscored (how BLIS marks warm-up), else 0."""
    if "scored" not in df:
        return 0
    cold = np.sort(ids[~df["scored"].fillna(True).to_numpy(dtype=bool)])
    return len(cold) if len(cold) and np.array_equal(cold, np.arange(len(cold))) else 0


def write_blis_trace(trace_requests: pd.DataFrame, header: dict | None, folder: str | Path, *,
                     name: str = "trace", timeout_s: float | None = None) -> BlisTraceFiles:
    """Write ``<folder>/<name>.yaml`` + ``<name>.csv``, a TraceV3 of ``trace_requests`` (a replay's request frame:
    its pred_ttft_us / pred_e2e_us / pred_failed, else a trace's measured ttft_us / e2e_us / failed).

    ``header``: header fields over the defaults (trace_version 3, time_unit microseconds, mode replayed,
    warm_up_requests from the ``scored`` column); e.g. :func:`blis_header_for` or blocks of a read BLIS header.
    Unknown keys are refused (BLIS would). Ids stay BLIS's when all are ``N`` / ``request_N``, else the requests
    are numbered 0.. in arrival order. ``timeout_s``: written as each request's deadline."""
    folder = Path(folder)
    df = trace_requests
    missing = [c for c in ("request_id", "arrival_us", "prompt_tokens", "output_tokens") if c not in df]
    if missing:
        raise InputError(None, missing[0], "missing column (expected a trace's or a replay's request frame)")
    hdr = dict(header or {})
    for k in hdr:
        if k not in HEADER_KEYS:
            raise InputError(None, f"header.{k}", f"not a BLIS trace header key (known: {', '.join(HEADER_KEYS)})")
    for k in hdr.get("server") or {}:
        if k not in SERVER_KEYS:
            raise InputError(None, f"header.server.{k}", f"not a BLIS server key (known: {', '.join(SERVER_KEYS)})")
    df = df.iloc[np.argsort(df["arrival_us"].to_numpy(dtype=float), kind="stable")].reset_index(drop=True)
    ids, renumbered = _ids(df)
    pred = "pred_ttft_us" in df and "pred_e2e_us" in df
    ttft_c, e2e_c, fail_c = ("pred_ttft_us", "pred_e2e_us", "pred_failed") if pred else ("ttft_us", "e2e_us", "failed")
    if ttft_c not in df or e2e_c not in df:
        raise InputError(None, ttft_c, "missing column: no TTFT / E2E to write")
    ok = _completed(df, ttft_c, e2e_c, fail_c)
    arr = np.rint(df["arrival_us"].to_numpy(dtype=float)).astype(np.int64)
    if (arr < 0).any():
        raise InputError(None, "arrival_us", "negative arrival time")
    first = np.where(ok, arr + np.rint(np.nan_to_num(df[ttft_c].to_numpy(dtype=float))).astype(np.int64), 0)
    last = np.where(ok, arr + np.rint(np.nan_to_num(df[e2e_c].to_numpy(dtype=float))).astype(np.int64), 0)
    prompt = np.rint(df["prompt_tokens"].to_numpy(dtype=float)).astype(np.int64)
    group = [g if isinstance(g, str) else "" for g in (df["prefix_group"] if "prefix_group" in df else [""] * len(df))]
    ptok = np.rint(np.nan_to_num(df["prefix_tokens"].to_numpy(dtype=float))).astype(np.int64) \
        if "prefix_tokens" in df else np.zeros(len(df), dtype=np.int64)
    plen = np.where([g != "" for g in group], np.minimum(ptok, prompt), 0)
    aborted = df["pred_status"].astype(str).isin(["abort", "aborted"]).to_numpy() if "pred_status" in df \
        else np.zeros(len(df), dtype=bool)
    status = np.where(ok, "ok", np.where(aborted, "timeout", "incomplete"))
    deadline = arr + int(round(timeout_s * 1e6)) if timeout_s else np.zeros(len(df), dtype=np.int64)
    text = {c: df[c].fillna("").astype(str).to_numpy() if c in df else np.full(len(df), "")
            for c in ("client_id", "slo_class")}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    out_tokens = df["output_tokens"].to_numpy(dtype=float)
    for i in range(len(df)):
        row = {"request_id": ids[i], "client_id": text["client_id"][i], "tenant_id": "",
               "slo_class": text["slo_class"][i], "session_id": "", "round_index": 0, "prefix_group": group[i],
               "prefix_length": plen[i], "streaming": "true", "input_tokens": prompt[i] - plen[i],
               "output_tokens": int(round(out_tokens[i])), "text_tokens": 0, "image_tokens": 0,
               "audio_tokens": 0, "video_tokens": 0, "reason_ratio": 0, "model": "", "deadline_us": deadline[i],
               "server_input_tokens": prompt[i], "arrival_time_us": arr[i], "send_time_us": arr[i],
               "first_chunk_time_us": first[i], "last_chunk_time_us": last[i], "num_chunks": 0,
               "status": status[i], "error_message": "", "finish_reason": ""}
        w.writerow([row[c] for c in CSV_COLUMNS])
    doc = {"trace_version": 3, "time_unit": "microseconds",
           "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "mode": "replayed",
           "warm_up_requests": _warm_up(df, ids)}
    doc.update({k: v for k, v in hdr.items() if k not in ("trace_version", "time_unit", "mode", "created_at")})
    if renumbered:  # the header's warm-up count referred to the old ids
        doc["warm_up_requests"] = _warm_up(df, ids)
    header_path, data_path = folder / f"{name}.yaml", folder / f"{name}.csv"
    atomic_write_text(data_path, buf.getvalue())
    atomic_write_text(header_path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return BlisTraceFiles(header_path, data_path, None)
