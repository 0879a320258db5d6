"""Target and stop (SPEC §9), first version: the seed's menu driven by the diagnosis. Pure Python.

**Stop rule** — :func:`stop_rule`: stop when β1–β5 are identified by the data and lie in [0.3, 5], every
β's bootstrap CV is < 30%, the held-out (validation split) step MAPE is < 10% and no residual bucket is a
hotspot (> 15% MAPE over ≥ 20 steps) — or when the GPU budget is spent, or the iteration cap is reached.
The decision carries a one-line reason and every criterion with its value and threshold.

**Target** — :func:`choose_next`: the next batch of sweep points, each with a one-line reason. The
diagnosis becomes a list of *needs* (:func:`find_needs`), each serving a β, a confounded pair of βs, a
residual hotspot, a range extension or the validation split, with a priority and the candidates that
serve it in preference order:

- health checks on a β ("data vs prior precision", "bootstrap CV", "draws pinned at 0",
  "leave-one-run-out change") → the seed's map: β1 → W1 (W4-A); β2 → W2 (W3); β3/β7 → W1/W2 on other
  models (vary the weights); β4 → W3 on MoE models; β5 → W3 at TP > 1 (W5); β6 → W3 rates (batch size);
  β_layer → any family on a model with a new layer count;
- "condition number", "VIF", "pairwise bootstrap correlation", "proportional terms" → points that move
  the βs the check names (their maps, interleaved);
- residual hotspots (train or validation split; not per-run buckets) → training points in that bucket
  (model, TP, workload family, phase mix, batch size, context length);
- range extension: the training data's context or batch-size range stops short of the candidate space's
  → the extreme points (longest inputs, highest rates);
- validation: ~20% of each batch is reserved for held-out points while any remain (space-filling over
  the held-out combos, the campaign's V1 points first); once the training split is healthy (no failing
  check) and there is no held-out data yet, one held-out point is promoted to the top of the batch.

Priorities: failing check 3 (+0.4 prior-dominated, +0.3 CV, +0.2 pinned, +0.1 leave-one-run-out),
warning 2 (same bonuses), hotspot 2–3 (by MAPE excess), validation promotion 5, validation reserve 1.5,
range extension 1. A need's k-th pick in a batch has priority × 0.5^k and a need takes at most 3 (fail),
2 (warn, hotspot, range) points per batch: the next refit re-diagnoses. Picks skip collected points,
never repeat, and skip points that no longer fit the budget left. At iteration 0 (no calibration yet)
the campaign's ``bootstrap`` design is used when it names one, else a small space-filling start.

The D-optimal scorer of SPEC §9 comes later; this module is deterministic and explainable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np

from rooflab.collect.spec import SEED_ORDER, Campaign, _canon
from rooflab.fit.health import FAIL, WARN
from rooflab.fit.residuals import BATCH_BINS, CONTEXT_BINS, HOTSPOT_MAPE
from rooflab.data.sweep import SweepPoint

# stop rule thresholds (SPEC §9)
BETA_RANGE = (0.3, 5.0)
MAX_CV = 0.30
MAX_VALIDATION_MAPE = 0.10
REPLAY_TARGETS = {"ttft": 0.12, "itl": 0.05, "e2e": 0.05}  # SPEC §12, median over held-out runs (optional)
MIN_DATA_PRIOR_PRECISION = 1.0  # below: the prior, not the data, set the β ("not identified")
RANGE_BETAS = ("beta1", "beta2", "beta3", "beta4", "beta5")
HOTSPOT_DIMENSIONS = ("model", "phase_mix", "batch_size", "context", "tp", "workload")  # SPEC §8; not run_id
HOTSPOT_SPLITS = ("train", "validation")  # saturated steps are never fitted

# target rules
VALIDATION_SHARE = 0.20
DECAY = 0.5
MAX_PICKS = {FAIL: 3, WARN: 2, "hotspot": 2, "range": 2}
CHECK_BONUS = {"data vs prior precision": 0.4, "bootstrap CV": 0.3, "draws pinned at 0": 0.2,
               "leave-one-run-out change": 0.1}
BETA_CHECKS = tuple(CHECK_BONUS)
DESIGN_CHECKS = ("condition number", "VIF", "pairwise bootstrap correlation", "proportional terms")
PROMOTION_PRIORITY = 5.0
VALIDATION_PRIORITY = 1.5
RANGE_PRIORITY = 1.0
DECODE_STEP_S = 0.02  # rough decode step time, for Little's-law batch-size estimates of candidates


# ================================================================================================ stop rule
@dataclass
class StopDecision:
    stop: bool
    reason: str  # one line
    criteria: dict  # name -> {"met": bool, "value": ..., "threshold": ..., "text": str}

    @property
    def unmet(self) -> list[str]:
        return [c["text"] for k, c in self.criteria.items() if k not in ("budget", "iteration_cap") and not c["met"]]

    def to_dict(self) -> dict:
        return {"stop": self.stop, "reason": self.reason, "criteria": self.criteria}


def _pct(v: float) -> str:
    return f"{v:.1%}" if abs(v) < 0.1 else f"{v:.0%}"


def _num(v):
    return None if v is None or not np.isfinite(v) else float(v)


def _check(calib, check: str, target: str):
    return next((c for c in calib.health if c.check == check and c.target == target), None)


def identifiable_betas(campaign: Campaign) -> tuple[str, ...]:
    """β1–β5 the campaign's training combos can identify at all: β4 needs an MoE model, β5 a TP > 1 combo.
    Pass it as ``stop_rule(..., required=...)`` for a campaign that cannot ever move some β off its prior."""
    out = ["beta1", "beta2", "beta3"]
    if any(_arch(c.model).is_moe for c in campaign.train_combos):
        out.append("beta4")
    if any(c.tp > 1 for c in campaign.train_combos):
        out.append("beta5")
    return tuple(out)


def data_prior_ratio(calib, j: int) -> float:
    """How much more the collected data say about β_j (given the other βs) than a physical prior does:
    the data precision of the fit's relative-error design, with each training run counting as at most
    :data:`rooflab.targeting.doptimal.STEPS_PER_RUN` independent steps of noise σ (the fit's residual level), over the
    precision of the efficiency prior N(1, 0.5²) that targeting uses (:mod:`rooflab.targeting.doptimal`).

    Deliberately not the fit's own λ: λ is chosen by leave-one-run-out for *prediction*, and a strong λ
    that wins on held-out MAPE says nothing about whether the data alone would pin the β."""
    from rooflab.targeting.doptimal import PRIOR_SD, STEPS_PER_RUN, sigma_of

    fit = calib.beta
    n_eff = float(np.minimum(fit.run_rows, STEPS_PER_RUN).sum())
    return float(fit.data_precision[j] * n_eff / sigma_of(calib) ** 2 * PRIOR_SD ** 2)


def stop_rule(calib, *, gpu_seconds_spent: float, budget_gpu_seconds: float | None, iteration: int,
              max_iterations: int | None, required: tuple[str, ...] = RANGE_BETAS,
              heldout_models: tuple[str, ...] = (), replay: dict | None = None) -> StopDecision:
    """Decide whether the campaign stops after this calibration (SPEC §9).

    ``iteration``: iterations completed so far (collect + refit, the bootstrap counting as the first);
    the cap is reached when ``iteration >= max_iterations``. ``required``: the βs of β1–β5 that must be
    identified and in range (default all five; see :func:`identifiable_betas`). A β counts as identified
    when its data/prior precision (:func:`data_prior_ratio`) is ≥ 1 — a β whose feature is zero in all
    data, or that the prior dominates, is not. Variants with β_L·L judge β7 + β_L·L's CV together.
    Bootstrap CVs count only from a whole-run bootstrap (≥ 5 training runs: a block bootstrap within
    fewer runs cannot see run-to-run variation). ``heldout_models``: the held-out MAPE counts only once
    every one of them has held-out data (one lucky held-out run is not a space-filling validation).
    ``replay``: optionally, the held-out request-level error (:func:`rooflab.replay.replay.store_replay_error`);
    it adds a criterion with SPEC §12's targets (TTFT ≤ 12%, ITL ≤ 5%, E2E ≤ 5% median over held-out runs). Criteria ``budget`` and ``iteration_cap`` say whether that limit is reached."""
    crit: dict[str, dict] = {}
    if calib is None:
        crit["calibration"] = {"met": False, "value": None, "threshold": None, "text": "no calibration yet"}
    else:
        fit = calib.beta
        names = fit.names
        # 1. β1–β5 identified and in [0.3, 5]
        for name in required:
            if name not in names:
                continue
            j = names.index(name)
            b = float(fit.beta[j])
            ratio = data_prior_ratio(calib, j)
            # no data on the feature at all -> not identified
            identified = bool(fit.data_precision[j] > 0 and ratio >= MIN_DATA_PRIOR_PRECISION)
            in_range = BETA_RANGE[0] <= b <= BETA_RANGE[1]
            if not identified:
                why = "feature zero in all data" if fit.data_precision[j] <= 0 else \
                    f"prior-dominated: data/prior precision {ratio:.2g} < 1"
                text = f"{name} not identified ({why})"
            elif not in_range:
                text = f"{name} {b:.3g} outside [{BETA_RANGE[0]:g}, {BETA_RANGE[1]:g}]"
            else:
                text = f"{name} {b:.3g} in [{BETA_RANGE[0]:g}, {BETA_RANGE[1]:g}]"
            crit[f"{name}_range"] = {"met": bool(identified and in_range), "value": _num(b),
                                     "threshold": list(BETA_RANGE), "identified": identified, "text": text}
        # 2. every β's bootstrap CV < 30%
        cvs = [c for c in calib.health if c.check == "bootstrap CV"]
        if len(fit.draws) < 2:
            crit["bootstrap_cv"] = {"met": False, "value": None, "threshold": MAX_CV, "text": "no bootstrap draws"}
        elif fit.unit_kind != "run":
            crit["bootstrap_cv"] = {"met": False, "value": len(fit.runs), "threshold": MAX_CV,
                                    "text": f"bootstrap over blocks of {len(fit.runs)} training run"
                                            f"{'s' if len(fit.runs) != 1 else ''} (whole runs need ≥ 5)"}
        split = _per_step_overhead_cv(calib)
        if split is not None:  # β7 and β_L·L are one per-step overhead, judged together (see the README)
            cvs = [c for c in cvs if c.target not in ("beta7", "beta_layer")]
            cv, L = split
            met = bool(np.isfinite(cv) and cv < MAX_CV)
            crit["per_step_overhead_cv"] = {
                "met": met, "value": _num(cv), "threshold": MAX_CV,
                "text": f"per-step overhead β7 + β_L·L CV {_pct(cv)} {'<' if met else '>'} {MAX_CV:.0%} (worst at L={L})"
                if np.isfinite(cv) else "per-step overhead β7 + β_L·L CV undefined (0)"}
        for c in cvs:
            met = bool(np.isfinite(c.value) and c.value < MAX_CV)
            text = f"{c.target} CV {_pct(c.value)} {'<' if met else '>'} {MAX_CV:.0%}" if np.isfinite(c.value) else \
                f"{c.target} CV undefined (β at 0)"
            crit[f"{c.target}_cv"] = {"met": met, "value": _num(c.value), "threshold": MAX_CV, "text": text}
        # 3. held-out step MAPE < 10%
        val = calib.accuracy.get("validation")
        if not val or not val.get("steps"):
            crit["validation_mape"] = {"met": False, "value": None, "threshold": MAX_VALIDATION_MAPE,
                                       "text": "no held-out data yet"}
        else:
            m = float(val["mape"])
            met = bool(m < MAX_VALIDATION_MAPE)
        res = calib.residuals
        seen = set(res.loc[(res["split"] == "validation") & (res["dimension"] == "model") & (res["steps"] > 0),
                           "bucket"].astype(str))
        missing = [m_ for m_ in heldout_models if m_ not in seen]
        if missing:
            crit["validation_coverage"] = {"met": False, "value": len(heldout_models) - len(missing),
                                           "threshold": len(heldout_models),
                                           "text": f"no held-out data on {', '.join(missing)} yet"}
        if val and val.get("steps"):
            crit["validation_mape"] = {"met": met, "value": m, "threshold": MAX_VALIDATION_MAPE,
                                       "text": f"validation MAPE {m:.1%} {'<' if met else '>'} "
                                               f"{MAX_VALIDATION_MAPE:.0%}"}
        # 3b. (optional) held-out request-level replay error
        if replay is not None:
            vals = {m: replay.get(m, np.nan) for m in REPLAY_TARGETS}
            if not replay.get("n_runs"):
                crit["replay"] = {"met": False, "value": None, "threshold": dict(REPLAY_TARGETS),
                                  "text": "no held-out run to replay yet"}
            else:
                bad = [m for m, t in REPLAY_TARGETS.items() if not (np.isfinite(vals[m]) and vals[m] <= t)]
                crit["replay"] = {"met": not bad, "value": {m: _num(v) for m, v in vals.items()},
                                  "threshold": dict(REPLAY_TARGETS),
                                  "text": "held-out replay " + ", ".join(
                                      f"{m.upper()} {vals[m]:.1%} {'>' if m in bad else '≤'} {t:.0%}"
                                      for m, t in REPLAY_TARGETS.items())}
        # 4. no hotspot
        hot = _hotspots(calib)
        if len(hot):
            worst = [f"{r.dimension}={r.bucket} {r.mape:.0%} ({r.split})" for r in hot.itertuples()]
            text = f"hotspot{'s' if len(worst) > 1 else ''} > {HOTSPOT_MAPE:.0%}: " + ", ".join(worst[:3]) + \
                (f" +{len(worst) - 3} more" if len(worst) > 3 else "")
        else:
            text = f"no bucket > {HOTSPOT_MAPE:.0%} MAPE"
        crit["hotspots"] = {"met": not len(hot), "value": int(len(hot)), "threshold": 0,
                            "worst_mape": _num(float(hot["mape"].max())) if len(hot) else None, "text": text}

    converged = all(c["met"] for c in crit.values())
    budget_hit = budget_gpu_seconds is not None and gpu_seconds_spent >= budget_gpu_seconds
    cap_hit = max_iterations is not None and iteration >= max_iterations
    crit["budget"] = {"met": bool(budget_hit), "value": float(gpu_seconds_spent),
                      "threshold": None if budget_gpu_seconds is None else float(budget_gpu_seconds),
                      "text": f"{gpu_seconds_spent / 3600:.2f} of "
                              + ("unlimited" if budget_gpu_seconds is None else f"{budget_gpu_seconds / 3600:.2f}")
                              + " GPU-h"}
    crit["iteration_cap"] = {"met": bool(cap_hit), "value": int(iteration), "threshold": max_iterations,
                             "text": f"iteration {iteration} of " + ("unlimited" if max_iterations is None
                                                                     else str(max_iterations))}
    decision = StopDecision(False, "", crit)
    unmet = "unmet: " + ", ".join(decision.unmet)
    if converged:
        decision.stop, decision.reason = True, "converged: all criteria met"
    elif budget_hit or cap_hit:
        parts = []
        if budget_hit:
            parts.append(f"budget spent: {gpu_seconds_spent / 3600:.2f} of {budget_gpu_seconds / 3600:.2f} GPU-h")
        if cap_hit:
            parts.append(f"iteration cap {max_iterations} reached")
        decision.stop, decision.reason = True, "; ".join(parts + [unmet])
    else:
        decision.reason = f"continue ({crit['iteration_cap']['text']}, {crit['budget']['text']}); {unmet}"
    return decision


def _per_step_overhead_cv(calib) -> tuple[float, int] | None:
    """Variants with a per-layer term split the per-step overhead into β7 + β_L·L; within the training
    models the two are nearly collinear (few distinct L), so each alone has a large bootstrap CV while
    their sum — what a step pays — is pinned. Returns (worst CV of the sum over the training models' L,
    that L), or None when the variant has no per-layer term."""
    fit = calib.beta
    if "beta_layer" not in fit.names or "beta7" not in fit.names or len(fit.draws) < 2:
        return None
    res = calib.residuals
    models = res.loc[(res["split"] == "train") & (res["dimension"] == "model") & (res["steps"] > 0), "bucket"]
    layers = sorted({L for L in (_layers(str(m)) for m in models) if L})
    if not layers:
        return None
    j7, jl = fit.names.index("beta7"), fit.names.index("beta_layer")
    worst = (-1.0, layers[0])
    for L in layers:
        tot = fit.draws[:, j7] + fit.draws[:, jl] * L
        m = float(np.mean(tot))
        cv = float(np.std(tot, ddof=1) / abs(m)) if m != 0 else np.inf
        worst = max(worst, (cv, L))
    return worst


def _hotspots(calib):
    hot = calib.hotspots
    return hot[hot["split"].isin(HOTSPOT_SPLITS) & hot["dimension"].isin(HOTSPOT_DIMENSIONS)]


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


@dataclass
class Need:
    """One thing the next batch should serve, with the candidates that serve it."""

    serves: str
    priority: float
    why: str  # the diagnosis half of a pick's reason
    split: str  # the split its candidates come from
    members: list[SweepPoint]  # candidates that serve it (not yet collected)
    order: Callable[[SweepPoint, "_State"], tuple]  # preference (smaller first), given what is collected/chosen
    does: Callable[[SweepPoint], str]  # what a point does for it
    max_picks: int = 2
    decay: float = DECAY

    def to_dict(self) -> dict:
        return {"serves": self.serves, "priority": float(self.priority), "why": self.why, "split": self.split,
                "candidates": len(self.members), "max_picks": self.max_picks}


@lru_cache(maxsize=None)
def _arch(model: str):
    from rooflab.model.arch import load_model

    return load_model(model)


def _layers(model: str) -> int | None:
    try:
        return _arch(model).n_layers
    except Exception:  # a model name from foreign data (e.g. a real-data alias) may not resolve
        return None


def _combo(p: SweepPoint) -> tuple:
    return (p.model, p.tp, p.hardware)


def _swept(p: SweepPoint) -> str:
    if p.family in ("W1", "W2"):
        return f" at input {p.param('input_tokens')}"
    if p.family == "W3":
        return f" at rate {float(p.param('rate')):g}"
    return ""


def _desc(p: SweepPoint) -> str:
    return f"{p.family}{_swept(p)} on {p.model}/tp{p.tp}"


def _est_batch(p: SweepPoint) -> float:
    """Little's law: concurrent requests ≈ rate × decode time (output tokens × ~20 ms), capped by max_num_seqs."""
    cap = float(dict(p.engine).get("max_num_seqs", 256))
    return float(min(cap, max(1.0, float(p.param("rate")) * int(p.param("output_tokens")) * DECODE_STEP_S)))


def _est_context(p: SweepPoint) -> float:
    """Mean context per request over a run ≈ input + output / 2."""
    return float(p.param("input_tokens")) + float(p.param("output_tokens")) / 2


def _bucket_index(value: float, bins) -> int:
    edges, labels = bins
    right = bins is BATCH_BINS  # batch buckets are (a, b], context buckets [a, b)
    for i in range(len(labels)):
        lo, hi = edges[i], edges[i + 1]
        if (lo < value <= hi) if right else (lo <= value < hi):
            return i
    return len(labels) - 1


def _bucket_distance(value: float, label: str, bins) -> float:
    """log2 distance from ``value`` to the bucket's interval (0 inside)."""
    edges, labels = bins
    if label not in labels:
        return math.inf
    i = labels.index(label)
    lo, hi = edges[i], edges[i + 1]
    v = max(value, 1e-9)
    if _bucket_index(value, bins) == i:
        return 0.0
    if np.isfinite(lo) and v <= lo:
        return math.log2(max(lo, 1e-9) / v)
    return math.log2(v / hi) if np.isfinite(hi) else 0.0


class _State:
    """What the data already covers (collected points, calibration data) plus this batch's picks."""

    def __init__(self, collected_points: list[SweepPoint], data_models: set[str]):
        self.by_cell: dict[tuple, list[SweepPoint]] = {}
        self.per_combo: dict[tuple, int] = {}
        self.models: set[str] = set(data_models)
        self.version = 0
        for p in collected_points:
            self.add(p)

    def add(self, p: SweepPoint) -> None:
        self.version += 1
        self.by_cell.setdefault(_combo(p) + (p.family,), []).append(p)
        self.per_combo[_combo(p)] = self.per_combo.get(_combo(p), 0) + 1
        if p.split == "train":
            self.models.add(p.model)

    def novelty(self, p: SweepPoint) -> float:
        """How far ``p`` is from what its (combo, family) cell already has: min Σ|log2 Δparam|, inf if empty."""
        done = self.by_cell.get(_combo(p) + (p.family,), [])
        if not done:
            return math.inf
        return min(sum(abs(math.log2(float(p.param(k)) / float(q.param(k)))) for k in ("input_tokens", "output_tokens",
                                                                                         "rate")) for q in done)

    @property
    def layers(self) -> set[int]:
        return {L for L in (_layers(m) for m in self.models) if L is not None}


def _points_from_keys(keys) -> list[SweepPoint]:
    out = []
    for k in keys:
        try:
            out.append(SweepPoint.from_dict(json.loads(k)))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _fam_rank(order: tuple[str, ...]):
    return lambda p: order.index(p.family) if p.family in order else len(order)


# ------------------------------------------------------------------------------------------- β menu
def _beta_menu(beta: str, train: list[SweepPoint], state: _State):
    """(members, order, does) of the seed's map for one β, or None when the variant has no such entry."""
    rate = lambda p: float(p.param("rate"))  # noqa: E731
    inp = lambda p: int(p.param("input_tokens"))  # noqa: E731
    cost = lambda p: p.duration_s * p.tp  # noqa: E731
    if beta == "beta1":
        rank = _fam_rank(("W1", "W4-A"))
        return ([p for p in train if p.family in ("W1", "W4-A")],
                lambda p, s: (rank(p), -s.novelty(p), -inp(p), cost(p), p.key),
                lambda p: f"{_desc(p)} exercises the prefill roofline")
    if beta == "beta2":
        rank = _fam_rank(("W2", "W3", "W4-C"))
        return ([p for p in train if p.family in ("W2", "W3", "W4-C")],
                lambda p, s: (rank(p), -s.novelty(p), -inp(p) - rate(p), cost(p), p.key),
                lambda p: f"{_desc(p)} exercises the decode roofline")
    if beta in ("beta3", "beta7"):
        rank = _fam_rank(("W2", "W1"))
        what = "varies the static weights" if beta == "beta3" else "varies the weights against the per-step constant"
        return ([p for p in train if p.family in ("W1", "W2")],
                lambda p, s: (p.model in s.models, rank(p), cost(p), -s.novelty(p), inp(p), p.key),
                lambda p: f"{_desc(p)} {what}" + ("" if p.model in state.models else " (model new to the data)"))
    if beta == "beta4":
        return ([p for p in train if p.family == "W3" and _arch(p.model).is_moe],
                lambda p, s: (-s.novelty(p), -rate(p), cost(p), p.key),
                lambda p: f"{_desc(p)} varies the active experts (MoE)")
    if beta == "beta5":
        rank = _fam_rank(("W3",))
        return ([p for p in train if p.tp > 1],
                lambda p, s: (rank(p), -s.novelty(p), -rate(p), cost(p), p.key),
                lambda p: f"{_desc(p)} varies the all-reduce (TP{p.tp})")
    if beta == "beta6":
        rank = _fam_rank(("W3", "W4-A", "W4-C"))
        return ([p for p in train if p.family in ("W3", "W4-A", "W4-C")],
                lambda p, s: (rank(p), -s.novelty(p), -rate(p), cost(p), p.key),
                lambda p: f"{_desc(p)} varies the batch size")
    if beta == "beta_layer":
        rank = _fam_rank(("W2", "W1", "W3", "W4-C", "W4-A"))
        return ([p for p in train if _layers(p.model) not in state.layers],
                lambda p, s: (_layers(p.model) in s.layers, rank(p), -s.novelty(p), cost(p), p.key),
                lambda p: f"{_desc(p)} brings a new layer count ({_layers(p.model)}; data: "
                          f"{', '.join(map(str, sorted(state.layers))) or 'none'})")
    return None


def _joint_menu(betas: list[str], train: list[SweepPoint], state: _State):
    """Interleave the menus of several βs (confounded features): members in round-robin preference."""
    menus = [(b, m) for b in betas if (m := _beta_menu(b, train, state)) is not None and m[0]]
    if not menus:
        return None
    owner: dict[str, str] = {}
    for b, (members, _, _) in menus:
        for p in members:
            owner.setdefault(p.key, b)
    by_beta = dict(menus)
    members = [p for b, (ms, _, _) in menus for p in ms]
    members = list({p.key: p for p in members}.values())

    cache: dict = {}

    def order(p, s):
        # rank within the owning β's own preference, then alternate between the βs
        if cache.get("version") != s.version:
            cache.clear()
            cache["version"] = s.version
            for b, (ms, ordf, _) in menus:
                for i, q in enumerate(sorted(ms, key=lambda q: ordf(q, s))):
                    cache.setdefault((b, q.key), i)
        b = owner[p.key]
        return (cache[(b, p.key)], [x for x, _ in menus].index(b), p.key)

    return members, order, lambda p: by_beta[owner[p.key]][2](p)


_CHECK_TEXT = {  # check -> (label, comparison, pass threshold, fail threshold, percent?)
    "data vs prior precision": ("data/prior precision", "<", 10, 1, False),
    "bootstrap CV": ("bootstrap CV", ">", 0.3, 0.5, True),
    "draws pinned at 0": ("draws pinned at 0", ">", 0.05, 0.2, True),
    "leave-one-run-out change": ("leave-one-run-out change", ">", 0.2, 0.5, True),
    "condition number": ("condition number", ">", 30, 100, False),
    "VIF": ("VIF", ">", 5, 10, False),
    "pairwise bootstrap correlation": ("bootstrap correlation", ">", 0.7, 0.9, False),
}


def _check_why(c) -> str:
    if c.check == "proportional terms":
        return f"{c.target.replace('→', ' and ')} proportional in the data (one held at 0)"
    label, cmp, t_pass, t_fail, pct = _CHECK_TEXT[c.check]
    thr = t_fail if c.status == FAIL else t_pass
    fmt = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3g}")
    value = fmt(c.value) if np.isfinite(c.value) else "undefined"
    subject = c.target if c.target != "design" else "design"
    text = f"{subject} {label} {value} {cmp} {fmt(thr)}"
    if c.check == "data vs prior precision":
        text += " (prior-only: feature zero in all data)" if "zero in all data" in c.action else \
            (" (prior-dominated)" if c.status == FAIL else " (prior-heavy)")
    if c.check == "condition number":
        named = _betas_in(c.action)
        if named:
            text += f" ({' and '.join(named)} confounded)"
    return text


