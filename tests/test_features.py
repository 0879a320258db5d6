"""Feature degenerate cases, aggregate vs per-request equivalence, and the step-table path."""

import numpy as np
import pandas as pd
import pytest

from rooflab.data.tables import aggregate_entries
from rooflab.model.arch import load_model
from rooflab.model.features import Setting, compute_features, featurize
from rooflab.model.hardware import load_hardware

H100 = load_hardware("H100-SXM")
EMPTY = dict(prefill_reqs=[0], prefill_tokens=[0], prefill_context=[0], decode_reqs=[0], decode_context=[0])
ONE = dict(prefill_reqs=[1], prefill_tokens=[256], prefill_context=[0], decode_reqs=[8], decode_context=[8000])


@pytest.mark.parametrize("formulas", ["vllm", "design"])
def test_tp1_has_no_allreduce_and_dense_has_no_expert_weights(formulas):
    f = compute_features(Setting(load_model("llama-3.1-8b"), H100, 1, formulas), ONE)
    assert f["F_tp"][0] == 0 and f["F_weight_moe"][0] == 0 and f["N_eff"][0] == 0
    g = compute_features(Setting(load_model("llama-3.1-8b"), H100, 2, formulas), ONE)
    assert g["F_tp"][0] > 0


@pytest.mark.parametrize("formulas", ["vllm", "design"])
def test_empty_batch_reads_weights_only(formulas):
    s = Setting(load_model("mixtral-8x7b"), H100, 2, formulas)
    f = compute_features(s, EMPTY)
    for k in ("F_pf_compute", "F_pf_kv", "F_dc_compute", "F_dc_kv", "F_tp"):
        assert f[k][0] == 0, k
    assert f["F_weight_static"][0] > 0
    # vllm: no token routes to any expert; the PR's min(N, max(k, B·k)) still loads k experts
    assert f["N_eff"][0] == (0 if formulas == "vllm" else 2)


def test_kv_heads_replicated_when_fewer_than_tp():
    """Llama-3.1-8B has 8 KV heads: at TP=16 each rank still holds one (vllm) — the PR divides by TP."""
    a = load_model("llama-3.1-8b")
    v = compute_features(Setting(a, H100, 16, "vllm"), ONE)
    d = compute_features(Setting(a, H100, 16, "design"), ONE)
    assert v["F_dc_kv"][0] == pytest.approx(2 * d["F_dc_kv"][0])


def test_mla_latent_cache_is_not_divided_by_tp():
    a = load_model("deepseek-v2-lite")
    f1 = compute_features(Setting(a, H100, 1, "vllm"), ONE)
    f4 = compute_features(Setting(a, H100, 4, "vllm"), ONE)
    assert f1["F_dc_kv"][0] == pytest.approx(f4["F_dc_kv"][0])
    assert f4["F_dc_compute"][0] < f1["F_dc_compute"][0]


def test_expected_experts_grow_with_tokens_not_requests():
    """One 512-token prefill touches nearly all experts (vllm), the PR's request count says k."""
    a = load_model("qwen3-30b-a3b")
    step = dict(prefill_reqs=[1], prefill_tokens=[512], prefill_context=[0], decode_reqs=[0], decode_context=[0])
    v = compute_features(Setting(a, H100, 1, "vllm"), step)["N_eff"][0]
    d = compute_features(Setting(a, H100, 1, "design"), step)["N_eff"][0]
    assert v > 120 and d == 8


