"""Prefect flows and deployments: a tiny campaign to completion (MLflow contents), resume after a crash,
the schedule, and the refit that a rooflab.data.arrived event triggers."""

import os
import time
from datetime import UTC, datetime

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect_harness import bounded_prefect_harness  # noqa: E402

import flows.campaign as campaign_module  # noqa: E402
from flows.campaign import campaign_flow  # noqa: E402
from flows.deployments import build_deployments, next_fire_times, refit_trigger  # noqa: E402
from rooflab.data.store import Store  # noqa: E402
from tracking import campaign_runs as track  # noqa: E402
from tracking.store import ROLE, experiment_name, open_tracking  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def harness(tmp_path_factory):
    with bounded_prefect_harness(tmp_path_factory.mktemp("prefect-home")):
        yield


def _children(ts, campaign):
    parent = track.start_campaign(ts, campaign, params={})
    return parent, track.logged_iterations(ts, parent)


def test_tiny_campaign_runs_to_completion_and_is_tracked(tmp_path):
    store, mlruns = tmp_path / "store", tmp_path / "mlruns"
    result = campaign_flow(campaign="smoke", store=str(store), mlruns=str(mlruns), launcher="direct",
                           overrides={"batch_size": 4, "max_iterations": 2, "n_boot": 30})
    assert result["iterations"] == 2 and result["stop_reason"]
    ts = open_tracking(mlruns)
    client = ts.client
    exp = client.get_experiment_by_name(experiment_name("smoke"))
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE) == "campaign"]
    children = [r for r in runs if r.data.tags.get(ROLE) == "iteration"]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert "iteration cap 2 reached" in parents[0].data.tags.get("rooflab.stop_reason", "") + result["stop_reason"]
    for c in children:
        m = c.data.metrics
        assert {"beta1", "beta1.lower", "beta1.upper", "mape.train", "gpu_hours"} <= set(m)
        names = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"coefficients.json", "blis_coefficients.yaml", "health_report.txt", "next_points.json"} <= names
    # the data store holds exactly the runs the two iterations planned
    st = Store(store)
    planned = sum(len(p["points"]) for p in st.iterations("smoke"))
    assert len(st.runs(statuses=("ok", "saturated", "failed"))) == planned


def test_campaign_resumes_after_a_crash_without_duplicates(tmp_path, monkeypatch):
    store, mlruns = tmp_path / "store", tmp_path / "mlruns"
    real_log = campaign_module.log_iteration

    def crash_on_iteration_1(ts, parent, iteration, *a, **kw):
        if iteration == 1:
            raise KeyboardInterrupt("killed during iteration 1")
        return real_log(ts, parent, iteration, *a, **kw)

    monkeypatch.setattr(campaign_module, "log_iteration", crash_on_iteration_1)
    with pytest.raises(KeyboardInterrupt):
        campaign_flow(campaign="smoke", store=str(store), mlruns=str(mlruns), launcher="direct",
                      overrides={"batch_size": 4, "max_iterations": 3, "n_boot": 30})
    monkeypatch.setattr(campaign_module, "log_iteration", real_log)
    ts = open_tracking(mlruns)
    _, before = _children(ts, "smoke")
    st = Store(store)
    runs_before = set(st.runs().run_id)
    assert set(before) == {0} and len(runs_before) > 0

    result = campaign_flow(campaign="smoke", store=str(store), mlruns=str(mlruns), launcher="direct",
                           overrides={"batch_size": 4, "max_iterations": 3, "n_boot": 30})
    _, after = _children(ts, "smoke")
    assert sorted(after) == list(range(result["iterations"])) and after[0] == before[0]  # nothing logged twice
    manifests = st.manifests()
    assert len({m["run_id"] for m in manifests}) == len(manifests)  # nothing collected twice
    assert runs_before <= set(st.runs().run_id)
    assert all(m["attempt"] == 1 for m in manifests)  # the runs of iteration 1 were not re-run after the crash


def test_schedule_fires_when_the_campaign_says():
    times = next_fire_times("0 3 * * 1", 3, after=datetime(2026, 11, 24, tzinfo=UTC))
    assert [t.isoformat() for t in times] == ["2026-11-30T03:00:00+00:00", "2026-12-07T03:00:00+00:00",
                                              "2026-12-14T03:00:00+00:00"]
    deps = {d.name: d for d in build_deployments("demo")}
    sched = deps["demo-scheduled"]
    assert [s.schedule.cron for s in sched.schedules] == ["0 3 * * 1"]
    assert deps["demo-refit"].triggers and deps["demo-new-model"].triggers


def test_data_arrived_event_triggers_a_refit_run(tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events import emit_event

    from flows.refit import refit_flow

    dep = refit_flow.to_deployment(name="smoke-refit-test", triggers=[refit_trigger("smoke", "smoke")],
                                   parameters={"campaign": "smoke", "store": str(tmp_path / "store"),
                                               "mlruns": str(tmp_path / "mlruns")})
    dep_id = dep.apply()
    time.sleep(2)  # let the automation register
    emit_event(event="rooflab.data.arrived", resource={"prefect.resource.id": "rooflab.run.w3-abc",
                                                       "rooflab.campaign": "smoke"},
               payload={"campaign": "smoke", "run_id": "w3-abc"})
    emit_event(event="rooflab.data.arrived", resource={"prefect.resource.id": "rooflab.run.w3-def",
                                                       "rooflab.campaign": "other-campaign"})

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))

    import asyncio

    found = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60 and not found:
        found = asyncio.run(runs())
        time.sleep(1)
    assert len(found) >= 1, "no refit flow run was created by the event"
    params = found[0].parameters
    assert params["campaign"] == "smoke" and "rooflab.run.w3-abc" in params["reason"]
    time.sleep(3)
    assert all(r.parameters["campaign"] == "smoke" for r in asyncio.run(runs()))
    assert len(asyncio.run(runs())) == 1  # the other campaign's event did not match


def test_validate_and_new_model_flows(tmp_path):
    """V1 on a model the campaign never trained on: the flow collects the V1 points (held out), reports
    the current coefficients' step-time MAPE on them; the new-model flow sweeps only when V1 misses > 10%."""
    from flows.validate import (
        NEW_MODEL_MAPE_LIMIT,
        new_model_flow,
        v1_points,
        validate_flow,
    )
    from rooflab.collect.spec import load_campaign

    store, mlruns = str(tmp_path / "store"), str(tmp_path / "mlruns")
    campaign_flow(campaign="smoke", store=store, mlruns=mlruns, launcher="direct",
                  overrides={"batch_size": 4, "max_iterations": 1, "n_boot": 20})
    points = v1_points(load_campaign("smoke"), "llama-2-7b", 1)
    assert points and all(p.split == "validation" and p.model == "llama-2-7b" for p in points)
    res = validate_flow("smoke", "llama-2-7b", 1, store=store, mlruns=mlruns, launcher="direct")
    assert len(res["runs"]) == len(points) and 0 <= res["v1_mape"] < 1
    st = Store(store)
    assert set(st.runs(model="llama-2-7b").split) == {"validation"}
    out = new_model_flow("smoke", "llama-2-7b", 1, store=store, mlruns=mlruns, launcher="direct")
    assert out["swept"] == (out["v1_mape"] > NEW_MODEL_MAPE_LIMIT)
    if out["swept"]:
        assert (st.runs(model="llama-2-7b").split == "train").any()
