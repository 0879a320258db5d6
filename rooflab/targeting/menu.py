"""Targeting v1 (docs/spec.md §9): the seed's menu driven by the diagnosis. Deterministic and explainable.

:func:`choose_next`: the next batch of sweep points, each with a one-line reason. The
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

``--targeting d-optimal`` (:mod:`rooflab.targeting.doptimal`, the default) scores the same candidates by
information per GPU-second instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rooflab.collect.spec import SEED_ORDER, Campaign, Combo
from rooflab.data.sweep import SweepPoint
from rooflab.fit.calibration import Calibration
from rooflab.fit.coverage import IDENTIFIED_CHECK
from rooflab.fit.health import FAIL, WARN, Check
from rooflab.fit.residuals import BATCH_BINS, CONTEXT_BINS, HOTSPOT_MAPE
from rooflab.targeting.candidates import (
    VALIDATION_SHARE,
    CandidateState,
    Pick,
    bucket_distance,
    bucket_index,
    combo_of,
    describe,
    est_batch,
    est_context,
    family_rank,
    hotspot_rows,
    model_arch,
    model_layers,
    open_candidates,
    points_from_keys,
    validation_order,
)

DECAY = 0.5
MAX_PICKS = {FAIL: 3, WARN: 2, "hotspot": 2, "range": 2}
CHECK_BONUS = {IDENTIFIED_CHECK: 0.5, "data vs prior precision": 0.4, "bootstrap CV": 0.3, "draws pinned at 0": 0.2,
               "leave-one-run-out change": 0.1}
BETA_CHECKS = tuple(CHECK_BONUS)
DESIGN_CHECKS = ("condition number", "VIF", "pairwise bootstrap correlation", "proportional terms")
PROMOTION_PRIORITY = 5.0
VALIDATION_PRIORITY = 1.5
RANGE_PRIORITY = 1.0


@dataclass
class Need:
    """One thing the next batch should serve, with the candidates that serve it."""

    serves: str
    priority: float
    why: str  # the diagnosis half of a pick's reason
    split: str  # the split its candidates come from
    members: list[SweepPoint]  # candidates that serve it (not yet collected)
    order: Callable[[SweepPoint, CandidateState], tuple]  # preference (smaller first), given what is collected/chosen
    does: Callable[[SweepPoint], str]  # what a point does for it
    max_picks: int = 2
    decay: float = DECAY

    def to_dict(self) -> dict:
        return {"serves": self.serves, "priority": float(self.priority), "why": self.why, "split": self.split,
                "candidates": len(self.members), "max_picks": self.max_picks}


Order = Callable[[SweepPoint, CandidateState], tuple]
# (members, order, does) of a need: the candidates, their preference, what a point does for it
Menu = tuple[list[SweepPoint], Order, Callable[[SweepPoint], str]]


def _rate(p: SweepPoint) -> float:
    return float(p.param("rate"))


def _inp(p: SweepPoint) -> int:
    return int(p.param("input_tokens"))


def _cost(p: SweepPoint) -> float:
    return p.duration_s * p.tp


def _index_order(index: dict[str, int]) -> Order:
    """Preference by a fixed position (a design's order)."""
    return lambda p, s: (index[p.key],)


# ------------------------------------------------------------------------------------------- β menu
def _beta_menu(beta: str, train: list[SweepPoint], state: CandidateState) -> Menu | None:
    """(members, order, does) of the seed's map for one β, or None when the variant has no such entry."""
    if beta == "beta1":
        rank = family_rank(("W1", "W4-A"))
        return ([p for p in train if p.family in ("W1", "W4-A")],
                lambda p, s: (rank(p), -s.novelty(p), -_inp(p), _cost(p), p.key),
                lambda p: f"{describe(p)} exercises the prefill roofline")
    if beta == "beta1_attn":  # attention-score FLOPs grow with n·context: the longest unique prompts pin them
        rank = family_rank(("W1", "W4-A"))
        return ([p for p in train if p.family in ("W1", "W4-A")],
                lambda p, s: (rank(p), -_inp(p), -s.novelty(p), _cost(p), p.key),
                lambda p: f"{describe(p)} exercises prefill attention at {_inp(p)}-token prompts")
    if beta == "beta2":
        rank = family_rank(("W2", "W3", "W4-C"))
        return ([p for p in train if p.family in ("W2", "W3", "W4-C")],
                lambda p, s: (rank(p), -s.novelty(p), -_inp(p) - _rate(p), _cost(p), p.key),
                lambda p: f"{describe(p)} exercises the decode roofline")
    if beta in ("beta3", "beta7"):
        rank = family_rank(("W2", "W1"))
        what = "varies the static weights" if beta == "beta3" else "varies the weights against the per-step constant"
        return ([p for p in train if p.family in ("W1", "W2")],
                lambda p, s: (p.model in s.models, rank(p), _cost(p), -s.novelty(p), _inp(p), p.key),
                lambda p: f"{describe(p)} {what}" + ("" if p.model in state.models else " (model new to the data)"))
    if beta == "beta4":
        return ([p for p in train if p.family == "W3" and model_arch(p.model).is_moe],
                lambda p, s: (-s.novelty(p), -_rate(p), _cost(p), p.key),
                lambda p: f"{describe(p)} varies the active experts (MoE)")
    if beta == "beta5":
        rank = family_rank(("W3",))
        return ([p for p in train if p.tp > 1],
                lambda p, s: (rank(p), -s.novelty(p), -_rate(p), _cost(p), p.key),
                lambda p: f"{describe(p)} varies the all-reduce (TP{p.tp})")
    if beta == "beta6":
        rank = family_rank(("W3", "W4-A", "W4-C"))
        return ([p for p in train if p.family in ("W3", "W4-A", "W4-C")],
                lambda p, s: (rank(p), -s.novelty(p), -_rate(p), _cost(p), p.key),
                lambda p: f"{describe(p)} varies the batch size")
    if beta == "beta_layer":
        rank = family_rank(("W2", "W1", "W3", "W4-C", "W4-A"))
        return ([p for p in train if model_layers(p.model) not in state.layers],
                lambda p, s: (model_layers(p.model) in s.layers, rank(p), -s.novelty(p), _cost(p), p.key),
                lambda p: f"{describe(p)} brings a new layer count ({model_layers(p.model)}; data: "
                          f"{', '.join(map(str, sorted(state.layers))) or 'none'})")
    return None


def _joint_menu(betas: list[str], train: list[SweepPoint], state: CandidateState) -> Menu | None:
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

    def order(p: SweepPoint, s: CandidateState) -> tuple:
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


def _check_why(c: Check) -> str:
    if c.check == IDENTIFIED_CHECK:
        return f"{c.target} unseen by the data ({c.value:.0f} steps show it)"
    if c.check == "proportional terms":
        return f"{c.target.replace('→', ' and ')} proportional in the data (one held at 0)"
    label, cmp, t_pass, t_fail, pct = _CHECK_TEXT[c.check]
    thr = t_fail if c.status == FAIL else t_pass
    fmt: Callable[[float], str] = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3g}")
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


