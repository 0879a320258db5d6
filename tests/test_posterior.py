"""Coefficients as distributions (issue 18): the step fit's linear posterior and its sufficient statistics, the
sequential update's equivalence with a full refit, serialization round trips, export / provenance ci95, and the
bootstrap posteriors of the request-level and summary-level fits."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from rooflab.errors import InputError
from rooflab.fit.beta import fit_beta
from rooflab.fit.calibration import Options, calibrate
from rooflab.fit.posterior import (
    FitState,
    coefficients_from_state,
    run_stats,
    solve_state,
    state_from_doc,
    training_rows,
    update_state,
)
from rooflab.model import export
from rooflab.model.arch import load_model
from rooflab.model.coefficients import Coefficients, coefficients_from_doc, load_coefficients
from rooflab.model.engine_config import EngineConfig
from rooflab.model.hardware import load_hardware
from rooflab.model.posterior import Posterior, posterior_from_doc
from rooflab.model.provenance import provenance_record
from rooflab.twin.engine import Engine, Request
from rooflab.twin.simulate import simulate
from rooflab.twin.truth import TruthModel

H100 = load_hardware("H100-SXM")
ENGINE = {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "max_model_len": 4096}
WORKLOADS = [(4, 300, 60), (12, 900, 120), (20, 1500, 80), (6, 2000, 40), (25, 200, 150), (10, 600, 200),
             (8, 1200, 90), (16, 400, 60)]


def _run(model: str, seed: int, rate: float, pmean: float, omean: float, duration: float = 12.0):
    rng = np.random.default_rng(seed)
    n = int(rate * duration)
    arr = np.cumsum(rng.exponential(1e6 / rate, n))
    p = np.clip(rng.lognormal(np.log(pmean), 0.5, n), 16, 3500).astype(int)
    o = np.clip(rng.lognormal(np.log(omean), 0.5, n), 2, 400).astype(int)
    arch = load_model(model)
    truth = TruthModel.from_config("H100-SXM", arch, 1, seed=seed)
    eng = Engine(arch, H100, 1, truth, EngineConfig(**ENGINE), seed=seed)
    sim = simulate(eng, [Request(f"r{i}", float(a), int(x), int(y)) for i, (a, x, y) in enumerate(zip(arr, p, o))],
                   overheads=truth, run_id=f"{model}-{seed}")
    return sim.steps.assign(split="train", workload="w"), sim.requests


@pytest.fixture(scope="module")
def data():
    runs = [_run(("llama-3.1-8b", "qwen2.5-7b")[i % 2], 40 + i, *w) for i, w in enumerate(WORKLOADS)]
    steps = pd.concat([s for s, _ in runs], ignore_index=True)
    requests = pd.concat([r for _, r in runs], ignore_index=True)
    return steps, requests


@pytest.fixture(scope="module")
def calib(data):
    steps, requests = data
    return calibrate(steps, requests, Options(n_boot=120, seed=1))


def test_the_posterior_is_centred_on_the_fit_and_close_to_the_run_bootstrap(calib):
    post = calib.posterior
    assert post is not None and calib.fit_state is not None
    names = calib.beta.names
    assert post.names == names + ["alpha0", "alpha1", "alpha2"]
    np.testing.assert_allclose(post.mean[:len(names)], calib.beta.beta)
    np.testing.assert_allclose(post.mean[len(names):], calib.alpha.alpha)
    assert "run-level sandwich over 8 runs" in post.method
    # the state alone reproduces the fit (the same solver on the summed Gram matrices)
    beta, alpha, _ = solve_state(calib.fit_state)
    np.testing.assert_allclose(beta, calib.beta.beta, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(alpha, calib.alpha.alpha, rtol=1e-9)
    # the sandwich (runs as the unit) is of the same size as the whole-run bootstrap: within a factor 3 for every
    # coefficient the data identify (both are estimates from 8 runs)
    boot = np.r_[calib.beta.draws.std(axis=0), calib.alpha.draws.std(axis=0)]
    for n, s, b in zip(post.names, post.sd, boot):
        if b > 1e-6 * max(1.0, abs(post.mean[post.index(n)])) and n not in calib.beta.ties:
            assert 1 / 3 < s / b < 3, (n, s, b)


def test_runs_not_steps_are_the_unit(data):
    """Steps of one run are correlated: the same rows labelled as one run give the i.i.d.-step posterior, far
    narrower than the run-level one — the sandwich sees the between-run dispersion."""
    steps, requests = data
    fit = calibrate(steps, requests, Options(n_boot=2, prior_strength=1e-3)).posterior
    one = steps.assign(run_id="all", step_id=np.arange(len(steps)))
    iid = calibrate(one, requests.assign(run_id="all"), Options(n_boot=2, prior_strength=1e-3)).posterior
    assert "i.i.d. steps" in iid.method and "sandwich" in fit.method
    k = fit.index("beta2")
    assert fit.sd[k] > 3 * iid.sd[k]


def test_sequential_update_equals_a_full_refit(data, calib):
    """Adding new runs' statistics to a parent's state gives the full refit's β, α and posterior at the same λ."""
    steps, requests = data
    lam = calib.beta.prior_strength
    runs = sorted(steps["run_id"].unique())
    old, new = runs[:5], runs[5:]
    parent = calibrate(steps[steps.run_id.isin(old)], requests[requests.run_id.isin(old)],
                       Options(n_boot=2, prior_strength=lam))
    X, y, rid = training_rows(steps[steps.run_id.isin(new)], parent.fit_state.variant, parent.fit_state.formulas,
                              parent.fit_state.fp8_peak)
    stats = run_stats(X, y, rid, requests[requests.run_id.isin(new)], runs=new)
    seq = update_state(parent.fit_state, stats, parent="rooflab.x/1")
    full = calibrate(steps, requests, Options(n_boot=2, prior_strength=lam))
    c_seq, c_full = coefficients_from_state(seq), full.coefficients()
    for n in c_full.beta:
        assert c_seq.beta[n] == pytest.approx(c_full.beta[n], rel=1e-7, abs=1e-9), n
    np.testing.assert_allclose(c_seq.alpha, c_full.alpha, rtol=1e-8)
    np.testing.assert_allclose(c_seq.posterior.cov, full.posterior.cov, rtol=1e-6,
                               atol=1e-9 * np.abs(full.posterior.cov).max())
    # and β equals fit_beta on all the rows directly
    direct = fit_beta(*training_rows(steps, seq.variant, seq.formulas, seq.fp8_peak), prior_strength=lam, n_boot=0)
    np.testing.assert_allclose([c_seq.beta[n] for n in direct.names], direct.beta, rtol=1e-7, atol=1e-9)
    # lineage: which runs, which parent
    assert [e["kind"] for e in seq.lineage] == ["full", "sequential"]
    assert seq.lineage[-1]["parent"] == "rooflab.x/1" and seq.lineage[-1]["runs_added"] == new
    assert c_seq.posterior.lineage["parent"] == "rooflab.x/1" and c_seq.posterior.lineage["added_runs"] == new
    with pytest.raises(InputError, match="already in the fit"):
        update_state(seq, stats[:1])