def _betas_in(text: str) -> list[str]:
    import re

    out = []
    for b in re.findall(r"beta(?:_layer|\d+)", text):
        if b not in out:
            out.append(b)
    return out


def _health_needs(calib, train: list[SweepPoint], state: _State) -> list[Need]:
    needs: dict[str, Need] = {}
    for c in calib.health:
        if c.status not in (FAIL, WARN):
            continue
        if c.check in BETA_CHECKS:
            betas = [c.target]
        elif c.check in DESIGN_CHECKS:
            betas = _betas_in(c.target if c.target != "design" else c.action)
        else:
            continue  # physical range: a formula or data problem, no sweep point fixes it
        if not betas:
            continue
        menu = _beta_menu(betas[0], train, state) if len(betas) == 1 else _joint_menu(betas, train, state)
        if menu is None or not menu[0]:
            continue
        serves = "~".join(sorted(betas))
        priority = (3.0 if c.status == FAIL else 2.0) + CHECK_BONUS.get(c.check, 0.0)
        old = needs.get(serves)
        if old is not None and old.priority >= priority:
            continue
        members, order, does = menu
        needs[serves] = Need(serves, priority, _check_why(c), "train", members, order, does,
                             max_picks=MAX_PICKS[c.status])
    return list(needs.values())


