"""``rooflab bench``: the benchmarks of record that users re-run on their own machines — ``s2r``, rooflab beside
every simulator of the sim-to-real kit on its eval experiments (:mod:`rooflab.evaluation.s2r_report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app, check_range
from rooflab.paths import REPO_ROOT

bench = typer.Typer(no_args_is_help=True, help="Benchmarks of record (they print their figures).")
app.add_typer(bench, name="bench")


@bench.command("s2r")
def s2r(
    workers: int = typer.Option(2, help="worker processes for the fits and replays"),
    quick: bool = typer.Option(False, help="one candidate per variant family (a shorter check)"),
    out: Path = typer.Option(REPO_ROOT / "benchmarks" / "results", help="folder for the CSVs of record"),
    png: Path | None = typer.Option(REPO_ROOT / "docs" / "s2r_medians.png", help="the median-APE bar chart"),
):
    """The sim-to-real benchmark: cross-validated choice of model form on the kit's training experiments,
    predictions for every eval experiment (withheld ones included), scores beside the kit's six simulators."""
    from rooflab.evaluation.s2r_report import main

    check_range(workers, "--workers", 1, 64)
    raise typer.Exit(main(workers=workers, quick=quick, out=out, png=png))