def test_fit_state_round_trips(calib):
    doc = json.loads(json.dumps(calib.fit_state.to_dict()))
    back = state_from_doc(doc, "state.json")
    assert isinstance(back, FitState) and back.form == calib.fit_state.form
    np.testing.assert_allclose(solve_state(back)[0], solve_state(calib.fit_state)[0])
    with pytest.raises(InputError, match="state.json: format"):
        state_from_doc({"format": "x"}, "state.json")
    doc["runs"][0]["gram"] = [[1.0]]
    with pytest.raises(InputError, match=r"runs\[0\].gram"):
        state_from_doc(doc, "state.json")


def test_coefficients_round_trip_with_their_posterior(calib, tmp_path):
    c = calib.coefficients()
    assert c.posterior is not None
    path = tmp_path / "c.json"
    path.write_text(json.dumps(c.to_dict()))
    back = load_coefficients(path)
    assert back.posterior is not None and back.posterior.names == c.posterior.names
    np.testing.assert_allclose(back.posterior.cov, c.posterior.cov)
    np.testing.assert_allclose(back.posterior.mean, c.posterior.mean)
    assert back.posterior.method == c.posterior.method
    # the fit result (`rooflab fit --out`) carries it too
    fit_doc = json.loads(json.dumps(calib.to_dict(), default=float))
    assert coefficients_from_doc(fit_doc, "fit.json").posterior is not None
    # a new value drops the posterior (it no longer describes the set); a source change keeps it
    assert c.with_values(beta={"beta1": 2.0}).posterior is None
    assert c.with_values(source="x").posterior is not None


