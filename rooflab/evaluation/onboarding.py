"""Onboarding on measured experiments (issue 16): pool-based active learning over a target's real runs — how few
of them calibrate a new model / GPU, starting from the coefficients fitted on other setups.

**Targets.** A target is a (model, GPU) of the sim-to-real kit's eval split (``../shared/data/s2r``): Llama-3.1-8B,
Mixtral-8x7B, Qwen3-14B, Mixtral-8x22B (the Instruct and base checkpoints: one architecture), CodeLlama-34B and
Llama-2-70B on H100. The A100 and L40S experiments are one or two per model, so there the target is the GPU (all
its models: onboarding a new GPU). Its *pool* is its experiments with measurements; the withheld ones are predicted
at every step and never scored. The same on request traces: per model, the non-overloaded runs of
``../shared/data/real`` (the 4 ``reasoning`` runs are saturated — their clients time out thousands of requests —
and, as in ``make replay``, left out; docs/spec.md §6 keeps saturated runs out of the fit). Their prompts recur
every 100 requests and are served from vLLM's prefix cache (the replay models it: each prompt slot is a prefix
group); what is calibrated there is the cached-prompt regime, not prefill of unique prompts.

**A strategy** orders the pool. Step k fits the first k experiments and predicts every experiment of the target:

* the fit: :func:`rooflab.fit.summary_level.solve_summaries` on the picked experiments' per-stage mean TTFT / E2E,
  with the prior (the trainval fit of the sim-to-real benchmark, ``rooflab-best``) as start and prior centre, at its
  λ. Each experiment's rows come from one replay anchored at its measured operating point under the prior
  (:func:`~rooflab.fit.summary_level.anchored_replay`) and are cached: a refit is one small bounded least-squares
  solve, and the fit of a set of experiments is the same whichever order picked it — exactly
  ``calibrate_from_summaries(picked, prior, SummaryOptions(λ, iterations=1), prior=prior)``;
* **targeted**: rooflab's targeting picks the next experiment — every unpicked one is replayed with the current
  coefficients, its per-stage mean sensitivities give the information it would add
  (:mod:`rooflab.targeting.summary_information`), and the pick maximises the Bayesian D-optimal gain against the
  current posterior precision (prior + picked experiments) per GPU-hour (cost = the experiment's replayed span ×
  TP, under the prior);
* **random**: seeded random orders (3 seeds by default);
* **all**: every measured experiment — scored by leave-one-out (fit on the others, predict the one left out).

Scores: after k picks, the median APE over the target's *remaining* measured experiments of the whole-run mean E2E
and mean TTFT. The onboarding stop rule (:mod:`rooflab.targeting.onboard_stop`) is applied along the targeted path:
where it would have stopped, and what the remaining experiments' errors were there.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rooflab.data.s2r import OVERALL, load_kit
from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.fit.summary_level import SummaryOptions, SummaryTarget
from rooflab.model.coefficients import Coefficients, coefficients_from_doc
from rooflab.targeting.onboard_stop import TARGETS, onboard_stop
from rooflab.targeting.summary_information import (
    Z90,
    Forecast,
    StageRow,
    anchored_rows,
    d_gain,
    data_information,
    forecast,
    prior_precision,
    sd_shrink,
    sigma_from_errors,
    solve_rows,
    theta_names,
)

METRICS = ("e2e_mean", "e2e_p90", "e2e_p99", "ttft_mean", "ttft_p90", "ttft_p99", "itl_mean")  # the kit's
SCORED = ("e2e_mean", "ttft_mean")
SEEDS = (1, 2, 3)
GPU_SHORT = {"H100-SXM": "H100", "A100-80GB": "A100", "L40S": "L40S"}
DEFAULT_LAMBDA = 1e-2


# ================================================================================================ targets
@dataclass(frozen=True)
class PoolItem:
    """One experiment of a target: what it is and what was measured (``None``: withheld, predicted only)."""

    key: str  # exp_id (kit) or run name (real data)
    label: str
    tp: int
    measured: dict[str, float | None] | None  # whole run, the kit's metric names, ms
    means_us: dict[str, tuple[float, float]] | None  # stage key -> measured (mean TTFT, mean E2E) µs

    @property
    def is_measured(self) -> bool:
        return self.measured is not None


@dataclass(frozen=True)
class Target:
    name: str
    source: str  # "s2r" | "real"
    items: tuple[PoolItem, ...]
    note: str = ""

    @property
    def pool(self) -> list[PoolItem]:
        return [i for i in self.items if i.is_measured]


def model_family(hf_id: str) -> str:
    """``Mixtral-8x22B-Instruct-v0.1`` and ``Mixtral-8x22B-v0.1`` -> ``mixtral-8x22b`` (one architecture)."""
    name = hf_id.split("/")[-1].lower()
    for suffix in ("-instruct", "-hf", "-v0.1", "-v0-1"):
        name = name.replace(suffix, "")
    return name


def s2r_targets(kit_root: str | Path | None = None) -> list[Target]:
    """The kit's eval experiments grouped into targets (see the module doc)."""
    kit = load_kit(kit_root) if kit_root else load_kit()
    groups: dict[str, list[PoolItem]] = {}
    for e in kit.split("eval"):
        gpu = GPU_SHORT.get(e.hardware, e.hardware)
        fam = e.rooflab_model or model_family(e.model)
        name = f"{fam}/{gpu}" if gpu == "H100" else f"{gpu} (every model)"
        stages = "+".join(f"{s.rate:g}" for s in e.workload.stages)
        label = (f"{fam if gpu != 'H100' else ''} tp{e.tp} {e.workload.label} {stages} req/s, budget "
                 f"{e.engine.max_num_batched_tokens}" + (f", gmu {e.engine.gpu_memory_utilization:g}"
                                                         if e.engine.gpu_memory_utilization not in (None, 0.9) else "")
                 + (", offload" if e.engine.cpu_offload else "")).strip()
        measured = means = None
        if e.measured is not None:
            measured = {m: e.measured.get(m) for m in METRICS}
            means = {k: (s.ttft_mean * 1e3, s.e2e_mean * 1e3) for k, s in e.measured.stages.items()
                     if s.ttft_mean is not None and s.e2e_mean is not None}
        groups.setdefault(name, []).append(PoolItem(e.key, label, e.tp, measured, means))
    out = []
    for name, items in groups.items():
        note = "new GPU: every model's experiments on it" if "every model" in name else ""
        out.append(Target(name, "s2r", tuple(items), note))
    return sorted(out, key=lambda t: (-len(t.pool), t.name))


