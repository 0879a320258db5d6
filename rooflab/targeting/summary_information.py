"""What a run tells the calibration from run summaries (issue 16), predicted by replay with the current
coefficients: the sensitivities of its per-stage mean TTFT and E2E to θ = (β, α0, α1, α2), the posterior precision
they add, the Bayesian D-optimal gain of a candidate run, and the predictive uncertainty of a run's means.

**Sensitivities.** With the batch compositions of one replay held fixed, a stage's mean TTFT and mean E2E are
linear in θ (:mod:`rooflab.fit.summary_level`): mean TTFT = u_t·β + α0 (+ α2 with BLIS's α), mean E2E = u_e·β + α0
+ α1 + α2·n̄_out, u the stage's mean of the summed step features (:func:`rooflab.fit.request_level.stacked_rows`).
Divided by the means and weighted 1/√(2·stages) (so an experiment counts once, whatever its stages) they are exactly
the rows :func:`rooflab.fit.summary_level.solve_summaries` solves — with the *predicted* means of a replay in place
of measured ones: the Jacobian of the run's relative error. It leaves out the queueing feedback (slower steps also
grow the batches), so it under-states the sensitivity near saturation; what targeting needs is the ordering.

**Posterior.** The summary fit minimises Σ(w·r)² + λ‖(θ − θ₀)/s‖² (θ₀ the prior centre, s its scales). Read as a
Gaussian likelihood with per-experiment relative error σ, its posterior precision is M = (AᵀA + λ·diag(1/s²))/σ², A
the rows of the experiments fitted. The D-optimal gain log det(M + M_c) − log det(M) of a candidate c does not
depend on σ; the predictive sd of a run's relative error does: σ is the RMS relative error of the fitted runs'
means under the fit, floored at :data:`MIN_SIGMA` (a fit on one or two runs matches them almost exactly, which says
nothing about its error elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rooflab.data.saturation import route_run
from rooflab.data.traces import Trace
from rooflab.fit.request_level import stacked_rows
from rooflab.fit.summary_level import OVERALL, SummaryOptions, SummaryTarget, anchored_replay, solve_summaries
from rooflab.model.coefficients import ALPHA_NAMES, Coefficients
from rooflab.model.variants import get_variant
from rooflab.replay.predict import ReplayResult, replay
from rooflab.replay.summary_metrics import summarize_run
from rooflab.targeting.information import gain

MIN_SIGMA = 0.03  # floor of the per-experiment relative error σ (see the module doc)
Z90 = 1.645  # a 90% two-sided interval is ±1.645 sd
MEANS = ("ttft_mean", "e2e_mean")

StageRow = tuple[np.ndarray, np.ndarray, float]  # (u_ttft, u_e2e, mean output tokens) of one stage


def theta_names(coefs: Coefficients) -> list[str]:
    """The coefficients a summary fit solves for: the variant's β, then α0, α1, α2."""
    return list(get_variant(coefs.variant).names) + list(ALPHA_NAMES)


def theta_of(coefs: Coefficients) -> np.ndarray:
    return np.array([coefs.beta.get(n, 0.0) for n in get_variant(coefs.variant).names] + list(coefs.alpha), float)


def stage_rows(trace: Trace, result: ReplayResult, coefs: Coefficients, per_stage: bool = True
               ) -> dict[str, StageRow]:
    """The mean feature rows of each stage (and ``overall``) of a replay recorded with ``coefs``
    (``record=True``), over the requests the replay completed."""
    Xt, Xe, kept = stacked_rows(trace, result, coefs.variant, coefs.formulas)
    q = result.requests
    staged = per_stage and "stage" in q
    stage = q["stage"].to_numpy()[kept] if staged else np.zeros(int(kept.sum()), int)
    n_out = q["output_tokens"].to_numpy(dtype=float)[kept]
    keys = [OVERALL] + ([f"stage_{int(s)}" for s in sorted(set(stage.tolist()))] if staged else [])
    out: dict[str, StageRow] = {}
    for k in keys:
        m = np.ones(len(stage), bool) if k == OVERALL else (stage == int(k.split("_")[-1]))
        if m.any():
            out[k] = (Xt[m].mean(axis=0), Xe[m].mean(axis=0), float(n_out[m].mean()))
    return out


