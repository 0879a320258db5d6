"""Deployments (``rooflab serve``): the scheduled campaign (cron from the campaign config), the refit
triggered by ``rooflab.data.arrived``, and the new-model trigger (``rooflab.model.added``)."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect.events import DeploymentEventTrigger

from flows.campaign import campaign_flow
from flows.refit import refit_flow
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
                      launcher: str = "inference-perf") -> list:
    camp = load_campaign(campaign)
    common = {"store": store, "mlruns": mlruns}
    deps = [refit_flow.to_deployment(name=f"{camp.name}-refit", triggers=[refit_trigger(camp.name, campaign)],
                                     parameters={"campaign": campaign, **common}),
            new_model_flow.to_deployment(name=f"{camp.name}-new-model", triggers=[new_model_trigger(camp.name)],
                                         parameters={"campaign": campaign, "launcher": launcher, **common})]
    if camp.schedule:
        deps.append(campaign_flow.to_deployment(name=f"{camp.name}-scheduled", cron=camp.schedule,
                                                parameters={"campaign": campaign, "launcher": launcher, **common}))
    return deps


def next_fire_times(cron: str, n: int = 3, after: datetime | None = None) -> list[datetime]:
    """When the scheduled campaign will run next (the cron parser Prefect's schedules use)."""
    from cronsim import CronSim

    it = CronSim(cron, after or datetime.now(UTC))
    return [next(it) for _ in range(n)]


def serve_all(campaign: str, **kw) -> None:
    from prefect import serve

    serve(*build_deployments(campaign, **kw))
