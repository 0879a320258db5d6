"""The ``rooflab`` typer app and what its command modules share.

* ``app``: the typer application every command module registers its commands on (``cli/main.py`` imports those
  modules, then runs the app);
* ``COMMAND``: this invocation as a shell would re-run it, recorded by :func:`record_invocation` (``main()``) and
  written into a fit's provenance (:func:`invocation`);
* the checks of command-line input that run before a command does anything: :func:`check_range` (numeric
  bounds) and :func:`check_writable_folder` (``--store`` / ``--mlruns``). Both raise
  :class:`rooflab.errors.InputError`, which ``main()`` prints as one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

from rooflab.errors import InputError

COMMAND = "rooflab"  # this invocation, as a shell would re-run it (recorded in provenance)
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="rooflab: calibrate corrected-roofline step-time models of vLLM serving.")


def record_invocation(args: list[str]) -> None:
    """Remember the command line (``rooflab`` + ``args``) for the provenance of what this run writes."""
    global COMMAND
    COMMAND = " ".join(["rooflab", *([shlex.join(args)] if args else [])])


def invocation() -> str:
    """The command line :func:`record_invocation` remembered (``rooflab`` when none was)."""
    return COMMAND


def check_range(value: float | None, flag: str, lo: float | None = None, hi: float | None = None) -> None:
    """Refuse ``value`` of option ``flag`` outside [lo, hi] (None: that side open; a None value passes)."""
    if value is None:
        return
    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if lo is not None and hi is not None:
        want = f"between {show(lo)} and {show(hi)}"
    else:
        want = f">= {show(lo)}" if lo is not None else f"<= {show(hi)}" if hi is not None else ""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(None, flag, f"must be {want}, got {show(value)}")


def check_writable_folder(path: Path, flag: str) -> None:
    """Refuse a folder option that names a file, a folder this process cannot write, or a folder it could not
    create (its nearest existing parent is a file or not writable) — before anything has started."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise InputError(None, flag, f"{p} is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(None, flag, f"{p} is not writable")
        return
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(None, flag, f"cannot create {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(None, flag, f"cannot create {p}: {parent} is not writable")
