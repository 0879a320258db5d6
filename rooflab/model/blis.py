"""BLIS's default step-time model ("trained-physics"), rooflab's own implementation of its specification.

BLIS (inference-sim, commit f90a1e3a) predicts a vLLM step as Σ β_j · basis_j over eleven roofline-style
basis functions, truncated to whole µs. This module computes those bases, vectorized over steps from
rooflab's per-step batch aggregates, and assembles BLIS's integer step time for a coefficient vector, so
rooflab can fit, replay and compare against BLIS on BLIS's own terms. It is written from docs/blis.md
(§1 config parsing, §2 hardware, §3 step time, §5 alphas), which was cross-checked bit-exactly against a
BLIS build; no BLIS code is used. BLIS's quirks are reproduced on purpose and marked "BLIS:" below.

Depends on: numpy; rooflab.errors.InputError; rooflab.files.read_yaml; rooflab.paths.CONFIGS_DIR;
rooflab.model.arch.ModelArch (only ``.source``, the config.json path: BLIS reads the model shape its
own way, so this module re-reads the file rather than reuse rooflab's ModelArch);
rooflab.model.terms (Term, Variant); data: configs/blis/hardware.yaml (BLIS's hardware table).
Only DP = 1 is supported (BLIS's default), so the MoE dispatch basis (β_EP) is always 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rooflab.errors import InputError
from rooflab.files import read_yaml
from rooflab.model.arch import ModelArch
from rooflab.model.terms import Term, Variant
from rooflab.paths import CONFIGS_DIR

HARDWARE_FILE = CONFIGS_DIR / "blis" / "hardware.yaml"

# BLIS's expert-count fields, in its resolution order; the first whose value is >= 2 wins.
_EXPERT_FIELDS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts", "num_routed_experts")
# BLIS's torch_dtype table (bytes per activation / KV element of the model dtype).
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "fp8": 1, "int4": 1, "nf4": 1}
_KV_ELEMENT_BYTES = 2.0  # BLIS: KV cache elements are 2 bytes whatever the model dtype

# β index order of BLIS's coefficient vector (docs/blis.md §3.4) and the basis column each multiplies.
BLIS_BETA_ORDER = ("beta1a", "beta2a", "beta3", "beta4", "beta5", "beta6", "beta7", "beta8",
                   "beta1b", "beta2b", "beta_ep")
BLIS_BASIS_OF = {
    "beta1a": "blis_pf_compute", "beta2a": "blis_dc_compute", "beta3": "blis_weight", "beta4": "blis_tp",
    "beta5": "blis_layers", "beta6": "blis_requests", "beta7": "blis_one", "beta8": "blis_moe_layers",
    "beta1b": "blis_pf_kv", "beta2b": "blis_dc_kv", "beta_ep": "blis_moe_dispatch",
}
BLIS_BASIS_COLUMNS = tuple(BLIS_BASIS_OF[b] for b in BLIS_BETA_ORDER)
_INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------------
# Model shape as BLIS reads config.json (docs/blis.md §1, §3.1)


@dataclass(frozen=True)
class BlisShape:
    """The config.json fields BLIS's step time uses, as BLIS parses them (0 = absent where noted)."""

    source: str
    n_layers: int  # L  (num_hidden_layers)
    hidden: int  # d  (hidden_size)
    n_heads: int  # H  (num_attention_heads)
    n_kv_heads: int  # num_key_value_heads | num_kv_heads | multi_query_group_num, else H
    act_bytes: float  # torch_dtype (else dtype) width: activations and all-reduce payload
    intermediate: int  # intermediate_size | ffn_hidden_size
    n_experts: int  # E: first expert-count field >= 2, else 0 (dense)
    experts_per_token: int  # num_experts_per_tok as given (0 if absent)
    moe_ffn_raw: int  # moe_intermediate_size; 0 -> intermediate ("Mixtral convention")
    shared_ffn: int  # shared_expert_intermediate_size, else n_shared_experts × per-expert width
    interleave_step: int  # interleave_moe_layer_step; 0 = uniform layers
    dense_ffn_raw: int  # intermediate_size_mlp; 0 -> intermediate
    quant_weight_bytes: float  # from quantization_config; 0 = unquantized (weights at act_bytes)
    head_dim_config: int = 0  # config head_dim: BLIS uses it only for KV capacity, never in step time

    @property
    def is_moe(self) -> bool:
        return self.n_experts >= 2

    @property
    def interleaved(self) -> bool:
        return self.is_moe and self.interleave_step > 0

    @property
    def head_dim(self) -> int:  # BLIS: d // H (integer division), config head_dim ignored
        return self.hidden // self.n_heads

    @property
    def d_kv(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_moe_layers(self) -> int:
        # BLIS reads interleave_moe_layer_step s as "s dense layers per MoE layer": nMoE = floor(L/(s+1)).
        # HF transformers' Llama-4 means "every s-th layer is MoE" (s = 1: all 48 Scout layers are MoE),
        # but BLIS's coefficients (β3, β8) were fitted with BLIS's reading, so we keep it (docs/blis.md §12.6).
        if self.interleaved:
            return self.n_layers // (self.interleave_step + 1)
        return self.n_layers if self.is_moe else 0

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def moe_ffn(self) -> int:
        return self.moe_ffn_raw or self.intermediate

    @property
    def dense_ffn(self) -> int:
        return self.dense_ffn_raw or self.intermediate

    @property
    def k_eff(self) -> int:
        return max(1, self.experts_per_token)

    @property
    def weight_bytes(self) -> float:
        return self.quant_weight_bytes if self.quant_weight_bytes > 0 else self.act_bytes

    def check_tp(self, tp: int) -> None:
        """BLIS refuses a TP degree that does not divide the query heads or the KV heads."""
        if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
            raise InputError(self.source, "tp", f"tensor-parallel degree must be a positive integer, got {tp!r}")
        if self.n_heads % tp:
            raise InputError(self.source, "num_attention_heads",
                             f"{self.n_heads} heads are not divisible by TP={tp} (BLIS requires it)")
        if self.n_kv_heads % tp:
            raise InputError(self.source, "num_key_value_heads",
                             f"{self.n_kv_heads} KV heads are not divisible by TP={tp} (BLIS requires it)")


def _int(cfg: Mapping, key: str, source: str) -> int:
    """BLIS's integer read: absent/null -> 0, a JSON number -> its integer value. Non-numbers and
    negatives, which BLIS would read as 0 or pass on silently, are refused here."""
    v = cfg.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise InputError(source, key, f"expected an integer, got {v!r}")
    if v < 0:
        raise InputError(source, key, f"must be >= 0, got {v!r}")
    return int(v)


def _first_nonzero(cfg: Mapping, keys: Sequence[str], source: str) -> int:
    return next((v for v in (_int(cfg, k, source) for k in keys) if v), 0)


def _quant_weight_bytes(qc: Mapping) -> float:
    """Weight bytes/param from quantization_config as BLIS reads it; 0 when it finds none."""
    b = qc.get("bits")  # a JSON number (truncated) or a decimal string
    if isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b):
        bits = int(b)
    elif isinstance(b, str) and re.fullmatch(r"[+-]?[0-9]+", b):
        bits = int(b)
    else:
        bits = 0
    if bits > 0:
        return bits / 8
    method = qc.get("quant_method")
    method = method.lower() if isinstance(method, str) else ""
    if method == "fp8":
        return 1.0
    groups = qc.get("config_groups")
    if method == "compressed-tensors" and isinstance(groups, Mapping):
        for key in sorted(groups):  # BLIS: first group, in sorted key order, with weights.num_bits > 0
            weights = groups[key].get("weights") if isinstance(groups[key], Mapping) else None
            nb = weights.get("num_bits") if isinstance(weights, Mapping) else None
            if isinstance(nb, (int, float)) and not isinstance(nb, bool) and nb > 0:
                return nb / 8
    return 0.0  # BLIS: unrecognised quantization -> weights at the activation dtype