# ------------------------------------------------------------------------------------------- hotspots
def _nearest(points: list[SweepPoint], dist) -> list[SweepPoint]:
    """The points at the smallest distance (all of them when several tie)."""
    if not points:
        return []
    d = {p.key: dist(p) for p in points}
    best = min(d.values())
    close = (lambda v: v == best) if isinstance(best, tuple) else (lambda v: abs(v - best) <= 1e-9)
    return [p for p in points if close(d[p.key])]


def _hotspot_menu(dim: str, bucket: str, train: list[SweepPoint]):
    rate = lambda p: float(p.param("rate"))  # noqa: E731
    cost = lambda p: p.duration_s * p.tp  # noqa: E731
    seed_rank = _fam_rank(SEED_ORDER)
    if dim == "model":
        members = [p for p in train if p.model == bucket]
        if members:
            return (members, lambda p, s: (-s.novelty(p), seed_rank(p), cost(p), p.key),
                    lambda p: f"{_desc(p)} adds data on {bucket}")
        try:  # a held-out model: the nearest training models (same MoE-ness, closest size)
            ref = _arch(bucket)
        except Exception:
            return None
        size = lambda m: _arch(m).n_layers * _arch(m).hidden  # noqa: E731
        dist = lambda p: (_arch(p.model).is_moe != ref.is_moe,  # noqa: E731
                          round(abs(math.log(size(p.model) / (ref.n_layers * ref.hidden))), 6))
        return (_nearest(train, dist), lambda p, s: (-s.novelty(p), seed_rank(p), cost(p), p.key),
                lambda p: f"{_desc(p)}: the nearest training model to held-out {bucket}")
    if dim == "tp":
        try:
            tp = int(bucket)
        except ValueError:
            return None
        rank = _fam_rank(("W3",))
        return (_nearest(train, lambda p: abs(math.log2(p.tp / tp))),
                lambda p, s: (rank(p), -s.novelty(p), -rate(p), cost(p), p.key),
                lambda p: f"{_desc(p)} adds data at TP{p.tp}")
    if dim == "workload":
        members = [p for p in train if p.family == bucket]
        return (members, lambda p, s: (-s.novelty(p), cost(p), p.key), lambda p: f"{_desc(p)} adds {bucket} data")
    if dim == "phase_mix":
        fams = {"prefill": ("W1", "W4-A"), "decode": ("W2", "W4-C", "W3"), "mixed": ("W4-A", "W4-C", "W3")}.get(bucket)
        if fams is None:
            return None
        rank = _fam_rank(fams)
        sign = -1 if bucket == "mixed" else 1  # mixed steps come with high rates; pure decode with low ones
        return ([p for p in train if p.family in fams],
                lambda p, s: (rank(p), -s.novelty(p), sign * rate(p), -int(p.param("input_tokens")), cost(p), p.key),
                lambda p: f"{_desc(p)} makes {bucket} steps")
    if dim == "batch_size":
        if bucket not in BATCH_BINS[1]:
            return None
        rank = _fam_rank(("W3",))
        return (_nearest(train, lambda p: _bucket_distance(_est_batch(p), bucket, BATCH_BINS)),
                lambda p, s: (rank(p), -s.novelty(p), cost(p), p.key),
                lambda p: f"{_desc(p)} runs batches of ~{_est_batch(p):.0f}")
    if dim == "context":
        if bucket not in CONTEXT_BINS[1]:
            return None
        rank = _fam_rank(("W2", "W1"))
        return (_nearest(train, lambda p: _bucket_distance(_est_context(p), bucket, CONTEXT_BINS)),
                lambda p, s: (rank(p), -s.novelty(p), cost(p), p.key),
                lambda p: f"{_desc(p)} runs contexts of ~{_est_context(p):.0f} tokens")
    return None


