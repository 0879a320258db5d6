"""rooflab's implementation of BLIS's trained-physics step time (rooflab/model/blis.py, docs/blis.md §3)
against BLIS-computed worked numbers (tests/fixtures/blis_worked_numbers.json) and hand arithmetic."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from rooflab.errors import InputError
from rooflab.model.arch import load_model
from rooflab.model.blis import (
    BLIS_BASIS_COLUMNS,
    BLIS_BASIS_OF,
    BLIS_BETA_ORDER,
    BLIS_EXTENSION_COLUMNS,
    BLIS_VARIANTS,
    BlisShape,
    blis_alpha_us,
    blis_basis,
    blis_shape,
    blis_shape_of,
    blis_step_time_us,
    load_blis_hardware,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "blis_worked_numbers.json").read_text())
MODELS = ("llama-3.1-8b", "mixtral-8x7b", "llama-4-scout-17b-16e-fp8")
H100 = load_blis_hardware("H100-SXM")
# fixture basis_raw key -> our column
RAW_KEY = {"T_pf_compute_us": "blis_pf_compute", "T_pf_kv_us": "blis_pf_kv", "T_dc_compute_us": "blis_dc_compute",
           "T_dc_kv_us": "blis_dc_kv", "T_weight_us": "blis_weight",
           "T_tp_total_us(attn+denseFFN+moeReduce)": "blis_tp", "T_moe_dispatch_us(DP>1 only)": "blis_moe_dispatch",
           "L(layers)": "blis_layers", "B(batch_size)": "blis_requests", "const(1)": "blis_one",
           "nMoE_if_interleaved": "blis_moe_layers"}
BETA_SETS = {"defaults_yaml_11beta": FIXTURE["beta_defaults_yaml_11"], "iter29_10beta": FIXTURE["beta_iter29_10"],
             "all_betas_1": [1.0] * 11}


def shape(model: str) -> BlisShape:
    return blis_shape_of(load_model(model))


def aggregate(requests: list[dict]) -> dict[str, float]:
    """rooflab's per-step aggregates of one BLIS batch (request groups as in the fixture)."""
    agg = dict.fromkeys(("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_prompt_pairs",
                         "decode_reqs", "decode_context"), 0.0)
    for r in requests:
        n, t, c, s = r["count"], r["num_new_tokens"], r["progress_index"], r["input_len"]
        if c < s:  # prefill chunk: BLIS's attention pairs use the full prompt length s
            agg["prefill_reqs"] += n
            agg["prefill_tokens"] += n * t
            agg["prefill_context"] += n * c
            agg["prefill_prompt_pairs"] += n * t * (s + t / 2)
        else:
            agg["decode_reqs"] += n
            agg["decode_context"] += n * c
    return agg


def stacked(aggs: list[dict[str, float]]) -> dict[str, np.ndarray]:
    return {k: np.array([a[k] for a in aggs]) for k in aggs[0]}


def one(model: str, tp: int, **agg: float) -> dict[str, float]:
    full = dict(prefill_reqs=0.0, prefill_tokens=0.0, prefill_context=0.0, decode_reqs=0.0, decode_context=0.0)
    full.update(agg)
    return {k: float(v[0]) for k, v in blis_basis(shape(model), H100, tp, {k: [v] for k, v in full.items()}).items()}


# ---------------------------------------------------------------------------------------------------
# Parity with BLIS's own numbers


def test_shipped_configs_are_the_ones_blis_used():
    for model in MODELS:
        cfg = json.loads(Path(load_model(model).source).read_text())
        canon = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
        assert hashlib.sha256(canon).hexdigest() == FIXTURE["config_sha256_canonical"][model], model


@pytest.mark.parametrize("key", list(FIXTURE["features"]))
def test_shape_matches_blis_features(key):
    model, tp = key.split("/tp")
    s, f = shape(model), FIXTURE["features"][key]
    got = {"num_layers": s.n_layers, "hidden": s.hidden, "num_heads": s.n_heads, "head_dim_used": s.head_dim,
           "d_kv": s.d_kv, "d_ff_dense": s.dense_ffn, "d_ff_moe": s.moe_ffn, "num_experts": s.n_experts,
           "k_eff": s.k_eff, "num_moe_layers": s.n_moe_layers, "num_dense_layers": s.n_dense_layers,
           "interleaved_moe": s.interleaved, "is_moe": s.is_moe, "shared_expert_ffn_dim": s.shared_ffn,
           "weight_bpp": s.weight_bytes, "activation_bpp": s.act_bytes,
           "moe_group": int(tp), "bw_bytes_per_us": H100.bytes_per_us,
           "flops_peak_per_us": H100.flops_per_us(s)}
    assert got == f