def _health_needs(calib: Calibration, train: list[SweepPoint], state: CandidateState) -> list[Need]:
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
def _nearest(points: list[SweepPoint], dist: Callable[[SweepPoint], Any]) -> list[SweepPoint]:
    """The points at the smallest distance (all of them when several tie)."""
    if not points:
        return []
    d = {p.key: dist(p) for p in points}
    best = min(d.values())
    close = (lambda v: v == best) if isinstance(best, tuple) else (lambda v: abs(v - best) <= 1e-9)
    return [p for p in points if close(d[p.key])]


def _hotspot_menu(dim: str, bucket: str, train: list[SweepPoint]) -> Menu | None:
    seed_rank = family_rank(SEED_ORDER)
    if dim == "model":
        members = [p for p in train if p.model == bucket]
        if members:
            return (members, lambda p, s: (-s.novelty(p), seed_rank(p), _cost(p), p.key),
                    lambda p: f"{describe(p)} adds data on {bucket}")
        try:  # a held-out model: the nearest training models (same MoE-ness, closest size)
            ref = model_arch(bucket)
        except Exception:
            return None
        ref_size = ref.n_layers * ref.hidden

        def dist(p: SweepPoint) -> tuple[bool, float]:
            a = model_arch(p.model)
            return a.is_moe != ref.is_moe, round(abs(math.log(a.n_layers * a.hidden / ref_size)), 6)

        return (_nearest(train, dist), lambda p, s: (-s.novelty(p), seed_rank(p), _cost(p), p.key),
                lambda p: f"{describe(p)}: the nearest training model to held-out {bucket}")
    if dim == "tp":
        try:
            tp = int(bucket)
        except ValueError:
            return None
        rank = family_rank(("W3",))
        return (_nearest(train, lambda p: abs(math.log2(p.tp / tp))),
                lambda p, s: (rank(p), -s.novelty(p), -_rate(p), _cost(p), p.key),
                lambda p: f"{describe(p)} adds data at TP{p.tp}")
    if dim == "workload":
        members = [p for p in train if p.family == bucket]
        return (members, lambda p, s: (-s.novelty(p), _cost(p), p.key), lambda p: f"{describe(p)} adds {bucket} data")
    if dim == "phase_mix":
        fams = {"prefill": ("W1", "W4-A"), "decode": ("W2", "W4-C", "W3"), "mixed": ("W4-A", "W4-C", "W3")}.get(bucket)
        if fams is None:
            return None
        rank = family_rank(fams)
        sign = -1 if bucket == "mixed" else 1  # mixed steps come with high rates; pure decode with low ones
        return ([p for p in train if p.family in fams],
                lambda p, s: (rank(p), -s.novelty(p), sign * _rate(p), -int(p.param("input_tokens")), _cost(p), p.key),
                lambda p: f"{describe(p)} makes {bucket} steps")
    if dim == "batch_size":
        if bucket not in BATCH_BINS[1]:
            return None
        rank = family_rank(("W3",))
        return (_nearest(train, lambda p: bucket_distance(est_batch(p), bucket, BATCH_BINS)),
                lambda p, s: (rank(p), -s.novelty(p), _cost(p), p.key),
                lambda p: f"{describe(p)} runs batches of ~{est_batch(p):.0f}")
    if dim == "context":
        if bucket not in CONTEXT_BINS[1]:
            return None
        rank = family_rank(("W2", "W1"))
        return (_nearest(train, lambda p: bucket_distance(est_context(p), bucket, CONTEXT_BINS)),
                lambda p, s: (rank(p), -s.novelty(p), _cost(p), p.key),
                lambda p: f"{describe(p)} runs contexts of ~{est_context(p):.0f} tokens")
    return None


