"""Safe file I/O shared by every module: YAML read with one-line errors, and atomic writes (temp file
in the same folder, fsync, rename, fsync the folder) so a reader sees the old file or the new one."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import yaml

from rooflab.errors import InputError


def read_yaml(path: str | Path, *, loader=yaml.SafeLoader):
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


def atomic_write_parquet(path: str | Path, df) -> Path:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())
