"""What a person sees of a tracked campaign in MLflow 3.17.2's UI: the parent run's learning curves (one
point per iteration, step = iteration), the experiment's layout tag and rooflab's saved view, the link that
opens both, the compare view's default axes, and a summary that is logged once.

Fixtures as in tests/test_tracking_export.py (a synthetic calibration logged as campaign iterations)."""

import json
import sys
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rooflab.data.synthetic import synthetic_steps, with_step_times  # noqa: E402
from rooflab.fit.calibration import Options, calibrate  # noqa: E402
from rooflab.targeting.stop import StopDecision  # noqa: E402
from tracking import campaign_runs as track  # noqa: E402
from tracking.metrics import HEADLINE, coefficient_names  # noqa: E402
from tracking.store import open_tracking  # noqa: E402


@pytest.fixture(scope="module")
def steps():
    s = with_step_times(synthetic_steps(n_runs=6, steps_per_run=150))
    s["split"] = "train"
    s.loc[s["run_id"].isin(["run04", "run05"]), "split"] = "validation"
    return s


@pytest.fixture(scope="module")
def calibs(steps, tmp_path_factory):
    """Two iterations' fits: the second on more runs (as a campaign's data grows)."""
    plots = tmp_path_factory.mktemp("plots")
    first = steps[steps.run_id.isin(["run00", "run01", "run04", "run05"])]
    return [calibrate(first, None, Options(variant="roofline7", n_boot=20), plots_dir=plots / "0"),
            calibrate(steps, None, Options(variant="roofline7", n_boot=20), plots_dir=plots / "1")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking") / "mlruns"
    return root, open_tracking(root)


def _campaign(ts, name, calibs, tmp_path):
    """A campaign with two logged iterations; returns (parent id, [child ids])."""
    parent = track.start_campaign(ts, name, params={"budget_gpu_hours": 2})
    children = [track.log_iteration(ts, parent, it, calib, picks=[], gpu_seconds=1800.0 * (it + 1),
                                    stop=StopDecision(it == 1, "demo", {}), artifacts_dir=tmp_path / "art")
                for it, calib in enumerate(calibs)]
    return parent, children


def test_parent_run_has_one_point_per_iteration(store, calibs, tmp_path):
    """The parent's charts are learning curves: every β with its interval, train and held-out MAPE and the
    GPU-hours so far, one history point per iteration at step = iteration, equal to the iteration's own."""
    _, ts = store
    c = ts.client
    parent, children = _campaign(ts, "curves", calibs, tmp_path)
    keys = [*HEADLINE, "gpu_hours", "n_steps"]
    for name in coefficient_names(calibs[1]):
        keys += [name, f"{name}.lower", f"{name}.upper"]
    assert {"beta1", "beta1.lower", "beta1.upper", "mape.train", "mape.validation"} <= set(keys)
    for key in keys:
        hist = sorted(c.get_metric_history(parent, key), key=lambda m: m.step)
        assert [m.step for m in hist] == [0, 1], key
        assert [m.value for m in hist] == [pytest.approx(c.get_run(r).data.metrics[key]) for r in children], key
    assert [m.value for m in sorted(c.get_metric_history(parent, "gpu_hours"), key=lambda m: m.step)] == [0.5, 1.0]
    b = calibs[1].beta
    assert c.get_run(parent).data.metrics["beta1.upper"] == pytest.approx(b.upper[b.names.index("beta1")])


def test_finish_campaign_logs_the_summary_once(store, calibs, tmp_path):
    """The summary has its own names (``summary.*``): no extra point on the per-iteration curves; finishing
    again (the same stop, or a resumed campaign stopping again without a new iteration) adds nothing."""
    _, ts = store
    c = ts.client
    parent, _ = _campaign(ts, "finish", calibs, tmp_path)
    summary = {"iterations": 2, "gpu_hours": 1.0, "converged": True, "note": "demo"}
    track.finish_campaign(ts, parent, stop_reason="converged", summary=summary)
    track.finish_campaign(ts, parent, stop_reason="converged", summary=summary)
    track.start_campaign(ts, "finish", params={})  # resumed ...
    track.finish_campaign(ts, parent, stop_reason="budget spent", summary=summary)  # ... and stopped again
    run = c.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["rooflab.stop_reason"] == "budget spent"
    assert run.data.tags["rooflab.summary.note"] == "demo" and run.data.tags["rooflab.summary.converged"] == "True"
    for key in ("summary.iterations", "summary.gpu_hours"):
        assert [(m.step, m.value) for m in c.get_metric_history(parent, key)] == [(1, float(summary[key[8:]]))]
    assert sorted(m.step for m in c.get_metric_history(parent, "gpu_hours")) == [0, 1]  # the curve, untouched


def test_experiment_opens_in_the_training_layout_with_the_saved_view(store, calibs, tmp_path):
    """MLflow 3.17.2 takes the layout from ``workflowType`` (URL, else the browser's last choice, GenAI by
    default): the link carries it; the experiment keeps its kind tag; rooflab's saved view is an experiment
    tag whose charts and columns are metrics the runs have."""
    _, ts = store
    c = ts.client
    parent, children = _campaign(ts, "view", calibs, tmp_path)
    exp = c.get_experiment(c.get_run(parent).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    envelope = json.loads(exp.tags[track.VIEW_TAG])
    assert envelope["name"] == track.VIEW_NAME and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["selectedColumns"][:3] == ["metrics.`mape.validation`", "metrics.`mape.train`", "metrics.`gpu_hours`"]
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "rooflab.role"}]
    parent_metrics = set(c.get_run(parent).data.metrics)
    charts = state["compareRunCharts"]
    assert all(set(ch["selectedMetricKeys"]) <= parent_metrics for ch in charts)  # no empty chart
    assert {"beta1", "beta1.lower", "beta1.upper"} == set(next(ch for ch in charts if ch["metricKey"] == "beta1")
                                                           ["selectedMetricKeys"])
    assert {ch["metricSectionId"] for ch in charts} == {s["uuid"] for s in state["compareRunSections"]}
    columns = {col.split("`")[1] for col in state["selectedColumns"]}
    assert columns <= set(c.get_run(children[0]).data.metrics)

    url = track.experiment_url(ts, "view", "http://127.0.0.1:5000")
    head, query = url.split("?")
    assert head == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
    assert urllib.parse.parse_qs(query) == {"workflowType": ["machine_learning"], "viewStateShareKey": [track.VIEW_ID],
                                            "compareRunsMode": ["CHART"]}
    assert "compareRunsMode" not in track.experiment_url(ts, "view", charts=False)
    created = envelope["createdAt"]
    track.save_view(ts, exp.experiment_id, ["beta1"])  # updated in place, created once
    assert json.loads(c.get_experiment(exp.experiment_id).tags[track.VIEW_TAG])["createdAt"] == created


def test_compare_view_axes_are_setup_and_headline_metric(store, calibs, tmp_path):
    """MLflow's compare view plots the first three params (by name) that differ between the runs and the first
    metric they share (in logging order): those are the data volume / fit setup and the held-out MAPE, not
    counts such as ``bootstrap.units``; the counts are metrics."""
    _, ts = store
    c = ts.client
    _, children = _campaign(ts, "compare", calibs, tmp_path)
    runs = [c.get_run(r) for r in children]
    params = [r.data.params for r in runs]
    differ = sorted(k for k in set().union(*params) if len({p.get(k) for p in params}) > 1)
    assert "data.steps" in differ
    assert not {"bootstrap.units", "data.runs", "data.steps_fit", "data.steps_validation"} & set().union(*params)
    shared = [k for k in runs[0].data.metrics if all(k in r.data.metrics for r in runs)]
    assert shared[0] == "mape.validation"  # the compare view's metric axis
    for r, calib in zip(runs, calibs):
        m = r.data.metrics
        assert m["n_runs"] >= len(calib.beta.runs) and m["n_bootstrap_units"] >= 1 and m["n_steps_validation"] > 0
