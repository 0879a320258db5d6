"""A campaign's named designs: the ``designs:`` models, the design points they name, and the static plan.

* :class:`DesignSpec` / :class:`PointSpec` — the typed ``designs:`` section (``{generator: static99 |
  candidates}`` or ``{points: [{model, tp, hardware?, family, <parameter>: value}]}``);
  :func:`build_designs` checks every point is one of the campaign's candidates and resolves it to a
  :class:`~rooflab.data.sweep.SweepPoint`.
* :func:`static99` — the seed's static plan (SPEC §3) on a campaign's combos.
* :data:`FamilyName`, :data:`Counts`, :data:`Rates` — the typed workload-family names and parameter values
  shared with :mod:`rooflab.collect.spec`.

Depends on :mod:`rooflab.collect.endpoint_spec` (the model building blocks), :mod:`rooflab.collect.workloads`
(families, parameters) and :mod:`rooflab.data.sweep`; takes the :class:`~rooflab.collect.spec.Campaign`
it works on as an argument (imported for type checking only).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from rooflab.collect.endpoint_spec import (
    AS_LIST,
    DISTINCT,
    Int,
    Num,
    Origin,
    Spec,
    Text,
    problem,
)
from rooflab.collect.workloads import FAMILIES, PARAMS, V1_POINTS
from rooflab.data.sweep import SweepPoint

if TYPE_CHECKING:
    from rooflab.collect.spec import Campaign

SEED_ORDER = ("W1", "W2", "W3", "W4-A", "W4-C")  # the static plan's per-combo families (15 runs)
Generator = Literal["static99", "candidates"]
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def unknown_family(f: object) -> str:
    return (f"unknown workload family {f!r} (known: {', '.join(FAMILIES)}; W5 = W3 at several TP, "
            "V1 = validation.points)")


def _family(v: str) -> str:
    if v not in FAMILIES:
        raise problem(unknown_family(v))
    return v


def _design_name(v: str) -> str:
    if not re.fullmatch(NAME_RE, v):
        raise problem("design names use letters, digits, '.', '_' and '-' only")
    return v


FamilyName = Annotated[str, AfterValidator(_family)]
Tokens = Annotated[Int, Field(ge=1, le=10_000_000)]
Rate = Annotated[Num, Field(gt=0)]  # requests per second
Counts = Annotated[tuple[Tokens, ...], AS_LIST, DISTINCT]  # one value or a list
Rates = Annotated[tuple[Rate, ...], AS_LIST, DISTINCT]
TP = Annotated[Int, Field(ge=1, le=1024)]


def _canon(param: str, v: float) -> float | int:
    return float(v) if param == "rate" else int(v)


def allowed_text(values: tuple) -> str:
    return ", ".join(f"{a:g}" for a in values)


# ---------------------------------------------------------------------------------------------- models
class FamilyValues(Spec):
    """Allowed values of a family's parameters (default: the seed's, rooflab.collect.workloads.FAMILIES)."""

    input_tokens: Counts | None = None
    output_tokens: Counts | None = None
    rate: Rates | None = None


class SelectorSpec(FamilyValues):
    """A V1 selector (``validation.points``): a family and the values the static plan runs on held-out combos."""

    family: FamilyName


def v1_default() -> tuple[SelectorSpec, ...]:
    return tuple(SelectorSpec(family=f, **sel) for f, sel in V1_POINTS)


class PointSpec(Spec):
    """One design point: a combo of the campaign, a family, and one value per parameter the family varies."""

    model: Text
    tp: TP
    hardware: Text | None = None  # default: the campaign's hardware
    family: FamilyName
    input_tokens: Counts | None = None
    output_tokens: Counts | None = None
    rate: Rates | None = None


class DesignSpec(Spec):
    """A named design: a generator, or a list of points."""

    generator: Generator | None = None
    points: tuple[PointSpec, ...] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> DesignSpec:
        if (self.generator is None) == (self.points is None):
            raise problem("give either 'generator' (static99 | candidates) or 'points' (a list)")
        if self.points is not None and not self.points:
            raise problem("expected a non-empty list of points", "points")
        return self


DesignName = Annotated[str, AfterValidator(_design_name)]


# ---------------------------------------------------------------------------------------------- resolving
def build_designs(specs: dict[str, DesignSpec], campaign: Campaign, origin: Origin) -> dict[str, dict]:
    """name -> ``{"generator": g}`` or ``{"points": [SweepPoint]}``; ``static99`` is always there."""
    out: dict[str, dict] = {}
    by_key: set[str] | None = None
    for name, spec in specs.items():
        if spec.generator is not None:
            if name == "static99" and spec.generator != "static99":
                raise origin.error(("designs", name, "generator"), "the name static99 is reserved for the built-in "
                                   "static plan")
            out[name] = {"generator": spec.generator}
            continue
        if name == "static99":
            raise origin.error(("designs", name), "the name static99 is reserved for the built-in static plan")
        if by_key is None:
            by_key = {p.key for p in campaign.candidates()}
        out[name] = {"points": [_design_point(origin, ("designs", name, "points", i), item, campaign, by_key)
                                for i, item in enumerate(spec.points or ())]}
    out.setdefault("static99", {"generator": "static99"})
    return out


def _design_point(origin: Origin, at: tuple, item: PointSpec, campaign: Campaign, by_key: set[str]) -> SweepPoint:
    from rooflab.model.arch import resolve_model_name

    model = resolve_model_name(item.model)
    hw = item.hardware or campaign.hardware
    combo = next((c for c in campaign.combos if (c.model.lower(), c.tp, c.hardware) == (model.lower(), item.tp, hw)),
                 None)
    if combo is None:
        raise origin.error(at, f"{model}/tp{item.tp}/{hw} is not one of the campaign's combos (models, "
                           "validation.models)")
    f = item.family
    if f not in campaign.families:
        raise origin.error(at + ("family",), f"family {f} is not allowed by 'families'")
    params: dict[str, float | int] = {}
    for p in PARAMS:
        allowed = campaign.families[f][p]
        given = getattr(item, p)
        if given is not None:
            if len(given) != 1:
                raise origin.error(at + (p,), "a design point takes one value")
            params[p] = given[0]
        elif len(allowed) == 1:
            params[p] = allowed[0]
        else:
            raise origin.error(at + (p,), f"required: {f} allows several values ({allowed_text(allowed)})")
    point = campaign.point(combo, f, params)
    if point.key not in by_key:
        bad = next(p for p in PARAMS if _canon(p, params[p]) not in {_canon(p, a) for a in campaign.families[f][p]})
        raise origin.error(at + (bad,), f"{params[bad]!r} is not an allowed {f} value "
                           f"(families.{f}.{bad}: {allowed_text(campaign.families[f][bad])})")
    return point


def check_selectors(points: tuple[SelectorSpec, ...], families: dict[str, dict[str, tuple]],
                    origin: Origin) -> list[tuple[str, dict[str, tuple]]]:
    """The V1 selectors as (family, parameter -> values); each family and value must be allowed."""
    out: list[tuple[str, dict[str, tuple]]] = []
    for i, sel in enumerate(points):
        at = ("validation", "points", i)
        f = sel.family
        if f not in families:
            raise origin.error(at + ("family",), f"family {f} is not allowed by 'families'")
        cond = {}
        for p in PARAMS:
            vals = getattr(sel, p)
            if vals is None:
                continue
            allowed = {_canon(p, a) for a in families[f][p]}
            for j, v in enumerate(vals):
                if _canon(p, v) not in allowed:
                    raise origin.error(at + (p, j), f"{v!r} is not an allowed {f} value "
                                       f"(families.{f}.{p}: {allowed_text(families[f][p])})")
            cond[p] = vals
        out.append((f, cond))
    return out


# ---------------------------------------------------------------------------------------------- static plan
def _static_values(campaign: Campaign, fam: str, select: dict[str, tuple] | None = None) -> dict[str, tuple] | None:
    """The seed plan's values of ``fam`` that the campaign allows (``select``: V1 selector values replace
    them). A parameter the seed plan fixes and the campaign re-fixes to other values takes the campaign's
    first value; a swept parameter none of whose seed values is allowed drops the family (None)."""
    seed, allowed = FAMILIES[fam], campaign.families[fam]
    out = {}
    for p in PARAMS:
        if select and p in select:
            out[p] = tuple(select[p])
            continue
        ok = {_canon(p, a) for a in allowed[p]}
        vals = tuple(v for v in seed.values()[p] if _canon(p, v) in ok)
        if not vals:
            if p in seed.grid:
                return None
            vals = (allowed[p][0],)
        out[p] = vals
    return out


def static99(campaign: Campaign) -> list[SweepPoint]:
    """The seed's static plan (SPEC §3) on this campaign's combos: every training combo runs 15 points
    (W1 × 4 inputs, W2 × 4 inputs, W3 × 5 rates, W4-A, W4-C); every held-out combo runs the V1 points
    (``validation.points``: W2 at input 1024, W3 at rates 1 and 64) — 6 × 15 + 3 × 3 = 99 runs on the
    default campaign. Families or values the campaign does not allow are left out."""
    out: list[SweepPoint] = []
    for combo in campaign.train_combos:
        for f in SEED_ORDER:
            vals = _static_values(campaign, f) if f in campaign.families else None
            if vals is not None:
                out.extend(campaign.point(combo, f, p) for p in FAMILIES[f].params(vals))
    for combo in campaign.validation_combos:
        for f, sel in campaign.validation_points:
            vals = _static_values(campaign, f, sel)
            if vals is not None:
                out.extend(campaign.point(combo, f, p) for p in FAMILIES[f].params(vals))
    seen, unique = set(), []
    for p in out:
        if p.key not in seen:
            seen.add(p.key)
            unique.append(p)
    return unique
