"""``rooflab twin``: forwards its arguments to the twin's own command line (:mod:`rooflab.twin.__main__`), a
simulated vLLM server — ``rooflab twin serve --model M --tp N ...``, ``rooflab twin tokenizer``. The twin parses
its options itself (argparse), so typer neither checks nor lists them here."""

from __future__ import annotations

import sys

import typer

from cli.app import app


@app.command("twin", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def twin(ctx: typer.Context):
    """The twin, a simulated vLLM server: `rooflab twin serve --model M --tp N ...`, `rooflab twin tokenizer`
    (options: `rooflab twin serve --help`)."""
    from rooflab.twin.__main__ import main as twin_main

    try:
        code = twin_main(list(ctx.args))
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2): its exit status, not an exception
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message")
            print(exc.code, file=sys.stderr)
            code = 1
    raise typer.Exit(code)
