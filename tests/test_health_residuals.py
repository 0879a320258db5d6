"""Health checks flag what they must (collinearity, prior-only β, out-of-range β) and stay quiet on a
well-posed design; residual buckets, hotspots, influence and plots."""

import numpy as np
import pandas as pd
import pytest

from rooflab.data.synthetic import synthetic_steps, with_step_times
from rooflab.fit.beta import fit_beta
from rooflab.fit.calibration import Options, calibrate
from rooflab.fit.health import FAIL, PASS, check_health, overall
from rooflab.fit.residuals import HOTSPOT_MAPE, bucket_table
from rooflab.model.features import featurize
from rooflab.model.variants import get_variant


def _status(checks, check, target):
    found = [c for c in checks if c.check == check and c.target == target]
    assert found, f"no {check} check for {target}"
    return found[0].status


def _fit_and_check(steps, variant="roofline7", n_boot=100, **kw):
    v = get_variant(variant)
    X = v.design_matrix(featurize(steps))
    y = steps["step_time_us"].to_numpy()
    fit = fit_beta(X, y, steps["run_id"], v, n_boot=n_boot, **kw)
    return fit, check_health(fit, X, y)


@pytest.fixture(scope="module")
def good():
    return with_step_times(synthetic_steps())


def test_well_posed_design_passes_identifiability_checks(good):
    fit, checks = _fit_and_check(good)
    for name in ("condition number",):
        assert _status(checks, name, "design") == PASS
    for c in checks:
        if c.check in ("VIF", "data vs prior precision", "bootstrap CV", "physical range"):
            assert c.status == PASS, c
    assert all(np.isfinite(c.value) for c in checks)


def test_collinear_design_is_flagged_by_condition_number_and_vif():
    """One dense model at TP=1, decode-only steps whose context per request is fixed: F_dc ∝ B, and the
    static weights are a constant like β7 — the classic confounds of PR §7/§9."""
    rng = np.random.default_rng(0)
    frames = []
    for r in range(6):
        dc = rng.integers(1, 128, 400)
        frames.append(pd.DataFrame({"run_id": f"r{r}", "step_id": np.arange(400), "model": "llama-3.1-8b", "tp": 1,
                                    "hardware": "H100-SXM", "prefill_reqs": 0, "prefill_tokens": 0,
                                    "prefill_context": 0, "decode_reqs": dc, "decode_context": dc * 1000}))
    steps = with_step_times(pd.concat(frames, ignore_index=True), beta=[1.5, 1.3, 0.9, 1, 1, 20, 300])
    fit, checks = _fit_and_check(steps)
    cond = [c for c in checks if c.check == "condition number"][0]
    assert cond.status == FAIL and "collinearity" in cond.action
    vifs = {c.target: c for c in checks if c.check == "VIF"}
    assert any(c.status == FAIL for c in vifs.values()), vifs
    assert overall(checks) == FAIL


def test_prior_only_coefficients_are_flagged(good):
    """TP=1 dense data: β5 (all-reduce) and β4 (experts) never appear in the data — the prior set them."""
    dense_tp1 = good[(good["tp"] == 1) & (good["model"] == "llama-3.1-8b")]
    fit, checks = _fit_and_check(dense_tp1, n_boot=30)
    prior_checks = {c.target: c for c in checks if c.check == "data vs prior precision"}
    assert prior_checks["beta5"].status == FAIL and "zero in all data" in prior_checks["beta5"].action
    assert prior_checks["beta4"].status == FAIL
    assert prior_checks["beta1"].status == PASS


def test_out_of_range_beta_is_flagged():
    steps = with_step_times(synthetic_steps(n_runs=6, steps_per_run=300), beta=[0.2, 1.3, 0.9, 1.2, 3, 25, 400])
    fit, checks = _fit_and_check(steps, n_boot=20, prior_strength=1e-7)
    assert fit.beta[0] == pytest.approx(0.2, rel=0.1)
    rng_check = [c for c in checks if c.check == "physical range" and c.target == "beta1"][0]
    assert rng_check.status == FAIL and "formula or data" in rng_check.action


def test_unstable_run_is_flagged_by_leave_one_run_out():
    """Only one run carries prefill work: dropping it moves β1 to the prior."""
    steps = synthetic_steps(n_runs=6, steps_per_run=300)
    no_pf = steps["run_id"] != "run00"
    steps.loc[no_pf, ["prefill_reqs", "prefill_tokens", "prefill_context"]] = 0
    steps = with_step_times(steps, beta=[2.5, 1.3, 0.9, 1.2, 3, 25, 400])
    _, checks = _fit_and_check(steps, n_boot=30)
    assert _status(checks, "leave-one-run-out change", "beta1") == FAIL


def test_residual_buckets_and_hotspots(good):
    s = good.copy()
    pred = s["step_time_us"].to_numpy().copy()
    mixed = ((s["prefill_tokens"] > 0) & (s["decode_reqs"] > 0)).to_numpy()
    pred[mixed] *= 1.3  # a model that is 30% off on mixed steps only
    t = bucket_table(s, s["step_time_us"].to_numpy(), pred)
    phase = t[t.dimension == "phase_mix"].set_index("bucket")
    assert phase.loc["mixed", "mape"] == pytest.approx(0.3)
    assert bool(phase.loc["mixed", "hotspot"]) and not bool(phase.loc["decode", "hotspot"])
    assert phase.loc["decode", "mape"] == 0
    assert set(t.dimension) == {"model", "phase_mix", "batch_size", "context", "tp", "workload", "run_id"}
    assert (t.groupby("dimension")["steps"].sum() == len(s)).all()  # every step in exactly one bucket per dimension
    assert HOTSPOT_MAPE == 0.15


def test_calibration_reports_influence_and_writes_plots(good, tmp_path):
    c = calibrate(good, options=Options(n_boot=20), plots_dir=tmp_path)
    assert len(c.influence) == 12 and (c.influence["prediction_shift"] >= 0).all()
    assert len(c.plots) == 2
    for p in c.plots:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    d = c.to_dict()
    assert d["health"]["overall"] in ("pass", "warn", "fail") and d["beta"]["bootstrap"]["unit"] == "run"


def test_specification_tests_judge_effect_sizes(good):
    """A well-specified model leaves little curvature and no error growth; a model whose error grows
    with step size (a missing quadratic term) shows both, in effect size, not only in p-values."""
    from rooflab.fit.residuals import specification_tests

    y = good["step_time_us"].to_numpy()
    fine = specification_tests(good, y, y * np.random.default_rng(0).lognormal(0, 0.02, len(y)))
    assert fine["cells"] >= 8 and fine["reset"]["rms_gain"] < 0.1 and fine["breusch_pagan"]["r2"] < 0.3
    scale = np.median(y)
    bent = specification_tests(good, y, scale * np.sqrt(y / scale))  # under-predicts big steps, over-predicts small
    assert bent["reset"]["rms_gain"] > fine["reset"]["rms_gain"] + 0.1
    assert bent["breusch_pagan"]["r2"] > fine["breusch_pagan"]["r2"]
    tiny = specification_tests(good.iloc[:10], y[:10], y[:10])
    assert "skipped" in tiny
