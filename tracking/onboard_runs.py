"""MLflow tracking of an onboarding (``rooflab onboard``, issue 16), laid out like a campaign's
(:mod:`tracking.campaign_runs`): one experiment ``rooflab/<onboarding name>``, one parent run (its learning curves:
the prequential error and the predicted uncertainty per iteration, cumulative GPU-hours), one child run per iteration
(params: the runs fitted, the prior, λ; metrics: every coefficient with its posterior sd, the prequential APE of the
runs just measured, the largest 90% half-width over open candidates, GPU-hours; artifacts: the iteration's fit file
and its picks). Idempotent like :func:`tracking.campaign_runs.log_iteration`: an iteration already logged is left
alone, a half-logged one replaced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rooflab.campaign.onboard import OnboardRecord
from rooflab.files import atomic_write_text, json_dumps
from tracking.campaign_runs import _children, finish_campaign, logged_iterations, start_campaign
from tracking.metrics import finite, log_batch, metric_key
from tracking.store import CAMPAIGN, ITERATION, ROLE, STOP_REASON, TrackingStore


def start_onboarding(ts: TrackingStore, name: str, *, params: dict[str, Any]) -> str:
    """The onboarding's parent run (created once, resumed afterwards)."""
    return start_campaign(ts, name, params={"kind": "onboarding", **params})


def onboarding_metrics(rec: OnboardRecord) -> dict[str, float]:
    fit = rec.fit
    m: dict[str, float] = {"gpu_hours": rec.gpu_seconds / 3600, "n_picks": float(len(rec.picks)),
                           "runs_fitted": float(len(fit.fitted)), "sigma": fit.sigma}
    for name, v in {**fit.coefficients.beta, **dict(zip(("alpha0", "alpha1", "alpha2"),
                                                        fit.coefficients.alpha))}.items():
        m[metric_key(name)] = float(v)
    for name, sd in (rec.doc.get("posterior_sd") or {}).items():
        m[metric_key(name, "sd")] = float(sd)
    for name, v in (fit.prequential or {}).items():
        m[metric_key("prequential", name)] = float(v)
    for name, v in (fit.halfwidth or {}).items():
        m[metric_key("halfwidth90", name)] = float(v)
    return {k: v for k, v in m.items() if finite(v)}


def log_onboard_iteration(ts: TrackingStore, parent_id: str, rec: OnboardRecord, *, artifacts_dir: Path) -> str:
    """Log one onboarding iteration as a child run of ``parent_id``; returns its id."""
    c = ts.client
    it = int(rec.iteration)
    done = logged_iterations(ts, parent_id)
    if it in done:
        return done[it]
    parent = c.get_run(parent_id)
    for r in _children(ts, parent_id):
        if r.data.tags.get(ITERATION) == str(it):
            c.delete_run(r.info.run_id)
    tags = {"mlflow.parentRunId": parent_id, ROLE: "iteration", ITERATION: str(it),
            CAMPAIGN: parent.data.tags.get(CAMPAIGN, ""), STOP_REASON: rec.stop.reason[:5000],
            "rooflab.stop": str(rec.stop.stop).lower()}
    run = c.create_run(parent.info.experiment_id, run_name=f"iteration-{it:03d}", tags=tags)
    rid = str(run.info.run_id)
    try:
        metrics = onboarding_metrics(rec)
        log_batch(ts, rid, metrics=metrics, step=it,
                  params={"runs": ",".join(rec.fit.fitted)[:6000], "prior": rec.fit.coefficients.source[:6000],
                          "variant": rec.fit.coefficients.variant})
        folder = Path(artifacts_dir) / f"iteration_{it:03d}"
        atomic_write_text(folder / "fit.json", json_dumps(rec.doc))
        atomic_write_text(folder / "next_points.json", json_dumps({"iteration": it, "stop": rec.stop.to_dict(),
                                                                   "picks": [p.to_dict() for p in rec.picks]}))
        c.log_artifacts(rid, str(folder))
        log_batch(ts, parent_id, metrics={k: v for k, v in metrics.items()
                                          if k.startswith(("prequential", "halfwidth90", "gpu_hours"))}, step=it)
        c.set_terminated(rid, "FINISHED")
    except Exception:
        c.set_terminated(rid, "FAILED")
        raise
    return rid


def finish_onboarding(ts: TrackingStore, parent_id: str, *, stop_reason: str, summary: dict[str, Any]) -> None:
    finish_campaign(ts, parent_id, stop_reason=stop_reason, summary=summary)
