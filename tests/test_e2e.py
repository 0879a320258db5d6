"""End-to-end calibration (issue 7): the stacked per-request formulation, and recovery of known coefficients
from request latencies alone."""

import numpy as np
import pandas as pd
import pytest

from rooflab.data.traces import Trace
from rooflab.fit.request_level import (
    E2EOptions,
    calibrate_e2e,
    fit_stacked,
    objective,
    prior_coefficients,
    stacked_design,
)
from rooflab.model.coefficients import Coefficients
from rooflab.model.step_timer import FittedStepTimer, arch_and_hardware
from rooflab.replay.metrics import compare
from rooflab.replay.predict import replay

TRUE = Coefficients({"beta1": 1.2, "beta2": 1.5, "beta3": 1.1, "beta4": 1.0, "beta5": 1.0, "beta6": 25.0,
                     "beta7": 400.0, "beta_layer": 15.0}, (14000.0, 900.0, 30.0), "roofline7+layers", source="truth")


def _trace(rate=12.0, n=320, seed=0, model="llama-3.1-8b") -> Trace:
    rng = np.random.default_rng(seed)
    w = pd.DataFrame({"request_id": [f"r{i}" for i in range(n)],
                      "arrival_us": np.cumsum(rng.exponential(1e6 / rate, n)),
                      "prompt_tokens": rng.integers(50, 2500, n), "output_tokens": rng.integers(5, 400, n),
                      "prefix_group": None, "prefix_tokens": 0, "failed": False,
                      "ttft_us": np.nan, "e2e_us": np.nan, "itl_us": np.nan})
    tr = Trace(f"synthetic-{seed}", model, 1, "H100-SXM", {"max_num_seqs": 64, "max_num_batched_tokens": 2048,
                                                   "num_gpu_blocks": 20000}, w)
    # "measured" = what the scheduler produces with the known step model and α
    res = replay(tr, TRUE)
    w["ttft_us"], w["e2e_us"], w["itl_us"] = (res.requests[c].to_numpy() for c in
                                              ("pred_ttft_us", "pred_e2e_us", "pred_itl_us"))
    return tr


def test_stacked_design_reproduces_the_replay_exactly():
    tr = _trace(n=150)
    start = TRUE.with_values(beta={"beta2": 0.8, "beta7": 150.0}, alpha=(5000.0, 100.0, 5.0))
    res = replay(tr, start, record=True)
    d = stacked_design(tr, res, start.variant)
    b = np.array([start.beta[k] for k in d["names"]])
    r = res.requests
    np.testing.assert_allclose(start.alpha[0] + d["Xt"] @ b, r["pred_ttft_us"], rtol=1e-9)
    np.testing.assert_allclose(start.alpha[0] + d["Xe"] @ b + start.alpha[1] + start.alpha[2] * d["n_out"],
                               r["pred_e2e_us"], rtol=1e-9)


def test_fit_stacked_holds_beta_when_asked_and_keeps_bounds():
    tr = _trace(n=150)
    start = TRUE.with_values(beta={"beta1": 0.4, "beta2": 0.5}, alpha=(0.0, 0.0, 0.0))
    d = stacked_design(tr, replay(tr, start, record=True), start.variant)
    a_only = fit_stacked([d], start, fit_beta=False)
    assert a_only.beta == start.beta and a_only.alpha[0] > 0
    full = fit_stacked([d], start)
    assert all(0.3 <= full.beta[k] <= 5.0 for k in ("beta1", "beta2", "beta3", "beta4", "beta5"))
    assert all(v >= 0 for v in full.alpha)


def test_e2e_calibration_recovers_known_coefficients_from_request_data():
    traces = [_trace(rate=6.0, seed=1), _trace(rate=18.0, seed=2)]
    start = prior_coefficients()  # β1–β5 = 1, β6 = 10, β7 = 100, β_layer = 10, α = 0
    res = calibrate_e2e(traces, start, E2EOptions(window_s=None, iterations=6, polish_evals=0))
    c = res.coefficients
    assert res.history[0]["objective"] > 0.1  # the start is far off
    final = objective({t.run_id: compare(replay(t, c)) for t in traces})
    assert final < 0.035 and final < res.history[0]["objective"] / 5
    assert c.alpha[0] == pytest.approx(TRUE.alpha[0], rel=0.10)
    assert c.beta["beta1"] == pytest.approx(TRUE.beta["beta1"], rel=0.10)
    # β3, β7 and β_layer are one constant per step for a single model, and per-token α2 trades against the
    # decode step: what the data fix is the step time of typical batches
    arch, hw = arch_and_hardware("llama-3.1-8b", "H100-SXM")
    got, want = FittedStepTimer(c, arch, hw, 1), FittedStepTimer(TRUE, arch, hw, 1)
    for agg in ((0, 0, 0, 0, 0, 32, 32 * 900), (1, 512, 0, 512 * 513 / 2, 1, 16, 16 * 600)):
        assert got.time_from_aggregates(*agg) == pytest.approx(want.time_from_aggregates(*agg), rel=0.10)


def test_calibration_needs_runs():
    from rooflab.errors import InputError

    with pytest.raises(InputError):
        calibrate_e2e([], None)
