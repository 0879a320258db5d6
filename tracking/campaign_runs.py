"""MLflow tracking of calibration campaigns (docs/spec.md §10): plain functions on a :class:`TrackingStore` with
explicit run ids, safe from Prefect worker threads. No Prefect imports: testable alone.

Layout:

* one **experiment** per campaign, ``rooflab/<campaign>``;
* one **parent run** per campaign (tag ``rooflab.role=campaign``), resumed (set RUNNING again) when the campaign
  is resumed; it carries the campaign's learning curves — per iteration (step = iteration) held-out and train
  MAPE, cumulative GPU-hours, every coefficient with its interval bounds, the data volume
  (:func:`tracking.metrics.parent_metrics`) — and, at the end, the stop reason and the final summary
  (metrics ``summary.<key>``, logged once);
* one **child run** per iteration (tags ``mlflow.parentRunId``, ``rooflab.role=iteration``, ``rooflab.iteration``)
  with params (data counts, variant, formulas, prior, bootstrap), metrics (each β with its interval and bootstrap
  CV, α, condition number, MAPE / median APE per split, per-bucket MAPE ``mape.<dimension>.<bucket>`` (train) and
  ``mape.validation.<dimension>.<bucket>``, hotspots, cumulative GPU-hours, picks) and artifacts (coefficients
  JSON, BLIS YAML, health report, residual bucket CSV, residual plots, ``next_points.json``).

Refits outside the loop (:func:`log_refit`: a ``rooflab.data.arrived`` refit, a V1 validation) are top-level runs
of the campaign's experiment tagged ``rooflab.role=refit``.

The view a person opens (MLflow 3.17.2's UI): :func:`experiment_url` links the experiment in the classic
"Model training" layout (``workflowType=machine_learning``: this UI takes the layout from that URL parameter
or the browser's last choice, GenAI by default, not from the ``mlflow.experimentKind`` tag) with rooflab's
saved view (:data:`VIEW_ID`, an experiment tag written by :func:`log_iteration`, listed under "Views"): the
runs table groups the runs by role (every iteration a row) with MAPE, GPU-hours and every β as columns, the
chart view shows the learning curves (MAPE and GPU-hours; each β with its interval) against the iteration.

A child run counts as logged only once it is FINISHED: an iteration whose logging was interrupted is deleted
and logged again, so :func:`log_iteration` is idempotent and crash-safe.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
from mlflow.entities import Run, RunStatus

from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.fit.calibration import Calibration
from rooflab.fit.report import render
from rooflab.model import export
from rooflab.model.provenance import provenance_path, write_provenance
from rooflab.targeting.candidates import Pick
from rooflab.targeting.stop import StopDecision
from tracking.metrics import (
    HEADLINE,
    coefficient_names,
    dumps,
    finite,
    flat,
    iteration_metrics,
    iteration_params,
    log_batch,
    metric_key,
    parent_metrics,
)
from tracking.store import (
    CAMPAIGN,
    HEALTH,
    ITERATION,
    ROLE,
    STOP_REASON,
    TrackingStore,
    experiment,
    search_all,
)

# ---------------------------------------------------------------------------------------------------
# campaign (parent run)


def _parents(ts: TrackingStore, experiment_id: str) -> list[Run]:
    return search_all(ts, [experiment_id], f"tags.`{ROLE}` = 'campaign'", order_by=["attributes.start_time ASC"])


def start_campaign(ts: TrackingStore, campaign_name: str, *, params: dict[str, Any]) -> str:
    """The parent run of a campaign: created on the first call, found (and set RUNNING again) when the
    campaign is resumed. Params are immutable in MLflow: on a resume, only keys not logged before are
    added; keys whose value changed are listed in the tag ``rooflab.resume.changed_params``."""
    c = ts.client
    exp = experiment(ts, campaign_name)
    assert exp is not None
    flat_params = {metric_key(k): v for k, v in flat(params or {}).items()}
    parents = _parents(ts, exp.experiment_id)
    if not parents:
        run = c.create_run(exp.experiment_id, run_name=campaign_name,
                           tags={ROLE: "campaign", CAMPAIGN: campaign_name})
        log_batch(ts, run.info.run_id, params=flat_params)
        parents = _parents(ts, exp.experiment_id)
        if parents and parents[0].info.run_id != run.info.run_id:  # lost a race: keep the oldest parent
            c.delete_run(run.info.run_id)
        else:
            return str(run.info.run_id)
    parent = parents[0]
    pid = str(parent.info.run_id)
    old = parent.data.params
    new = {k: v for k, v in flat_params.items() if k not in old}
    changed = sorted(k for k, v in flat_params.items() if k in old and old[k] != str(v)[:6000])
    resumes = int(parent.data.tags.get("rooflab.resumes", "0")) + 1
    tags: dict[str, Any] = {"rooflab.resumes": resumes}
    if changed:
        tags["rooflab.resume.changed_params"] = ",".join(changed)
    log_batch(ts, pid, params=new, tags=tags)
    if parent.info.status != RunStatus.to_string(RunStatus.RUNNING):
        c.update_run(pid, status="RUNNING")
    return pid


def _children(ts: TrackingStore, parent_id: str) -> list[Run]:
    exp_id = ts.client.get_run(parent_id).info.experiment_id
    return search_all(ts, [exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{ROLE}` = 'iteration'")


def logged_iterations(ts: TrackingStore, parent_id: str) -> dict[int, str]:
    """Iteration → child run id, for the iterations completely logged (child FINISHED)."""
    out: dict[int, str] = {}
    for r in _children(ts, parent_id):
        it = r.data.tags.get(ITERATION)
        if it is None or r.info.status != "FINISHED":
            continue
        out.setdefault(int(it), str(r.info.run_id))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------
# one iteration (child run)


def write_iteration_artifacts(calib: Calibration, out_dir: Path, *, iteration: int, picks: list[Pick],
                              stop: StopDecision | None, context: dict[str, Any] | None = None,
                              provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write the iteration's artifact files into ``out_dir`` (atomically); returns their paths. ``provenance``:
    the fit's provenance block (sources, command, MLflow run id, engine), recorded beside the BLIS export."""
    doc = calib.to_dict()
    if provenance:
        doc["provenance"] = provenance
    out_dir = Path(out_dir)
    return [
        export.write_json(doc, out_dir / "coefficients.json", context=context),
        export.write_blis(doc, out_dir / "blis_coefficients.yaml"),
        write_provenance(doc, provenance_path(out_dir / "blis_coefficients.yaml")),
        atomic_write_text(out_dir / "health.json", dumps(doc.get("health") or {})),
        atomic_write_text(out_dir / "residual_buckets.csv",
                          pd.DataFrame(doc.get("residual_buckets") or []).to_csv(index=False)),
        atomic_write_text(out_dir / "next_points.json",
                          dumps({"iteration": iteration, "n_picks": len(picks), "picks": [p.to_dict() for p in picks],
                                 "stop": stop.to_dict() if stop is not None else {}})),
        atomic_write_text(out_dir / "health_report.txt", render(calib) + "\n"),
    ]


