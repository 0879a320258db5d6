"""Launchers turn a sweep point into a finished run in the data store (docs/spec.md §4).

direct.py          the twin's fast mode (no HTTP): same run folder and tables, for benchmarks and tests
inference_perf.py  the real inference-perf binary against an endpoint (subprocess, timeout, clean kill)
endpoints.py       where requests go: the twin or a vLLM started from a command template, or an external URL
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class RunResult:
    status: str  # "ok" or "failed" (the collector turns ok into "saturated" when the run-level checks say so)
    reason: str = ""
    steps: pd.DataFrame | None = None
    requests: pd.DataFrame | None = None
    gpu_seconds: float = 0.0
    engine: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    transient: bool = False  # a failure worth retrying (timeout, server hiccup) vs a deterministic one


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:300] if text else type(exc).__name__
