"""Deployments (``rooflab serve``): the scheduled campaign (cron from the campaign config), the refit
triggered by ``rooflab.data.arrived``, and the new-model trigger (``rooflab.model.added``) — served by this
process (:func:`serve_all`), or registered on a work pool with the per-run flow (:func:`deploy_to_pool`) for
``prefect worker start --pool <pool>`` to execute on any number of machines."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect.deployments.runner import EntrypointType
from prefect.events import DeploymentEventTrigger

from flows.campaign import campaign_flow
from flows.refit import refit_flow
from flows.run import run_flow
from flows.validate import new_model_flow
from rooflab.collect.spec import load_campaign

DATA_ARRIVED = "rooflab.data.arrived"
MODEL_ADDED = "rooflab.model.added"


def refit_trigger(name: str, spec: str) -> DeploymentEventTrigger:
    """Refit campaign ``name`` (spec ``spec``: a path or a shipped name) when one of its runs lands."""
    return DeploymentEventTrigger(
        name=f"refit {name} on data", expect={DATA_ARRIVED},
        match={"prefect.resource.id": "rooflab.run.*", "rooflab.campaign": name},
        parameters={"campaign": spec, "reason": "data arrived: {{ event.resource.id }}"})


def new_model_trigger(campaign: str) -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name=f"{campaign}: new model", expect={MODEL_ADDED}, match={"prefect.resource.id": "rooflab.model.*"},
        parameters={"campaign": campaign, "model": "{{ event.payload.model }}", "tp": "{{ event.payload.tp }}",
                    "hardware": "{{ event.payload.hardware }}"})


def build_deployments(campaign: str, *, store: str = "store", mlruns: str = "mlruns",
                      launcher: str = "inference-perf", pool: str | None = None, triggers: bool = True) -> list:
    """The campaign's deployments. Without ``pool``: for :func:`serve_all` (this process runs them) — the refit, the
    new-model trigger and, when the campaign has a ``schedule``, the scheduled campaign. With ``pool``: for
    :func:`deploy_to_pool` (the pool's workers run them, importing the flows by module path) — the same, plus the
    campaign on demand (``<name>``, when it has no schedule) and the per-run flow ``rooflab-run/<pool>``; the
    campaign's runs then go to the pool (its ``pool`` parameter). ``triggers=False`` leaves out the event-triggered
    refit and new-model deployments."""
    camp = load_campaign(campaign)
    common = {"store": store, "mlruns": mlruns}
    kw: dict = {"entrypoint_type": EntrypointType.MODULE_PATH} if pool else {}
    run_params = {"campaign": campaign, "launcher": launcher, **common, **({"pool": pool} if pool else {})}
    deps = [refit_flow.to_deployment(name=f"{camp.name}-refit", triggers=[refit_trigger(camp.name, campaign)],
                                     parameters={"campaign": campaign, **common}, **kw),
            new_model_flow.to_deployment(name=f"{camp.name}-new-model", triggers=[new_model_trigger(camp.name)],
                                         parameters={"campaign": campaign, "launcher": launcher, **common}, **kw)] \
        if triggers else []
    if camp.schedule:
        deps.append(campaign_flow.to_deployment(name=f"{camp.name}-scheduled", cron=camp.schedule,
                                                parameters=run_params, **kw))
    elif pool:
        deps.append(campaign_flow.to_deployment(name=camp.name, parameters=run_params, **kw))
    if pool:
        deps.append(run_flow.to_deployment(name=pool, **kw))
    return deps


def deploy_to_pool(campaign: str, pool: str, *, store: str, mlruns: str, launcher: str = "inference-perf",
                   image: str | None = None, triggers: bool = True) -> list:
    """Register the campaign's deployments (:func:`build_deployments` with ``pool``) on work pool ``pool``, which
    must exist (:func:`flows.work_pool.ensure_pool`): ``prefect worker start --pool <pool>`` on any number of
    machines then executes them. ``image``: the container image of a Kubernetes pool's flow-run pods (used as is:
    nothing is built or pushed). Returns the deployments' ids."""
    from prefect import deploy

    deps = build_deployments(campaign, store=store, mlruns=mlruns, launcher=launcher, pool=pool, triggers=triggers)
    return list(deploy(*deps, work_pool_name=pool, image=image, build=False, push=False,
                       print_next_steps_message=False, ignore_warnings=True))


def next_fire_times(cron: str, n: int = 3, after: datetime | None = None) -> list[datetime]:
    """When the scheduled campaign will run next (the cron parser Prefect's schedules use)."""
    from cronsim import CronSim

    it = CronSim(cron, after or datetime.now(UTC))
    return [next(it) for _ in range(n)]


def serve_all(campaign: str, **kw) -> None:
    from prefect import serve

    serve(*build_deployments(campaign, **kw))
