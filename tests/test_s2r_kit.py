"""The sim-to-real kit loader (rooflab.data.s2r), its workload generators (rooflab.data.workload_spec) and the kit's
run-summary metrics (rooflab.replay.summary_metrics): on the real kit, and on hand-made cases."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rooflab.data.s2r import METRIC_NAMES, OVERALL, S2RKit, load_kit
from rooflab.data.workload_spec import (
    SharedPrefix,
    Stage,
    WorkloadSpec,
    blis_stream,
    distribute_evenly,
    experiment_trace,
    generate,
    inference_perf_stream,
    retime_stages,
)
from rooflab.errors import InputError
from rooflab.model.arch import load_model
from rooflab.paths import REAL_DATA_DIR, S2R_DIR
from rooflab.replay.summary_metrics import ape, ape_table, assign_stages, median_ape, summarize_run

needs_kit = pytest.mark.skipif(not (S2R_DIR / "experiments.json").is_file(), reason="../shared/data/s2r not present")
needs_real = pytest.mark.skipif(not (REAL_DATA_DIR / "requests").is_dir(), reason="../shared/data/real not present")
WITHHELD = {14, 18, 23, 26, 28, 31, 38, 41, 46, 50, 55, 59}
TRAP5 = {2: "20260218-150956-codellama-34b-tp2-codegen", 3: "20260218-155500-codellama-34b-tp2-roleplay",
         6: "20260217-203421-llama-2-70b-hf-tp4-codegen", 7: "20260218-084319-llama-2-70b-tp4-roleplay",
         9: "20260218-130541-mixtral-8x7b-v0-1-tp2-general", 10: "20260218-120914-mixtral-8x7b-v0-1-tp2-codegen",
         11: "20260218-141024-mixtral-8x7b-v0-1-tp2-roleplay"}


@pytest.fixture(scope="module")
def kit() -> S2RKit:
    return load_kit()


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((S2R_DIR / "experiments.json").read_text())


# loader


@needs_kit
def test_all_53_load_and_the_12_withheld_have_no_measurements(kit, raw):
    assert len(kit.experiments) == 53 and len(kit.split("eval")) == 38 and len(kit.split("trainval")) == 15
    assert set(kit.withheld_ids) == WITHHELD
    for e in kit.experiments:
        if e.exp_id in WITHHELD:
            assert e.withheld and e.split == "eval" and e.measured is None and e.predictions == {}
        else:
            assert not e.withheld and e.measured is not None and OVERALL in e.measured.stages
            assert e.measured.to_ms_dict() == raw["experiments"][e.index]["actual"]["metrics"]  # verbatim, ms
        assert e.model_config.is_file() and e.hardware in ("H100-SXM", "A100-80GB", "L40S")
        assert e.workload.requests_per_stage and sum(e.workload.requests_per_stage) == e.workload.num_requests
        load_model(e.model_name)  # every kit model loads, by rooflab folder or by the kit's config
    assert len(kit.scored()) == 41


@needs_kit
def test_spot_checks_against_experiments_json(kit):
    e = kit.get(2)
    assert (e.model, e.rooflab_model, e.hardware, e.tp, e.split) == (
        "codellama/CodeLlama-34b-Instruct-hf", "codellama-34b", "H100-SXM", 2, "eval")
    assert (e.engine.max_num_seqs, e.engine.max_num_batched_tokens, e.engine.max_model_len) == (128, 2048, 4096)
    assert e.engine.gpu_memory_utilization == 0.9 and e.engine.total_kv_blocks is None
    assert e.engine.enable_prefix_caching and e.engine.enable_chunked_prefill and e.engine.block_size == 16
    assert e.workload.stages == (Stage(5.0, 600.0), Stage(10.0, 600.0)) and e.workload.profile_shape == "profile"
    sp = e.workload.shared_prefix
    assert (sp.system_prompt_len, sp.question_len, sp.output_len) == (100, 466, 247)
    assert (sp.num_unique_system_prompts, sp.num_users_per_system_prompt, sp.enable_multi_turn_chat) == (11, 4, True)
    assert (sp.num_groups, sp.num_prompts_per_group) == (10, 10)  # what the pinned inference-perf executed
    m = e.measured
    assert m.get("e2e_mean") == 3722.85792777915 and m.get("ttft_p99", "stage_1") == 54.88287404179573
    assert m.get("itl_p90") is None and m.overall.completed == 9000 and m.overall.failures == 0
    assert m.overall.output_len_mean == 249.37766666666667 and m.stages["stage_0"].extras["requested_rate"] == 5.0
    assert e.predictions["blis-trained-physics"].get("e2e_mean") == 4227.676097444445
    assert e.predictions["llmservingsim"].reference.ttft_mean == 71.88389630056918
    t = kit.get(17)  # trainval: KV blocks and BLIS's iter29 outputs
    assert (t.engine.total_kv_blocks, t.engine.cpu_kv_blocks, t.rooflab_model) == (8253, 0, "llama-4-scout-17b-16e-fp8")
    assert t.engine.engine_dict()["num_gpu_blocks"] == 8252  # minus vLLM's null block
    assert t.blis_iter29.get("e2e_mean") == 6467.512167254902 and t.blis_iter29_totals["total_input_tokens"] == 2789700
    assert (t.workload.seed, t.workload.num_requests, t.workload.profile_shape) == (42, 5100, "blis")
    assert kit.get(36).hardware == "A100-80GB" and kit.get(54).hardware == "L40S"
    assert kit.get(24).engine.cpu_offload and "--cpu-offload-gb 4" in kit.get(24).engine.cpu_offload_mechanism
    d = kit.get("20260217-231439")
    assert d.engine.gpu_memory_utilization is None and d.engine.engine_dict()["gpu_memory_utilization"] == 0.9
    assert d.engine.engine_dict()["num_gpu_blocks"] == 7462  # = ../real/ kv_blocks_total_gpu of Llama-2-7B
    assert kit.get(46).workload.stages == (Stage(4.0, 1200.0),) and kit.get(46).withheld


@needs_kit
def test_a_model_rooflab_does_not_ship_fails_in_one_line(kit):
    e = kit.get(49)  # Mixtral-8x22B-Instruct: vocab 32768, no configs/models folder
    assert e.rooflab_model is None and e.model_name == str(e.model_config)
    with pytest.raises(InputError) as exc:
        e.require_rooflab_model()
    msg = str(exc.value)
    assert "\n" not in msg and "experiments[" in msg and "Mixtral-8x22B-Instruct" in msg


@needs_kit
def test_kit_trap5_pairs(kit):
    assert {e.exp_id: e.real_run for e in kit.split("eval") if e.real_run} == TRAP5
    dated = {e.key: e.real_run for e in kit.split("trainval") if e.real_run}
    assert set(dated) == {"20260217-155451", "20260217-162547", "20260217-231439"}
    if (REAL_DATA_DIR / "runs").is_dir():
        assert all((REAL_DATA_DIR / "runs" / r).is_dir() for r in [*TRAP5.values(), *dated.values()])


@needs_kit
@needs_real
def test_summary_metrics_reproduce_the_kit_from_the_request_level_run(kit):
    from rooflab.data.adapters.real_requests import read_real_run

    e = kit.get(2)
    q = read_real_run(e.real_run).requests.copy()
    q["stage"] = (np.arange(len(q)) >= e.workload.requests_per_stage[0]).astype(int)  # sent in stage 0: first 3000
    got = summarize_run(q, ttft="ttft_us", e2e="e2e_us", failed="error").to_ms_dict()
    for stage, errors in ape_table(got, e.measured.to_ms_dict()).items():
        assert max(errors.values()) < 1e-9, stage


# malformed kit


def _mini_kit(tmp_path: Path, mutate) -> Path:
    """A one-experiment kit (eval 2) with its model config, after ``mutate(doc, experiment)``."""
    doc = json.loads((S2R_DIR / "experiments.json").read_text())
    exp = copy.deepcopy(doc["experiments"][0])
    cfg = exp["model_config"]["value"]
    (tmp_path / cfg).parent.mkdir(parents=True)
    shutil.copy(S2R_DIR / cfg, tmp_path / cfg)
    frag = {"experiments": [exp], "withheld_eval_experiments": []}
    mutate(frag, exp)
    (tmp_path / "experiments.json").write_text(json.dumps(frag))
    return tmp_path


@needs_kit
@pytest.mark.parametrize("mutate,expect", [
    (lambda d, e: e["tp"].update(value="two"), "experiments[0].tp.value: expected int, got str 'two'"),
    (lambda d, e: e["engine"].pop("max_num_seqs"), "experiments[0].engine.max_num_seqs: missing"),
    (lambda d, e: e["actual"]["metrics"]["overall"].update(e2e_mean="fast"),
     "experiments[0].actual.metrics.overall.e2e_mean: expected float"),
    (lambda d, e: e["workload"]["requested_profile"]["value"]["load"]["stages"][1].update(rate=-1),
     "experiments[0].workload.requested_profile.value.load.stages[1]: rate and duration must be > 0"),
    (lambda d, e: e["hardware"].update(value="TPU"), "experiments[0].hardware.value: unknown hardware 'TPU'"),
    (lambda d, e: d.update(withheld_eval_experiments=[2]), "experiments[0].actual.withheld: False disagrees"),
    (lambda d, e: e["model_config"].update(value="model_configs/missing/config.json"),
     "experiments[0].model_config.value: no such file"),
    (lambda d, e: e["actual"]["inference_perf_extras"]["overall"].update(successes=[1]),
     "experiments[0].actual.inference_perf_extras.overall.successes: expected float"),
])
def test_malformed_fields_fail_in_one_line_naming_the_field(tmp_path, mutate, expect):
    root = _mini_kit(tmp_path, mutate)
    with pytest.raises(InputError) as exc:
        load_kit(root)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(root / "experiments.json")) and expect in msg, msg


def test_malformed_json_and_missing_kit(tmp_path):
    (tmp_path / "experiments.json").write_text('{"experiments": [')
    with pytest.raises(InputError, match=r"experiments\.json: malformed JSON at line 1"):
        load_kit(tmp_path)
    with pytest.raises(InputError, match="file not found"):
        load_kit(tmp_path / "nowhere")


# generators


SPEC = WorkloadSpec((Stage(5.0, 600.0), Stage(10.0, 600.0)),
                    SharedPrefix(100, 466, 247, 11, 4, True, 10, 10), "codegen", None, 9000)


def test_inference_perf_stream_counts_gaps_recurrence_and_stage_gap():
    s = inference_perf_stream(SPEC, seed=3)
    r = s.requests
    assert list(r.groupby("stage").size()) == [3000, 6000] == [int(5.0 * 600), int(10.0 * 600)]
    assert s.timeout_s == 300.0 and s.stage_gap_s == 2.0 and s.drain_allowance_s == 300.0
    assert (r["output_tokens"] == 247).all() and r["arrival_us"].is_monotonic_increasing
    first, last = r.groupby("stage")["arrival_us"].min(), r.groupby("stage")["arrival_us"].max()
    assert first[1] == pytest.approx(last[0] + 302e6 + r.loc[r.stage == 1, "stage_offset_us"].min())
    for k, dur in ((0, 600.0), (1, 600.0)):
        st = r[r.stage == k]
        assert st["stage_offset_us"].max() == pytest.approx(dur * 1e6, abs=1e-3)  # gaps sum exactly to duration
        assert (st["prompt_slot"].to_numpy() == np.arange(len(st)) % 100).all()
        g = st["prefix_group"].to_numpy()
        assert (g[100:] == g[:-100]).all() and len(set(g[:100])) == 100  # every prompt once per 100, then again
        assert (st["prefix_tokens"] == st["prompt_tokens"]).all()
    assert r[r.stage == 0]["prefix_group"].iloc[0] == r[r.stage == 1]["prefix_group"].iloc[0]  # restarts at n = 0
    per_group = r.drop_duplicates("prefix_group").groupby("system_group")["prefix_group"].nunique()
    assert len(per_group) == 10 and (per_group == 10).all()  # 10 groups x 10 prompts
    assert (r.groupby("prefix_group")["system_group"].nunique() == 1).all()
    gaps = np.diff(r[r.stage == 0]["arrival_us"].to_numpy())
    assert 0.9 < gaps.std() / gaps.mean() < 1.1  # exponential gaps, not evenly spaced


def test_inference_perf_stream_seeds_lengths_and_retime():
    a, b, c = (inference_perf_stream(SPEC, seed=s).requests for s in (7, 7, 8))
    pd.testing.assert_frame_equal(a, b)
    assert not a["arrival_us"].equals(c["arrival_us"])
    exact = inference_perf_stream(SPEC, token_growth=1.0, bos_tokens=0, length_spread=0.0).requests
    assert (exact["prompt_tokens"] == 566).all() and (exact["system_tokens"] == 99).all()
    assert abs(a["prompt_tokens"].mean() / (1 + 566 * 1.045) - 1) < 0.01
    moved = retime_stages(a, [700e6], stage_gap_s=2.0)
    s1 = moved[moved.stage == 1]
    assert np.allclose(s1["arrival_us"], 702e6 + s1["stage_offset_us"]) and len(moved) == len(a)
    with pytest.raises(InputError, match="mode"):
        generate(SPEC, "vllm-bench")


@needs_kit
def test_default_token_growth_matches_the_measured_prompt_lengths(kit):
    for e in kit.experiments:
        measured = e.measured.overall.prompt_len_mean if e.measured else None
        if measured is None:
            continue
        got = generate(e.workload, "inference-perf", seed=1).requests["prompt_tokens"].mean()
        assert abs(got / measured - 1) < 0.015, (e.key, got, measured)


@needs_kit
def test_inference_perf_counts_for_every_experiment(kit):
    for e in kit.experiments:
        r = generate(e.workload, "inference-perf").requests
        want = [int(s.rate * s.duration_s) for s in e.workload.stages]
        assert list(r.groupby("stage").size()) == want, e.key


@needs_kit
def test_blis_stream_client_and_prefix_structure_for_a_trainval_experiment(kit):
    e = kit.get(17)  # 9 x 5 clients, 2.5 then 6 req/s x 600 s, multi-turn
    s = generate(e.workload, "blis")
    r = s.requests
    assert len(r) == 5100 == e.blis_iter29.completed_requests and s.timeout_s == 300.0
    assert r["prompt_tokens"].sum() == e.blis_iter29_totals["total_input_tokens"]  # exact lengths, no BOS
    assert r["output_tokens"].sum() == e.blis_iter29_totals["total_output_tokens"]
    assert list(r.groupby("stage").size()) == [1500, 3600]
    for k, rate in ((0, 2.5), (1, 6.0)):
        st = r[r.stage == k]
        assert st["client_id"].nunique() == 45 and st["client_id"].str.startswith(f"stage-{k}-prompt-").all()
        assert sorted(st.groupby("client_id").size()) == sorted(distribute_evenly(int(rate * 600), 45))
        assert (st["think_time_us"] == int(45 / rate * 1e6)).all()
        users = st.drop_duplicates("client_id").groupby("prefix_group")["client_id"].nunique()
        assert len(users) == 9 and (users == 5).all()
        r0 = st[st["round"] == 0]
        assert (r0["depends_on"].isna()).all() and r0["stage_offset_us"].between(0, 600e6).all()
    assert (r["prefix_tokens"] == 100).all() and (r["closed_loop"]).all()
    ids = dict(zip(zip(r.session_id, r["round"]), r.request_id))
    later = r[r["round"] > 0]
    assert all(ids[(s_, n - 1)] == d for s_, n, d in zip(later.session_id, later["round"], later.depends_on))
    pd.testing.assert_frame_equal(r, generate(e.workload, "blis").requests)
    assert not r["arrival_us"].equals(generate(e.workload, "blis", seed=1).requests["arrival_us"])


@needs_kit
def test_blis_stream_totals_for_all_15_trainval(kit):
    for e in kit.split("trainval"):
        r = blis_stream(e.workload).requests
        assert len(r) == e.blis_iter29_totals["completed_requests"], e.key
        assert r["prompt_tokens"].sum() == e.blis_iter29_totals["total_input_tokens"], e.key


def test_blis_open_loop_modes_and_errors():
    single = WorkloadSpec((Stage(3.0, 100.0),), SharedPrefix(50, 200, 20, 2, 3, False), seed=5, num_requests=300)
    r = blis_stream(single).requests
    assert len(r) == 300 and r["client_id"].nunique() == 6 and not r["closed_loop"].any()
    for _, c in r.groupby("client_id"):  # normalized exponential: per-client gaps end within N µs of the duration
        assert 100e6 - len(c) <= c["arrival_us"].max() <= 100e6
    two = WorkloadSpec((Stage(3.0, 100.0), Stage(6.0, 100.0)), SharedPrefix(50, 200, 20, 2, 3, False), seed=5)
    r2 = blis_stream(two).requests
    assert r2.groupby("stage")["arrival_us"].agg(["min", "max"]).apply(
        lambda x: x["min"] >= x.name * 100e6 and x["max"] < (x.name + 1) * 100e6, axis=1).all()
    assert 0.8 < len(r2[r2.stage == 1]) / 600 < 1.2  # Poisson count around rate x duration
    with pytest.raises(InputError, match="num_unique_system_prompts"):
        blis_stream(WorkloadSpec((Stage(1.0, 10.0),), SharedPrefix(10, 10, 10)))


@needs_kit
def test_generated_trace_is_replayable_shape(kit):
    tr = experiment_trace(kit.get(61), "inference-perf")
    assert tr.model == "llama-3.1-70b" and tr.tp == 4 and tr.hardware == "H100-SXM" and tr.timeout_s == 300.0
    assert tr.engine["num_gpu_blocks"] == 30424 and tr.engine["enable_prefix_caching"]
    assert tr.requests["ttft_us"].isna().all() and not tr.requests["failed"].any() and tr.n_requests == 9000


# summary metrics (hand-made)


def _hand_frame() -> pd.DataFrame:
    # sent at (s): 1, 2, 3, 4, 5 (times out), 11, 12; stage 1 starts at 10 s
    ms = {"send": [1, 2, 3, 4, 5, 11, 12], "ttft": [10, 20, 30, 40, np.nan, 50, 70],
          "e2e": [100, 200, 300, 400, 300000, 500, 900], "out": [10, 10, 20, 20, 5, 11, 31]}
    return pd.DataFrame({"arrival_us": np.array(ms["send"]) * 1e6, "pred_ttft_us": np.array(ms["ttft"]) * 1e3,
                         "pred_e2e_us": np.array(ms["e2e"], dtype=float) * 1e3, "output_tokens": ms["out"],
                         "pred_failed": [False, False, False, False, True, False, False]})


def test_summary_metrics_on_a_hand_made_run():
    df = _hand_frame()
    s = summarize_run(df, stage_starts_us=[0.0, 10e6])
    s0, s1, ov = s.stages["stage_0"], s.stages["stage_1"], s.overall
    assert (s0.sent, s0.completed, s0.failed, s1.sent, ov.sent, ov.completed) == (5, 4, 1, 2, 7, 6)
    # stage 0: TTFT 10,20,30,40 -> mean 25, p90 at rank 0.9*3 = 2.7 -> 30 + 0.7*10, p99 rank 2.97 -> 39.7
    assert (s0.ttft_mean, s0.ttft_p90, s0.ttft_p99) == pytest.approx((25.0, 37.0, 39.7))
    assert (s0.e2e_mean, s0.e2e_p90, s0.e2e_p99) == pytest.approx((250.0, 370.0, 397.0))  # failed 300 s excluded
    assert s0.itl_mean == pytest.approx((250 - 25) / (15 - 1))  # from means: mean output 15
    # stage 1: TTFT 50,70 -> p90 50 + 0.9*20; E2E 500,900 -> p90 860, p99 896; ITL (700-60)/(21-1)
    assert (s1.ttft_mean, s1.ttft_p90, s1.ttft_p99) == pytest.approx((60.0, 68.0, 69.8))
    assert (s1.e2e_mean, s1.e2e_p90, s1.e2e_p99, s1.itl_mean) == pytest.approx((700.0, 860.0, 896.0, 32.0))
    # overall: 6 successes; p90 rank 0.9*5 = 4.5, p99 rank 4.95; mean output 102/6 = 17
    assert (ov.ttft_mean, ov.ttft_p90, ov.ttft_p99) == pytest.approx((220 / 6, 60.0, 69.0))
    assert (ov.e2e_mean, ov.e2e_p90, ov.e2e_p99) == pytest.approx((400.0, 700.0, 880.0))
    assert ov.itl_mean == pytest.approx((400 - 220 / 6) / 16) == pytest.approx(22.708333333)
    per_request = np.mean([(e - t) / (o - 1) for t, e, o in [(10, 100, 10), (20, 200, 10), (30, 300, 20),
                                                             (40, 400, 20), (50, 500, 11), (70, 900, 31)]])
    assert per_request == pytest.approx(22.6374269) != ov.itl_mean  # not the mean of per-request ITLs
    d = s.to_ms_dict()
    assert list(d) == ["overall", "stage_0", "stage_1"] and list(d["overall"]) == list(METRIC_NAMES)
    assert d["overall"]["itl_p90"] is None and d["stage_1"]["e2e_p90"] == pytest.approx(860.0)
    by_column = summarize_run(df.assign(stage=assign_stages(df["arrival_us"], [0.0, 10e6])))
    assert by_column.to_ms_dict() == d
    measured = summarize_run(df.rename(columns={"pred_ttft_us": "ttft_us", "pred_e2e_us": "e2e_us",
                                                "pred_failed": "failed"}), ttft="ttft_us", e2e="e2e_us",
                             failed="failed", stage_starts_us=[0.0, 10e6])
    assert measured.to_ms_dict() == d
    client = summarize_run(df, stage_starts_us=[0.0, 10e6], output_len_mean={"overall": 16.0})
    assert client.overall.itl_mean == pytest.approx((400 - 220 / 6) / 15)
    assert list(assign_stages([0.5e6, 10e6, 9.99e6], [1e6, 10e6])) == [0, 1, 0]


def test_summary_metrics_errors_and_ape():
    with pytest.raises(InputError, match="pred_ttft_us: missing column"):
        summarize_run(pd.DataFrame({"pred_e2e_us": [1.0], "output_tokens": [2]}))
    with pytest.raises(InputError, match="ascending"):
        assign_stages([1.0], [5.0, 1.0])
    one = summarize_run(_hand_frame().drop(columns=["pred_failed"]), failed=None, stage=None)
    assert one.overall.completed == 7 and set(one.stages) == {"overall", "stage_0"}
    assert ape(110.0, 100.0) == pytest.approx(10.0) and ape(90.0, 100.0) == pytest.approx(10.0)
    assert ape(None, 1.0) is None and ape(1.0, 0.0) is None and ape(float("nan"), 1.0) is None
    assert median_ape([10.0, None, 30.0, 20.0]) == 20.0 and median_ape([None]) is None
    table = ape_table({"overall": {"e2e_mean": 110.0, "ttft_mean": None}},
                      {"overall": {"e2e_mean": 100.0, "ttft_mean": 5.0}, "stage_0": {"e2e_mean": 1.0}},
                      metrics=("e2e_mean", "ttft_mean"))
    assert table == {"overall": {"e2e_mean": pytest.approx(10.0), "ttft_mean": None}}


def test_the_benchmark_pipeline_on_two_experiments(kit):
    """rooflab.evaluation.s2r end to end on two small eval experiments: BLIS's iter29 coefficients replayed on the
    workload as inference-perf ran it and as BLIS generates it, scored with the kit's metric definitions, and
    tabulated as medians. The BLIS-mode replay of iter29 lands near BLIS's own prediction (the parity the
    benchmark reports for every eval experiment)."""
    from rooflab.evaluation.s2r import METRICS, ape, iter29_coefficients, median_table, predict
    from rooflab.replay.summary_metrics import OVERALL

    coefs = iter29_coefficients()
    assert coefs.variant in ("blis-tp10", "blis-tp11") and coefs.formulas == "blis"
    measured = [e for e in kit.split("eval") if e.measured is not None]
    small = sorted(measured, key=lambda e: sum(e.workload.requests_per_stage))[:2]
    rows = []
    for exp in small:
        for mode in ("inference-perf", "blis"):
            pred = predict(exp, coefs, mode)
            whole = pred[OVERALL]
            assert set(METRICS) <= set(whole) and all(whole[m] is not None and whole[m] > 0 for m in METRICS)
            assert whole["ttft_mean"] < whole["e2e_mean"]
            if mode == "blis":
                blis = exp.predictions["blis-trained-physics"].get("e2e_mean")
                assert blis is not None and ape(whole["e2e_mean"], blis) < 0.15
            else:
                assert exp.measured is not None
                rows += [{"exp_id": str(exp.exp_id), "simulator": "rooflab blis-iter29", "metric": m,
                          "ape": ape(whole[m], exp.measured.get(m))} for m in METRICS]
    table = median_table(pd.DataFrame(rows))
    assert set(table["metric"]) <= set(METRICS) and (table["n"] <= 2).all() and (table["median_ape_pct"] >= 0).all()
