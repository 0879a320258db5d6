"""Onboarding (issue 16): the loop's pause for runs collected outside rooflab, the information and stop rule of the
summary fit, the pool-based benchmark engine on a small twin pool, and ``rooflab onboard`` end to end against the
twin — propose, "run" the proposed configs on the twin (direct launcher), ingest, resume, stop."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rooflab.campaign.loop import CollectOutcome, MemoryPlans, run_campaign
from rooflab.campaign.onboard import onboard
from rooflab.campaign.onboard_state import OnboardSetup, create_state, ingest, open_state
from rooflab.collect.collector import run_one
from rooflab.collect.launchers.direct import DirectLauncher
from rooflab.collect.spec import load_campaign
from rooflab.collect.workloads import validate_config
from rooflab.data.store import Store
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.data.trace_readers import read_store_trace
from rooflab.errors import InputError
from rooflab.evaluation.onboarding import (
    METRICS,
    OnboardingResult,
    PoolItem,
    Target,
    prediction_rows,
    random_median,
    run_target,
    summary_row,
)
from rooflab.evaluation.onboarding_report import curves, medians_over_targets, plot, render, verdict
from rooflab.evaluation.s2r import neutral_coefficients
from rooflab.fit.summary_level import OVERALL, SummaryOptions, SummaryTarget, calibrate_from_summaries
from rooflab.targeting.candidates import Pick
from rooflab.targeting.onboard_stop import onboard_stop
from rooflab.targeting.stop import StopDecision
from rooflab.targeting.strategies import Spend
from rooflab.targeting.summary_information import (
    anchored_rows,
    d_gain,
    forecast,
    prior_precision,
    sd_shrink,
    solve_rows,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "hardware": "H100-SXM", "models": [{"model": "llama-3.1-8b", "tp": 1}],
        "families": {"W1": {"input_tokens": [256, 2048], "output_tokens": 1, "rate": 0.5},
                     "W2": {"input_tokens": [1024], "output_tokens": 128, "rate": 0.1},
                     "W3": {"rate": [2, 8], "input_tokens": 128, "output_tokens": 64}},
        "duration_s": 20, "engine": {"max_model_len": 4096},
        "collection": {"concurrency": 1, "max_retries": 1, "timeout_s": 300}, "endpoint": {"kind": "twin", "accel": 10}}


def tiny_template(tmp_path: Path) -> str:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return str(p)


def twin_runs(tmp_path: Path, rates=(2, 8, 4), seed=0) -> tuple[Store, list[str]]:
    """Short W3 runs of llama-3.1-8b TP1 on the twin (direct launcher)."""
    store = Store(tmp_path / "twin")
    rids = []
    for rate in rates:
        p = SweepPoint("llama-3.1-8b", 1, "H100-SXM", "W3", (("input_tokens", 128), ("output_tokens", 64),
                                                             ("rate", float(rate))), duration_s=20, seed=seed,
                       engine=(("max_model_len", 4096),))
        rid = run_id("pool", p)
        run_one(store, DirectLauncher(), "pool", rid, p, 0)
        rids.append(rid)
    return store, rids


def measured(trace) -> dict[str, tuple[float, float]]:
    ok = ~trace.requests["failed"].to_numpy(bool)
    return {OVERALL: (float(trace.requests["ttft_us"][ok].mean()), float(trace.requests["e2e_us"][ok].mean()))}


# ---------------------------------------------------------------------------------------------- the loop's pause
class PendingSteps:
    """Plain steps whose collection is done outside: pending until ``arrived`` is set."""

    def __init__(self):
        self.arrived = False
        self.records = []

    def collect(self, iteration, points):
        if not self.arrived:
            return CollectOutcome(0, 0, pending=tuple(p.key for p in points))
        return CollectOutcome(len(points), 0)

    def collected_keys(self):
        return set()

    def spend(self):
        return Spend(3600.0 if self.arrived else 0.0)

    def has_fit_data(self):
        return self.arrived

    def calibrate(self, iteration):
        return None

    def replay_error(self, calib):
        return {}

    def record(self, record):
        self.records.append(record)


class OnePick:
    name = "one"

    def pick(self, calib, campaign, collected, *, batch_size, budget_left_s, iteration, spend):
        p = campaign.candidates()[iteration]
        return [Pick(p, "first", "test", 1.0, 1.0)]


def test_the_loop_pauses_for_runs_collected_outside_and_resumes_the_same_iteration():
    camp = load_campaign("smoke")
    steps, plans = PendingSteps(), MemoryPlans()
    decide = lambda calib, **kw: StopDecision(True, "done", {}, True)  # noqa: E731
    out = run_campaign(camp, steps, plans, OnePick(), report=lambda _: None, decide=decide)
    assert out.waiting == (camp.candidates()[0].key,) and not out.stopped and out.iterations == 0
    assert not steps.records and not plans.saved[0]["complete"]
    again = run_campaign(camp, steps, plans, OnePick(), report=lambda _: None, decide=decide)
    assert again.waiting and not steps.records  # still nothing in: still waiting, nothing recorded
    steps.arrived = True
    done = run_campaign(camp, steps, plans, OnePick(), report=lambda _: None, decide=decide)
    assert done.stopped and done.converged and done.iterations == 1 and not done.waiting
    assert [r.iteration for r in steps.records] == [0] and plans.saved[0]["complete"]


# ---------------------------------------------------------------------------------------------- information, stop
def test_cached_rows_solve_exactly_what_calibrate_from_summaries_fits(tmp_path):
    store, rids = twin_runs(tmp_path, rates=(2, 8))
    prior = neutral_coefficients("roofline7+layers")
    opts = SummaryOptions(prior_strength=1e-2, iterations=1)
    targets = [SummaryTarget(t, measured(t), rid) for rid in rids for t in [read_store_trace(store, rid)]]
    rows = {t.name: anchored_rows(t, prior, opts) for t in targets}
    mine = solve_rows(rows, {t.name: t.means_us for t in targets}, prior, opts)
    ref = calibrate_from_summaries(targets, prior, opts, prior=prior).coefficients
    for k, v in ref.beta.items():
        assert mine.beta[k] == pytest.approx(v, rel=1e-9, abs=1e-12)
    assert np.allclose(mine.alpha, ref.alpha, rtol=1e-9)


def test_a_forecast_is_linear_in_the_coefficients_at_its_own_point(tmp_path):
    store, rids = twin_runs(tmp_path, rates=(8,))
    prior = neutral_coefficients("roofline7+layers")
    fc = forecast(read_store_trace(store, rids[0]), prior)
    ttft, e2e = fc.means_us()[OVERALL]
    assert ttft / 1e3 == pytest.approx(fc.summary[OVERALL]["ttft_mean"], rel=1e-6)
    assert e2e / 1e3 == pytest.approx(fc.summary[OVERALL]["e2e_mean"], rel=1e-6)
    M = prior_precision(prior, SummaryOptions(prior_strength=1e-2))
    info = fc.information()
    assert d_gain(M, info) > 0 and d_gain(M, 0 * info) == pytest.approx(0.0)
    shrink = sd_shrink(M, info)
    assert ((shrink >= -1e-12) & (shrink < 1)).all() and shrink.max() > 0.05
    assert fc.gpu_s > 20  # at least the 20 s stage × TP 1
    assert not fc.saturated
    slow = neutral_coefficients("roofline7+layers")
    slow.beta = {k: v * 200 for k, v in slow.beta.items()}  # a server 200× slower cannot keep up with 8 req/s
    assert forecast(read_store_trace(store, rids[0]), slow).saturated


def test_the_onboarding_stop_rule():
    ok = onboard_stop({"e2e_mean": 0.02, "ttft_mean": 0.05}, {"e2e_mean": 0.03, "ttft_mean": 0.08},
                      gpu_seconds_spent=100, budget_gpu_seconds=None, iteration=2, max_iterations=8,
                      prequential_runs=2, open_candidates=3)
    assert ok.stop and ok.converged and ok.reason.startswith("calibrated: last batch (2 runs)")
    miss = onboard_stop({"e2e_mean": 0.02, "ttft_mean": 0.25}, {"e2e_mean": 0.03, "ttft_mean": 0.08},
                        gpu_seconds_spent=100, budget_gpu_seconds=None, iteration=2, max_iterations=8)
    assert not miss.stop and "TTFT 25.0% > 10%" in miss.reason
    wide = onboard_stop({"e2e_mean": 0.02, "ttft_mean": 0.05}, {"e2e_mean": 0.09, "ttft_mean": 0.08},
                        gpu_seconds_spent=100, budget_gpu_seconds=None, iteration=2, max_iterations=8)
    assert not wide.stop and "E2E ±9.0% > 5%" in wide.reason
    spent = onboard_stop(None, None, gpu_seconds_spent=7200, budget_gpu_seconds=3600, iteration=1, max_iterations=8)
    assert spent.stop and not spent.converged and spent.reason.startswith("budget spent: 2.00 of 1.00 GPU-h")
    none_left = onboard_stop({"e2e_mean": 0.01, "ttft_mean": 0.01}, None, gpu_seconds_spent=1,
                             budget_gpu_seconds=None, iteration=3, max_iterations=8)
    assert none_left.converged and "no open candidate left" in none_left.reason  # nothing left to be unsure about


# ---------------------------------------------------------------------------------------------- the benchmark engine
def test_pool_onboarding_writes_every_step_of_every_strategy(tmp_path):
    store, rids = twin_runs(tmp_path, rates=(2, 8, 4))
    traces = {rid: read_store_trace(store, rid) for rid in rids}
    items = [PoolItem(rid, f"W3 {r}", 1, {m: 1.0 for m in METRICS} | {
        "ttft_mean": measured(traces[rid])[OVERALL][0] / 1e3, "e2e_mean": measured(traces[rid])[OVERALL][1] / 1e3},
        measured(traces[rid])) for rid, r in zip(rids[:2], (2, 8))]
    items.append(PoolItem(rids[2], "W3 4 (withheld)", 1, None, None))
    target = Target("twin", "s2r", tuple(items))
    res = run_target(target, neutral_coefficients("roofline7+layers"), 1e-2, seeds=(1, 2),
                     trace_of=lambda k: traces[k])
    strategies = {s.strategy for s in res.steps}
    assert strategies == {"targeted", "random-1", "random-2", "all"}
    assert [s.step for s in res.path("targeted")] == [0, 1, 2]
    rows = pd.DataFrame(prediction_rows(res))
    for (strategy, _step), g in rows.groupby(["strategy", "step"]):
        if strategy == "leave-one-out":
            assert set(g["exp_id"]) == set(rids[:2])
            continue
        assert set(g["exp_id"]) == set(rids) and set(g["metric"]) == set(METRICS) and len(g) == 3 * len(METRICS)
    assert res.path("targeted")[1].reason.startswith("D-optimal: ")
    assert res.path("targeted")[2].stop  # the stop rule was applied after each targeted pick
    row = summary_row(res)
    assert row["measured"] == 2 and np.isfinite(row["prior_e2e"]) and np.isfinite(row["loo_e2e"])
    # the report: per-target verdict, medians over targets per number of picks, the rendered tables
    both = OnboardingResult([res, replace(res, target="twin-2")], 1.0, "neutral", 1e-2)
    med = medians_over_targets(both, "s2r")
    assert list(med["picks"]) == [0, 1] and (med["targets"] == 2).all()  # after 2 picks nothing is left to score
    one = res.path("targeted")[1]
    assert med.loc[1, "targeted_e2e_mean"] == pytest.approx(one.median("e2e_mean"))
    assert med.loc[1, "random_e2e_mean"] == pytest.approx(random_median(res, 1, "e2e_mean"))
    v = verdict(res)
    assert v.startswith("met at 1") if row["target_met"] else v.startswith("not shown: 2 measured")
    text = render(both)
    assert "median over the kit's targets" in text and "| twin |" in text and v in text
    summ = pd.DataFrame([{**summary_row(r), "verdict": verdict(r)} for r in both.results])
    assert plot(curves(both), summ, tmp_path / "curves.png", "s2r").stat().st_size > 10_000
    single = Target("one", "s2r", (items[0],))
    assert verdict(run_target(single, neutral_coefficients("roofline7+layers"), 1e-2, seeds=(1,),
                              trace_of=lambda k: traces[k])).startswith("cannot show: 1 measured")


def test_the_committed_predictions_cover_every_step_of_every_strategy():
    path = ROOT / "benchmarks" / "results" / "s2r-onboarding.csv"
    if not path.is_file():
        pytest.skip("benchmarks/results/s2r-onboarding.csv not written yet (benchmarks/onboarding.py)")
    from rooflab.evaluation.onboarding import s2r_targets

    df = pd.read_csv(path)
    assert list(df.columns) == ["target", "strategy", "step", "gpu_hours", "exp_id", "metric", "predicted_ms"]
    targets = {t.name: t for t in s2r_targets()}
    assert set(df["target"]) == set(targets)
    for (name, strategy, step), g in df.groupby(["target", "strategy", "step"]):
        t = targets[name]
        want = {i.key for i in t.pool} if strategy == "leave-one-out" else {i.key for i in t.items}
        assert set(g["exp_id"].astype(str)) == want, (name, strategy, step)
        assert len(g) == len(want) * len(METRICS)
        assert g.loc[g["metric"] == "e2e_mean", "predicted_ms"].notna().all()
    for name, t in targets.items():
        steps = df[(df["target"] == name) & (df["strategy"] == "targeted")]["step"]
        assert sorted(set(steps)) == list(range(len(t.pool) + 1))


# ---------------------------------------------------------------------------------------------- rooflab onboard
def run_outside(state, cluster: Store) -> list[str]:
    """'Run' every proposed config on the twin (a cluster job) and hand the run folders back."""
    lines = []
    for rid, point in state.waiting().items():
        cfg = yaml.safe_load((state.proposal_dir(max(int(p["iteration"]) for p in state.plans.plans()))
                              / f"{rid}.yaml").read_text())
        validate_config(cfg, rid)  # a ready inference-perf config
        assert cfg["storage"]["local_storage"]["path"] == f"results/{rid}"
        run_one(cluster, DirectLauncher(), "cluster", rid, point, 0)
        lines += [i.line() for i in ingest(state, [cluster.root / "runs" / rid])]
    return lines


def test_onboard_end_to_end_against_the_twin(tmp_path):
    setup = OnboardSetup("llama-3.1-8b", "H100-SXM", 1, vllm_version="0.15.1", template=tiny_template(tmp_path),
                         batch_size=2, max_iterations=5)
    state = create_state(tmp_path / "state", setup, neutral_coefficients("roofline7+layers"))
    cluster = Store(tmp_path / "cluster")
    with pytest.raises(InputError, match="an onboarding already lives here"):
        create_state(tmp_path / "state", setup, neutral_coefficients("roofline7+layers"))
    out = onboard(open_state(tmp_path / "state"), report=lambda _: None)
    assert len(out.waiting) == 2 and not out.stopped
    plan = (state.proposal_dir(0) / "PLAN.md").read_text()
    assert "vllm serve" in plan and "--tensor-parallel-size 1" in plan and "GPU-minutes" in plan and "pins" in plan
    assert "D-optimal:" in plan and "shrinks the posterior sd of" in plan
    with pytest.raises(InputError, match="cannot tell which proposed run"):
        ingest(state, [tmp_path])
    iterations = 0
    while not out.stopped:
        st = open_state(tmp_path / "state")  # resumed from disk every time, as across days
        lines = run_outside(st, cluster)
        assert lines and all(": ok," in x for x in lines)
        last = st.campaign.runs([SweepPoint.from_dict(p["point"]) for p in st.plans.plans()[-1]["points"]])
        assert ingest(st, [cluster.root / "runs" / last[0][0]])[0].skipped  # handing a result back twice is harmless
        out = onboard(st, report=lambda _: None)
        iterations += 1
        assert iterations <= 5
    assert out.stopped and (out.converged or "cap" in out.stop_reason or "candidate" in out.stop_reason)
    fits = open_state(tmp_path / "state").fits()
    assert len(fits) == out.iterations and fits[-1]["stop"]["stop"]
    assert all(f["prequential"] is not None for f in fits)
    coefs = json.loads((tmp_path / "state" / "coefficients.json").read_text())
    assert coefs["variant"] == "roofline7+layers" and coefs["beta"]["beta1"]["value"] > 0
    again = onboard(open_state(tmp_path / "state"), report=lambda _: None)  # finished: nothing more happens
    assert again.stopped and not again.records and not again.waiting


def test_rooflab_onboard_cli(tmp_path, capsys):
    from cli.main import main

    prior = tmp_path / "fits.json"
    c = neutral_coefficients("roofline7+layers")
    c.source = "rooflab-best: roofline7+layers λ=0.01"
    prior.write_text(json.dumps({"rooflab-best": c.to_dict()}))
    args = ["onboard", "--state", str(tmp_path / "st"), "--prior", str(prior), "--template", tiny_template(tmp_path),
            "--no-mlflow"]
    assert main(args + ["--tp", "1"]) == 2
    assert "error: --model: required to start an onboarding" in capsys.readouterr().err
    assert main(args + ["--model", "llama-3.1-8b", "--hardware", "H100-SXM", "--tp", "0"]) == 2
    assert "--tp: must be >= 1" in capsys.readouterr().err
    assert main(args + ["--model", "llama-3.1-8b", "--hardware", "H100-SXM", "--tp", "1"]) == 0
    out = capsys.readouterr().out
    assert "waiting for 2 run(s)" in out and "rooflab onboard ingest" in out
    assert "GPU-minutes" in out and " pins " in out and "inference-perf -c " in out and "vllm serve" in out
    assert main(args + ["--model", "qwen3-14b"]) == 2
    assert "this onboarding is of llama-3.1-8b, not qwen3-14b" in capsys.readouterr().err
    st = open_state(tmp_path / "st")
    cluster = Store(tmp_path / "cluster")
    rid, point = next(iter(st.waiting().items()))
    run_one(cluster, DirectLauncher(), "cluster", rid, point, 0)
    assert main(["onboard", "ingest", "--state", str(tmp_path / "st"), "--no-mlflow", "--no-continue",
                 str(cluster.root / "runs" / rid)]) == 0
    assert f"ingested {rid}: ok" in capsys.readouterr().out
    assert main(["onboard", "status", "--state", str(tmp_path / "st")]) == 0
    assert "1 run(s) waiting" in capsys.readouterr().out
    assert main(args + ["--fast"]) == 0  # the rest collected in place on the twin, to the stop
    out = capsys.readouterr().out
    assert "stopped: " in out and "coefficients.json" in out


def test_ingest_of_an_inference_perf_output(tmp_path):
    """A proposed run answered by inference-perf's per-request output (written here from a twin run)."""
    setup = OnboardSetup("llama-3.1-8b", "H100-SXM", 1, template=tiny_template(tmp_path), batch_size=1)
    state = create_state(tmp_path / "state", setup, neutral_coefficients("roofline7+layers"))
    onboard(state, report=lambda _: None)
    rid, point = next(iter(state.waiting().items()))
    cluster = Store(tmp_path / "cluster")
    run_one(cluster, DirectLauncher(), "cluster", rid, point, 0)
    q = pd.read_parquet(cluster.root / "runs" / rid / "tables" / "requests.parquet")
    t0 = q["arrived_us"].min()
    doc = [{"start_time": (r.arrived_us - t0) / 1e6, "end_time": (r.departed_us - t0) / 1e6,
            "request": json.dumps({"prompt": "x"}), "response": "", "info": {
                "input_tokens": int(r.prompt_tokens), "response_metrics": {
                    "output_tokens": int(r.output_tokens),
                    "output_token_times": [(r.first_token_us - t0) / 1e6]}}, "error": None} for r in q.itertuples()]
    out_dir = tmp_path / "results" / rid
    out_dir.mkdir(parents=True)
    (out_dir / "per_request_lifecycle_metrics.json").write_text(json.dumps(doc))
    got = ingest(state, [out_dir])
    assert got[0].run_id == rid and got[0].status in ("ok", "saturated") and got[0].requests == len(q)
    tr = read_store_trace(state.store, rid)
    assert tr.requests["ttft_us"].mean() == pytest.approx((q["first_token_us"] - q["arrived_us"]).mean(), rel=1e-6)
    assert (state.store.run_dir(rid).path / "raw" / rid / "per_request_lifecycle_metrics.json").is_file()
    with pytest.raises(InputError, match="--run"):
        ingest(state, [out_dir, out_dir], run=rid)