@lru_cache(maxsize=64)
def _real_trace(name: str) -> Trace:
    from rooflab.data.trace_readers import read_real_trace

    return read_real_trace(name)


def real_targets(root: str | Path | None = None) -> list[Target]:
    """Per model, the non-overloaded request-level runs of ``../shared/data/real`` (see the module doc)."""
    from rooflab.data.adapters.real_requests import DEFAULT_ROOT, list_real_runs
    from rooflab.replay.summary_metrics import summarize_run

    groups: dict[str, list[PoolItem]] = {}
    for name in list_real_runs(root or DEFAULT_ROOT):
        if name.rsplit("-", 1)[-1] == "reasoning":
            continue
        tr = _real_trace(name)
        s = summarize_run(tr.requests, ttft="ttft_us", e2e="e2e_us", failed="failed", stage=None).to_ms_dict()
        measured = {m: s[OVERALL].get(m) for m in METRICS}
        ttft, e2e = measured["ttft_mean"], measured["e2e_mean"]
        if ttft is None or e2e is None:
            raise InputError(tr.source, "requests", "no successful request: no measured means")
        item = PoolItem(name, f"{tr.workload} (tp{tr.tp})", tr.tp, measured, {OVERALL: (ttft * 1e3, e2e * 1e3)})
        groups.setdefault(f"{tr.model}/{GPU_SHORT.get(tr.hardware, tr.hardware)} (request traces)", []).append(item)
    seen = {e.real_run for e in load_kit().split("trainval") if e.real_run}  # runs the trainval prior was fitted on
    return [Target(n, "real", tuple(v), "prompts recur every 100 requests: served from the prefix cache"
                   + ("; the prior's training set holds these runs (not an onboarding: a fit check)"
                      if any(i.key in seen for i in v) else ""))
            for n, v in sorted(groups.items())]


