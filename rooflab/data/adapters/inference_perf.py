"""inference-perf's per-request output (``per_request_lifecycle_metrics.json``) -> one row per request.

The one reader of that file: the steplog adapter joins these rows with the server's request table
(:func:`rooflab.data.adapters.steplog.match_client_requests`) and request traces
(:func:`rooflab.data.traces.read_inference_perf`) replay them.

A record is ``{start_time, end_time, request, response, info: {input_tokens | request_metrics.text.input_tokens,
response_metrics: {output_tokens, chunk_times | output_token_times, server_usage}}, error}``; times are seconds
on the client's monotonic clock (``time.perf_counter``). Which field wins where two carry the same quantity:

* first chunk: ``chunk_times[0]`` (when the client read the first streamed line), else
  ``output_token_times[0]`` — the same instant in 0.7.0, which fills both;
* output tokens: ``output_tokens`` is the client's own count (it re-tokenizes the text); the server's
  ``usage.completion_tokens`` is kept beside it as ``server_output_tokens``;
* request id: the response's ``id`` (``cmpl-<X-Request-Id>``) when the response is kept, else None.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pandas as pd

from rooflab.errors import InputError

COLUMNS = ("index", "request_id", "start_s", "end_s", "first_chunk_s", "input_tokens", "output_tokens",
           "server_output_tokens", "error")
_ID_RE = re.compile(r'"id"\s*:\s*"([^"]+)"')


def _num(v: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def response_request_id(response_id: str | None) -> str | None:
    """A completion's response ``id`` (``cmpl-<base>``, ``chatcmpl-<base>``) -> ``<base>``: the X-Request-Id the
    client sent, or vLLM's own id."""
    if not response_id:
        return None
    for p in ("chatcmpl-", "cmpl-"):
        if response_id.startswith(p):
            return response_id[len(p):]
    return response_id


def read_per_request(path: str | Path, *, require_streamed: bool = False) -> pd.DataFrame:
    """Rows in file order, columns :data:`COLUMNS`. ``require_streamed``: a successful request must carry its
    chunk times and output token count (what a replay needs to measure TTFT). Every problem is a one-line
    :class:`InputError` naming the file and the record."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    try:
        rows = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(path, None, "expected a non-empty JSON list of per-request records")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(path, f"[{i}]", "not an object")
        for key in ("start_time", "end_time"):
            if not _num(r.get(key)):
                raise InputError(path, f"[{i}].{key}", f"missing or not a number ({r.get(key)!r})")
        start, end = float(r["start_time"]), float(r["end_time"])
        if end < start:
            raise InputError(path, f"[{i}].end_time", f"{end} is before start_time {start}")
        info = r.get("info")
        if not isinstance(info, dict):
            info = {}
        inp = info.get("input_tokens")
        if not _num(inp):
            inp = ((info.get("request_metrics") or {}).get("text") or {}).get("input_tokens")
        rm = info.get("response_metrics") or {}
        chunks = rm.get("chunk_times") or rm.get("output_token_times") or []
        out_tokens = rm.get("output_tokens")
        usage = rm.get("server_usage") or {}
        err = r.get("error") is not None
        if require_streamed:
            if not isinstance(r.get("info"), dict):
                raise InputError(path, f"[{i}].info", "missing or not an object")
            if not _num(inp) or inp < 1:
                raise InputError(path, f"[{i}].info.input_tokens", f"missing or < 1 ({inp!r})")
            if not err:
                if not _num(out_tokens) or out_tokens < 0:
                    raise InputError(path, f"[{i}].info.response_metrics.output_tokens",
                                     f"missing or negative ({out_tokens!r})")
                if not isinstance(chunks, list) or not chunks or not _num(chunks[0]):
                    raise InputError(path, f"[{i}].info.response_metrics.output_token_times",
                                     "missing or empty for a successful streamed request")
        m = _ID_RE.search(str(r.get("response") or ""))
        out.append((i, response_request_id(m.group(1)) if m else None, start, end,
                    float(chunks[0]) if chunks and _num(chunks[0]) else np.nan,
                    float(inp) if _num(inp) else np.nan, float(out_tokens) if _num(out_tokens) else np.nan,
                    float(usage["completion_tokens"]) if _num(usage.get("completion_tokens")) else np.nan, err))
    return pd.DataFrame(out, columns=list(COLUMNS))
