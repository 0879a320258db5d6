"""MLflow tracking of calibration campaigns (SPEC §10). Plain functions on an explicit ``MlflowClient``
and explicit run ids — MLflow's active run is per thread, so nothing here uses ``mlflow.start_run`` and
every call is safe from Prefect worker threads. No Prefect imports: testable alone.

Layout (SQLite store ``<root>/mlflow.db``, artifacts under ``<root>/artifacts``):

* one **experiment** per campaign, ``rooflab/<campaign>``;
* one **parent run** per campaign (tag ``rooflab.role=campaign``), resumed (set RUNNING again) when
  the campaign is resumed; it also carries per-iteration summary metrics (step = iteration) and, at
  the end, the stop reason and the final summary;
* one **child run** per iteration (tags ``mlflow.parentRunId``, ``rooflab.role=iteration``,
  ``rooflab.iteration``) with params (data counts, variant, formulas, prior, bootstrap), metrics (each
  β with its interval and bootstrap CV, α, condition number, MAPE / median APE per split, per-bucket
  MAPE ``mape.<dimension>.<bucket>`` (train) and ``mape.validation.<dimension>.<bucket>``, hotspots,
  cumulative GPU-hours, picks) and artifacts (coefficients JSON, BLIS YAML, health report, residual
  bucket CSV, residual plots, ``next_points.json``).

Refits outside the loop (:func:`log_refit`: a ``rooflab.data.arrived`` refit, a V1 validation) are
top-level runs of the campaign's experiment tagged ``rooflab.role=refit``.

A child run counts as logged only once it is FINISHED: an iteration whose logging was interrupted is
deleted and logged again, so :func:`log_iteration` is idempotent and crash-safe.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException

from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.model import export

EXPERIMENT_PREFIX = "rooflab/"
ROLE = "rooflab.role"
ITERATION = "rooflab.iteration"
CAMPAIGN = "rooflab.campaign"
STOP_REASON = "rooflab.stop_reason"
HEALTH = "rooflab.health"
BATCH = 900  # metrics per log_batch (MLflow's limit is 1000 entities per call, 100 params/tags)
SKIP_BUCKET_DIMENSIONS = ("run_id",)  # one metric per run would flood the UI; the CSV artifact has them


# ---------------------------------------------------------------------------------------------------
# store and client


def tracking_uri(root: Path | str = Path("mlruns")) -> str:
    """``sqlite:///<absolute root>/mlflow.db``."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_root(root: Path | str = Path("mlruns")) -> Path:
    return Path(root).resolve() / "artifacts"


def client(root: Path | str = Path("mlruns")) -> MlflowClient:
    """A client on the SQLite store under ``root`` (created if missing); tracking and registry URIs are
    passed explicitly, so ``MLFLOW_TRACKING_URI`` and the global ``mlflow.set_tracking_uri`` do not
    matter."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    artifact_root(root).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(root)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c._rooflab_root = root.resolve()  # where experiments put their artifacts
    return c


def _root_of(c: MlflowClient) -> Path:
    root = getattr(c, "_rooflab_root", None)
    if root is not None:
        return root
    uri = c.tracking_uri
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    return Path("mlruns").resolve()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "campaign"


def experiment_name(campaign: str) -> str:
    return f"{EXPERIMENT_PREFIX}{campaign}"


def _experiment(c: MlflowClient, campaign: str, create: bool = True):
    name = experiment_name(campaign)
    exp = c.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
        exp = c.get_experiment(exp.experiment_id)
    if exp is None and create:
        location = (artifact_root(_root_of(c)) / _slug(campaign)).as_uri()
        try:
            c.create_experiment(name, artifact_location=location, tags={
                CAMPAIGN: campaign,
                "mlflow.experimentKind": "custom_model_development",  # the UI's "model training" layout
                "mlflow.note.content": f"rooflab campaign {campaign}: the parent run is the campaign, each "
                                       "child run one iteration (fit, health, residuals, next points)."})
        except MlflowException:  # created concurrently
            pass
        exp = c.get_experiment_by_name(name)
    return exp


def _search_all(c: MlflowClient, experiment_ids: list[str], filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = c.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                             max_results=1000, order_by=order_by, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


# ---------------------------------------------------------------------------------------------------
# sanitising and batching


def metric_key(*parts) -> str:
    """A metric/param name from parts joined by '.', with characters MLflow rejects replaced
    (``<512`` → ``lt512``, ``>=8K`` → ``ge8K``, anything else outside ``[A-Za-z0-9_.- ]`` → ``_``)."""
    out = []
    for p in parts:
        s = str(p)
        for a, b in (("<=", "le"), (">=", "ge"), ("<", "lt"), (">", "gt"), ("+", "plus"), ("%", "pct")):
            s = s.replace(a, b)
        s = re.sub(r"[^A-Za-z0-9_.\- ]", "_", s)
        s = re.sub(r"\.{2,}", ".", s).strip(". ") or "_"
        out.append(s)
    return ".".join(out)[:250]


def _finite(v) -> bool:
    return _numeric(v) and math.isfinite(v)


def _numeric(v) -> bool:
    """A number MLflow can store (±inf is stored as ±max float; NaN is skipped)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and not math.isnan(v)