def iteration_folder(artifacts_dir: Path, iteration: int) -> Path:
    """Where :func:`log_iteration` keeps an iteration's artifact files (coefficients, BLIS export, provenance)."""
    return Path(artifacts_dir) / f"iteration_{int(iteration):03d}"


def log_iteration(ts: TrackingStore, parent_id: str, iteration: int, calib: Calibration, *, stop: StopDecision,
                  picks: list[Pick], gpu_seconds: float, artifacts_dir: Path,
                  extra_params: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> str:
    """Log one campaign iteration as a child run of ``parent_id`` and return its id. Idempotent: an
    iteration already logged (FINISHED child) is returned as is; a half-logged one is replaced.
    ``gpu_seconds`` is the campaign's cumulative GPU time so far; ``artifacts_dir`` is a local folder for
    the artifact files (kept: ``<artifacts_dir>/iteration_<NNN>/``)."""
    c = ts.client
    iteration = int(iteration)
    done = logged_iterations(ts, parent_id)
    if iteration in done:
        return done[iteration]
    parent = c.get_run(parent_id)
    for r in _children(ts, parent_id):  # an interrupted earlier attempt
        if r.data.tags.get(ITERATION) == str(iteration):
            c.delete_run(r.info.run_id)
    campaign = parent.data.tags.get(CAMPAIGN, "")
    tags = {"mlflow.parentRunId": parent_id, ROLE: "iteration", ITERATION: str(iteration), CAMPAIGN: campaign}
    run = c.create_run(parent.info.experiment_id, run_name=f"iteration-{iteration:03d}", tags=tags)
    rid = str(run.info.run_id)
    with _TerminatedOnError(ts, rid):
        metrics = _log_calibration(ts, rid, calib, step=iteration, picks=picks, gpu_seconds=gpu_seconds, stop=stop,
                                   out_dir=iteration_folder(artifacts_dir, iteration),
                                   extra_params=extra_params, provenance={**(provenance or {}), "mlflow_run_id": rid})
        log_batch(ts, parent_id, metrics=parent_metrics(calib, metrics), step=iteration)  # the learning curves
        save_view(ts, parent.info.experiment_id, coefficient_names(calib))
        c.set_terminated(rid, "FINISHED")
    return rid


class _TerminatedOnError:
    """Mark the run FAILED (and re-raise) when logging into it fails."""

    def __init__(self, ts: TrackingStore, run_id: str):
        self.ts, self.run_id = ts, run_id

    def __enter__(self) -> _TerminatedOnError:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is not None:
            try:
                self.ts.client.set_terminated(self.run_id, "FAILED")
            except Exception:  # the original error matters more
                pass
        return False


def _log_calibration(ts: TrackingStore, rid: str, calib: Calibration, *, step: int, picks: list[Pick],
                     gpu_seconds: float | None, stop: StopDecision | None, out_dir: Path,
                     extra_params: dict[str, Any] | None, provenance: dict[str, Any] | None = None) -> dict[str, float]:
    """Params, metrics, tags and artifacts of one calibration into run ``rid``; returns the metrics."""
    metrics = iteration_metrics(calib, gpu_seconds=gpu_seconds, n_picks=len(picks))
    log_batch(ts, rid, metrics=metrics, step=step)
    tags: dict[str, Any] = {HEALTH: calib.health_overall}
    if stop is not None:
        tags.update({STOP_REASON: stop.reason, "rooflab.stop": str(stop.stop).lower(),
                     "rooflab.stop_json": json_dumps(stop.to_dict(), indent=None)})
    log_batch(ts, rid, params=iteration_params(calib, extra_params), tags=tags)
    context = {k: v for k, v in (extra_params or {}).items() if k in ("hardware", "model", "models", "tp")}
    write_iteration_artifacts(calib, out_dir, iteration=step, picks=picks, stop=stop, context=context,
                              provenance=provenance or {"mlflow_run_id": rid})
    ts.client.log_artifacts(rid, str(out_dir))
    for p in calib.plots:
        if Path(p).is_file():
            ts.client.log_artifact(rid, str(p), "plots")
    return metrics


def log_refit(ts: TrackingStore, campaign: str, calib: Calibration, *, artifacts_dir: Path, reason: str = "manual",
              gpu_seconds: float | None = None, extra_params: dict[str, Any] | None = None,
              provenance: dict[str, Any] | None = None) -> str:
    """Log a refit outside the campaign loop (a ``rooflab.data.arrived`` refit, a V1 validation) as a
    top-level run of the campaign's experiment (tag ``rooflab.role=refit``, ``rooflab.reason``) with the
    same params, metrics and artifacts as an iteration (no picks). Returns its run id; each call logs a
    new run. Refit runs are not iterations: the comparison and :func:`logged_iterations` skip them."""
    exp = experiment(ts, campaign)
    assert exp is not None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = ts.client.create_run(exp.experiment_id, run_name=f"refit-{stamp}",
                               tags={ROLE: "refit", CAMPAIGN: campaign, "rooflab.reason": str(reason)[:8000]})
    rid = str(run.info.run_id)
    with _TerminatedOnError(ts, rid):
        _log_calibration(ts, rid, calib, step=0, picks=[], gpu_seconds=gpu_seconds, stop=None,
                         out_dir=Path(artifacts_dir) / f"refit_{stamp}_{rid[:8]}", extra_params=extra_params,
                         provenance={**(provenance or {}), "mlflow_run_id": rid})
        ts.client.set_terminated(rid, "FINISHED")
    return rid


def finish_campaign(ts: TrackingStore, parent_id: str, *, stop_reason: str, summary: dict[str, Any],
                    status: str = "FINISHED") -> None:
    """End the parent run: numeric summary entries become metrics ``summary.<key>`` (their own names: a
    summary's ``gpu_hours`` is not one more point on the per-iteration ``gpu_hours`` curve), the rest tags
    (``rooflab.summary.<key>``); the whole summary is also logged as ``summary.json``. Idempotent: a parent
    already summarised with this stop reason (a resumed campaign that had stopped) is only ended again, and a
    summary metric already logged at this step (the last iteration) is not logged twice."""
    c = ts.client
    if c.get_run(parent_id).data.tags.get(STOP_REASON) == stop_reason:  # summarised before
        c.set_terminated(parent_id, status)
        return
    flat_summary = flat(summary or {})
    step = max(logged_iterations(ts, parent_id), default=0)  # after the per-iteration history, not before
    metrics = {metric_key("summary", k): v for k, v in flat_summary.items() if finite(v)}
    metrics = {k: v for k, v in metrics.items() if all(m.step != step for m in c.get_metric_history(parent_id, k))}
    tags = {f"rooflab.summary.{metric_key(k)}": v for k, v in flat_summary.items() if not finite(v)}
    tags[STOP_REASON] = stop_reason
    log_batch(ts, parent_id, metrics=metrics, tags=tags, step=step)
    ts.client.log_text(parent_id, dumps({"stop_reason": stop_reason, "summary": summary or {}}), "summary.json")
    ts.client.set_terminated(parent_id, status)


# ---------------------------------------------------------------------------------------------------
# the view a person opens (MLflow 3.17.2's UI)

VIEW_ID = "rooflab-learning-curves"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"  # the UI's saved views: one experiment tag each ("Views" menu)
VIEW_NAME = "rooflab: learning curves (MAPE, GPU-hours, β)"
_SECTIONS = (("rooflab-accuracy", "Accuracy and budget per iteration"),
             ("rooflab-coefficients", "Coefficients per iteration (value, interval bounds)"))


def _line_chart(uuid: str, section: str, keys: list[str], title: str) -> dict[str, Any]:
    """A line chart card as the UI stores one (RunsChartsLineCardConfig): ``keys`` against the step."""
    return {"uuid": uuid, "type": "LINE", "runsCountToCompare": 10, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "displayName": title, "metricKey": keys[0], "selectedMetricKeys": keys,
            "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear", "range": {},
            "xAxisKey": "step", "selectedXAxisMetricKey": "", "displayPoints": True, "yAxisKey": "metric",
            "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": False,
            "useGlobalLineSmoothing": False}


def view_state(coefficients: list[str]) -> dict[str, Any]:
    """rooflab's saved view of a campaign experiment. Runs table: grouped by ``rooflab.role`` (the iterations
    are rows of their own, not hidden under the collapsed parent), columns MAPE (held-out, train), GPU-hours,
    steps, then every coefficient. Chart view: MAPE and GPU-hours, then each coefficient with its interval
    bounds, against the iteration (the parent's learning curves; each iteration run adds its own point).
    ``coefficients``: the coefficient metric names (``beta1``, …, ``alpha0`` …)."""
    cols = [f"metrics.`{k}`" for k in (*HEADLINE, "gpu_hours", "n_steps", *coefficients)]
    charts = [_line_chart("rooflab-mape", _SECTIONS[0][0], list(HEADLINE), "MAPE (held-out, train) per iteration"),
              _line_chart("rooflab-gpu-hours", _SECTIONS[0][0], ["gpu_hours"], "GPU-hours spent (cumulative)")]
    charts += [_line_chart(f"rooflab-{k}", _SECTIONS[1][0], [k, f"{k}.lower", f"{k}.upper"], f"{k} [interval]")
               for k in coefficients]
    return {"selectedColumns": cols, "columnOrder": cols,
            "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": ROLE}]},
            "useGroupedValuesInCharts": False,
            "compareRunCharts": charts,
            "compareRunSections": [{"uuid": u, "name": n, "display": True, "isReordered": False, "deleted": False,
                                    "isGenerated": False} for u, n in _SECTIONS],
            "isAccordionReordered": True, "hideEmptyCharts": True,
            "orderByKey": "attributes.start_time", "orderByAsc": False}


