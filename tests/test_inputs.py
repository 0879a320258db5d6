"""Unit tests of the input readers: model configs, GPU datasheets, step tables and per-request entries."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from rooflab.data.tables import aggregate_entries, validate_steps
from rooflab.errors import InputError
from rooflab.model.arch import (
    CONFIGS_DIR,
    ModelArch,
    list_models,
    load_model,
    parse_config,
)
from rooflab.model.hardware import Hardware, list_hardware, load_hardware


def _one_line_error(exc_info, *needles):
    """The error is a single line and names every needle (file name, field)."""
    msg = str(exc_info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------------
# Model configs


SHIPPED = ["codellama-34b", "deepseek-v2-lite", "deepseek-v3", "llama-2-70b", "llama-2-7b", "llama-3.1-70b",
           "llama-3.1-8b", "llama-4-scout-17b-16e-fp8", "mistral-nemo-12b", "mixtral-8x22b", "mixtral-8x7b",
           "qwen2.5-7b", "qwen3-14b", "qwen3-30b-a3b", "yi-34b"]


def test_list_models_lists_every_shipped_folder():
    models = list_models()
    assert models == sorted(models)
    assert set(SHIPPED) <= set(models)
    folders = {p.parent.name for p in (CONFIGS_DIR / "models").glob("*/config.json")}
    assert set(models) == folders


@pytest.mark.parametrize("name", list_models())
def test_every_shipped_model_loads(name):
    a = load_model(name)
    assert isinstance(a, ModelArch)
    assert a.name == name
    assert a.source.endswith(f"{name}/config.json")
    for field in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab"):
        assert getattr(a, field) > 0, field
    assert a.n_heads % a.n_kv_heads == 0
    assert 0 <= a.n_moe_layers <= a.n_layers
    assert a.weight_bytes in (1.0, 2.0, 4.0)
    if a.is_moe:
        assert 0 < a.experts_per_token <= a.n_experts
        assert a.expert_ffn_dim > 0
    else:
        assert a.experts_per_token == 0 and a.n_moe_layers == 0


def test_llama_3_1_8b():
    a = load_model("llama-3.1-8b")
    assert (a.n_layers, a.n_kv_heads, a.head_dim) == (32, 8, 128)
    assert (a.hidden, a.n_heads, a.ffn_dim, a.vocab) == (4096, 32, 14336, 128256)
    assert not a.is_moe
    assert a.n_moe_layers == 0 and a.n_dense_layers == 32
    assert a.mla is None
    assert a.weight_bytes == 2.0 and not a.fp8_weights


def test_mixtral_8x7b():
    a = load_model("mixtral-8x7b")
    assert a.is_moe
    assert (a.n_experts, a.experts_per_token) == (8, 2)
    assert a.n_moe_layers == 32 and a.n_dense_layers == 0
    assert a.expert_ffn_dim == 14336
    assert a.shared_ffn_dim == 0
    assert a.mla is None


def test_mixtral_8x22b():
    a = load_model("mixtral-8x22b")
    assert a.is_moe
    assert (a.n_layers, a.hidden, a.n_heads, a.n_kv_heads, a.head_dim) == (56, 6144, 48, 8, 128)
    assert (a.n_experts, a.experts_per_token, a.expert_ffn_dim) == (8, 2, 16384)
    assert a.n_moe_layers == 56
    assert a.shared_ffn_dim == 0


def test_qwen3_30b_a3b():
    a = load_model("qwen3-30b-a3b")
    assert a.is_moe
    assert (a.n_experts, a.experts_per_token) == (128, 8)
    assert a.expert_ffn_dim == 768
    # head_dim comes from the explicit field, not hidden_size / heads (2048 / 32 = 64)
    assert a.head_dim == 128
    assert a.hidden // a.n_heads != a.head_dim
    assert a.n_moe_layers == 48 and a.n_dense_layers == 0
    assert a.shared_ffn_dim == 0


def test_deepseek_v3():
    a = load_model("deepseek-v3")
    assert a.is_moe
    assert a.n_layers == 61
    assert a.n_moe_layers == 58
    assert a.n_dense_layers == 3
    assert a.mla is not None
    assert a.mla.q_lora_rank == 1536
    assert a.mla.kv_lora_rank == 512
    assert (a.mla.qk_nope_head_dim, a.mla.qk_rope_head_dim, a.mla.v_head_dim) == (128, 64, 128)
    assert a.weight_bytes == 1 and a.fp8_weights
    assert (a.n_experts, a.experts_per_token, a.expert_ffn_dim) == (256, 8, 2048)
    assert a.shared_ffn_dim == 2048  # one shared expert of width 2048
    assert a.ffn_dim == 18432  # dense layers


def test_deepseek_v2_lite():
    a = load_model("deepseek-v2-lite")
    assert a.mla is not None
    assert a.mla.q_lora_rank is None
    assert a.mla.kv_lora_rank == 512
    assert a.n_layers == 27
    assert a.n_moe_layers == 26  # first_k_dense_replace = 1
    assert a.n_dense_layers == 1
    assert a.shared_ffn_dim == 2 * 1408
    assert a.expert_ffn_dim == 1408
    assert (a.n_experts, a.experts_per_token) == (64, 6)
    assert a.weight_bytes == 2.0


def test_llama_4_scout_fp8_reads_text_config():
    path = CONFIGS_DIR / "models" / "llama-4-scout-17b-16e-fp8" / "config.json"
    raw = json.loads(path.read_text())
    assert "text_config" in raw and "num_hidden_layers" not in raw  # the LM lives in text_config
    a = load_model("llama-4-scout-17b-16e-fp8")
    assert a.n_layers == raw["text_config"]["num_hidden_layers"] == 48
    assert a.hidden == 5120
    assert a.weight_bytes == 1 and a.fp8_weights  # compressed-tensors fp8
    assert (a.n_experts, a.experts_per_token) == (16, 1)
    assert a.ffn_dim == 16384  # intermediate_size_mlp, not intermediate_size
    assert a.expert_ffn_dim == 8192
    assert a.shared_ffn_dim == 8192
    assert a.is_moe and a.mla is None


def test_llama_2_70b():
    a = load_model("llama-2-70b")
    assert (a.n_layers, a.hidden, a.n_heads, a.n_kv_heads, a.head_dim) == (80, 8192, 64, 8, 128)
    assert a.ffn_dim == 28672 and a.vocab == 32000
    assert not a.is_moe and a.weight_bytes == 2.0


def test_alias_resolves():
    a = load_model("llama-2-70b-hf")
    assert a.name == "llama-2-70b"
    assert a == load_model("llama-2-70b")


def test_every_alias_points_at_a_shipped_model():
    aliases = yaml.safe_load((CONFIGS_DIR / "models" / "aliases.yaml").read_text())
    assert aliases
    for alias, target in aliases.items():
        assert target in list_models(), alias
        assert load_model(alias).name == target


def test_load_model_accepts_directory_and_file(tmp_path):
    src = CONFIGS_DIR / "models" / "llama-3.1-8b" / "config.json"
    d = tmp_path / "mymodel"
    d.mkdir()
    (d / "config.json").write_text(src.read_text())
    by_dir = load_model(d)
    by_file = load_model(d / "config.json")
    assert by_dir.name == by_file.name == "mymodel"
    assert by_dir.n_layers == 32 and by_file.n_kv_heads == 8


def test_parse_config_kv_bytes_override():
    cfg = json.loads((CONFIGS_DIR / "models" / "llama-3.1-8b" / "config.json").read_text())
    assert parse_config(cfg, name="x").kv_bytes == 2.0
    assert parse_config(cfg, name="x", kv_bytes=1).kv_bytes == 1.0


# ---- error cases ------------------------------------------------------------------------------------

BASE = {
    "model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
    "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1000, "torch_dtype": "bfloat16",
}
MOE = {**BASE, "num_local_experts": 8, "num_experts_per_tok": 2}
MLA_CFG = {**MOE, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
           "q_lora_rank": None}


def _write(tmp_path, cfg, folder="badmodel"):
    d = tmp_path / folder
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_base_configs_are_valid(tmp_path):
    # the error cases below differ from these by one field only
    assert load_model(_write(tmp_path, BASE, "a")).n_layers == 4
    assert load_model(_write(tmp_path, MOE, "b")).is_moe
    m = load_model(_write(tmp_path, MLA_CFG, "c"))
    assert m.mla is not None and m.mla.qk_rope_head_dim == 16


def _without(cfg, key):
    return {k: v for k, v in cfg.items() if k != key}


ERROR_CASES = {
    "missing_layers": (_without(BASE, "num_hidden_layers"), "num_hidden_layers"),
    "kv_heads_not_dividing": ({**BASE, "num_key_value_heads": 3}, "num_key_value_heads"),
    "experts_without_top_k": (_without(MOE, "num_experts_per_tok"), "num_experts_per_tok"),
    "top_k_without_experts": ({**BASE, "num_experts_per_tok": 2}, "num_experts_per_tok"),
    "mla_missing_rope_dim": (_without(MLA_CFG, "qk_rope_head_dim"), "qk_rope_head_dim"),
    "rope_dim_without_kv_lora": ({**BASE, "qk_rope_head_dim": 64}, "qk_rope_head_dim"),
    "deepseek_and_qwen_layer_placement": ({**MOE, "first_k_dense_replace": 1, "decoder_sparse_step": 1},
                                          "first_k_dense_replace"),
    "awq": ({**BASE, "quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method"),
    "dtype": ({**BASE, "torch_dtype": "int8"}, "torch_dtype"),
    "sparse_attention": ({**MLA_CFG, "index_topk": 2048}, "index_topk"),
    "int4_compressed_tensors": ({**BASE, "quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {"g0": {"weights": {"num_bits": 4, "type": "int"}}}}}, "config_groups"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_config_error_names_file_and_field(tmp_path, case):
    cfg, field = ERROR_CASES[case]
    d = _write(tmp_path, cfg)
    with pytest.raises(InputError) as ei:
        load_model(d)
    _one_line_error(ei, str(d / "config.json"), field)
    assert ei.value.field is not None and field in ei.value.field


@pytest.mark.parametrize("case", ["missing_layers", "awq", "sparse_attention"])
def test_parse_config_error_names_source(case):
    cfg, field = ERROR_CASES[case]
    with pytest.raises(InputError) as ei:
        parse_config(cfg, name="x", source="somewhere/cfg.json")
    _one_line_error(ei, "somewhere/cfg.json", field)


def test_parse_config_rejects_non_object():
    with pytest.raises(InputError) as ei:
        parse_config([1, 2], name="x", source="list.json")
    _one_line_error(ei, "list.json")


def test_malformed_json_names_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"num_hidden_layers": 4,\n  "hidden_size": }')
    with pytest.raises(InputError) as ei:
        load_model(p)
    msg = _one_line_error(ei, str(p), "malformed JSON")
    assert "line 2" in msg


def test_unknown_model_lists_known_models():
    with pytest.raises(InputError) as ei:
        load_model("no-such-model-xyz")
    msg = _one_line_error(ei, "no-such-model-xyz")
    for name in ("llama-3.1-8b", "deepseek-v3", "mixtral-8x7b"):
        assert name in msg


# ---------------------------------------------------------------------------------------------------
# Hardware

GPUS = ["H100-SXM", "H200", "A100-80GB", "L40S", "B200"]
CPUS = ["CPU-EPYC-Zen2-1core"]  # the real-vLLM-on-CPU integration test's machine (issue 8)


def test_list_hardware():
    assert sorted(list_hardware()) == sorted(GPUS + CPUS)


@pytest.mark.parametrize("name", GPUS + CPUS)
def test_every_gpu_loads(name):
    h = load_hardware(name)
    assert isinstance(h, Hardware)
    assert h.name == name
    for v in (h.peak_tflops_bf16, h.hbm_tb_s, h.nvlink_gb_s_per_direction, h.memory_gb):
        assert v > 0
    if h.peak_tflops_fp8 is not None:
        assert h.peak_tflops_fp8 >= h.peak_tflops_bf16
        assert h.gemm_tflops(True) == h.peak_tflops_fp8
    assert h.gemm_tflops(False) == h.peak_tflops_bf16


def test_h100_values():
    h = load_hardware("H100-SXM")
    assert h.peak_tflops_bf16 == 989.5
    assert h.hbm_tb_s == 3.35
    assert h.peak_tflops_fp8 == 1979.0


def test_a100_has_no_fp8():
    h = load_hardware("A100-80GB")
    assert h.peak_tflops_fp8 is None
    assert h.gemm_tflops(True) == h.peak_tflops_bf16 == 312.0


def test_unknown_hardware():
    with pytest.raises(InputError) as ei:
        load_hardware("TPU-v9")
    msg = _one_line_error(ei, "TPU-v9")
    assert "H100-SXM" in msg  # lists the known GPUs


GOOD_HW = {"name": "X", "peak_tflops_bf16": 100.0, "peak_tflops_fp8": 200.0, "hbm_tb_s": 1.0,
           "nvlink_gb_s_per_direction": 50, "memory_gb": 40}


def _write_yaml(tmp_path, text):
    p = tmp_path / "gpu.yaml"
    p.write_text(text)
    return p


def test_hardware_yaml_file_loads(tmp_path):
    p = _write_yaml(tmp_path, yaml.safe_dump(GOOD_HW))
    h = load_hardware(p)
    assert h.name == "X" and h.hbm_tb_s == 1.0 and h.source == str(p)


@pytest.mark.parametrize("doc, field", [
    (_without(GOOD_HW, "hbm_tb_s"), "hbm_tb_s"),
    ({**GOOD_HW, "clock_ghz": 1.7}, "clock_ghz"),
    ({**GOOD_HW, "memory_gb": -80}, "memory_gb"),
    ({**GOOD_HW, "hbm_tb_s": "fast"}, "hbm_tb_s"),
], ids=["missing", "unknown_field", "negative", "not_a_number"])
def test_hardware_yaml_errors(tmp_path, doc, field):
    p = _write_yaml(tmp_path, yaml.safe_dump(doc))
    with pytest.raises(InputError) as ei:
        load_hardware(p)
    _one_line_error(ei, str(p), field)
    assert ei.value.field == field


def test_hardware_malformed_yaml(tmp_path):
    p = _write_yaml(tmp_path, "name: X\npeak_tflops_bf16: [100\nhbm_tb_s: 1\n")
    with pytest.raises(InputError) as ei:
        load_hardware(p)
    _one_line_error(ei, str(p), "malformed YAML")


# ---------------------------------------------------------------------------------------------------
# Step table


def _steps(**over):
    df = pd.DataFrame({
        "run_id": ["r1", "r1", "r2"], "step_id": [0, 1, 0], "model": ["llama-3.1-8b"] * 3, "tp": [1, 1, 2],
        "hardware": ["H100-SXM"] * 3, "step_time_us": [10000.0, 12000.0, 9000.0],
        "prefill_reqs": [1, 0, 0], "prefill_tokens": [512, 0, 0], "prefill_context": [0, 0, 0],
        "decode_reqs": [3, 4, 2], "decode_context": [300, 420, 50],
    })
    for k, v in over.items():
        df[k] = v
    return df


def test_validate_steps_ok_and_defaults():
    out = validate_steps(_steps(workload=["chat", "chat", "code"]), "steps.parquet")
    assert len(out) == 3
    assert (out["preemptions"] == 0).all()
    assert out["kv_usage"].isna().all()
    assert out["prefill_attn_pairs"].isna().all() and out["prefill_logits"].isna().all()
    assert str(out["step_id"].dtype) == "int64" and str(out["decode_reqs"].dtype) == "float64"
    assert list(out["workload"]) == ["chat", "chat", "code"]  # extra column kept
    assert list(out["decode_context"]) == [300.0, 420.0, 50.0]


@pytest.mark.parametrize("col", ["step_time_us", "decode_context", "tp", "model"])
def test_validate_steps_missing_column(col):
    with pytest.raises(InputError) as ei:
        validate_steps(_steps().drop(columns=[col]), "steps.parquet")
    _one_line_error(ei, "steps.parquet", col)
    assert ei.value.field == col


def test_validate_steps_negative_decode_reqs():
    with pytest.raises(InputError) as ei:
        validate_steps(_steps(decode_reqs=[3, -1, 2]), "steps.parquet")
    msg = _one_line_error(ei, "steps.parquet", "decode_reqs")
    assert ei.value.field == "decode_reqs"
    assert "row 1" in msg


@pytest.mark.parametrize("bad", [0.0, -5.0])
def test_validate_steps_non_positive_step_time(bad):
    with pytest.raises(InputError) as ei:
        validate_steps(_steps(step_time_us=[10000.0, bad, 9000.0]), "steps.parquet")
    _one_line_error(ei, "steps.parquet", "step_time_us")
    assert ei.value.field == "step_time_us"


def test_validate_steps_nan_step_time_allowed():
    out = validate_steps(_steps(step_time_us=[10000.0, np.nan, 9000.0]))
    assert math.isnan(out["step_time_us"].iloc[1])


def test_validate_steps_bad_tp_and_unreadable_column():
    with pytest.raises(InputError) as ei:
        validate_steps(_steps(tp=[1, 0, 2]), "s.csv")
    _one_line_error(ei, "s.csv", "tp")
    with pytest.raises(InputError) as ei:
        validate_steps(_steps(decode_reqs=["3", "four", "2"]), "s.csv")
    _one_line_error(ei, "s.csv", "decode_reqs")


# ---------------------------------------------------------------------------------------------------
# Per-request entries -> per-step aggregates


def _entries():
    return pd.DataFrame({
        "run_id": ["r"] * 4, "step_id": [1, 1, 1, 2],
        "phase": ["prefill", "decode", "decode", "decode"],
        "tokens": [512, 1, 1, 1],
        "context_before": [1536, 100, 200, 2048],
        "prompt_tokens": [2048, 50, 60, 2048],
    })


def test_aggregate_entries_exact():
    agg = aggregate_entries(_entries()).set_index("step_id")
    assert list(agg.index) == [1, 2]
    s1, s2 = agg.loc[1], agg.loc[2]
    assert s1["prefill_reqs"] == 1 and s1["prefill_tokens"] == 512 and s1["prefill_context"] == 1536
    assert s1["prefill_attn_pairs"] == 512 * 1536 + 512 * 513 / 2
    assert s1["prefill_logits"] == 1  # 1536 + 512 = 2048: the last chunk
    assert s1["decode_reqs"] == 2 and s1["decode_context"] == 300
    assert s2["prefill_reqs"] == 0 and s2["prefill_tokens"] == 0 and s2["prefill_attn_pairs"] == 0
    assert s2["prefill_logits"] == 0
    assert s2["decode_reqs"] == 1 and s2["decode_context"] == 2048


def test_aggregate_entries_non_final_chunk_has_no_logits():
    e = _entries()
    e.loc[0, "context_before"] = 0  # first chunk of a 2048 prompt
    agg = aggregate_entries(e).set_index("step_id")
    assert agg.loc[1, "prefill_logits"] == 0
    assert agg.loc[1, "prefill_attn_pairs"] == 512 * 513 / 2


def test_aggregate_entries_without_prompt_tokens_leaves_logits_unknown():
    agg = aggregate_entries(_entries().drop(columns=["prompt_tokens"]))
    assert agg["prefill_logits"].isna().all()
    assert agg["decode_reqs"].sum() == 3


def test_aggregate_entries_unknown_phase():
    e = _entries()
    e.loc[2, "phase"] = "verify"
    with pytest.raises(InputError) as ei:
        aggregate_entries(e, "entries.parquet")
    msg = _one_line_error(ei, "entries.parquet", "phase")
    assert "verify" in msg
    assert ei.value.field == "phase"


def test_aggregate_entries_missing_column():
    with pytest.raises(InputError) as ei:
        aggregate_entries(_entries().drop(columns=["context_before"]), "entries.parquet")
    _one_line_error(ei, "entries.parquet", "context_before")
