"""docs/formulas.md §8 worked examples (H100 SXM), both formula sets, to 0.5%."""

import dataclasses
import json
from pathlib import Path

import pytest

from rooflab.model.arch import load_model
from rooflab.model.features import (
    Setting,
    compute_features,
    expert_weight_bytes,
    static_weight_bytes,
)
from rooflab.model.hardware import load_hardware

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "formulas_worked_examples.json"
FIXTURE = Path(__file__).parent / "fixtures" / "formulas_worked_examples.json"
EXAMPLES = json.loads((SHARED if SHARED.exists() else FIXTURE).read_text())

MODELS = {"Llama-3.1-8B": ("llama-3.1-8b", 1), "Mixtral-8x7B": ("mixtral-8x7b", 2), "DeepSeek-V3": ("deepseek-v3", 8)}
FORMULA_KEY = {"design": "design", "vllm": "refined"}

# The example step: one chunked prefill (n=512 new tokens, c=1536 cached: the last chunk of a 2048 prompt)
# and 32 decodes with c=2048 each.
STEP = dict(prefill_reqs=[1], prefill_tokens=[512], prefill_context=[1536],
            prefill_attn_pairs=[512 * 1536 + 512 * 513 / 2], prefill_logits=[1],
            decode_reqs=[32], decode_context=[32 * 2048])
CHECKED = ("F_pf_compute", "F_pf_kv", "F_dc_compute", "F_dc_kv", "F_weight_static", "F_weight_moe", "F_tp",
           "N_eff", "pf_flops", "dc_flops")


def _features(model, formulas, **kw):
    name, tp = MODELS[model]
    s = Setting(load_model(name), load_hardware("H100-SXM"), tp, formulas, **kw)
    return s, {k: float(v[0]) for k, v in compute_features(s, STEP).items()}


@pytest.mark.parametrize("formulas", ["design", "vllm"])
@pytest.mark.parametrize("model", list(MODELS))
def test_worked_example(model, formulas):
    ref = EXAMPLES[f"{model}|{FORMULA_KEY[formulas]}"]
    # The worked numbers put every FLOP at the bf16 peak; fp8_peak=False reproduces that convention.
    s, f = _features(model, formulas, fp8_peak=False)
    ref = dict(ref, pf_flops=ref["pf_FLOPs"], dc_flops=ref["dc_FLOPs"])
    for key in CHECKED:
        assert f[key] == pytest.approx(ref[key], rel=5e-3, abs=1e-9), key
    assert static_weight_bytes(s) == pytest.approx(ref["W_static_bytes"], rel=5e-3)
    assert f["N_eff"] * expert_weight_bytes(s) == pytest.approx(ref["W_moe_bytes"], rel=5e-3)
    roofline = (max(f["F_pf_compute"], f["F_pf_kv"]) + max(f["F_dc_compute"], f["F_dc_kv"])
                + f["F_weight_static"] + f["F_weight_moe"] + f["F_tp"])
    assert roofline == pytest.approx(ref["roofline_sum_beta1"], rel=5e-3)
    # the physical ring over NVLink (FORMULAS §4.5), without the hop latency
    bare = Setting(s.arch, dataclasses.replace(s.hardware, link_latency_us=0.0), s.tp, formulas, fp8_peak=False)
    assert float(compute_features(bare, STEP)["F_tp_link"][0]) == pytest.approx(ref["F_tp_nvlink_ring"], rel=5e-3,
                                                                               abs=1e-9)


def test_deepseek_fp8_gemms_run_at_fp8_peak():
    """vllm formulas put fp8-weight GEMMs at the fp8 peak: between the all-bf16 and all-fp8 figures."""
    ref = EXAMPLES["DeepSeek-V3|refined"]
    _, f = _features("DeepSeek-V3", "vllm")
    assert ref["F_pf_compute_at_fp8_peak"] < f["F_pf_compute"] < ref["F_pf_compute"]
    assert ref["F_dc_compute_at_fp8_peak"] < f["F_dc_compute"] < ref["F_dc_compute"]
    # the design formulas have one (bf16) peak whatever the option says
    _, g = _features("DeepSeek-V3", "design")
    assert g["F_pf_compute"] == pytest.approx(EXAMPLES["DeepSeek-V3|design"]["F_pf_compute"], rel=5e-3)


@pytest.mark.parametrize("B,expected", [(1, 2.0), (2, 3.5), (4, 5.5), (8, 7.2)])
def test_mixtral_expected_distinct_experts_on_decode_steps(B, expected):
    """docs/formulas.md §8.2 sensitivity table: decode-only steps of B requests (T = B tokens)."""
    s = Setting(load_model("mixtral-8x7b"), load_hardware("H100-SXM"), 2, "vllm")
    f = compute_features(s, dict(prefill_reqs=[0], prefill_tokens=[0], prefill_context=[0], decode_reqs=[B],
                                 decode_context=[B * 100]))
    assert f["N_eff"][0] == pytest.approx(expected, abs=0.05)
    d = compute_features(Setting(s.arch, s.hardware, 2, "design"),
                         dict(prefill_reqs=[0], prefill_tokens=[0], prefill_context=[0], decode_reqs=[B],
                              decode_context=[B * 100]))
    assert d["N_eff"][0] == min(8, 2 * B)


def test_deepseek_decode_only_expected_experts():
    """§8.3: a decode-only step with B = 32 touches 163.3 of 256 experts in expectation (PR says 256)."""
    s = Setting(load_model("deepseek-v3"), load_hardware("H100-SXM"), 8, "vllm")
    f = compute_features(s, dict(prefill_reqs=[0], prefill_tokens=[0], prefill_context=[0], decode_reqs=[32],
                                 decode_context=[32 * 2048]))
    assert f["N_eff"][0] == pytest.approx(163.3, abs=0.1)