@lru_cache(maxsize=64)
def _s2r_trace(key: str) -> Trace:
    from rooflab.evaluation.s2r import trace_of

    return trace_of(load_kit().get(key))


def item_trace(target: Target, key: str) -> Trace:
    return _s2r_trace(key) if target.source == "s2r" else _real_trace(key)


# ================================================================================================ the prior
def load_prior(path: str | Path, name: str = "rooflab-best") -> tuple[Coefficients, float]:
    """The prior coefficient set ``name`` of a fits file (``{set name: Coefficients.to_dict()}``, the sim-to-real
    benchmark's ``s2r-fits.json``) and its λ (read from its source line ``… λ=0.01``; default 1e-2)."""
    import json

    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise InputError(p, None, f"cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InputError(p, None, f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(doc, dict) or name not in doc:
        have = ", ".join(doc) if isinstance(doc, dict) else "-"
        raise InputError(p, name, f"no coefficient set {name!r} (have: {have})")
    coefs = coefficients_from_doc(doc[name], str(p))
    src = str(doc[name].get("source", "")) if isinstance(doc[name], dict) else ""
    m = re.search(r"λ=([0-9.eE+-]+)", src)
    coefs.source = src or coefs.source
    return coefs, float(m.group(1)) if m else DEFAULT_LAMBDA


# ================================================================================================ the engine
@dataclass
class Step:
    """One step of one strategy: the experiments fitted so far (in pick order) and every prediction."""

    strategy: str
    step: int
    picked: list[str]
    gpu_hours: float
    predicted: dict[str, dict[str, float | None]]  # exp -> metric -> ms (whole run)
    remaining_ape: dict[str, dict[str, float]]  # measured, not picked: exp -> metric -> APE
    reason: str = ""  # why the last experiment was picked (targeted)
    stop: str = ""  # the onboarding stop rule's decision after this step (targeted)
    converged: bool = False

    def median(self, metric: str) -> float:
        v = [a[metric] for a in self.remaining_ape.values() if np.isfinite(a[metric])]
        return float(np.median(v)) if v else float("nan")


@dataclass
class TargetResult:
    target: str
    source: str
    items: list[dict[str, Any]]  # key, label, tp, measured (bool), gpu_hours
    steps: list[Step]
    loo: dict[str, dict[str, float]]  # exp -> metric -> APE (fit on the target's other measured experiments)
    loo_predicted: dict[str, dict[str, float | None]]  # exp -> metric -> ms
    prior: str
    seconds: float
    note: str = ""
    replays: int = 0

    def path(self, strategy: str) -> list[Step]:
        return [s for s in self.steps if s.strategy == strategy]

    @property
    def total_gpu_hours(self) -> float:
        return float(sum(i["gpu_hours"] for i in self.items if i["measured"]))


class Onboarding:
    """The pool-based loop over one target (module doc), with every replay cached: a forecast is a function of
    (experiments fitted, experiment predicted) alone."""

    def __init__(self, target: Target, prior: Coefficients, options: SummaryOptions,
                 progress: Callable[[str], None] | None = None,
                 trace_of: Callable[[str], Trace] | None = None) -> None:
        self.target, self.prior, self.options = target, prior, options
        self.trace_of = trace_of or (lambda key: item_trace(target, key))
        self.progress = progress or (lambda _line: None)
        self.by_key = {i.key: i for i in target.items}
        self.blis_alpha = prior.formulas == "blis"
        self.M0 = prior_precision(prior, options)
        self.names = theta_names(prior)
        self._rows: dict[str, dict[str, StageRow]] = {}
        self._fits: dict[frozenset[str], Coefficients] = {}
        self._fc: dict[tuple[frozenset[str], str], Forecast] = {}
        self.replays = 0

    # ----------------------------------------------------------------------------------------- fitting
    def summary_target(self, key: str) -> SummaryTarget:
        item = self.by_key[key]
        assert item.means_us is not None
        return SummaryTarget(self.trace_of(key), dict(item.means_us), key)

    def fit_rows(self, key: str) -> dict[str, StageRow]:
        """The stage rows of a measured experiment from one replay anchored at its measurement, under the prior."""
        if key not in self._rows:
            self._rows[key] = anchored_rows(self.summary_target(key), self.prior, self.options)
            self.replays += 1
        return self._rows[key]

    def means(self, key: str) -> dict[str, tuple[float, float]]:
        means = self.by_key[key].means_us
        assert means is not None
        return means

    def information(self, keys: set[str] | frozenset[str]) -> np.ndarray:
        """Posterior precision (units of 1/σ²) after fitting ``keys``: prior + their measured rows."""
        return np.asarray(self.M0 + data_information({k: self.fit_rows(k) for k in keys},
                                                     {k: self.means(k) for k in keys}, self.blis_alpha,
                                                     self.options.per_stage))

    def fit(self, keys: set[str] | frozenset[str]) -> Coefficients:
        s = frozenset(keys)
        if not s:
            return self.prior
        if s not in self._fits:
            c = solve_rows({k: self.fit_rows(k) for k in s}, {k: self.means(k) for k in s}, self.prior, self.options)
            c.source = f"onboarding fit on {', '.join(sorted(s))} around {self.prior.source}"
            self._fits[s] = c
        return self._fits[s]

    def forecast(self, keys: set[str] | frozenset[str], key: str) -> Forecast:
        s = frozenset(keys)
        if (s, key) not in self._fc:
            self._fc[(s, key)] = forecast(self.trace_of(key), self.fit(s),
                                          per_stage=self.options.per_stage)
            self.replays += 1
        return self._fc[(s, key)]

    # ----------------------------------------------------------------------------------------- scoring
    def apes(self, fc: Forecast, key: str) -> dict[str, float]:
        meas = self.by_key[key].measured or {}
        pred = fc.summary.get(OVERALL) or {}
        out = {}
        for m in METRICS:
            p, a = pred.get(m), meas.get(m)
            out[m] = abs(p - a) / abs(a) if (p is not None and a) else float("nan")
        return out

    def cost_h(self, key: str) -> float:
        """The experiment's GPU-hours: its replayed span under the prior × TP (fixed, whoever picks it)."""
        return self.forecast(frozenset(), key).gpu_s / 3600

    # ----------------------------------------------------------------------------------------- strategies
    def path(self, strategy: str, choose: Callable[[list[str], list[str]], tuple[str, str]]) -> list[Step]:
        """Fit, predict everything, pick (``choose(picked, remaining) -> (key, reason)``) until the pool is spent."""
        pool = [i.key for i in self.target.pool]
        picked: list[str] = []
        steps: list[Step] = []
        reason = ""
        while True:
            S = frozenset(picked)
            pred = {i.key: self.forecast(S, i.key).summary.get(OVERALL) or {} for i in self.target.items}
            remaining = [k for k in pool if k not in S]
            steps.append(Step(strategy, len(picked), list(picked), sum(self.cost_h(k) for k in picked),
                              {k: {m: v.get(m) for m in METRICS} for k, v in pred.items()},
                              {k: self.apes(self.forecast(S, k), k) for k in remaining}, reason))
            if not remaining:
                return steps
            nxt, reason = choose(picked, remaining)
            self.progress(f"  {self.target.name} {strategy} step {len(picked) + 1}: {nxt} ({reason[:110]})")
            picked.append(nxt)

    def targeted_choice(self, picked: list[str], remaining: list[str]) -> tuple[str, str]:
        S = frozenset(picked)
        M = self.information(S)
        best: tuple[float, str, float, np.ndarray] | None = None
        for k in remaining:
            info = self.forecast(S, k).information(self.options.per_stage)
            g = d_gain(M, info)
            score = g / max(self.cost_h(k), 1e-9)
            if best is None or score > best[0]:
                best = (score, k, g, sd_shrink(M, info))
        assert best is not None
        _, k, g, shrink = best
        top = [self.names[j] for j in np.argsort(-shrink)[:3] if shrink[j] > 0.05]
        what = ", ".join(f"{n} by {shrink[self.names.index(n)]:.0%}" for n in top) or "nothing by > 5%"
        return k, (f"D-optimal: {self.by_key[k].label} shrinks the posterior sd of {what}; gain {g:.2f} nats for "
                   f"{self.cost_h(k):.2f} GPU-h")

    def random_choice(self, seed: int) -> Callable[[list[str], list[str]], tuple[str, str]]:
        order = [self.target.pool[i].key for i in np.random.default_rng(seed).permutation(len(self.target.pool))]

        def choose(picked: list[str], remaining: list[str]) -> tuple[str, str]:
            k = next(x for x in order if x in remaining)
            return k, f"random order (seed {seed})"
        return choose

    def apply_stop_rule(self, steps: list[Step]) -> None:
        """The onboarding stop rule after every targeted step ≥ 1 (module doc of :mod:`…onboard_stop`)."""
        for s in steps[1:]:
            S, before = frozenset(s.picked), frozenset(s.picked[:-1])
            last = s.picked[-1]
            pre = self.apes(self.forecast(before, last), last)
            errs = []
            for k in S:
                a = self.apes(self.forecast(S, k), k)
                errs += [a["ttft_mean"], a["e2e_mean"]]
            cov = sigma_from_errors(errs) ** 2 * np.linalg.inv(self.information(S))
            half: dict[str, float] = {}
            for k in s.remaining_ape:
                sd = self.forecast(S, k).relative_sd(cov)
                for m in SCORED:
                    half[m] = max(half.get(m, 0.0), Z90 * sd[m])
            d = onboard_stop({m: pre[m] for m in SCORED}, half or None, gpu_seconds_spent=s.gpu_hours * 3600,
                             budget_gpu_seconds=None, iteration=s.step, max_iterations=None, prequential_runs=1,
                             open_candidates=len(s.remaining_ape))
            s.stop, s.converged = d.reason, d.converged

    def leave_one_out(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float | None]]]:
        pool = [i.key for i in self.target.pool]
        apes, preds = {}, {}
        for k in pool:
            others = frozenset(x for x in pool if x != k)
            if not others:
                continue
            fc = self.forecast(others, k)
            apes[k] = self.apes(fc, k)
            preds[k] = {m: (fc.summary.get(OVERALL) or {}).get(m) for m in METRICS}
        return apes, preds


