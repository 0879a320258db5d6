"""Coefficient files for simulators: rooflab's canonical coefficients JSON and BLIS's layout.

Everything works on the dict form of a calibration (``Calibration.to_dict()``, which is also what
``rooflab fit --out`` writes, plus its extras); a :class:`~rooflab.fit.calibration.Calibration` object is
converted with ``to_dict()`` first, so there is one implementation.

BLIS (``trained-physics`` step time, docs/formulas.md §7) takes 3 α and 11 β, in this order in
``trained_physics_coefficients.beta_coeffs`` of its ``defaults.yaml``. rooflab's roofline7 has 7 β
(``roofline7+layers`` adds β_layer). The mapping:

====  =======  ===================================  =========  ==========================================
idx   BLIS     BLIS meaning                         unit       rooflab source (note)
====  =======  ===================================  =========  ==========================================
0     β1a      prefill compute correction           ×          beta1 (approx.: ours is β1·max(compute, kv),
                                                               BLIS sums β1a·compute + β1b·kv)
1     β2a      decode compute correction            ×          beta2 (approx.: max vs sum, as above)
2     β3       weight loading correction            ×          beta3 (approx. for MoE: BLIS's weight term
                                                               loads ALL experts; rooflab puts routed
                                                               experts, N_eff of them, under beta4, which
                                                               has no BLIS slot)
3     β4       TP communication correction          ×          beta5 (vllm formulas: × HBM / link bandwidth,
                                                               see below)
4     β5       per-layer overhead                   µs/layer   beta_layer (0 when the variant has none:
                                                               roofline7 folds it into beta7)
5     β6       per-request overhead                 µs/req     beta6
6     β7       per-step overhead                    µs/step    beta7
7     β8       per-MoE-layer overhead (interleaved) µs/layer   0 (not modelled by rooflab)
8     β1b      prefill KV-memory correction         ×          beta1 (see idx 0)
9     β2b      decode KV-memory correction          ×          beta2 (see idx 1)
10    β_EP     MoE all-to-all comm correction       ×          beta5 (rooflab fits no EP; BLIS's own
                                                               default for an omitted β_EP is β4)
====  =======  ===================================  =========  ==========================================

TP communication: BLIS's β4 multiplies the all-reduce bytes over *HBM* bandwidth (the PR's form, which
rooflab's ``design`` formulas keep). rooflab's ``vllm`` formulas put the bytes over the GPU link plus
2(TP−1) hops of link latency per all-reduce (docs/formulas.md §4.5, physical). Exporting a ``vllm`` fit
converts the bandwidth part: β4 = β5 × HBM / link bandwidth of the fit's hardware (H100-SXM: × 7.44).
The latency part has no BLIS slot and is left out; the YAML says so.

α maps 1:1 (µs): α0 → QueueingTime, α1 → PostDecodeFixedOverhead, α2 → OutputTokenProcessingTime
(µs/token). When α was not fitted (no request data) the three are written as 0 (or ``alpha_fallback``)
and the YAML says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol, TypeGuard

from rooflab.errors import InputError
from rooflab.files import atomic_write_text
from rooflab.model.blis import BLIS_BETA_ORDER

FORMAT = "rooflab.coefficients/1"
BLIS_KEY = "trained_physics_coefficients"

# (BLIS name, BLIS meaning, unit, rooflab term or None, note)
_BLIS_BETA = (
    ("β1a", "prefill compute correction", "×", "beta1",
     "approximation: rooflab's prefill term is β1·max(F_pf_compute, F_pf_kv), BLIS's is β1a·compute + β1b·kv"),
    ("β2a", "decode compute correction", "×", "beta2",
     "approximation: rooflab's decode term is β2·max(F_dc_compute, F_dc_kv), BLIS's is β2a·compute + β2b·kv"),
    ("β3", "weight loading correction", "×", "beta3",
     "approximate for MoE: BLIS's weight term loads all experts, rooflab's routed experts (N_eff) are under "
     "beta4, which has no BLIS slot"),
    ("β4", "TP communication correction", "×", "beta5", ""),
    ("β5", "per-layer overhead", "µs/layer", "beta_layer",
     "0 when the variant has no beta_layer (roofline7 folds per-layer cost into beta7)"),
    ("β6", "per-request overhead", "µs/request", "beta6", ""),
    ("β7", "per-step overhead", "µs/step", "beta7", ""),
    ("β8", "per-MoE-layer overhead (interleaved MoE only)", "µs/MoE-layer", None, "not modelled by rooflab: 0"),
    ("β1b", "prefill KV-memory correction", "×", "beta1", "same value as β1a (see there)"),
    ("β2b", "decode KV-memory correction", "×", "beta2", "same value as β2a (see there)"),
    ("β_EP", "MoE dispatch/combine all-to-all comm correction", "×", "beta5",
     "rooflab fits no expert parallelism; copies the TP-comm β, which is BLIS's own default for β_EP"),
)
_BLIS_ALPHA = (
    ("α0", "QueueingTime (API overhead)", "µs", "alpha0"),
    ("α1", "PostDecodeFixedOverhead", "µs", "alpha1"),
    ("α2", "OutputTokenProcessingTime", "µs/token", "alpha2"),
)
UNMAPPED_ROOFLAB = {"beta4": "routed-expert weight loading: no BLIS slot (BLIS's β3 weight term loads all experts)",
                    "beta1_attn": "prefill attention at its own efficiency: BLIS prices attention with β1a, so "
                                  "BLIS's long-prompt prefill uses the GEMM correction β1 instead"}


class _ToDict(Protocol):
    def to_dict(self) -> dict: ...


# A calibration: a rooflab.fit.calibration.Calibration (a layer above this one, so named by what is used
# of it) or its dict form (``rooflab fit --out``)
CalibrationLike = _ToDict | dict


def blis_mapping() -> list[dict]:
    """The β mapping table: one row per BLIS ``beta_coeffs`` index, plus the α rows."""
    rows = [{"index": i, "blis": b, "blis_meaning": m, "unit": u, "rooflab": r, "note": n}
            for i, (b, m, u, r, n) in enumerate(_BLIS_BETA)]
    return rows



# ---------------------------------------------------------------------------------------------------
# the dict form


def as_dict(calib: CalibrationLike | Any) -> dict:
    """A ``Calibration``-shaped dict from a Calibration object or such a dict (checked)."""
    if hasattr(calib, "to_dict") and not isinstance(calib, dict):
        calib = calib.to_dict()
    if not isinstance(calib, dict):
        raise InputError(None, None, f"not a rooflab fit result (got a JSON {type(calib).__name__}; expected the "
                                     "object `rooflab fit --out` writes)")
    beta = calib.get("beta")
    if not isinstance(beta, dict) or not isinstance(beta.get("coefficients"), dict) or not beta["coefficients"]:
        raise InputError(None, "beta.coefficients", "missing: not a rooflab fit result (the JSON `rooflab fit "
                                                    "--out` writes)")
    for name, c in beta["coefficients"].items():
        if not isinstance(c, dict) or not _is_num(c.get("value")):
            raise InputError(None, f"beta.coefficients.{name}.value", "missing or not a number")
    return calib


def load_fit(path: str | Path) -> dict:
    """Read the JSON that ``rooflab fit --out`` writes; every problem is one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "no such file" if not path.exists() else "not a file")
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 text (expected the JSON that `rooflab fit --out` writes)") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); expected the "
                                     "file `rooflab fit --out` writes") from None
    try:
        return as_dict(doc)
    except InputError as exc:
        raise InputError(path, exc.field, exc.problem) from None


