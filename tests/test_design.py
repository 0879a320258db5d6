"""Information-optimal targeting (rooflab.targeting.doptimal, docs/spec.md §9): the greedy D-optimal core against
brute force, predictions from the twin's scheduler under fitted coefficients, and the obvious picks."""

import itertools
import json

import numpy as np
import pytest
import yaml

from rooflab.collect.collector import run_one
from rooflab.collect.launchers.direct import DirectLauncher
from rooflab.collect.spec import load_campaign
from rooflab.data.store import Store
from rooflab.data.sweep import run_id
from rooflab.errors import InputError
from rooflab.fit.calibration import Options, calibrate
from rooflab.targeting.doptimal import HOTSPOT_BOOST, choose_next_doptimal, greedy
from rooflab.targeting.information import (
    START_BETA,
    data_information,
    gain,
    prior_precision,
)
from rooflab.targeting.prediction import Prediction, predict_point

OPTS = Options(variant="roofline7+layers", n_boot=50)


def _pred(name, info, cost, buckets=None):
    from rooflab.data.sweep import SweepPoint

    p = SweepPoint(model="llama-3.1-8b", tp=1, hardware="H100-SXM", family="W3",
                   params=(("input_tokens", 1), ("output_tokens", 1), ("rate", float(name))), duration_s=1.0)
    return Prediction(p, info, cost, 100, False, 1.0, 1.0, buckets or {})


def _random_candidates(rng, n=6, p=3):
    out = []
    for i in range(n):
        A = rng.normal(size=(4, p)) * rng.uniform(0.2, 3, size=p)
        out.append(_pred(i + 1, A.T @ A, float(rng.uniform(1, 5))))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_first_pick_is_the_brute_force_best_gain_per_cost(seed):
    rng = np.random.default_rng(seed)
    M = np.eye(3) * 0.5
    cands = _random_candidates(rng)
    best = max(cands, key=lambda c: gain(M, c.info, [])[0] / c.gpu_s)
    pick = greedy(M, cands, n=1)[0]
    assert pick.pred is best
    d, _ = gain(M, best.info, [])
    assert pick.d_gain == pytest.approx(d) and pick.score == pytest.approx(d / best.gpu_s)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_batch_conditions_each_pick_and_is_near_the_brute_force_optimum(seed):
    """Equal costs: the greedy batch of 3 out of 7 is within (1 − 1/e) of the brute-force best log-det gain
    (submodularity); and each pick is the best *given the earlier ones*, not the best alone."""
    rng = np.random.default_rng(100 + seed)
    M = np.eye(3) * 0.5
    cands = [_pred(c.point.param("rate"), c.info, 1.0) for c in _random_candidates(rng, n=7)]
    picks = greedy(M, cands, n=3)
    chosen = [s.pred for s in picks]
    total = lambda S: np.linalg.slogdet(M + sum(c.info for c in S))[1] - np.linalg.slogdet(M)[1]  # noqa: E731
    optimum = max(total(S) for S in itertools.combinations(cands, 3))
    assert total(chosen) >= (1 - 1 / np.e) * optimum
    assert total(chosen) >= 0.9 * optimum  # in practice greedy is close on small sets
    Mk = M.copy()
    for s in picks:
        rest = [c for c in cands if c not in chosen[:picks.index(s)]]
        assert s.pred is max(rest, key=lambda c: gain(Mk, c.info, [])[0])
        Mk = Mk + s.pred.info


def test_duplicate_information_is_not_picked_twice_when_something_new_exists():
    """Two copies of the same direction vs one orthogonal direction: after the first copy, the orthogonal
    candidate is worth more than the second copy although the copies are cheaper."""
    M = np.eye(2)
    a = _pred(1, np.diag([50.0, 0.0]), 1.0)
    a2 = _pred(2, np.diag([50.0, 0.0]), 1.0)
    b = _pred(3, np.diag([0.0, 50.0]), 1.5)
    picks = [s.pred for s in greedy(M, [a, a2, b], n=2)]
    assert picks[0] in (a, a2) and picks[1] is b


