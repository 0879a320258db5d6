"""The refit flow with the model registry, end to end under Prefect (issue 18): a first full fit becomes the
champion; runs that arrive later update its posterior sequentially (the same answer as a full refit on all runs at
the same λ) and the update is promoted; runs from a throttled GPU (every step 60% slower) arrive next, and the
update they cause — worse on the held-out runs — is registered as challenger and refused; ``rooflab compare
--baseline champion`` shows both sets side by side."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect_harness import bounded_prefect_harness  # noqa: E402

from rooflab.collect.collector import collect  # noqa: E402
from rooflab.collect.launchers.direct import DirectLauncher  # noqa: E402
from rooflab.collect.spec import load_campaign  # noqa: E402
from rooflab.data.store import Store  # noqa: E402
from rooflab.fit.calibration import Options  # noqa: E402
from tasks.analyze import calibrate_from_store  # noqa: E402
from tracking.registry import CHALLENGER, CHAMPION, campaign_scope, load_version, registered_name  # noqa: E402
from tracking.store import open_tracking  # noqa: E402

pytestmark = pytest.mark.slow

CAMPAIGN = """
name: regtest
hardware: H100-SXM
models:
  - {model: llama-3.1-8b, tp: 1}
validation:
  models:
    - {model: qwen2.5-7b, tp: 1}
  points:
    - {family: W3, rate: [1, 8]}
    - {family: W1, input_tokens: 1024}
families:
  W1: {input_tokens: [128, 1024, 2048], output_tokens: 1, rate: 1}
  W3: {rate: [1, 4, 8], input_tokens: 256, output_tokens: 64}