def _log(c: MlflowClient, run_id: str, metrics: dict | None = None, params: dict | None = None,
         tags: dict | None = None, step: int = 0) -> None:
    """log_batch in chunks within MLflow's limits; NaN / non-numeric metrics are skipped."""
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items() if _numeric(v)]
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    tg = [RunTag(k, str(v)[:8000]) for k, v in (tags or {}).items()]
    for i in range(0, len(ms), BATCH):
        c.log_batch(run_id, metrics=ms[i:i + BATCH])
    for i in range(0, max(len(ps), len(tg)), 100):
        if ps[i:i + 100] or tg[i:i + 100]:
            c.log_batch(run_id, params=ps[i:i + 100], tags=tg[i:i + 100])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _dumps(obj) -> str:
    return json_dumps(obj) + "\n"


# ---------------------------------------------------------------------------------------------------
# campaign (parent run)


def _parents(c: MlflowClient, experiment_id: str) -> list:
    return _search_all(c, [experiment_id], f"tags.`{ROLE}` = 'campaign'", order_by=["attributes.start_time ASC"])


def start_campaign(c: MlflowClient, campaign_name: str, *, params: dict) -> str:
    """The parent run of a campaign: created on the first call, found (and set RUNNING again) when the
    campaign is resumed. Params are immutable in MLflow: on a resume, only keys not logged before are
    added; keys whose value changed are listed in the tag ``rooflab.resume.changed_params``."""
    exp = _experiment(c, campaign_name)
    flat = {metric_key(k): v for k, v in _flat(params or {}).items()}
    parents = _parents(c, exp.experiment_id)
    if not parents:
        run = c.create_run(exp.experiment_id, run_name=campaign_name,
                           tags={ROLE: "campaign", CAMPAIGN: campaign_name})
        _log(c, run.info.run_id, params=flat)
        parents = _parents(c, exp.experiment_id)
        if parents and parents[0].info.run_id != run.info.run_id:  # lost a race: keep the oldest parent
            c.delete_run(run.info.run_id)
        else:
            return run.info.run_id
    parent = parents[0]
    pid = parent.info.run_id
    old = parent.data.params
    new = {k: v for k, v in flat.items() if k not in old}
    changed = sorted(k for k, v in flat.items() if k in old and old[k] != str(v)[:6000])
    resumes = int(parent.data.tags.get("rooflab.resumes", "0")) + 1
    tags = {"rooflab.resumes": resumes}
    if changed:
        tags["rooflab.resume.changed_params"] = ",".join(changed)
    _log(c, pid, params=new, tags=tags)
    if parent.info.status != RunStatus.to_string(RunStatus.RUNNING):
        c.update_run(pid, status="RUNNING")
    return pid


