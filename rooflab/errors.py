"""The one error type rooflab raises for bad input: one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input. ``str(err)`` is a single line: ``<source>: <field>: <problem>``."""

    def __init__(self, source: str | Path | None, field: str | None, problem: str):
        self.source = str(source) if source is not None else None
        self.field = field
        self.problem = problem
        parts = [p for p in (self.source, field) if p]
        super().__init__(": ".join(parts + [problem]).replace("\n", " "))

    def __reduce__(self) -> tuple[type[InputError], tuple[str | None, str | None, str]]:
        # picklable with its three fields: an error raised in a worker process reaches the parent intact
        return (type(self), (self.source, self.field, self.problem))
