"""What ``rooflab replay`` and ``rooflab calibrate-e2e`` read, and what they tell the user about it.

* :func:`load_traces`: every ``--requests`` trace (any source :func:`rooflab.data.trace_readers.read_trace`
  detects, BLIS traces included), the explicit engine flags over what the trace recorded, the client concurrency
  cap, and every engine setting still missing filled with vLLM's server defaults for the stated vLLM version and
  the trace's GPU (:func:`rooflab.model.engine_config.complete_engine`) — with one ``assumed`` line per setting
  filled in, so nothing is assumed silently;
* :func:`coefficient_warnings`: what is wrong with the coefficient set itself — a rooflab fit whose own health
  check failed (the ``health`` block ``rooflab fit --out`` writes; :class:`rooflab.model.coefficients.Coefficients`
  does not carry it), a fitted α at a bound of the end-to-end fit (0 or ``rooflab.fit.request_level.ALPHA_MAX``);
* :func:`say`: an information line, on stdout beside a text report, on stderr when stdout is JSON.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.model.coefficients import ALPHA_NAMES, Coefficients

REQ_HELP = ("request trace: a BLIS trace (its folder with <name>.yaml + <name>.csv, the header or the data CSV; "
            "model, TP and a client concurrency cap come from it), a real run name (or its request file) under "
            "--root, a data store run folder (store/runs/<id>), an inference-perf per_request_lifecycle_metrics.json, "
            "or a request table (.parquet/.csv; these two need --model/--tp). The source is detected. Repeat for "
            "several runs")
ALPHA_UNITS = ("µs", "µs", "µs/token")


def say(line: str, as_json: bool) -> None:
    """An information line: stdout with a text report, stderr when stdout carries JSON."""
    print(line, file=sys.stderr if as_json else sys.stdout, flush=True)


def engine_overrides(max_num_seqs: int | None, max_num_batched_tokens: int | None, num_gpu_blocks: int | None,
                     max_model_len: int | None, prefix_caching: bool | None,
                     gpu_memory_utilization: float | None = None) -> dict[str, Any]:
    """The engine settings given on the command line (they win over what a trace recorded)."""
    counts = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
              "num_gpu_blocks": num_gpu_blocks, "max_model_len": max_model_len}
    for k, n in counts.items():
        if n is not None and n < 1:
            raise InputError(None, "--" + k.replace("_", "-"), f"must be >= 1, got {n}")
    vals = {**counts, "enable_prefix_caching": prefix_caching, "gpu_memory_utilization": gpu_memory_utilization}
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise InputError(None, "--gpu-memory-utilization", f"must be in (0, 1], got {gpu_memory_utilization:g}")
    return {k: v for k, v in vals.items() if v is not None}


def parse_window(window: str | None) -> tuple[float, float] | None:
    if not window:
        return None
    try:
        a, b = (float(x) for x in window.split(":"))
    except ValueError:
        raise InputError(None, "--window", f"expected START:END seconds, got {window!r}") from None
    return a, b


def load_traces(requests: list[str], *, root: Path | None, prefix: str, model: str | None, tp: int | None,
                hardware: str | None, engine: dict[str, Any], window: str | None = None,
                max_concurrency: int | None = None,
                vllm_version: str | None = None) -> list[tuple[Trace, list[str]]]:
    """Each trace, completed (module docstring), and the lines saying what was assumed for it."""
    from rooflab.data.trace_readers import read_trace
    from rooflab.model.engine_config import complete_engine
    from rooflab.model.step_timer import arch_and_hardware

    if prefix not in ("prompt", "system", "none"):
        raise InputError(None, "--prefix", f"expected prompt, system or none, got {prefix!r}")
    if max_concurrency is not None and max_concurrency < 1:
        raise InputError(None, "--max-concurrency", f"must be >= 1, got {max_concurrency}")
    span = parse_window(window)
    out: list[tuple[Trace, list[str]]] = []
    seen: dict[str, str] = {}
    for spec in requests:
        tr = read_trace(spec, root=root, prefix=prefix, model=model, tp=tp, hardware=hardware, engine=engine or None,
                        max_concurrency=max_concurrency)
        if tr.run_id in seen:
            raise InputError(spec, None, f"run id {tr.run_id!r} is also that of --requests {seen[tr.run_id]}")
        seen[tr.run_id] = spec
        tr.engine.update(engine)  # explicit settings win over what the trace recorded
        if max_concurrency:  # every source: not only those whose reader takes a cap
            tr.max_concurrency = max_concurrency
            tr.notes = [*tr.notes, f"client concurrency cap {max_concurrency} (--max-concurrency): replayed with it"]
        arch, hw = arch_and_hardware(tr.model, tr.hardware)
        tr.engine, assumed = complete_engine(tr.engine, arch, hw, tr.tp, vllm_version=vllm_version)
        if span:
            tr = tr.window(*span)
        out.append((tr, assumed))
    return out


def setup_of(tr: Trace, assumed: list[str]) -> dict[str, Any]:
    """What a trace was replayed under, for the JSON output."""
    return {"model": tr.model, "tp": tr.tp, "hardware": tr.hardware, "engine": dict(tr.engine),
            "max_concurrency": tr.max_concurrency, "timeout_s": tr.timeout_s, "source": tr.source,
            "assumed": list(assumed), "notes": list(tr.notes)}


def announce(traces: list[tuple[Trace, list[str]]], as_json: bool) -> None:
    """The ``assumed:`` and ``note:`` lines of every trace."""
    for tr, assumed in traces:
        for line in assumed:
            say(f"assumed: {tr.run_id}: {line}", as_json)
        for note in tr.notes:
            say(f"note: {tr.run_id}: {note}", as_json)


def _fit_health(path: Path) -> dict[str, Any] | None:
    """The ``health`` block of a coefficients JSON (a ``rooflab fit --out`` result has one), else None."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    health = doc.get("health") if isinstance(doc, dict) else None
    return health if isinstance(health, dict) else None


def coefficient_warnings(path: Path | None, coefs: Coefficients) -> list[str]:
    """What is wrong with the coefficient set itself (module docstring), one line each; ``path``: the file it was
    read from (None: a set just fitted, no health block to read)."""
    out = []
    health = _fit_health(path) if path is not None else None
    if health is not None and health.get("overall") == "fail":
        checks = [c for c in health.get("checks") or [] if isinstance(c, dict) and c.get("status") == "fail"]
        failed = "; ".join(f"{c.get('check')}: {c.get('target')}" for c in checks) or "no failed check listed"
        out.append(f"the coefficient set's own health check failed ({failed}): its step times may not hold "
                   f"outside the data it was fitted on (`rooflab fit` prints each check's suggested action)")
    out += coefs.warnings()  # βs the data it was fitted on could not see
    if coefs.alpha_fitted:
        from rooflab.fit.request_level import ALPHA_MAX

        for name, v, hi, unit in zip(ALPHA_NAMES, coefs.alpha, ALPHA_MAX, ALPHA_UNITS):
            if v <= 0:
                out.append(f"fitted {name} = {v:g} {unit} sits at its lower bound (0): the fit wanted it lower or "
                           "could not determine it")
            elif v >= hi or math.isclose(v, hi, rel_tol=1e-6):
                out.append(f"fitted {name} = {v:g} {unit} sits at its upper bound ({hi:g} {unit}, "
                           "rooflab.fit.request_level.ALPHA_MAX): it is likely absorbing error of the step model")
    return out
