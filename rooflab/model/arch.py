"""Model architecture from a Hugging Face ``config.json``.

Reads dense MHA/GQA (Llama, Qwen, Mistral), MoE (Mixtral, Qwen3-MoE, Llama-4), MoE with shared experts
and MLA (DeepSeek-V2/V3), hybrid dense/MoE layer layouts, bf16/fp16/fp32 and fp8 checkpoints.
Anything it cannot model faithfully is refused with a one-line :class:`InputError` naming the file and
the field, never silently approximated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from rooflab.errors import InputError
from rooflab.paths import CONFIGS_DIR

# Fields naming the routed-expert count, in BLIS's resolution order (docs/formulas.md §3).
_EXPERT_COUNT_FIELDS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")
# Fields describing attention variants rooflab's formulas do not cover: refusing beats a wrong number.
_UNSUPPORTED_FIELDS = {
    "index_topk": "DeepSeek sparse attention (indexer) is not modelled",
    "index_n_heads": "DeepSeek sparse attention (indexer) is not modelled",
    "linear_attn_config": "linear attention is not modelled",
    "layer_types": "per-layer attention types (hybrid/linear attention) are not modelled",
}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention dimensions (DeepSeek-V2/V3)."""

    q_lora_rank: int | None  # r_q; None -> plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int  # r_kv
    qk_nope_head_dim: int  # P
    qk_rope_head_dim: int  # R
    v_head_dim: int  # d_v


@dataclass(frozen=True)
class ModelArch:
    """Everything the step-time features need to know about a model (docs/formulas.md §3 symbols)."""

    name: str
    source: str
    n_layers: int  # L
    hidden: int  # d
    n_heads: int  # H
    n_kv_heads: int  # H_kv
    head_dim: int  # d_h
    ffn_dim: int  # d_ff of dense FFN layers
    vocab: int  # V
    n_moe_layers: int = 0  # L_moe
    n_experts: int = 0  # N (routed)
    experts_per_token: int = 0  # k
    expert_ffn_dim: int = 0  # d_e
    shared_ffn_dim: int = 0  # total shared-expert FFN width per MoE layer (n_s * d_e for DeepSeek)
    mla: MLA | None = None
    weight_bytes: float = 2.0  # bytes/param of the GEMM weights (1 for fp8 checkpoints)
    kv_bytes: float = 2.0  # KV-cache element bytes
    act_bytes: float = 2.0  # activation bytes (all-reduce payload)
    max_model_len: int | None = None

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0 and self.n_moe_layers > 0

    @property
    def fp8_weights(self) -> bool:
        return self.weight_bytes == 1