CASE_GROUPS = defaultdict(list)
for _c in FIXTURE["cases"]:
    CASE_GROUPS[(_c["model"], _c["tp"])].append(_c)


@pytest.mark.parametrize("model,tp", list(CASE_GROUPS))
def test_worked_numbers(model, tp):
    cases = CASE_GROUPS[(model, tp)]
    assert {c["case"].split("_")[0] for c in cases} == {"decode", "prefill", "mixed"} and len(cases) == 4
    basis = blis_basis(shape(model), H100, tp, stacked([aggregate(c["requests"]) for c in cases]))
    assert set(basis) == set(BLIS_BASIS_COLUMNS) | set(BLIS_EXTENSION_COLUMNS)
    for i, c in enumerate(cases):
        for raw_key, ref in c["basis_raw"].items():
            got = float(basis[RAW_KEY[raw_key]][i])
            if ref == 0:
                assert got == 0, (c["case"], raw_key)
            else:  # BLIS's reference is its value truncated to 1e-6 µs: ours must truncate to the same
                assert int(np.trunc(got * 1e6)) == round(ref * 1e6), (c["case"], raw_key, got, ref)
        comp = c["tp_components_raw"]
        tp_sum = comp["T_tp_attn_us"] + comp["T_tp_denseFFN_us"] + comp["T_moe_reduce_us"]
        assert basis["blis_tp"][i] == pytest.approx(tp_sum, rel=1e-14, abs=0)
    for name, betas in BETA_SETS.items():
        want = [c["step_us"][name] for c in cases]
        assert blis_step_time_us(betas, basis).tolist() == want, name


def test_missing_prompt_pairs_estimate_matches_when_chunks_finish_their_prompt():
    # prefill-only (2048 from 0) and mixed-1536 (chunk 512 at 1024 finishes a 1536 prompt): s_i = c_i + t_i
    for model, tp in CASE_GROUPS:
        cases = [c for c in CASE_GROUPS[(model, tp)] if "inputlen4096" not in c["case"]]
        aggs = stacked([aggregate(c["requests"]) for c in cases])
        exact = blis_basis(shape(model), H100, tp, aggs)
        aggs["prefill_prompt_pairs"] = np.full(len(cases), np.nan)
        estimated = blis_basis(shape(model), H100, tp, aggs)
        for col in BLIS_BASIS_COLUMNS:
            np.testing.assert_array_equal(estimated[col], exact[col])
        del aggs["prefill_prompt_pairs"]  # absent column = all NaN
        np.testing.assert_array_equal(blis_basis(shape(model), H100, tp, aggs)["blis_pf_compute"],
                                      exact["blis_pf_compute"])


def test_prompt_pairs_estimate_arithmetic():
    # 2 chunks, T = 600 new tokens, C = 1000 computed before: equal chunks t = 300, c = 500, s = 800
    # -> Σ t·(s + t/2) = 2·300·(800 + 150) = 570000 = T·(C/|P| + T/|P|) + T²/(2|P|)
    agg = dict(prefill_reqs=2, prefill_tokens=600, prefill_context=1000, prefill_prompt_pairs=float("nan"))
    assert 600 * (1000 / 2 + 600 / 2) + 600 ** 2 / 4 == 2 * 300 * (800 + 150) == 570000
    est = one("llama-3.1-8b", 1, **agg)["blis_pf_compute"]
    exact = one("llama-3.1-8b", 1, **{**agg, "prefill_prompt_pairs": 570000})["blis_pf_compute"]
    assert est == exact
    mixed = one("llama-3.1-8b", 1, **{**agg, "prefill_prompt_pairs": 570000 + 1e6})["blis_pf_compute"]
    assert mixed - exact == pytest.approx(32 * 4 * 32 * 1e6 * 128 / 989.5e6)  # L·4·H·Δpairs·dH / F