def _children(c: MlflowClient, parent_id: str) -> list:
    exp_id = c.get_run(parent_id).info.experiment_id
    return _search_all(c, [exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{ROLE}` = 'iteration'")


def logged_iterations(c: MlflowClient, parent_id: str) -> dict[int, str]:
    """Iteration → child run id, for the iterations completely logged (child FINISHED)."""
    out = {}
    for r in _children(c, parent_id):
        it = r.data.tags.get(ITERATION)
        if it is None or r.info.status != "FINISHED":
            continue
        out.setdefault(int(it), r.info.run_id)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------
# one iteration (child run)


def _cv(doc: dict, calib) -> dict[str, float]:
    """Bootstrap CV (sd / |mean| of the draws) per β: from the draws when the object is given, else
    from the health table's 'bootstrap CV' rows."""
    draws = getattr(getattr(calib, "beta", None), "draws", None)
    names = list(doc["beta"]["coefficients"])
    if draws is not None and len(draws) >= 2:
        mean, sd = draws.mean(axis=0), draws.std(axis=0, ddof=1)
        return {n: (float(s / abs(m)) if m != 0 else (0.0 if s == 0 else math.inf))
                for n, m, s in zip(names, mean, sd)}
    return {ch["target"]: ch["value"] for ch in (doc.get("health") or {}).get("checks", [])
            if ch.get("check") == "bootstrap CV" and ch.get("value") is not None}


def iteration_metrics(calib, *, gpu_seconds: float | None, n_picks: int) -> dict[str, float]:
    """The metrics of one iteration (SPEC §10), from a Calibration or its dict form."""
    doc = export.as_dict(calib)
    m: dict[str, float] = {}
    cv = _cv(doc, calib)
    for name, co in doc["beta"]["coefficients"].items():
        m[metric_key(name)] = co.get("value")
        m[metric_key(name, "lower")] = co.get("lower")
        m[metric_key(name, "upper")] = co.get("upper")
        if name in cv:
            m[metric_key(name, "cv")] = cv[name]
    a = doc.get("alpha") or {}
    if a.get("fitted"):
        for name, co in a["coefficients"].items():
            m[metric_key(name)] = co.get("value")
            m[metric_key(name, "lower")] = co.get("lower")
            m[metric_key(name, "upper")] = co.get("upper")
    checks = (doc.get("health") or {}).get("checks", [])
    for ch in checks:
        if ch.get("check") == "condition number":
            m["condition_number"] = ch.get("value") if ch.get("value") is not None else math.inf
    for status in ("fail", "warn"):
        m[f"health.{status}"] = sum(ch.get("status") == status for ch in checks)
    for split, acc in (doc.get("accuracy") or {}).items():
        for k in ("mape", "median_ape", "p90_ape"):
            if k in acc:
                m[metric_key(k, split)] = acc[k]
        m[metric_key("steps", split)] = acc.get("steps")
    hot = 0
    for b in doc.get("residual_buckets") or []:
        if b.get("split") not in ("train", "validation"):
            continue
        hot += bool(b.get("hotspot"))
        if b.get("dimension") in SKIP_BUCKET_DIMENSIONS:
            continue
        prefix = ("mape",) if b["split"] == "train" else ("mape", "validation")
        m[metric_key(*prefix, b["dimension"], b["bucket"])] = b.get("mape")
    m["hotspots"] = hot
    total = (doc.get("routing") or {}).get("total") or {}
    m["n_steps"] = total.get("steps")
    m["n_steps_fit"] = total.get("fit")
    m["n_runs"] = len((doc.get("routing") or {}).get("per_run") or {})
    m["n_requests"] = a.get("n_requests", 0) if a.get("fitted") else 0
    if gpu_seconds is not None:
        m["gpu_hours"] = float(gpu_seconds) / 3600.0
    m["n_picks"] = n_picks
    return {k: float(v) for k, v in m.items() if _numeric(v)}


def iteration_params(calib, extra_params: dict | None = None) -> dict:
    doc = export.as_dict(calib)
    b = doc["beta"]
    total = (doc.get("routing") or {}).get("total") or {}
    a = doc.get("alpha") or {}
    boot = b.get("bootstrap") or {}
    opts = doc.get("options") or {}
    p = {
        "data.steps": total.get("steps"), "data.steps_fit": total.get("fit"),
        "data.steps_saturated": total.get("saturated"), "data.steps_validation": total.get("held_out_validation"),
        "data.runs": len((doc.get("routing") or {}).get("per_run") or {}) or len(b.get("runs") or []),
        "data.requests": a.get("n_requests", 0) if a.get("fitted") else 0,
        "variant": b.get("variant"), "formulas": b.get("formulas"),
        "prior_strength": b.get("prior_strength"), "prior_option": opts.get("prior_strength"),
        "prior_selection": (b.get("prior_selection") or {}).get("method"),
        "bootstrap.unit": boot.get("unit"), "bootstrap.units": boot.get("units"),
        "bootstrap.draws": boot.get("draws"), "interval": b.get("interval"), "seed": opts.get("seed"),
        "step_time_formula": export.to_json(doc)["step_time_formula"],
    }
    p.update({metric_key(k): v for k, v in _flat(extra_params or {}).items()})
    return {k: v for k, v in p.items() if v is not None}


def _stop_fields(stop: dict | None) -> tuple[str, str]:
    stop = stop or {}
    reason = stop.get("reason") or stop.get("stop_reason") or ""
    flag = next((stop[k] for k in ("stop", "should_stop", "stopped", "done") if k in stop), None)
    return str(reason), "" if flag is None else str(bool(flag)).lower()


def write_iteration_artifacts(calib, out_dir: Path, *, iteration: int, picks: list[dict], stop: dict,
                              context: dict | None = None) -> list[Path]:
    """Write the iteration's artifact files into ``out_dir`` (atomically); returns their paths."""
    doc = export.as_dict(calib)
    out_dir = Path(out_dir)
    files = [
        export.write_json(doc, out_dir / "coefficients.json", context=context),
        export.write_blis(doc, out_dir / "blis_coefficients.yaml"),
        atomic_write_text(out_dir / "health.json", _dumps(doc.get("health") or {})),
        atomic_write_text(out_dir / "residual_buckets.csv",
                          pd.DataFrame(doc.get("residual_buckets") or []).to_csv(index=False)),
        atomic_write_text(out_dir / "next_points.json",
                          _dumps({"iteration": iteration, "n_picks": len(picks or []), "picks": picks or [],
                                  "stop": stop or {}})),
    ]
    if not isinstance(calib, dict) and hasattr(calib, "health"):
        from rooflab.fit.report import render

        files.append(atomic_write_text(out_dir / "health_report.txt", render(calib) + "\n"))
    return files


def log_iteration(c: MlflowClient, parent_id: str, iteration: int, calib, *, picks: list[dict],
                  gpu_seconds: float, stop: dict, artifacts_dir: Path, extra_params: dict | None = None) -> str:
    """Log one campaign iteration as a child run of ``parent_id`` and return its id. Idempotent: an
    iteration already logged (FINISHED child) is returned as is; a half-logged one is replaced.
    ``gpu_seconds`` is the campaign's cumulative GPU time so far; ``artifacts_dir`` is a local folder for
    the artifact files (kept: ``<artifacts_dir>/iteration_<NNN>/``)."""
    iteration = int(iteration)
    done = logged_iterations(c, parent_id)
    if iteration in done:
        return done[iteration]
    parent = c.get_run(parent_id)
    for r in _children(c, parent_id):  # an interrupted earlier attempt
        if r.data.tags.get(ITERATION) == str(iteration):
            c.delete_run(r.info.run_id)
    campaign = parent.data.tags.get(CAMPAIGN, "")
    tags = {"mlflow.parentRunId": parent_id, ROLE: "iteration", ITERATION: str(iteration), CAMPAIGN: campaign}
    run = c.create_run(parent.info.experiment_id, run_name=f"iteration-{iteration:03d}", tags=tags)
    rid = run.info.run_id
    with _terminated_on_error(c, rid):
        metrics = _log_calibration(c, rid, calib, step=iteration, picks=picks, gpu_seconds=gpu_seconds, stop=stop,
                                   out_dir=Path(artifacts_dir) / f"iteration_{iteration:03d}",
                                   extra_params=extra_params)
        summary_keys = ["gpu_hours", "n_picks", "hotspots", "condition_number", "mape.train", "mape.validation"]
        summary_keys += [k for k in metrics if re.fullmatch(r"beta\w*", k)]
        _log(c, parent_id, metrics={k: metrics[k] for k in summary_keys if k in metrics}, step=iteration)
        c.set_terminated(rid, "FINISHED")
    return rid


class _terminated_on_error:
    """Mark the run FAILED (and re-raise) when logging into it fails."""

    def __init__(self, c: MlflowClient, run_id: str):
        self.c, self.run_id = c, run_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                self.c.set_terminated(self.run_id, "FAILED")
            except Exception:  # the original error matters more
                pass
        return False


def _log_calibration(c: MlflowClient, rid: str, calib, *, step: int, picks: list | None, gpu_seconds: float | None,
                     stop: dict | None, out_dir: Path, extra_params: dict | None) -> dict:
    """Params, metrics, tags and artifacts of one calibration into run ``rid``; returns the metrics."""
    doc = export.as_dict(calib)
    reason, flag = _stop_fields(stop)
    metrics = iteration_metrics(calib, gpu_seconds=gpu_seconds, n_picks=len(picks or []))
    _log(c, rid, metrics=metrics, step=step)
    tags = {HEALTH: (doc.get("health") or {}).get("overall", "")}
    if stop is not None:
        tags.update({STOP_REASON: reason, "rooflab.stop": flag,
                     "rooflab.stop_json": json_dumps(stop, indent=None)})
    _log(c, rid, params=iteration_params(calib, extra_params), tags=tags)
    context = {k: v for k, v in (extra_params or {}).items() if k in ("hardware", "model", "models", "tp")}
    write_iteration_artifacts(calib, out_dir, iteration=step, picks=picks or [], stop=stop or {}, context=context)
    c.log_artifacts(rid, str(out_dir))
    for p in (Path(p) for p in doc.get("plots") or []):
        if p.is_file():
            c.log_artifact(rid, str(p), "plots")
    return metrics


def log_refit(c: MlflowClient, campaign: str, calib, *, artifacts_dir: Path, reason: str = "manual",
              gpu_seconds: float | None = None, extra_params: dict | None = None) -> str:
    """Log a refit outside the campaign loop (a ``rooflab.data.arrived`` refit, a V1 validation) as a
    top-level run of the campaign's experiment (tag ``rooflab.role=refit``, ``rooflab.reason``) with the
    same params, metrics and artifacts as an iteration (no picks). Returns its run id; each call logs a
    new run. Refit runs are not iterations: :func:`compare` and :func:`logged_iterations` skip them."""
    exp = _experiment(c, campaign)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = c.create_run(exp.experiment_id, run_name=f"refit-{stamp}",
                       tags={ROLE: "refit", CAMPAIGN: campaign, "rooflab.reason": str(reason)[:8000]})
    rid = run.info.run_id
    with _terminated_on_error(c, rid):
        _log_calibration(c, rid, calib, step=0, picks=None, gpu_seconds=gpu_seconds, stop=None,
                         out_dir=Path(artifacts_dir) / f"refit_{stamp}_{rid[:8]}", extra_params=extra_params)
        c.set_terminated(rid, "FINISHED")
    return rid


def finish_campaign(c: MlflowClient, parent_id: str, *, stop_reason: str, summary: dict,
                    status: str = "FINISHED") -> None:
    """End the parent run: numeric summary entries become metrics, the rest tags
    (``rooflab.summary.<key>``); the whole summary is also logged as ``summary.json``."""
    flat = _flat(summary or {})
    metrics = {metric_key(k): v for k, v in flat.items() if _finite(v)}
    tags = {f"rooflab.summary.{metric_key(k)}": v for k, v in flat.items() if not _finite(v)}
    tags[STOP_REASON] = stop_reason
    step = max(logged_iterations(c, parent_id), default=0)  # after the per-iteration history, not before
    _log(c, parent_id, metrics=metrics, tags=tags, step=step)
    c.log_text(parent_id, _dumps({"stop_reason": stop_reason, "summary": summary or {}}), "summary.json")
    c.set_terminated(parent_id, status)


# ---------------------------------------------------------------------------------------------------
# comparison across campaigns


def _client_of(client_or_root) -> MlflowClient:
    if isinstance(client_or_root, MlflowClient):
        return client_or_root
    root = Path(client_or_root)
    if not (root / "mlflow.db").is_file():
        raise InputError(root, None, "no MLflow store here (expected mlflow.db; run a campaign first)")
    return client(root)


def _beta_order(name: str):
    m = re.fullmatch(r"beta(\d+)", name)
    return (0, int(m.group(1)), "") if m else (1, 0, name)


def compare(client_or_root, campaigns: list[str] | None = None) -> pd.DataFrame:
    """One row per (campaign, iteration): β values and intervals, MAPE, cumulative GPU-hours, stop
    reason. ``campaigns`` None = every ``rooflab/…`` experiment of the store."""
    c = _client_of(client_or_root)
    if campaigns:
        exps = []
        for name in campaigns:
            exp = _experiment(c, name, create=False)
            if exp is None or exp.lifecycle_stage == "deleted":
                known = [e.name[len(EXPERIMENT_PREFIX):] for e in c.search_experiments(
                    filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'")]
                raise InputError(None, "campaign", f"no campaign {name!r} in {c.tracking_uri} "
                                                   f"(known: {', '.join(sorted(known)) or 'none'})")
            exps.append(exp)
    else:
        exps = list(c.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'"))
    rows, betas = [], set()
    for exp in exps:
        campaign = exp.name[len(EXPERIMENT_PREFIX):]
        parents = {r.info.run_id: r for r in _parents(c, exp.experiment_id)}
        children = _search_all(c, [exp.experiment_id], f"tags.`{ROLE}` = 'iteration'")
        last = {}
        for r in children:
            if r.info.status == "FINISHED" and r.data.tags.get(ITERATION) is not None:
                pid = r.data.tags.get("mlflow.parentRunId")
                last[pid] = max(last.get(pid, -1), int(r.data.tags[ITERATION]))
        for r in children:
            t, m = r.data.tags, r.data.metrics
            if t.get(ITERATION) is None or r.info.status != "FINISHED":
                continue
            it = int(t[ITERATION])
            pid = t.get("mlflow.parentRunId")
            stop = t.get(STOP_REASON, "")
            parent = parents.get(pid)
            if not stop and parent is not None and it == last.get(pid):
                stop = parent.data.tags.get(STOP_REASON, "")
            row = {"campaign": campaign, "iteration": it, "run_id": r.info.run_id}
            for k, v in m.items():
                if re.fullmatch(r"beta\w*", k):
                    betas.add(k)
                    row[k] = v
                    row[f"{k}.lower"] = m.get(f"{k}.lower", np.nan)
                    row[f"{k}.upper"] = m.get(f"{k}.upper", np.nan)
            row.update({"mape.train": m.get("mape.train", np.nan), "mape.validation": m.get("mape.validation", np.nan),
                        "gpu_hours": m.get("gpu_hours", np.nan), "n_picks": m.get("n_picks", np.nan),
                        "hotspots": m.get("hotspots", np.nan), "health": t.get(HEALTH, ""), "stop_reason": stop,
                        "campaign_status": parent.info.status if parent is not None else ""})
            rows.append(row)
    bcols = []
    for b in sorted(betas, key=_beta_order):
        bcols += [b, f"{b}.lower", f"{b}.upper"]
    cols = ["campaign", "iteration", "run_id", *bcols, "mape.train", "mape.validation", "gpu_hours", "n_picks",
            "hotspots", "health", "stop_reason", "campaign_status"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["campaign", "iteration"], ignore_index=True)