def run_target(target: Target, prior: Coefficients, lam: float, *, seeds: tuple[int, ...] = SEEDS,
               progress: Callable[[str], None] | None = None,
               trace_of: Callable[[str], Trace] | None = None) -> TargetResult:
    """Every strategy on one target (module doc). ``trace_of``: an experiment's request stream (default: the kit's
    or the real run's)."""
    t0 = time.perf_counter()
    ob = Onboarding(target, prior, SummaryOptions(prior_strength=lam, iterations=1), progress, trace_of)
    steps = ob.path("targeted", ob.targeted_choice)
    ob.apply_stop_rule(steps)
    for seed in seeds:
        steps += ob.path(f"random-{seed}", ob.random_choice(seed))
    full = frozenset(i.key for i in target.pool)
    steps.append(Step("all", len(full), sorted(full), sum(ob.cost_h(k) for k in full),
                      {i.key: {m: (ob.forecast(full, i.key).summary.get(OVERALL) or {}).get(m) for m in METRICS}
                       for i in target.items}, {}))
    loo, loo_pred = ob.leave_one_out()
    items = [{"key": i.key, "label": i.label, "tp": i.tp, "measured": i.is_measured, "gpu_hours": ob.cost_h(i.key)}
             for i in target.items]
    return TargetResult(target.name, target.source, items, steps, loo, loo_pred, prior.source,
                        time.perf_counter() - t0, target.note, ob.replays)


