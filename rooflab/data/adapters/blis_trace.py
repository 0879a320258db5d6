"""BLIS (inference-sim) request traces — TraceV2/V3 from ``blis observe``, ``blis run --trace-output`` and
``blis replay --trace-output`` — read into a rooflab :class:`~rooflab.data.traces.Trace` (docs/blis.md §9).

A trace is a YAML header (``trace.yaml``) beside a CSV of one row per request (``trace.csv``) and, from
``observe --record-itl``, an ITL CSV of chunk times (``request_id, chunk_index, timestamp_us``, named
``<data without .csv>.itl.csv``). How rooflab reads it:

* header: strict like BLIS's decoder for trace_version 2 and 3 (an unknown key at the top or in ``server`` /
  ``network`` is an error, a typo would pass silently otherwise); the blocks rooflab does not use
  (goodput_slo_targets, kv_offload, observed_kv_metrics) are kept as read. A newer trace_version is refused:
  BLIS bumps it exactly when old readers must not guess. ``time_unit`` must be us / microseconds.
* model: ``model=`` > ``server.model`` > the CSV's one ``model`` value; Hugging Face ids resolve through
  ``configs/models/aliases.yaml`` and the id's last part. tp: ``tp=`` > ``server.tensor_parallel``. Engine:
  the settings ``server`` records (observe records none); the rest is the caller's.
* prompt = ``server_input_tokens`` when > 0, else prefix_length + input_tokens (input_tokens is the suffix).
* clock: a request starts at ``send_time_us`` (observe's TTFT / E2E count from it; it follows any wait for a
  client concurrency slot), else at its scheduled ``arrival_time_us`` (run/replay exports; requests that failed
  before sending). ``scheduled_arrival_us`` is the schedule on the same clock (arrival_us − it = client wait).
  TTFT = first chunk − send, E2E = last chunk − send, ITL = mean non-negative chunk delta of the ITL CSV (as
  ``blis calibrate``), else (E2E − TTFT)/(out − 1). Non-streamed observe requests get no TTFT.
* warm-up: ids < ``warm_up_requests`` are ``scored`` False (observe does not write them at all).
* client concurrency cap: BLIS records none (observe dispatches through ``--max-concurrency``, default 256, or
  ``--concurrency N`` users): from the workload spec file when the header names a readable one whose clients
  are all concurrency clients, else :func:`infer_concurrency_cap`.

Every malformed input is a one-line :class:`~rooflab.errors.InputError` naming the file and the field.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from rooflab.data.traces import ENGINE_KEYS, Trace, request_itl
from rooflab.errors import InputError
from rooflab.files import read_yaml
from rooflab.model.arch import list_models, resolve_model_name

HEADER_KEYS = ("trace_version", "time_unit", "created_at", "mode", "warm_up_requests", "workload_seed",
               "workload_spec", "session_context_growth", "server", "network", "goodput_slo_targets", "kv_offload",
               "observed_kv_metrics")
SERVER_KEYS = ("type", "model", "tensor_parallel", "max_num_seqs", "block_size", "gpu_memory_utilization",
               "max_model_len")
NETWORK_KEYS = ("measured_rtt_ms",)
TRACE_VERSIONS = (2, 3)
TIME_UNITS = ("us", "microseconds", "µs")
MODES = ("real", "generated", "replayed")
# the data CSV's base columns in BLIS's order (optional vllm_priority / slo_target_us / trailing ones aside)
CSV_COLUMNS = ("request_id", "client_id", "tenant_id", "slo_class", "session_id", "round_index", "prefix_group",
               "prefix_length", "streaming", "input_tokens", "output_tokens", "text_tokens", "image_tokens",
               "audio_tokens", "video_tokens", "reason_ratio", "model", "deadline_us", "server_input_tokens",
               "arrival_time_us", "send_time_us", "first_chunk_time_us", "last_chunk_time_us", "num_chunks",
               "status", "error_message", "finish_reason")
REQUIRED_COLUMNS = ("request_id", "prefix_group", "prefix_length", "input_tokens", "output_tokens",
                    "server_input_tokens", "arrival_time_us", "send_time_us", "first_chunk_time_us",
                    "last_chunk_time_us", "status")
ITL_COLUMNS = ("request_id", "chunk_index", "timestamp_us")
_FALSE = ("0", "f", "false", "")


@dataclass(frozen=True)
class BlisTraceFiles:
    header: Path
    data: Path
    itl: Path | None = None


@dataclass
class BlisTrace:
    """A BLIS trace read into rooflab: the trace, the client concurrency cap (None: none known), the header as
    read, what the reader had to assume, and where the cap came from (``workload_spec`` / ``inferred``)."""

    trace: Trace
    max_concurrency: int | None
    header: dict
    warnings: list[str] = field(default_factory=list)
    files: BlisTraceFiles | None = None
    concurrency_source: str | None = None


def itl_path_for(data: str | Path) -> Path:
    """BLIS observe's default ITL file for a data CSV: ``trace.csv`` -> ``trace.itl.csv``."""
    s = str(data)
    return Path((s[:-4] if s.endswith(".csv") else s) + ".itl.csv")