def test_ingest_of_a_blis_trace(tmp_path):
    """A proposed run answered by a BLIS trace (TraceV3 written here from a twin run)."""
    from rooflab.replay.blis_output import blis_header_for, write_blis_trace

    setup = OnboardSetup("llama-3.1-8b", "H100-SXM", 1, template=tiny_template(tmp_path), batch_size=1)
    state = create_state(tmp_path / "state", setup, neutral_coefficients("roofline7+layers"))
    onboard(state, report=lambda _: None)
    rid, point = next(iter(state.waiting().items()))
    cluster = Store(tmp_path / "cluster")
    run_one(cluster, DirectLauncher(), "cluster", rid, point, 0)
    measured_trace = read_store_trace(cluster, rid)
    out_dir = tmp_path / "blis" / rid
    write_blis_trace(measured_trace.requests, {**blis_header_for(measured_trace), "mode": "real"}, out_dir)
    got = ingest(state, [out_dir])
    assert got[0].run_id == rid and got[0].status in ("ok", "saturated")
    assert got[0].requests == len(measured_trace.requests)
    tr = read_store_trace(state.store, rid)
    ok = ~measured_trace.requests["failed"].to_numpy(bool)
    assert tr.requests["e2e_us"].mean() == pytest.approx(measured_trace.requests["e2e_us"][ok].mean(), rel=1e-3)
    assert not state.waiting()
    assert ingest(state, [out_dir])[0].skipped  # handed back twice: left alone
    with pytest.raises(InputError, match="names no proposed run"):
        ingest(state, [out_dir], run="w9-nope")


