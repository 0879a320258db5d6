"""β/α fitting: recovery of known coefficients, intervals, prior behaviour, bounds."""

import numpy as np
import pandas as pd
import pytest

from rooflab.data.synthetic import TRUE_BETA, synthetic_steps, with_step_times
from rooflab.fit.beta import fit_alpha, fit_beta
from rooflab.fit.calibration import Options, calibrate
from rooflab.model.features import featurize
from rooflab.model.variants import get_variant


@pytest.fixture(scope="module")
def steps():
    return with_step_times(synthetic_steps())


def test_recovers_known_beta(steps):
    v = get_variant("roofline7")
    X = v.design_matrix(featurize(steps))
    fit = fit_beta(X, steps["step_time_us"], steps["run_id"], v, n_boot=50, seed=3)
    assert fit.unit_kind == "run" and fit.n_units == 12
    # β7 (400 µs) is ~1% of step time and shares the per-step constant with the all-reduce hop latency
    # inside f_tp at TP > 1, so the data pin it less tightly
    tolerance = {"beta7": 0.10}
    for name, b, lo, hi, truth in zip(fit.names, fit.beta, fit.lower, fit.upper, TRUE_BETA):
        assert b == pytest.approx(truth, rel=tolerance.get(name, 0.05)), name
        assert lo <= b <= hi and hi > lo  # a real interval around the estimate
    # relative-error weighting: errors are ~3% everywhere, so the in-sample MAPE is about the noise level
    rel = np.abs(X @ fit.beta / steps["step_time_us"] - 1)
    assert 0.015 < rel.mean() < 0.04


def test_bootstrap_intervals_cover_the_truth_at_about_their_level(steps):
    """Over 10 replicate data sets (new noise and run effects), the 90% whole-run bootstrap intervals
    must contain the true β most of the time: overall ≥ 75%, and no β below 50%."""
    v = get_variant("roofline7")
    X = v.design_matrix(featurize(steps))
    hits = []
    for rep in range(10):
        y = with_step_times(steps, seed=100 + rep)["step_time_us"]
        fit = fit_beta(X, y, steps["run_id"], v, n_boot=200, seed=rep)
        hits.append((fit.lower <= TRUE_BETA) & (TRUE_BETA <= fit.upper))
    hits = np.array(hits)
    assert hits.mean() >= 0.75, hits.mean(axis=0)
    assert hits.mean(axis=0).min() >= 0.5, hits.mean(axis=0)


def test_relative_weighting_keeps_small_steps_accurate(steps):
    """Big prefill steps must not drown small decode steps: decode-only error stays at the noise level."""
    v = get_variant("roofline7")
    X = v.design_matrix(featurize(steps))
    fit = fit_beta(X, steps["step_time_us"], steps["run_id"], v, n_boot=0)
    small = (steps["prefill_tokens"] == 0).to_numpy()
    rel = np.abs(X[small] @ fit.beta / steps["step_time_us"].to_numpy()[small] - 1)
    assert rel.mean() < 0.04


def test_prior_strength_has_an_effect_and_pins_unidentified_terms(steps):
    """The prior is in the units of the data term, so it acts (unlike a µs²-scaled λ): with all data
    from TP=1 runs, β5 has no data and sits at the prior; a strong prior pulls identified β toward 1."""
    tp1 = steps[steps["tp"] == 1]
    v = get_variant("roofline7")
    X = v.design_matrix(featurize(tp1))
    weak = fit_beta(X, tp1["step_time_us"], tp1["run_id"], v, prior_strength=1e-6, n_boot=0)
    strong = fit_beta(X, tp1["step_time_us"], tp1["run_id"], v, prior_strength=10.0, n_boot=0)
    assert weak.beta[4] == pytest.approx(1.0, abs=1e-6)  # β5: prior only
    assert weak.data_precision[4] == 0
    assert abs(strong.beta[0] - 1) < abs(weak.beta[0] - 1) - 0.2  # β1 (truth 1.6) pulled toward 1


def test_auto_prior_is_chosen_on_held_out_runs(steps):
    v = get_variant("roofline7")
    X = v.design_matrix(featurize(steps))
    fit = fit_beta(X, steps["step_time_us"], steps["run_id"], v, prior_strength="auto", n_boot=0)
    scores = fit.prior_selection["scores"]
    assert fit.prior_selection["method"].startswith("leave-one-run-out")
    assert min(scores, key=scores.get) == str(fit.prior_strength)
    assert scores["0.1"] > scores[str(fit.prior_strength)]  # a too-strong prior is worse on held-out runs


def test_coefficients_respect_bounds():
    """Data generated with a negative per-request cost cannot produce β6 < 0."""
    steps = synthetic_steps(n_runs=6, steps_per_run=200)
    truth = np.array([1.5, 1.2, 0.9, 1.0, 2.0, -40.0, 400.0])
    steps = with_step_times(steps, truth, noise=0.01)
    steps = steps[steps["step_time_us"] > 0]
    v = get_variant("roofline7")
    fit = fit_beta(v.design_matrix(featurize(steps)), steps["step_time_us"], steps["run_id"], v, n_boot=20)
    assert fit.beta[5] == 0.0
    assert (fit.draws >= 0).all()


def test_block_bootstrap_when_few_runs(steps):
    few = steps[steps["run_id"].isin(["run00", "run01"])]
    v = get_variant("roofline7")
    fit = fit_beta(v.design_matrix(featurize(few)), few["step_time_us"], few["run_id"], v, n_boot=50)
    assert fit.unit_kind == "block" and fit.n_units > 2
    assert set(fit.loro) == {"run00", "run01"}


