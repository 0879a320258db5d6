"""The physics features of the corrected roofline (docs/spec.md §1, docs/formulas.md §4), vectorized over steps.

Every feature is the time (µs) the step's work would take at 100% of datasheet peak, per GPU (per TP
rank). Two formula sets:

* ``design`` — exactly the seed design's formulas (docs/formulas.md §4 "as the PR states them");
* ``vllm`` (default) — the vLLM-faithful refinement of docs/formulas.md §9: expected distinct experts over
  tokens, the MLA compute-friendly prefill path with the kv_b up-projection, replicated MLA
  ``fused_qkv_a`` and latent cache, replicated KV heads when ``H_kv < TP``, LM head and router, exact
  causal pairs from pre-step ``num_computed_tokens``, fp8 GEMMs at the fp8 peak.

Inputs are batch aggregates per step (:data:`AGGREGATE_COLUMNS`); per-request entries are reduced to
them exactly by :func:`rooflab.steps.aggregate_entries`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from rooflab.errors import InputError
from rooflab.model.arch import ModelArch, load_model
from rooflab.model.blis import blis_basis, blis_shape_of, load_blis_hardware
from rooflab.model.hardware import Hardware, load_hardware

ROOFLINE_FORMULAS = ("vllm", "design")  # rooflab's corrected roofline, computed here
FORMULAS = (*ROOFLINE_FORMULAS, "blis")  # blis: BLIS's trained-physics basis (rooflab.model.blis)
DEFAULT_FORMULAS = "vllm"

# Per-step batch aggregates the features are computed from (names of the step table).
AGGREGATE_COLUMNS = (
    "prefill_reqs",  # |P|
    "prefill_tokens",  # T_pf = Σ_P n_i
    "prefill_context",  # C_pf = Σ_P c_i   (pre-step num_computed_tokens)
    "prefill_attn_pairs",  # A_pf exact = Σ_P [n_i c_i + n_i(n_i+1)/2]; NaN -> estimated from aggregates
    "prefill_logits",  # prefill requests whose last prompt chunk runs this step; NaN -> all prefills
    "decode_reqs",  # |D| = T_dc
    "decode_context",  # C_dc = Σ_D c_i
    "prefill_prompt_pairs",  # Σ_P n_i·(p_i + n_i/2) with p_i the FULL prompt: BLIS's attention term; NaN -> estimated
)

# Columns of the feature frame that model variants combine (see rooflab.model.variants).
BASIS_COLUMNS = ("f_prefill", "f_pf_dense", "f_pf_attn", "f_decode", "f_weight_static", "f_weight_moe",
                 "f_tp", "n_requests", "one", "n_layers")


@dataclass(frozen=True)
class Setting:
    """What the features of one step depend on besides its batch: model, TP degree, GPU, formulas."""

    arch: ModelArch
    hardware: Hardware
    tp: int
    formulas: str = "vllm"
    fp8_peak: bool = True  # vllm formulas: GEMMs with fp8 weights run at the fp8 peak

    def __post_init__(self) -> None:
        if self.formulas not in ROOFLINE_FORMULAS:
            raise InputError(None, "formulas",
                             f"unknown feature formulas {self.formulas!r} (known: {', '.join(ROOFLINE_FORMULAS)}; "
                             "blis is computed by rooflab.model.blis)")
        if not isinstance(self.tp, (int, np.integer)) or self.tp < 1:
            raise InputError(None, "tp", f"tensor-parallel degree must be a positive integer, got {self.tp!r}")


def _as_array(x: ArrayLike, n: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0 and n is not None:
        a = np.full(n, float(a))
    return a


# ---------------------------------------------------------------------------------------------------
# Weights (bytes per GPU), independent of the batch


def static_weight_bytes(s: Setting) -> float:
    """Weights read every step: attention, dense FFN, shared experts (+ router, LM head for vllm)."""
    a, tp, bpp, vllm = s.arch, s.tp, s.arch.weight_bytes, s.formulas == "vllm"
    d, L, H = a.hidden, a.n_layers, a.n_heads
    bf16 = max(2.0, bpp)  # LM head, router, embeddings stay 16-bit in fp8 checkpoints
    if a.mla is None:
        kvh = max(1.0, a.n_kv_heads / tp) if vllm else a.n_kv_heads / tp
        attn = L * (d * (H / tp + 2 * kvh) * a.head_dim + H * a.head_dim * d / tp) * bpp
    else:
        m = a.mla
        P, R, rkv, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim
        if vllm:
            q = d * (m.q_lora_rank + rkv + R) + m.q_lora_rank * H * (P + R) / tp if m.q_lora_rank else \
                d * (rkv + R) + d * H * (P + R) / tp
            per_layer = q + rkv * H * (P + dv) / tp + H * dv * d / tp
        else:
            per_layer = d * (rkv + R) + d * d / tp + (H / tp) * P * rkv + (H / tp) * rkv * dv + H * dv * d / tp
        attn = L * per_layer * bpp
    ffn = a.n_dense_layers * 3 * d * a.ffn_dim * bpp / tp
    shared = a.n_moe_layers * 3 * d * a.shared_ffn_dim * bpp / tp
    extra = 0.0
    if vllm:
        extra += a.n_moe_layers * d * a.n_experts * bf16  # router, replicated
        extra += a.vocab * d * bf16 / tp  # LM head, vocab-parallel
    return attn + ffn + shared + extra


def expert_weight_bytes(s: Setting) -> float:
    """Bytes per GPU of ONE routed expert across all MoE layers (times N_eff = F_weight_moe bytes)."""
    a = s.arch
    return a.n_moe_layers * 3 * a.hidden * a.expert_ffn_dim * a.weight_bytes / s.tp


def kv_bytes_per_token_layer(s: Setting) -> float:
    a = s.arch
    if a.mla is not None:  # latent cache, replicated on every TP rank
        return (a.mla.kv_lora_rank + a.mla.qk_rope_head_dim) * a.kv_bytes
    kvh = max(1.0, a.n_kv_heads / s.tp) if s.formulas == "vllm" else a.n_kv_heads / s.tp
    return 2 * kvh * a.head_dim * a.kv_bytes


def expected_experts(s: Setting, tokens: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """N_eff: design min(N, max(k, B·k)) over requests; vllm N·(1−(1−k/N)^T) over tokens."""
    a = s.arch
    if not a.is_moe:
        return np.zeros_like(tokens)
    N, k = float(a.n_experts), float(a.experts_per_token)
    if s.formulas == "design":
        return np.minimum(N, np.maximum(k, requests * k))
    return N * -np.expm1(tokens * np.log1p(-k / N)) if k < N else np.where(tokens > 0, N, 0.0)


# ---------------------------------------------------------------------------------------------------
# FLOPs per phase, split into GEMMs whose weights may be fp8 and everything else (bf16 peak)


def _phase_flops(s: Setting, T: np.ndarray, A: np.ndarray, C: np.ndarray, logits: np.ndarray,
                 phase: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GEMM FLOPs against checkpoint weights, attention-score FLOPs, other FLOPs) of one phase."""
    a, tp, vllm = s.arch, s.tp, s.formulas == "vllm"
    d, L, H = a.hidden, a.n_layers, a.n_heads
    gemm = np.zeros_like(T)  # FLOPs of GEMMs against (possibly fp8) checkpoint weights
    attn = np.zeros_like(T)  # attention scores (QKᵀ and PV over the context): FlashAttention's own efficiency
    other = np.zeros_like(T)  # bf16-kept weights (MLA absorbed), router, LM head
    if a.mla is None:
        kvh = max(1.0, a.n_kv_heads / tp) if vllm else a.n_kv_heads / tp
        gemm += L * (2 * T * d * (H / tp + 2 * kvh) * a.head_dim + 2 * T * H * a.head_dim * d / tp)
        attn += L * 4 * (H / tp) * a.head_dim * A
    else:
        m = a.mla
        P, R, rkv, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim
        if not vllm:  # absorbed form for both phases, as the PR writes it
            gemm += L * (2 * T * d * (rkv + R) + 2 * T * d * d / tp + 2 * T * H * dv * d / tp)
            other += L * (2 * T * H * P * rkv / tp + 2 * T * H * rkv * dv / tp)
            attn += L * (4 * (H / tp) * A * rkv + 2 * (H / tp) * A * R)
        else:
            if m.q_lora_rank:
                q = 2 * T * d * (m.q_lora_rank + rkv + R) + 2 * T * m.q_lora_rank * H * (P + R) / tp
            else:
                q = 2 * T * d * H * (P + R) / tp + 2 * T * d * (rkv + R)
            gemm += L * (q + 2 * T * H * dv * d / tp)
            if phase == "prefill":  # compute-friendly path: up-project new tokens and cached context
                gemm += L * 2 * (T + C) * rkv * H * (P + dv) / tp
                attn += L * (2 * (H / tp) * A * (P + R) + 2 * (H / tp) * A * dv)
            else:  # MQA over the latent, W_UK / W_UV kept in bf16
                other += L * (2 * T * H * P * rkv / tp + 2 * T * H * rkv * dv / tp)
                attn += L * (2 * (H / tp) * A * (rkv + R) + 2 * (H / tp) * A * rkv)
    gemm += a.n_dense_layers * 6 * T * d * a.ffn_dim / tp
    if a.is_moe:
        gemm += a.n_moe_layers * 6 * T * (a.experts_per_token * a.expert_ffn_dim + a.shared_ffn_dim) * d / tp
        if vllm:
            other += a.n_moe_layers * 2 * T * d * a.n_experts
    if vllm:
        other += 2 * logits * a.vocab * d / tp
    return gemm, attn, other