def blis_shape(config: dict, source: str) -> BlisShape:
    """Parse a HF config.json dict the way BLIS does (docs/blis.md §1)."""
    if not isinstance(config, dict):
        raise InputError(source, None, "config must be a JSON object")
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), dict):  # BLIS: text_config keys are copied over the top level
        cfg.update(config["text_config"])
    L, d, H = (_int(cfg, k, source) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    for key, v in (("num_hidden_layers", L), ("hidden_size", d), ("num_attention_heads", H)):
        if v == 0:
            raise InputError(source, key, "required and must be positive")
    ff = _first_nonzero(cfg, ("intermediate_size", "ffn_hidden_size"), source)
    if ff == 0:
        raise InputError(source, "intermediate_size", "required (or ffn_hidden_size) and must be positive")
    kv = _first_nonzero(cfg, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"), source) or H
    dtype_key = "torch_dtype" if isinstance(cfg.get("torch_dtype"), str) else "dtype"
    dtype = cfg.get(dtype_key)
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise InputError(source, dtype_key, f"BLIS needs a known dtype ({', '.join(_DTYPE_BYTES)}), got {dtype!r}")
    E = next((v for v in (_int(cfg, k, source) for k in _EXPERT_FIELDS) if v >= 2), 0)
    k = _int(cfg, "num_experts_per_tok", source)
    if E and k == 0:
        raise InputError(source, "num_experts_per_tok", f"must be > 0 for a MoE model with {E} experts")
    moe_ffn = _int(cfg, "moe_intermediate_size", source)
    shared = _int(cfg, "shared_expert_intermediate_size", source)
    if shared == 0 and (n_shared := _int(cfg, "n_shared_experts", source)):
        shared = n_shared * (moe_ffn or ff)
    qc = cfg.get("quantization_config")
    return BlisShape(
        source=source, n_layers=L, hidden=d, n_heads=H, n_kv_heads=kv, act_bytes=float(_DTYPE_BYTES[dtype]),
        intermediate=ff, n_experts=E, experts_per_token=k, moe_ffn_raw=moe_ffn, shared_ffn=shared,
        interleave_step=_int(cfg, "interleave_moe_layer_step", source),
        dense_ffn_raw=_int(cfg, "intermediate_size_mlp", source),
        quant_weight_bytes=_quant_weight_bytes(qc) if isinstance(qc, Mapping) else 0.0,
        head_dim_config=_int(cfg, "head_dim", source),
    )


@lru_cache(maxsize=64)
def _shape_from_file(path: str) -> BlisShape:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(path, None, f"cannot read model config: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
    return blis_shape(doc, path)


def blis_shape_of(arch: ModelArch) -> BlisShape:
    """BLIS's shape of a loaded model, read from the config.json at ``arch.source`` (cached per path)."""
    return _shape_from_file(str(arch.source))


# ---------------------------------------------------------------------------------------------------
# Hardware (docs/blis.md §2)


@dataclass(frozen=True)
class BlisHardware:
    name: str  # BLIS's key (H100, A100-80, ...)
    tflops_peak: float  # dense BF16, TFLOP/s
    tflops_fp8: float  # 0 = no FP8 entry
    bw_peak_tbs: float  # HBM, TB/s
    memory_gib: float  # KV auto-capacity only
    source: str = ""

    @property
    def bytes_per_us(self) -> float:
        return self.bw_peak_tbs * 1e6

    def flops_per_us(self, shape: BlisShape) -> float:
        """BLIS: every FLOP term runs at the FP8 peak when weights are exactly 1 byte and the GPU has one."""
        if shape.weight_bytes == 1.0 and self.tflops_fp8 > 0:
            return self.tflops_fp8 * 1e6
        return self.tflops_peak * 1e6


@lru_cache(maxsize=1)
def _hardware_table() -> tuple[dict, dict]:
    src = str(HARDWARE_FILE)
    doc = read_yaml(HARDWARE_FILE)
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), dict) \
            or not isinstance(doc.get("rooflab_hardware"), dict):
        raise InputError(src, None, "expected mappings 'gpus' and 'rooflab_hardware'")
    gpus = {}
    for key, row in doc["gpus"].items():
        fields = ("TFlopsPeak", "TFlopsFP8", "BwPeakTBs", "MemoryGiB")
        if not isinstance(row, dict) or set(row) != set(fields):
            raise InputError(src, f"gpus.{key}", f"expected exactly the fields {', '.join(fields)}")
        for f in fields:
            v = row[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (v == 0 and f != "TFlopsFP8"):
                raise InputError(src, f"gpus.{key}.{f}", f"expected a positive number, got {v!r}")
        gpus[str(key)] = BlisHardware(str(key), float(row["TFlopsPeak"]), float(row["TFlopsFP8"]),
                                      float(row["BwPeakTBs"]), float(row["MemoryGiB"]), src)
    mapping = {str(k): (None if v is None else str(v)) for k, v in doc["rooflab_hardware"].items()}
    for name, key in mapping.items():
        if key is not None and key not in gpus:
            raise InputError(src, f"rooflab_hardware.{name}", f"names {key!r}, which is not under gpus")
    return gpus, mapping


def load_blis_hardware(rooflab_hardware_name: str) -> BlisHardware:
    """BLIS's hardware row for a rooflab hardware name (configs/hardware/<name>.yaml); BLIS keys work too."""
    gpus, mapping = _hardware_table()
    name = str(rooflab_hardware_name)
    if name in mapping:
        if mapping[name] is None:
            raise InputError(HARDWARE_FILE, "hardware", f"BLIS has no hardware entry for {name} "
                             f"(its table at f90a1e3a has only {', '.join(gpus)})")
        return gpus[mapping[name]]
    if name in gpus:
        return gpus[name]
    known = ", ".join(k for k, v in mapping.items() if v is not None)
    raise InputError(HARDWARE_FILE, "hardware", f"unknown hardware {name!r} for BLIS (known: {known})")


# ---------------------------------------------------------------------------------------------------
# Basis functions (docs/blis.md §3.2-§3.3), vectorized over steps. Operation order follows the spec's
# formulas so the floats, and hence the truncated integer step times, match BLIS's.


def _col(agg: Mapping[str, Any], key: str, n: int, default: float | None = None) -> np.ndarray:
    if key not in agg:
        if default is None:
            raise InputError(None, key, "missing from the step aggregates")
        return np.full(n, default)
    a = np.asarray(agg[key], dtype=np.float64)
    return np.full(n, float(a)) if a.ndim == 0 else a


def _ffn_flops(s: BlisShape, n: np.ndarray, td: float, group: float) -> np.ndarray:
    """MoE (routed + shared) and dense FFN FLOPs per GPU for a token population n."""
    d = float(s.hidden)
    out = np.zeros_like(n)
    if s.n_moe_layers > 0:
        out = out + float(s.n_moe_layers) * (n * float(s.k_eff) / group) * 6 * d * float(s.moe_ffn)
        if s.shared_ffn > 0:
            out = out + float(s.n_moe_layers) * n * 6 * d * float(s.shared_ffn) / td
    if s.n_dense_layers > 0:
        out = out + float(s.n_dense_layers) * n * 1 * 6 * d * float(s.dense_ffn) / td
    return out


def blis_basis(shape: BlisShape, hw: BlisHardware, tp: int, agg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """BLIS's basis values (µs, or counts for the per-layer/-request/-step/-MoE-layer terms) per step.

    ``agg`` maps to equal-length arrays: prefill_reqs, prefill_tokens (P), prefill_context (Σ c_i),
    prefill_prompt_pairs (Σ t_i·(s_i + t_i/2) with s_i the request's full prompt length; NaN or absent ->
    estimated as if every chunk finished its prompt, chunks equal), decode_reqs (D), decode_context (C).
    """
    shape.check_tp(tp)
    n = len(np.atleast_1d(np.asarray(agg["decode_reqs"])))
    P_req = _col(agg, "prefill_reqs", n)
    P = _col(agg, "prefill_tokens", n)
    C_pf = _col(agg, "prefill_context", n)
    D = _col(agg, "decode_reqs", n)
    C = _col(agg, "decode_context", n)
    pairs = _col(agg, "prefill_prompt_pairs", n, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):  # s_i = c_i + t_i, t_i = P/|P|, c_i = C_pf/|P|
        est = np.where(P_req > 0, P * (C_pf / P_req + P / P_req) + P * P / (2 * P_req), 0.0)
    pairs = np.where(np.isnan(pairs), est, pairs)

    s, dp = shape, 1.0  # DP = 1 only
    L, d, dKV, dH, t = float(s.n_layers), float(s.hidden), float(s.d_kv), float(s.head_dim), float(tp)
    h_gpu = float(s.n_heads) / t
    td = t * dp
    group = td if s.is_moe else t  # MoE group TP·DP; TP for dense models (unused there)
    F, W = hw.flops_per_us(s), hw.bytes_per_us

    attn_pf = 4 * h_gpu * pairs * dH  # BLIS: query heads and the FULL prompt length s_i
    pf_compute = (L * 2 * P * d * (2 * d + 2 * dKV) / td + L * attn_pf / dp + _ffn_flops(s, P, td, group)) / F
    pf_kv = L * 2 * (dKV / td) * P * _KV_ELEMENT_BYTES / W
    dc_compute = (L * 2 * D * d * (2 * d + 2 * dKV) / td + L * 4 * h_gpu * C * dH / dp
                  + _ffn_flops(s, D, td, group)) / F
    dc_kv = L * 2 * (dKV / td) * _KV_ELEMENT_BYTES * (C + D) / W

    wb = s.weight_bytes
    w_bytes = L * d * (2 * d + 2 * dKV) * wb / t
    ffn_bytes = 0.0
    if s.n_moe_layers > 0:  # BLIS: all E/G experts are loaded every step, whatever the batch
        ffn_bytes += float(s.n_moe_layers) * (float(s.n_experts) / group) * 3 * d * float(s.moe_ffn) * wb
        if s.shared_ffn > 0:
            ffn_bytes += float(s.n_moe_layers) * 3 * d * float(s.shared_ffn) * wb / t
    if s.n_dense_layers > 0:
        ffn_bytes += float(s.n_dense_layers) * 1 * 3 * d * float(s.dense_ffn) * wb / t
    weight = (w_bytes + ffn_bytes) / W

    tokens = P + D
    zeros = np.zeros(n)

    def allreduce(units: int) -> np.ndarray:  # ring all-reduce volume over HBM bandwidth; β4 absorbs the ratio
        if tp <= 1:
            return zeros
        return float(units) * tokens * d * s.act_bytes * 2.0 * (float(tp - 1) / float(tp)) / W

    moe_reduce = allreduce(s.n_moe_layers) if (s.is_moe and s.n_moe_layers > 0 and dp == 1) else zeros
    tp_comm = allreduce(s.n_layers) / dp + allreduce(s.n_dense_layers) / dp + moe_reduce

    pf_attn = np.where(P > 0, L * attn_pf / dp / F, 0.0)  # the extension blis-tp10+attn prices it apart
    return {
        "blis_pf_compute": np.where(P > 0, pf_compute, 0.0),
        "blis_pf_attn": pf_attn,
        "blis_pf_dense": np.where(P > 0, pf_compute, 0.0) - pf_attn,
        "blis_pf_kv": np.where(P > 0, pf_kv, 0.0),
        "blis_dc_compute": np.where(D > 0, dc_compute, 0.0),
        "blis_dc_kv": np.where(D > 0, dc_kv, 0.0),
        "blis_weight": np.full(n, weight),
        "blis_tp": tp_comm,
        "blis_moe_dispatch": zeros.copy(),  # β_EP basis: BLIS charges it only at DP > 1
        "blis_layers": np.full(n, L),
        "blis_requests": P_req + D,
        "blis_one": np.ones(n),
        "blis_moe_layers": np.full(n, float(s.n_moe_layers) if s.interleaved else 0.0),
    }


# ---------------------------------------------------------------------------------------------------
# Assembly (docs/blis.md §3.4) and alphas (§5)


def _check_coeffs(name: str, values: Sequence[float], least: int) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) < least:
        raise InputError(None, name, f"BLIS needs at least {least} coefficients, got {len(vals)}")
    bad = [v for v in vals if not math.isfinite(v) or v < 0]
    if bad:
        raise InputError(None, name, f"coefficients must be finite and >= 0, got {bad[0]!r}")
    return vals


def blis_step_time_us(betas: Sequence[float], basis: Mapping[str, Any]) -> np.ndarray:
    """BLIS's integer step time (µs, int64) per step for 7-11 betas in :data:`BLIS_BETA_ORDER` order.

    7: no β8, prefill/decode as β·max(compute, kv); 8: + β8; 9: prefill split (β1a·compute + β1b·kv);
    10: decode split too; 11: explicit β_EP (otherwise β_EP = β4). Extra betas are ignored, as in BLIS.
    """
    given = _check_coeffs("beta", betas, 7)
    b = (given[:11] + [0.0] * 11)[:11]
    if len(given) < 11:
        b[10] = b[3]
    col = {k: np.asarray(basis[k], dtype=np.float64) for k in BLIS_BASIS_COLUMNS}
    if len(given) >= 9:
        prefill = b[0] * col["blis_pf_compute"] + b[8] * col["blis_pf_kv"]
    else:
        prefill = b[0] * np.maximum(col["blis_pf_compute"], col["blis_pf_kv"])
    if len(given) >= 10:
        decode = b[1] * col["blis_dc_compute"] + b[9] * col["blis_dc_kv"]
    else:
        decode = b[1] * np.maximum(col["blis_dc_compute"], col["blis_dc_kv"])
    total = (prefill + decode + b[2] * col["blis_weight"] + b[3] * col["blis_tp"]
             + b[10] * col["blis_moe_dispatch"] + b[4] * col["blis_layers"] + b[5] * col["blis_requests"]
             + b[6] * col["blis_one"] + b[7] * col["blis_moe_layers"])
    total = np.atleast_1d(total)
    over = np.isnan(total) | (total >= float(_INT64_MAX))  # BLIS clamps NaN/overflow to MaxInt64
    steps = np.where(over, _INT64_MAX, np.trunc(np.where(over, 0.0, total)).astype(np.int64))
    steps = np.maximum(steps, 1)
    return np.where(np.atleast_1d(col["blis_requests"]) == 0, 1, steps).astype(np.int64)  # empty batch: 1 µs


def blis_alpha_us(alpha: Sequence[float]) -> tuple[int, int, int]:
    """(α0 queueing, α1 post-decode, α2 per output token) as BLIS uses them: truncated to whole µs."""
    a = _check_coeffs("alpha", alpha, 3)
    a0, a1, a2 = (_INT64_MAX if v >= float(_INT64_MAX) else int(v) for v in a[:3])
    return a0, a1, a2


# ---------------------------------------------------------------------------------------------------
# Variants: BLIS's 10- and 11-coefficient forms as rooflab model variants over the basis columns


def _term(name: str, meaning: str, unit: str, prior: float | None) -> Term:
    return Term(name, BLIS_BASIS_OF[name], meaning, unit, prior=prior)


_BLIS_TERMS = (
    _term("beta1a", "BLIS prefill compute (projections, full-prompt attention, FFN) at peak FLOPs", "×", 1.0),
    _term("beta2a", "BLIS decode compute (projections, attention over context, FFN) at peak FLOPs", "×", 1.0),
    _term("beta3", "BLIS weight loading (attention + FFN, all MoE experts) at HBM bandwidth", "×", 1.0),
    _term("beta4", "BLIS TP all-reduce volume at HBM bandwidth (attention, dense FFN, MoE reduce)", "×", 1.0),
    _term("beta5", "BLIS per-layer overhead", "µs/layer", None),
    _term("beta6", "BLIS per-request overhead (prefill chunks and decodes)", "µs/request", None),
    _term("beta7", "BLIS per-step overhead", "µs/step", None),
    _term("beta8", "BLIS per-MoE-layer overhead of interleaved MoE models (0 otherwise)", "µs/MoE layer", None),
    _term("beta1b", "BLIS prefill KV-cache write at HBM bandwidth", "×", 1.0),
    _term("beta2b", "BLIS decode KV-cache read + write at HBM bandwidth", "×", 1.0),
)
_BETA_EP = _term("beta_ep", "BLIS MoE dispatch/combine volume at HBM bandwidth (DP > 1 only; 0 here)", "×", 1.0)

# rooflab's extension of BLIS's basis (issue 15): β1a's compute split at its attention-score share, attention with
# its own β. Not BLIS-loadable (BLIS has one prefill compute slot): `export --format blis` refuses it.
BLIS_EXTENSION_COLUMNS = ("blis_pf_dense", "blis_pf_attn")
_BLIS_ATTN_TERMS = (
    Term("beta1a", "blis_pf_dense", "BLIS prefill compute less its attention (projections, FFN) at peak FLOPs",
         "×", prior=1.0),
    Term("beta1a_attn", "blis_pf_attn", "BLIS prefill attention over the full prompt at peak FLOPs", "×", prior=1.0),
    *_BLIS_TERMS[1:],
)

BLIS_VARIANTS = {
    "blis-tp10": Variant("blis-tp10", _BLIS_TERMS, formulas=("blis",)),
    "blis-tp11": Variant("blis-tp11", _BLIS_TERMS + (_BETA_EP,), formulas=("blis",)),
    "blis-tp10+attn": Variant("blis-tp10+attn", _BLIS_ATTN_TERMS, formulas=("blis",)),
}
assert tuple(t.name for t in BLIS_VARIANTS["blis-tp11"].terms) == BLIS_BETA_ORDER
