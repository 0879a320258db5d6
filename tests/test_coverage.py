"""What the data can see (rooflab.fit.coverage): the "identified by the data" check, its reason in words, and
where it goes — the coefficient set, export, replay's warnings, the stop rule and targeting — plus the
prefix-cache hits every step source reports (or says it cannot)."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from rooflab.collect.spec import load_campaign
from rooflab.data.adapters import read_steps
from rooflab.data.synthetic import synthetic_steps, with_step_times
from rooflab.data.tables import aggregate_entries, with_cache_hits
from rooflab.fit.calibration import Options, calibrate
from rooflab.fit.coverage import IDENTIFIED_CHECK, MIN_SHOWING_STEPS
from rooflab.model.arch import load_model
from rooflab.model.coefficients import coefficients_from_doc
from rooflab.model.engine_config import EngineConfig
from rooflab.model.export import blis_yaml, to_json
from rooflab.model.hardware import load_hardware
from rooflab.paths import REAL_DATA_DIR
from rooflab.targeting.menu import choose_next
from rooflab.targeting.stop import stop_rule
from rooflab.twin.engine import Engine, Request
from rooflab.twin.simulate import simulate
from rooflab.twin.truth import TruthModel

REAL_STEPS = REAL_DATA_DIR / "steps" / "h100_step_records.parquet"
OPTS = Options(variant="roofline7", n_boot=30)


@pytest.fixture(scope="module")
def real():
    if not REAL_STEPS.exists():
        pytest.skip("../shared/data/real is not beside the project")
    return calibrate(read_steps(REAL_STEPS), options=Options(n_boot=30))


@pytest.fixture(scope="module")
def no_prefill():
    """Synthetic steps whose prefills are all a few tokens (what prefix-cache hits leave of recurring prompts)."""
    steps = synthetic_steps()
    small = steps["prefill_tokens"] > 0
    steps.loc[small, "prefill_tokens"] = 4.0
    steps.loc[small, "prefill_reqs"] = 1.0
    return calibrate(with_step_times(steps), options=OPTS)


def test_real_step_records_cannot_see_prefill_and_say_why(real):
    cov = real.coverage
    assert cov is not None and cov.cache_hit_share is None  # BATCH_SUMMARY records do not report cache hits
    why = real.unidentified["beta1"]
    assert why.startswith("beta1 not identified by this data:")
    assert f"of {cov.steps} steps show" in why and "31% of steps run prefill" in why
    assert "median 3 computed prefill tokens" in why and "prefix-cache hits unknown" in why
    check = next(c for c in real.health if c.check == IDENTIFIED_CHECK and c.target == "beta1")
    assert check.status == "fail" and check.value < MIN_SHOWING_STEPS
    # decode, weights and the all-reduce are well covered by the same data
    assert set(real.unidentified) == {"beta1"}


def test_the_flag_travels_with_the_coefficients_into_export_and_replay(real, tmp_path):
    coefs = real.coefficients()
    assert set(coefs.unidentified) == {"beta1"}
    (warning,) = coefs.warnings()
    assert "is the fit's guess, not a measurement" in warning and f"{coefs.beta['beta1']:.3g}" in warning
    doc = json.loads(json.dumps(real.to_dict(), default=float))
    assert coefficients_from_doc(doc).unidentified == coefs.unidentified  # a `rooflab fit --out` result
    assert coefficients_from_doc(coefs.to_dict()).unidentified == coefs.unidentified
    assert to_json(doc)["unidentified"] == coefs.unidentified
    header = [line for line in blis_yaml(doc).splitlines() if line.startswith("# WARNING: beta1 not identified")]
    assert len(header) == 1


def test_the_stop_rule_never_counts_an_unseen_beta_as_identified(no_prefill):
    assert "beta1" in no_prefill.unidentified
    d = stop_rule(no_prefill, gpu_seconds_spent=0, budget_gpu_seconds=None, iteration=1, max_iterations=None)
    crit = d.criteria["beta1_range"]
    assert not crit.met and crit.identified is False and crit.text == no_prefill.unidentified["beta1"]
    assert not d.converged


def test_targeting_answers_an_unseen_prefill_beta_with_long_unique_prompts(no_prefill):
    picks = choose_next(no_prefill, load_campaign("default"), set(), batch_size=6, budget_gpu_seconds_left=None,
                        iteration=1)
    beta1 = [p for p in picks if p.serves == "beta1"]
    assert beta1, [p.reason for p in picks]
    assert beta1[0].point.family in ("W1", "W4-A") and "unseen by the data" in beta1[0].reason
    assert beta1[0].point.param("input_tokens") >= 4096  # the longest prompts of the space first


def test_enough_prefill_is_identified():
    calib = calibrate(with_step_times(synthetic_steps()), options=OPTS)
    assert calib.unidentified == {}
    assert all(c.status == "pass" for c in calib.health if c.check == IDENTIFIED_CHECK)


def test_attention_is_judged_at_its_typical_efficiency_and_has_its_own_plausible_range():
    """β1_attn multiplies attention FLOPs at the bf16 peak, which FlashAttention reaches only in part (H200 kernels:
    median 25%): its visibility is judged at β = 4, and the stop rule and the health table accept [0.3, 50]."""
    from rooflab.fit.coverage import SHOWING_SHARE, data_coverage, visible_at
    from rooflab.model.features import featurize
    from rooflab.model.variants import get_variant

    v = get_variant("roofline7+layers+attn")
    attn = next(t for t in v.terms if t.name == "beta1_attn")
    assert visible_at(attn) == 4.0 and visible_at(v.terms[0]) == 1.0 and attn.plausible == (0.3, 50.0)
    steps = with_step_times(synthetic_steps())
    feats = featurize(steps)
    y = steps["step_time_us"].to_numpy()
    cov = data_coverage(steps, feats, v.terms, y)
    x = feats["f_pf_attn"].to_numpy()
    assert cov.term_showing_steps["beta1_attn"] == int(np.sum(4.0 * x >= SHOWING_SHARE * y))
    assert cov.term_showing_steps["beta1_attn"] > int(np.sum(x >= SHOWING_SHARE * y))  # β = 1 would see fewer
    calib = calibrate(steps, options=Options(variant="roofline7+layers+attn", n_boot=30))
    names = calib.beta.names
    for value, ok in ((12.0, True), (60.0, False)):
        beta = calib.beta.beta.copy()
        beta[names.index("beta1_attn")] = value
        moved = dataclasses.replace(calib, beta=dataclasses.replace(calib.beta, beta=beta))
        crit = stop_rule(moved, gpu_seconds_spent=0, budget_gpu_seconds=None, iteration=1,
                         max_iterations=None).criteria["beta1_attn_range"]
        assert crit.threshold == [0.3, 50.0] and ("in [0.3, 50]" in crit.text) == ok, crit.text


# ------------------------------------------------------------------------------------------- prefix-cache hits
def _run(prefix_caching: bool):
    arch, hw = load_model("llama-3.1-8b"), load_hardware("H100-SXM")
    truth = TruthModel.from_config(hw.name, arch, 1, seed=0)
    config = EngineConfig(max_num_seqs=32, max_num_batched_tokens=2048, enable_prefix_caching=prefix_caching)
    # 40 requests sharing a 1,024-token prefix, 2 s apart: every one after the first finds it cached
    reqs = [Request(f"r{i}", i * 2e6, 1100, 8, True, None, "shared", 1024) for i in range(40)]
    return simulate(Engine(arch, hw, 1, truth, config, seed=0), reqs, overheads=truth)


def test_the_twin_counts_computed_prefill_tokens_and_reports_the_cache_hits():
    on, off = _run(True), _run(False)
    s_on, s_off = on.steps, off.steps
    assert s_off["prefill_cached_tokens"].sum() == 0
    assert s_off["prefill_tokens"].sum() == 40 * 1100
    # 39 requests hit the 64 full blocks (1,024 tokens) of the shared prefix; only the rest is computed
    assert s_on["prefill_cached_tokens"].sum() == 39 * 1024
    assert s_on["prefill_tokens"].sum() == 40 * 1100 - 39 * 1024


def test_entries_count_cache_hits_on_the_first_scheduling_only():
    e = pd.DataFrame({"run_id": "r", "step_id": [0, 0, 1, 1, 2], "request_id": ["a", "b", "b", "a", "a"],
                      "phase": ["prefill", "prefill", "prefill", "decode", "decode"],
                      "tokens": [100, 512, 300, 1, 1], "context_before": [32, 0, 512, 132, 133],
                      "prompt_tokens": [132, 812, 812, np.nan, np.nan]})
    agg = aggregate_entries(with_cache_hits(e, {"a": 0, "b": 0})).set_index("step_id")
    assert agg.loc[0, "prefill_cached_tokens"] == 32  # a's 32 cached tokens; b's first chunk had none
    assert agg.loc[1, "prefill_cached_tokens"] == 0  # b's second chunk starts at 512 computed, not cached
    assert np.isnan(aggregate_entries(e).set_index("step_id").loc[0, "prefill_cached_tokens"])  # unknown


def test_the_steplog_reports_prefix_cache_hits_from_the_first_scheduling(tmp_path):
    """vLLM's first scheduling of a request starts at its cache hits (num_computed_tokens > 0): the steplog
    adapter counts them on that step; a later chunk's computed tokens are its own, not hits."""
    from rooflab.data.adapters.steplog import read_steplog

    def step(k, prefill, decode=()):
        return {"kind": "step", "step": k, "pid": 7, "t0_ns": k * 10_000_000, "t_sched_ns": k * 10_000_000 + 1,
                "t_upd_ns": k * 10_000_000 + 2, "t1_ns": k * 10_000_000 + 5_000_000,
                "tokens": sum(e[1] for e in prefill) + len(decode), "prefill": prefill, "decode": list(decode),
                "kv": 0.1, "preempted": [], "running": 2, "waiting": 0, "finished": 0}

    lines = [{"kind": "engine", "schema": 1, "plugin": "0.1.0", "vllm": "0.32.0", "pid": 7, "t_ns": 0,
              "max_num_batched_tokens": 64, "max_num_seqs": 4, "block_size": 16, "num_gpu_blocks": 100},
             step(0, [["a", 64, 0, 100]]),  # a: no hits, chunked
             step(1, [["a", 36, 64, 100], ["b", 20, 48, 68]]),  # b: 48 tokens (3 blocks) from the cache
             step(2, [], [["a", 100], ["b", 68]])]
    p = tmp_path / "steplog.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    steps = read_steplog(p, run_id="r", model="llama-3.1-8b", tp=1, hardware="H100-SXM").steps.set_index("step_id")
    assert steps["prefill_cached_tokens"].tolist() == [0.0, 48.0, 0.0]
    assert steps["prefill_tokens"].tolist() == [64.0, 56.0, 0.0]


