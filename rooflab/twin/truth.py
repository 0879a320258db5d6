"""The twin's hidden ground-truth step timing (docs/spec.md §5).

Why this module is long: it is one hidden model — the per-GEMM rooflines, attention, all-reduce algorithms,
MoE routing, CUDA-graph padding, noise and stragglers share one set of per-GPU constants and one cache of
per-(model, TP, GPU) terms; split across files, every piece would reach back into the same private state.

A physics model of one vLLM-v1 scheduler step on one TP rank that is deliberately *richer* than the
7-feature corrected roofline rooflab calibrates, so that calibrating against the twin is a real problem:

* **GEMMs, one roofline each**: every linear layer (QKV / O, gate-up / down, shared experts, router, MLA
  projections, LM head) costs ``smoothmax(FLOPs / (peak·eff(M)), bytes / (HBM·bw_eff)) + kernel`` —
  weight streaming *overlapped* with compute per GEMM (not the additive weights + compute of the
  7-feature model). ``eff(M) = eff_max·M_t/(M_t + m_half)`` rises with the token count, ``M_t`` is M
  rounded up to the GEMM tile (``tile_m``); bytes include the activations in and out; ``smoothmax`` is
  the p-norm ``(c^p + m^p)^(1/p)`` (imperfect overlap near the ridge point).
* **CUDA graphs**: a step of T ≤ ``cudagraph_max_tokens`` tokens runs padded to vLLM's capture sizes
  (1, 2, 4, then multiples of 8): GEMMs, all-reduces and elementwise kernels see the padded M. Decode-only
  steps replay a full graph; mixed / prefill steps run piecewise graphs and pay an eager launch cost
  per layer (``eager_per_layer_us``).
* **Attention per request**: decode reads its KV cache in whole blocks, ``max(FLOPs/(peak·eff),
  bytes/(HBM·kv_bw_eff))`` plus a per-request cost; prefill chunks do causal pairs ``n·c + n(n+1)/2``
  at a FlashAttention efficiency that rises with the chunk length (query tiles of ``query_tile``).
  MLA: latent KV ``(r_kv+R)`` bytes per token replicated on every rank, MQA over the latent for decode
  (absorbed W_UK / W_UV as bf16 GEMMs), compute-friendly prefill with the kv_b up-projection of the
  new tokens and the cached context.
* **TP all-reduce**: 2 per layer of ``M·d·2`` bytes over NVLink (per direction): one-shot (each GPU reads
  (TP−1)·M; always at TP 2) up to ``one_shot_max_bytes`` (halved above TP 4), two-shot
  (2·(TP−1)/TP·M) up to ``custom_max_bytes``, NCCL ring above; each with its own latency, plus a
  latency per peer (``latency_per_peer_us·(TP−1)``).
* **MoE**: routing is *sampled*: ``M·k`` picks multinomial over a Zipf-skewed popularity
  ``p_e ∝ rank^−s`` (``layer_samples`` independent layer draws per step, averaged); every touched
  expert streams its weights, its GEMM is a roofline on its own token count (block ``block_m``).
  So N_eff differs from both the PR's min(N, B·k) and the uniform expectation N(1−(1−k/N)^T).
  ``expected_step_time_us`` uses the exact per-expert touch probability instead of a draw.
* **Small kernels per layer** (fused add-RMSNorm ×2, rotary, SiLU-and-mul, MoE permute): smoothmax of a
  fixed per-layer cost at graph replay and their activation traffic per token.
* **CPU**: ``schedule()`` (``sched_base_us + sched_per_request_us·B``, reported as step.duration_us and
  part of the step), plus input preparation / sampling / output processing per step, per request and
  per prefill token.
* **Noise**: the whole step is multiplied by a lognormal (median 1, ``sigma``); with probability
  ``straggler_prob`` a straggler multiplies it by a factor drawn uniformly in
  [``straggler_factor_min``, ``straggler_factor_max``].

Not modelled on purpose: expert parallelism, speculative decoding, fp8 KV cache kernels, async
scheduling (CPU and GPU are sequential), wave quantization across SMs, thermal drift, prefix-cache
hashing cost. An empty step (no decodes, no prefills) is never run by vLLM; it is given the per-step
CPU cost only (the scheduler still runs).

All constants come from ``configs/twin/<hardware>.yaml``; datasheet peaks, HBM and NVLink bandwidths from
``configs/hardware/<hardware>.yaml``. Only modules of ``rooflab.twin`` may read ``configs/twin``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from rooflab.errors import InputError
from rooflab.model.arch import ModelArch
from rooflab.model.hardware import Hardware, load_hardware
from rooflab.paths import CONFIGS_DIR

if TYPE_CHECKING:
    from rooflab.twin.engine import Request

# ---------------------------------------------------------------------------------------------------
# Configuration schema: section -> field -> kind.
#   pos: > 0   nonneg: >= 0   frac: in (0, 1]   prob: in [0, 1)   int: integer >= 1   ge1: >= 1

SCHEMA: dict[str, dict[str, str]] = {
    "gemm": {"eff_max": "frac", "m_half": "pos", "tile_m": "int", "bw_eff": "frac", "kernel_us": "nonneg",
             "overlap_p": "ge1"},
    "attention": {"prefill_eff_max": "frac", "prefill_n_half": "pos", "query_tile": "int",
                  "decode_compute_eff": "frac", "kv_bw_eff": "frac", "kv_block": "int",
                  "per_request_us": "nonneg", "kernel_us": "nonneg"},
    "allreduce": {"one_shot_latency_us": "nonneg", "two_shot_latency_us": "nonneg", "ring_latency_us": "nonneg",
                  "latency_per_peer_us": "nonneg", "bw_eff": "frac", "one_shot_max_bytes": "pos",
                  "custom_max_bytes": "pos"},
    "moe": {"zipf_s": "nonneg", "layer_samples": "int", "block_m": "int", "kernel_us": "nonneg"},
    "overhead": {"per_layer_us": "nonneg", "eager_per_layer_us": "nonneg", "elementwise_bw_eff": "frac",
                 "cudagraph_max_tokens": "int", "sampler_bytes_per_logit": "nonneg"},
    "cpu": {"sched_base_us": "pos", "sched_per_request_us": "nonneg", "sched_sigma": "nonneg",
            "step_us": "nonneg", "per_request_us": "nonneg", "per_prefill_token_us": "nonneg"},
    "noise": {"sigma": "nonneg", "straggler_prob": "prob", "straggler_factor_min": "ge1",
              "straggler_factor_max": "ge1"},
    "alpha": {"api_us": "pos", "api_sigma": "nonneg", "post_fixed_us": "pos", "post_per_token_us": "nonneg",
              "post_sigma": "nonneg"},
}


_POOL = 4096  # pooled normal / uniform draws taken from the generator at a time


def twin_configs_dir() -> Path:
    return CONFIGS_DIR / "twin"


def list_twin_hardware() -> list[str]:
    return sorted(p.stem for p in twin_configs_dir().glob("*.yaml"))


def _check_value(source: str, where: str, kind: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(source, where, f"expected a number, got {v!r}")
    bad = {
        "pos": v <= 0, "nonneg": v < 0, "frac": not 0 < v <= 1, "prob": not 0 <= v < 1,
        "int": not (float(v).is_integer() and v >= 1), "ge1": v < 1,
    }[kind]
    if bad:
        need = {"pos": "a positive number", "nonneg": "a non-negative number", "frac": "a fraction in (0, 1]",
                "prob": "a probability in [0, 1)", "int": "a positive integer", "ge1": "a number >= 1"}[kind]
        raise InputError(source, where, f"expected {need}, got {v!r}")
    return float(v)


def parse_twin_config(doc: Any, *, source: str) -> dict[str, dict[str, float]]:
    """Validate a parsed twin config: every section and field of :data:`SCHEMA`, nothing else."""
    if not isinstance(doc, dict):
        raise InputError(source, None, "expected a YAML mapping of sections")
    out: dict[str, dict[str, float]] = {}
    for section in doc:
        if section not in SCHEMA and section != "name":
            raise InputError(source, str(section), f"unknown section (known: name, {', '.join(SCHEMA)})")
    for section, fields in SCHEMA.items():
        body = doc.get(section)
        if body is None:
            raise InputError(source, section, "required section is missing")
        if not isinstance(body, dict):
            raise InputError(source, section, "expected a mapping of field: value")
        for f in body:
            if f not in fields:
                raise InputError(source, f"{section}.{f}", f"unknown field (known: {', '.join(fields)})")
        out[section] = {}
        for f, kind in fields.items():
            if f not in body:
                raise InputError(source, f"{section}.{f}", "required field is missing")
            out[section][f] = _check_value(source, f"{section}.{f}", kind, body[f])
    n = out["noise"]
    if n["straggler_factor_max"] < n["straggler_factor_min"]:
        raise InputError(source, "noise.straggler_factor_max", "must be >= noise.straggler_factor_min")
    return out


def load_twin_config(hardware: str, path: Path | None = None) -> dict[str, dict[str, float]]:
    p = Path(path) if path is not None else twin_configs_dir() / f"{hardware}.yaml"
    if not p.is_file():
        raise InputError(p, None, f"no twin config for hardware {hardware!r} "
                                  f"(known: {', '.join(list_twin_hardware()) or 'none'})")
    from rooflab.files import read_yaml

    return parse_twin_config(read_yaml(p), source=str(p))


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmGroup:
    """Linear layers that all see the same token count M in a step (vectorized over shapes)."""

    K: np.ndarray
    N: np.ndarray
    count: np.ndarray  # layers (times) each shape runs per step
    bpp: np.ndarray  # weight bytes / param
    flop_us: np.ndarray  # achievable-peak FLOP per µs = peak·1e6·eff_max

    @staticmethod
    def build(rows: Sequence[tuple[float, float, float, float, float]]) -> GemmGroup:
        rows = [r for r in rows if r[2] > 0 and r[0] > 0 and r[1] > 0]
        a = np.array(rows, dtype=np.float64).reshape(-1, 5)
        return GemmGroup(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4])

    def __len__(self) -> int:
        return len(self.K)


def cudagraph_size(tokens: int, max_tokens: int) -> int:
    """vLLM's CUDA-graph capture size a batch of ``tokens`` is padded to (1, 2, 4, then multiples of 8)."""
    if tokens > max_tokens or tokens <= 0:
        return tokens
    if tokens <= 2:
        return tokens
    if tokens <= 4:
        return 4
    return -(-tokens // 8) * 8


class TruthModel:
    """Ground-truth step time of one (model, TP, hardware) on the twin. See the module docstring."""

    def __init__(self, arch: ModelArch, hardware: Hardware, tp: int, config: dict, seed: int = 0,
                 source: str = "<twin config>"):
        if not isinstance(tp, (int, np.integer)) or tp < 1:
            raise InputError(source, "tp", f"tensor-parallel degree must be a positive integer, got {tp!r}")
        self.arch, self.hw, self.tp, self.cfg, self.source = arch, hardware, int(tp), config, source
        self.rng = np.random.default_rng(seed)  # property: resets the pools of pooled draws
        g, at, ar, moe, ov, cpu, nz = (config[k] for k in
                                       ("gemm", "attention", "allreduce", "moe", "overhead", "cpu", "noise"))
        a, tp = arch, self.tp
        d, L, H = a.hidden, a.n_layers, a.n_heads
        act = a.act_bytes
        self._act = act
        self._bw = hardware.hbm_tb_s * 1e6  # bytes / µs
        self._nvl = hardware.nvlink_gb_s_per_direction * 1e3 * ar["bw_eff"]  # achievable bytes / µs
        peak16 = hardware.peak_tflops_bf16 * 1e6  # FLOP / µs
        peak_w = hardware.gemm_tflops(a.fp8_weights) * 1e6
        bpp = a.weight_bytes
        b16 = max(2.0, bpp)
        self._tile = g["tile_m"]
        self._m_half = g["m_half"]
        self._p = g["overlap_p"]
        self._gemm_bw = self._bw * g["bw_eff"]
        self._gemm_kernel = g["kernel_us"]
        eff = g["eff_max"]
        qh = H / tp
        kvh = max(1.0, a.n_kv_heads / tp)

        # --- GEMMs every token goes through (per GPU) -------------------------------------------
        rows = []  # (K, N, count, bpp, flop_us)
        mla = a.mla
        if mla is None:
            rows += [(d, (qh + 2 * kvh) * a.head_dim, L, bpp, peak_w * eff),
                     (qh * a.head_dim, d, L, bpp, peak_w * eff)]
        else:
            P, R, rkv, dv = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank, mla.v_head_dim
            if mla.q_lora_rank:
                rows += [(d, mla.q_lora_rank + rkv + R, L, bpp, peak_w * eff),  # fused_qkv_a, replicated
                         (mla.q_lora_rank, qh * (P + R), L, bpp, peak_w * eff)]  # q_b
            else:
                rows += [(d, qh * (P + R), L, bpp, peak_w * eff), (d, rkv + R, L, bpp, peak_w * eff)]
            rows += [(qh * dv, d, L, bpp, peak_w * eff)]  # o_proj
        Ld, Lm = a.n_dense_layers, a.n_moe_layers
        rows += [(d, 2 * a.ffn_dim / tp, Ld, bpp, peak_w * eff), (a.ffn_dim / tp, d, Ld, bpp, peak_w * eff)]
        if a.is_moe:
            if a.shared_ffn_dim:
                rows += [(d, 2 * a.shared_ffn_dim / tp, Lm, bpp, peak_w * eff),
                         (a.shared_ffn_dim / tp, d, Lm, bpp, peak_w * eff)]
            rows += [(d, a.n_experts, Lm, b16, peak16 * eff)]  # router, replicated, bf16
        self._g_all = GemmGroup.build(rows)
        # decode tokens only (MLA absorbed path: q_nope·W_UK and ·W_UV, bf16 batched over heads)
        self._g_dec = GemmGroup.build(
            [(mla.qk_nope_head_dim, qh * mla.kv_lora_rank, L, b16, peak16 * eff),
             (mla.kv_lora_rank, qh * mla.v_head_dim, L, b16, peak16 * eff)] if mla else [])
        # prefill (new + cached context tokens): MLA kv_b up-projection
        self._g_kvb = GemmGroup.build(
            [(mla.kv_lora_rank, qh * (mla.qk_nope_head_dim + mla.v_head_dim), L, bpp, peak_w * eff)] if mla else [])
        self._g_lm = GemmGroup.build([(d, a.vocab / tp, 1, b16, peak16 * eff)])

        # --- all-reduce ---------------------------------------------------------------------------
        self._ar = ar
        self._ar_per_step = 2 * L if tp > 1 else 0
        self._one_shot_max = ar["one_shot_max_bytes"] if tp <= 4 else ar["one_shot_max_bytes"] / 2

        # --- elementwise traffic per token per step (bytes) ----------------------------------------
        f_dense = a.ffn_dim / tp
        f_moe = (a.experts_per_token * a.expert_ffn_dim + a.shared_ffn_dim) / tp if a.is_moe else 0.0
        q_dims = (qh * (mla.qk_nope_head_dim + mla.qk_rope_head_dim) + mla.qk_rope_head_dim) if mla else \
            (qh + kvh) * a.head_dim
        ew = L * (8 * d + 2 * q_dims) * act  # 2 fused add-RMSNorm (read x, res; write x, res) + rotary
        ew += Ld * 3 * f_dense * act + Lm * (3 * f_moe + 4 * a.experts_per_token * d) * act  # act-mul, permute
        self._ew_us_per_token = ew / (self._bw * ov["elementwise_bw_eff"])
        self._graph_max = int(ov["cudagraph_max_tokens"])
        self._per_layer_us = L * ov["per_layer_us"]
        self._eager_us = L * ov["eager_per_layer_us"]
        self._sampler_us_per_row = a.vocab / tp * ov["sampler_bytes_per_logit"] / self._bw
        logit_gather = tp > 1

        # --- attention ------------------------------------------------------------------------------
        self._block = at["kv_block"]
        if mla is None:
            kv_tok = 2 * kvh * a.head_dim * a.kv_bytes
            dec_flop_per_ctx = 4 * qh * a.head_dim
            pf_flop_per_pair = 4 * qh * a.head_dim
            q_bytes = 2 * qh * a.head_dim * act  # read Q, write O
        else:
            P, R, rkv, dv = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank, mla.v_head_dim
            kv_tok = (rkv + R) * a.kv_bytes  # latent, replicated on every rank
            dec_flop_per_ctx = 2 * qh * (2 * rkv + R)
            pf_flop_per_pair = 2 * qh * (P + R + dv)
            q_bytes = qh * (P + R + dv) * act
        self.kv_bytes_per_token_layer = kv_tok
        kv_bw = self._bw * at["kv_bw_eff"]
        # decode: per request max(FLOPs, bytes) summed over layers; bytes in whole blocks of kv_block tokens
        self._dec_mem_us_per_block_tok = L * kv_tok / kv_bw
        self._dec_cmp_us_per_tok = L * dec_flop_per_ctx / (peak16 * at["decode_compute_eff"])
        self._dec_mem_dominates = self._dec_cmp_us_per_tok <= self._dec_mem_us_per_block_tok
        self._dec_mem_us_per_block = self._dec_mem_us_per_block_tok * self._block
        self._inv_block = 1.0 / self._block
        self._attn_req_us = L * at["per_request_us"]
        self._attn_kernel_us = L * at["kernel_us"]
        self._pf_flop_per_pair = L * pf_flop_per_pair
        self._pf_peak = peak16 * at["prefill_eff_max"]
        self._pf_n_half = at["prefill_n_half"]
        self._qtile = at["query_tile"]
        self._kv_tok_L = L * kv_tok
        self._q_bytes_L = L * q_bytes
        self._kv_bw = kv_bw

        # --- MoE ----------------------------------------------------------------------------------
        self._moe = a.is_moe
        if self._moe:
            N, k = a.n_experts, a.experts_per_token
            ranks = np.arange(1, N + 1, dtype=np.float64)
            pop = ranks ** -moe["zipf_s"]
            self.expert_popularity = pop / pop.sum()  # sorted, most popular first
            self._moe_samples = int(moe["layer_samples"])
            self._moe_block = moe["block_m"]
            self._moe_KN = d * 3 * a.expert_ffn_dim / tp  # gate-up + down of one expert, per GPU
            self._moe_w_us = self._moe_KN * bpp / self._gemm_bw  # stream one expert's weights
            self._moe_act_us_per_tok = (2 * d + 3 * a.expert_ffn_dim / tp) * act / self._gemm_bw
            self._moe_cmp_coef = 2 * self._moe_KN / (peak_w * eff)  # × (m_t + m_half)
            self._moe_kernel_us = Lm * (2 * moe["kernel_us"])  # fused-MoE gate-up and down kernels
            self._Lm = Lm
            self._k = k
            self._p_min = float(self.expert_popularity[-1])
            # beyond this many picks per layer P(some expert untouched) < 1e-3: use the expectation
            self._all_touched_picks = math.log(N) + math.log(1e3)
            cdf = np.cumsum(self.expert_popularity)
            cdf[-1] = 1.0
            slots = np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536, side="right")
            self._moe_slots = np.minimum(slots, N - 1).astype(np.intp)  # 16-bit word -> expert
            self._moe_table = np.zeros(1)
            self._route_off: dict = {}

        # --- CPU ------------------------------------------------------------------------------------
        self._sched_base = cpu["sched_base_us"]
        self._sched_req = cpu["sched_per_request_us"]
        self._sched_sigma = cpu["sched_sigma"]
        self._cpu_step = cpu["sched_base_us"] + cpu["step_us"]
        self._cpu_req = cpu["sched_per_request_us"] + cpu["per_request_us"]
        self._cpu_pf_tok = cpu["per_prefill_token_us"]

        # --- noise ----------------------------------------------------------------------------------
        self._sigma = nz["sigma"]
        self._strag_p = nz["straggler_prob"]
        self._strag_lo, self._strag_hi = nz["straggler_factor_min"], nz["straggler_factor_max"]
        al = config["alpha"]
        self._alpha = al

        self._logit_gather = logit_gather
        self._mla = mla is not None
        self._pad = [cudagraph_size(t, self._graph_max) for t in range(self._graph_max + 1)]
        self._tok_cache: dict[int, float] = {}
        self._dec_cache: dict[int, float] = {}
        self._lm_cache: dict[int, float] = {}
        self._moe_cache: dict[int, float] = {}

    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, hardware: str, arch: ModelArch, tp: int, seed: int = 0,
                    path: Path | None = None) -> TruthModel:
        cfg_path = Path(path) if path is not None else twin_configs_dir() / f"{hardware}.yaml"
        cfg = load_twin_config(hardware, cfg_path)
        return cls(arch, load_hardware(hardware), tp, cfg, seed=seed, source=str(cfg_path))

    # --- building blocks (public for tests and the calibration report) ------------------------------
    def gemm_group_us(self, g: GemmGroup, M: float) -> float:
        """Σ over the group's GEMMs of smoothmax(compute, memory) + kernel cost, at token count M."""
        if M <= 0 or len(g) == 0:
            return 0.0
        Mt = math.ceil(M / self._tile) * self._tile
        c = 2.0 * g.K * g.N * (Mt + self._m_half) / g.flop_us  # 2·M_t·K·N / (peak·eff(M_t))
        m = (g.K * g.N * g.bpp + M * (g.K + g.N) * self._act) / self._gemm_bw
        p = self._p
        t = (c ** p + m ** p) ** (1.0 / p) + self._gemm_kernel
        return float(g.count @ t)

    def allreduce_algorithm(self, nbytes: float) -> str:
        if self.tp == 1 or nbytes <= 0:
            return "none"
        if nbytes > self._ar["custom_max_bytes"]:
            return "ring"
        if self.tp == 2 or nbytes <= self._one_shot_max:
            return "one-shot"
        return "two-shot"

    def allreduce_us(self, nbytes: float) -> float:
        """One all-reduce of ``nbytes`` per GPU over NVLink (0 at TP 1)."""
        algo = self.allreduce_algorithm(nbytes)
        tp, ar = self.tp, self._ar
        if algo == "none":
            return 0.0
        peers = ar["latency_per_peer_us"] * (tp - 1)  # flag signalling / barrier with every peer
        if algo == "one-shot":
            return ar["one_shot_latency_us"] + peers + (tp - 1) * nbytes / self._nvl
        lat = ar["two_shot_latency_us"] if algo == "two-shot" else ar["ring_latency_us"]
        return lat + peers + 2 * (tp - 1) / tp * nbytes / self._nvl

    def padded_tokens(self, tokens: int) -> int:
        return cudagraph_size(int(tokens), self._graph_max)

    def token_us(self, M: int) -> float:
        """GPU time that depends only on the (padded) token count M of the step: the dense / attention-
        projection / shared-expert / router GEMMs, 2 all-reduces per layer and the small per-layer kernels
        (smoothmax of their fixed cost and their activation traffic)."""
        t = self._tok_cache.get(M)
        if t is None:
            ew = M * self._ew_us_per_token  # elementwise kernels: latency-bound until their traffic dominates
            p = self._p
            small = (self._per_layer_us ** p + ew ** p) ** (1.0 / p) if self._per_layer_us else ew
            t = (self.gemm_group_us(self._g_all, M)
                 + self._ar_per_step * self.allreduce_us(M * self.arch.hidden * self._act) + small)
            self._tok_cache[M] = t
        return t

    def gemm_time_us(self, tokens: int) -> float:
        """The step's non-expert GEMM time for ``tokens`` tokens after CUDA-graph padding (no attention,
        communication or MoE) — what decode-batch padding changes."""
        return self.gemm_group_us(self._g_all, self.padded_tokens(tokens))

    def lm_head_us(self, n_logits: int) -> float:
        t = self._lm_cache.get(n_logits)
        if t is None:
            t = 0.0
            if n_logits > 0:
                t = self.gemm_group_us(self._g_lm, n_logits) + n_logits * self._sampler_us_per_row
                if self._logit_gather:  # vocab-parallel logits gathered to rank 0 (fp32)
                    t += self.allreduce_us(n_logits * self.arch.vocab / self.tp * 4.0)
            self._lm_cache[n_logits] = t
        return t

    def _moe_expert_us(self, m: np.ndarray) -> np.ndarray:
        """Time of one MoE layer's expert GEMMs per expert with ``m`` tokens (0 where m == 0)."""
        bm = self._moe_block
        mt = np.ceil(m / bm) * bm
        c = self._moe_cmp_coef * (mt + self._m_half)
        w = self._moe_w_us + m * self._moe_act_us_per_tok
        p = self._p
        t = (c ** p + w ** p) ** (1.0 / p)
        return np.where(m > 0, t, 0.0)

    def moe_expected_us(self, M: int) -> float:
        """Expected routed-expert time of a step of M tokens (exact touch probability per expert)."""
        if not self._moe or M <= 0:
            return 0.0
        t = self._moe_cache.get(M)
        if t is None:
            picks = M * self._k
            p = self.expert_popularity
            touched = -np.expm1(picks * np.log1p(-p))
            m_given = picks * p / touched
            t = float(self._Lm * (touched * self._moe_expert_us(m_given)).sum() + self._moe_kernel_us)
            self._moe_cache[M] = t
        return t

    def _route(self, picks: int, layers: int) -> np.ndarray:
        """Tokens per expert of ``layers`` independent MoE layers, ``picks`` = tokens·k routing picks each:
        categorical draws from the skewed popularity through a 2^16-slot inverse-CDF table indexed by raw
        16-bit words of self.rng's bit generator. Returns (layers, N) counts."""
        N = self.arch.n_experts
        n = picks * layers
        off = self._route_off.get((picks, layers))
        if off is None:
            if len(self._route_off) > 4096:
                self._route_off.clear()
            off = self._route_off[(picks, layers)] = np.repeat(np.arange(layers, dtype=np.intp) * N, picks)
        words = self._rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
        idx = self._moe_slots.take(words)
        idx += off
        return np.bincount(idx, minlength=layers * N).reshape(layers, N)

    def moe_sampled_us(self, M: int) -> float:
        """Routed-expert time of one step of M tokens with sampled routing (``layer_samples`` draws)."""
        if not self._moe or M <= 0:
            return 0.0
        picks = M * self._k
        if picks * self._p_min > self._all_touched_picks:  # every expert certainly busy: no draw needed
            return self.moe_expected_us(M)
        S = self._moe_samples
        if picks >= len(self._moe_table):
            self._moe_table = self._moe_expert_us(np.arange(2 * picks + 1, dtype=np.float64))
        counts = self._route(picks, S)
        return float(self._Lm * self._moe_table.take(counts).sum() / S + self._moe_kernel_us)

    def sample_distinct_experts(self, tokens: int, n: int = 1) -> np.ndarray:
        """Distinct experts touched in one MoE layer by ``tokens`` tokens, for ``n`` routing draws."""
        return (self._route(tokens * self._k, n) > 0).sum(axis=1)

    # --- pooled random numbers (numpy calls cost ~1 µs each; draws are taken from self.rng in blocks) --
    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @rng.setter
    def rng(self, value: np.random.Generator) -> None:
        self._rng = value
        self._normals: list[float] = []
        self._uniforms: list[float] = []
        self._ni = self._ui = 0

    def _normal(self) -> float:
        i = self._ni
        if i >= len(self._normals):
            self._normals = self._rng.standard_normal(_POOL).tolist()
            i = 0
        self._ni = i + 1
        return self._normals[i]

    def _uniform(self) -> float:
        i = self._ui
        if i >= len(self._uniforms):
            self._uniforms = self._rng.random(_POOL).tolist()
            i = 0
        self._ui = i + 1
        return self._uniforms[i]

    def decode_attention_us(self, ctx: np.ndarray) -> float:
        """Σ over decode requests of max(FLOPs, KV bytes read in whole blocks) + per-request cost."""
        D = len(ctx)
        if D == 0:
            return 0.0
        if self._dec_mem_dominates:
            # blocks per request = ceil((c+1)/bt) = floor(c/bt) + 1 for integer contexts; the memory roofline
            # of every request dominates its compute (the block read covers c+1 tokens)
            x = ctx * self._inv_block
            np.floor(x, out=x)
            blocks = float(np.add.reduce(x)) + D
            return self._dec_mem_us_per_block * blocks + self._attn_req_us * D
        bt = self._block
        kv = (np.floor(ctx / bt) + 1) * bt
        return float(np.maximum(self._dec_cmp_us_per_tok * (ctx + 1.0),
                                self._dec_mem_us_per_block_tok * kv).sum()) + self._attn_req_us * D

    def prefill_attention_us(self, prefills: Sequence[tuple[int, int, int]]) -> float:
        t = 0.0
        qt, nh = self._qtile, self._pf_n_half
        for n, c, _ in prefills:
            if n <= 0:
                continue
            pairs = n * c + n * (n + 1) / 2.0
            nq = math.ceil(n / qt) * qt
            cmp = self._pf_flop_per_pair * pairs * (nq + nh) / (nq * self._pf_peak)
            mem = (self._kv_tok_L * (c + 2 * n) + self._q_bytes_L * n) / self._kv_bw
            t += (cmp if cmp > mem else mem) + self._attn_req_us
        return t

    # --- the interface the engine calls ----------------------------------------------------------
    def _step_us(self, decode_contexts: np.ndarray, prefills: Sequence[tuple[int, int, int]], n_logits: int,
                 sampled: bool) -> float:
        D = len(decode_contexts)
        if prefills:
            T_pf = 0
            for n, _, _ in prefills:
                T_pf += n
            B = D + len(prefills)
        else:
            T_pf = 0
            B = D
        T = D + T_pf
        cpu = self._cpu_step + self._cpu_req * B + self._cpu_pf_tok * T_pf
        if T <= 0:
            return cpu
        M = T if T > self._graph_max else self._pad[T]
        tok = self._tok_cache.get(M)
        gpu = (self.token_us(M) if tok is None else tok) + self._attn_kernel_us
        if prefills or T > self._graph_max:
            gpu += self._eager_us  # piecewise CUDA graphs: attention and glue launched eagerly
        if D:
            gpu += self.decode_attention_us(decode_contexts)
            if self._mla:
                Md = M if not prefills else D
                t = self._dec_cache.get(Md)
                if t is None:
                    t = self._dec_cache[Md] = self.gemm_group_us(self._g_dec, Md)
                gpu += t
        if prefills:
            gpu += self.prefill_attention_us(prefills)
            if self._mla:
                gpu += self.gemm_group_us(self._g_kvb, sum(n + c for n, c, _ in prefills))
        if self._moe:
            gpu += self.moe_sampled_us(M) if sampled else self.moe_expected_us(M)
        lm = self._lm_cache.get(n_logits)
        gpu += self.lm_head_us(int(n_logits)) if lm is None else lm
        return cpu + gpu

    def expected_step_time_us(self, decode_contexts: ArrayLike, prefills: Sequence[tuple[int, int, int]],
                              n_logits: int) -> float:
        """Step time (µs) without noise, stragglers or routing draws (MoE at its expected expert time).
        An empty step (no decodes, no prefills) returns the per-step CPU cost only."""
        return self._step_us(np.asarray(decode_contexts, dtype=np.float64), prefills, n_logits, False)

    def step_time_us(self, decode_contexts: ArrayLike, prefills: Sequence[tuple[int, int, int]],
                     n_logits: int) -> float:
        """Step time (µs) with sampled MoE routing, lognormal noise and rare stragglers (uses self.rng)."""
        if type(decode_contexts) is not np.ndarray:
            decode_contexts = np.asarray(decode_contexts, dtype=np.float64)
        t = self._step_us(decode_contexts, prefills, n_logits, True)
        if self._sigma:
            t *= math.exp(self._sigma * self._normal())
        if self._strag_p and self._uniform() < self._strag_p:
            t *= self._strag_lo + (self._strag_hi - self._strag_lo) * self._uniform()
        return t

    def scheduler_cpu_us(self, n_requests: int) -> float:
        """CPU time of the schedule() call alone (the fork's step.duration_us), lognormal around
        sched_base_us + sched_per_request_us·n. Its expectation is part of the step time."""
        t = self._sched_base + self._sched_req * n_requests
        if self._sched_sigma:
            s = self._sched_sigma
            t *= math.exp(s * self._normal() - 0.5 * s * s)
        return t

    def api_overhead_us(self) -> float:
        """α0 sample: api.ARRIVED -> journey.QUEUED (tokenisation, IPC); mean api_us."""
        s = self._alpha["api_sigma"]
        return self._alpha["api_us"] * math.exp(s * self._normal() - 0.5 * s * s)

    def post_decode_overhead_us(self, n_out: int) -> float:
        """α1 + α2·n_out sample: journey.FINISHED -> api.DEPARTED (detokenise, stream, respond)."""
        s = self._alpha["post_sigma"]
        mean = self._alpha["post_fixed_us"] + self._alpha["post_per_token_us"] * max(0, int(n_out))
        return mean * math.exp(s * self._normal() - 0.5 * s * s)

    # the request-overheads protocol of the fast-mode loop (rooflab.twin.simulate.RequestOverheads)
    def api_us(self, req: Request) -> float:
        return self.api_overhead_us()

    def post_us(self, req: Request) -> float:
        return self.post_decode_overhead_us(req.output_tokens)

    def first_token_us(self, req: Request) -> float:
        return 0.0  # vLLM's first token leaves with the step that made it