def compute_features(s: Setting, agg: dict | pd.DataFrame) -> dict[str, np.ndarray]:
    """Features of every step of one setting. ``agg`` maps :data:`AGGREGATE_COLUMNS` to arrays."""
    n = len(np.atleast_1d(np.asarray(agg["decode_reqs"])))
    P_req = _as_array(agg["prefill_reqs"], n)
    T_pf = _as_array(agg["prefill_tokens"], n)
    C_pf = _as_array(agg["prefill_context"], n)
    D_req = _as_array(agg["decode_reqs"], n)
    C_dc = _as_array(agg["decode_context"], n)
    A_pf = _as_array(agg.get("prefill_attn_pairs", np.nan), n)
    logits_pf = _as_array(agg.get("prefill_logits", np.nan), n)

    # Missing per-request detail: assume the step's prefill requests are alike (n̄ = T/|P|, c̄ = C/|P|).
    with np.errstate(divide="ignore", invalid="ignore"):
        est = np.where(P_req > 0, T_pf * C_pf / P_req + T_pf * (T_pf / P_req + 1) / 2, 0.0)
    A_pf = np.where(np.isnan(A_pf), est, A_pf)
    logits_pf = np.where(np.isnan(logits_pf), P_req, logits_pf)
    T_dc = D_req
    if s.formulas == "design":  # PR's pairs: Σ n(c + n/2) and Σ (c + 1/2)
        A_pf_used = A_pf - T_pf / 2
        A_dc = C_dc + D_req / 2
    else:
        A_pf_used = A_pf
        A_dc = C_dc + D_req

    vllm_tp = s.formulas == "vllm"
    hw = s.hardware
    gemm_peak = hw.gemm_tflops(s.arch.fp8_weights and s.formulas == "vllm" and s.fp8_peak)
    g_pf, a_pf, o_pf = _phase_flops(s, T_pf, A_pf_used, C_pf, logits_pf, "prefill")
    g_dc, a_dc, o_dc = _phase_flops(s, T_dc, A_dc, C_dc, D_req, "decode")
    us_flop_g, us_flop_o = 1.0 / (gemm_peak * 1e6), 1.0 / (hw.peak_tflops_bf16 * 1e6)
    us_byte = 1.0 / (hw.hbm_tb_s * 1e6)

    kv_tok = kv_bytes_per_token_layer(s)
    L = s.arch.n_layers
    B = P_req + D_req
    T = T_pf + T_dc
    n_eff = expected_experts(s, T, B)
    out = {
        "F_pf_compute": g_pf * us_flop_g + (a_pf + o_pf) * us_flop_o,
        "F_pf_attn": a_pf * us_flop_o,
        "F_pf_kv": L * kv_tok * (C_pf + T_pf) * us_byte,
        "F_dc_compute": g_dc * us_flop_g + (a_dc + o_dc) * us_flop_o,
        "F_dc_kv": L * kv_tok * (C_dc + T_dc) * us_byte,
        "F_weight_static": np.full(n, static_weight_bytes(s) * us_byte),
        "F_weight_moe": n_eff * expert_weight_bytes(s) * us_byte,
        "F_tp": (L * 2 * T * s.arch.hidden * s.arch.act_bytes * us_byte) if s.tp > 1 else np.zeros(n),
        "F_tp_link": _allreduce_us(s, T),
        "N_eff": n_eff,
        "pf_flops": g_pf + a_pf + o_pf,
        "dc_flops": g_dc + a_dc + o_dc,
    }
    out["f_prefill"] = np.maximum(out["F_pf_compute"], out["F_pf_kv"])
    out["f_decode"] = np.maximum(out["F_dc_compute"], out["F_dc_kv"])
    # The prefill roofline split at its attention-score share (FlashAttention runs at its own efficiency,
    # which depends on context length, not on the GEMMs'): f_pf_dense + f_pf_attn = f_prefill exactly,
    # so a variant with one β on both reduces to the unsplit one.
    out["f_pf_attn"] = np.minimum(out["F_pf_attn"], out["f_prefill"])
    out["f_pf_dense"] = out["f_prefill"] - out["f_pf_attn"]
    out["f_weight_static"] = out["F_weight_static"]
    out["f_weight_moe"] = out["F_weight_moe"]
    out["f_tp"] = out["F_tp_link"] if vllm_tp else out["F_tp"]
    out["n_requests"] = B
    out["one"] = np.ones(n)
    out["n_layers"] = np.full(n, float(L))
    return out


