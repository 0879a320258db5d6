"""Safe file I/O shared by every module: YAML read with one-line errors, and atomic writes (temp file
in the same folder, fsync, rename, fsync the folder) so a reader sees the old file or the new one."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rooflab.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


def read_yaml(path: str | Path, *, loader: type[yaml.SafeLoader | yaml.CSafeLoader] = yaml.SafeLoader) -> Any:
    """Parse a YAML file; a syntax error becomes ``<file>: malformed YAML at line L, column C: problem``."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(path, None, f"malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 text") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_parquet(path: str | Path, df: pd.DataFrame) -> Path:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict") and callable(o.to_dict):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    if hasattr(o, "item"):  # numpy scalars
        v = o.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)  # paths and anything else printable


def json_safe(o: Any) -> Any:
    """JSON has no NaN or Infinity: they become null (recursively)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


def json_dumps(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON of rooflab results: NaN → null, numpy → Python, dataclasses and frames as dicts."""
    return json.dumps(json_safe(obj), indent=indent, default=_json_default, ensure_ascii=False)


def input_files(paths: str | Path | Iterable[str | Path], what: str) -> tuple[list[Path], str]:
    """One path or several as a list of paths, and how to name them in a message ("f (+2 files)")."""
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise InputError(None, "paths", f"no {what} files given")
    return files, str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)"