# ---------------------------------------------------------------------------------------------------
# Hand-computed checks from the formulas (docs/blis.md §3.3)


def test_hand_llama8b_tp1_decode_weights_and_kv():
    b = one("llama-3.1-8b", 1, decode_reqs=32, decode_context=32 * 1000)
    # weights: L·d·(2d + 2·dKV)·2 B (attention) + L·3·d·dFF·2 B (MLP), dKV = 8 KV heads × 128 = 1024
    weight_bytes = 32 * 4096 * (8192 + 2048) * 2 + 32 * 3 * 4096 * 14336 * 2
    assert weight_bytes == 13_958_643_712
    assert b["blis_weight"] == pytest.approx(weight_bytes / 3.35e6, rel=1e-15)
    assert round(b["blis_weight"], 2) == 4166.76
    # KV: L·2 (K and V)·dKV·2 B·(C + D) with C = 32·1000 context tokens, D = 32 new ones
    assert b["blis_dc_kv"] == pytest.approx(32 * 2 * 1024 * 2 * (32000 + 32) / 3.35e6, rel=1e-15)
    assert round(b["blis_dc_kv"], 2) == 1253.28
    # compute: projections L·2·D·d·(2d + 2dKV) + attention L·4·H·C·dH + MLP L·D·6·d·dFF, at 989.5 TFLOP/s
    flops = 32 * 2 * 32 * 4096 * 10240 + 32 * 4 * 32 * 32000 * 128 + 32 * 32 * 6 * 4096 * 14336
    assert b["blis_dc_compute"] == pytest.approx(flops / 989.5e6, rel=1e-15)
    assert b["blis_pf_compute"] == b["blis_pf_kv"] == b["blis_tp"] == 0
    # defaults.yaml betas: 1.947·KV + 1.363·weights + β5·L + β6·B + β7, truncated
    step = 1.94710771 * b["blis_dc_kv"] + 1.36252915 * b["blis_weight"] + 32.09546717 * 32 + 4.41684444 * 32 \
        + 126.024825
    assert int(step) == 9412
    assert blis_step_time_us(FIXTURE["beta_defaults_yaml_11"], {k: [v] for k, v in b.items()}).tolist() == [9412]


def test_hand_llama8b_tp1_cold_prefill_compute():
    b = one("llama-3.1-8b", 1, prefill_reqs=1, prefill_tokens=2048, prefill_context=0,
            prefill_prompt_pairs=2048 * (2048 + 1024))
    # attention charges t·(s + t/2) = 1.5·t² pairs at s = prompt length (BLIS's quirk, 3× causal)
    flops = 32 * 2 * 2048 * 4096 * 10240 + 32 * 4 * 32 * 2048 * 3072 * 128 + 32 * 2048 * 6 * 4096 * 14336
    assert b["blis_pf_compute"] == pytest.approx(flops / 989.5e6, rel=1e-15)
    assert round(b["blis_pf_compute"], 3) == 32224.191
    assert b["blis_pf_kv"] == pytest.approx(32 * 2 * 1024 * 2048 * 2 / 3.35e6, rel=1e-15)


def test_hand_mixtral_moe_weights():
    # every step loads all E/TP experts per GPU: nMoE = L = 32 (uniform MoE), E = 8, dFF = 14336
    attn = 32 * 4096 * (8192 + 2048) * 2
    for tp in (1, 2, 4):
        b = one("mixtral-8x7b", tp, decode_reqs=1, decode_context=10)
        experts = 32 * (8 / tp) * 3 * 4096 * 14336 * 2
        assert b["blis_weight"] == pytest.approx((attn / tp + experts) / 3.35e6, rel=1e-15)
    assert round(one("mixtral-8x7b", 1, decode_reqs=1)["blis_weight"], 3) == 27724.975
    # routed compute per token: k/TP experts of 6·d·dFF FLOPs on each of the 32 layers (k = 2)
    b = one("mixtral-8x7b", 2, decode_reqs=32, decode_context=32 * 1000)
    flops = 32 * 2 * 32 * 4096 * 10240 / 2 + 32 * 4 * 16 * 32000 * 128 + 32 * (32 * 2 / 2) * 6 * 4096 * 14336
    assert b["blis_dc_compute"] == pytest.approx(flops / 989.5e6, rel=1e-15)
    assert b["blis_moe_layers"] == 0  # uniform MoE: no β8 multiplier
    # TP comm at DP=1: L attention + 0 dense + L MoE-reduce = 64 all-reduce units
    assert b["blis_tp"] == pytest.approx(64 * 32 * 4096 * 2 * 2 * (1 / 2) / 3.35e6, rel=1e-15)


