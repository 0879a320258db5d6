"""Onboarding a new model / GPU / vLLM version (issue 16): the campaign loop
(:func:`rooflab.campaign.loop.run_campaign`) with a person — or a cluster job — in the collect step, started from
coefficients fitted on other setups.

Each iteration:

* **collect** — the iteration's runs that are not in the state's store yet are *pending*: their ready inference-perf
  configs are written (:func:`rooflab.campaign.onboard_state.write_proposals`) and the loop pauses ("waiting for N
  runs"); ``rooflab onboard ingest`` brings results in and the next call resumes the iteration. With a launcher
  (the twin's direct launcher, a cluster) the runs are collected in place instead;
* **calibrate** — from run summaries, around the prior (:func:`rooflab.targeting.summary_information.solve_rows`:
  every run's per-stage mean rows from one replay anchored at its measurement under the prior, one bounded solve,
  prior centre = the prior, λ of the setup). The loop's ``Calibration`` slot stays empty: request-level results
  have no step table to run the step fit on; this fit lives in :attr:`OnboardSteps.current`;
* **predicted accuracy** — the runs just measured, predicted before they were fitted (prequential APE), and every
  open candidate's predicted mean TTFT / E2E with its 90% interval under the fit's posterior;
* **stop** — :func:`rooflab.targeting.onboard_stop.onboard_stop` (passed to the loop as its stop rule);
* **target** — Bayesian D-optimal over the open candidates (the campaign's greedy selection,
  :func:`rooflab.targeting.doptimal.greedy`, on the information each candidate's replay predicts for the summary fit,
  :mod:`rooflab.targeting.summary_information`), per predicted GPU-second, with the campaign's reason text; a
  candidate whose replay saturates (run-level checks of docs/spec.md §6 on the predicted latencies) or fails requests
  carries no information — its measurement would be routed out of the fit — and is never proposed;
* **record** — ``fits/iteration-NNN.json`` in the state, and whatever ``on_record`` does (the CLI logs it to MLflow
  through ``tracking/``).

Resumable like a campaign: plans in the state's store (:class:`rooflab.data.store.StorePlans`), fits on disk, every
computation deterministic given the runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rooflab.campaign.loop import CampaignOutcome, CollectOutcome, IterationRecord, run_campaign
from rooflab.campaign.onboard_state import COEFFICIENTS_FILE, PINS, OnboardState, point_trace, write_proposals
from rooflab.collect.collector import Launcher, collect
from rooflab.collect.spec import Campaign
from rooflab.data.store import COMPLETE
from rooflab.data.sweep import SweepPoint
from rooflab.data.trace_readers import read_store_trace
from rooflab.files import atomic_write_text, json_dumps
from rooflab.fit.calibration import Calibration
from rooflab.fit.summary_level import OVERALL, SummaryOptions, SummaryTarget
from rooflab.model.coefficients import Coefficients, coefficients_from_doc
from rooflab.replay.summary_metrics import summarize_run
from rooflab.targeting.candidates import Pick, describe
from rooflab.targeting.doptimal import greedy
from rooflab.targeting.onboard_stop import TARGETS, onboard_stop
from rooflab.targeting.prediction import Prediction
from rooflab.targeting.stop import StopDecision
from rooflab.targeting.strategies import Spend
from rooflab.targeting.summary_information import (
    MEANS,
    Z90,
    Forecast,
    StageRow,
    anchored_rows,
    data_information,
    forecast,
    prior_precision,
    sigma_from_errors,
    solve_rows,
    theta_names,
)


@dataclass
class OnboardFit:
    """One refit: the coefficients, what they were fitted on, and the predicted accuracy."""

    iteration: int
    coefficients: Coefficients
    fitted: list[str]  # run ids
    precision: np.ndarray  # posterior precision in units of 1/σ² (summary_information)
    sigma: float
    prequential: dict[str, float] | None  # median APE of the last batch's means, predicted before it was fitted
    prequential_runs: dict[str, dict[str, float]]  # run -> metric -> APE
    candidates: dict[str, tuple[SweepPoint, Forecast]] = field(default_factory=dict)  # open candidates

    def covariance(self) -> np.ndarray:
        return np.asarray(self.sigma ** 2 * np.linalg.inv(self.precision))

    def predicted(self, fc: Forecast) -> dict[str, float]:
        """Predicted mean TTFT / E2E (ms) of a forecast and their 90% relative half-widths."""
        s = fc.summary.get(OVERALL) or {}
        sd = fc.relative_sd(self.covariance())
        return {"ttft_ms": float(s.get("ttft_mean") or math.nan), "e2e_ms": float(s.get("e2e_mean") or math.nan),
                "ttft_rel90": Z90 * sd["ttft_mean"], "e2e_rel90": Z90 * sd["e2e_mean"]}

    @property
    def judged(self) -> list[Forecast]:
        """The open candidates the stop rule judges: those a fit could use — not one predicted to fail requests or
        to saturate (docs/spec.md §6 routes such a run out of the fit, so targeting never proposes it)."""
        return [fc for _, fc in self.candidates.values() if fc.rows and not fc.failed and not fc.saturated]

    @property
    def halfwidth(self) -> dict[str, float] | None:
        """The largest 90% relative half-width over the judged open candidates, per mean (None: none left)."""
        if not self.judged:
            return None
        sds = [fc.relative_sd(self.covariance()) for fc in self.judged]
        return {m: Z90 * max((s[m] for s in sds), default=math.nan) for m in MEANS}

    def to_dict(self) -> dict[str, Any]:
        names = theta_names(self.coefficients)
        sd = np.sqrt(np.diag(self.covariance()))
        return {"iteration": self.iteration, "coefficients": self.coefficients.to_dict(), "fitted_runs": self.fitted,
                "sigma": self.sigma, "posterior_sd": dict(zip(names, map(float, sd))),
                "prequential": self.prequential, "prequential_runs": self.prequential_runs,
                "predicted": [{"point": p.label(), "gpu_hours": fc.gpu_s / 3600, **self.predicted(fc)}
                              for p, fc in self.candidates.values()],
                "halfwidth90": self.halfwidth}


@dataclass
class OnboardRecord:
    """What an iteration produced, for a tracker (the CLI logs it to MLflow)."""

    iteration: int
    fit: OnboardFit
    stop: StopDecision
    picks: list[Pick]
    gpu_seconds: float
    doc: dict[str, Any]


def measured_means(trace_requests: Any) -> dict[str, tuple[float, float]] | None:
    """The measured whole-run mean (TTFT, E2E) in µs of a request table with ``ttft_us`` / ``e2e_us`` / ``failed``."""
    s = summarize_run(trace_requests, ttft="ttft_us", e2e="e2e_us", failed="failed", stage=None).overall
    if not (np.isfinite(s.ttft_mean) and np.isfinite(s.e2e_mean)):
        return None
    return {OVERALL: (s.ttft_mean * 1e3, s.e2e_mean * 1e3)}


def apes(fc: Forecast, means_us: dict[str, tuple[float, float]]) -> dict[str, float]:
    pred = fc.summary.get(OVERALL) or {}
    ttft, e2e = means_us[OVERALL]
    out = {}
    for m, actual in (("ttft_mean", ttft / 1e3), ("e2e_mean", e2e / 1e3)):
        p = pred.get(m)
        out[m] = abs(p - actual) / actual if p is not None and actual else math.nan
    return out


class OnboardSteps:
    """The campaign loop's steps for an onboarding (module doc). ``launcher``: collect the runs in place (None: a
    person or a cluster job does, and the loop pauses); ``on_record``: called with every iteration's record."""

    def __init__(self, state: OnboardState, *, launcher: Launcher | None = None,
                 report: Callable[[str], None] = print,
                 on_record: Callable[[OnboardRecord], None] | None = None) -> None:
        self.state, self.campaign, self.prior = state, state.campaign, state.prior
        self.store = state.store
        self.launcher, self.report, self.on_record = launcher, report, on_record
        self.options = SummaryOptions(prior_strength=state.setup.prior_strength, iterations=1)
        self.current: OnboardFit | None = None
        self._rows: dict[str, dict[str, StageRow]] = {}
        self._means: dict[str, dict[str, tuple[float, float]]] = {}
        self._plan_picks: dict[int, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------------------------------ collect
    def _plan(self, iteration: int) -> list[dict[str, Any]]:
        for p in self.state.plans.plans():
            if int(p["iteration"]) == iteration:
                return list(p.get("points", []))
        return []

    def collect(self, iteration: int, points: list[SweepPoint]) -> CollectOutcome:
        c = self.campaign
        if self.launcher is not None:
            prog = collect(self.store, self.launcher, c.name, points, replicates=c.replicates,
                           concurrency=c.collection.concurrency, max_retries=c.collection.max_retries)
            for line in prog.warnings:
                self.report(f"warning: {line}")
        ok = failed = 0
        reasons: set[str] = set()
        pending: dict[str, SweepPoint] = {}
        for rid, p, _ in c.runs(points):
            status = self.store.status(rid)
            if status in COMPLETE:
                ok += 1
            elif status == "failed":
                failed += 1
                reasons.add(str((self.store.manifest(rid) or {}).get("reason", "")))
            else:
                pending[rid] = p
        if pending:
            plan = write_proposals(self.state, iteration, self._plan(iteration), pending)
            self.report(f"iteration {iteration}: {len(pending)} run(s) proposed: {plan}")
        return CollectOutcome(ok, failed, tuple(sorted(reasons)), pending=tuple(pending))

    def collected_keys(self) -> set[str]:
        return self.store.collected_keys(self.campaign.name)

    def spend(self) -> Spend:
        runs = self.store.runs(campaign=self.campaign.name, statuses=("ok", "saturated", "failed"))
        by = runs.groupby("split")["gpu_seconds"].sum().to_dict() if len(runs) else {}
        return Spend(float(by.get("train", 0.0)), float(by.get("validation", 0.0)))

    def has_fit_data(self) -> bool:
        return bool(self._fitted_runs())

    # ------------------------------------------------------------------------------------------ calibrate
    def _fitted_runs(self) -> list[str]:
        runs = self.store.runs(campaign=self.campaign.name, statuses=("ok",))
        out = []
        for rid in sorted(runs["run_id"].astype(str)) if len(runs) else []:
            if rid not in self._means:
                means = measured_means(read_store_trace(self.store, rid).requests)
                if means is None:
                    continue
                self._means[rid] = means
            out.append(rid)
        return out

    def _coefficients_before(self, iteration: int) -> Coefficients:
        if iteration == 0:
            return self.prior
        doc = self.state.load_fit(iteration - 1)
        if doc is None:
            return self.prior
        return coefficients_from_doc(doc["coefficients"], str(self.state.fit_path(iteration - 1)))

    def open_candidates(self, coefs: Coefficients) -> dict[str, tuple[SweepPoint, Forecast]]:
        done = self.collected_keys()
        out = {}
        for p in self.campaign.candidates():
            if p.split == "train" and p.key not in done and p.key not in out:
                out[p.key] = (p, forecast(point_trace(p), coefs))
        return out

    def prior_fit(self) -> OnboardFit:
        """Iteration 0's view: the prior alone, its uncertainty the prior precision at the floor σ (nothing measured
        on this setup yet says how far off the prior is: :data:`~rooflab.targeting.summary_information.MIN_SIGMA`)."""
        return OnboardFit(-1, self.prior, [], prior_precision(self.prior, self.options), sigma_from_errors([]), None,
                          {}, self.open_candidates(self.prior))

    def refit(self, iteration: int) -> OnboardFit:
        runs = self._fitted_runs()
        for rid in runs:
            if rid not in self._rows:
                t = SummaryTarget(read_store_trace(self.store, rid), self._means[rid], rid)
                self._rows[rid] = anchored_rows(t, self.prior, self.options)
        rows = {r: self._rows[r] for r in runs}
        means = {r: self._means[r] for r in runs}
        coefs = solve_rows(rows, means, self.prior, self.options)
        coefs.source = f"onboarding {self.campaign.name} iteration {iteration}: {len(runs)} runs around the prior"
        errs: list[float] = []
        for rid in runs:
            a = apes(forecast(read_store_trace(self.store, rid), coefs), means[rid])
            errs += [a["ttft_mean"], a["e2e_mean"]]
        before = self._coefficients_before(iteration)
        batch = [rid for rid, _, _ in self.campaign.runs([SweepPoint.from_dict(p["point"])
                                                          for p in self._plan(iteration)]) if rid in means]
        pre_runs = {rid: apes(forecast(read_store_trace(self.store, rid), before), means[rid]) for rid in batch}
        pre = {m: float(np.median([a[m] for a in pre_runs.values()])) for m in MEANS} if pre_runs else None
        M = prior_precision(self.prior, self.options) + data_information(rows, means, coefs.formulas == "blis",
                                                                         self.options.per_stage)
        return OnboardFit(iteration, coefs, runs, np.asarray(M), sigma_from_errors(errs), pre, pre_runs,
                          self.open_candidates(coefs))

    def calibrate(self, iteration: int) -> Calibration | None:
        """Refit from run summaries (module doc); the fit is :attr:`current` — no step-level ``Calibration``."""
        self.current = self.refit(iteration)
        cur = self.current
        if cur.prequential is not None:
            self.report(f"iteration {iteration}: predicted before measured ({len(cur.prequential_runs)} runs): "
                        + ", ".join(f"{m} {cur.prequential[m]:.1%}" for m in MEANS))
        return None

    def replay_error(self, calib: Calibration) -> dict[str, Any]:
        return {"n_runs": 0}

    # ------------------------------------------------------------------------------------------ stop, record
    def decide(self, calib: Calibration | None, *, gpu_seconds_spent: float, budget_gpu_seconds: float | None,
               iteration: int, max_iterations: int | None, **_: Any) -> StopDecision:
        cur = self.current
        return onboard_stop(cur.prequential if cur else None, cur.halfwidth if cur else None,
                            gpu_seconds_spent=gpu_seconds_spent, budget_gpu_seconds=budget_gpu_seconds,
                            iteration=iteration, max_iterations=max_iterations,
                            prequential_runs=len(cur.prequential_runs) if cur else 0,
                            open_candidates=len(cur.judged) if cur else 0)

    def record(self, record: IterationRecord) -> None:
        cur = self.current
        assert cur is not None  # calibrate ran
        doc = {**cur.to_dict(), "stop": record.stop.to_dict(), "picks": [p.to_dict() for p in record.picks],
               "gpu_hours": record.spend.total_s / 3600, "targets": TARGETS}
        atomic_write_text(self.state.fit_path(record.iteration), json_dumps(doc))
        atomic_write_text(self.state.root / COEFFICIENTS_FILE, json_dumps(cur.coefficients.to_dict()))
        for p, fc in cur.candidates.values():
            pr = cur.predicted(fc)
            self.report(f"    predicted {describe(p)}: mean TTFT {pr['ttft_ms']:.0f} ms ±{pr['ttft_rel90']:.1%}, "
                        f"E2E {pr['e2e_ms']:.0f} ms ±{pr['e2e_rel90']:.1%} (90%)")
        if self.on_record is not None:
            self.on_record(OnboardRecord(record.iteration, cur, record.stop, record.picks, record.spend.total_s, doc))


@dataclass
class OnboardTargeting:
    """Bayesian D-optimal picks for the summary fit (module doc), with the campaign's reason text."""

    steps: OnboardSteps
    name: str = "d-optimal (run summaries)"

    def pick(self, calib: Calibration | None, campaign: Campaign, collected: set[str], *, batch_size: int,
             budget_left_s: float | None, iteration: int, spend: Spend) -> list[Pick]:
        cur = self.steps.current if self.steps.current is not None else self.steps.prior_fit()
        if self.steps.current is None:
            self.steps.current = cur
        names = theta_names(cur.coefficients)
        preds = []
        for p, fc in cur.candidates.values():
            # a run predicted to fail requests or to saturate would be routed out of the fit: no information
            useless = bool(fc.failed) or fc.saturated or not fc.rows
            info = np.zeros_like(cur.precision) if useless else fc.information()
            preds.append(Prediction(p, info, fc.gpu_s, 0, useless, fc.mean_batch, fc.mean_context, {}))
        chosen = greedy(cur.precision, preds, n=batch_size, budget=math.inf if budget_left_s is None else
                        budget_left_s, replicates=max(1, campaign.replicates))
        by_key = {k: fc for k, (_, fc) in cur.candidates.items()}
        picks = []
        for c in chosen:
            pr, shrink = c.pred, c.shrink
            assert shrink is not None
            order = [int(j) for j in np.argsort(-shrink)]
            serves = names[order[0]]
            top = [names[j] for j in order[:3] if shrink[j] >= 0.05] or [serves]
            cost = pr.gpu_s * max(1, campaign.replicates)
            predicted = cur.predicted(by_key[pr.point.key])
            reason = (f"D-optimal: {describe(pr.point)} (~{pr.mean_batch:.0f}-request batches, ~{pr.mean_context:.0f}"
                      f"-token contexts) shrinks the posterior sd of "
                      + ", ".join(f"{n} by {shrink[names.index(n)]:.0%}" for n in top)
                      + f"; pins {PINS.get(serves, serves)}; gain {c.d_gain:.2f} nats for {cost / 3600:.3f} GPU-h "
                      "predicted")
            picks.append(Pick(pr.point, reason, serves, cost, round(c.score * 3600, 4),
                              {"d_gain": c.d_gain, "predicted_gpu_s": cost, "predicted": predicted,
                               "sd_shrink": {n: float(x) for n, x in zip(names, shrink)}}))
        return picks


def onboard(state: OnboardState, *, launcher: Launcher | None = None, report: Callable[[str], None] = print,
            on_record: Callable[[OnboardRecord], None] | None = None) -> CampaignOutcome:
    """Run (or resume) the onboarding until it stops or waits for runs collected outside rooflab."""
    steps = OnboardSteps(state, launcher=launcher, report=report, on_record=on_record)
    with state.store.campaign_lock(state.campaign.name):
        return run_campaign(state.campaign, steps, state.plans, OnboardTargeting(steps), report=report,
                            decide=steps.decide)
