"""The MLflow model registry of calibrations (issue 18): every calibration is a version of a registered model named
after its **scope** — hardware, model family, vLLM version (``rooflab.<hardware>.<models>.vllm-<version>``) — whose
artifact is the coefficient set with its posterior (``coefficients.json``), the fit's sufficient statistics
(``fit_state.json``: what a sequential refit updates), the provenance record and a ``pyfunc`` flavour that
predicts step time from a batch table (``tracking/pyfunc_model.py``).

Aliases: a new version becomes ``challenger``; it becomes ``champion`` only when
:func:`rooflab.replay.promotion.decide` says so (:func:`record_decision` logs the decision and its before/after
table into the refit's run and onto the version). Versions are never deleted; the champion alias moves.

All calls use the explicit client of :class:`tracking.store.TrackingStore` (no global MLflow URI), so they are
safe from Prefect worker threads and never touch ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from rooflab.data.store import Store, engine_scope
from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.fit.posterior import FitState, state_from_doc
from rooflab.model.coefficients import Coefficients, coefficients_from_doc, load_coefficients
from rooflab.replay.promotion import Decision
from tracking.metrics import log_batch, metric_key
from tracking.store import CAMPAIGN, ROLE, TrackingStore, experiment

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_PATH = "model"  # artifact path of the pyfunc model (the version's source) inside the run
SCOPE_TAG = "rooflab.scope"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("._") or "unknown"


def registered_name(scope: Mapping[str, Any]) -> str:
    """``rooflab.<hardware>.<models>.vllm-<version>`` from a fit's scope (``Calibration.scope`` plus the provenance
    scope's ``vllm_version``; lists are joined with ``+``; unknown parts are said so)."""
    def part(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return "+".join(sorted(map(str, v))) or "unknown"
        return str(v) if v else "unknown"

    return _slug(f"rooflab.{part(scope.get('hardware'))}.{part(scope.get('models'))}."
                 f"vllm-{part(scope.get('vllm_version'))}")


def campaign_scope(store: Store | str | Path, campaign: str) -> dict[str, Any]:
    """What a campaign's training data covers — hardware, models, TP degrees, vLLM version — from the run
    manifests of its complete, unsaturated training runs (the registered model's name comes from it)."""
    st = store if isinstance(store, Store) else Store(store)
    runs = st.runs(campaign=campaign, statuses=("ok",))
    train = runs[runs["split"].astype(str) != "validation"] if len(runs) else runs
    ids = train["run_id"].astype(str).tolist()
    eng = engine_scope(st, ids) if ids else {}
    return {"hardware": sorted(map(str, train["hardware"].unique())),
            "models": sorted(map(str, train["model"].unique())),
            "tp": sorted(int(t) for t in train["tp"].unique()), "vllm_version": eng.get("vllm_version"),
            "engine_kinds": eng.get("engine_kinds", []), "runs": len(ids)}


@dataclass
class RegisteredCalibration:
    """One registered version: its coefficient set (with posterior) and fit state, where it lives, its aliases."""

    name: str
    version: str
    run_id: str
    coefficients: Coefficients
    state: FitState | None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


def _ensure_model(ts: TrackingStore, name: str, scope: Mapping[str, Any]) -> None:
    try:
        ts.client.create_registered_model(name, tags={SCOPE_TAG: json.dumps(dict(scope), sort_keys=True, default=str)},
                                          description="rooflab calibrations of one scope (hardware, model family, "
                                                      "vLLM version); alias champion = the one to use")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise


def write_calibration_files(out_dir: Path, coefs: Coefficients, state: FitState | None,
                            provenance: Mapping[str, Any] | None) -> dict[str, Path]:
    """The version's files: coefficients (with posterior), fit state, provenance."""
    files = {"coefficients": atomic_write_text(out_dir / "coefficients.json", json_dumps(coefs.to_dict()) + "\n")}
    if state is not None:
        files["fit_state"] = atomic_write_text(out_dir / "fit_state.json", json_dumps(state.to_dict()) + "\n")
    files["provenance"] = atomic_write_text(out_dir / "provenance.json", json_dumps(dict(provenance or {})) + "\n")
    return files


def register(ts: TrackingStore, name: str, coefs: Coefficients, state: FitState | None, *, run_id: str,
             scope: Mapping[str, Any], provenance: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None) -> RegisteredCalibration:
    """Log the calibration's files and pyfunc model into run ``run_id``, create a version of ``name`` from them
    and point the ``challenger`` alias at it."""
    import mlflow.pyfunc

    _ensure_model(ts, name, scope)
    with tempfile.TemporaryDirectory(prefix="rooflab-registry-") as tmp:
        files = write_calibration_files(Path(tmp) / "files", coefs, state, provenance)
        model_dir = Path(tmp) / MODEL_PATH
        mlflow.pyfunc.save_model(str(model_dir), python_model=str(PYFUNC_CODE),
                                 artifacts={k: str(v) for k, v in files.items()}, pip_requirements=["rooflab"])
        ts.client.log_artifacts(run_id, str(model_dir), MODEL_PATH)
    vtags = {k: str(v)[:5000] for k, v in (tags or {}).items()}
    mv = ts.client.create_model_version(name, f"runs:/{run_id}/{MODEL_PATH}", run_id=run_id, tags=vtags,
                                        description=f"{coefs.variant} ({coefs.formulas}); {coefs.source}"[:5000])
    version = str(mv.version)
    for _ in range(50):  # a file-store backend may report PENDING_REGISTRATION for a moment
        if ts.client.get_model_version(name, version).status == "READY":
            break
        time.sleep(0.1)
    ts.client.set_registered_model_alias(name, CHALLENGER, version)
    return RegisteredCalibration(name, version, run_id, coefs, state, [CHALLENGER], dict(vtags))


def promote(ts: TrackingStore, name: str, version: str) -> None:
    """Point ``champion`` at ``version``."""
    ts.client.set_registered_model_alias(name, CHAMPION, str(version))


def load_version(ts: TrackingStore, name: str, version_or_alias: str) -> RegisteredCalibration | None:
    """A registered version by number or alias (``champion``, ``challenger``); None when there is none."""
    c = ts.client
    try:
        mv = c.get_model_version(name, version_or_alias) if str(version_or_alias).isdigit() else \
            c.get_model_version_by_alias(name, version_or_alias)
    except MlflowException:
        return None
    run_id = str(mv.run_id)
    with tempfile.TemporaryDirectory(prefix="rooflab-registry-") as tmp:
        local = Path(c.download_artifacts(run_id, f"{MODEL_PATH}/artifacts", tmp))
        coef_path = local / "coefficients.json"
        coefs = coefficients_from_doc(json.loads(coef_path.read_text()), f"models:/{name}/{mv.version}")
        state_path = local / "fit_state.json"
        state = state_from_doc(json.loads(state_path.read_text()), str(state_path)) if state_path.is_file() else None
    return RegisteredCalibration(name, str(mv.version), run_id, coefs, state, list(mv.aliases or []),
                                 dict(mv.tags or {}))


def champion(ts: TrackingStore, name: str) -> RegisteredCalibration | None:
    return load_version(ts, name, CHAMPION)


def resolve_coefficients(ts: TrackingStore | None, name: str | None, ref: str) -> tuple[Coefficients, str]:
    """A coefficient set named by ``ref``: an alias (``champion``, ``challenger``) or version number of registered
    model ``name``, or a coefficients file. Returns it and a label; a one-line :class:`InputError` otherwise."""
    path = Path(ref)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.is_file():
        return load_coefficients(path), str(path)
    if ts is None or name is None:
        raise InputError(None, "--baseline", f"{ref!r} is not a file; an alias or version needs --mlruns and a "
                                             "registered model (--registered-model, or --campaign with --store)")
    reg = load_version(ts, name, ref)
    if reg is None:
        known = [str(v.version) for v in ts.client.search_model_versions(f"name='{name}'")]
        raise InputError(ts.uri, f"models:/{name}@{ref}" if not ref.isdigit() else f"models:/{name}/{ref}",
                         "no such registered version" + (f" (versions: {', '.join(sorted(known, key=int))})"
                                                          if known else " (the model has no version)"))
    return reg.coefficients, f"{name}/{reg.version} ({', '.join(reg.aliases) or 'no alias'})"


def start_refit_run(ts: TrackingStore, campaign: str, *, kind: str, reason: str) -> str:
    """A top-level run of the campaign's experiment for a refit that is not logged by
    :func:`tracking.campaign_runs.log_refit` (a sequential update): tags ``rooflab.role=refit``,
    ``rooflab.refit.kind``."""
    exp = experiment(ts, campaign)
    assert exp is not None
    run = ts.client.create_run(exp.experiment_id, run_name=f"refit-{kind}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={ROLE: "refit", CAMPAIGN: campaign, "rooflab.reason": reason[:8000],
                                     "rooflab.refit.kind": kind})
    return str(run.info.run_id)