def test_draws_respect_bounds_and_are_reproducible(calib):
    c = calib.coefficients()
    d1, d2 = c.draws(50, seed=3), c.draws(50, seed=3)
    assert [x.beta for x in d1] == [x.beta for x in d2]
    b = np.array([[x.beta[n] for n in c.beta] for x in d1])
    assert (b >= 0).all() and np.std(b[:, 0]) > 0
    a = np.array([x.alpha for x in d1])
    assert (a >= 0).all() and a[:, 0].std() > 0


@pytest.mark.parametrize("field,bad,needle", [
    ("cov", [[1.0, 2.0], [0.0, 1.0]], "not symmetric"),
    ("cov", [[-1.0, 0.0], [0.0, 1.0]], "negative variance"),
    ("mean", [1.0], "expected a list of 2 numbers"),
    ("names", [], "non-empty list"),
    ("discrepancy", {"ttft_p90": -1}, "standard deviation"),
])
def test_bad_posterior_is_one_line_naming_the_field(field, bad, needle):
    p = Posterior(["beta1", "beta2"], np.array([1.0, 1.0]), np.eye(2) * 0.01, "m", np.zeros(2), np.full(2, np.inf))
    doc = json.loads(json.dumps(p.to_dict()))
    assert posterior_from_doc(doc, "f.json").names == ["beta1", "beta2"]
    doc[field] = bad
    with pytest.raises(InputError, match=needle) as e:
        posterior_from_doc(doc, "f.json")
    assert str(e.value).startswith("f.json: posterior.") and "\n" not in str(e.value)


def test_a_posterior_naming_an_unknown_coefficient_is_refused(calib):
    doc = calib.coefficients().to_dict()
    doc["posterior"]["names"][0] = "beta99"
    with pytest.raises(InputError, match="posterior.names"):
        coefficients_from_doc(doc, "c.json")


def test_export_json_and_provenance_carry_ci95(calib):
    doc = calib.to_dict()
    j = export.to_json(doc)
    for n, c in j["beta"].items():
        assert c["ci95"] is not None and c["posterior_ci95"] is not None, n
        lo, hi = c["posterior_ci95"]
        assert lo <= c["value"] + 1e-9 and c["value"] <= hi + 1e-9
    assert j["alpha"]["coefficients"]["alpha0"]["posterior_ci95"] is not None
    assert j["posterior"]["kind"] == "gaussian" and len(j["posterior"]["cov"]) == len(j["posterior"]["names"])
    assert coefficients_from_doc(j, "export.json").posterior is not None  # the export reads back with it
    # the BLIS YAML keeps the point estimate only
    yaml_text = export.blis_yaml(doc)
    assert "posterior" not in yaml_text
    rec = provenance_record(doc)
    assert all("posterior_ci95" in c for c in rec["coefficients"] if c["method"] == "fitted")
    assert "sandwich" in rec["fit"]["posterior"]["method"]


def test_interval_and_ci95_shapes():
    p = Posterior(["a", "b"], np.array([1.0, 0.01]), np.diag([0.01, 1.0]), "m", np.zeros(2), np.full(2, np.inf))
    iv = p.interval(0.9)
    assert iv[0, 0] == pytest.approx(1 - 1.645 * 0.1, abs=1e-3) and iv[1, 0] == 0.0  # clipped at the bound
    d = Posterior(["a"], np.array([1.0]), np.eye(1), "m", np.zeros(1), np.full(1, np.inf),
                  draws=np.linspace(0, 2, 101)[:, None])
    assert d.kind == "draws" and d.interval(0.9)[0] == pytest.approx([0.1, 1.9])
    assert replace(d, draws=None).kind == "gaussian"


def test_coefficients_without_posterior_draw_the_point_estimate():
    c = Coefficients({"beta1": 1.0}, (1.0, 2.0, 3.0), "roofline7")
    assert all(x.beta == c.beta for x in c.draws(3))
