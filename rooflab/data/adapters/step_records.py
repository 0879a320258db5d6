"""Aggregated step records (``step.BATCH_SUMMARY`` rows of the instrumented vLLM, one row per sampled
step, batch aggregates only) -> step table. The format of ``../shared/data/real/steps/``.

* Step time = **cycle time**: ``step.ts_start_ns`` of step k+1 minus that of step k, only where both
  consecutive step ids were sampled (NaN otherwise). ``step.duration_us`` is scheduler CPU time and is
  never used.
* The records hold no per-request context. Stated assumption: the KV cache's used blocks × 16 hold the
  decodes' contexts plus the tokens scheduled this step (vLLM allocates their slots at schedule time),
  with half a block of slack per scheduled request; the prefills' earlier chunks are taken as 0 (with a
  2048-token budget most prompts run in one chunk). So Σ decode context ≈ used·16 − T_pf − |D| − 8·B.
* Prefix-cache hits are not in the records: ``prefill_tokens`` is what vLLM computed (hits excluded), and
  ``prefill_cached_tokens`` is NaN — unknown, which the fit's data-coverage check reports as such.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

import numpy as np
import pandas as pd

from rooflab.data.tables import validate_steps
from rooflab.errors import InputError
from rooflab.model.arch import resolve_model_name

BLOCK_SIZE = 16
REQUIRED = ("step.id", "step.ts_start_ns", "batch.num_prefill_reqs", "batch.num_decode_reqs",
            "batch.prefill_tokens", "kv.usage_gpu_ratio", "kv.blocks_total_gpu", "experiment_id", "model", "tp")


def is_step_records(columns: Container[str]) -> bool:
    return "step.id" in columns and "step.ts_start_ns" in columns


def read_step_records(path: str | Path, *, hardware: str = "H100-SXM") -> pd.DataFrame:
    path = Path(path)
    try:
        raw = pd.read_parquet(path)
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(path, None, f"not a readable Parquet file ({type(exc).__name__})") from None
    return step_records_to_steps(raw, source=str(path), hardware=hardware)


def step_records_to_steps(raw: pd.DataFrame, *, source: str, hardware: str = "H100-SXM") -> pd.DataFrame:
    for col in REQUIRED:
        if col not in raw.columns:
            raise InputError(source, col, "required step-record column is missing")
    dup = raw.duplicated(["experiment_id", "step.id"], keep=False).to_numpy()
    if dup.any():  # a step recorded twice would be fitted twice (and breaks the cycle times around it)
        i = int(dup.argmax())
        raise InputError(source, "experiment_id, step.id", f"step ({raw['experiment_id'].iloc[i]}, "
                         f"{raw['step.id'].iloc[i]}) appears more than once ({int(dup.sum())} duplicated rows in "
                         "all): each step must appear once")
    df = raw.sort_values(["experiment_id", "step.id"], kind="stable").reset_index(drop=True)
    run = df["experiment_id"].astype(str).to_numpy()
    sid = df["step.id"].to_numpy(dtype=np.int64)
    ts = df["step.ts_start_ns"].to_numpy(dtype=np.float64)
    same_run_next = np.r_[run[1:] == run[:-1], False]
    consecutive = same_run_next & np.r_[sid[1:] == sid[:-1] + 1, False]
    cycle_us = np.full(len(df), np.nan)
    nxt = np.r_[ts[1:], np.nan]
    cycle_us[consecutive] = (nxt[consecutive] - ts[consecutive]) / 1e3
    cycle_us[~(cycle_us > 0)] = np.nan  # a non-increasing clock is not a step time

    n_pf = df["batch.num_prefill_reqs"].to_numpy(dtype=np.float64)
    n_dc = df["batch.num_decode_reqs"].to_numpy(dtype=np.float64)
    t_pf = df["batch.prefill_tokens"].to_numpy(dtype=np.float64)
    usage = df["kv.usage_gpu_ratio"].to_numpy(dtype=np.float64)
    blocks = df["kv.blocks_total_gpu"].to_numpy(dtype=np.float64)
    kv_tokens = usage * blocks * BLOCK_SIZE
    decode_ctx = np.clip(kv_tokens - t_pf - n_dc - 0.5 * BLOCK_SIZE * (n_pf + n_dc), n_dc, None)

    steps = pd.DataFrame({
        "run_id": run, "step_id": sid, "model": df["model"].astype(str).map(resolve_model_name).to_numpy(),
        "tp": df["tp"].to_numpy(dtype=np.int64), "hardware": hardware,
        "t_start_us": ts / 1e3, "step_time_us": cycle_us,
        "prefill_reqs": n_pf, "prefill_tokens": t_pf, "prefill_context": np.zeros(len(df)),
        "decode_reqs": n_dc, "decode_context": decode_ctx,
        "kv_usage": usage,
        "preemptions": df["batch.num_preempted"].to_numpy(dtype=np.float64) if "batch.num_preempted" in df else 0.0,
        "running": df["queue.running_depth"].to_numpy(dtype=np.float64) if "queue.running_depth" in df else np.nan,
        "waiting": df["queue.waiting_depth"].to_numpy(dtype=np.float64) if "queue.waiting_depth" in df else np.nan,
        "workload": df["workload"].astype(str).to_numpy() if "workload" in df else "-",
    })
    return validate_steps(steps, source)