duration_s: 10
engine: {max_model_len: 4096}
budget_gpu_hours: 0.1
collection: {concurrency: 1, max_retries: 1, timeout_s: 300}
endpoint: {kind: twin, accel: 10}
loop: {n_boot: 20}
"""


@pytest.fixture(scope="module", autouse=True)
def harness(tmp_path_factory):
    with bounded_prefect_harness(tmp_path_factory.mktemp("prefect-home")):
        yield


class ThrottledLauncher(DirectLauncher):
    """A GPU running 60% slow (thermal throttling, a noisy neighbour): every step it records is slower."""

    def run(self, point, rd):
        res = super().run(point, rd)
        res.steps = res.steps.assign(step_time_us=res.steps["step_time_us"] * 1.6)
        return res


def _collect(store: Path, spec: Path, keep, launcher=None, replicates: int = 1) -> list[str]:
    camp = load_campaign(str(spec))
    points = [p for p in camp.design("candidates") if keep(p)]
    collect(Store(store), launcher or DirectLauncher(), camp.name, points, replicates=replicates)
    return [p.key for p in points]


def test_refit_flow_promotes_an_update_and_refuses_a_worse_refit(tmp_path, capsys):
    from cli.main import main
    from flows.refit import refit_flow

    spec = tmp_path / "regtest.yaml"
    spec.write_text(CAMPAIGN)
    store, mlruns = tmp_path / "store", tmp_path / "mlruns"

    def late(p):  # the runs that arrive after the first refit
        return p.family == "W3" and p.split == "train" and dict(p.params).get("rate") in (4.0, 8.0)

    _collect(store, spec, lambda p: not late(p))
    # 1. first refit: full fit, no champion yet -> promoted
    r1 = refit_flow(campaign=str(spec), store=str(store), mlruns=str(mlruns), reason="first data")
    assert r1["kind"] == "full" and r1["decision"]["decision"] == "promoted" and r1["version"] == "1"
    ts = open_tracking(mlruns)
    name = registered_name(campaign_scope(store, "regtest"))
    assert r1["registered_model"] == name and name.startswith("rooflab.H100-SXM.llama-3.1-8b.")
    v1 = load_version(ts, name, CHAMPION)
    assert v1 is not None and v1.version == "1" and v1.coefficients.posterior is not None and v1.state is not None

    # 2. new runs arrive: a sequential update of the champion's posterior, promoted
    _collect(store, spec, late)
    r2 = refit_flow(campaign=str(spec), store=str(store), mlruns=str(mlruns), reason="data arrived")
    assert r2["kind"] == "sequential" and r2["version"] == "2" and len(r2["runs_added"]) == 2, r2["runs_added"]
    assert r2["decision"]["decision"] == "promoted", r2["decision"]
    v2 = load_version(ts, name, CHAMPION)
    assert v2.version == "2" and v2.tags["rooflab.parent"] == f"{name}/1"
    assert [e["kind"] for e in v2.state.lineage] == ["full", "sequential"]
    assert v2.state.lineage[-1]["parent"] == f"{name}/1"
    assert v2.coefficients.posterior.lineage["parent"] == f"{name}/1"
    # the registered posterior carries the model-discrepancy term (leave-one-run-out residuals of its training runs)
    assert set(v2.coefficients.posterior.discrepancy) >= {"ttft_p90", "e2e_mean"}
    assert "leave-one-run-out" in v2.coefficients.posterior.discrepancy_source
    # the version's provenance record carries each coefficient's posterior ci95 and the lineage
    prov = json.loads(Path(ts.client.download_artifacts(v2.run_id, "model/artifacts/provenance.json",
                                                        str(tmp_path / "prov"))).read_text())
    assert all(c.get("posterior_ci95") for c in prov["coefficients"] if c["method"] == "fitted")
    assert prov["lineage"][-1]["parent"] == f"{name}/1" and prov["scope"]["models"] == ["llama-3.1-8b"]
    # the interval pictures are MLflow artifacts of the refit's run
    arts = {a.path for a in ts.client.list_artifacts(r2["mlflow_run_id"], "intervals")}
    assert {"intervals/calibration.png", "intervals/pred_vs_measured.png", "intervals/coverage.json"} <= arts
    # ... the same answer as a full refit on all runs at the champion's λ
    lam = v1.state.prior_strength
    full = calibrate_from_store.fn(str(store), "regtest", Options(n_boot=2, prior_strength=lam))
    for n, v in full.coefficients().beta.items():
        assert v2.coefficients.beta[n] == pytest.approx(v, rel=1e-6, abs=1e-9), n
    np.testing.assert_allclose(v2.coefficients.alpha, full.coefficients().alpha, rtol=1e-6)
    # nothing new: nothing to do
    r_none = refit_flow(campaign=str(spec), store=str(store), mlruns=str(mlruns), reason="duplicate event")
    assert r_none["kind"] == "none" and r_none["version"] is None

    # 3. runs from a throttled GPU arrive: the sequential update they cause is worse on the held-out runs —
    #    registered as challenger, refused; the champion stays
    _collect(store, spec, late, ThrottledLauncher(), replicates=2)
    r3 = refit_flow(campaign=str(spec), store=str(store), mlruns=str(mlruns), reason="data arrived (throttled)")
    assert r3["kind"] == "sequential" and r3["version"] == "3" and len(r3["runs_added"]) == 2
    assert r3["decision"]["decision"] == "refused", r3["decision"]
    assert r3["decision"]["ci"][0] > 0 and r3["decision"]["n_runs"] == 6
    assert load_version(ts, name, CHAMPION).version == "2"
    assert load_version(ts, name, CHALLENGER).version == "3"
    mv = ts.client.get_model_version(name, "3")
    assert mv.tags["rooflab.promotion"] == "refused" and mv.tags["rooflab.champion_before"] == f"{name}/2"
    # the decision and its before/after table are logged in the refit's run
    arts = {a.path for a in ts.client.list_artifacts(r3["mlflow_run_id"], "promotion")}
    assert {"promotion/promotion.json", "promotion/promotion.md"} <= arts
    run = ts.client.get_run(r3["mlflow_run_id"])
    assert run.data.tags["rooflab.promotion"] == "refused" and "promotion.ci_low" in run.data.metrics
    # the pyfunc flavour predicts step time from a batch table
    import mlflow.pyfunc

    local = ts.client.download_artifacts(v2.run_id, "model", str(tmp_path / "dl"))
    model = mlflow.pyfunc.load_model(local)
    steps = Store(store).steps(campaign="regtest", statuses=("ok",)).head(50)
    pred = np.asarray(model.predict(steps))
    assert pred.shape == (50,) and np.isfinite(pred).all() and (pred > 0).all()

    # 4. `rooflab compare --baseline champion` shows before/after on the same held-out runs
    assert main(["compare", "regtest", "--baseline", "champion", "--candidate", "challenger", "--store", str(store),
                 "--mlruns", str(mlruns), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["baseline"].startswith(f"{name}/2") and doc["candidate"].startswith(f"{name}/3")
    assert doc["decision"]["decision"] == "refused" and len(doc["per_metric"]) == 18
    assert main(["compare", "regtest", "--baseline", "1", "--store", str(store), "--mlruns", str(mlruns)]) == 0
    out = capsys.readouterr().out
    assert "after − before" in out and "held-out data: 6 validation run(s)" in out
    assert main(["compare", "regtest", "--baseline", "7", "--store", str(store), "--mlruns", str(mlruns)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such registered version" in err[0]

    # 5. the champion's intervals on a held-out run, straight from the registry (coefficients + discrepancy)
    held = Store(store).runs(campaign="regtest", split="validation")["run_id"].iloc[0]
    assert main(["replay", "--coefficients", f"models:/{name}@champion", "--mlruns", str(mlruns), "--requests",
                 str(store / "runs" / held), "--interval", "0.9", "--draws", "4", "--slo", "e2e_p99=60s"]) == 0
    out = capsys.readouterr().out
    assert "covers: model-form error" in out and f"SLO e2e_p99 ≤ 60000 ms on {held}" in out
