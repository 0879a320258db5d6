"""Request-level replay (issue 7): scheduler parity with the twin, the fitted step timer, metrics, readers."""

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rooflab.data.trace_readers import read_inference_perf, read_trace
from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.model.arch import load_model
from rooflab.model.coefficients import (
    Coefficients,
    blis_coefficients,
    load_coefficients,
)
from rooflab.model.engine_config import EngineConfig
from rooflab.model.features import Setting, compute_features
from rooflab.model.hardware import load_hardware
from rooflab.model.step_timer import FittedStepTimer, RecordedStepTimer, make_step_timer
from rooflab.model.variants import get_variant
from rooflab.replay.metrics import compare, grade
from rooflab.replay.predict import replay
from rooflab.twin.engine import Engine, Request
from rooflab.twin.simulate import RecordedOverheads, simulate
from rooflab.twin.truth import TruthModel

H100 = load_hardware("H100-SXM")
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not (REAL / "requests").is_dir(), reason="../shared/data/real not beside the project")
COEFS = Coefficients({"beta1": 1.1, "beta2": 1.3, "beta3": 1.05, "beta4": 1.2, "beta5": 1.4, "beta6": 20.0,
                      "beta7": 300.0, "beta_layer": 12.0}, (12000.0, 800.0, 40.0), "roofline7+layers")


def _workload(n=260, seed=3, groups=6):
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1e6 / 25.0, n))
    prompt = rng.integers(40, 1500, n)
    out = rng.integers(1, 300, n)
    grp = rng.integers(0, groups, n)
    return pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "arrival_us": arr, "prompt_tokens": prompt,
                         "output_tokens": out, "prefix_group": [f"g{g}" for g in grp],
                         "prefix_tokens": np.minimum(prompt, 200), "failed": False})


def _twin_trace(model="llama-3.1-8b", tp=1, config=None, n=260):
    """A trace produced by the twin (hidden truth step times and sampled α), with its own request table."""
    arch = load_model(model)
    truth = TruthModel.from_config("H100-SXM", arch, tp, seed=7)
    config = config or EngineConfig(max_num_seqs=48, max_num_batched_tokens=1024, num_gpu_blocks=900,
                                    enable_prefix_caching=True)
    w = _workload(n)
    reqs = [Request(r.request_id, r.arrival_us, int(r.prompt_tokens), int(r.output_tokens), True, None,
                    r.prefix_group, int(r.prefix_tokens)) for r in w.itertuples()]
    sim = simulate(Engine(arch, H100, tp, truth, config), reqs, overheads=truth)
    return w, sim, config


