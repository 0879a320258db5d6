"""Refit from the data store alone (no collection), register the result and decide whether it becomes the
champion; what the ``rooflab.data.arrived`` event triggers (issue 18). The fit's settings come from the campaign
spec (``loop.variant``, ``loop.formulas``, ``loop.n_boot``), like the campaign's own iterations.

1. **Scope and champion.** The campaign's training runs give the scope (hardware, models, vLLM version) and so the
   registered model (``tracking/registry.py``); its ``champion`` version, if any, is the parent.
2. **Sequential or full.** When the champion carries its fit state, the model form is unchanged (same variant,
   formulas, λ) and every run it was fitted on is still in the store, the refit *updates* its posterior with the
   runs that arrived since (:mod:`rooflab.fit.posterior`: the same answer as a full refit at that λ; lineage
   recorded); with no new run there is nothing to do. Otherwise a full calibration (λ chosen by leave-one-run-out
   unless ``prior_strength`` is given).
3. **Model discrepancy.** The posterior gets its model-form term from leave-one-run-out residuals of the training
   runs (:mod:`rooflab.fit.discrepancy`), so intervals replayed with the registered set cover the formula's own
   error as well as the coefficients'.
4. **Register and decide.** The refit becomes a new version with alias ``challenger``; it is promoted to
   ``champion`` when its held-out replay error (the campaign's validation runs) is not worse than the champion's
   beyond the noise of the paired comparison (:mod:`rooflab.replay.promotion`); the decision and its before/after
   table are logged into the refit's MLflow run and onto the version, with the prediction-interval pictures of the
   refit on the held-out runs (``intervals/calibration.png``, ``intervals/pred_vs_measured.png``,
   ``intervals/coverage.json``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from rooflab.collect.spec import load_campaign
from rooflab.fit.calibration import Options
from rooflab.model.variants import get_variant, resolve_formulas
from rooflab.replay.promotion import PromotionRule
from tasks.analyze import calibrate_from_store
from tasks.refit import (
    heldout_run_errors,
    interval_report,
    parent_runs_present,
    provenance_of,
    register_and_decide,
    sequential_refit,
    store_scope,
    with_model_discrepancy,
    work_dir,
)
from tracking.campaign_runs import log_refit
from tracking.registry import champion as registry_champion
from tracking.registry import log_coefficients, log_interval_report, registered_name, start_refit_run
from tracking.store import open_tracking


@flow(name="rooflab-refit", log_prints=True)
def refit_flow(campaign: str, store: str = "store", mlruns: str = "mlruns", reason: str = "manual",
               prior_strength: float | None = None, sequential: bool = True, tolerance: float = 0.005,
               interval_draws: int = 20) -> dict[str, Any]:
    """``campaign``: the campaign spec (a path, or a name under configs/campaigns). ``prior_strength``: a fixed λ
    (a different λ than the champion's is a new model form: full refit); ``sequential``: False forces a full
    refit; ``tolerance``: how much worse (absolute held-out error) is immaterial for promotion (0: the strict rule);
    ``interval_draws``: posterior draws per held-out run for the interval pictures (0: none)."""
    camp = load_campaign(campaign)
    loop = camp.loop
    variant = get_variant(loop.variant).name
    formulas = resolve_formulas(variant, loop.formulas)
    ts = open_tracking(mlruns)
    scope = store_scope(store, camp.name)
    name = registered_name(scope)
    champ = registry_champion(ts, name)
    same_form = champ is not None and champ.state is not None and champ.state.variant == variant and \
        champ.state.formulas == formulas and (prior_strength is None or prior_strength == champ.state.prior_strength)
    kind, seq = "full", None
    if sequential and same_form and champ is not None and champ.state is not None and \
            parent_runs_present(store, camp.name, champ.state):
        seq = sequential_refit(store, camp.name, champ)
        if seq is None:
            print(f"refit of {camp.name} ({reason}): no run arrived since champion {champ.ref}; nothing to do")
            return {"campaign": camp.name, "kind": "none", "registered_model": name, "version": None,
                    "champion": champ.ref, "decision": None, "mlflow_run_id": None,
                    "coefficients": dict(champ.coefficients.beta), "validation_mape": None}
        kind = "sequential"
    if seq is not None:
        coefs, state, added = seq
        run_id = start_refit_run(ts, camp.name, kind=kind, reason=reason)
        log_coefficients(ts, run_id, coefs, state)
        validation_mape = None
    else:
        options = Options(variant=variant, formulas=formulas, n_boot=loop.n_boot,
                          prior_strength="auto" if prior_strength is None else float(prior_strength))
        calib = calibrate_from_store(store, camp.name, options, str(work_dir(mlruns, camp.name) / "plots"))
        run_id = log_refit(ts, camp.name, calib, artifacts_dir=work_dir(mlruns, camp.name), reason=reason)
        coefs, state = calib.coefficients(), calib.fit_state
        log_coefficients(ts, run_id, coefs, state, metrics=False)
        added = list(calib.beta.runs)
        validation_mape = calib.accuracy.get("validation", {}).get("mape")
    if state is not None:
        coefs = with_model_discrepancy(store, camp.name, coefs, state)
    lineage = state.lineage if state is not None else []
    chall_err = heldout_run_errors(store, camp.name, coefs)
    champ_err = heldout_run_errors(store, camp.name, champ.coefficients) if champ is not None else None
    provenance = provenance_of(coefs, scope, store, state.run_ids if state is not None else added, run_id, lineage)
    tags = {"rooflab.refit.kind": kind, "rooflab.campaign": camp.name, "rooflab.reason": reason,
            "rooflab.parent": champ.ref if (champ is not None and kind == "sequential") else "",
            "rooflab.runs_added": ",".join(added), "rooflab.runs": len(state.runs) if state is not None else len(added)}
    reg, decision = register_and_decide(mlruns, name, coefs, state, run_id=run_id, scope=scope,
                                        provenance=provenance, tags=tags, champion=champ, champion_errors=champ_err,
                                        challenger_errors=chall_err, rule=PromotionRule(tolerance=tolerance))
    if interval_draws > 0:
        out = work_dir(mlruns, camp.name) / f"intervals_{run_id[:8]}"
        report = interval_report(store, camp.name, coefs, str(out), draws=interval_draws)
        if report:
            log_interval_report(ts, run_id, out, report)
    print(f"refit of {camp.name} ({reason}, {kind}): {name} version {reg.version}, {decision.verdict} — "
          f"{decision.reason}; MLflow run {run_id}")
    return {"campaign": camp.name, "kind": kind, "registered_model": name, "version": reg.version,
            "champion": f"{name}/{reg.version}" if decision.promote else (champ.ref if champ is not None else None),
            "decision": decision.to_dict(), "mlflow_run_id": run_id, "coefficients": dict(coefs.beta),
            "runs_added": added, "validation_mape": validation_mape}