def test_hand_scout_interleaved_beta8_and_tp_units():
    s = shape("llama-4-scout-17b-16e-fp8")
    # interleave_moe_layer_step 1 -> BLIS: floor(48 / 2) = 24 MoE layers, 24 dense (FFN 16384), 1-byte weights
    assert (s.n_moe_layers, s.n_dense_layers, s.dense_ffn, s.moe_ffn, s.weight_bytes) == (24, 24, 16384, 8192, 1.0)
    assert H100.flops_per_us(s) == 1979.0e6  # FP8 peak for every FLOP term
    b1 = one("llama-4-scout-17b-16e-fp8", 1, decode_reqs=32, decode_context=32 * 1000)
    assert b1["blis_moe_layers"] == 24 and b1["blis_tp"] == 0
    b2 = one("llama-4-scout-17b-16e-fp8", 2, decode_reqs=32, decode_context=32 * 1000)
    # TP all-reduce units at DP=1: 48 attention + 24 dense FFN + 24 MoE reduce = 96
    assert b2["blis_tp"] == pytest.approx(96 * 32 * 5120 * 2 * 2 * (1 / 2) / 3.35e6, rel=1e-15)
    assert round(b2["blis_tp"], 3) == 9.390
    weight = 48 * 5120 * (10240 + 2048) * 1 / 2 + 24 * (16 / 2) * 3 * 5120 * 8192 + 24 * 3 * 5120 * 16384 / 2
    assert b2["blis_weight"] == pytest.approx(weight / 3.35e6, rel=1e-15)
    # β8 = 481.86 µs per interleaved MoE layer is 24·481.86 = 11564.7 µs of the 26878 µs defaults step
    basis = {k: [v] for k, v in b2.items()}
    no_b8 = list(FIXTURE["beta_defaults_yaml_11"])
    no_b8[7] = 0.0
    diff = blis_step_time_us(FIXTURE["beta_defaults_yaml_11"], basis)[0] - blis_step_time_us(no_b8, basis)[0]
    assert diff in (11564, 11565) and 24 * 481.8613888 == pytest.approx(11564.67, abs=0.01)


# ---------------------------------------------------------------------------------------------------
# Assembly forms, edge cases, errors


SYNTH = {"blis_pf_compute": [100.0], "blis_pf_kv": [300.0], "blis_dc_compute": [50.0], "blis_dc_kv": [20.0],
         "blis_weight": [1000.0], "blis_tp": [10.0], "blis_moe_dispatch": [40.0], "blis_layers": [32.0],
         "blis_requests": [5.0], "blis_one": [1.0], "blis_moe_layers": [24.0]}


@pytest.mark.parametrize("n,want", [
    # 7: max() forms, β8 = 0, β_EP = β4:  max(100,300)·1 + max(50,20)·2 + 1000·0.5 + 10·3 + 40·3 + 32 + 5·2 + 7
    (7, 300 + 100 + 500 + 30 + 120 + 32 + 10 + 7),
    # 8: + β8·24 = 0.25·24
    (8, 300 + 100 + 500 + 30 + 120 + 32 + 10 + 7 + 6),
    # 9: prefill split 100·1 + 300·0.1
    (9, 100 + 30 + 100 + 500 + 30 + 120 + 32 + 10 + 7 + 6),
    # 10: decode split 50·2 + 20·0.5, β_EP still β4
    (10, 100 + 30 + 100 + 10 + 500 + 30 + 120 + 32 + 10 + 7 + 6),
    # 11: explicit β_EP = 0.5
    (11, 100 + 30 + 100 + 10 + 500 + 30 + 20 + 32 + 10 + 7 + 6),
    (12, 100 + 30 + 100 + 10 + 500 + 30 + 20 + 32 + 10 + 7 + 6),  # extra betas ignored, as BLIS does
])
def test_coefficient_forms(n, want):
    betas = [1, 2, 0.5, 3, 1, 2, 7, 0.25, 0.1, 0.5, 0.5, 99][:n]
    assert blis_step_time_us(betas, SYNTH).tolist() == [want]