def test_setup_documents_are_checked(tmp_path):
    with pytest.raises(InputError, match="tp: expected an integer >= 1"):
        OnboardSetup.from_dict({"model": "m", "hardware": "h", "tp": 0}, "setup.json")
    with pytest.raises(InputError, match="not an onboarding state folder"):
        open_state(tmp_path)
    setup = OnboardSetup("llama-2-7b", "H100-SXM", 1, template=tiny_template(tmp_path))
    state = create_state(tmp_path / "s", setup, neutral_coefficients("roofline7+layers"))
    assert state.campaign.engine["max_model_len"] <= 4096  # capped at the model's
    assert replace(setup, tp=2).name != setup.name


def test_rooflab_onboard_logs_to_mlflow_like_a_campaign(tmp_path, capsys):
    from cli.main import main
    from tracking.store import existing_tracking

    prior = tmp_path / "fits.json"
    prior.write_text(json.dumps({"rooflab-best": neutral_coefficients("roofline7+layers").to_dict()}))
    args = ["onboard", "--model", "llama-3.1-8b", "--hardware", "H100-SXM", "--tp", "1", "--state",
            str(tmp_path / "st"), "--prior", str(prior), "--template", tiny_template(tmp_path), "--mlruns",
            str(tmp_path / "ml"), "--fast"]
    assert main(args) == 0
    capsys.readouterr()
    ts = existing_tracking(tmp_path / "ml")
    exp = ts.client.get_experiment_by_name("rooflab/onboard-llama-3.1-8b-tp1-H100-SXM")
    runs = ts.client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("rooflab.role") == "campaign"]
    children = [r for r in runs if r.data.tags.get("rooflab.role") == "iteration"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED" and parent[0].data.tags["rooflab.stop_reason"]
    assert children and all(r.info.status == "FINISHED" for r in children)
    assert {"prequential.e2e_mean", "beta1", "beta1.sd", "gpu_hours"} <= set(children[0].data.metrics)
    assert main(args) == 0  # resumed after the stop: nothing logged twice
    assert len(ts.client.search_runs([exp.experiment_id])) == len(runs)