def _pair_in(folder: Path) -> tuple[Path, Path]:
    if (folder / "trace.yaml").is_file() and (folder / "trace.csv").is_file():
        return folder / "trace.yaml", folder / "trace.csv"
    pairs = [(y, y.with_suffix(".csv")) for y in sorted(folder.glob("*.y*ml"))
             if y.suffix in (".yaml", ".yml") and y.with_suffix(".csv").is_file()]
    if len(pairs) == 1:
        return pairs[0]
    if not pairs:
        raise InputError(folder, None, "no BLIS trace here (expected trace.yaml beside trace.csv)")
    raise InputError(folder, None, f"several BLIS traces here ({', '.join(p[0].name for p in pairs)}): name one")


def find_blis_trace(path: str | Path, itl: str | Path | None = None) -> BlisTraceFiles:
    """The header, data CSV and (when present) ITL CSV of a BLIS trace, from its folder (``trace.yaml`` +
    ``trace.csv``, or the folder's only ``<stem>.yaml`` + ``<stem>.csv``), its header or its data CSV (the other
    file beside it: same stem, else ``trace.*``). ``itl``: an ITL CSV elsewhere than BLIS's default name."""
    p = Path(path)
    if p.is_dir():
        header, data = _pair_in(p)
    elif not p.exists():
        raise InputError(p, None, "file not found")
    elif p.suffix in (".yaml", ".yml"):
        header = p
        found = next((c for c in (p.with_suffix(".csv"), p.parent / "trace.csv") if c.is_file()), None)
        if found is None:
            raise InputError(p, None, f"no data CSV beside the header (expected {p.with_suffix('.csv').name})")
        data = found
    elif p.suffix == ".csv":
        if p.name.endswith(".itl.csv"):
            raise InputError(p, None, "an ITL file: pass the trace's data CSV or header")
        data = p
        beside = next((c for c in (p.with_suffix(".yaml"), p.with_suffix(".yml"), p.parent / "trace.yaml")
                       if c.is_file()), None)
        if beside is None:
            raise InputError(p, None, f"no header YAML beside the data CSV (expected {p.with_suffix('.yaml').name})")
        header = beside
    else:
        raise InputError(p, None, "not a BLIS trace (expected a folder, a .yaml header or a .csv data file)")
    if itl is not None and not Path(itl).is_file():
        raise InputError(itl, None, "file not found")
    itl = Path(itl) if itl is not None else (itl_path_for(data) if itl_path_for(data).is_file() else None)
    return BlisTraceFiles(header, data, itl)