def test_flagged_betas_and_hotspots_get_priority():
    M = np.eye(2)
    x = _pred(1, np.diag([30.0, 0.0]), 1.0)
    y = _pred(2, np.diag([0.0, 10.0]), 1.0, buckets={"phase_mix": {"prefill"}})
    assert greedy(M, [x, y], n=1)[0].pred is x  # more information overall
    assert greedy(M, [x, y], n=1, flagged=[1])[0].pred is y  # β index 1 flagged by the health checks
    hot = greedy(M, [x, y], n=1, hotspots=[("phase_mix", "prefill", 0.2)])[0]
    d_y = gain(M, y.info, [])[0]
    assert hot.pred is y and hot.hotspot == "phase_mix=prefill" and hot.score == pytest.approx(HOTSPOT_BOOST * d_y)
    # the budget: a candidate that does not fit is skipped, none fits -> nothing picked
    assert greedy(M, [x, y], n=1, budget=0.5) == []


def test_data_information_is_the_capped_per_run_information_of_the_fitted_steps():
    """From the fit's per-run Gram matrices: Σ_runs mean(z zᵀ) × min(steps, 100) / σ² with z = x / y."""
    from rooflab.data.synthetic import synthetic_steps, with_step_times
    from rooflab.model.features import featurize
    from rooflab.model.variants import get_variant

    steps = with_step_times(synthetic_steps(n_runs=6, steps_per_run=150))
    steps = steps[steps.index % 150 < 60 + 30 * (steps["run_id"] == "run00")]  # runs of 90 and 60 steps
    calib = calibrate(steps, options=OPTS)
    X = get_variant(calib.beta.variant.name).design_matrix(featurize(steps))
    Z = X / steps["step_time_us"].to_numpy()[:, None]
    want = sum(Zr.T @ Zr / len(Zr) * min(len(Zr), 100) for _, Zr in
               ((r, Z[(steps["run_id"] == r).to_numpy()]) for r in steps["run_id"].unique()))
    assert np.allclose(data_information(calib.beta, 0.05), want / 0.05 ** 2, rtol=1e-9)
    assert data_information(None, 0.05) == 0.0


def test_prior_is_physical_for_corrections_and_weak_for_overheads():
    P = prior_precision("roofline7+layers", START_BETA)
    assert np.allclose(np.diag(P)[:5], 4.0)  # N(1, 0.5²)
    assert np.all(np.diag(P)[5:] < 0.05)  # β6, β7, β_L: sd = their own size


# ------------------------------------------------------------------------------------ with the twin
def _campaign(tmp_path, models, validation=None, families=None):
    doc = {"name": "dtest", "hardware": "H100-SXM", "models": models,
           "families": families or {"W1": {"input_tokens": [512, 2048], "output_tokens": 1, "rate": 0.5},
                                    "W3": {"rate": [2, 32], "input_tokens": 256, "output_tokens": 64}},
           "duration_s": 30, "engine": {"max_model_len": 4096}, "endpoint": {"kind": "twin", "accel": 10}}
    doc["validation"] = validation or {"points": []}
    path = tmp_path / "dtest.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_campaign(str(path))


def _collect(tmp_path, campaign, points):
    """Points through the direct launcher (twin truth) into a store; (ok steps, collected keys, store)."""
    store = Store(tmp_path / "store")
    launcher = DirectLauncher()
    for p in points:
        run_one(store, launcher, campaign.name, run_id(campaign.name, p), p, 0)
    steps = store.steps(campaign=campaign.name, statuses=("ok",))
    return steps, {p.key for p in points}, store


