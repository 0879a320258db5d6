"""A coefficient set as a distribution (issue 18): the posterior over β and α that travels with a
:class:`rooflab.model.coefficients.Coefficients`, serialized with it, sampled by the interval replay
(:mod:`rooflab.replay.intervals`).

Two shapes, one type:

* **Gaussian** — ``mean`` and ``cov`` (the step fit's linear posterior with the between-run dispersion included,
  :mod:`rooflab.fit.posterior`); draws are N(mean, cov) clipped to each coefficient's bounds (the fit is bounded:
  β ≥ 0, α ≥ 0);
* **draws** — stored whole-run bootstrap draws (the request-level and summary-level fits, which are not linear in
  their coefficients); ``mean`` / ``cov`` are then the draws' own, and sampling resamples the stored draws.

``discrepancy`` is the model-form term: per replay statistic (``ttft_p90`` …) the standard deviation of
log(measured / predicted) on held-out (cross-validated) runs — what no coefficient draw can reproduce because the
formula itself is wrong. :mod:`rooflab.replay.intervals` adds it on the log scale when asked to. ``lineage`` says
which runs the posterior is conditioned on and which fit it was updated from (sequential refits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rooflab.errors import InputError

FORMAT = "rooflab.posterior/1"
GAUSSIAN = "gaussian"
DRAWS = "draws"


@dataclass
class Posterior:
    """Mean and covariance (and optionally draws) of the coefficients ``names`` (β terms, then α0–α2)."""

    names: list[str]
    mean: np.ndarray  # (p,)
    cov: np.ndarray  # (p, p)
    method: str  # one line: how it was obtained
    lower: np.ndarray  # (p,) bounds the fit respects (draws are clipped to them)
    upper: np.ndarray
    draws: np.ndarray | None = None  # (n, p) whole-run bootstrap draws, when that is the posterior
    discrepancy: dict[str, float] = field(default_factory=dict)  # statistic -> sd of log(measured / predicted)
    discrepancy_source: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)  # runs, parent, added_runs, kind

    @property
    def kind(self) -> str:
        return DRAWS if self.draws is not None and len(self.draws) >= 2 else GAUSSIAN

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov), 0.0, None))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` coefficient vectors: resampled stored draws, or N(mean, cov) clipped to the bounds."""
        rng = np.random.default_rng(seed)
        if self.kind == DRAWS:
            assert self.draws is not None
            idx = rng.permutation(len(self.draws))[:n] if n <= len(self.draws) else rng.integers(0, len(self.draws), n)
            out = self.draws[idx]
        else:
            w, V = np.linalg.eigh((self.cov + self.cov.T) / 2)
            root = V * np.sqrt(np.clip(w, 0.0, None))
            out = self.mean + rng.standard_normal((n, len(self.names))) @ root.T
        return np.clip(out, self.lower, self.upper)

    def interval(self, level: float = 0.95) -> np.ndarray:
        """(p, 2) central ``level`` intervals: quantiles of the draws, else the Gaussian's, clipped to the bounds."""
        a = (1 - level) / 2
        if self.kind == DRAWS:
            assert self.draws is not None
            return np.quantile(self.draws, [a, 1 - a], axis=0).T
        from scipy.stats import norm

        z = float(norm.ppf(1 - a))
        lo = np.clip(self.mean - z * self.sd, self.lower, self.upper)
        hi = np.clip(self.mean + z * self.sd, self.lower, self.upper)
        return np.column_stack([lo, hi])

    def ci95(self) -> dict[str, list[float]]:
        return {n: [float(lo), float(hi)] for n, (lo, hi) in zip(self.names, self.interval(0.95))}

    def with_discrepancy(self, sd: dict[str, float], source: str) -> Posterior:
        return Posterior(list(self.names), self.mean.copy(), self.cov.copy(), self.method, self.lower.copy(),
                         self.upper.copy(), None if self.draws is None else self.draws.copy(),
                         {str(k): float(v) for k, v in sd.items()}, source, dict(self.lineage))

    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {"format": FORMAT, "kind": self.kind, "method": self.method, "names": list(self.names),
                "mean": [float(v) for v in self.mean], "cov": [[float(v) for v in row] for row in self.cov],
                "sd": [float(v) for v in self.sd], "ci95": self.ci95(),
                "lower": [num(v) for v in self.lower], "upper": [num(v) for v in self.upper],
                "draws": None if self.draws is None else [[float(v) for v in row] for row in self.draws],
                "discrepancy": dict(self.discrepancy), "discrepancy_source": self.discrepancy_source,
                "lineage": dict(self.lineage)}


def _vector(doc: dict, key: str, p: int, source: str, *, default: float | None = None) -> np.ndarray:
    raw = doc.get(key)
    if raw is None and default is not None:
        return np.full(p, default)
    if not isinstance(raw, list) or len(raw) != p:
        raise InputError(source, f"posterior.{key}", f"expected a list of {p} numbers")
    out = []
    for i, v in enumerate(raw):
        if v is None and default is not None:  # ±inf bounds are written as null
            out.append(default)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
        else:
            raise InputError(source, f"posterior.{key}[{i}]", f"not a finite number ({v!r})")
    return np.array(out, dtype=np.float64)


def _matrix(raw: Any, field_name: str, cols: int, source: str, rows: int | None = None) -> np.ndarray:
    if not isinstance(raw, list) or (rows is not None and len(raw) != rows) or \
            not all(isinstance(r, list) and len(r) == cols for r in raw):
        shape = f"{rows}×{cols}" if rows is not None else f"n×{cols}"
        raise InputError(source, f"posterior.{field_name}", f"expected a {shape} list of lists of numbers")
    try:
        m = np.array(raw, dtype=np.float64).reshape(len(raw), cols)
    except (TypeError, ValueError):
        raise InputError(source, f"posterior.{field_name}", "not all numbers") from None
    if not np.isfinite(m).all():
        raise InputError(source, f"posterior.{field_name}", "holds a non-finite number")
    return m


def posterior_from_doc(doc: Any, source: str = "") -> Posterior:
    """Read :meth:`Posterior.to_dict`; every problem is one :class:`InputError` line naming the field."""
    if not isinstance(doc, dict):
        raise InputError(source, "posterior", "expected an object")
    names = doc.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise InputError(source, "posterior.names", "expected a non-empty list of coefficient names")
    p = len(names)
    mean = _vector(doc, "mean", p, source)
    cov = _matrix(doc.get("cov"), "cov", p, source, rows=p)
    if not np.allclose(cov, cov.T, rtol=1e-9, atol=1e-12 * max(1.0, float(np.abs(cov).max()))):
        raise InputError(source, "posterior.cov", "not symmetric")
    if (np.diag(cov) < 0).any():
        raise InputError(source, "posterior.cov", "a negative variance on the diagonal")
    lower = _vector(doc, "lower", p, source, default=-np.inf)
    upper = _vector(doc, "upper", p, source, default=np.inf)
    draws = None if doc.get("draws") is None else _matrix(doc["draws"], "draws", p, source)
    disc = doc.get("discrepancy") or {}
    if not isinstance(disc, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                             for v in disc.values()):
        raise InputError(source, "posterior.discrepancy", "expected a mapping of statistic to a standard deviation "
                                                          "≥ 0")
    lineage = doc.get("lineage") or {}
    if not isinstance(lineage, dict):
        raise InputError(source, "posterior.lineage", "expected an object")
    return Posterior(list(names), mean, cov, str(doc.get("method", "")), lower, upper, draws,
                     {str(k): float(v) for k, v in disc.items()}, str(doc.get("discrepancy_source", "")),
                     dict(lineage))
