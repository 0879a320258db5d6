"""MLflow tracking (tracking/), coefficient export (rooflab/model/export.py) and their CLI commands."""

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tasks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from cli.main import main  # noqa: E402
from rooflab.data.sweep import SweepPoint  # noqa: E402
from rooflab.data.synthetic import synthetic_steps, with_step_times  # noqa: E402
from rooflab.errors import InputError  # noqa: E402
from rooflab.fit.calibration import Options, calibrate  # noqa: E402
from rooflab.model import export  # noqa: E402
from rooflab.targeting.candidates import Pick  # noqa: E402
from rooflab.targeting.stop import StopDecision  # noqa: E402
from tracking import campaign_runs as track  # noqa: E402
from tracking.compare import compare  # noqa: E402
from tracking.metrics import metric_key  # noqa: E402
from tracking.store import open_tracking, tracking_uri  # noqa: E402

BLIS_DEFAULTS = ROOT.parent / "shared" / "data/real/blis/defaults.yaml"


@pytest.fixture(scope="module")
def steps():
    s = with_step_times(synthetic_steps(n_runs=6, steps_per_run=150))
    s["split"] = "train"
    s.loc[s["run_id"].isin(["run04", "run05"]), "split"] = "validation"
    return s


@pytest.fixture(scope="module")
def calib(steps, tmp_path_factory):
    return calibrate(steps, None, Options(variant="roofline7", n_boot=20), plots_dir=tmp_path_factory.mktemp("plots"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking") / "mlruns"
    return root, open_tracking(root)


PICK = Pick(SweepPoint("llama-3.1-8b", 2, "H100-SXM", "W3", (("rate", 8.0),)), "D-optimal gain 0.8/GPU-s", "beta5",
            240.0, 1.0)


def _log(ts, parent, it, calib, tmp_path, **kw):
    args = dict(picks=[PICK], gpu_seconds=1800.0 * (it + 1), stop=StopDecision(False, "β5 CV 41% > 30%", {}),
                artifacts_dir=tmp_path / "artifacts")
    args.update(kw)
    return track.log_iteration(ts, parent, it, calib, **args)


# ---------------------------------------------------------------------------------------------------
# tracking


def test_tracking_uri_is_sqlite_under_root(tmp_path):
    uri = tracking_uri(tmp_path / "mlruns")
    assert uri == f"sqlite:///{(tmp_path / 'mlruns').resolve()}/mlflow.db"


def test_start_campaign_twice_gives_one_parent(store):
    root, ts = store
    client = ts.client
    p1 = track.start_campaign(ts, "resume", params={"budget_gpu_hours": 9.5, "design": {"points": 99}})
    track.finish_campaign(ts, p1, stop_reason="interrupted", summary={}, status="KILLED")
    p2 = track.start_campaign(ts, "resume", params={"budget_gpu_hours": 12, "seed": 3})
    assert p1 == p2
    run = client.get_run(p1)
    assert run.info.status == "RUNNING"
    assert run.data.tags["rooflab.role"] == "campaign"
    assert run.data.params["budget_gpu_hours"] == "9.5" and run.data.params["design.points"] == "99"
    assert run.data.params["seed"] == "3"
    assert run.data.tags["rooflab.resume.changed_params"] == "budget_gpu_hours"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "rooflab/resume"
    assert exp.artifact_location.startswith((root.resolve() / "artifacts").as_uri())


def test_log_iteration_is_idempotent_and_complete(store, calib, tmp_path):
    _, ts = store
    client = ts.client
    parent = track.start_campaign(ts, "iter", params={})
    c0 = _log(ts, parent, 0, calib, tmp_path)
    assert _log(ts, parent, 0, calib, tmp_path, gpu_seconds=99.0) == c0  # nothing logged the second time
    assert track.logged_iterations(ts, parent) == {0: c0}
    run = client.get_run(c0)
    assert run.info.status == "FINISHED"
    t, m, p = run.data.tags, run.data.metrics, run.data.params
    assert t["mlflow.parentRunId"] == parent and t["rooflab.iteration"] == "0"
    assert t["rooflab.stop_reason"] == "β5 CV 41% > 30%" and t["rooflab.stop"] == "false"
    assert t["rooflab.health"] in ("pass", "warn", "fail")
    # metrics: every β with its interval and CV, accuracy per split, buckets, budget
    b = calib.beta
    for j, name in enumerate(b.names):
        assert m[name] == pytest.approx(b.beta[j])
        assert m[f"{name}.lower"] == pytest.approx(b.lower[j]) and m[f"{name}.upper"] == pytest.approx(b.upper[j])
        assert f"{name}.cv" in m
    assert m["mape.train"] == pytest.approx(calib.accuracy["train"]["mape"])
    assert m["mape.validation"] == pytest.approx(calib.accuracy["validation"]["mape"])
    assert "median_ape.validation" in m and "condition_number" in m
    assert m["gpu_hours"] == pytest.approx(0.5) and m["n_picks"] == 1 and "hotspots" in m
    assert "mape.model.llama-3.1-8b" in m and "mape.context.lt512" in m
    assert any(k.startswith("mape.validation.model.") for k in m)
    assert not any(k.startswith("mape.run_id") for k in m)
    assert p["variant"] == "roofline7" and p["formulas"] == "vllm" and p["data.steps"] == "900"
    assert float(p["prior_strength"]) == pytest.approx(b.prior_strength)
    assert p["bootstrap.draws"] == "20" and p["data.requests"] == "0"
    # artifacts
    names = {a.path for a in client.list_artifacts(c0)}
    assert {"coefficients.json", "blis_coefficients.yaml", "health.json", "health_report.txt",
            "residual_buckets.csv", "next_points.json", "plots"} <= names
    assert {a.path for a in client.list_artifacts(c0, "plots")} == {f"plots/{q.name}" for q in calib.plots}
    local = tmp_path / "artifacts" / "iteration_000"
    picks = json.loads((local / "next_points.json").read_text())
    assert picks["picks"][0]["reason"].startswith("D-optimal")
    assert yaml.safe_load((local / "blis_coefficients.yaml").read_text()) == export.to_blis(calib.to_dict())
    # the parent carries the per-iteration summary
    assert client.get_run(parent).data.metrics["gpu_hours"] == pytest.approx(0.5)


def test_half_logged_iteration_is_replaced(store, calib, tmp_path):
    _, ts = store
    client = ts.client
    parent = track.start_campaign(ts, "crash", params={})
    exp_id = client.get_run(parent).info.experiment_id
    stale = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "rooflab.role": "iteration",
                                            "rooflab.iteration": "0"}).info.run_id  # crashed mid-logging
    assert track.logged_iterations(ts, parent) == {}
    c0 = _log(ts, parent, 0, calib, tmp_path)
    assert c0 != stale and track.logged_iterations(ts, parent) == {0: c0}
    assert client.get_run(stale).info.lifecycle_stage == "deleted"


