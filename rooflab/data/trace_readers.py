"""Readers of request traces (:class:`rooflab.data.traces.Trace`) from every source rooflab knows, and one
dispatcher (:func:`read_trace`) that recognises the source from the path: the real runs
(:mod:`rooflab.data.adapters.real_requests`), data store runs, BLIS ``observe`` / ``run`` / ``replay`` traces
(:mod:`rooflab.data.adapters.blis_trace`), inference-perf's per-request output
(:mod:`rooflab.data.adapters.inference_perf`) and rooflab request tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from rooflab.data.adapters import read_requests
from rooflab.data.adapters.blis_trace import is_blis_trace, read_blis_trace
from rooflab.data.adapters.inference_perf import read_per_request
from rooflab.data.adapters.real_requests import DEFAULT_ROOT, RealRun, read_real_run
from rooflab.data.store import Store
from rooflab.data.tables import validate_requests
from rooflab.data.traces import ENGINE_KEYS, Trace, request_itl
from rooflab.errors import InputError


def trace_from_real(run: RealRun, prefix: str = "prompt") -> Trace:
    """A :class:`~rooflab.data.adapters.real_requests.RealRun` as a trace.

    ``prefix``: how the replay's prefix cache sees the prompts. inference-perf's shared_prefix workload
    sends request i the prompt slot i mod 100, so a prompt repeats every 100 requests and vLLM's prefix
    cache can hold all of it: ``prompt`` (default) makes each slot its own prefix group covering the whole
    prompt; ``system`` shares only the system prompt within its group (slot // prompts per group);
    ``none`` turns the cache off."""
    if prefix not in ("prompt", "system", "none"):
        raise InputError(None, "prefix", f"expected prompt, system or none, got {prefix!r}")
    q = run.requests
    notes = []
    prompt = q["prompt_tokens"].to_numpy(dtype=float)
    fill = np.isnan(prompt)
    if fill.any():
        prompt = np.where(fill, q["slot_prompt_tokens"].to_numpy(dtype=float), prompt)
        still = np.isnan(prompt)
        if still.any():
            prompt[still] = float(np.nanmedian(prompt))
        notes.append(f"{int(fill.sum())} failed requests sized from their prompt slot's length")
    out = q["output_tokens"].to_numpy(dtype=float)
    if np.isnan(out).any():
        sp = run.shared_prefix or {}
        want = float(sp.get("output_len") or np.nanmedian(out))
        notes.append(f"{int(np.isnan(out).sum())} failed requests given the workload's output_len {want:g}")
        out = np.where(np.isnan(out), want, out)
    out = np.maximum(out, 1.0)
    slot = q["prompt_id"].to_numpy()
    sp = run.shared_prefix or {}
    no_group = np.array(None, dtype=object)  # (not a bare None: numpy's stubs read where(c, x, None) as where(c))
    if prefix == "prompt" and (slot >= 0).any():
        group = np.where(slot >= 0, "slot" + pd.Series(slot).astype(str).to_numpy(), no_group)
        ptoks = prompt
    elif prefix == "system" and (slot >= 0).any() and sp.get("num_prompts_per_group"):
        names = "sys" + pd.Series(slot // int(sp["num_prompts_per_group"])).astype(str).to_numpy()
        group = np.where(slot >= 0, names, no_group)
        ptoks = np.minimum(q["prefix_tokens"].fillna(0).to_numpy(dtype=float), prompt)
    else:
        group = np.full(len(q), None, dtype=object)
        ptoks = np.zeros(len(q))
    failed = q["error"].to_numpy(dtype=bool)
    reqs = pd.DataFrame({
        "request_id": q["request_id"].astype(str).to_numpy(), "arrival_us": q["arrival_us"].to_numpy(dtype=float),
        "prompt_tokens": prompt, "output_tokens": out, "prefix_group": group, "prefix_tokens": ptoks,
        "failed": failed, "ttft_us": q["ttft_us"].to_numpy(dtype=float), "e2e_us": q["e2e_us"].to_numpy(dtype=float),
        "itl_us": q["itl_us"].to_numpy(dtype=float)})
    v = run.vllm
    engine = {"max_num_seqs": int(v.get("max_num_seqs", 256)),
              "max_num_batched_tokens": int(v.get("max_num_batched_tokens", 2048)),
              "block_size": int(v.get("block_size", 16)), "num_gpu_blocks": int(v["kv_blocks_total_gpu"]),
              "max_model_len": int(v.get("max_model_len", 4096)),
              "enable_prefix_caching": bool(v.get("enable_prefix_caching", False)) and prefix != "none"}
    timeout = None
    if failed.any():
        fe = q.loc[failed, "e2e_us"].to_numpy(dtype=float) / 1e6
        fe = fe[np.isfinite(fe)]
        if len(fe) and (np.abs(fe - np.median(fe)) < 5.0).mean() > 0.9:  # failures cluster: a client timeout
            timeout = float(np.floor(np.min(fe[np.abs(fe - np.median(fe)) < 5.0])))
            notes.append(f"client timeout {timeout:g} s inferred from {len(fe)} failed requests' E2E")
    return Trace(run.run_id, run.model, run.tp, run.hardware, engine, reqs, timeout, run.workload, run.split,
                 run.sources.get("requests", run.run_id), notes)


def read_real_trace(name: str | Path, root: str | Path | None = None, prefix: str = "prompt") -> Trace:

    return trace_from_real(read_real_run(name, root or DEFAULT_ROOT), prefix)


def trace_from_request_table(table: pd.DataFrame, *, run_id: str, model: str, tp: int, hardware: str,
                             engine: dict, source: str = "", split: str | None = None,
                             workload: str | None = None) -> Trace:
    """A rooflab request table (docs/spec.md §2; data store runs): measured TTFT = first_token − arrived, E2E =
    departed − arrived (the server's API clock)."""

    t = validate_requests(table, source or run_id)
    t = t[t["arrived_us"].notna()].sort_values("arrived_us", kind="stable")
    if len(t) == 0:
        raise InputError(source or run_id, "arrived_us", "no request has an arrival time")
    arr = t["arrived_us"].to_numpy(dtype=float)
    ttft = t["first_token_us"].to_numpy(dtype=float) - arr
    e2e = t["departed_us"].to_numpy(dtype=float) - arr
    out = t["output_tokens"].to_numpy(dtype=float)
    failed = ~t["status"].astype(str).isin(["ok", "length", "stop"]).to_numpy()
    reqs = pd.DataFrame({"request_id": t["request_id"].astype(str).to_numpy(), "arrival_us": arr,
                         "prompt_tokens": t["prompt_tokens"].to_numpy(dtype=float),
                         "output_tokens": np.maximum(np.nan_to_num(out, nan=1.0), 1.0),
                         "prefix_group": None, "prefix_tokens": 0.0, "failed": failed,
                         "ttft_us": ttft, "e2e_us": e2e, "itl_us": request_itl(ttft, e2e, out)})
    bad = reqs["prompt_tokens"].isna() | (reqs["prompt_tokens"] < 1)
    if bad.any():
        raise InputError(source or run_id, f"prompt_tokens[{int(np.flatnonzero(bad)[0])}]", "missing or < 1")
    return Trace(run_id, model, int(tp), hardware, dict(engine), reqs.reset_index(drop=True), None, workload, split,
                 source or run_id)


def read_store_trace(store: Store | str | Path, run_id: str) -> Trace:
    """A data store run (``<store>/runs/<run_id>``) as a trace: its request table and the manifest's settings."""

    st = store if isinstance(store, Store) else Store(store)
    m = st.manifest(run_id)
    path = st.run_dir(run_id).path
    if m is None:
        raise InputError(path, "manifest.json", "missing: not a complete data store run")
    table_path = path / "tables" / "requests.parquet"
    if not table_path.is_file():
        raise InputError(table_path, None, "file not found (the run has no request table)")
    table = pd.read_parquet(table_path)
    table["run_id"] = run_id
    engine = {k: v for k, v in (m.get("point", {}).get("engine") or {}).items() if k in ENGINE_KEYS}
    return trace_from_request_table(table, run_id=run_id, model=m["model"], tp=int(m["tp"]), hardware=m["hardware"],
                                    engine=engine, source=str(table_path), split=m.get("split"),
                                    workload=m.get("family"))


def read_inference_perf(path: str | Path, *, model: str, tp: int, hardware: str = "H100-SXM",
                        engine: dict | None = None, time_scale: float = 1.0, run_id: str | None = None) -> Trace:
    """inference-perf's per-request lifecycle output (``per_request_lifecycle_metrics.json``, read by
    :func:`rooflab.data.adapters.inference_perf.read_per_request`) as a trace. TTFT = first chunk − start,
    E2E = end − start (× ``time_scale`` for an accelerated twin)."""
    path = Path(path)
    df = read_per_request(path, require_streamed=True).sort_values("start_s", kind="stable").reset_index(drop=True)
    s = float(time_scale)
    arr = (df["start_s"] - df["start_s"].min()).to_numpy() * s * 1e6
    failed = df["error"].to_numpy(dtype=bool)
    ttft = np.where(failed, np.nan, (df["first_chunk_s"] - df["start_s"]).to_numpy() * s * 1e6)
    e2e = (df["end_s"] - df["start_s"]).to_numpy() * s * 1e6
    out = df["output_tokens"].to_numpy(dtype=float)
    reqs = pd.DataFrame({"request_id": df["index"].astype(str), "arrival_us": arr, "prompt_tokens": df["input_tokens"],
                         "output_tokens": np.maximum(np.nan_to_num(out, nan=1.0), 1.0), "prefix_group": None,
                         "prefix_tokens": 0.0, "failed": failed, "ttft_us": ttft, "e2e_us": e2e,
                         "itl_us": request_itl(ttft, e2e, out)})
    return Trace(run_id or path.parent.name, model, int(tp), hardware, dict(engine or {}), reqs, None, None, None,
                 str(path))


def read_trace(spec: str | Path, *, root: str | Path | None = None, prefix: str = "prompt", model: str | None = None,
               tp: int | None = None, hardware: str | None = None, engine: dict | None = None,
               time_scale: float | None = None, max_concurrency: int | None = None) -> Trace:
    """Any supported request trace: a BLIS ``observe`` / ``run`` / ``replay`` trace (its folder, header or CSV;
    the model and TP come from the header, a concurrency cap from its workload spec or the data), a real run
    (name, request file or ``runs/<run>`` folder under the real data root), a data store run folder
    (``<store>/runs/<id>``, with ``manifest.json``), an inference-perf ``per_request_lifecycle_metrics.json``, or a
    rooflab request table (.parquet/.csv, needs model/tp). ``hardware``: the GPU where the source does not say
    (default H100-SXM). ``max_concurrency``: a client concurrency cap to replay with (overrides one found)."""
    p = Path(spec)
    if is_blis_trace(p):
        bt = read_blis_trace(p, hardware=hardware, tp=tp, engine_overrides=engine, model=model)
        tr = bt.trace
        tr.notes = list(tr.notes) + list(bt.warnings)
        tr.max_concurrency = max_concurrency or bt.max_concurrency
        if bt.max_concurrency and not max_concurrency:
            tr.notes.append(f"client concurrency cap {bt.max_concurrency} ({bt.concurrency_source}): replayed with it")
        return tr
    hardware = hardware or "H100-SXM"
    if p.is_dir() and (p / "manifest.json").is_file():
        return read_store_trace(p.parent.parent, p.name)
    if p.suffix == ".json" and p.is_file():
        scale = time_scale
        if p.parent.name == "inference-perf" and (p.parent.parent / "manifest.json").is_file():
            m = json.loads((p.parent.parent / "manifest.json").read_text())
            model, tp, hardware = model or m["model"], tp or int(m["tp"]), m.get("hardware", hardware)
            engine = engine or {k: v for k, v in (m.get("point", {}).get("engine") or {}).items() if k in ENGINE_KEYS}
            scale = scale or float((m.get("inference_perf") or {}).get("time_scale") or 1.0)
        if model is None or tp is None:
            raise InputError(p, None, "an inference-perf file does not name the model and TP: pass --model and --tp")
        return read_inference_perf(p, model=model, tp=tp, hardware=hardware, engine=engine, time_scale=scale or 1.0)
    if p.suffix in (".parquet", ".csv") and p.is_file():
        if model is None or tp is None:
            raise InputError(p, None, "a request table does not name the model and TP: pass --model and --tp")
        return trace_from_request_table(read_requests(p), run_id=p.stem, model=model, tp=tp, hardware=hardware,
                                        engine=engine or {}, source=str(p))
    tr = read_real_trace(spec, root, prefix)
    if max_concurrency:
        tr.max_concurrency = max_concurrency
    return tr