def test_beta5_unidentified_makes_a_tp2_run_the_obvious_pick(tmp_path):
    """TP1 data only, TP1 candidates still open (W1 at 2048, W3 at rate 32): the best pick is a TP2 run."""
    c = _campaign(tmp_path, [{"model": "llama-3.1-8b", "tp": [1, 2]}])
    tp1 = [p for p in c.candidates() if p.tp == 1 and p.param("input_tokens") in (256, 512) and p.param("rate") <= 2]
    assert len(tp1) == 2 and len([p for p in c.candidates() if p.tp == 1]) == 4
    steps, keys, _ = _collect(tmp_path, c, tp1)
    picks = choose_next_doptimal(calibrate(steps, options=OPTS), c, keys, batch_size=1,
                                 budget_gpu_seconds_left=None)
    assert len(picks) == 1
    p = picks[0]
    # one model: β5's all-reduce latency is a per-step constant like β3·W, β7 and β_L·L, so one TP2 run
    # moves those too — but only a TP > 1 run can move β5 at all
    assert p.point.tp == 2, (p.reason, p.details)
    assert "beta5 by" in p.reason and "GPU-h predicted" in p.reason
    assert p.details["sd_shrink"]["beta5"] > 0.5
    json.dumps(p.to_dict())  # what MLflow logs


def test_beta4_unidentified_makes_an_moe_batch_sweep_the_obvious_pick(tmp_path):
    """Dense data only, a dense candidate still open (W3 at rate 32): the best pick is the MoE batch sweep."""
    c = _campaign(tmp_path, [{"model": "llama-3.1-8b", "tp": 1}, {"model": "qwen3-30b-a3b", "tp": 1}],
                  families={"W3": {"rate": [2, 32], "input_tokens": 256, "output_tokens": 64}})
    dense = [p for p in c.candidates() if p.model == "llama-3.1-8b" and p.param("rate") == 2]
    steps, keys, _ = _collect(tmp_path, c, dense)
    picks = choose_next_doptimal(calibrate(steps, options=OPTS), c, keys, batch_size=1,
                                 budget_gpu_seconds_left=None)
    assert picks[0].point.model == "qwen3-30b-a3b" and picks[0].point.family == "W3"
    assert picks[0].serves == "beta4" and picks[0].details["sd_shrink"]["beta4"] > 0.9, picks[0].reason


def test_batches_keep_about_a_fifth_for_held_out_points_and_respect_the_budget(tmp_path):
    c = _campaign(tmp_path, [{"model": "llama-3.1-8b", "tp": [1, 2]}],
                  validation={"models": [{"model": "qwen2.5-7b", "tp": 1}], "points": [{"family": "W3", "rate": 2}]})
    picks = choose_next_doptimal(None, c, set(), batch_size=5, budget_gpu_seconds_left=None)
    assert len(picks) == 5
    val = [p for p in picks if p.point.split == "validation"]
    assert len(val) == 1 and val[0].serves == "validation"
    assert val[0].point.param("rate") == 2  # the campaign's V1 point first (space-filling order)
    assert len({p.point.key for p in picks}) == 5
    cheap = choose_next_doptimal(None, c, set(), batch_size=5, budget_gpu_seconds_left=100)
    assert sum(p.cost_gpu_s for p in cheap) <= 100


def test_predicted_cost_and_compositions_track_the_measured_run(tmp_path):
    """The prediction runs the twin's scheduler with fitted coefficients (here: the starting ones) and only
    samples long runs; its GPU-seconds extrapolate to the whole run within 10% of the measured span × TP."""
    c = _campaign(tmp_path, [{"model": "llama-3.1-8b", "tp": 1}],
                  families={"W3": {"rate": [2, 64], "input_tokens": 256, "output_tokens": 64}})
    for p in c.candidates():
        pr = predict_point(p, START_BETA, "roofline7+layers", "vllm")
        rd_store = Store(tmp_path / f"s{p.param('rate')}")
        rd = rd_store.begin("r", p, c.name, 0, 1)
        measured = DirectLauncher().run(p, rd)
        assert pr.gpu_s == pytest.approx(measured.gpu_seconds, rel=0.10), p.label()
        B = (measured.steps["prefill_reqs"] + measured.steps["decode_reqs"]).mean()
        assert pr.mean_batch == pytest.approx(B, rel=0.35), p.label()
        assert not pr.saturated and pr.steps > 0
        assert np.all(np.linalg.eigvalsh(pr.info) >= -1e-9)  # an information matrix


