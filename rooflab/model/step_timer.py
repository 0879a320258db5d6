"""Step timers from coefficient sets: the engine's ``StepTimer`` (:class:`rooflab.twin.engine.StepTimer`) computed
from fitted coefficients instead of the twin's hidden truth (targeting's predictions, replay), and one that
replays recorded step times."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from rooflab.model.arch import ModelArch
from rooflab.model.coefficients import Coefficients
from rooflab.model.features import Setting, compute_features, expert_weight_bytes
from rooflab.model.hardware import Hardware


class FittedStepTimer:
    """``StepTimer`` of a coefficient set for one (model, TP, GPU): per-step features from scalar constants.

    Every feature of docs/spec.md §1 is linear in the step's aggregates except the two roofline ``max``es and the
    expected distinct experts; the linear maps are read off :func:`rooflab.model.features.compute_features` at
    unit aggregates, so the timer and the fit use one implementation of the formulas."""

    def __init__(self, coefs: Coefficients, arch: ModelArch, hardware: Hardware, tp: int) -> None:

        self.setting = s = Setting(arch, hardware, int(tp), coefs.formulas)
        names = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
                 "decode_reqs", "decode_context")
        basis = np.zeros((len(names) + 1, len(names)))
        basis[1:] = np.eye(len(names))
        f = compute_features(s, {n: basis[:, i] for i, n in enumerate(names)})
        unit = {n: i + 1 for i, n in enumerate(names)}  # row of the unit vector of aggregate n

        def lin(feature: str, agg: str) -> float:
            return float(f[feature][unit[agg]] - f[feature][0])

        self.pf_c = tuple(lin("F_pf_compute", a) for a in ("prefill_tokens", "prefill_attn_pairs",
                                                           "prefill_context", "prefill_logits"))
        self.pf_kv = lin("F_pf_kv", "prefill_tokens")
        # attention-score share of the prefill roofline (roofline7+layers+attn): affine in (T, A, C) like pf_c
        self.pf_attn = tuple(lin("F_pf_attn", a) for a in ("prefill_tokens", "prefill_attn_pairs", "prefill_context"))
        self.dc_c = (lin("F_dc_compute", "decode_reqs"), lin("F_dc_compute", "decode_context"))
        self.dc_kv = lin("F_dc_kv", "decode_context")
        self.dc_kv_d = lin("F_dc_kv", "decode_reqs")
        self.w_static = float(f["f_weight_static"][0])
        # the TP term is affine in the step's tokens (bandwidth per token + per-all-reduce latency)
        self.tp0 = float(f["f_tp"][0])
        self.tp_c = lin("f_tp", "prefill_tokens")
        a = arch
        self.moe = a.is_moe
        self.expert_us = expert_weight_bytes(s) / (hardware.hbm_tb_s * 1e6) if a.is_moe else 0.0
        self.N, self.k = float(a.n_experts or 0), float(a.experts_per_token or 0)
        self.log1mk = math.log1p(-self.k / self.N) if a.is_moe and self.k < self.N else None
        self.design = coefs.formulas == "design"
        b = dict(coefs.beta)
        self.b = [float(b.get(n, 0.0)) for n in ("beta1", "beta2", "beta3", "beta4", "beta5", "beta6", "beta7")]
        self.b1_attn = float(b.get("beta1_attn", self.b[0]))  # absent: one β on the whole prefill roofline
        self.const = (self.b[2] * self.w_static + self.b[6] + float(b.get("beta_layer", 0.0)) * a.n_layers
                      + self.b[4] * self.tp0)
        self.calls = 0

    def n_eff(self, tokens: float, requests: float) -> float:
        if not self.moe:
            return 0.0
        if self.design:
            return min(self.N, max(self.k, requests * self.k))
        if self.log1mk is None:
            return self.N if tokens > 0 else 0.0
        return self.N * -math.expm1(tokens * self.log1mk)

    def time_from_aggregates(self, P: float, T: float, C: float, A: float, logits: float, D: float,
                             Cd: float) -> float:
        b1, b2, _, b4, b5, b6, _ = self.b
        t = self.const + b6 * (P + D)
        if P:
            pc = self.pf_c
            pf = max(pc[0] * T + pc[1] * A + pc[2] * C + pc[3] * logits, self.pf_kv * (C + T))
            if self.b1_attn == b1:
                t += b1 * pf
            else:
                pa = self.pf_attn
                attn = min(pa[0] * T + pa[1] * A + pa[2] * C, pf)
                t += b1 * (pf - attn) + self.b1_attn * attn
        if D:
            t += b2 * max(self.dc_c[0] * D + self.dc_c[1] * Cd, self.dc_kv * Cd + self.dc_kv_d * D)
        tok = T + D
        if b5:
            t += b5 * self.tp_c * tok
        if self.moe and b4:
            t += b4 * self.expert_us * self.n_eff(tok, P + D)
        return t

    def step_time_us(self, decode_contexts: np.ndarray, prefills: list[tuple[int, int, int]], n_logits: int) -> float:
        self.calls += 1
        D = len(decode_contexts)
        Cd = float(decode_contexts.sum()) if D else 0.0
        if prefills:
            T = C = A = 0.0
            for n, c, _ in prefills:
                T += n
                C += c
                A += n * c + n * (n + 1) / 2
            P = len(prefills)
            logits = max(0, n_logits - D)
        else:
            P = T = C = A = logits = 0
        return self.time_from_aggregates(P, T, C, A, logits, D, Cd)

    def scheduler_cpu_us(self, n_requests: int) -> float:
        return 0.0  # part of the fitted step time (β6, β7); only traced runs ask for it


class BlisStepTimer:
    """``StepTimer`` of a BLIS trained-physics coefficient set (variants ``blis-tp10`` / ``blis-tp11``) for one
    (model, TP, GPU): BLIS's step time exactly — Σ β_j·basis_j from :func:`rooflab.model.blis.blis_basis`,
    truncated to whole µs and at least 1 µs (docs/blis.md §3). Every basis is affine in the step's aggregates
    (P prefill tokens, Σ chunk·(prompt + chunk/2), D decodes, their context C, B requests) on each side of the
    "has prefill" / "has decode" gates, so the per-step cost is read off the basis at unit aggregates once."""

    AGG = ("prefill_tokens", "prefill_prompt_pairs", "decode_reqs", "decode_context")

    def __init__(self, coefs: Coefficients, arch: ModelArch, hardware: Hardware, tp: int) -> None:
        from rooflab.model.blis import BLIS_BASIS_OF, BLIS_BETA_ORDER, blis_basis, blis_shape_of, load_blis_hardware

        shape = blis_shape_of(arch)
        shape.check_tp(int(tp))
        hw = load_blis_hardware(hardware.name)
        betas = [float(coefs.beta.get(n, 0.0)) for n in BLIS_BETA_ORDER]
        if "beta_ep" not in coefs.beta:  # BLIS: fewer than 11 coefficients -> β_EP := β4
            betas[10] = betas[3]
        # rows: empty; one prefill token; + one prompt pair; one decode at context 0; + one context token
        rows = {"prefill_reqs": [0, 1, 1, 0, 0], "prefill_tokens": [0, 1, 1, 0, 0],
                "prefill_prompt_pairs": [0, 0, 1, 0, 0], "prefill_context": [0, 0, 0, 0, 0],
                "decode_reqs": [0, 0, 0, 1, 1], "decode_context": [0, 0, 0, 0, 1]}
        basis = blis_basis(shape, hw, int(tp), {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()})
        coef = dict(zip(BLIS_BETA_ORDER, betas))
        t = [float(sum(coef[b] * basis[BLIS_BASIS_OF[b]][i] for b in BLIS_BETA_ORDER)) for i in range(5)]
        self.per_request = coef["beta6"]
        self.base = t[0]  # weights, per-layer, per-step and MoE-layer terms (an empty batch itself costs 1 µs)
        self.per_pf_token = t[1] - t[0] - self.per_request
        self.per_pf_pair = t[2] - t[1]  # the prompt pairs enter only the attention part of β1a's compute
        if "beta1a_attn" in coefs.beta and coef["beta1a"] > 0:  # the extension blis-tp10+attn: its own β
            self.per_pf_pair *= float(coefs.beta["beta1a_attn"]) / coef["beta1a"]
        elif "beta1a_attn" in coefs.beta:
            per_pair = float(basis["blis_pf_attn"][2] - basis["blis_pf_attn"][1])
            self.per_pf_pair = float(coefs.beta["beta1a_attn"]) * per_pair
        self.per_dc_req = t[3] - t[0] - self.per_request
        self.per_dc_ctx = t[4] - t[3]
        self.calls = 0

    def time_from_aggregates(self, P: float, T: float, A: float, D: float, C: float) -> float:
        if P + D == 0:
            return 1.0
        t = self.base + self.per_request * (P + D)
        if P:
            t += self.per_pf_token * T + self.per_pf_pair * A
        if D:
            t += self.per_dc_req * D + self.per_dc_ctx * C
        return float(max(1, math.trunc(t)))

    def step_time_us(self, decode_contexts: np.ndarray, prefills: list[tuple[int, int, int]], n_logits: int) -> float:
        self.calls += 1
        D = len(decode_contexts)
        C = float(decode_contexts.sum()) if D else 0.0
        T = A = 0.0
        for n, _, p in prefills:
            T += n
            A += n * (p + n / 2)
        return self.time_from_aggregates(len(prefills), T, A, D, C)

    def scheduler_cpu_us(self, n_requests: int) -> float:
        return 0.0


def make_step_timer(coefs: Coefficients, arch: ModelArch, hardware: Hardware, tp: int
                    ) -> FittedStepTimer | BlisStepTimer:
    """The step timer of a coefficient set: BLIS's exact step time for its own variants, else the fitted
    corrected roofline."""
    if coefs.formulas == "blis":
        return BlisStepTimer(coefs, arch, hardware, tp)
    return FittedStepTimer(coefs, arch, hardware, tp)


class RecordedStepTimer:
    """Step times replayed in order (the parity test: the twin's own step times)."""

    def __init__(self, durations: Iterable[float]) -> None:
        self.durations = list(map(float, durations))
        self.i = 0

    def step_time_us(self, decode_contexts: np.ndarray, prefills: list[tuple[int, int, int]], n_logits: int) -> float:
        t = self.durations[self.i]
        self.i += 1
        return t

    def scheduler_cpu_us(self, n_requests: int) -> float:
        return 0.0


_LOADED: dict[tuple[str, str], tuple[ModelArch, Hardware]] = {}


def arch_and_hardware(model: str, hardware: str) -> tuple[ModelArch, Hardware]:
    """The model architecture and GPU datasheet, read once per process (a calibration replays many times)."""
    key = (model, hardware)
    if key not in _LOADED:
        from rooflab.model.arch import load_model
        from rooflab.model.hardware import load_hardware

        _LOADED[key] = (load_model(model), load_hardware(hardware))
    return _LOADED[key]