def _hotspot_needs(calib: Calibration, train: list[SweepPoint]) -> list[Need]:
    hot = hotspot_rows(calib).sort_values("mape", ascending=False)
    needs: dict[str, Need] = {}
    for r in hot.to_dict("records"):
        dim, bucket, mape = str(r["dimension"]), str(r["bucket"]), float(r["mape"])
        serves = f"hotspot {dim}={bucket}"
        if serves in needs:  # the worst split first
            continue
        menu = _hotspot_menu(dim, bucket, train)
        if menu is None or not menu[0]:
            continue
        priority = 2.0 + min(1.0, (mape - HOTSPOT_MAPE) / HOTSPOT_MAPE)
        why = f"hotspot {dim}={bucket} MAPE {mape:.0%} > {HOTSPOT_MAPE:.0%} ({r['split']}, {r['steps']} steps)"
        needs[serves] = Need(serves, priority, why, "train", *menu, max_picks=MAX_PICKS["hotspot"])
    return list(needs.values())


# ------------------------------------------------------------------------------------------- range extension
def _range_order(est: Callable[[SweepPoint], float], rank: Callable[[SweepPoint], int]) -> Order:
    return lambda p, s: (-est(p), rank(p), -s.novelty(p), p.duration_s * p.tp, p.key)


def _range_needs(calib: Calibration, train: list[SweepPoint]) -> list[Need]:
    res = calib.residuals
    res = res[(res["split"] == "train") & (res["steps"] > 0)]
    out = []
    for dim, bins, est, what in (("context", CONTEXT_BINS, est_context, "contexts"),
                                 ("batch_size", BATCH_BINS, est_batch, "batch sizes")):
        have = [bins[1].index(b) for b in res.loc[res["dimension"] == dim, "bucket"] if b in bins[1]]
        if not have or not train:
            continue
        top = max(have)
        beyond = [p for p in train if bucket_index(est(p), bins) > top]
        if not beyond:
            continue
        cand_top = max(bucket_index(est(p), bins) for p in beyond)
        rank = family_rank(("W2", "W1") if dim == "context" else ("W3",))
        why = f"range extension: data {what} reach {bins[1][top]}, candidates reach {bins[1][cand_top]}"
        serves = "range context" if dim == "context" else "range batch"
        out.append(Need(serves, RANGE_PRIORITY, why, "train", beyond, _range_order(est, rank),
                        (lambda p: f"{describe(p)} (~{est_context(p):.0f}-token contexts)") if dim == "context" else
                        (lambda p: f"{describe(p)} (batches of ~{est_batch(p):.0f})"),
                        max_picks=MAX_PICKS["range"]))
    return out