def _hotspot_needs(calib, train: list[SweepPoint]) -> list[Need]:
    hot = _hotspots(calib).sort_values("mape", ascending=False)
    needs: dict[str, Need] = {}
    for r in hot.itertuples():
        serves = f"hotspot {r.dimension}={r.bucket}"
        if serves in needs:  # the worst split first
            continue
        menu = _hotspot_menu(r.dimension, str(r.bucket), train)
        if menu is None or not menu[0]:
            continue
        priority = 2.0 + min(1.0, (r.mape - HOTSPOT_MAPE) / HOTSPOT_MAPE)
        why = f"hotspot {r.dimension}={r.bucket} MAPE {r.mape:.0%} > {HOTSPOT_MAPE:.0%} ({r.split}, {r.steps} steps)"
        needs[serves] = Need(serves, priority, why, "train", *menu, max_picks=MAX_PICKS["hotspot"])
    return list(needs.values())


# ------------------------------------------------------------------------------------------- range extension
def _range_needs(calib, train: list[SweepPoint]) -> list[Need]:
    res = calib.residuals
    res = res[(res["split"] == "train") & (res["steps"] > 0)]
    out = []
    for dim, bins, est, what in (("context", CONTEXT_BINS, _est_context, "contexts"),
                                 ("batch_size", BATCH_BINS, _est_batch, "batch sizes")):
        have = [bins[1].index(b) for b in res.loc[res["dimension"] == dim, "bucket"] if b in bins[1]]
        if not have or not train:
            continue
        top = max(have)
        beyond = [p for p in train if _bucket_index(est(p), bins) > top]
        if not beyond:
            continue
        cand_top = max(_bucket_index(est(p), bins) for p in beyond)
        rank = _fam_rank(("W2", "W1") if dim == "context" else ("W3",))
        why = f"range extension: data {what} reach {bins[1][top]}, candidates reach {bins[1][cand_top]}"
        serves = "range context" if dim == "context" else "range batch"
        out.append(Need(serves, RANGE_PRIORITY, why, "train", beyond,
                        lambda p, s, est=est, rank=rank: (-est(p), rank(p), -s.novelty(p), p.duration_s * p.tp, p.key),
                        (lambda p: f"{_desc(p)} (~{_est_context(p):.0f}-token contexts)") if dim == "context" else
                        (lambda p: f"{_desc(p)} (batches of ~{_est_batch(p):.0f})"),
                        max_picks=MAX_PICKS["range"]))
    return out