def _get(cfg: dict, key: str, source: str, *, required: bool = True, default: Any = None, kind: type = int) -> Any:
    if key not in cfg or cfg[key] is None:
        if required:
            raise InputError(source, key, "required field is missing")
        return default
    value = cfg[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(source, key, f"expected a non-negative integer, got {value!r}")
    return value


def _weight_bytes(cfg: dict, top: dict, source: str) -> float:
    qc = top.get("quantization_config") or cfg.get("quantization_config")
    if qc:
        method = str(qc.get("quant_method", "")).lower()
        if method == "fp8":
            return 1.0
        if method == "compressed-tensors":
            groups = qc.get("config_groups") or {}
            weights = [g.get("weights") or {} for g in groups.values()]
            if weights and all(w.get("num_bits") == 8 and w.get("type") == "float" for w in weights):
                return 1.0
            raise InputError(source, "quantization_config.config_groups",
                             "only 8-bit float (fp8) compressed-tensors weights are supported")
        raise InputError(source, "quantization_config.quant_method",
                         f"unsupported quantization {method!r} (supported: fp8, compressed-tensors fp8)")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or top.get("torch_dtype") or top.get("dtype") or "bfloat16"
    if str(dtype) not in _DTYPE_BYTES:
        raise InputError(source, "torch_dtype", f"unsupported dtype {dtype!r}")
    return float(_DTYPE_BYTES[str(dtype)])


def _moe_layer_count(cfg: dict, L: int, source: str) -> int:
    """L_moe under the layer-placement rule of the model family (docs/formulas.md §3)."""
    deepseek_style = any(k in cfg for k in ("first_k_dense_replace", "moe_layer_freq"))
    qwen_style = any(k in cfg for k in ("decoder_sparse_step", "mlp_only_layers"))
    llama4_style = "interleave_moe_layer_step" in cfg
    if sum((deepseek_style, qwen_style, llama4_style)) > 1:
        raise InputError(source, "first_k_dense_replace/decoder_sparse_step/interleave_moe_layer_step",
                         "unknown combination of MoE layer-placement fields")
    if deepseek_style:
        K = _get(cfg, "first_k_dense_replace", source, required=False, default=0)
        f = _get(cfg, "moe_layer_freq", source, required=False, default=1)
        if f < 1:
            raise InputError(source, "moe_layer_freq", "must be >= 1")
        return sum(1 for i in range(L) if i >= K and i % f == 0)
    if qwen_style:
        step = _get(cfg, "decoder_sparse_step", source, required=False, default=1)
        only_mlp = set(cfg.get("mlp_only_layers") or [])
        if step < 1:
            raise InputError(source, "decoder_sparse_step", "must be >= 1")
        return sum(1 for i in range(L) if i not in only_mlp and (i + 1) % step == 0)
    if llama4_style:
        step = _get(cfg, "interleave_moe_layer_step", source)
        if step < 1:
            raise InputError(source, "interleave_moe_layer_step", "must be >= 1")
        return sum(1 for i in range(L) if (i + 1) % step == 0)
    return L


def parse_config(cfg: dict, *, name: str, source: str = "<config>", kv_bytes: float | None = None) -> ModelArch:
    """Build a :class:`ModelArch` from a parsed HF config dict."""
    if not isinstance(cfg, dict):
        raise InputError(source, None, "config must be a JSON object")
    top = cfg
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Llama-4) keep the LM in text_config
        cfg = {**cfg["text_config"]}
    for field, why in _UNSUPPORTED_FIELDS.items():
        if cfg.get(field) not in (None, [], {}):
            raise InputError(source, field, why)

    L = _get(cfg, "num_hidden_layers", source)
    d = _get(cfg, "hidden_size", source)
    H = _get(cfg, "num_attention_heads", source)
    V = _get(cfg, "vocab_size", source)
    if L == 0 or d == 0 or H == 0:
        raise InputError(source, "num_hidden_layers/hidden_size/num_attention_heads", "must be positive")
    H_kv = _get(cfg, "num_key_value_heads", source, required=False, default=H)
    if H_kv == 0 or H % H_kv:
        raise InputError(source, "num_key_value_heads", f"{H_kv} does not divide num_attention_heads={H}")
    d_h = _get(cfg, "head_dim", source, required=False, default=None)
    if d_h is None:
        if d % H:
            raise InputError(source, "head_dim", f"missing and hidden_size={d} is not divisible by heads={H}")
        d_h = d // H

    n_experts = 0
    for key in _EXPERT_COUNT_FIELDS:
        if cfg.get(key):
            n_experts = _get(cfg, key, source)
            break
    k = e = shared = 0
    L_moe = 0
    model_type = str(cfg.get("model_type", ""))
    ffn_key = "intermediate_size_mlp" if model_type.startswith("llama4") else "intermediate_size"
    d_ff = _get(cfg, ffn_key, source)
    if n_experts:
        k = _get(cfg, "num_experts_per_tok", source)
        if not 0 < k <= n_experts:
            raise InputError(source, "num_experts_per_tok", f"{k} is not in 1..{n_experts}")
        e = _get(cfg, "moe_intermediate_size", source, required=False, default=None)
        if e is None:
            e = _get(cfg, "intermediate_size", source)
        L_moe = _moe_layer_count(cfg, L, source)
        n_s = _get(cfg, "n_shared_experts", source, required=False, default=0)
        shared = n_s * e
        if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE style: one shared expert of its own width
            if n_s:
                raise InputError(source, "shared_expert_intermediate_size",
                                 "unknown combination with n_shared_experts")
            shared = _get(cfg, "shared_expert_intermediate_size", source)
        if model_type.startswith("llama4"):  # Llama-4 MoE layers carry one shared expert of width d_e
            shared = e
    else:
        for key in ("num_experts_per_tok", "moe_intermediate_size", "n_shared_experts"):
            if cfg.get(key):
                raise InputError(source, key, "set but the config names no routed experts "
                                 f"({'/'.join(_EXPERT_COUNT_FIELDS)})")

    mla = None
    if cfg.get("kv_lora_rank") is not None:
        mla = MLA(
            q_lora_rank=_get(cfg, "q_lora_rank", source, required=False, default=None),
            kv_lora_rank=_get(cfg, "kv_lora_rank", source),
            qk_nope_head_dim=_get(cfg, "qk_nope_head_dim", source),
            qk_rope_head_dim=_get(cfg, "qk_rope_head_dim", source),
            v_head_dim=_get(cfg, "v_head_dim", source),
        )
    else:
        for key in ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
            if cfg.get(key) is not None:
                raise InputError(source, key, "MLA field set without kv_lora_rank")

    return ModelArch(
        name=name, source=source, n_layers=L, hidden=d, n_heads=H, n_kv_heads=H_kv, head_dim=d_h,
        ffn_dim=d_ff, vocab=V, n_moe_layers=L_moe, n_experts=n_experts, experts_per_token=k,
        expert_ffn_dim=e, shared_ffn_dim=shared, mla=mla,
        weight_bytes=(wb := _weight_bytes(cfg, top, source)),
        # vLLM's KV cache (kv_cache_dtype auto) and activations follow the model dtype: 2 bytes for bf16/fp16
        # and fp8 checkpoints (activations stay 16-bit), 4 for a float32 model (the tiny CPU test model)
        kv_bytes=float(kv_bytes) if kv_bytes is not None else (4.0 if wb == 4 else 2.0),
        act_bytes=4.0 if wb == 4 else 2.0,
        max_model_len=cfg.get("max_position_embeddings"),
    )


