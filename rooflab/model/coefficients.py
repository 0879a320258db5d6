"""A coefficient set to predict with: β by rooflab term name and α = (α0 µs, α1 µs, α2 µs/token), read from a
``rooflab fit --out`` result, a ``rooflab export --format json`` document, or a BLIS YAML (mapped onto rooflab's
features, :func:`blis_coefficients`). Every problem is one :class:`InputError` line."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from rooflab.errors import InputError
from rooflab.model.posterior import Posterior, posterior_from_doc
from rooflab.model.variants import get_variant, resolve_formulas

ALPHA_NAMES = ("alpha0", "alpha1", "alpha2")


@dataclass
class Coefficients:
    """A coefficient set to replay: β by rooflab term name, α = (α0 µs, α1 µs, α2 µs/token)."""

    beta: dict[str, float]
    alpha: tuple[float, ...] = (0.0, 0.0, 0.0)
    variant: str = "roofline7"
    formulas: str = "vllm"
    source: str = ""
    alpha_fitted: bool = True
    notes: list[str] = field(default_factory=list)
    # β name -> why the data it was fitted on could not see it (rooflab.fit.coverage); replay and export warn
    unidentified: dict[str, str] = field(default_factory=dict)
    # the coefficients as a distribution (rooflab.model.posterior): None for a point estimate only
    posterior: Posterior | None = None

    def with_values(self, beta: dict[str, float] | None = None, alpha: Iterable[float] | None = None,
                    source: str | None = None) -> Coefficients:
        return Coefficients({**self.beta, **(beta or {})}, tuple(alpha) if alpha is not None else self.alpha,
                            self.variant, self.formulas, source or self.source,
                            self.alpha_fitted or alpha is not None, list(self.notes), dict(self.unidentified),
                            self.posterior if beta is None and alpha is None else None)  # new values: not its posterior

    def draws(self, n: int, seed: int = 0) -> list[Coefficients]:
        """``n`` coefficient sets drawn from the posterior (β and, where the posterior has them, α); the point
        estimate ``n`` times when there is no posterior."""
        if self.posterior is None:
            return [self for _ in range(n)]
        post = self.posterior
        out = []
        for row in post.sample(n, seed):
            vals = dict(zip(post.names, map(float, row)))
            beta = {k: vals.get(k, v) for k, v in self.beta.items()}
            alpha = tuple(vals.get(a, v) for a, v in zip(ALPHA_NAMES, self.alpha))
            out.append(Coefficients(beta, alpha, self.variant, self.formulas, self.source, self.alpha_fitted,
                                    list(self.notes), dict(self.unidentified)))
        return out

    def warnings(self) -> list[str]:
        """One line per coefficient the data it was fitted on could not see."""
        return [f"{why} — its value {self.beta.get(name, float('nan')):.3g} is the fit's guess, not a measurement; "
                "predictions that lean on it are unreliable" for name, why in self.unidentified.items()]

    def to_dict(self) -> dict:
        return {"format": "rooflab.coefficients/1", "variant": self.variant, "formulas": self.formulas,
                "beta": {k: {"value": float(v)} for k, v in self.beta.items()},
                "alpha": {"fitted": bool(self.alpha_fitted), "coefficients": {
                    n: {"value": float(v), "unit": u}
                    for n, v, u in zip(ALPHA_NAMES, self.alpha, ("µs", "µs", "µs/token"))}},
                "source": self.source, "notes": list(self.notes), "unidentified": dict(self.unidentified),
                **({"posterior": self.posterior.to_dict()} if self.posterior is not None else {})}


def _num(v: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def coefficients_from_doc(doc: Any, source: str = "") -> Coefficients:
    """From a ``rooflab fit --out`` result or a rooflab coefficients document (``export --format json``,
    :meth:`Coefficients.to_dict`)."""
    if not isinstance(doc, dict):
        raise InputError(source, None, "expected a JSON object (a rooflab fit result or coefficients document)")
    b = doc.get("beta")
    coefs = b.get("coefficients") if isinstance(b, dict) and isinstance(b.get("coefficients"), dict) else b
    if not isinstance(coefs, dict) or not coefs:
        raise InputError(source, "beta", "missing: not a rooflab fit result or coefficients document")
    beta = {}
    for name, c in coefs.items():
        v = c.get("value") if isinstance(c, dict) else c
        if not _num(v):
            raise InputError(source, f"beta.{name}.value", f"missing or not a number ({v!r})")
        beta[str(name)] = float(v)
    variant = doc.get("variant") or (b.get("variant") if isinstance(b, dict) else None) or \
        ("roofline7+layers" if "beta_layer" in beta else "roofline7")
    formulas = doc.get("formulas") or (b.get("formulas") if isinstance(b, dict) else None)
    a = doc.get("alpha") or {}
    notes = list(doc.get("notes") or [])
    if isinstance(a, dict) and a.get("fitted"):
        ac = a.get("coefficients") or {}
        vals = []
        for n in ALPHA_NAMES:
            v = ac.get(n, {}).get("value") if isinstance(ac.get(n), dict) else ac.get(n)
            if not _num(v):
                raise InputError(source, f"alpha.coefficients.{n}.value", f"missing or not a number ({v!r})")
            vals.append(float(v))
        alpha, fitted = tuple(vals), True
    else:
        alpha, fitted = (0.0, 0.0, 0.0), False
        notes.append("α not fitted in this coefficient set: replayed with α = 0 "
                     f"({a.get('reason', 'no request data') if isinstance(a, dict) else 'no α'})")

    try:
        known = set(get_variant(variant).names)
        formulas = resolve_formulas(variant, formulas)
    except InputError as exc:
        raise InputError(source, exc.field or "variant", exc.problem) from None
    unknown = sorted(set(beta) - known)
    if unknown:
        raise InputError(source, f"beta.{unknown[0]}", f"not a term of variant {variant}")
    flags = doc.get("unidentified") or {}
    if not isinstance(flags, dict) or not all(isinstance(v, str) for v in flags.values()):
        raise InputError(source, "unidentified", "expected a mapping of β name to reason")
    posterior = None
    if doc.get("posterior") is not None:
        posterior = posterior_from_doc(doc["posterior"], source)
        stray = sorted(set(posterior.names) - set(beta) - set(ALPHA_NAMES))
        if stray:
            raise InputError(source, "posterior.names", f"{stray[0]} is not a coefficient of this set")
    return Coefficients(beta, alpha, variant, formulas, source, fitted, notes, {str(k): v for k, v in flags.items()},
                        posterior)


def load_coefficients(path: str | Path) -> Coefficients:
    """A coefficient file: rooflab fit result / coefficients JSON, or BLIS YAML (``defaults.yaml`` or the
    ``rooflab export --format blis`` output). Every problem is one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "no such file" if not path.exists() else "not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 text (expected a coefficients JSON or BLIS YAML)") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise InputError(path, None, f"malformed YAML{where}") from None
        return blis_coefficients(doc, str(path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(doc, dict) and "trained_physics_coefficients" in doc:
        return blis_coefficients(doc, str(path))
    return coefficients_from_doc(doc, str(path))


def blis_coefficients(doc: Any, source: str = "") -> Coefficients:
    """BLIS trained-physics coefficients (``trained_physics_coefficients: {alpha_coeffs[3], beta_coeffs[10|11]}``,
    the layout of BLIS's ``defaults.yaml`` and of ``rooflab export --format blis``) as rooflab's BLIS variant,
    term for term: ``blis-tp10`` or ``blis-tp11`` (docs/blis.md §3-§4). Replayed with BLIS's own step time
    and α semantics, so the set means what it means in BLIS."""
    block = doc.get("trained_physics_coefficients") if isinstance(doc, dict) else None
    if not isinstance(block, dict):
        raise InputError(source, "trained_physics_coefficients", "missing: not a BLIS coefficients YAML")
    a, b = block.get("alpha_coeffs"), block.get("beta_coeffs")
    if not isinstance(a, list) or len(a) != 3 or not all(_num(v) and v >= 0 for v in a):
        raise InputError(source, "trained_physics_coefficients.alpha_coeffs", "expected 3 non-negative numbers")
    if not isinstance(b, list) or len(b) not in (10, 11) or not all(_num(v) and v >= 0 for v in b):
        raise InputError(source, "trained_physics_coefficients.beta_coeffs",
                         "expected 10 or 11 non-negative numbers (rooflab's BLIS variants blis-tp10 / blis-tp11; "
                         "the 7-9 coefficient max() forms are not supported)")
    variant = "blis-tp11" if len(b) == 11 else "blis-tp10"
    beta = dict(zip(get_variant(variant).names, map(float, b)))
    return Coefficients(beta, tuple(map(float, a)), variant, "blis", source, True,
                        [f"BLIS trained-physics coefficients, {len(b)} β: replayed as rooflab's {variant} variant "
                         "with BLIS's step time (truncated to whole µs) and α semantics"])