def _is_num(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> float | None:
    """A JSON-safe float (None for missing / non-finite)."""
    if not _is_num(v):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _context(doc: dict) -> dict:
    """Models and TP degrees seen in the data (from the residual buckets) plus any recorded context."""
    buckets = doc.get("residual_buckets") or []
    models = sorted({str(b["bucket"]) for b in buckets if b.get("dimension") == "model"})
    tps = sorted({str(b["bucket"]) for b in buckets if b.get("dimension") == "tp"},
                 key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    ctx: dict[str, Any] = {"models": models, "tp": [int(t) if t.isdigit() else t for t in tps], "hardware": None}
    scope = doc.get("scope") or {}
    if scope.get("models"):
        ctx.update(models=list(scope["models"]), tp=list(scope.get("tp") or ctx["tp"]))
    if len(scope.get("hardware") or []) == 1:
        ctx["hardware"] = scope["hardware"][0]
    ctx.update({k: v for k, v in (doc.get("context") or {}).items() if v is not None})
    if doc.get("source"):
        ctx["source"] = doc["source"]
    return ctx


def _formula(names: list[str], features: list[str]) -> str:
    return "step_time_us = " + " + ".join(f"{n}·{f}" if f != "one" else n for n, f in zip(names, features))


def to_json(calib: CalibrationLike, *, context: dict | None = None) -> dict:
    """The canonical rooflab coefficients document: α/β with intervals, variant, formulas, model and
    hardware context, data counts and accuracy. JSON-safe (non-finite numbers are null)."""
    doc = as_dict(calib)
    b = doc["beta"]
    coefs = b["coefficients"]
    names = list(coefs)
    try:
        from rooflab.model.variants import get_variant

        variant = get_variant(b.get("variant", "roofline7"))
        features = dict(zip(variant.names, variant.features))
    except InputError:
        features = {}
    post = doc.get("posterior") if isinstance(doc.get("posterior"), dict) else None
    post_ci = (post or {}).get("ci95") or {}
    beta = {n: {"value": _num(c.get("value")), "lower": _num(c.get("lower")), "upper": _num(c.get("upper")),
                "ci95": _pair(c.get("ci95")), "posterior_ci95": _pair(post_ci.get(n)),
                "unit": c.get("unit"), "meaning": c.get("meaning"), "feature": features.get(n)}
            for n, c in coefs.items()}
    a = doc.get("alpha") or {}
    if a.get("fitted"):
        alpha = {"fitted": True, "n_requests": a.get("n_requests"), "coefficients": {
            n: {"value": _num(c.get("value")), "lower": _num(c.get("lower")), "upper": _num(c.get("upper")),
                "ci95": _pair(c.get("ci95")), "posterior_ci95": _pair(post_ci.get(n)),
                "unit": c.get("unit")} for n, c in a["coefficients"].items()}}
    else:
        alpha = {"fitted": False, "reason": a.get("reason", "no α in the fit result")}
    total = (doc.get("routing") or {}).get("total") or {}
    per_run = (doc.get("routing") or {}).get("per_run") or {}
    data = {"steps": total.get("steps"), "steps_with_time": total.get("with_step_time"),
            "steps_fitted": total.get("fit", b.get("n_steps")), "steps_saturated": total.get("saturated"),
            "steps_held_out_validation": total.get("held_out_validation"),
            "runs": len(per_run) if per_run else len(b.get("runs") or []),
            "requests": a.get("n_requests", 0) if a.get("fitted") else 0}
    ctx = _context(doc)
    if context:
        ctx.update({k: v for k, v in context.items() if v is not None})
    out = {
        "format": FORMAT,
        "variant": b.get("variant"), "formulas": b.get("formulas"),
        "step_time_formula": _formula(names, [features.get(n, n) for n in names]),
        "interval": b.get("interval"),
        "beta": beta, "alpha": alpha,
        "prior_strength": _num(b.get("prior_strength")),
        "prior_selection": (b.get("prior_selection") or {}).get("method"),
        "bootstrap": b.get("bootstrap"), "ties": b.get("ties") or {},
        "context": ctx, "data": data,
        "accuracy": {s: {k: (_num(v) if k != "steps" else v) for k, v in acc.items()}
                     for s, acc in (doc.get("accuracy") or {}).items()},
        "health": (doc.get("health") or {}).get("overall"),
        "unidentified": dict(doc.get("unidentified") or {}),  # βs the data could not see, with the reason
        # the coefficients as a distribution (rooflab.model.posterior): mean, covariance, ci95, discrepancy, lineage
        **({"posterior": post} if post is not None else {}),
    }
    return json.loads(json.dumps(out, default=_plain))


def _pair(v: Any) -> list[float | None] | None:
    """A [low, high] interval, JSON-safe (None when absent)."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return None
    return [_num(v[0]), _num(v[1])]


def _plain(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        v = o.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------------
# BLIS


def _value(coefs: dict, name: str | None, key: str = "value") -> float:
    if name is None or name not in coefs:
        return 0.0
    v = _num(coefs[name].get(key))
    return 0.0 if v is None else v


def is_blis_variant(doc: dict) -> bool:
    """A fit of BLIS's own basis (variants blis-tp10 / blis-tp11): its coefficients export term for term. The
    extension ``blis-tp10+attn`` is on BLIS's basis too but has a coefficient BLIS cannot load: see
    :func:`check_blis_loadable`."""
    return (doc.get("beta") or {}).get("formulas") == "blis"


def check_blis_loadable(doc: dict) -> None:
    """Refuse a BLIS export of a BLIS-basis fit with coefficients BLIS has no slot for (one line: what to do)."""
    b = doc.get("beta") or {}
    extra = [n for n in (b.get("coefficients") or {}) if n not in BLIS_BETA_ORDER]
    if is_blis_variant(doc) and extra:
        raise InputError(None, "variant", f"{b.get('variant')} has {', '.join(extra)}, which BLIS cannot load (its "
                         "trained-physics form has one prefill compute β): export --format json for rooflab, or "
                         "fit blis-tp10 / blis-tp11 for a set BLIS loads exactly")


def to_blis(calib: CalibrationLike, *, alpha_fallback: list[float] | None = None) -> dict:
    """``{"trained_physics_coefficients": {"alpha_coeffs": [3], "beta_coeffs": [10|11]}}`` — the layout of
    BLIS's ``defaults.yaml``. A BLIS-variant fit exports exactly, in BLIS's order (10 or 11 β); any other
    variant is mapped approximately onto the 11 slots (the module docstring's table). Without fitted α the α
    are ``alpha_fallback`` (default 0)."""
    doc = as_dict(calib)
    check_blis_loadable(doc)
    coefs = doc["beta"]["coefficients"]
    if is_blis_variant(doc):
        beta = [_value(coefs, n) for n in BLIS_BETA_ORDER if n in coefs]
    else:
        beta = [_value(coefs, r) for _, _, _, r, _ in _BLIS_BETA]
        scale, _ = _tp_scale(doc)
        for i, (name, *_rest) in enumerate(_BLIS_BETA):
            if name in ("β4", "β_EP"):
                beta[i] *= scale
    a = doc.get("alpha") or {}
    if a.get("fitted"):
        alpha = [_value(a["coefficients"], r) for _, _, _, r in _BLIS_ALPHA]
    else:
        alpha = [float(v) for v in (alpha_fallback or (0.0, 0.0, 0.0))]
        if len(alpha) != 3:
            raise InputError(None, "alpha_fallback", f"expected 3 values, got {len(alpha)}")
    return {BLIS_KEY: {"alpha_coeffs": alpha, "beta_coeffs": beta}}


def _tp_scale(doc: dict) -> tuple[float, str]:
    """Factor from rooflab's β5 to BLIS's β4 and a note: 1 for the design formulas (same feature); for the
    vllm formulas HBM / link bandwidth of the fit's hardware (the context's, else H100-SXM)."""
    if (doc.get("beta") or {}).get("formulas", "vllm") == "design":
        return 1.0, ""
    from rooflab.model.hardware import load_hardware

    hw_name = _context(doc).get("hardware") or "H100-SXM"
    hw = load_hardware(hw_name)
    scale = hw.hbm_tb_s * 1e3 / hw.nvlink_gb_s_per_direction
    return scale, (f"β5 × {scale:.3g} (HBM {hw.hbm_tb_s:g} TB/s / link {hw.nvlink_gb_s_per_direction:g} GB/s of "
                   f"{hw.name}): BLIS's TP bytes are over HBM; rooflab's link latency part "
                   f"({hw.link_latency_us:g} µs per hop) has no BLIS slot and is left out")


def _f(v: float) -> str:
    return repr(float(v))


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def blis_yaml(calib: CalibrationLike, *, alpha_fallback: list[float] | None = None) -> str:
    """The BLIS coefficients as YAML text, with comments on the source of every value and, for a non-BLIS
    variant, a plain statement that the mapping is approximate."""
    doc = as_dict(calib)
    layout = to_blis(doc, alpha_fallback=alpha_fallback)[BLIS_KEY]
    j = to_json(doc)
    b = doc["beta"]
    coefs = b["coefficients"]
    ci = b.get("interval") or 0.9
    ctx, data = j["context"], j["data"]
    exact = is_blis_variant(doc)
    lines = [
        "# BLIS trained-physics coefficients fitted by rooflab (layout of BLIS defaults.yaml).",
        ("# EXACT: fitted on BLIS's own basis (rooflab variant " + str(b.get("variant")) + "): BLIS loads these 1:1."
         if exact else
         f"# APPROXIMATE: fitted on rooflab's {b.get('variant')} ({b.get('formulas')} formulas), whose terms BLIS "
         "does not have; mapped onto BLIS's slots as the comments say. Fit the blis-tp10/11 variant for an exact set."),
        f"# prior strength λ={_g(_num(b.get('prior_strength')))}; {int(round(ci * 100))}% bootstrap intervals "
        "in the comments.",
        *(f"# WARNING: {why}" for why in (doc.get("unidentified") or {}).values()),
        f"# models: {', '.join(ctx.get('models') or []) or '-'}; TP: "
        f"{', '.join(map(str, ctx.get('tp') or [])) or '-'}; hardware: {ctx.get('hardware') or '-'}",
        f"# data: {data.get('steps')} steps ({data.get('steps_fitted')} fitted), {data.get('runs')} runs, "
        f"{data.get('requests')} requests; health {j.get('health') or '-'}",
        f"{BLIS_KEY}:",
        "  # Alpha coefficients: API/framework overheads (µs)",
    ]
    a = doc.get("alpha") or {}
    for (name, meaning, unit, ar), v in zip(_BLIS_ALPHA, layout["alpha_coeffs"]):
        if a.get("fitted"):
            c = a["coefficients"].get(ar, {})
            lines.append(f"  # {name}: {meaning} ({unit}) = rooflab {ar} {_g(v)} "
                         f"[{_g(_num(c.get('lower')))}, {_g(_num(c.get('upper')))}]")
        else:
            lines.append(f"  # {name}: {meaning} ({unit}) = {_g(v)} — NOT FITTED "
                         f"({a.get('reason', 'no request data')}): {'fallback value' if alpha_fallback else '0'}")
    lines.append(f"  alpha_coeffs: [{', '.join(_f(v) for v in layout['alpha_coeffs'])}]")
    if exact:
        lines.append("  # Beta coefficients (BLIS order), each the same term in rooflab's BLIS variant")
        for i, (name, v) in enumerate(zip([n for n in BLIS_BETA_ORDER if n in coefs], layout["beta_coeffs"])):
            c = coefs[name]
            lines.append(f"  # [{i}] {_BLIS_BETA[i][0]} = {name}: {c.get('meaning')} ({c.get('unit')}) {_g(v)} "
                         f"[{_g(_num(c.get('lower')))}, {_g(_num(c.get('upper')))}]")
    else:
        lines.append("  # Beta coefficients (BLIS order); ← the rooflab term each comes from")
        for i, ((name, meaning, unit, r, note), v) in enumerate(zip(_BLIS_BETA, layout["beta_coeffs"])):
            if r is not None and r in coefs:
                src = f"← {r} {_g(v)} [{_g(_num(coefs[r].get('lower')))}, {_g(_num(coefs[r].get('upper')))}]"
            elif r is not None:
                src = f"← {r}: not in variant {b.get('variant')} → 0"
            else:
                src = "← unmapped → 0"
            if name in ("β4", "β_EP") and _tp_scale(doc)[1]:
                note = _tp_scale(doc)[1] + (f"; {note}" if note else "")
            lines.append(f"  # [{i}] {name}: {meaning} ({unit}) {src}" + (f"; {note}" if note else ""))
        for r, why in UNMAPPED_ROOFLAB.items():
            if r in coefs:
                lines.append(f"  # not exported: rooflab {r} = {_g(_value(coefs, r))} ({why})")
    lines.append(f"  beta_coeffs: [{', '.join(_f(v) for v in layout['beta_coeffs'])}]")
    return "\n".join(lines) + "\n"


def write_blis(calib: CalibrationLike, path: str | Path, *, alpha_fallback: list[float] | None = None) -> Path:
    """Write :func:`blis_yaml` atomically."""
    return atomic_write_text(path, blis_yaml(calib, alpha_fallback=alpha_fallback))


def write_json(calib: CalibrationLike, path: str | Path, *, context: dict | None = None) -> Path:
    """Write :func:`to_json` atomically."""
    return atomic_write_text(path, json.dumps(to_json(calib, context=context), indent=2, ensure_ascii=False) + "\n")