def load_model(name_or_path: str | Path, *, kv_bytes: float | None = None) -> ModelArch:
    """Load a model by name (``configs/models/<name>/config.json``), directory, or config file path."""
    p = Path(name_or_path)
    name = resolve_model_name(str(name_or_path))
    candidates = [p / "config.json", p] if p.exists() else [CONFIGS_DIR / "models" / name / "config.json"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        known = ", ".join(list_models())
        raise InputError(name_or_path, None, f"no such model config (known models: {known})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
    name = path.parent.name if path.name == "config.json" else path.stem
    return parse_config(cfg, name=name, source=str(path), kv_bytes=kv_bytes)


@lru_cache(maxsize=1)
def _aliases() -> dict:
    from rooflab.files import read_yaml

    path = CONFIGS_DIR / "models" / "aliases.yaml"
    doc = read_yaml(path) if path.is_file() else {}
    if not isinstance(doc or {}, dict):
        raise InputError(path, None, "expected a mapping of alias: model folder")
    return {str(k).lower(): str(v) for k, v in (doc or {}).items()}


def resolve_model_name(name: str) -> str:
    """Map another source's name for a shipped model (``configs/models/aliases.yaml``) to its folder."""
    return _aliases().get(name.lower(), name)


def list_models() -> list[str]:
    root = CONFIGS_DIR / "models"
    return sorted(p.parent.name for p in root.glob("*/config.json"))
