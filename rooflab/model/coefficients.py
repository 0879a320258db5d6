"""A coefficient set to predict with: β by rooflab term name and α = (α0 µs, α1 µs, α2 µs/token), read from a
``rooflab fit --out`` result, a ``rooflab export --format json`` document, or a BLIS YAML (mapped onto rooflab's
features, :func:`blis_coefficients`). Every problem is one :class:`InputError` line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rooflab.errors import InputError
from rooflab.model.variants import get_variant

ALPHA_NAMES = ("alpha0", "alpha1", "alpha2")


@dataclass
class Coefficients:
    """A coefficient set to replay: β by rooflab term name, α = (α0 µs, α1 µs, α2 µs/token)."""

    beta: dict
    alpha: tuple = (0.0, 0.0, 0.0)
    variant: str = "roofline7"
    formulas: str = "vllm"
    source: str = ""
    alpha_fitted: bool = True
    notes: list = field(default_factory=list)
    tp_comm: str = "rooflab"  # "blis": β5 multiplies BLIS's TP volume (2L·2(TP−1)/TP·T·d·b_act / HBM), not f_tp

    def with_values(self, beta: dict | None = None, alpha=None, source: str | None = None) -> "Coefficients":
        return Coefficients({**self.beta, **(beta or {})}, tuple(alpha) if alpha is not None else self.alpha,
                            self.variant, self.formulas, source or self.source,
                            self.alpha_fitted or alpha is not None, list(self.notes), self.tp_comm)

    def to_dict(self) -> dict:
        return {"format": "rooflab.coefficients/1", "variant": self.variant, "formulas": self.formulas,
                "beta": {k: {"value": float(v)} for k, v in self.beta.items()},
                "alpha": {"fitted": bool(self.alpha_fitted), "coefficients": {
                    n: {"value": float(v), "unit": u} for n, v, u in zip(ALPHA_NAMES, self.alpha, ("µs", "µs", "µs/token"))}},
                "source": self.source, "notes": list(self.notes), "tp_comm": self.tp_comm}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def coefficients_from_doc(doc, source: str = "") -> Coefficients:
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
    formulas = doc.get("formulas") or (b.get("formulas") if isinstance(b, dict) else None) or "vllm"
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
    except InputError as exc:
        raise InputError(source, "variant", exc.problem) from None
    unknown = sorted(set(beta) - known)
    if unknown:
        raise InputError(source, f"beta.{unknown[0]}", f"not a term of variant {variant}")
    return Coefficients(beta, alpha, variant, formulas, source, fitted, notes, doc.get("tp_comm", "rooflab"))


def load_coefficients(path: str | Path) -> Coefficients:
    """A coefficient file: rooflab fit result / coefficients JSON, or BLIS YAML (``defaults.yaml`` or the
    ``rooflab export --format blis`` output). Every problem is one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "no such file" if not path.exists() else "not a file")
    text = path.read_bytes()
    try:
        text = text.decode()
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


BLIS_BETA_NAMES = ("β1a", "β2a", "β3", "β4", "β5", "β6", "β7", "β8", "β1b", "β2b", "β_EP")




def blis_coefficients(doc, source: str = "") -> Coefficients:
    """BLIS trained-physics coefficients (``trained_physics_coefficients: {alpha_coeffs[3], beta_coeffs[10|11]}``)
    mapped onto rooflab's roofline7+layers terms. Where the terms map:

    * β1 ← β1a (prefill compute; BLIS's β1b prefill-KV term is 0 in the shipped set, rooflab's prefill
      roofline is compute-bound on these prompts);
    * β2 ← β2b (decode KV memory; BLIS's β2a decode-compute term is 0 in the shipped set);
    * β3 ← β3 (weights), β4 ← β3 as well (BLIS streams all N experts under β3; rooflab's routed-expert
      term streams N_eff — same efficiency, different volume);
    * β5 ← β4, applied to BLIS's own TP volume (L(attn) + L(FFN) all-reduces moving 2(TP−1)/TP·T·d·b_act
      at HBM bandwidth), which the timer computes itself (``tp_comm = "blis"``), since rooflab's f_tp is
      a different quantity;
    * β6 ← β6, β7 ← β7, β_layer ← β5 (µs/layer).

    Not mapped: β8 (per-MoE-layer overhead, interleaved MoE only — none of the real models), β_EP (no
    expert parallelism here); BLIS's prefill FLOPs omit the LM head and use Σ n(c + n/2) pairs, so the same
    β multiplies slightly different features."""
    block = doc.get("trained_physics_coefficients") if isinstance(doc, dict) else None
    if not isinstance(block, dict):
        raise InputError(source, "trained_physics_coefficients", "missing: not a BLIS coefficients YAML")
    a, b = block.get("alpha_coeffs"), block.get("beta_coeffs")
    if not isinstance(a, list) or len(a) != 3 or not all(_num(v) for v in a):
        raise InputError(source, "trained_physics_coefficients.alpha_coeffs", "expected 3 numbers")
    if not isinstance(b, list) or len(b) not in (10, 11) or not all(_num(v) for v in b):
        raise InputError(source, "trained_physics_coefficients.beta_coeffs", "expected 10 or 11 numbers")
    B = dict(zip(BLIS_BETA_NAMES, map(float, b)))
    beta = {"beta1": B["β1a"], "beta2": B["β2b"], "beta3": B["β3"], "beta4": B["β3"], "beta5": B["β4"],
            "beta6": B["β6"], "beta7": B["β7"], "beta_layer": B["β5"]}
    notes = ["BLIS trained-physics mapped onto rooflab features: β1←β1a, β2←β2b, β3←β3, β4←β3 (all-expert vs "
             "N_eff volume), β5←β4 (on BLIS's TP volume), β6←β6, β7←β7, β_layer←β5",
             f"not mapped: β2a={B['β2a']:g} (decode compute), β1b={B['β1b']:g} (prefill KV), β8={B['β8']:g} µs/MoE-layer "
             "(interleaved MoE only), β_EP (no expert parallelism)"]
    return Coefficients(beta, tuple(map(float, a)), "roofline7+layers", "vllm", source, True, notes, "blis")