# ================================================================================================ summaries
def first_reaching(steps: list[Step], targets: dict[str, float] = TARGETS) -> Step | None:
    """The first step whose remaining experiments' median APEs are all within ``targets``."""
    for s in steps:
        if s.remaining_ape and all(s.median(m) <= t for m, t in targets.items()):
            return s
    return None


def random_median(result: TargetResult, step: int, metric: str) -> float:
    """The median over random seeds of the seeds' median APE after ``step`` picks."""
    vals = [s.median(metric) for s in result.steps if s.strategy.startswith("random-") and s.step == step]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.median(vals)) if vals else float("nan")


def summary_row(r: TargetResult) -> dict[str, Any]:
    """One row of the per-target table (see ``onboarding_report``)."""
    tgt = r.path("targeted")
    n = len([i for i in r.items if i["measured"]])
    total = r.total_gpu_hours
    hit = first_reaching(tgt)
    rnd_hits = [first_reaching(r.path(f"random-{s}")) for s in sorted({int(x.strategy.split("-")[1]) for x in r.steps
                                                                         if x.strategy.startswith("random-")})]
    wins = []
    for k in range(1, n):  # budgets with something left to score
        t = np.mean([tgt[k].median(m) for m in SCORED])
        rr = np.mean([random_median(r, k, m) for m in SCORED])
        if np.isfinite(t) and np.isfinite(rr):
            wins.append(bool(t <= rr + 1e-12))
    stop = next((s for s in tgt if s.converged), None)
    loo = {m: float(np.median([a[m] for a in r.loo.values()])) if r.loo else float("nan") for m in SCORED}
    return {"target": r.target, "source": r.source, "experiments": len(r.items), "measured": n,
            "gpu_hours_pool": total,
            "prior_e2e": tgt[0].median("e2e_mean"), "prior_ttft": tgt[0].median("ttft_mean"),
            "step1_e2e": tgt[1].median("e2e_mean") if n > 1 else math.nan,
            "step1_ttft": tgt[1].median("ttft_mean") if n > 1 else math.nan,
            "step2_e2e": tgt[2].median("e2e_mean") if n > 2 else math.nan,
            "step2_ttft": tgt[2].median("ttft_mean") if n > 2 else math.nan,
            "targeted_reach": None if hit is None else hit.step,
            "targeted_reach_share": None if hit is None else hit.gpu_hours / total,
            "random_reach": [None if h is None else h.step for h in rnd_hits],
            "target_met": hit is not None and (hit.step <= 2 or hit.gpu_hours <= 0.25 * total),
            "targeted_beats_random": f"{sum(wins)}/{len(wins)}" if wins else "n/a",
            "stop_step": None if stop is None else stop.step,
            "stop_e2e": None if stop is None else stop.median("e2e_mean"),
            "stop_ttft": None if stop is None else stop.median("ttft_mean"),
            "loo_e2e": loo["e2e_mean"], "loo_ttft": loo["ttft_mean"],
            "first_pick": tgt[1].picked[-1] if n > 0 and len(tgt) > 1 else None, "seconds": r.seconds}


def prediction_rows(r: TargetResult) -> list[dict[str, Any]]:
    """The predictions of record: every step of every strategy, every experiment of the target, every metric
    (``leave-one-out``: each measured experiment from the fit on the others, at step n − 1)."""
    rows = []
    for s in r.steps:
        for exp, pred in s.predicted.items():
            for m in METRICS:
                rows.append({"target": r.target, "strategy": s.strategy, "step": s.step,
                             "gpu_hours": round(s.gpu_hours, 4), "exp_id": exp, "metric": m,
                             "predicted_ms": pred.get(m)})
    cost = {i["key"]: i["gpu_hours"] for i in r.items}
    for exp, pred in r.loo_predicted.items():
        for m in METRICS:
            rows.append({"target": r.target, "strategy": "leave-one-out", "step": len(r.loo) - 1,
                         "gpu_hours": round(r.total_gpu_hours - cost[exp], 4), "exp_id": exp, "metric": m,
                         "predicted_ms": pred.get(m)})
    return rows


@dataclass
class OnboardingResult:
    results: list[TargetResult]
    seconds: float
    prior: str
    lam: float
    notes: list[str] = field(default_factory=list)