def linear_means(row: StageRow, theta: np.ndarray, blis_alpha: bool) -> tuple[float, float]:
    """(mean TTFT, mean E2E) in µs that the linearisation gives at ``theta`` (equals the replay's at its own θ)."""
    ut, ue, n_out = row
    p = len(ut)
    beta, a = theta[:p], theta[p:]
    return (float(ut @ beta + a[0] + (a[2] if blis_alpha else 0.0)),
            float(ue @ beta + a[0] + a[1] + a[2] * n_out))


def relative_rows(rows: dict[str, StageRow], means_us: dict[str, tuple[float, float]], blis_alpha: bool,
                  per_stage: bool = True, weighted: bool = True) -> np.ndarray:
    """The rows :func:`rooflab.fit.summary_level.solve_summaries` builds for one experiment: per stage key (the
    stages when ``per_stage`` and there are some, else ``overall``), mean TTFT and mean E2E rows over θ divided by
    ``means_us`` (µs) and weighted 1/√(2·stages) (``weighted=False``: not weighted, for predictive sds)."""
    keys = [k for k in rows if k != OVERALL and k in means_us] if per_stage else []
    keys = keys or [OVERALL]
    a2 = 1.0 if blis_alpha else 0.0
    w = 1.0 / np.sqrt(2.0 * len(keys)) if weighted else 1.0
    out = []
    for k in keys:
        ut, ue, n_out = rows[k]
        ttft, e2e = means_us[k]
        out.append(np.r_[ut, 1.0, 0.0, a2] / ttft * w)
        out.append(np.r_[ue, 1.0, 1.0, n_out] / e2e * w)
    return np.array(out)


def prior_precision(centre: Coefficients, options: SummaryOptions) -> np.ndarray:
    """λ·diag(1/s²): the prior rows of :func:`~rooflab.fit.summary_level.solve_summaries` as a precision (in
    units of σ², see the module doc)."""
    theta0 = theta_of(centre)
    p = len(theta0) - 3
    scale = np.r_[[abs(v) if abs(v) > 0 else 1.0 for v in theta0[:p]], options.alpha_prior_scale_us]
    return np.diag(options.prior_strength / scale ** 2)


def anchored_rows(target: SummaryTarget, coefs: Coefficients, options: SummaryOptions) -> dict[str, StageRow]:
    """A measured run's stage rows from one replay anchored at its measurement under ``coefs``
    (:func:`~rooflab.fit.summary_level.anchored_replay`), for the stage keys the summary fit uses."""
    res, _ = anchored_replay(target, coefs, options)
    rows = stage_rows(target.trace, res, coefs, options.per_stage)
    return {k: rows[k] for k in target.stage_keys(options.per_stage) if k in rows}


def solve_rows(rows: dict[str, dict[str, StageRow]], means: dict[str, dict[str, tuple[float, float]]],
               centre: Coefficients, options: SummaryOptions) -> Coefficients:
    """:func:`~rooflab.fit.summary_level.solve_summaries` on the cached rows of measured runs (run -> stage key ->
    row) and their measured means (µs); with rows from :func:`anchored_rows` at ``centre`` this is exactly
    ``calibrate_from_summaries(runs, centre, replace(options, iterations=1), prior=centre)``."""
    flat = [(run, ut, ue, n_out, *means[run][k]) for run in sorted(rows) for k, (ut, ue, n_out) in rows[run].items()]
    return solve_summaries(flat, centre, options, centre.formulas == "blis")


def data_information(rows: dict[str, dict[str, StageRow]], means: dict[str, dict[str, tuple[float, float]]],
                     blis_alpha: bool, per_stage: bool = True) -> np.ndarray | float:
    """AᵀA of the measured runs' weighted relative rows (0.0 without runs)."""
    out: np.ndarray | float = 0.0
    for run, r in rows.items():
        A = relative_rows(r, means[run], blis_alpha, per_stage)
        out = out + A.T @ A
    return out


def d_gain(M: np.ndarray, Mc: np.ndarray) -> float:
    """log det(M + M_c) − log det(M) (nats)."""
    return gain(M, Mc, [])[0]


def sd_shrink(M: np.ndarray, Mc: np.ndarray) -> np.ndarray:
    """Relative reduction of each coefficient's posterior sd when ``Mc`` is added to ``M``."""
    before = np.sqrt(np.diag(np.linalg.inv(M)))
    return np.asarray(1.0 - np.sqrt(np.diag(np.linalg.inv(M + Mc))) / before)


