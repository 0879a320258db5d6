"""The candidate space as targeting sees it: open (not yet collected) sweep points, what the data already
covers, one-line descriptions, rough batch / context estimates, held-out ordering, and the pick record every
targeting strategy returns. Shared by the menu (:mod:`rooflab.targeting.menu`), the D-optimal design
(:mod:`rooflab.targeting.doptimal`) and the stop rule. Depends on the campaign spec and the model configs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pandas as pd

from rooflab.collect.spec import SEED_ORDER, Campaign, Combo, _canon
from rooflab.data.sweep import SweepPoint
from rooflab.fit.calibration import Calibration
from rooflab.fit.residuals import BATCH_BINS
from rooflab.model.arch import ModelArch, load_model

Bins = tuple[list[float], list[str]]  # bucket edges and labels (rooflab.fit.residuals.BATCH_BINS, CONTEXT_BINS)

HOTSPOT_DIMENSIONS = ("model", "phase_mix", "batch_size", "context", "tp", "workload")  # docs/spec.md §8; not run_id
HOTSPOT_SPLITS = ("train", "validation")  # saturated steps are never fitted
# target rules
VALIDATION_SHARE = 0.20
DECODE_STEP_S = 0.02  # rough decode step time, for Little's-law batch-size estimates of candidates


# ================================================================================================ picks
@dataclass(frozen=True)
class Pick:
    point: SweepPoint
    reason: str  # one line
    serves: str  # "beta5", "beta3~beta7", "hotspot phase_mix=prefill", "range context", "validation", "bootstrap"
    cost_gpu_s: float  # planned: duration × TP (× replicates); D-optimal picks: predicted span × TP
    priority: float
    details: dict = field(default_factory=dict)  # D-optimal picks: gains, predicted cost, sd shrinkage

    def to_dict(self) -> dict:
        return {"point": self.point.to_dict(), "label": self.point.label(), "split": self.point.split,
                "reason": self.reason, "serves": self.serves, "cost_gpu_s": float(self.cost_gpu_s),
                "priority": float(self.priority), **({"details": self.details} if self.details else {})}


@cache
def model_arch(model: str) -> ModelArch:
    return load_model(model)


def model_layers(model: str) -> int | None:
    try:
        return model_arch(model).n_layers
    except Exception:  # a model name from foreign data (e.g. a real-data alias) may not resolve
        return None


def combo_of(p: SweepPoint | Combo) -> tuple[str, int, str]:
    return (p.model, p.tp, p.hardware)


def _swept(p: SweepPoint) -> str:
    if p.family in ("W1", "W2"):
        return f" at input {p.param('input_tokens')}"
    if p.family == "W3":
        return f" at rate {float(p.param('rate')):g}"
    return ""


def describe(p: SweepPoint) -> str:
    return f"{p.family}{_swept(p)} on {p.model}/tp{p.tp}"


def est_batch(p: SweepPoint) -> float:
    """Little's law: concurrent requests ≈ rate × decode time (output tokens × ~20 ms), capped by max_num_seqs."""
    cap = float(dict(p.engine).get("max_num_seqs", 256))
    return float(min(cap, max(1.0, float(p.param("rate")) * int(p.param("output_tokens")) * DECODE_STEP_S)))


def est_context(p: SweepPoint) -> float:
    """Mean context per request over a run ≈ input + output / 2."""
    return float(p.param("input_tokens")) + float(p.param("output_tokens")) / 2


def bucket_index(value: float, bins: Bins) -> int:
    edges, labels = bins
    right = bins is BATCH_BINS  # batch buckets are (a, b], context buckets [a, b)
    for i in range(len(labels)):
        lo, hi = edges[i], edges[i + 1]
        if (lo < value <= hi) if right else (lo <= value < hi):
            return i
    return len(labels) - 1


def bucket_distance(value: float, label: str, bins: Bins) -> float:
    """log2 distance from ``value`` to the bucket's interval (0 inside)."""
    edges, labels = bins
    if label not in labels:
        return math.inf
    i = labels.index(label)
    lo, hi = edges[i], edges[i + 1]
    v = max(value, 1e-9)
    if bucket_index(value, bins) == i:
        return 0.0
    if np.isfinite(lo) and v <= lo:
        return math.log2(max(lo, 1e-9) / v)
    return math.log2(v / hi) if np.isfinite(hi) else 0.0


class CandidateState:
    """What the data already covers (collected points, calibration data) plus this batch's picks."""

    def __init__(self, collected_points: list[SweepPoint], data_models: set[str]) -> None:
        self.by_cell: dict[tuple, list[SweepPoint]] = {}
        self.per_combo: dict[tuple, int] = {}
        self.models: set[str] = set(data_models)
        self.version = 0
        for p in collected_points:
            self.add(p)

    def add(self, p: SweepPoint) -> None:
        self.version += 1
        self.by_cell.setdefault(combo_of(p) + (p.family,), []).append(p)
        self.per_combo[combo_of(p)] = self.per_combo.get(combo_of(p), 0) + 1
        if p.split == "train":
            self.models.add(p.model)

    def novelty(self, p: SweepPoint) -> float:
        """How far ``p`` is from what its (combo, family) cell already has: min Σ|log2 Δparam|, inf if empty."""
        done = self.by_cell.get(combo_of(p) + (p.family,), [])
        if not done:
            return math.inf
        return min(sum(abs(math.log2(float(p.param(k)) / float(q.param(k)))) for k in ("input_tokens", "output_tokens",
                                                                                         "rate")) for q in done)

    @property
    def layers(self) -> set[int]:
        return {L for L in (model_layers(m) for m in self.models) if L is not None}


def points_from_keys(keys: Iterable[str]) -> list[SweepPoint]:
    out = []
    for k in keys:
        try:
            out.append(SweepPoint.from_dict(json.loads(k)))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def family_rank(order: tuple[str, ...]) -> Callable[[SweepPoint], int]:
    return lambda p: order.index(p.family) if p.family in order else len(order)


# ------------------------------------------------------------------------------------------- validation
def is_v1_point(p: SweepPoint, campaign: Campaign) -> bool:
    for fam, cond in campaign.validation_points:
        if p.family == fam and all(_canon(k, p.param(k)) in {_canon(k, v) for v in vals} for k, vals in cond.items()):
            return True
    return False


def validation_order(campaign: Campaign) -> Callable[[SweepPoint, CandidateState], tuple]:
    rank = family_rank(SEED_ORDER)
    return lambda p, s: (s.per_combo.get(combo_of(p), 0), not is_v1_point(p, campaign), -s.novelty(p), rank(p),
                         p.duration_s * p.tp, p.key)


def open_candidates(campaign: Campaign, collected: Iterable[str] | None) -> dict[str, SweepPoint]:
    done = set(collected or ())
    out: dict[str, SweepPoint] = {}
    for p in campaign.candidates():
        if p.key not in done and p.key not in out:
            out[p.key] = p
    return out


def hotspot_rows(calib: Calibration) -> pd.DataFrame:
    hot = calib.hotspots
    return hot[hot["split"].isin(HOTSPOT_SPLITS) & hot["dimension"].isin(HOTSPOT_DIMENSIONS)]