def is_blis_trace(path: str | Path) -> bool:
    """Whether ``path`` (folder, header or data CSV) holds a BLIS trace: a header with ``trace_version`` and a
    CSV whose first line names ``request_id`` and ``send_time_us``. Never raises."""
    try:
        files = find_blis_trace(path)
        doc = yaml.safe_load(files.header.read_text())
        with files.data.open(newline="") as fh:
            first = next(csv.reader(fh), [])
    except (InputError, OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and "trace_version" in doc and {"request_id", "send_time_us"} <= set(first)


def resolve_blis_model(name: str, source: str | Path | None = None, field_name: str = "server.model") -> str:
    """A BLIS model name (a Hugging Face id such as ``Qwen/Qwen3-14B``) -> the rooflab model folder."""
    known = list_models()
    by_lower = {m.lower(): m for m in known}
    name = str(name).strip()
    last = name.rstrip("/").rsplit("/", 1)[-1]
    for cand in (name, last):
        hit = by_lower.get(resolve_model_name(cand).lower())
        if hit:
            return hit
    close = difflib.get_close_matches(last.lower(), known, n=3, cutoff=0.3) or known[:3]
    raise InputError(source, field_name, f"unknown model {name!r} (closest known: {', '.join(close)}; add it to "
                     "configs/models/aliases.yaml or pass model=)")


def _check_keys(doc: dict, known: tuple, path: Path, where: str) -> None:
    extra = [k for k in doc if k not in known]
    if extra:
        raise InputError(path, f"{where}{extra[0]}", f"unknown key (BLIS trace headers are strict; known: "
                         f"{', '.join(known)})")


def _pos_int(v: object, path: Path, name: str, *, zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
        raise InputError(path, name, f"expected an integer >= {0 if zero else 1}, got {v!r}")
    return v


def read_blis_header(path: str | Path) -> dict:
    """The header YAML, checked (see the module docstring): a dict as read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise InputError(path, None, "expected a YAML mapping (a BLIS trace header)")
    ver = doc.get("trace_version")
    if ver not in TRACE_VERSIONS or isinstance(ver, bool):
        raise InputError(path, "trace_version", "missing" if ver is None else f"unsupported version {ver!r} "
                         f"(rooflab reads {', '.join(map(str, TRACE_VERSIONS))})")
    _check_keys(doc, HEADER_KEYS, path, "")
    unit = doc.get("time_unit")
    if unit is not None and str(unit) not in TIME_UNITS:
        raise InputError(path, "time_unit", f"unknown unit {unit!r} (expected us or microseconds)")
    if doc.get("mode") not in (None, *MODES):
        raise InputError(path, "mode", f"unknown mode {doc['mode']!r} (expected {', '.join(MODES)})")
    _pos_int(doc.get("warm_up_requests", 0), path, "warm_up_requests", zero=True)
    for block, keys in (("server", SERVER_KEYS), ("network", NETWORK_KEYS)):
        if not isinstance(doc.get(block) or {}, dict):
            raise InputError(path, block, "expected a mapping")
        _check_keys(doc.get(block) or {}, keys, path, f"{block}.")
    server = doc.get("server") or {}
    for k in ("tensor_parallel", "max_num_seqs", "block_size", "max_model_len"):
        if k in server:
            _pos_int(server[k], path, f"server.{k}", zero=True)
    if "gpu_memory_utilization" in server:
        u = server["gpu_memory_utilization"]
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 <= u <= 1:
            raise InputError(path, "server.gpu_memory_utilization", f"expected a number in (0, 1], got {u!r}")
    return doc


def _read_rows(path: Path, required: tuple) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise InputError(path, None, "file not found")
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 text") from None
    except csv.Error as exc:
        raise InputError(path, None, f"malformed CSV: {exc}") from None
    if not rows:
        raise InputError(path, None, "empty file (no header row)")
    head = [c.strip() for c in rows[0]]
    missing = [c for c in required if c not in head]
    if missing:
        raise InputError(path, missing[0], "missing column")
    body = [r for r in rows[1:] if r]
    for i, r in enumerate(body):
        if len(r) < len(head):
            raise InputError(path, None, f"row {i + 1} has {len(r)} columns, the header has {len(head)}")
    return head, body


def _ints(col: list[str], path: Path, name: str) -> np.ndarray:
    out = np.empty(len(col), dtype=np.int64)
    for i, s in enumerate(col):
        try:
            out[i] = int(s.strip())
        except ValueError:
            raise InputError(path, name, f"row {i + 1}: {s!r} is not an integer") from None
        if out[i] < 0:
            raise InputError(path, name, f"row {i + 1}: negative value {out[i]}")
    return out


def read_itl_means(path: str | Path) -> dict[int, float]:
    """Per request: the mean non-negative chunk-to-chunk delta (µs) of an ITL CSV, chunks in index order (as
    ``blis calibrate`` computes real ITL); requests with < 2 chunks or only negative deltas are left out."""
    path = Path(path)
    head, body = _read_rows(path, ITL_COLUMNS)
    cols = {c: _ints([r[head.index(c)] for r in body], path, c) for c in ITL_COLUMNS}
    df = pd.DataFrame(cols).sort_values(["request_id", "chunk_index"], kind="stable")
    d = df.groupby("request_id")["timestamp_us"].diff()
    d = d[d.notna() & (d >= 0)]
    means = d.groupby(df.loc[d.index, "request_id"]).mean()
    return {int(k): float(v) for k, v in zip(means.index.to_numpy(dtype=np.int64), means.to_numpy(dtype=float))}


def _spec_concurrency(header: dict, folder: Path) -> int | None:
    """The users of a workload spec file whose clients are all concurrency clients (None if unreadable)."""
    spec = header.get("workload_spec")
    if not spec or str(spec).startswith("preset:"):
        return None
    p = Path(str(spec))
    p = p if p.is_absolute() else folder / p
    try:
        clients = (yaml.safe_load(p.read_text()) or {}).get("clients") or []
        conc = [int(c.get("concurrency") or 0) for c in clients]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None
    return sum(conc) if conc and all(c > 0 for c in conc) else None


def infer_concurrency_cap(trace: Trace, *, min_share: float = 0.8, min_queue_share: float = 0.05,
                          queue_tol_us: float = 1000.0) -> int | None:
    """A closed-loop client's concurrency cap N, recognised from the requests, or None.

    In flight = [arrival_us, arrival_us + e2e_us) of the requests with a known E2E; N = the most ever in flight;
    the window is first to last send (the ramp-down after the last send is left out). A cap is reported when
    * requests queue at the client (``scheduled_arrival_us`` more than ``queue_tol_us`` before the send) for at
      least ``min_queue_share`` of the window and N are in flight for ``min_share`` of that queued time (a
      rate-driven client held back by ``--max-concurrency``), or
    * with no visible queue, N are in flight for ``min_share`` of the window (N users that send again as soon as
      a reply ends: ``--concurrency N`` without think time).
    Needs at least 2N requests. Limits: users with think time are not pinned at N and a cap the load never
    reaches is invisible (both give None); failed requests without an end time do not count as in flight, so a
    trace with many of them can read low; the result is the cap that bound, a lower bound of the flag's value."""
    r = trace.requests
    e2e = r["e2e_us"].to_numpy(dtype=float)
    ok = np.isfinite(e2e) & np.isfinite(r["arrival_us"].to_numpy(dtype=float))
    s = r["arrival_us"].to_numpy(dtype=float)[ok]
    e = s + e2e[ok]
    if len(s) < 4:
        return None
    if "scheduled_arrival_us" in r:
        sched = r["scheduled_arrival_us"].to_numpy(dtype=float)[ok]
        q = np.isfinite(sched) & (s - sched > queue_tol_us)
        qs, qe = np.sort(sched[q]), np.sort(s[q])
    else:
        qs = qe = np.empty(0)
    t0, t1 = float(s.min()), float(s.max())
    if t1 <= t0:
        return None
    cuts = np.unique(np.concatenate([s, e, qs, qe]))
    cuts = np.unique(np.clip(cuts, t0, t1))
    left, dt = cuts[:-1], np.diff(cuts)
    s_sorted, e_sorted = np.sort(s), np.sort(e)
    level = np.searchsorted(s_sorted, left, "right") - np.searchsorted(e_sorted, left, "right")
    waiting = np.searchsorted(qs, left, "right") - np.searchsorted(qe, left, "right")
    n_cap = int(level.max()) if len(level) else 0
    if n_cap < 1 or len(s) < 2 * n_cap:
        return None
    span, at_cap = t1 - t0, level == n_cap
    queued = waiting > 0
    q_time = float(dt[queued].sum())
    if q_time >= min_queue_share * span:
        return n_cap if float(dt[queued & at_cap].sum()) >= min_share * q_time else None
    return n_cap if float(dt[at_cap].sum()) >= min_share * span else None


def read_blis_trace(path: str | Path, *, hardware: str | None = None, tp: int | None = None,
                    engine_overrides: dict | None = None, model: str | None = None,
                    itl: str | Path | None = None) -> BlisTrace:
    """A BLIS trace (folder, header or data CSV; see :func:`find_blis_trace`) as a rooflab trace. ``hardware``:
    BLIS traces do not record it (H100-SXM is assumed, with a warning); ``tp`` / ``model`` override the header;
    ``engine_overrides``: EngineConfig fields over the header's ``server`` settings."""
    files = find_blis_trace(path, itl)
    header = read_blis_header(files.header)
    hp, dp = files.header, files.data
    warnings: list[str] = []
    notes = [f"BLIS trace v{header['trace_version']} ({header.get('mode') or 'mode unrecorded'}): {hp.name} + "
             f"{dp.name}" + (f" + {files.itl.name}" if files.itl else "")]
    if header.get("time_unit") is None:
        warnings.append(f"{hp}: no time_unit; microseconds assumed")
    server = header.get("server") or {}
    head, body = _read_rows(dp, REQUIRED_COLUMNS)
    if not body:
        raise InputError(dp, None, "no requests (the CSV has only its header row)")
    col = {c: [r[i] for r in body] for i, c in enumerate(head)}
    rid = _ints(col["request_id"], dp, "request_id")
    dup = pd.Series(rid).duplicated()
    if dup.any():
        raise InputError(dp, "request_id", f"row {int(np.flatnonzero(dup)[0]) + 1}: duplicate id {rid[dup][0]}")
    plen, inp, outp, sin = (_ints(col[c], dp, c) for c in ("prefix_length", "input_tokens", "output_tokens",
                                                            "server_input_tokens"))
    arr, send, first, last = (_ints(col[c], dp, c) for c in ("arrival_time_us", "send_time_us",
                                                              "first_chunk_time_us", "last_chunk_time_us"))
    status = np.array([s.strip() for s in col["status"]], dtype=object)
    group = np.array([g.strip() for g in col["prefix_group"]], dtype=object)
    ok = status == "ok"
    start0 = np.where(send > 0, send, arr)
    for name, bad, what in (("first_chunk_time_us", first <= 0, "status ok but no first chunk time"),
                            ("last_chunk_time_us", last < start0, "before the send time"),
                            ("first_chunk_time_us", first < start0, "before the send time"),
                            ("last_chunk_time_us", last < first, "before the first chunk")):
        if (ok & bad).any():
            raise InputError(dp, name, f"row {int(np.flatnonzero(ok & bad)[0]) + 1}: {what}")
    sent = send > 0
    origin = int((send - arr)[sent].min()) if sent.any() else 0  # scheduled offset -> send clock
    start = np.where(sent, send, arr + origin).astype(float)
    sched = (arr + origin).astype(float)
    client = plen + inp
    prompt = np.where(sin > 0, sin, client)
    if (prompt < 1).any():
        i = int(np.flatnonzero(prompt < 1)[0])
        raise InputError(dp, "input_tokens", f"row {i + 1}: the request has no prompt tokens")
    differ = (sin > 0) & (sin != client)
    if differ.any():
        notes.append(f"{int(differ.sum())} of {int((sin > 0).sum())} requests: the server's prompt_tokens differ "
                     f"from the client's prefix_length + input_tokens (median {np.median((sin - client)[differ]):+g}"
                     " tokens); the server's count is used")
    out = outp.astype(float)
    if (ok & (outp < 1)).any():
        notes.append(f"{int((ok & (outp < 1)).sum())} completed requests reported 0 output tokens; replayed as 1")
    fill = ~ok & (outp < 1)
    if fill.any():
        want = float(round(np.median(outp[ok]))) if ok.any() and (outp[ok] > 0).any() else 1.0
        out = np.where(fill, want, out)
        notes.append(f"{int(fill.sum())} failed requests given the completed requests' median output {want:g}")
    out = np.maximum(out, 1.0)
    ttft = np.where(ok, first - start, np.nan)
    e2e = np.where(ok, last - start, np.nan)
    if header.get("mode") == "real" and "streaming" in col:
        streamed = np.array([s.strip().lower() not in _FALSE for s in col["streaming"]])
        if (ok & ~streamed).any():
            ttft = np.where(streamed, ttft, np.nan)
            warnings.append(f"{int((ok & ~streamed).sum())} requests were not streamed: no measured TTFT for them")
    itl_us = request_itl(ttft, e2e, outp.astype(float))
    if files.itl is not None:
        means = read_itl_means(files.itl)
        got = np.array([means.get(int(i), np.nan) for i in rid])
        itl_us = np.where(ok & np.isfinite(got), got, itl_us)
        unknown = set(means) - set(rid.tolist())
        if unknown:
            warnings.append(f"{files.itl}: {len(unknown)} requests not in the trace (ignored)")
        notes.append(f"ITL of {int((ok & np.isfinite(got)).sum())} requests from chunk times ({files.itl.name})")
    warm = int(header.get("warm_up_requests") or 0)
    scored = rid >= warm
    if warm and scored.all():
        notes.append(f"warm_up_requests {warm}: none recorded (observe leaves them out)")
    elif warm:
        notes.append(f"{int((~scored).sum())} warm-up requests (id < {warm}) not scored")
    reqs = pd.DataFrame({
        "request_id": rid.astype(str), "arrival_us": start, "prompt_tokens": prompt.astype(float),
        "output_tokens": out, "prefix_group": np.where(group != "", group, np.array(None, dtype=object)),
        "prefix_tokens": np.where(group != "", np.minimum(plen, prompt), 0).astype(float), "failed": ~ok,
        "ttft_us": ttft, "e2e_us": e2e, "itl_us": itl_us, "scored": scored, "scheduled_arrival_us": sched,
        "status": status})
    for c in ("client_id", "session_id", "slo_class"):
        if c in col:
            reqs[c] = [v.strip() for v in col[c]]
    reqs = reqs.iloc[np.argsort(start, kind="stable")].reset_index(drop=True)
    t_min = float(reqs["arrival_us"].min())
    reqs["arrival_us"] -= t_min
    reqs["scheduled_arrival_us"] -= t_min
    if model is not None:
        model = resolve_blis_model(model, None, "model")
    elif server.get("model"):
        model = resolve_blis_model(server["model"], hp, "server.model")
    else:
        names = {m.strip() for m in col.get("model", [])} - {""}
        if len(names) != 1:
            raise InputError(hp, "server.model", "missing: the trace does not name its model (pass model=)")
        model = resolve_blis_model(names.pop(), dp, "model")
    tp = (server.get("tensor_parallel") or None) if tp is None else tp
    if tp is None:
        raise InputError(hp, "server.tensor_parallel", "missing: the trace does not record TP (pass tp=)")
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
        raise InputError(None, "tp", f"expected an integer >= 1, got {tp!r}")
    engine = {k: server[k] for k in ("max_num_seqs", "block_size", "gpu_memory_utilization", "max_model_len")
              if server.get(k)}
    for k, v in (engine_overrides or {}).items():
        if k not in ENGINE_KEYS:
            raise InputError(None, f"engine_overrides.{k}", f"unknown engine setting (known: {', '.join(ENGINE_KEYS)})")
        engine[k] = v
    if hardware is None:
        hardware = "H100-SXM"
        warnings.append("BLIS traces do not record the hardware: H100-SXM assumed (pass hardware=)")
    if header.get("kv_offload"):
        warnings.append(f"{hp}: the trace ran with KV offload (kv_offload), which rooflab does not model")
    timeout_s = None
    if "deadline_us" in col:
        dl = _ints(col["deadline_us"], dp, "deadline_us")
        rel = (dl - arr)[dl > 0]
        if (dl > 0).all() and rel.max() - rel.min() <= 1000:
            timeout_s = float(np.median(rel)) / 1e6
            notes.append(f"client timeout {timeout_s:g} s from deadline_us")
    run_id = dp.parent.name if dp.stem == "trace" and dp.parent.name else dp.stem
    trace = Trace(run_id, model, int(tp), hardware, engine, reqs, timeout_s, header.get("workload_spec"), None,
                  str(dp), notes)
    cap, how = _spec_concurrency(header, hp.parent), "workload_spec"
    if cap is None:
        cap, how = infer_concurrency_cap(trace), "inferred"
    if cap is not None:
        notes.append(f"client concurrency cap {cap} ({'from the workload spec' if how == 'workload_spec' else
                                                      'inferred from the in-flight requests'})")
    return BlisTrace(trace, cap, header, warnings, files, how if cap is not None else None)