def test_scheduler_parity_with_the_twin():
    """Replaying a twin trace with the twin's true step times and overheads reproduces its TTFT / E2E exactly
    (chunked prefill, prefix caching and preemption included)."""
    w, sim, config = _twin_trace()
    t = sim.requests.set_index("request_id")
    assert (t["preemptions"] > 0).any() and (t["status"] == "length").all()  # the trace exercises preemption
    api = (t["queued_us"] - t["arrived_us"]).to_dict()
    post = (t["departed_us"] - t["finished_us"]).to_dict()
    trace = Trace("twin", "llama-3.1-8b", 1, "H100-SXM", {k: getattr(config, k) for k in (
        "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "enable_prefix_caching")},
        w.assign(ttft_us=np.nan, e2e_us=np.nan, itl_us=np.nan))
    res = replay(trace, timer=RecordedStepTimer(sim.steps["step_time_us"]), overheads=RecordedOverheads(api, post))
    p = res.requests.set_index("request_id")
    twin_ttft = (t["first_token_us"] - t["arrived_us"]).reindex(p.index)
    twin_e2e = (t["departed_us"] - t["arrived_us"]).reindex(p.index)
    assert res.n_steps == len(sim.steps)
    np.testing.assert_allclose(p["pred_ttft_us"], twin_ttft, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p["pred_e2e_us"], twin_e2e, rtol=0, atol=1e-6)
    assert res.stats["preemptions"] == int(t["preemptions"].sum())


@pytest.mark.parametrize("model,tp,formulas,variant", [
    ("llama-3.1-8b", 1, "vllm", "roofline7+layers"), ("mixtral-8x7b", 2, "vllm", "roofline7+layers"),
    ("deepseek-v2-lite", 2, "vllm", "roofline7+layers"), ("llama-2-70b", 4, "design", "roofline7+layers"),
    ("llama-3.1-8b", 1, "vllm", "roofline7+layers+attn"), ("deepseek-v2-lite", 2, "vllm", "roofline7+layers+attn"),
    ("llama-2-70b", 4, "design", "roofline7+layers+attn")])
def test_fitted_timer_equals_the_feature_model(model, tp, formulas, variant):
    """The scalar step timer gives exactly variant.predict(compute_features(...)) of the fit."""
    arch = load_model(model)
    rng = np.random.default_rng(1)
    n = 200
    P = rng.integers(0, 4, n).astype(float)
    T = np.where(P > 0, rng.integers(1, 2048, n), 0).astype(float)
    C = np.where(P > 0, rng.integers(0, 3000, n), 0).astype(float)
    A = np.where(P > 0, T * C / np.maximum(P, 1) + T * (T / np.maximum(P, 1) + 1) / 2, 0)
    logits = np.minimum(P, rng.integers(0, 3, n))
    D = rng.integers(0, 128, n).astype(float)
    D[(P == 0) & (D == 0)] = 1
    Cd = D * rng.integers(10, 3000, n)
    beta = {**COEFS.beta, **({"beta1_attn": 2.7} if variant.endswith("+attn") else {})}
    c = Coefficients(beta, COEFS.alpha, variant, formulas)
    timer = FittedStepTimer(c, arch, H100, tp)
    got = np.array([timer.time_from_aggregates(*row) for row in zip(P, T, C, A, logits, D, Cd)])
    feats = compute_features(Setting(arch, H100, tp, formulas), {
        "prefill_reqs": P, "prefill_tokens": T, "prefill_context": C, "prefill_attn_pairs": A,
        "prefill_logits": logits, "decode_reqs": D, "decode_context": Cd})
    v = get_variant(variant)
    want = v.predict(feats, np.array([c.beta[k] for k in v.names]))
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_the_attention_split_with_one_beta_is_the_unsplit_model():
    """f_pf_dense + f_pf_attn = f_prefill, so beta1_attn = beta1 reproduces roofline7+layers exactly; the attention
    share grows with the context (n·c pairs) while the dense share does not."""
    arch = load_model("llama-3.1-8b")
    s = Setting(arch, H100, 1, "vllm")
    C = np.array([0.0, 1000.0, 8000.0])
    f = compute_features(s, {"prefill_reqs": np.ones(3), "prefill_tokens": np.full(3, 512.0), "prefill_context": C,
                             "prefill_attn_pairs": 512 * C + 512 * 513 / 2, "prefill_logits": np.ones(3),
                             "decode_reqs": np.zeros(3), "decode_context": np.zeros(3)})
    np.testing.assert_allclose(f["f_pf_dense"] + f["f_pf_attn"], f["f_prefill"], rtol=1e-12)
    assert np.all(np.diff(f["f_pf_attn"]) > 0) and np.allclose(f["f_pf_dense"], f["f_pf_dense"][0])
    one = {**COEFS.beta, "beta1_attn": COEFS.beta["beta1"]}
    a = get_variant("roofline7+layers+attn").predict(f, np.array([one[k] for k in get_variant(
        "roofline7+layers+attn").names]))
    b = get_variant("roofline7+layers").predict(f, np.array([COEFS.beta[k] for k in get_variant(
        "roofline7+layers").names]))
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_replay_with_fitted_coefficients_uses_alpha_and_never_the_truth():
    w, sim, config = _twin_trace(n=120)
    trace = Trace("twin", "llama-3.1-8b", 1, "H100-SXM", {"max_num_seqs": 48, "max_num_batched_tokens": 1024,
                                                          "num_gpu_blocks": 900, "enable_prefix_caching": True},
                  w.assign(ttft_us=np.nan, e2e_us=np.nan, itl_us=np.nan))
    res = replay(trace, COEFS)
    r = res.requests
    assert not r["pred_failed"].any()
    # α0 sits between arrival and the queue; α1 + α2·n_out between the last token and departure
    np.testing.assert_allclose(r["queued_us"] - r["arrival_us"], 12000.0)
    np.testing.assert_allclose(r["arrival_us"] + r["pred_e2e_us"] - r["finished_us"], 800 + 40 * r["output_tokens"])
    assert (r["pred_ttft_us"] > 12000).all()
    # predictions differ from the twin's own (the fitted model is not the truth)
    assert not np.allclose(r["pred_e2e_us"].to_numpy(), (sim.requests["departed_us"] - sim.requests["arrived_us"]))


def test_client_timeouts_abort_requests_in_an_overloaded_replay():
    w = _workload(n=200)
    w["arrival_us"] = np.arange(200) * 2000.0  # 500 req/s: far beyond capacity
    trace = Trace("over", "llama-3.1-8b", 1, "H100-SXM", {"max_num_seqs": 16, "max_num_batched_tokens": 512,
                                                          "num_gpu_blocks": 2000},
                  w.assign(ttft_us=np.nan, e2e_us=np.nan, itl_us=np.nan), timeout_s=2.0)
    res = replay(trace, COEFS)
    assert res.stats["aborted"] > 0 and res.stats["max_waiting"] > 50
    failed = res.requests["pred_failed"]
    assert failed.sum() == res.stats["aborted"]
    ok = res.requests[~failed]
    assert (ok["pred_e2e_us"] <= 2e6 + 1e5).all()  # nothing finishes long after the client gave up
    no_timeout = replay(trace, COEFS, timeout=False)
    assert not no_timeout.requests["pred_failed"].any()


def _frame(meas, pred, metric="e2e", failed=None):
    n = len(meas)
    d = {"failed": np.zeros(n, bool) if failed is None else failed, "pred_failed": np.zeros(n, bool)}
    for m in ("ttft", "itl", "e2e"):
        d[f"{m}_us"] = np.asarray(meas, float)
        d[f"pred_{m}_us"] = np.asarray(pred, float)
    return pd.DataFrame(d)


def test_metrics_and_grade():
    meas = np.array([100.0, 200, 300, 400])
    c = compare(_frame(meas, meas * 1.1))
    assert c["e2e"]["mean_ape"] == pytest.approx(0.1)
    assert c["e2e"]["request_mape"] == pytest.approx(0.1)
    assert c["e2e"]["p90_ape"] == pytest.approx(0.1)
    assert c["e2e"]["pearson_r"] == pytest.approx(1.0)
    assert c["e2e"]["grade"] == "good"
    c = compare(_frame(meas, [110.0, 190, 310, 390]))
    assert c["e2e"]["mean_ape"] == pytest.approx(0.0)
    assert c["e2e"]["request_mape"] == pytest.approx((0.1 + 0.05 + 1 / 30 + 0.025) / 4)
    # failed requests (measured) are counted, never compared
    c = compare(_frame([100.0, 1e9, 300], [100.0, 5, 300], failed=np.array([False, True, False])))
    assert c["measured_failed"] == 1 and c["e2e"]["n"] == 2 and c["e2e"]["mean_ape"] == 0
    assert [grade(0.05, 0.96), grade(0.05, 0.9), grade(0.3, 0.75), grade(0.3, 0.5), grade(0.5, 0.99)] == \
        ["excellent", "good", "fair", "poor", "poor"]


# ---------------------------------------------------------------------------------------------------
# readers: one-line errors


def _gz(path: Path, doc):
    with gzip.open(path, "wt") as fh:
        fh.write(doc if isinstance(doc, str) else json.dumps(doc))


def _real_root(tmp_path: Path, requests=None, truth=None):
    name = "20260101-000000-llama-2-7b-tp1-general"
    (tmp_path / "requests").mkdir()
    (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / name / "exp-config.yaml").write_text("model: meta-llama/Llama-2-7b-hf\ntensor_parallelism: 1\n"
                                                              "max_num_seqs: 128\nmax_num_batched_tokens: 2048\n")
    reqs = requests or {"config": {"kv_blocks_total_gpu": 1000, "block_size": 16}, "requests": [
        {"index": i, "arrival_time_us": 1000.0 * i, "input_tokens": 100, "output_tokens": 20, "has_error": False,
         "prefix_group": ""} for i in range(5)]}
    gt = truth or [{"index": i, "has_error": False, "ttft_s": 0.02, "e2e_s": 0.5} for i in range(5)]
    _gz(tmp_path / "requests" / f"{name}.json.gz", reqs)
    _gz(tmp_path / "requests" / f"{name}_ground_truth.json.gz", gt)
    return name


def _one_line(exc: InputError) -> str:
    s = str(exc)
    assert "\n" not in s
    return s


def test_real_reader_accepts_a_minimal_run_and_rejects_malformed_files(tmp_path):
    name = _real_root(tmp_path)
    tr = read_trace(name, root=tmp_path)
    assert tr.n_requests == 5 and tr.engine["num_gpu_blocks"] == 1000
    np.testing.assert_allclose(tr.requests["itl_us"], (0.5 - 0.02) / 19 * 1e6)
    bad = tmp_path / "requests" / f"{name}_ground_truth.json.gz"
    bad.write_bytes(gzip.compress(b'[{"index": 0, "has_error": false, "e2e_s": '))
    with pytest.raises(InputError) as e:
        read_trace(name, root=tmp_path)
    assert "malformed JSON" in _one_line(e.value) and bad.name in str(e.value)
    _gz(bad, [{"index": i, "has_error": False, "ttft_s": 0.02} for i in range(5)])
    with pytest.raises(InputError) as e:
        read_trace(name, root=tmp_path)
    assert "[0].e2e_s: missing" in _one_line(e.value)


def test_inference_perf_reader(tmp_path):
    rows = [{"start_time": 10.0 + i, "end_time": 10.5 + i, "error": None,
             "info": {"input_tokens": 100, "response_metrics": {"output_tokens": 11,
                                                                "output_token_times": [10.05 + i, 10.1 + i]}}}
            for i in range(3)]
    rows.append({"start_time": 20.0, "end_time": 21.0, "error": {"error_type": "timeout"},
                 "info": {"input_tokens": 100, "response_metrics": {}}})
    p = tmp_path / "per_request_lifecycle_metrics.json"
    p.write_text(json.dumps(rows))
    tr = read_inference_perf(p, model="llama-3.1-8b", tp=1, time_scale=2.0)
    r = tr.requests
    np.testing.assert_allclose(r["arrival_us"], [0, 2e6, 4e6, 20e6])
    np.testing.assert_allclose(r["ttft_us"][:3], 0.1e6)  # × time_scale
    np.testing.assert_allclose(r["itl_us"][:3], (1e6 - 0.1e6) / 10)
    assert r["failed"].tolist() == [False, False, False, True]
    for broken, where in ((rows[:1] + [{"end_time": 3.0, "info": {}}], "[1].start_time"),
                          ([{**rows[0], "info": {"response_metrics": {}}}], "[0].info.input_tokens"),
                          ([{**rows[0], "info": {"input_tokens": 5, "response_metrics": {"output_tokens": 3}}}],
                           "output_token_times")):
        p.write_text(json.dumps(broken))
        with pytest.raises(InputError) as e:
            read_inference_perf(p, model="llama-3.1-8b", tp=1)
        assert where in _one_line(e.value)
    p.write_text("[{")
    with pytest.raises(InputError) as e:
        read_inference_perf(p, model="llama-3.1-8b", tp=1)
    assert "malformed JSON" in _one_line(e.value)


def test_coefficient_files(tmp_path):
    b = tmp_path / "blis.yaml"
    b.write_text("trained_physics_coefficients:\n  alpha_coeffs: [1, 2, 3]\n  beta_coeffs: [0.2, 0, 1.3, 0.7, 30, 4, "
                 "120, 480, 0, 1.9, 0.7]\n")
    c = load_coefficients(b)  # BLIS's layout loads term for term as rooflab's BLIS variant
    assert c.variant == "blis-tp11" and c.formulas == "blis" and c.alpha == (1, 2, 3)
    assert c.beta == {"beta1a": 0.2, "beta2a": 0, "beta3": 1.3, "beta4": 0.7, "beta5": 30, "beta6": 4, "beta7": 120,
                      "beta8": 480, "beta1b": 0, "beta2b": 1.9, "beta_ep": 0.7}
    b.write_text("trained_physics_coefficients:\n  alpha_coeffs: [1, 2, 3]\n  beta_coeffs: [0.2, 0, 1.3, 0.7, 30, "
                 "4, 120, 480, 0, 1.9]\n")
    assert load_coefficients(b).variant == "blis-tp10"
    b.write_text("trained_physics_coefficients:\n  alpha_coeffs: [1, 2]\n  beta_coeffs: []\n")
    with pytest.raises(InputError) as e:
        load_coefficients(b)
    assert "alpha_coeffs: expected 3 non-negative numbers" in _one_line(e.value)
    j = tmp_path / "fit.json"
    j.write_text(json.dumps({"beta": {"coefficients": {"beta1": {"value": "x"}}}}))
    with pytest.raises(InputError) as e:
        load_coefficients(j)
    assert "beta.beta1.value" in _one_line(e.value)
    j.write_text(json.dumps(COEFS.to_dict()))
    back = load_coefficients(j)
    assert back.beta == COEFS.beta and back.alpha == COEFS.alpha and back.variant == "roofline7+layers"
    with pytest.raises(InputError):
        blis_coefficients({"nope": 1})


@needs_real
def test_real_run_window_replay_with_blis_coefficients():
    c = load_coefficients(REAL / "blis" / "defaults.yaml")
    tr = read_trace("20260218-150956-codellama-34b-tp2-codegen", root=REAL).window(60, 120, lead_s=30)
    res = replay(tr, c)
    m = compare(res)
    assert m["compared"] > 300 and m["predicted_failed"] == 0
    for k in ("ttft", "itl", "e2e"):
        assert 0 <= m[k]["mean_ape"] < 1 and np.isfinite(m[k]["pearson_r"])
    assert tr.engine["enable_prefix_caching"] and tr.requests["prefix_group"].str.startswith("slot").all()


def test_store_replay_error_for_the_stop_rule(tmp_path):
    """Held-out replay error from data store request tables (what the campaign's stop rule can call)."""
    from rooflab.replay.heldout import store_replay_error

    w, sim, config = _twin_trace(n=100)
    run = tmp_path / "runs" / "v1-abc"
    (run / "tables").mkdir(parents=True)
    sim.requests.assign(run_id="v1-abc").to_parquet(run / "tables" / "requests.parquet")
    engine = {"max_num_seqs": 48, "max_num_batched_tokens": 1024, "num_gpu_blocks": 900}
    (run / "manifest.json").write_text(json.dumps({
        "run_id": "v1-abc", "campaign": "c", "status": "ok", "model": "llama-3.1-8b", "tp": 1, "hardware": "H100-SXM",
        "family": "V1", "split": "validation", "point": {"engine": engine, "params": {"rate": 25}}}))
    err = store_replay_error(tmp_path, COEFS, campaign="c")
    assert err["n_runs"] == 1 and set(err["runs"]) == {"v1-abc"}
    one = err["runs"]["v1-abc"]
    assert one["compared"] == 100 and err["e2e"] == one["e2e"]["mean_ape"] > 0
    assert store_replay_error(tmp_path, COEFS, campaign="c", split="train")["n_runs"] == 0


def test_cli_replay_and_calibrate_e2e(tmp_path, capsys):
    from cli.main import main

    _, sim, _ = _twin_trace(n=120)
    table = tmp_path / "requests.parquet"
    sim.requests.to_parquet(table)
    coefs = tmp_path / "coefs.json"
    coefs.write_text(json.dumps(COEFS.to_dict()))
    settings = ["--model", "llama-3.1-8b", "--tp", "1", "--num-gpu-blocks", "900", "--max-num-seqs", "48",
                "--max-num-batched-tokens", "1024"]
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(table), *settings, "--json",
                 "--out", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.png")]) == 0
    doc = json.loads(capsys.readouterr().out)
    run = doc["runs"]["requests"]
    assert run["compared"] == 120 and run["e2e"]["grade"] in ("excellent", "good", "fair", "poor")
    assert (tmp_path / "p.png").stat().st_size > 0 and json.loads((tmp_path / "m.json").read_text()) == doc
    out = tmp_path / "e2e.json"
    assert main(["calibrate-e2e", "--requests", str(table), *settings, "--iterations", "2", "--polish", "2",
                 "--window-s", "0", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    hist = res["calibration"]["history"]
    assert hist[-1]["objective"] <= hist[0]["objective"] or min(h["objective"] for h in hist) < hist[0]["objective"]
    assert main(["replay", "--coefficients", str(out), "--requests", str(table), *settings]) == 0
    assert "E2E" in capsys.readouterr().out
    # malformed input: one line on stderr, exit code 2
    bad = tmp_path / "per_request_lifecycle_metrics.json"
    bad.write_text('[{"start_time": 1}]')
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(bad), "--model", "llama-3.1-8b",
                 "--tp", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "[0].end_time" in err[0]


def test_run_mean_itl_is_over_inter_token_intervals():
    """A request with 2 tokens and a huge ITL must not dominate the run's mean ITL (Σ gaps / Σ intervals)."""
    f = _frame([10.0, 1000.0], [10.0, 10.0])
    f["output_tokens"] = [1001, 2]
    c = compare(f)
    assert c["itl"]["measured_mean_ms"] == pytest.approx((10 * 1000 + 1000) / 1001 / 1e3)
    assert c["itl"]["mean_ape"] == pytest.approx(990 / 1001 / ((10 * 1000 + 1000) / 1001))
    assert c["e2e"]["mean_ape"] == pytest.approx(abs(10 - 505) / 505)


def test_closed_loop_client_caps_requests_in_flight():
    """max_concurrency: a request is sent when a slot frees; the client's TTFT/E2E count from that send."""
    import pandas as pd

    from rooflab.model.engine_config import EngineConfig as _EC
    from rooflab.twin.engine import Engine as _Engine
    from rooflab.twin.simulate import ConstantOverheads, run_requests

    arch = load_model("llama-3.1-8b")
    timer = make_step_timer(COEFS, arch, H100, 1)
    reqs = [Request(f"r{i}", 0.0, 200, 20) for i in range(12)]
    loop = run_requests(_Engine(arch, H100, 1, timer, _EC()), reqs, overheads=ConstantOverheads((1000, 500, 10)),
                        max_concurrency=3)
    sends = sorted(r.arrival_us for r in reqs)
    deps = sorted(r.departed_us for r in reqs)
    assert sends[:3] == [0.0, 0.0, 0.0] and all(r.status == "length" for r in reqs)
    # every later send is exactly a departure: request k+3 leaves when the k-th response completes
    assert sends[3:] == pytest.approx(deps[:9])
    in_flight = max(sum(r.arrival_us <= t < r.departed_us for r in reqs) for t in sends)
    assert in_flight == 3 and loop.n_steps > 0
    # the replay path: a trace with a cap reports the send times
    frame = pd.DataFrame({"request_id": [f"q{i}" for i in range(8)], "arrival_us": 0.0, "prompt_tokens": 200.0,
                          "output_tokens": 20.0, "prefix_group": None, "prefix_tokens": 0.0, "failed": False,
                          "ttft_us": np.nan, "e2e_us": np.nan, "itl_us": np.nan})
    capped = replay(Trace("c", "llama-3.1-8b", 1, "H100-SXM", {}, frame, max_concurrency=2), COEFS).requests
    free = replay(Trace("c", "llama-3.1-8b", 1, "H100-SXM", {}, frame), COEFS).requests
    assert (capped.pred_send_us > 0).sum() == 6 and capped.pred_e2e_us.max() < free.pred_e2e_us.max()
