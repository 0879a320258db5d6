"""Provenance records of exported coefficient sets: for every coefficient its value, unit, method and 95%
bootstrap interval, and for the set its scope (hardware, models, TP degrees, vLLM version, engine settings), its
sources (run ids or files, each with the content hashes of its data), the exact command and rooflab version that
produced it and the MLflow run that tracks it — enough for anyone to re-derive the set (docs/blis.md §4).

Built from the dict form of a fit (``Calibration.to_dict()``, the JSON ``rooflab fit --out`` writes), whose
``scope`` and ``provenance`` blocks the producer fills in.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rooflab.files import atomic_write_text, json_dumps
from rooflab.model.blis import BLIS_BETA_ORDER

FORMAT = "rooflab.provenance/1"
_BLIS_NAME = dict(zip(BLIS_BETA_ORDER, ("β1a", "β2a", "β3", "β4", "β5", "β6", "β7", "β8", "β1b", "β2b", "β_EP")))
_ALPHA_BLIS = {"alpha0": "α0", "alpha1": "α1", "alpha2": "α2"}


@dataclass(frozen=True)
class Source:
    """Where fitted data came from: a data-store run (its manifest's content hashes) or an input file."""

    kind: str  # "run" | "file"
    id: str  # run id, or the file path
    sha256: dict[str, str] = field(default_factory=dict)  # file (relative to the run folder) -> hash


def file_source(path: str | Path) -> Source:
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return Source("file", str(p.resolve()), {p.name: h.hexdigest()})


def current_command() -> str:
    """The command line of this process, as a shell would re-run it."""
    prog = Path(sys.argv[0]).name if sys.argv else "python"
    return " ".join(shlex.quote(a) for a in ([prog] + sys.argv[1:]))


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def provenance_record(doc: dict[str, Any], *, created_at: str | None = None) -> dict[str, Any]:
    """The provenance record of the coefficient set in ``doc`` (a fit result). ``doc["scope"]`` and
    ``doc["provenance"]`` (sources, command, mlflow_run_id, vllm_version, engine) are copied where present;
    what is unknown is said so, never guessed."""
    b = doc.get("beta") or {}
    prov = doc.get("provenance") or {}
    scope = dict(doc.get("scope") or {})
    for k in ("vllm_version", "engine", "engine_kinds"):
        if k in prov and k not in scope:
            scope[k] = prov[k]
    scope.setdefault("vllm_version", None)
    blis = b.get("formulas") == "blis"
    post: dict[str, Any] = doc["posterior"] if isinstance(doc.get("posterior"), dict) else {}
    post_ci = post.get("ci95") or {}
    coefficients = []
    for name, c in (b.get("coefficients") or {}).items():
        coefficients.append({"name": name, **({"blis": _BLIS_NAME[name]} if blis and name in _BLIS_NAME else {}),
                             "value": c.get("value"), "unit": c.get("unit"), "meaning": c.get("meaning"),
                             "method": "fitted", "ci95": c.get("ci95"),
                             **({"posterior_ci95": post_ci[name]} if name in post_ci else {})})
    a = doc.get("alpha") or {}
    for name, c in ((a.get("coefficients") or {}).items() if a.get("fitted") else ()):
        coefficients.append({"name": name, "blis": _ALPHA_BLIS.get(name), "value": c.get("value"),
                             "unit": c.get("unit"), "method": "fitted", "ci95": c.get("ci95"),
                             **({"posterior_ci95": post_ci[name]} if name in post_ci else {})})
    if not a.get("fitted"):
        coefficients += [{"name": n, "blis": _ALPHA_BLIS[n], "value": None, "unit": u, "method": "not fitted",
                          "reason": a.get("reason", "no request data")}
                         for n, u in (("alpha0", "µs"), ("alpha1", "µs"), ("alpha2", "µs/token"))]
    boot = b.get("bootstrap") or {}
    return {
        "format": FORMAT,
        "created_at": created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        "variant": b.get("variant"), "formulas": b.get("formulas"), "exact_blis": blis,
        "coefficients": coefficients,
        "fit": {"prior_strength": b.get("prior_strength"), "interval_reported": b.get("interval"),
                "ci95": "2.5% and 97.5% quantiles of the bootstrap draws",
                "bootstrap": {"unit": boot.get("unit"), "units": boot.get("units"), "draws": boot.get("draws")},
                "steps_fitted": b.get("n_steps"), "health": (doc.get("health") or {}).get("overall"),
                "accuracy": doc.get("accuracy"),
                "posterior": {"method": post.get("method"), "kind": post.get("kind"),
                              "posterior_ci95": "2.5% and 97.5% quantiles of the posterior (rooflab.model.posterior)",
                              "discrepancy": post.get("discrepancy") or {},
                              "lineage": {k: v for k, v in (post.get("lineage") or {}).items() if k != "history"}}
                if post else None},
        "scope": scope,
        "sources": prov.get("sources") or [],
        "command": prov.get("command"),
        "rooflab_version": _version("rooflab"),
        "environment": {"python": platform.python_version(), "numpy": _version("numpy"),
                        "scipy": _version("scipy"), "pandas": _version("pandas")},
        "mlflow_run_id": prov.get("mlflow_run_id"),
    }


def with_provenance(doc: dict[str, Any], *, sources: list[Source], command: str | None = None,
                    mlflow_run_id: str | None = None, vllm_version: str | None = None,
                    engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """``doc`` with its ``provenance`` block set (sources, command — this process's by default — and the rest)."""
    prov = {"sources": [asdict(s) for s in sources], "command": command or current_command(),
            "mlflow_run_id": mlflow_run_id, "vllm_version": vllm_version, "engine": engine}
    return {**doc, "provenance": {k: v for k, v in prov.items() if v is not None}}


def write_provenance(doc: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`provenance_record` of ``doc`` as JSON, atomically."""
    return atomic_write_text(path, json_dumps(provenance_record(doc)) + "\n")


def provenance_path(export_path: str | Path) -> Path:
    """Where the record of an exported file goes: ``<name>.provenance.json`` beside it."""
    p = Path(export_path)
    return p.with_name(p.stem + ".provenance.json")


def load_provenance(path: str | Path) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))