def log_coefficients(ts: TrackingStore, run_id: str, coefs: Coefficients, state: FitState | None, *,
                     metrics: bool = True) -> None:
    """Params, metrics and tags of a coefficient set with its posterior: each coefficient, its 90% posterior
    interval (``.lower`` / ``.upper``), its posterior sd (``.sd``), the model form, the lineage. ``metrics`` False:
    only the posterior sd and the tags (a full refit's run already has the coefficients and bootstrap intervals)."""
    values: dict[str, Any] = {}
    post = coefs.posterior
    if metrics:
        for n, v in {**coefs.beta, **dict(zip(("alpha0", "alpha1", "alpha2"), coefs.alpha))}.items():
            values[metric_key(n)] = v
    if post is not None:
        iv = post.interval(0.90)
        for n, (lo, hi), sd in zip(post.names, iv, post.sd):
            values[metric_key(n, "sd")] = sd
            if metrics:
                values.update({metric_key(n, "lower"): lo, metric_key(n, "upper"): hi})
    params: dict[str, Any] = {"variant": coefs.variant, "formulas": coefs.formulas} if metrics else {}
    if state is not None and metrics:
        params.update({"prior_strength": state.prior_strength, "fp8_peak": state.fp8_peak})
    if state is not None:
        values["posterior.n_runs"] = len(state.runs)
        values["posterior.n_steps"] = sum(r.rows for r in state.runs)
    tags = {}
    if post is not None:
        tags["rooflab.posterior.method"] = post.method[:5000]
        tags["rooflab.lineage"] = json.dumps({k: v for k, v in post.lineage.items() if k != "history"},
                                             default=str)[:5000]
    log_batch(ts, run_id, metrics=values, params=params, tags=tags)


