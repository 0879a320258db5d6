"""The ``rooflab`` command line: :func:`main` runs the typer app of :mod:`cli.app` with every command registered
by importing its module — fit / models / hardware / export (:mod:`cli.fit_cmds`), collect / campaign / serve /
compare (:mod:`cli.campaign_cmds`), replay / calibrate-e2e (:mod:`cli.replay_cmds`), calibrate-summaries
(:mod:`cli.summary_cmds`), twin (:mod:`cli.twin_cmds`), bench (:mod:`cli.bench_cmds`), onboard
(:mod:`cli.onboard_cmds`) and tracking-server (:mod:`cli.cluster_cmds`).

Exit status: 0 done; 1 the command failed (e.g. collected runs that failed); 2 bad input — a usage error
(unknown command or option, a value of the wrong type, a missing option) or an
:class:`rooflab.errors.InputError` — printed as one ``error:`` line on stderr; ``rooflab`` with no command prints
the help with status 2, as typer does; ``--help`` prints it on stdout with status 0.
"""

from __future__ import annotations

import sys

import click
import typer
from typer._click import exceptions as typer_click  # typer's vendored click: not subclasses of click's

from cli.app import app, record_invocation
from rooflab.errors import InputError

# isort: off
# importing the command modules registers their commands, in the order --help lists them
import cli.fit_cmds  # noqa: F401
import cli.campaign_cmds  # noqa: F401
import cli.replay_cmds  # noqa: F401
import cli.twin_cmds  # noqa: F401
import cli.bench_cmds  # noqa: F401
import cli.onboard_cmds  # noqa: F401
import cli.summary_cmds  # noqa: F401
import cli.cluster_cmds  # noqa: F401
# isort: on

USAGE_ERRORS = (typer_click.UsageError, click.exceptions.UsageError)
CLICK_ERRORS = (typer_click.ClickException, click.exceptions.ClickException)
ABORTS = (typer.Abort, click.exceptions.Abort)


def _one_line(exc: typer_click.ClickException | click.ClickException) -> str:
    """A usage error as one line, with where to get help."""
    msg = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and ctx.command_path:
        msg += f" (see '{ctx.command_path} --help')"
    return msg


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    record_invocation(args)
    try:
        rv = app(args=args, prog_name="rooflab", standalone_mode=False)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer_click.NoArgsIsHelpError as exc:
        text = exc.format_message()  # typer's rich help has printed itself (stdout) and left this empty
        if text.strip():
            print(text)
        return exc.exit_code
    except USAGE_ERRORS as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except CLICK_ERRORS as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except ABORTS:
        print("aborted", file=sys.stderr)
        return 130
    # typer returns a command's exit status (typer.Exit(n)) instead of raising it when not standalone
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
