"""Prediction intervals from posterior draws (issue 18): common random numbers, the discrepancy term, SLO
probabilities, arrival noise, coverage bookkeeping, the bootstrap posteriors of the replay-based fits, the CLI."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from rooflab.data.trace_readers import trace_from_request_table
from rooflab.errors import InputError
from rooflab.fit.calibration import Options, calibrate
from rooflab.fit.discrepancy import loro_residuals, with_cv_discrepancy
from rooflab.fit.replay_posterior import (
    e2e_posterior,
    e2e_system,
    linearised_loro,
    stacked_designs,
    summary_posterior,
    summary_rows,
    summary_system,
)
from rooflab.fit.request_level import E2EOptions
from rooflab.fit.summary_level import OVERALL, SummaryOptions, SummaryTarget, solve_summaries
from rooflab.model.arch import load_model
from rooflab.model.coefficients import Coefficients
from rooflab.model.engine_config import EngineConfig
from rooflab.model.hardware import load_hardware
from rooflab.model.posterior import Posterior
from rooflab.replay.interval_plots import plot_calibration, plot_intervals
from rooflab.replay.intervals import (
    KEYS,
    SLO,
    coverage,
    discrepancy_sd,
    log_residuals,
    parse_slo,
    replay_intervals,
    run_statistics,
)
from rooflab.twin.engine import Engine, Request
from rooflab.twin.simulate import simulate
from rooflab.twin.truth import TruthModel

H100 = load_hardware("H100-SXM")
ENGINE = {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "max_model_len": 4096}
MODEL = "llama-3.1-8b"


def _run(seed: int, rate: float, pmean: float, omean: float, duration: float = 10.0):
    rng = np.random.default_rng(seed)
    n = int(rate * duration)
    arr = np.cumsum(rng.exponential(1e6 / rate, n))
    p = np.clip(rng.lognormal(np.log(pmean), 0.5, n), 16, 3000).astype(int)
    o = np.clip(rng.lognormal(np.log(omean), 0.5, n), 2, 300).astype(int)
    arch = load_model(MODEL)
    truth = TruthModel.from_config("H100-SXM", arch, 1, seed=seed)
    eng = Engine(arch, H100, 1, truth, EngineConfig(**ENGINE), seed=seed)
    rid = f"run-{seed}"
    sim = simulate(eng, [Request(f"r{i}", float(a), int(x), int(y)) for i, (a, x, y) in enumerate(zip(arr, p, o))],
                   overheads=truth, run_id=rid)
    trace = trace_from_request_table(sim.requests, run_id=rid, model=MODEL, tp=1, hardware="H100-SXM",
                                     engine=dict(ENGINE))
    return sim.steps.assign(split="train", workload="w"), sim.requests, trace


@pytest.fixture(scope="module")
def runs():
    return [_run(70 + i, *w) for i, w in enumerate([(6, 400, 60), (14, 900, 80), (20, 300, 120), (9, 1500, 50),
                                                    (16, 700, 100)])]


@pytest.fixture(scope="module")
def fitted(runs):
    steps = pd.concat([s for s, _, _ in runs[:4]], ignore_index=True)
    req = pd.concat([r for _, r, _ in runs[:4]], ignore_index=True)
    return calibrate(steps, req, Options(n_boot=2, prior_strength=1e-3))


@pytest.mark.parametrize("text,key,limit", [("ttft_p99=300ms", "ttft_p99", 300.0), ("E2E_mean<=2s", "e2e_mean", 2000.0),
                                            ("itl_p90=25", "itl_p90", 25.0), ("ttft_mean = 500us", "ttft_mean", 0.5)])
def test_parse_slo(text, key, limit):
    s = parse_slo(text)
    assert s.key == key and s.limit_ms == pytest.approx(limit)


@pytest.mark.parametrize("text", ["ttft_p50=3ms", "ttft=3ms", "ttft_p99=0ms", "ttft_p99=fast", "tpot_p99=3ms"])
def test_bad_slo_is_one_line(text):
    with pytest.raises(InputError, match="--slo") as e:
        parse_slo(text)
    assert "\n" not in str(e.value)


def test_common_random_numbers_a_point_posterior_has_no_spread(fitted, runs):
    """Every draw replays the same arrivals and seed: a posterior of zero covariance gives draws identical to the
    point estimate's replay, so any spread is the coefficients' alone."""
    c = fitted.coefficients()
    zero = replace(c, posterior=replace(c.posterior, cov=np.zeros_like(c.posterior.cov)))
    r = replay_intervals(runs[4][2], zero, draws=4, use_posterior_discrepancy=False)
    for k, iv in r.intervals.items():
        assert iv.lower_ms == pytest.approx(iv.point_ms) and iv.upper_ms == pytest.approx(iv.point_ms), k
    assert r.values.std().max() < 1e-9
    full = replay_intervals(runs[4][2], c, draws=6, seed=2, use_posterior_discrepancy=False)
    again = replay_intervals(runs[4][2], c, draws=6, seed=2, use_posterior_discrepancy=False)
    pd.testing.assert_frame_equal(full.values, again.values)
    assert full.values["e2e_mean"].std() > 0
    assert all(iv.lower_ms <= iv.median_ms <= iv.upper_ms for iv in full.intervals.values())
    assert any("model-form error" in s for s in full.not_covered)


def test_the_discrepancy_term_widens_the_interval_as_stated(fitted, runs):
    c = fitted.coefficients()
    zero = replace(c, posterior=replace(c.posterior, cov=np.zeros_like(c.posterior.cov)).with_discrepancy(
        {k: 0.1 for k in KEYS}, "test"))
    r = replay_intervals(runs[4][2], zero, draws=200, level=0.9)
    for k, iv in r.intervals.items():
        # exp(±1.645·0.1) around the point, to sampling error of 200 draws
        assert iv.upper_ms / iv.point_ms == pytest.approx(np.exp(1.645 * 0.1), rel=0.06), k
        assert iv.lower_ms / iv.point_ms == pytest.approx(np.exp(-1.645 * 0.1), rel=0.06), k
    assert any("model-form" in s for s in r.covers)
    plain = replay_intervals(runs[4][2], zero, draws=5, use_posterior_discrepancy=False)
    assert plain.values.std().max() < 1e-9


def test_slo_probability_and_arrival_noise(fitted, runs):
    c = fitted.coefficients()
    tr = runs[4][2]
    point = run_statistics(replay_intervals(tr, c, draws=2).point)
    slos = [SLO("ttft", "p99", point["ttft_p99"] * 100), SLO("e2e", "mean", point["e2e_mean"] / 100)]
    r = replay_intervals(tr, c, draws=5, slos=slos)
    assert [s.probability for s in r.slos] == [1.0, 0.0]
    assert r.slos[0].point_holds and not r.slos[1].point_holds
    zero = replace(c, posterior=replace(c.posterior, cov=np.zeros_like(c.posterior.cov)))
    noisy = replay_intervals(tr, zero, draws=5, arrival_noise=True, use_posterior_discrepancy=False)
    assert noisy.values["ttft_mean"].std() > 0 and any("arrival noise" in s for s in noisy.covers)
    closed = replace(tr, max_concurrency=4)
    with pytest.raises(InputError, match="closed-loop"):
        replay_intervals(closed, c, draws=2, arrival_noise=True)
    with pytest.raises(InputError, match="no posterior"):
        replay_intervals(tr, replace(c, posterior=None), draws=2)


def test_cv_discrepancy_and_coverage_bookkeeping(fitted, runs, tmp_path):
    traces = {tr.run_id: tr for _, _, tr in runs[:4]}
    res = loro_residuals(fitted.fit_state, traces)
    assert set(res) == set(traces) and all(np.isfinite(list(r.values())).all() for r in res.values())
    post = with_cv_discrepancy(fitted.posterior, res, "loro")
    assert set(post.discrepancy) == set(KEYS) and all(v > 0 for v in post.discrepancy.values())
    assert "4 runs" in post.discrepancy_source
    sd = discrepancy_sd([{"ttft_mean": 0.1}, {"ttft_mean": -0.1}])
    assert sd["ttft_mean"] > 0.1  # RMS 0.1, widened for two residuals (Student t)
    c = replace(fitted.coefficients(), posterior=post)
    r = replay_intervals(runs[4][2], c, draws=8)
    cov = coverage([r])
    assert cov["cells"] == len(KEYS) and 0 <= cov["coverage"] <= 1
    assert log_residuals({"ttft_mean": 2.0}, {"ttft_mean": 1.0})["ttft_mean"] == pytest.approx(np.log(2))
    a = plot_calibration({"x": np.array([0.4, 0.8])}, np.array([0.5, 0.9]), tmp_path / "cal.png")
    b = plot_intervals([r], tmp_path / "iv.png")
    assert a.stat().st_size > 0 and b.stat().st_size > 0


def test_request_level_posterior_is_a_run_bootstrap_of_the_linearisation(fitted, runs):
    traces = [tr for _, _, tr in runs[:4]]
    c = fitted.coefficients()
    opts = E2EOptions(window_s=None, prior_strength=1e-3)
    designs = stacked_designs(traces, c, opts)
    system, names = e2e_system(designs, c, opts)
    theta = np.array(list(c.beta.values()) + list(c.alpha))
    np.testing.assert_allclose(system.solve(np.ones(len(names))), theta, rtol=1e-6, atol=1e-6)  # θ̂ solves it
    post, _ = e2e_posterior(traces, c, opts, n_boot=40, seed=1)
    assert post.kind == "draws" and post.draws.shape == (40, len(theta)) and "4 runs" in post.method
    np.testing.assert_allclose(post.mean, theta)
    assert (post.draws >= post.lower - 1e-12).all() and (post.draws <= post.upper + 1e-9).all()
    assert post.sd[post.index("beta2")] > 0
    loro = linearised_loro(designs, c, opts)
    assert set(loro) == set(names) and all(isinstance(v, Coefficients) for v in loro.values())
    assert linearised_loro(designs, c, opts, groups={r: "one model" for r in names}) == {}  # nothing left to fit
    pairs = linearised_loro(designs, c, opts, groups={r: str(i // 2) for i, r in enumerate(names)})
    assert pairs[names[0]].beta == pairs[names[1]].beta and pairs[names[0]].beta != pairs[names[2]].beta
    # draws replay like any posterior
    r = replay_intervals(runs[4][2], replace(c, posterior=post), draws=5, use_posterior_discrepancy=False)
    assert r.values["e2e_mean"].notna().all()


def test_summary_level_posterior_matches_solve_summaries(runs):
    targets = []
    for _, req, tr in runs[:4]:
        ttft = (req["first_token_us"] - req["arrived_us"]).mean()
        e2e = (req["departed_us"] - req["arrived_us"]).mean()
        targets.append(SummaryTarget(tr, {OVERALL: (float(ttft), float(e2e))}, tr.run_id))
    start = Coefficients({"beta1": 1.2, "beta2": 1.2, "beta3": 1.0, "beta4": 1.0, "beta5": 1.0, "beta6": 10.0,
                          "beta7": 100.0, "beta_layer": 40.0}, (15000.0, 800.0, 45.0), "roofline7+layers")
    opts = SummaryOptions()
    rows = summary_rows(targets, start, opts)
    solved = solve_summaries(rows, start, opts, False)
    # the linearised system's rows are solve_summaries' own: its solution at solved's point is solved itself
    system, exps = summary_system(rows, solved, start, opts)
    theta = np.array(list(solved.beta.values()) + list(solved.alpha))
    np.testing.assert_allclose(system.solve(np.ones(len(exps))), theta, rtol=1e-5, atol=1e-6)
    post = summary_posterior(targets, solved, opts, prior=start, n_boot=30)
    assert post.kind == "draws" and len(post.draws) == 30 and "4 experiments" in post.method


def test_a_posterior_of_only_alpha_draws_alpha_only():
    c = Coefficients({"beta1": 1.0}, (10.0, 1.0, 1.0), "roofline7")
    c.posterior = Posterior(["alpha0"], np.array([10.0]), np.eye(1), "m", np.zeros(1), np.full(1, np.inf))
    d = c.draws(20, seed=0)
    assert all(x.beta == c.beta for x in d) and np.std([x.alpha[0] for x in d]) > 0


def test_cli_replay_interval(fitted, runs, tmp_path, capsys):
    from cli.main import main

    coefs = tmp_path / "fit.json"
    coefs.write_text(json.dumps(fitted.to_dict(), default=float))
    table = tmp_path / "held.parquet"
    runs[4][1].to_parquet(table)
    settings = ["--model", MODEL, "--tp", "1", "--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
                "--max-model-len", "4096"]
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(table), *settings, "--interval", "0.9",
                 "--draws", "4", "--slo", "ttft_p99=10s", "--slo", "e2e_mean=1ms"]) == 0
    out = capsys.readouterr().out
    assert "median [90% interval] ms" in out and "SLO ttft_p99 ≤ 10000 ms" in out and "does not cover:" in out
    assert "holds with probability 0%" in out  # e2e mean under 1 ms never holds
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(table), *settings, "--interval", "0.9",
                 "--draws", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    iv = doc["runs"]["held"]["intervals"]
    assert set(iv["intervals"]) == set(KEYS) and iv["draws"] == 3
    # bad input: one line, status 2, nothing replayed
    for bad in (["--interval", "1.5"], ["--slo", "ttft_p99=3ms"], ["--interval", "0.9", "--draws", "1"]):
        assert main(["replay", "--coefficients", str(coefs), "--requests", str(table), *settings, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), bad
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(replace(fitted.coefficients(), posterior=None).to_dict()))
    assert main(["replay", "--coefficients", str(plain), "--requests", str(table), *settings, "--interval",
                 "0.9"]) == 2
    assert "no posterior" in capsys.readouterr().err
