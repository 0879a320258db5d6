"""Adapters: each turns one source format into rooflab's step and request tables (docs/spec.md §2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rooflab.data.tables import validate_requests, validate_steps
from rooflab.errors import InputError
from rooflab.model.arch import load_model


def tp_problem(model: str, tp: int) -> str | None:
    """Why vLLM would refuse tensor-parallel degree ``tp`` for ``model`` (None if it would not): TP must divide
    the attention heads, and the KV heads must divide TP or TP them (vLLM replicates KV heads when H_kv < TP;
    MLA has one latent KV, replicated)."""
    arch = load_model(model)
    if tp < 1:
        return f"tensor-parallel degree must be >= 1, got {tp}"
    if arch.n_heads % tp:
        return f"TP {tp} does not divide {arch.name}'s {arch.n_heads} attention heads (vLLM refuses it)"
    if arch.mla is None and arch.n_kv_heads % tp and tp % arch.n_kv_heads:
        return (f"TP {tp} and {arch.name}'s {arch.n_kv_heads} KV heads: neither divides the other "
                "(vLLM refuses it)")
    return None


def check_step_table(steps: pd.DataFrame, source: str) -> None:
    """What a fit needs of a step table beyond its columns: each (run_id, step_id) once (a duplicated step would
    be fitted twice), and TP degrees vLLM can run each model at. A one-line :class:`InputError` otherwise."""
    if {"run_id", "step_id"} <= set(steps.columns):
        dup = steps.duplicated(["run_id", "step_id"], keep=False).to_numpy()
        if dup.any():
            i = int(dup.argmax())
            run, step = steps["run_id"].iloc[i], steps["step_id"].iloc[i]
            n = int(((steps["run_id"] == run) & (steps["step_id"] == step)).sum())
            raise InputError(source, "run_id, step_id", f"step ({run}, {step}) appears {n} times "
                             f"({int(dup.sum())} duplicated rows in all): each step must appear once")
    if {"model", "tp"} <= set(steps.columns):
        for model, tp in steps[["model", "tp"]].drop_duplicates().itertuples(index=False):
            problem = tp_problem(str(model), int(tp))
            if problem:
                raise InputError(source, "tp", problem)


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, None, "file not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except Exception as exc:  # pyarrow / the csv parser raise many types for a corrupt file
        raise InputError(path, None, f"cannot read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    raise InputError(path, None, "unsupported file type (expected .parquet or .csv)")


def read_steps(path: str | Path, *, hardware: str = "H100-SXM") -> pd.DataFrame:
    """A step table from a file: aggregated step records (auto-detected) or a rooflab step table."""
    from rooflab.data.adapters.step_records import (
        is_step_records,
        step_records_to_steps,
    )

    path = Path(path)
    raw = _read_frame(path)
    if is_step_records(raw.columns):
        steps = step_records_to_steps(raw, source=str(path), hardware=hardware)
    else:
        steps = validate_steps(raw, str(path))
    check_step_table(steps, str(path))
    return steps


def read_requests(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return validate_requests(_read_frame(path), str(path))