# ------------------------------------------------------------------------------------------- validation
def _is_v1(p: SweepPoint, campaign: Campaign) -> bool:
    for fam, cond in campaign.validation_points:
        if p.family == fam and all(_canon(k, p.param(k)) in {_canon(k, v) for v in vals} for k, vals in cond.items()):
            return True
    return False


def _validation_order(campaign: Campaign):
    rank = _fam_rank(SEED_ORDER)
    return lambda p, s: (s.per_combo.get(_combo(p), 0), not _is_v1(p, campaign), -s.novelty(p), rank(p),
                         p.duration_s * p.tp, p.key)


# ------------------------------------------------------------------------------------------- bootstrap
def _bootstrap_needs(campaign: Campaign, cands: dict[str, SweepPoint]) -> list[Need]:
    train = [p for p in cands.values() if p.split == "train"]
    val = [p for p in cands.values() if p.split == "validation"]
    if "bootstrap" in campaign.designs:
        pts = [p for p in campaign.design("bootstrap") if p.key in cands]
        index = {p.key: i for i, p in enumerate(pts)}
        order = lambda p, s: (index[p.key],)  # noqa: E731
        why = "bootstrap design 'bootstrap' (campaign config)"
        return [Need("bootstrap", 2.0, why, split, [p for p in pts if p.split == split], order, _desc,
                     max_picks=len(pts), decay=1.0) for split in ("train", "validation")]

    def pick(combo, fam: str, param: str, which: str):
        if fam not in campaign.families:
            return None
        values = sorted(campaign.families[fam][param])
        v = {"mid": values[len(values) // 2], "low": values[0], "high": values[-1]}[which]
        p = campaign.point(combo, fam, {**{k: vals[0] for k, vals in campaign.families[fam].items()}, param: v})
        return cands.get(p.key)

    plan = (("W3", "rate", "high", "batch scaling at the highest rate", 4.0),
            ("W1", "input_tokens", "mid", "prefill at a middle input", 3.0),
            ("W2", "input_tokens", "mid", "decode at a middle input", 2.0),
            ("W3", "rate", "low", "batch scaling at the lowest rate", 1.0))
    needs, taken = [], {}
    for fam, param, which, what, prio in plan:
        members = []
        for combo in campaign.train_combos:
            p = pick(combo, fam, param, which)
            if p is not None and p.key not in taken:
                taken[p.key] = p
                members.append(p)
        if members:
            idx = {p.key: i for i, p in enumerate(members)}
            needs.append(Need("bootstrap", prio, f"bootstrap (space-filling start): {what}", "train", members,
                              lambda p, s, idx=idx: (idx[p.key],), _desc, max_picks=len(members), decay=1.0))
    covered = {_combo(p) for p in taken.values()}
    rest = [p for p in train if _combo(p) not in covered]  # combos with none of W1/W2/W3: one point per family
    if rest:
        firsts = list({(_combo(p), p.family): p for p in reversed(rest)}.values())[::-1]
        needs.append(Need("bootstrap", 0.5, "bootstrap (space-filling start): one point per family", "train", firsts,
                          lambda p, s: (p.key,), _desc, max_picks=len(firsts), decay=1.0))
    if val:
        order = _validation_order(campaign)
        s0 = _State([], set())
        first = [min((p for p in val if _combo(p) == _combo(c)), key=lambda p: order(p, s0), default=None)
                 for c in campaign.validation_combos]
        first = [p for p in first if p is not None]
        needs.append(Need("bootstrap", 3.5, "bootstrap: one held-out point per validation combo", "validation", first,
                          lambda p, s: (first.index(p),), _desc, max_picks=len(first), decay=1.0))
    return needs


# ------------------------------------------------------------------------------------------- needs
def find_needs(calib, campaign: Campaign, collected: set[str]) -> list[Need]:
    """The diagnosis as needs, highest priority first (``calib`` None: the bootstrap)."""
    cands = _candidates(campaign, collected)
    if calib is None:
        return _bootstrap_needs(campaign, cands)
    train = [p for p in cands.values() if p.split == "train"]
    val = [p for p in cands.values() if p.split == "validation"]
    state = _state(calib, collected)
    needs = _health_needs(calib, train, state) + _hotspot_needs(calib, train) + _range_needs(calib, train)
    if val:
        healthy = not any(c.status == FAIL for c in calib.health)
        no_heldout = not (calib.accuracy.get("validation") or {}).get("steps")
        if healthy and no_heldout:
            needs.append(Need("validation", PROMOTION_PRIORITY, "validation promotion: training split healthy "
                              "(no failing check), no held-out data yet", "validation", val,
                              _validation_order(campaign), lambda p: f"held-out {_desc(p)} measures the held-out MAPE",
                              max_picks=1))
        needs.append(Need("validation", VALIDATION_PRIORITY, f"validation reserve (~{VALIDATION_SHARE:.0%} of "
                          "each batch)", "validation", val, _validation_order(campaign),
                          lambda p: f"held-out {_desc(p)} (space-filling)", max_picks=len(val), decay=1.0))
    return sorted(needs, key=lambda n: -n.priority)


def _candidates(campaign: Campaign, collected) -> dict[str, SweepPoint]:
    collected = set(collected or ())
    out: dict[str, SweepPoint] = {}
    for p in campaign.candidates():
        if p.key not in collected and p.key not in out:
            out[p.key] = p
    return out


def _state(calib, collected) -> _State:
    data_models = set()
    if calib is not None:
        res = calib.residuals
        data_models = set(res.loc[(res["split"] == "train") & (res["dimension"] == "model") & (res["steps"] > 0),
                                  "bucket"].astype(str))
    return _State(_points_from_keys(collected or ()), data_models)


def choose_next(calib, campaign: Campaign, collected: set[str], *, batch_size: int,
                budget_gpu_seconds_left: float | None, iteration: int) -> list[Pick]:
    """The next batch of sweep points (SPEC §9, first version: the seed's menu driven by the diagnosis).

    ``collected``: keys (:attr:`SweepPoint.key`) of points already in the store — never picked again.
    ``budget_gpu_seconds_left``: None = unlimited; points whose planned cost no longer fits are skipped.
    ``iteration``: 0 for the first batch; with ``calib`` None the bootstrap design is returned.
    Returns at most ``batch_size`` picks, highest priority first (fewer when the needs run out)."""
    if batch_size <= 0:
        return []
    needs = find_needs(calib, campaign, collected)
    state = _state(calib, collected)
    left = math.inf if budget_gpu_seconds_left is None else float(budget_gpu_seconds_left)
    reps = max(1, int(campaign.replicates))
    cost = lambda p: float(campaign.gpu_seconds([p])) * reps  # noqa: E731
    bootstrap = calib is None

    val_members = {p.key for n in needs if n.split == "validation" for p in n.members}
    reserve = int(math.floor(VALIDATION_SHARE * batch_size + 0.5)) if val_members else 0
    if any(n.serves == "validation" and n.priority >= PROMOTION_PRIORITY for n in needs):
        reserve = max(reserve, 1)  # promotion: one held-out point even in a tiny batch
    reserve = min(reserve, len(val_members), batch_size)

    membership: dict[str, list[str]] = {}
    for n in needs:
        for p in n.members:
            membership.setdefault(p.key, []).append(n.serves)

    picks: list[Pick] = []
    chosen: set[str] = set()
    count = {id(n): 0 for n in needs}
    exhausted: set[int] = set()

    def run(caps: dict[str, int]) -> None:
        nonlocal left
        while len(picks) < batch_size:
            n_split = {s: sum(1 for p in picks if p.point.split == s) for s in ("train", "validation")}
            live = [n for n in needs if id(n) not in exhausted and count[id(n)] < n.max_picks
                    and n_split[n.split] < caps[n.split]]
            if not live:
                return
            best = max(live, key=lambda n: n.priority * n.decay ** count[id(n)])  # first of equals: stable
            options = [p for p in best.members if p.key not in chosen and cost(p) <= left + 1e-9]
            if not options:
                exhausted.add(id(best))
                continue
            p = min(options, key=lambda q: best.order(q, state))
            prio = best.priority * best.decay ** count[id(best)]
            also = [s for s in membership.get(p.key, []) if s != best.serves and s not in ("validation", "bootstrap")]
            reason = f"{best.why}: {best.does(p)}" + (f" (also serves {', '.join(also[:2])})" if also else "")
            picks.append(Pick(p, reason, best.serves, cost(p), round(prio, 4)))
            chosen.add(p.key)
            state.add(p)
            count[id(best)] += 1
            left -= cost(p)

    run({"train": batch_size - reserve, "validation": reserve})
    n_val = sum(1 for p in picks if p.point.split == "validation")
    exhausted.clear()  # slots the validation reserve could not use go back to training (and, at bootstrap, on)
    run({"train": batch_size - n_val, "validation": batch_size if bootstrap else reserve})
    order = {id(p): i for i, p in enumerate(picks)}
    return sorted(picks, key=lambda p: (-p.priority, order[id(p)]))


def collected_keys(store) -> set[str]:
    """Keys of every point with a manifest in ``store`` (ok, saturated or failed: a failed point was
    already retried up to the limit and is not picked again)."""
    out = set()
    for m in store.manifests():
        try:
            out.add(SweepPoint.from_dict(m["point"]).key)
        except (KeyError, TypeError, ValueError):
            continue
    return out


__all__ = ["Need", "Pick", "StopDecision", "choose_next", "collected_keys", "find_needs", "identifiable_betas",
           "stop_rule", "BETA_RANGE", "MAX_CV", "MAX_VALIDATION_MAPE", "VALIDATION_SHARE"]
