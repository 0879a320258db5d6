"""Adapters: each turns one source format into rooflab's step and request tables (docs/spec.md §2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rooflab.data.tables import validate_requests, validate_steps
from rooflab.errors import InputError


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
        return step_records_to_steps(raw, source=str(path), hardware=hardware)
    return validate_steps(raw, str(path))


def read_requests(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return validate_requests(_read_frame(path), str(path))