def record_decision(ts: TrackingStore, run_id: str, reg: RegisteredCalibration, decision: Decision,
                    champion_ref: str | None) -> None:
    """Log the promotion decision into the refit's run (``promotion.json``, ``promotion.md`` with the before/after
    table, metrics ``promotion.*``, tag ``rooflab.promotion``) and onto the version (tags)."""
    doc = {**decision.to_dict(), "challenger": reg.ref, "champion_before": champion_ref}
    ts.client.log_text(run_id, json_dumps(doc), "promotion/promotion.json")
    ts.client.log_text(run_id, f"challenger {reg.ref} vs champion {champion_ref or '(none)'}\n\n" + decision.markdown(),
                       "promotion/promotion.md")
    metrics = {"promotion.mean_difference": decision.mean_difference, "promotion.ci_low": decision.ci[0],
               "promotion.ci_high": decision.ci[1], "promotion.n_runs": decision.n_runs,
               "heldout.error.challenger": float(decision.table["challenger"].mean()) if len(decision.table) else None}
    if len(decision.table) and decision.table["champion"].notna().any():
        metrics["heldout.error.champion"] = float(decision.table["champion"].mean())
    log_batch(ts, run_id, metrics={k: v for k, v in metrics.items() if v is not None},
              tags={"rooflab.promotion": decision.verdict, "rooflab.promotion.reason": decision.reason[:5000]})
    for k, v in {"rooflab.promotion": decision.verdict, "rooflab.promotion.reason": decision.reason,
                 "rooflab.champion_before": champion_ref or ""}.items():
        ts.client.set_model_version_tag(reg.name, reg.version, k, str(v)[:5000])


_MODEL_URI = re.compile(r"^models:/([^/@]+)(?:@([A-Za-z0-9_-]+)|/(\d+))$")


def coefficients_from_model_uri(ts: TrackingStore, uri: str) -> Coefficients:
    """The coefficient set (with its posterior) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise InputError(None, "--coefficients", f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    reg = load_version(ts, m.group(1), m.group(2) or m.group(3))
    if reg is None:
        raise InputError(ts.uri, "--coefficients", f"{uri}: no such registered version")
    return reg.coefficients


def log_interval_report(ts: TrackingStore, run_id: str, out_dir: Path, report: Mapping[str, Any]) -> None:
    """The interval pictures and figures of a refit (``tasks.refit.interval_report``) into its run: artifacts under
    ``intervals/``, the 90% coverage as metric ``intervals.coverage90``."""
    ts.client.log_artifacts(run_id, str(out_dir), "intervals")
    log_batch(ts, run_id, metrics={"intervals.coverage90": (report.get("coverage") or {}).get("coverage")})