def test_compare_one_row_per_iteration(store, calib, tmp_path, capsys):
    root, ts = store
    client = ts.client
    a = track.start_campaign(ts, "cmp-a", params={})
    for it in range(2):
        _log(ts, a, it, calib, tmp_path / "a")
    track.finish_campaign(ts, a, stop_reason="converged: all checks pass", summary={"iterations": 2})
    b = track.start_campaign(ts, "cmp-b", params={})
    _log(ts, b, 0, calib, tmp_path / "b", stop=StopDecision(True, "budget spent", {}))

    df = compare(ts, ["cmp-a", "cmp-b"])
    assert list(zip(df.campaign, df.iteration)) == [("cmp-a", 0), ("cmp-a", 1), ("cmp-b", 0)]
    assert {"beta1", "beta1.lower", "beta1.upper", "beta7", "mape.validation", "gpu_hours",
            "stop_reason"} <= set(df.columns)
    assert df["gpu_hours"].tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert df["beta1"].iloc[0] == pytest.approx(calib.beta.beta[0])
    assert df["stop_reason"].tolist()[1:] == ["β5 CV 41% > 30%", "budget spent"]
    assert (compare(ts, ["cmp-b"]).campaign == "cmp-b").all()
    assert len(compare(ts)) >= 3
    with pytest.raises(InputError, match="no campaign 'nope'"):
        compare(ts, ["nope"])
    assert client.get_run(a).info.status == "FINISHED"
    assert client.get_run(a).data.tags["rooflab.stop_reason"] == "converged: all checks pass"

    assert main(["compare", "cmp-a", "cmp-b", "--mlruns", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cmp-a" in out and "budget spent" in out and f"{calib.beta.beta[0]:.3g} [" in out
    assert main(["compare", "cmp-a", "--mlruns", str(root), "--json"]) == 0
    assert [r["iteration"] for r in json.loads(capsys.readouterr().out)] == [0, 1]


def test_log_refit_is_a_separate_run(store, calib, tmp_path):
    _, ts = store
    client = ts.client
    parent = track.start_campaign(ts, "refit", params={})
    _log(ts, parent, 0, calib, tmp_path)
    rid = track.log_refit(ts, "refit", calib, artifacts_dir=tmp_path / "work", reason="data arrived")
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["rooflab.role"] == "refit"
    assert run.data.tags["rooflab.reason"] == "data arrived" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.metrics["beta1"] == pytest.approx(calib.beta.beta[0]) and "gpu_hours" not in run.data.metrics
    assert "blis_coefficients.yaml" in {a.path for a in client.list_artifacts(rid)}
    assert list(track.logged_iterations(ts, parent)) == [0]
    assert compare(ts, ["refit"])["iteration"].tolist() == [0]


def test_compare_cli_missing_store(tmp_path, capsys):
    assert main(["compare", "--mlruns", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no MLflow store" in err and "\n" not in err
    assert not (tmp_path / "none").exists()


def test_metric_key_sanitizes():
    assert metric_key("mape", "context", "<512") == "mape.context.lt512"
    assert metric_key("mape", "context", ">=8K") == "mape.context.ge8K"
    assert metric_key("mape", "batch_size", ">256") == "mape.batch_size.gt256"
    assert metric_key("mape", "model", "org/model:v1") == "mape.model.org_model_v1"


# ---------------------------------------------------------------------------------------------------
# export


def test_to_blis_has_blis_layout(calib):
    out = export.to_blis(calib)
    if BLIS_DEFAULTS.is_file():
        ref = yaml.safe_load(BLIS_DEFAULTS.read_text())[export.BLIS_KEY]
        assert set(out) == {export.BLIS_KEY}
        assert set(out[export.BLIS_KEY]) == set(ref)
        for k in ref:
            assert len(out[export.BLIS_KEY][k]) == len(ref[k]), k
    layout = out[export.BLIS_KEY]
    assert len(layout["alpha_coeffs"]) == 3 and len(layout["beta_coeffs"]) == 11
    beta = dict(zip(calib.beta.names, calib.beta.beta))
    bc = layout["beta_coeffs"]
    assert bc[0] == bc[8] == pytest.approx(beta["beta1"])  # β1a, β1b
    assert bc[1] == bc[9] == pytest.approx(beta["beta2"])  # β2a, β2b
    # vllm formulas: rooflab's all-reduce is over the link, BLIS's over HBM -> β4 = β5 × HBM / link (H100: 7.44)
    assert calib.beta.formulas == "vllm"
    assert bc[2] == pytest.approx(beta["beta3"]) and bc[3] == pytest.approx(beta["beta5"] * 3350 / 450)
    assert bc[10] == pytest.approx(bc[3])  # β_EP copies the TP-comm β
    design = calib.to_dict()
    design["beta"] = {**design["beta"], "formulas": "design"}
    assert export.to_blis(design)[export.BLIS_KEY]["beta_coeffs"][3] == pytest.approx(beta["beta5"])
    assert "has no BLIS slot and is left out" in export.blis_yaml(calib)
    assert bc[4] == 0.0 and bc[7] == 0.0  # no per-layer term in roofline7; β8 unmapped
    assert bc[5] == pytest.approx(beta["beta6"]) and bc[6] == pytest.approx(beta["beta7"])
    assert layout["alpha_coeffs"] == [0.0, 0.0, 0.0]  # α not fitted
    assert export.to_blis(calib.to_dict()) == out  # one implementation: object and dict agree
    assert [r["blis"] for r in export.blis_mapping()] == ["β1a", "β2a", "β3", "β4", "β5", "β6", "β7", "β8",
                                                          "β1b", "β2b", "β_EP"]


def test_blis_yaml_round_trips_with_comments(calib, tmp_path):
    p = export.write_blis(calib, tmp_path / "blis.yaml")
    text = p.read_text()
    assert yaml.safe_load(text) == export.to_blis(calib)
    assert "approximation" in text and "NOT FITTED" in text and "beta4" in text


def test_to_blis_layers_variant_and_alpha(calib):
    doc = json.loads(json.dumps(calib.to_dict(), default=float))
    doc["beta"]["coefficients"]["beta_layer"] = {"value": 31.5, "lower": 30.0, "upper": 33.0, "unit": "µs/layer"}
    doc["alpha"] = {"fitted": True, "n_requests": 10, "coefficients": {
        n: {"value": v, "lower": v, "upper": v, "unit": "µs"} for n, v in
        (("alpha0", 15563.2), ("alpha1", 777.3), ("alpha2", 45.9))}}
    layout = export.to_blis(doc)[export.BLIS_KEY]
    assert layout["beta_coeffs"][4] == 31.5
    assert layout["alpha_coeffs"] == [15563.2, 777.3, 45.9]


def test_to_json_document(calib):
    j = export.to_json(calib, context={"hardware": "H100-SXM"})
    json.dumps(j, allow_nan=False)
    assert j["variant"] == "roofline7" and j["formulas"] == "vllm" and j["interval"] == 0.9
    assert j["beta"]["beta1"]["value"] == pytest.approx(calib.beta.beta[0])
    assert j["beta"]["beta1"]["lower"] <= j["beta"]["beta1"]["value"] <= j["beta"]["beta1"]["upper"]
    assert j["beta"]["beta1"]["feature"] == "f_prefill" and "beta1·f_prefill" in j["step_time_formula"]
    assert j["alpha"]["fitted"] is False
    assert j["context"]["hardware"] == "H100-SXM" and "llama-3.1-8b" in j["context"]["models"]
    assert j["data"]["steps"] == 900 and j["data"]["runs"] == 6 and j["data"]["steps_held_out_validation"] == 300
    assert j["accuracy"]["validation"]["mape"] > 0


def test_export_cli_end_to_end(steps, tmp_path, capsys):
    parquet = tmp_path / "steps.parquet"
    steps[steps["run_id"].isin(["run00", "run01", "run02"])].drop(columns=["split"]).to_parquet(parquet)
    fit_json = tmp_path / "fit.json"
    assert main(["fit", "--steps", str(parquet), "--variant", "roofline7", "--boot", "5", "--out", str(fit_json)]) == 0
    blis = tmp_path / "out" / "blis.yaml"
    assert main(["export", "--fit", str(fit_json), "--format", "blis", "--out", str(blis),
                 "--hardware", "H100-SXM"]) == 0
    captured = capsys.readouterr()
    assert "α was not fitted" in captured.err
    doc = yaml.safe_load(blis.read_text())
    fit = json.loads(fit_json.read_text())
    assert doc == export.to_blis(fit)
    assert len(doc[export.BLIS_KEY]["beta_coeffs"]) == 11
    assert doc[export.BLIS_KEY]["beta_coeffs"][0] == pytest.approx(fit["beta"]["coefficients"]["beta1"]["value"])
    assert "hardware: H100-SXM" in blis.read_text()
    coeffs = tmp_path / "coefficients.json"
    assert main(["export", "--fit", str(fit_json), "--format", "json", "--out", str(coeffs)]) == 0
    j = json.loads(coeffs.read_text())
    assert j["format"] == export.FORMAT and set(j["beta"]) == set(fit["beta"]["coefficients"])


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ("this is not json {", "not JSON"),
    ('{"beta": {"coefficients": {}}}', "beta.coefficients"),
    ('[1, 2, 3]', "not a rooflab fit result"),
], ids=["missing", "garbage", "no-coefficients", "wrong-shape"])
def test_export_cli_bad_fit_file(tmp_path, capsys, content, needle):
    p = tmp_path / "fit.json"
    if content is not None:
        p.write_text(content)
    assert main(["export", "--fit", str(p), "--format", "blis", "--out", str(tmp_path / "o.yaml")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error:") and str(p) in lines[0] and needle in lines[0], lines
    assert not (tmp_path / "o.yaml").exists()


def test_export_cli_bad_format(tmp_path, capsys):
    assert main(["export", "--fit", str(tmp_path / "x.json"), "--format", "csv"]) == 2
    assert "--format" in capsys.readouterr().err