def sigma_from_errors(errors: list[float]) -> float:
    """σ: the RMS of the fitted runs' relative errors of their means, floored at :data:`MIN_SIGMA`."""
    e = np.asarray([x for x in errors if np.isfinite(x)], float)
    return max(MIN_SIGMA, float(np.sqrt(np.mean(e ** 2))) if len(e) else MIN_SIGMA)


@dataclass
class Forecast:
    """One run predicted by replay with ``coefs``: the kit's summary (ms, per stage key), the relative sensitivity
    rows, the predicted GPU-seconds (span × TP) and what the batches look like."""

    run: str
    summary: dict[str, dict[str, float | None]]  # stage key -> metric -> ms (rooflab.replay.summary_metrics)
    rows: dict[str, StageRow]  # stage key -> (u_ttft, u_e2e, n_out)
    theta: np.ndarray
    blis_alpha: bool
    gpu_s: float
    mean_batch: float
    mean_context: float
    requests: int
    failed: int
    saturated: bool = False  # the predicted run would be saturated at run level (docs/spec.md §6)
    extra: dict[str, object] = field(default_factory=dict)

    def means_us(self) -> dict[str, tuple[float, float]]:
        return {k: linear_means(r, self.theta, self.blis_alpha) for k, r in self.rows.items()}

    def information(self, per_stage: bool = True) -> np.ndarray:
        """AᵀA of the run's weighted relative rows at its predicted means (precision in units of 1/σ²)."""
        A = relative_rows(self.rows, self.means_us(), self.blis_alpha, per_stage)
        return np.asarray(A.T @ A)

    def relative_sd(self, cov: np.ndarray, stage: str = OVERALL) -> dict[str, float]:
        """Predictive relative sd of the stage's mean TTFT and mean E2E under the posterior covariance ``cov``."""
        if stage not in self.rows:
            return {m: float("nan") for m in MEANS}
        A = relative_rows({stage: self.rows[stage]}, {stage: self.means_us()[stage]}, self.blis_alpha,
                          per_stage=False, weighted=False)
        var = np.einsum("ij,jk,ik->i", A, cov, A)
        return {m: float(np.sqrt(max(v, 0.0))) for m, v in zip(MEANS, var)}


def forecast(trace: Trace, coefs: Coefficients, *, per_stage: bool = True) -> Forecast:
    """Replay ``trace`` with ``coefs`` (recorded) and keep what prediction and targeting need (not the replay)."""
    res = replay(trace, coefs, record=True)
    q = res.requests
    summary = summarize_run(q, stage="stage" if (per_stage and "stage" in q) else None).to_ms_dict()
    st = res.steps
    if st is not None and len(st):
        batch = (st["prefill_reqs"] + st["decode_reqs"]).to_numpy(dtype=float)
        ctx = (st["decode_context"] + st["prefill_context"] + st["prefill_tokens"]).to_numpy(dtype=float) \
            / np.maximum(batch, 1.0)
        mean_batch, mean_context = float(batch.mean()), float(ctx.mean())
    else:
        mean_batch = mean_context = float("nan")
    arr = q["arrival_us"].to_numpy(dtype=float)
    span = res.sim_time_s - (float(arr.min()) / 1e6 if len(arr) else 0.0)
    failed = int(q["pred_failed"].sum())
    rows = stage_rows(trace, res, coefs, per_stage) if failed < len(q) else {}
    return Forecast(trace.run_id, summary, rows, theta_of(coefs), coefs.formulas == "blis", max(span, 0.0) * trace.tp,
                    mean_batch, mean_context, len(q), failed, predicted_saturation(q))


def predicted_saturation(q: pd.DataFrame) -> bool:
    """Run-level saturation (:func:`rooflab.data.saturation.route_run`) of a replay's request frame: the checks a
    measured run of it would face, on the predicted TTFT / E2E."""
    if not len(q):
        return False
    arr = q["arrival_us"].to_numpy(dtype=float)
    failed = q["pred_failed"].to_numpy(dtype=bool)
    nan = np.full(len(q), np.nan)
    table = pd.DataFrame({"arrived_us": arr, "queued_us": nan, "scheduled_us": nan,
                          "first_token_us": arr + q["pred_ttft_us"].to_numpy(dtype=float), "finished_us": nan,
                          "departed_us": arr + q["pred_e2e_us"].to_numpy(dtype=float), "preemptions": nan,
                          "status": np.where(failed, "failed", "ok")})
    return bool(route_run(table).saturated)
