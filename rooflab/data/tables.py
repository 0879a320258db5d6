"""The step and request tables (docs/spec.md §2) and their checks.

steps — one row per scheduler step. Columns (``STEP_COLUMNS``): identity and setting (run_id, step_id,
model, tp, hardware), the fit target ``step_time_us`` (the cycle time, or a measured step end − start; NaN
where unknown), the batch aggregates the features need, and saturation signals. ``prefill_tokens`` counts
*computed* tokens only; ``prefill_cached_tokens`` is how many prompt tokens of the requests whose first chunk
ran in the step were served from the prefix cache instead (NaN: the source cannot say).

requests — one row per request: run_id, request_id, timestamps in µs on one clock (arrived, queued,
scheduled, first_token, finished, departed; NaN where the source lacks them), prompt/output tokens,
preemptions, status.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from rooflab.errors import InputError

STEP_COLUMNS = {
    "run_id": "string", "step_id": "int64", "model": "string", "tp": "int64", "hardware": "string",
    "t_start_us": "float64", "step_time_us": "float64",
    "prefill_reqs": "float64", "prefill_tokens": "float64", "prefill_context": "float64",
    "prefill_attn_pairs": "float64", "prefill_logits": "float64", "prefill_prompt_pairs": "float64",
    "decode_reqs": "float64", "decode_context": "float64", "prefill_cached_tokens": "float64",
    "kv_usage": "float64", "preemptions": "float64", "running": "float64", "waiting": "float64",
}
_STEP_REQUIRED = ("run_id", "step_id", "model", "tp", "hardware", "step_time_us", "prefill_reqs",
                  "prefill_tokens", "prefill_context", "decode_reqs", "decode_context")
_STEP_DEFAULTS = {"t_start_us": np.nan, "prefill_attn_pairs": np.nan, "prefill_logits": np.nan,
                  "prefill_prompt_pairs": np.nan, "prefill_cached_tokens": np.nan,
                  "kv_usage": np.nan, "preemptions": 0.0, "running": np.nan, "waiting": np.nan}
_NON_NEGATIVE = ("prefill_reqs", "prefill_tokens", "prefill_context", "decode_reqs", "decode_context",
                 "preemptions", "prefill_cached_tokens")

REQUEST_COLUMNS = {
    "run_id": "string", "request_id": "string",
    "arrived_us": "float64", "queued_us": "float64", "scheduled_us": "float64", "first_token_us": "float64",
    "finished_us": "float64", "departed_us": "float64",
    "prompt_tokens": "float64", "output_tokens": "float64", "preemptions": "float64", "status": "string",
}
_REQUEST_REQUIRED = ("run_id", "request_id", "prompt_tokens", "output_tokens")


def _coerce(df: pd.DataFrame, columns: dict, required: tuple[str, ...], defaults: dict, source: str,
            kind: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise InputError(source, None, f"{kind} table must be a DataFrame")
    for col in required:
        if col not in df.columns:
            raise InputError(source, col, f"required {kind} column is missing")
    out = pd.DataFrame(index=df.index)
    for col, dtype in columns.items():
        if col in df.columns:
            try:
                out[col] = df[col].astype(dtype)
            except (TypeError, ValueError) as exc:
                raise InputError(source, col, f"cannot read as {dtype}: {exc}".splitlines()[0]) from None
        else:
            out[col] = defaults.get(col, np.nan)
            out[col] = out[col].astype(dtype)
    extra = [c for c in df.columns if c not in columns]
    for col in extra:  # keep caller metadata (workload, split, ...) untouched
        out[col] = df[col]
    return out.reset_index(drop=True)


def validate_steps(df: pd.DataFrame, source: str = "<steps>") -> pd.DataFrame:
    """Return ``df`` with the step-table dtypes; one-line :class:`InputError` on bad columns or values."""
    out = _coerce(df, STEP_COLUMNS, _STEP_REQUIRED, _STEP_DEFAULTS, source, "step")
    for col in _NON_NEGATIVE:
        bad = out[col] < 0
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(source, col, f"negative value {out[col].iloc[i]} (row {i})")
    bad = (out["tp"] < 1)
    if bad.any():
        raise InputError(source, "tp", "tensor-parallel degree must be >= 1")
    st = out["step_time_us"]
    if (st <= 0).any():
        i = int(np.flatnonzero((st <= 0).to_numpy())[0])
        raise InputError(source, "step_time_us", f"non-positive step time {st.iloc[i]} (row {i})")
    return out


def validate_requests(df: pd.DataFrame, source: str = "<requests>") -> pd.DataFrame:
    out = _coerce(df, REQUEST_COLUMNS, _REQUEST_REQUIRED, {"preemptions": 0.0, "status": "ok"}, source, "request")
    for col in ("prompt_tokens", "output_tokens"):
        if (out[col] < 0).any():
            raise InputError(source, col, "negative token count")
    return out


def aggregate_entries(entries: pd.DataFrame, source: str = "<entries>") -> pd.DataFrame:
    """Reduce per-request step entries to the exact per-step aggregates the features use.

    ``entries``: one row per (run_id, step_id, request) with ``phase`` ('prefill'/'decode'), ``tokens``
    (scheduled this step), ``context_before`` (pre-step num_computed_tokens) and ``prompt_tokens``; optional
    ``cached_tokens``: prefix-cache hits of the request, on its first prefill entry only (0 elsewhere).
    Returns one row per (run_id, step_id) with prefill/decode counts, Σ tokens, Σ context, exact causal
    pairs Σ[n·c + n(n+1)/2] and the number of prefills whose last prompt chunk runs in the step.
    """
    for col in ("run_id", "step_id", "phase", "tokens", "context_before"):
        if col not in entries.columns:
            raise InputError(source, col, "required entry column is missing")
    phase = entries["phase"].astype(str).str.lower()
    unknown = ~phase.isin(["prefill", "decode"])
    if unknown.any():
        raise InputError(source, "phase", f"unknown phase {phase[unknown].iloc[0]!r} (expected prefill/decode)")
    n = entries["tokens"].to_numpy(dtype=np.float64)
    c = entries["context_before"].to_numpy(dtype=np.float64)
    pf = (phase == "prefill").to_numpy()
    if "prompt_tokens" in entries.columns:
        prompt = entries["prompt_tokens"].to_numpy(dtype=np.float64)
        last_chunk = pf & (c + n >= prompt)
        prompt_pairs = np.where(pf, n * (prompt + n / 2), 0.0)  # BLIS's attention term: chunk vs the FULL prompt
    else:
        last_chunk = np.full(len(n), np.nan)
        prompt_pairs = np.full(len(n), np.nan)
    frame = pd.DataFrame({
        "run_id": entries["run_id"].to_numpy(), "step_id": entries["step_id"].to_numpy(),
        "prefill_reqs": pf.astype(float), "prefill_tokens": np.where(pf, n, 0.0),
        "prefill_context": np.where(pf, c, 0.0), "prefill_attn_pairs": np.where(pf, n * c + n * (n + 1) / 2, 0.0),
        "prefill_logits": last_chunk.astype(float), "prefill_prompt_pairs": prompt_pairs,
        "decode_reqs": (~pf).astype(float), "decode_context": np.where(~pf, c, 0.0),
        "prefill_cached_tokens": (entries["cached_tokens"].to_numpy(dtype=np.float64) if "cached_tokens" in entries
                                  else np.full(len(n), np.nan)),
    })
    return frame.groupby(["run_id", "step_id"], sort=True, as_index=False).sum(min_count=1)


def with_cache_hits(entries: pd.DataFrame, first_scheduled: Mapping[str, int]) -> pd.DataFrame:
    """``entries`` (with ``request_id``) plus ``cached_tokens``: the request's computed tokens before the step on
    its prefill entry of the step it was first scheduled in — vLLM sets ``num_computed_tokens`` to the
    prefix-cache hits when it first schedules a request — and 0 on every other entry. ``first_scheduled``:
    request id -> that step. A resume after preemption that hits the cache again is not counted."""
    rid = entries["request_id"].astype(str).to_numpy()
    first = np.array([first_scheduled.get(r, -1) for r in rid], dtype=np.int64)
    pf = entries["phase"].astype(str).str.lower().to_numpy() == "prefill"
    at_first = pf & (entries["step_id"].to_numpy(dtype=np.int64) == first)
    return entries.assign(cached_tokens=np.where(at_first, entries["context_before"].to_numpy(dtype=np.float64), 0.0))


def phase_mix(steps: pd.DataFrame) -> pd.Series:
    """'prefill' (pure prefill), 'decode' (pure decode), 'mixed' or 'empty' per step."""
    has_pf = steps["prefill_tokens"].to_numpy() > 0
    has_dc = steps["decode_reqs"].to_numpy() > 0
    out = np.where(has_pf & has_dc, "mixed", np.where(has_pf, "prefill", np.where(has_dc, "decode", "empty")))
    return pd.Series(out, index=steps.index, name="phase_mix")