def test_a_saturated_prediction_carries_no_information(tmp_path):
    c = _campaign(tmp_path, [{"model": "llama-3.1-70b", "tp": 4}],
                  families={"W4-A": {"rate": 128, "input_tokens": 1024, "output_tokens": 4}})
    (p,) = c.candidates()
    slow = dict(START_BETA, beta1=5.0, beta3=5.0)  # a model 5× slower than the twin: the queue grows
    pr = predict_point(p, slow, "roofline7+layers", "vllm")
    assert pr.saturated and pr.steps == 0 and np.allclose(pr.info, 0)
    assert pr.gpu_s > p.duration_s * p.tp * 1.5  # the overload stretches the run


def test_targeting_strategies_route_by_name():
    """The loop's targeting by name: D-optimal by default, the menu on request, one-line error otherwise."""
    from rooflab.targeting.strategies import Spend, make_targeting

    c = load_campaign("smoke")
    dopt = make_targeting("d-optimal").pick(None, c, set(), batch_size=3, budget_left_s=None, iteration=0,
                                            spend=Spend())
    menu = make_targeting("menu").pick(None, c, set(), batch_size=3, budget_left_s=None, iteration=0, spend=Spend())
    assert dopt and all("D-optimal" in p.reason or p.serves == "validation" for p in dopt)
    assert menu and all("D-optimal" not in p.reason for p in menu)
    with pytest.raises(InputError, match="targeting"):
        make_targeting("nope")
    logged = json.loads(json.dumps([p.to_dict() for p in dopt]))  # what MLflow gets
    train = [d for d in logged if d["split"] == "train"]
    assert train and all({"d_gain", "predicted_gpu_s", "sd_shrink"} <= set(d["details"]) for d in train)


def test_stop_rule_can_require_held_out_replay_error(tmp_path):
    """The optional replay criterion (issue 7 → the stop rule): held-out runs of the store replayed with the
    current coefficients, judged against docs/spec.md §12's request-level targets."""
    from rooflab.targeting.stop import stop_rule
    from tasks.analyze import heldout_replay_error

    c = load_campaign("smoke")
    pts = [p for p in c.candidates() if p.family == "W3"]
    assert {p.split for p in pts} == {"train", "validation"}
    _, _, store = _collect(tmp_path, c, pts)
    calib = calibrate(store.steps(campaign=c.name, statuses=("ok",)), store.requests(campaign=c.name),
                      Options(variant="roofline7", n_boot=20))
    rep = heldout_replay_error.fn(str(store.root), c.name, calib)
    assert rep["n_runs"] == sum(p.split == "validation" for p in pts) and np.isfinite(rep["e2e"])
    d = stop_rule(calib, gpu_seconds_spent=0, budget_gpu_seconds=None, iteration=1, max_iterations=None, replay=rep)
    crit = d.criteria["replay"]
    assert crit.met == (rep["ttft"] <= 0.12 and rep["itl"] <= 0.05 and rep["e2e"] <= 0.05)
    assert "held-out replay TTFT" in crit.text
    d = stop_rule(calib, gpu_seconds_spent=0, budget_gpu_seconds=None, iteration=1, max_iterations=None,
                  replay={"n_runs": 0})
    assert d.criteria["replay"].met is False and "no held-out run to replay yet" in d.reason
    worse = stop_rule(calib, gpu_seconds_spent=0, budget_gpu_seconds=None, iteration=1, max_iterations=None,
                      replay={"n_runs": 2, "ttft": 0.30, "itl": 0.01, "e2e": 0.02})
    assert worse.criteria["replay"].met is False and "TTFT 30.0% > 12%" in worse.reason