def test_truncation_floor_and_empty_batch():
    base = dict(SYNTH, blis_requests=[5.0, 5.0, 0.0, 5.0])
    base = {k: np.resize(np.asarray(v, dtype=float), 4) for k, v in base.items()}
    base["blis_requests"] = np.array([5.0, 5.0, 0.0, 5.0])
    zero = [0.0] * 10
    step = blis_step_time_us([0, 0, 0, 0, 0, 0, 2.999, 0, 0, 0], base)  # only β7: truncated toward zero
    assert step.dtype == np.int64 and step.tolist() == [2, 2, 1, 2]  # empty batch -> 1 µs
    assert blis_step_time_us(zero, base).tolist() == [1, 1, 1, 1]  # floor at 1
    big = [1e6] * 11
    assert blis_step_time_us(big, base)[2] == 1  # empty batch stays 1 whatever the betas
    empty = one("llama-3.1-8b", 1)
    assert blis_step_time_us(FIXTURE["beta_defaults_yaml_11"], {k: [v] for k, v in empty.items()}).tolist() == [1]
    assert empty["blis_weight"] > 0 and empty["blis_requests"] == 0


def test_bad_betas_and_alphas():
    for bad in ([1.0] * 6, [1.0] * 6 + [-1.0], [1.0] * 6 + [float("nan")]):
        with pytest.raises(InputError):
            blis_step_time_us(bad, SYNTH)
    assert blis_alpha_us(FIXTURE["alpha"]) == (15563, 777, 45)
    with pytest.raises(InputError):
        blis_alpha_us([1.0, 2.0])


def test_hardware_table():
    assert (H100.tflops_peak, H100.tflops_fp8, H100.bw_peak_tbs, H100.memory_gib) == (989.5, 1979.0, 3.35, 80.0)
    a100 = load_blis_hardware("A100-80GB")
    assert (a100.name, a100.tflops_peak, a100.tflops_fp8, a100.bw_peak_tbs) == ("A100-80", 312.0, 0.0, 2.039)
    assert a100.flops_per_us(shape("llama-4-scout-17b-16e-fp8")) == 312e6  # no FP8 peak -> BF16 peak
    assert load_blis_hardware("L40S").tflops_fp8 == 1466.0
    assert load_blis_hardware("H100") == H100  # BLIS's own key works too
    for name in ("H200", "B200"):
        with pytest.raises(InputError) as err:
            load_blis_hardware(name)
        assert "\n" not in str(err.value) and f"no hardware entry for {name}" in str(err.value)
    with pytest.raises(InputError, match="unknown hardware"):
        load_blis_hardware("CPU-EPYC-Zen2-1core")


def test_tp_must_divide_heads_and_kv_heads():
    agg = {"prefill_reqs": [0], "prefill_tokens": [0], "prefill_context": [0], "decode_reqs": [1],
           "decode_context": [1]}
    with pytest.raises(InputError) as err:
        blis_basis(shape("llama-3.1-8b"), H100, 3, agg)  # 32 heads
    assert "\n" not in str(err.value) and "num_attention_heads" in str(err.value)
    with pytest.raises(InputError) as err:
        blis_basis(shape("llama-3.1-8b"), H100, 16, agg)  # 32 heads ok, 8 KV heads not
    assert "\n" not in str(err.value) and "num_key_value_heads" in str(err.value)
    with pytest.raises(InputError):
        blis_basis(shape("llama-4-scout-17b-16e-fp8"), H100, 16, agg)  # 40 heads
    with pytest.raises(InputError):
        blis_basis(shape("llama-3.1-8b"), H100, 0, agg)