def test_entries_and_aggregates_give_the_same_features():
    rng = np.random.default_rng(0)
    rows = []
    for step in range(50):
        for _ in range(rng.integers(0, 3)):
            n, c = int(rng.integers(1, 1024)), int(rng.integers(0, 3000))
            rows.append(("r", step, "prefill", n, c, c + n + int(rng.integers(0, 2)) * 100))
        for _ in range(rng.integers(1, 40)):
            rows.append(("r", step, "decode", 1, int(rng.integers(10, 4000)), 0))
    e = pd.DataFrame(rows, columns=["run_id", "step_id", "phase", "tokens", "context_before", "prompt_tokens"])
    agg = aggregate_entries(e)
    s = Setting(load_model("llama-3.1-8b"), H100, 1, "vllm")
    exact = compute_features(s, agg)
    # per-step loop reference: sum of per-request pairs
    for k, step in enumerate(agg["step_id"]):
        sub = e[(e.step_id == step) & (e.phase == "prefill")]
        pairs = (sub.tokens * sub.context_before + sub.tokens * (sub.tokens + 1) / 2).sum()
        assert agg["prefill_attn_pairs"].iloc[k] == pairs
    # aggregates only (no pairs): exact whenever a step has at most one prefill
    no_pairs = agg.drop(columns=["prefill_attn_pairs"])
    approx = compute_features(s, no_pairs)
    single = (agg["prefill_reqs"] <= 1).to_numpy()
    np.testing.assert_allclose(approx["F_pf_compute"][single], exact["F_pf_compute"][single], rtol=1e-12)
    multi = ~single
    if multi.any():
        np.testing.assert_allclose(approx["F_pf_compute"][multi], exact["F_pf_compute"][multi], rtol=0.2)


def test_featurize_groups_settings_and_keeps_row_order():
    steps = pd.DataFrame({
        "model": ["llama-3.1-8b", "mixtral-8x7b", "llama-3.1-8b"], "tp": [1, 2, 2], "hardware": "H100-SXM",
        "prefill_reqs": [1, 1, 1], "prefill_tokens": [256] * 3, "prefill_context": [0] * 3,
        "decode_reqs": [8] * 3, "decode_context": [8000] * 3})
    f = featurize(steps)
    one = compute_features(Setting(load_model("mixtral-8x7b"), H100, 2, "vllm"), ONE)
    assert f["F_weight_moe"].iloc[1] == pytest.approx(one["F_weight_moe"][0])
    assert f["F_weight_moe"].iloc[0] == 0 and f["F_tp"].iloc[0] == 0 and f["F_tp"].iloc[2] > 0
    assert (f["n_layers"] == 32).all() and (f["one"] == 1).all()


def test_vllm_tp_feature_is_the_physical_ring_with_hop_latency():
    """vllm formulas: f_tp = 2L·[2(TP−1)/TP·M/BW_link + 2(TP−1)·t_hop]; design formulas keep the PR's HBM form."""
    from rooflab.model.arch import load_model
    from rooflab.model.features import Setting, compute_features
    from rooflab.model.hardware import load_hardware

    arch, hw = load_model("llama-3.1-8b"), load_hardware("H100-SXM")
    step = dict(prefill_reqs=[0, 0], prefill_tokens=[0, 0], prefill_context=[0, 0], prefill_attn_pairs=[0, 0],
                prefill_logits=[0, 0], decode_reqs=[1, 64], decode_context=[100, 6400])
    for tp in (2, 4, 8):
        f = compute_features(Setting(arch, hw, tp, "vllm"), step)
        msg = 64 * arch.hidden * arch.act_bytes
        want = 2 * arch.n_layers * (2 * (tp - 1) / tp * msg / (hw.nvlink_gb_s_per_direction * 1e3)
                                    + 2 * (tp - 1) * hw.link_latency_us)
        assert f["f_tp"][1] == pytest.approx(want, rel=1e-12)
        assert f["f_tp"][0] < f["f_tp"][1]  # more tokens, more bytes
        g = compute_features(Setting(arch, hw, tp, "design"), step)
        assert g["f_tp"][1] == pytest.approx(g["F_tp"][1]) and g["f_tp"][1] != pytest.approx(f["f_tp"][1])
    assert hw.link_latency_us > 0
    assert compute_features(Setting(arch, hw, 1, "vllm"), step)["f_tp"].tolist() == [0.0, 0.0]