def test_an_overhead_near_zero_passes_its_cv_only_when_its_interval_barely_moves_a_step(no_prefill):
    """The CV of an overhead β near 0 is meaningless; the stop rule accepts it when the half-width of its 90%
    interval times the P90 of its feature / step time is < 2%, and not when that effect is large."""
    import dataclasses

    from rooflab.targeting.stop import MAX_OVERHEAD_EFFECT

    cov = no_prefill.coverage
    fit = no_prefill.beta
    j = fit.names.index("beta6")
    half = (fit.upper[j] - fit.lower[j]) / 2
    assert half > 0
    # a CV far above 30%, as a per-request overhead near 0 has
    health = [dataclasses.replace(c, value=1.3) if (c.check, c.target) == ("bootstrap CV", "beta6") else c
              for c in no_prefill.health]
    for effect, met in ((0.5 * MAX_OVERHEAD_EFFECT, True), (5 * MAX_OVERHEAD_EFFECT, False)):
        unit = {**cov.unit_effect_p90, "beta6": effect / half}
        calib = dataclasses.replace(no_prefill, health=health,
                                    coverage=dataclasses.replace(cov, unit_effect_p90=unit))
        crit = stop_rule(calib, gpu_seconds_spent=0, budget_gpu_seconds=None, iteration=1,
                         max_iterations=None).criteria["beta6_cv"]
        assert crit.met is met and crit.text.startswith("beta6 CV 130% > 30%"), (effect, crit.text)
        assert ("but its 90% interval moves a step by" in crit.text) is met