def test_config_parsing_rules():
    base = {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 1024,
            "torch_dtype": "bfloat16"}
    s = blis_shape(base, "x")
    assert (s.n_kv_heads, s.head_dim, s.is_moe, s.n_moe_layers, s.weight_bytes) == (8, 64, False, 0, 2.0)
    assert blis_shape({**base, "num_kv_heads": 2, "head_dim": 128}, "x").d_kv == 2 * 64  # head_dim ignored
    assert blis_shape({**base, "multi_query_group_num": 4}, "x").n_kv_heads == 4
    assert blis_shape({**base, "num_key_value_heads": 0, "num_kv_heads": 2}, "x").n_kv_heads == 2
    # expert count: first field >= 2 wins; a 1-expert field is skipped
    moe = blis_shape({**base, "num_experts": 1, "num_local_experts": 8, "num_experts_per_tok": 2,
                      "moe_intermediate_size": 256, "n_shared_experts": 2, "interleave_moe_layer_step": 2}, "x")
    assert (moe.n_experts, moe.moe_ffn, moe.shared_ffn, moe.n_moe_layers, moe.n_dense_layers) == (8, 256, 512, 1, 3)
    assert blis_shape({**base, "num_experts": 1}, "x").is_moe is False
    # weights: bits -> bits/8; fp8 -> 1; compressed-tensors -> first sorted group's num_bits/8
    assert blis_shape({**base, "quantization_config": {"quant_method": "gptq", "bits": 4}}, "x").weight_bytes == 0.5
    assert blis_shape({**base, "quantization_config": {"quant_method": "awq", "bits": "8"}}, "x").weight_bytes == 1.0
    assert blis_shape({**base, "quantization_config": {"quant_method": "FP8"}}, "x").weight_bytes == 1.0
    ct = {"quant_method": "compressed-tensors", "config_groups": {"group_1": {"weights": {"num_bits": 8}},
                                                                   "group_0": {"weights": {"num_bits": 4}}}}
    assert blis_shape({**base, "quantization_config": ct}, "x").weight_bytes == 0.5
    # multimodal pivot: text_config keys override the top level; top-level quantization_config is kept
    pivot = blis_shape({"text_config": base, "num_hidden_layers": 99, "quantization_config": {"quant_method": "fp8"}},
                       "x")
    assert (pivot.n_layers, pivot.weight_bytes) == (4, 1.0)
    for bad, field in (({**base, "torch_dtype": "float8_e4m3"}, "torch_dtype"),
                       ({k: v for k, v in base.items() if k != "torch_dtype"}, "dtype"),
                       ({**base, "hidden_size": 0}, "hidden_size"),
                       ({**base, "num_local_experts": 8}, "num_experts_per_tok"),
                       ({**base, "num_key_value_heads": "8"}, "num_key_value_heads")):
        with pytest.raises(InputError) as err:
            blis_shape(bad, "cfg.json")
        assert str(err.value).startswith(f"cfg.json: {field}:") and "\n" not in str(err.value)


def test_shape_of_is_cached():
    arch = load_model("mixtral-8x7b")
    assert blis_shape_of(arch) is blis_shape_of(arch)


def test_variants():
    tp10, tp11 = BLIS_VARIANTS["blis-tp10"], BLIS_VARIANTS["blis-tp11"]
    assert tuple(tp11.names) == BLIS_BETA_ORDER and tuple(tp10.names) == BLIS_BETA_ORDER[:10]
    assert all(t.feature == BLIS_BASIS_OF[t.name] for t in tp11.terms)
    priors = {t.name: t.prior for t in tp11.terms}
    assert {n for n, p in priors.items() if p == 1.0} == {"beta1a", "beta1b", "beta2a", "beta2b", "beta3", "beta4",
                                                         "beta_ep"}
    assert all(priors[n] is None for n in ("beta5", "beta6", "beta7", "beta8"))
    # the variant's linear prediction is BLIS's step before truncation
    basis = blis_basis(shape("llama-4-scout-17b-16e-fp8"), H100, 2,
                       stacked([aggregate(c["requests"]) for c in CASE_GROUPS[("llama-4-scout-17b-16e-fp8", 2)]]))
    pred = tp11.predict(basis, np.array(FIXTURE["beta_defaults_yaml_11"]))
    assert np.trunc(pred).astype(int).tolist() == blis_step_time_us(FIXTURE["beta_defaults_yaml_11"], basis).tolist()