# ------------------------------------------------------------------------------------------- bootstrap
def _bootstrap_needs(campaign: Campaign, cands: dict[str, SweepPoint]) -> list[Need]:
    train = [p for p in cands.values() if p.split == "train"]
    val = [p for p in cands.values() if p.split == "validation"]
    if "bootstrap" in campaign.designs:
        pts = [p for p in campaign.design("bootstrap") if p.key in cands]
        index = {p.key: i for i, p in enumerate(pts)}
        why = "bootstrap design 'bootstrap' (campaign config)"
        return [Need("bootstrap", 2.0, why, split, [p for p in pts if p.split == split], _index_order(index), describe,
                     max_picks=len(pts), decay=1.0) for split in ("train", "validation")]

    def pick(combo: Combo, fam: str, param: str, which: str) -> SweepPoint | None:
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
    needs: list[Need] = []
    taken: dict[str, SweepPoint] = {}
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
                              _index_order(idx), describe, max_picks=len(members), decay=1.0))
    covered = {combo_of(p) for p in taken.values()}
    rest = [p for p in train if combo_of(p) not in covered]  # combos with none of W1/W2/W3: one point per family
    if rest:
        firsts = list({(combo_of(p), p.family): p for p in reversed(rest)}.values())[::-1]
        needs.append(Need("bootstrap", 0.5, "bootstrap (space-filling start): one point per family", "train", firsts,
                          lambda p, s: (p.key,), describe, max_picks=len(firsts), decay=1.0))
    if val:
        order = validation_order(campaign)
        s0 = CandidateState([], set())
        nearest = [min((p for p in val if combo_of(p) == combo_of(c)), key=lambda p: order(p, s0), default=None)
                   for c in campaign.validation_combos]
        first = [p for p in nearest if p is not None]
        needs.append(Need("bootstrap", 3.5, "bootstrap: one held-out point per validation combo", "validation", first,
                          lambda p, s: (first.index(p),), describe, max_picks=len(first), decay=1.0))
    return needs


# ------------------------------------------------------------------------------------------- needs
def find_needs(calib: Calibration | None, campaign: Campaign, collected: set[str]) -> list[Need]:
    """The diagnosis as needs, highest priority first (``calib`` None: the bootstrap)."""
    cands = open_candidates(campaign, collected)
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
                              validation_order(campaign),
                              lambda p: f"held-out {describe(p)} measures the held-out MAPE",
                              max_picks=1))
        needs.append(Need("validation", VALIDATION_PRIORITY, f"validation reserve (~{VALIDATION_SHARE:.0%} of "
                          "each batch)", "validation", val, validation_order(campaign),
                          lambda p: f"held-out {describe(p)} (space-filling)", max_picks=len(val), decay=1.0))
    return sorted(needs, key=lambda n: -n.priority)


def _state(calib: Calibration | None, collected: Iterable[str] | None) -> CandidateState:
    data_models: set[str] = set()
    if calib is not None:
        res = calib.residuals
        data_models = set(res.loc[(res["split"] == "train") & (res["dimension"] == "model") & (res["steps"] > 0),
                                  "bucket"].astype(str))
    return CandidateState(points_from_keys(collected or ()), data_models)


def choose_next(calib: Calibration | None, campaign: Campaign, collected: set[str], *, batch_size: int,
                budget_gpu_seconds_left: float | None, iteration: int) -> list[Pick]:
    """The next batch of sweep points (docs/spec.md §9, first version: the seed's menu driven by the diagnosis).

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

    def cost(p: SweepPoint) -> float:
        return float(campaign.gpu_seconds([p])) * reps

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