def test_layers_variant_adds_one_term_without_forking_the_fit(steps):
    v = get_variant("roofline7+layers")
    assert v.names[-1] == "beta_layer" and v.names[:7] == get_variant("roofline7").names
    truth = np.r_[TRUE_BETA, 30.0]
    s = with_step_times(steps, truth, variant="roofline7+layers")
    fit = fit_beta(v.design_matrix(featurize(s)), s["step_time_us"], s["run_id"], v, n_boot=0)
    assert fit.beta[7] == pytest.approx(30.0, rel=0.2)
    assert fit.beta[0] == pytest.approx(1.6, rel=0.05)


def test_empty_fit_is_a_clear_error():
    from rooflab.errors import InputError

    v = get_variant("roofline7")
    with pytest.raises(InputError, match="no usable steps"):
        fit_beta(np.zeros((0, 7)), np.zeros(0), np.array([]), v)


def _requests(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    nout = rng.integers(1, 1024, n).astype(float)
    arrived = np.cumsum(rng.exponential(1e4, n))
    queued = arrived + rng.normal(15000, 800, n)
    finished = queued + 1e6
    departed = finished + 800 + 45 * nout + rng.normal(0, 200, n)
    return pd.DataFrame({"run_id": np.repeat([f"r{i}" for i in range(6)], n // 6),
                         "request_id": np.arange(n).astype(str),
                         "arrived_us": arrived, "queued_us": queued, "finished_us": finished, "departed_us": departed,
                         "prompt_tokens": 100.0, "output_tokens": nout})


def test_alpha_recovers_request_overheads():
    a = fit_alpha(_requests(), n_boot=100)
    assert a.alpha[0] == pytest.approx(15000, rel=0.02)
    assert a.alpha[1] == pytest.approx(800, abs=60)
    assert a.alpha[2] == pytest.approx(45, rel=0.05)
    assert (a.lower <= a.alpha).all() and (a.alpha <= a.upper).all()


def test_alpha_is_non_negative_and_reports_missing_timestamps():
    r = _requests()
    r["departed_us"] = r["finished_us"] - 10.0  # clock skew: negative overheads
    a = fit_alpha(r, n_boot=10)
    assert (a.alpha >= 0).all()
    missing = fit_alpha(r.drop(columns=["queued_us"]))
    assert missing.alpha is None and "timestamps" in missing.reason


def test_calibrate_holds_out_validation_runs_and_routes_saturation(steps):
    s = steps.copy()
    s["split"] = np.where(s["run_id"].isin(["run10", "run11"]), "validation", "train")
    s.loc[s.index[:50], "kv_usage"] = 0.97
    s.loc[s.index[50:60], "preemptions"] = 1
    c = calibrate(s, options=Options(n_boot=20))
    t = c.routing["total"]
    assert t["saturated"] == 60 and t["saturated_kv_usage"] == 50 and t["saturated_preemption"] == 10
    assert t["fit"] == len(s) - 60 - 1200
    assert set(c.accuracy) == {"train", "validation", "saturated"}
    assert c.accuracy["validation"]["mape"] < 0.06
    assert "run10" not in c.beta.runs


def test_proportional_prior_free_terms_are_tied_explicitly():
    """One layer count in the data: β7 and β_layer·L are the same column up to a factor. The fit must not
    let the solver split them arbitrarily: β7 is held at 0, β_layer carries the effect, and it says so."""
    from rooflab.fit.health import check_health

    steps = synthetic_steps(n_runs=6, steps_per_run=300, settings=(("llama-3.1-8b", 1), ("llama-3.1-8b", 2)))
    truth = np.r_[TRUE_BETA[:6], 320.0, 0.0]  # only a per-step constant, 320 µs = 10 µs × 32 layers
    steps = with_step_times(steps, truth, variant="roofline7+layers")
    v = get_variant("roofline7+layers")
    X = v.design_matrix(featurize(steps))
    fit = fit_beta(X, steps["step_time_us"], steps["run_id"], v, n_boot=20)
    assert fit.ties == {"beta7": "beta_layer"}
    assert fit.beta[6] == 0 and (fit.draws[:, 6] == 0).all()
    assert fit.beta[7] * 32 == pytest.approx(320, rel=0.1)
    checks = check_health(fit, X, steps["step_time_us"].to_numpy())
    assert any(c.check == "proportional terms" and c.status == "warn" for c in checks)
    assert not any(c.target == "beta7" and c.check == "draws pinned at 0" for c in checks)
    # with two layer counts the terms separate and nothing is tied
    mixed = synthetic_steps(n_runs=6, steps_per_run=300, settings=(("llama-3.1-8b", 1), ("llama-3.1-70b", 4)))
    mixed = with_step_times(mixed, np.r_[TRUE_BETA, 5.0], variant="roofline7+layers")
    fit2 = fit_beta(v.design_matrix(featurize(mixed)), mixed["step_time_us"], mixed["run_id"], v, n_boot=0)
    assert fit2.ties == {}


def test_route_steps_on_constructed_steps():
    from rooflab.data.saturation import route_steps

    steps = pd.DataFrame({"kv_usage": [0.5, 0.951, 0.95, np.nan, 0.2], "preemptions": [0, 0, 0, 2, 1]})
    r = route_steps(steps)
    assert r.saturated.tolist() == [False, True, False, True, True]
    assert r.counts() == {"steps": 5, "unsaturated": 2, "saturated": 3, "saturated_kv_usage": 1,
                          "saturated_preemption": 2}


def test_calibrating_no_steps_is_a_clear_error():
    from rooflab.errors import InputError

    with pytest.raises(InputError, match="no steps to calibrate"):
        calibrate(pd.DataFrame(), options=Options(n_boot=0))