def _allreduce_us(s: Setting, T: np.ndarray) -> np.ndarray:
    """Physical TP all-reduce time (docs/formulas.md §4.5 "physical", the α-β model of a ring): 2 all-reduces
    per layer of M = T·d·b_act bytes, each moving 2·(TP−1)/TP·M per GPU over the interconnect (per
    direction) after 2·(TP−1) hops of the link latency. ``F_tp_link`` without the latency is the worked
    example's ``F_tp_nvlink_ring``."""
    T = np.asarray(T, dtype=np.float64)
    if s.tp == 1:
        return np.zeros(len(T))
    hw, tp = s.hardware, s.tp
    msg = T * s.arch.hidden * s.arch.act_bytes
    per_ar = 2 * (tp - 1) / tp * msg / (hw.nvlink_gb_s_per_direction * 1e3) + 2 * (tp - 1) * hw.link_latency_us
    return 2 * s.arch.n_layers * per_ar


def featurize(steps: pd.DataFrame, formulas: str = "vllm", *, fp8_peak: bool = True,
              models: dict | None = None, hardware: dict | None = None) -> pd.DataFrame:
    """Feature frame aligned with ``steps`` (a step table). Each (model, tp, hardware) group is computed
    in one vectorized pass. ``models``/``hardware`` may map names to already-loaded objects."""
    if formulas not in FORMULAS:
        raise InputError(None, "formulas", f"unknown feature formulas {formulas!r} (known: {', '.join(FORMULAS)})")
    models = dict(models or {})
    hardware = dict(hardware or {})
    cols = {}
    keys = steps[["model", "tp", "hardware"]].astype({"model": str, "tp": int, "hardware": str})
    codes, uniques = pd.MultiIndex.from_frame(keys).factorize()
    for g, (model, tp, hw) in enumerate(uniques):
        if model not in models:
            models[model] = load_model(model)
        if hw not in hardware:
            hardware[hw] = load_hardware(hw)
        idx = np.flatnonzero(codes == g)
        sub = {c: (steps[c].to_numpy(dtype=np.float64)[idx] if c in steps.columns else np.nan)
               for c in AGGREGATE_COLUMNS}
        if formulas == "blis":  # BLIS's own model-shape reading, formulas and hardware table
            shape = blis_shape_of(models[model])
            shape.check_tp(int(tp))
            feats = blis_basis(shape, load_blis_hardware(hardware[hw].name), int(tp), sub)
        else:
            feats = compute_features(Setting(models[model], hardware[hw], int(tp), formulas, fp8_peak), sub)
        for k, v in feats.items():
            if k not in cols:
                cols[k] = np.empty(len(steps))
            cols[k][idx] = v
    return pd.DataFrame(cols, index=steps.index)