def save_view(ts: TrackingStore, experiment_id: str, coefficients: list[str]) -> None:
    """Write (or update) rooflab's saved view on the experiment (:data:`VIEW_TAG`), in the envelope the UI's
    "Views" menu reads: ``{"name", "createdAt", "updatedAt", "state"}`` with the state as a JSON string."""
    c = ts.client
    now = int(time.time() * 1000)
    try:
        created = int(json.loads(c.get_experiment(experiment_id).tags.get(VIEW_TAG, "{}")).get("createdAt", now))
    except (ValueError, TypeError, AttributeError):
        created = now
    state = json.dumps(view_state(coefficients), separators=(",", ":"))
    c.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps({"name": VIEW_NAME, "createdAt": created,
                                                              "updatedAt": now, "state": state}))


def experiment_url(ts: TrackingStore, campaign: str, base: str = "http://127.0.0.1:5000", *,
                   charts: bool = True) -> str:
    """The campaign's experiment in ``mlflow ui`` at ``base``: the "Model training" layout, rooflab's saved
    view, the chart view (learning curves) or the runs table (``charts=False``)."""
    exp = experiment(ts, campaign, create=False)
    if exp is None:
        raise InputError(None, "campaign", f"no campaign {campaign!r} in {ts.uri}")
    query = {"workflowType": "machine_learning"}
    if VIEW_TAG in exp.tags:
        query["viewStateShareKey"] = VIEW_ID
    if charts:
        query["compareRunsMode"] = "CHART"
    return f"{base.rstrip('/')}/#/experiments/{exp.experiment_id}/runs?{urllib.parse.urlencode(query)}"
