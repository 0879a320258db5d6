"""Request-level validation by replay (issue 7): run a request trace through the twin's scheduler with step
times from a *fitted* coefficient set, and compare the predicted TTFT / ITL / E2E with the measured ones.

* :class:`Coefficients` — β (step time) and α (request overheads) from a ``rooflab fit --out`` result, a
  ``rooflab export --format json`` document, or a BLIS ``defaults.yaml`` / trained-physics YAML (mapped onto
  rooflab's features where the terms map; see :func:`blis_coefficients`).
* :class:`FittedStepTimer` — the engine's ``StepTimer`` from a coefficient set: the 7 (or 8) features of
  SPEC §1 reduced, per (model, TP, GPU), to a few scalar constants, so one step costs ~20 scalar
  operations. It gives exactly ``variant.predict(featurize(steps))`` (tested), never the twin's truth.
* :class:`Trace` and its readers — the requests (arrival, prompt / output tokens, prefix groups) of one
  run, the vLLM settings it ran under, and the measured client-side TTFT / E2E where known: the real runs
  (``rooflab.data.adapters.real_requests``), rooflab request tables (data store runs), and inference-perf's
  ``per_request_lifecycle_metrics.json``.
* :func:`replay` — the discrete-event run: a request enters the scheduler's queue α0 after its arrival,
  every step advances the clock by the fitted step time, a finished request departs α1 + α2·n_out after
  its last token; a request the client gave up on (its timeout) is aborted, as vLLM aborts a
  disconnected request. Predicted TTFT = first token − arrival, E2E = departure − arrival (client
  side, like the measurement), ITL = (E2E − TTFT)/(n_out − 1).
* :func:`compare` — per run and metric: APE of the mean / P90 / P99, the per-request APE distribution,
  Pearson r, and a grade like BLIS ``calibrate``.

The loop is the same as :func:`rooflab.twin.simulate.simulate` (fast mode) plus client timeouts and
per-step recording; ``tests/test_replay.py`` checks that it reproduces the twin's own TTFT / E2E exactly
when given the twin's true step times and overheads.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rooflab.errors import InputError

ALPHA_NAMES = ("alpha0", "alpha1", "alpha2")
METRICS = ("ttft", "itl", "e2e")
GRADES = (("excellent", 0.10, 0.95), ("good", 0.20, 0.85), ("fair", 0.35, 0.70))
BLIS_BETA_NAMES = ("β1a", "β2a", "β3", "β4", "β5", "β6", "β7", "β8", "β1b", "β2b", "β_EP")


# ---------------------------------------------------------------------------------------------------
# coefficients


@dataclass
class Coefficients:
    """A coefficient set to replay: β by rooflab term name, α = (α0 µs, α1 µs, α2 µs/token)."""

    beta: dict
    alpha: tuple = (0.0, 0.0, 0.0)
    variant: str = "roofline7"
    formulas: str = "vllm"
    source: str = ""
    alpha_fitted: bool = True
    notes: list = field(default_factory=list)
    tp_comm: str = "rooflab"  # "blis": β5 multiplies BLIS's TP volume (2L·2(TP−1)/TP·T·d·b_act / HBM), not f_tp

    def with_values(self, beta: dict | None = None, alpha=None, source: str | None = None) -> "Coefficients":
        return Coefficients({**self.beta, **(beta or {})}, tuple(alpha) if alpha is not None else self.alpha,
                            self.variant, self.formulas, source or self.source,
                            self.alpha_fitted or alpha is not None, list(self.notes), self.tp_comm)

    def to_dict(self) -> dict:
        return {"format": "rooflab.coefficients/1", "variant": self.variant, "formulas": self.formulas,
                "beta": {k: {"value": float(v)} for k, v in self.beta.items()},
                "alpha": {"fitted": bool(self.alpha_fitted), "coefficients": {
                    n: {"value": float(v), "unit": u} for n, v, u in zip(ALPHA_NAMES, self.alpha, ("µs", "µs", "µs/token"))}},
                "source": self.source, "notes": list(self.notes), "tp_comm": self.tp_comm}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def coefficients_from_doc(doc, source: str = "") -> Coefficients:
    """From a ``rooflab fit --out`` result or a rooflab coefficients document (``export --format json``,
    :meth:`Coefficients.to_dict`)."""
    if not isinstance(doc, dict):
        raise InputError(source, None, "expected a JSON object (a rooflab fit result or coefficients document)")
    b = doc.get("beta")
    coefs = b.get("coefficients") if isinstance(b, dict) and isinstance(b.get("coefficients"), dict) else b
    if not isinstance(coefs, dict) or not coefs:
        raise InputError(source, "beta", "missing: not a rooflab fit result or coefficients document")
    beta = {}
    for name, c in coefs.items():
        v = c.get("value") if isinstance(c, dict) else c
        if not _num(v):
            raise InputError(source, f"beta.{name}.value", f"missing or not a number ({v!r})")
        beta[str(name)] = float(v)
    variant = doc.get("variant") or (b.get("variant") if isinstance(b, dict) else None) or \
        ("roofline7+layers" if "beta_layer" in beta else "roofline7")
    formulas = doc.get("formulas") or (b.get("formulas") if isinstance(b, dict) else None) or "vllm"
    a = doc.get("alpha") or {}
    notes = list(doc.get("notes") or [])
    if isinstance(a, dict) and a.get("fitted"):
        ac = a.get("coefficients") or {}
        vals = []
        for n in ALPHA_NAMES:
            v = ac.get(n, {}).get("value") if isinstance(ac.get(n), dict) else ac.get(n)
            if not _num(v):
                raise InputError(source, f"alpha.coefficients.{n}.value", f"missing or not a number ({v!r})")
            vals.append(float(v))
        alpha, fitted = tuple(vals), True
    else:
        alpha, fitted = (0.0, 0.0, 0.0), False
        notes.append("α not fitted in this coefficient set: replayed with α = 0 "
                     f"({a.get('reason', 'no request data') if isinstance(a, dict) else 'no α'})")
    from rooflab.model.variants import get_variant

    try:
        known = set(get_variant(variant).names)
    except InputError as exc:
        raise InputError(source, "variant", exc.problem) from None
    unknown = sorted(set(beta) - known)
    if unknown:
        raise InputError(source, f"beta.{unknown[0]}", f"not a term of variant {variant}")
    return Coefficients(beta, alpha, variant, formulas, source, fitted, notes, doc.get("tp_comm", "rooflab"))


def blis_coefficients(doc, source: str = "") -> Coefficients:
    """BLIS trained-physics coefficients (``trained_physics_coefficients: {alpha_coeffs[3], beta_coeffs[10|11]}``)
    mapped onto rooflab's roofline7+layers terms. Where the terms map:

    * β1 ← β1a (prefill compute; BLIS's β1b prefill-KV term is 0 in the shipped set, rooflab's prefill
      roofline is compute-bound on these prompts);
    * β2 ← β2b (decode KV memory; BLIS's β2a decode-compute term is 0 in the shipped set);
    * β3 ← β3 (weights), β4 ← β3 as well (BLIS streams all N experts under β3; rooflab's routed-expert
      term streams N_eff — same efficiency, different volume);
    * β5 ← β4, applied to BLIS's own TP volume (L(attn) + L(FFN) all-reduces moving 2(TP−1)/TP·T·d·b_act
      at HBM bandwidth), which the timer computes itself (``tp_comm = "blis"``), since rooflab's f_tp is
      a different quantity;
    * β6 ← β6, β7 ← β7, β_layer ← β5 (µs/layer).

    Not mapped: β8 (per-MoE-layer overhead, interleaved MoE only — none of the real models), β_EP (no
    expert parallelism here); BLIS's prefill FLOPs omit the LM head and use Σ n(c + n/2) pairs, so the same
    β multiplies slightly different features."""
    block = doc.get("trained_physics_coefficients") if isinstance(doc, dict) else None
    if not isinstance(block, dict):
        raise InputError(source, "trained_physics_coefficients", "missing: not a BLIS coefficients YAML")
    a, b = block.get("alpha_coeffs"), block.get("beta_coeffs")
    if not isinstance(a, list) or len(a) != 3 or not all(_num(v) for v in a):
        raise InputError(source, "trained_physics_coefficients.alpha_coeffs", "expected 3 numbers")
    if not isinstance(b, list) or len(b) not in (10, 11) or not all(_num(v) for v in b):
        raise InputError(source, "trained_physics_coefficients.beta_coeffs", "expected 10 or 11 numbers")
    B = dict(zip(BLIS_BETA_NAMES, map(float, b)))
    beta = {"beta1": B["β1a"], "beta2": B["β2b"], "beta3": B["β3"], "beta4": B["β3"], "beta5": B["β4"],
            "beta6": B["β6"], "beta7": B["β7"], "beta_layer": B["β5"]}
    notes = ["BLIS trained-physics mapped onto rooflab features: β1←β1a, β2←β2b, β3←β3, β4←β3 (all-expert vs "
             "N_eff volume), β5←β4 (on BLIS's TP volume), β6←β6, β7←β7, β_layer←β5",
             f"not mapped: β2a={B['β2a']:g} (decode compute), β1b={B['β1b']:g} (prefill KV), β8={B['β8']:g} µs/MoE-layer "
             "(interleaved MoE only), β_EP (no expert parallelism)"]
    return Coefficients(beta, tuple(map(float, a)), "roofline7+layers", "vllm", source, True, notes, "blis")


def load_coefficients(path: str | Path) -> Coefficients:
    """A coefficient file: rooflab fit result / coefficients JSON, or BLIS YAML (``defaults.yaml`` or the
    ``rooflab export --format blis`` output). Every problem is one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "no such file" if not path.exists() else "not a file")
    text = path.read_bytes()
    try:
        text = text.decode()
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 text (expected a coefficients JSON or BLIS YAML)") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise InputError(path, None, f"malformed YAML{where}") from None
        return blis_coefficients(doc, str(path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(doc, dict) and "trained_physics_coefficients" in doc:
        return blis_coefficients(doc, str(path))
    return coefficients_from_doc(doc, str(path))


# ---------------------------------------------------------------------------------------------------
# the fitted step timer


class FittedStepTimer:
    """``StepTimer`` of a coefficient set for one (model, TP, GPU): per-step features from scalar constants.

    Every feature of SPEC §1 is linear in the step's aggregates except the two roofline ``max``es and the
    expected distinct experts; the linear maps are read off :func:`rooflab.model.features.compute_features` at
    unit aggregates, so the timer and the fit use one implementation of the formulas."""

    def __init__(self, coefs: Coefficients, arch, hardware, tp: int):
        from rooflab.model.features import Setting, compute_features

        self.setting = s = Setting(arch, hardware, int(tp), coefs.formulas)
        names = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
                 "decode_reqs", "decode_context")
        basis = np.zeros((len(names) + 1, len(names)))
        basis[1:] = np.eye(len(names))
        f = compute_features(s, {n: basis[:, i] for i, n in enumerate(names)})
        unit = {n: i + 1 for i, n in enumerate(names)}  # row of the unit vector of aggregate n

        def lin(feature, agg):
            return float(f[feature][unit[agg]] - f[feature][0])

        self.pf_c = tuple(lin("F_pf_compute", a) for a in ("prefill_tokens", "prefill_attn_pairs",
                                                           "prefill_context", "prefill_logits"))
        self.pf_kv = lin("F_pf_kv", "prefill_tokens")
        self.dc_c = (lin("F_dc_compute", "decode_reqs"), lin("F_dc_compute", "decode_context"))
        self.dc_kv = lin("F_dc_kv", "decode_context")
        self.dc_kv_d = lin("F_dc_kv", "decode_reqs")
        self.w_static = float(f["f_weight_static"][0])
        # the TP term is affine in the step's tokens (bandwidth per token + per-all-reduce latency)
        self.tp0 = float(f["f_tp"][0])
        self.tp_c = lin("f_tp", "prefill_tokens")
        a = arch
        if coefs.tp_comm == "blis":  # BLIS's TP volume: 2L all-reduces moving 2(TP−1)/TP·T·d·b_act over HBM
            self.tp0 = 0.0
            self.tp_c = (2 * a.n_layers * a.hidden * a.act_bytes * 2 * (tp - 1) / tp / (hardware.hbm_tb_s * 1e6)
                         if tp > 1 else 0.0)
        from rooflab.model.features import expert_weight_bytes

        self.moe = a.is_moe
        self.expert_us = expert_weight_bytes(s) / (hardware.hbm_tb_s * 1e6) if a.is_moe else 0.0
        self.N, self.k = float(a.n_experts or 0), float(a.experts_per_token or 0)
        self.log1mk = math.log1p(-self.k / self.N) if a.is_moe and self.k < self.N else None
        self.design = coefs.formulas == "design"
        b = dict(coefs.beta)
        self.b = [float(b.get(n, 0.0)) for n in ("beta1", "beta2", "beta3", "beta4", "beta5", "beta6", "beta7")]
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

    def time_from_aggregates(self, P, T, C, A, logits, D, Cd) -> float:
        b1, b2, _, b4, b5, b6, _ = self.b
        t = self.const + b6 * (P + D)
        if P:
            pc = self.pf_c
            t += b1 * max(pc[0] * T + pc[1] * A + pc[2] * C + pc[3] * logits, self.pf_kv * (C + T))
        if D:
            t += b2 * max(self.dc_c[0] * D + self.dc_c[1] * Cd, self.dc_kv * Cd + self.dc_kv_d * D)
        tok = T + D
        if b5:
            t += b5 * self.tp_c * tok
        if self.moe and b4:
            t += b4 * self.expert_us * self.n_eff(tok, P + D)
        return t

    def step_time_us(self, decode_contexts, prefills, n_logits: int) -> float:
        self.calls += 1
        D = len(decode_contexts)
        Cd = float(decode_contexts.sum()) if D else 0.0
        if prefills:
            T = C = A = 0.0
            for n, c in prefills:
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


class RecordedStepTimer:
    """Step times replayed in order (the parity test: the twin's own step times)."""

    def __init__(self, durations):
        self.durations = list(map(float, durations))
        self.i = 0

    def step_time_us(self, decode_contexts, prefills, n_logits: int) -> float:
        t = self.durations[self.i]
        self.i += 1
        return t

    def scheduler_cpu_us(self, n_requests: int) -> float:
        return 0.0


class ConstantOverheads:
    """α0 before the queue, α1 + α2·n_out after the last token: the fitted α."""

    def __init__(self, alpha):
        self.a0, self.a1, self.a2 = map(float, alpha)

    def api_us(self, req) -> float:
        return self.a0

    def post_us(self, req) -> float:
        return self.a1 + self.a2 * req.output_tokens


class RecordedOverheads:
    """Per-request overheads by request id (the parity test: the twin's sampled α)."""

    def __init__(self, api: dict, post: dict):
        self.api, self.post = api, post

    def api_us(self, req) -> float:
        return float(self.api[req.request_id])

    def post_us(self, req) -> float:
        return float(self.post[req.request_id])


# ---------------------------------------------------------------------------------------------------
# traces


@dataclass
class Trace:
    """One run's requests and the settings to replay them under.

    ``requests`` columns: request_id (str), arrival_us, prompt_tokens, output_tokens (what the server
    produced; the replay sends it as max_tokens with ignore_eos), prefix_group, prefix_tokens, failed
    (bool, the client saw an error), and the measured client-side ttft_us, e2e_us, itl_us (NaN where
    unknown)."""

    run_id: str
    model: str
    tp: int
    hardware: str
    engine: dict  # EngineConfig fields
    requests: pd.DataFrame
    timeout_s: float | None = None  # client request timeout (the request is aborted at arrival + timeout)
    workload: str | None = None
    split: str | None = None
    source: str = ""
    notes: list = field(default_factory=list)

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    def window(self, t0_s: float, t1_s: float, lead_s: float = 30.0) -> "Trace":
        """The requests arriving in [t0 − lead, t1) seconds after the first arrival; those before t0 only
        warm the engine up (column ``scored`` False)."""
        r = self.requests
        t = (r["arrival_us"] - r["arrival_us"].min()) / 1e6
        keep = (t >= t0_s - lead_s) & (t < t1_s)
        sub = r[keep].copy()
        sub["scored"] = (t[keep] >= t0_s).to_numpy() & sub.get("scored", pd.Series(True, index=sub.index)).to_numpy()
        return Trace(self.run_id, self.model, self.tp, self.hardware, dict(self.engine), sub.reset_index(drop=True),
                     self.timeout_s, self.workload, self.split, self.source, list(self.notes))


_TRACE_COLUMNS = ("request_id", "arrival_us", "prompt_tokens", "output_tokens", "prefix_group", "prefix_tokens",
                  "failed", "ttft_us", "e2e_us", "itl_us")


def _itl(ttft, e2e, out):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(out > 1, (e2e - ttft) / (out - 1), np.nan)


def trace_from_real(run, prefix: str = "prompt") -> Trace:
    """A :class:`~rooflab.data.adapters.real_requests.RealRun` as a trace.

    ``prefix``: how the replay's prefix cache sees the prompts. inference-perf's shared_prefix workload
    sends request i the prompt slot i mod 100, so a prompt repeats every 100 requests and vLLM's prefix
    cache can hold all of it: ``prompt`` (default) makes each slot its own prefix group covering the whole
    prompt; ``system`` shares only the system prompt within its group (slot // prompts per group);
    ``none`` turns the cache off."""
    if prefix not in ("prompt", "system", "none"):
        raise InputError(None, "prefix", f"expected prompt, system or none, got {prefix!r}")
    q = run.requests
    notes = []
    prompt = q["prompt_tokens"].to_numpy(dtype=float)
    fill = np.isnan(prompt)
    if fill.any():
        prompt = np.where(fill, q["slot_prompt_tokens"].to_numpy(dtype=float), prompt)
        still = np.isnan(prompt)
        if still.any():
            prompt[still] = float(np.nanmedian(prompt))
        notes.append(f"{int(fill.sum())} failed requests sized from their prompt slot's length")
    out = q["output_tokens"].to_numpy(dtype=float)
    if np.isnan(out).any():
        sp = run.shared_prefix or {}
        want = float(sp.get("output_len") or np.nanmedian(out))
        notes.append(f"{int(np.isnan(out).sum())} failed requests given the workload's output_len {want:g}")
        out = np.where(np.isnan(out), want, out)
    out = np.maximum(out, 1.0)
    slot = q["prompt_id"].to_numpy()
    sp = run.shared_prefix or {}
    if prefix == "prompt" and (slot >= 0).any():
        group = np.where(slot >= 0, "slot" + pd.Series(slot).astype(str).to_numpy(), None)
        ptoks = prompt
    elif prefix == "system" and (slot >= 0).any() and sp.get("num_prompts_per_group"):
        group = np.where(slot >= 0, "sys" + pd.Series(slot // int(sp["num_prompts_per_group"])).astype(str).to_numpy(), None)
        ptoks = np.minimum(q["prefix_tokens"].fillna(0).to_numpy(dtype=float), prompt)
    else:
        group = np.full(len(q), None, dtype=object)
        ptoks = np.zeros(len(q))
    failed = q["error"].to_numpy(dtype=bool)
    reqs = pd.DataFrame({
        "request_id": q["request_id"].astype(str).to_numpy(), "arrival_us": q["arrival_us"].to_numpy(dtype=float),
        "prompt_tokens": prompt, "output_tokens": out, "prefix_group": group, "prefix_tokens": ptoks,
        "failed": failed, "ttft_us": q["ttft_us"].to_numpy(dtype=float), "e2e_us": q["e2e_us"].to_numpy(dtype=float),
        "itl_us": q["itl_us"].to_numpy(dtype=float)})
    v = run.vllm
    engine = {"max_num_seqs": int(v.get("max_num_seqs", 256)),
              "max_num_batched_tokens": int(v.get("max_num_batched_tokens", 2048)),
              "block_size": int(v.get("block_size", 16)), "num_gpu_blocks": int(v["kv_blocks_total_gpu"]),
              "max_model_len": int(v.get("max_model_len", 4096)),
              "enable_prefix_caching": bool(v.get("enable_prefix_caching", False)) and prefix != "none"}
    timeout = None
    if failed.any():
        fe = q.loc[failed, "e2e_us"].to_numpy(dtype=float) / 1e6
        fe = fe[np.isfinite(fe)]
        if len(fe) and (np.abs(fe - np.median(fe)) < 5.0).mean() > 0.9:  # failures cluster: a client timeout
            timeout = float(np.floor(np.min(fe[np.abs(fe - np.median(fe)) < 5.0])))
            notes.append(f"client timeout {timeout:g} s inferred from {len(fe)} failed requests' E2E")
    return Trace(run.run_id, run.model, run.tp, run.hardware, engine, reqs, timeout, run.workload, run.split,
                 run.sources.get("requests", run.run_id), notes)


def read_real_trace(name: str | Path, root=None, prefix: str = "prompt") -> Trace:
    from rooflab.data.adapters.real_requests import DEFAULT_ROOT, read_real_run

    return trace_from_real(read_real_run(name, root or DEFAULT_ROOT), prefix)


def trace_from_request_table(table: pd.DataFrame, *, run_id: str, model: str, tp: int, hardware: str,
                             engine: dict, source: str = "", split: str | None = None,
                             workload: str | None = None) -> Trace:
    """A rooflab request table (SPEC §2; data store runs): measured TTFT = first_token − arrived, E2E =
    departed − arrived (the server's API clock)."""
    from rooflab.data.tables import validate_requests

    t = validate_requests(table, source or run_id)
    t = t[t["arrived_us"].notna()].sort_values("arrived_us", kind="stable")
    if len(t) == 0:
        raise InputError(source or run_id, "arrived_us", "no request has an arrival time")
    arr = t["arrived_us"].to_numpy(dtype=float)
    ttft = t["first_token_us"].to_numpy(dtype=float) - arr
    e2e = t["departed_us"].to_numpy(dtype=float) - arr
    out = t["output_tokens"].to_numpy(dtype=float)
    failed = ~t["status"].astype(str).isin(["ok", "length", "stop"]).to_numpy()
    reqs = pd.DataFrame({"request_id": t["request_id"].astype(str).to_numpy(), "arrival_us": arr,
                         "prompt_tokens": t["prompt_tokens"].to_numpy(dtype=float),
                         "output_tokens": np.maximum(np.nan_to_num(out, nan=1.0), 1.0),
                         "prefix_group": None, "prefix_tokens": 0.0, "failed": failed,
                         "ttft_us": ttft, "e2e_us": e2e, "itl_us": _itl(ttft, e2e, out)})
    bad = reqs["prompt_tokens"].isna() | (reqs["prompt_tokens"] < 1)
    if bad.any():
        raise InputError(source or run_id, f"prompt_tokens[{int(np.flatnonzero(bad)[0])}]", "missing or < 1")
    return Trace(run_id, model, int(tp), hardware, dict(engine), reqs.reset_index(drop=True), None, workload, split,
                 source or run_id)


_ENGINE_KEYS = ("max_num_seqs", "max_num_batched_tokens", "block_size", "gpu_memory_utilization", "max_model_len",
                "enable_prefix_caching", "num_gpu_blocks")


def read_store_trace(store, run_id: str) -> Trace:
    """A data store run (``<store>/runs/<run_id>``) as a trace: its request table and the manifest's settings."""
    from rooflab.data.store import Store

    st = store if isinstance(store, Store) else Store(store)
    m = st.manifest(run_id)
    path = st.run_dir(run_id).path
    if m is None:
        raise InputError(path, "manifest.json", "missing: not a complete data store run")
    table_path = path / "tables" / "requests.parquet"
    if not table_path.is_file():
        raise InputError(table_path, None, "file not found (the run has no request table)")
    table = pd.read_parquet(table_path)
    table["run_id"] = run_id
    engine = {k: v for k, v in (m.get("point", {}).get("engine") or {}).items() if k in _ENGINE_KEYS}
    return trace_from_request_table(table, run_id=run_id, model=m["model"], tp=int(m["tp"]), hardware=m["hardware"],
                                    engine=engine, source=str(table_path), split=m.get("split"),
                                    workload=m.get("family"))


def read_inference_perf(path: str | Path, *, model: str, tp: int, hardware: str = "H100-SXM",
                        engine: dict | None = None, time_scale: float = 1.0, run_id: str | None = None) -> Trace:
    """inference-perf's per-request lifecycle output (``per_request_lifecycle_metrics.json``: a list of
    ``{start_time, end_time, info: {input_tokens | request_metrics.text.input_tokens, response_metrics:
    {output_tokens, output_token_times}}, error}``; times in seconds on the client's monotonic clock).
    TTFT = first output token time − start, E2E = end − start (× ``time_scale`` for an accelerated twin)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    try:
        rows = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(path, None, "expected a non-empty JSON list of per-request records")
    recs = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(path, f"[{i}]", "not an object")
        for key in ("start_time", "end_time"):
            if not _num(r.get(key)):
                raise InputError(path, f"[{i}].{key}", f"missing or not a number ({r.get(key)!r})")
        info = r.get("info")
        if not isinstance(info, dict):
            raise InputError(path, f"[{i}].info", "missing or not an object")
        inp = info.get("input_tokens")
        if not _num(inp):
            inp = ((info.get("request_metrics") or {}).get("text") or {}).get("input_tokens")
        if not _num(inp) or inp < 1:
            raise InputError(path, f"[{i}].info.input_tokens", f"missing or < 1 ({inp!r})")
        rm = info.get("response_metrics") or {}
        err = r.get("error") is not None
        out = rm.get("output_tokens")
        times = rm.get("output_token_times") or rm.get("chunk_times") or []
        if not err:
            if not _num(out) or out < 0:
                raise InputError(path, f"[{i}].info.response_metrics.output_tokens", f"missing or negative ({out!r})")
            if not isinstance(times, list) or not times or not _num(times[0]):
                raise InputError(path, f"[{i}].info.response_metrics.output_token_times",
                                 "missing or empty for a successful streamed request")
        start, end = float(r["start_time"]), float(r["end_time"])
        if end < start:
            raise InputError(path, f"[{i}].end_time", f"{end} is before start_time {start}")
        ttft = (float(times[0]) - start) if (not err and times) else np.nan
        recs.append((str(i), start, float(inp), float(out) if _num(out) else np.nan, err, ttft, end - start))
    df = pd.DataFrame(recs, columns=["request_id", "start", "prompt_tokens", "output_tokens", "failed", "ttft", "e2e"])
    df = df.sort_values("start", kind="stable").reset_index(drop=True)
    s = float(time_scale)
    t0 = df["start"].min()
    arr = (df["start"] - t0).to_numpy() * s * 1e6
    ttft, e2e = df["ttft"].to_numpy() * s * 1e6, df["e2e"].to_numpy() * s * 1e6
    out = df["output_tokens"].to_numpy()
    reqs = pd.DataFrame({"request_id": df["request_id"], "arrival_us": arr, "prompt_tokens": df["prompt_tokens"],
                         "output_tokens": np.maximum(np.nan_to_num(out, nan=1.0), 1.0), "prefix_group": None,
                         "prefix_tokens": 0.0, "failed": df["failed"].to_numpy(), "ttft_us": ttft, "e2e_us": e2e,
                         "itl_us": _itl(ttft, e2e, out)})
    return Trace(run_id or path.parent.name, model, int(tp), hardware, dict(engine or {}), reqs, None, None, None,
                 str(path))


def read_trace(spec: str | Path, *, root=None, prefix: str = "prompt", model: str | None = None,
               tp: int | None = None, hardware: str = "H100-SXM", engine: dict | None = None,
               time_scale: float | None = None) -> Trace:
    """Any supported request trace: a real run (name, request file or ``runs/<run>`` folder under the real
    data root), a data store run folder (``<store>/runs/<id>``, with ``manifest.json``), an inference-perf
    ``per_request_lifecycle_metrics.json``, or a rooflab request table (.parquet/.csv, needs model/tp)."""
    p = Path(spec)
    if p.is_dir() and (p / "manifest.json").is_file():
        return read_store_trace(p.parent.parent, p.name)
    if p.suffix == ".json" and p.is_file():
        scale = time_scale
        if p.parent.name == "inference-perf" and (p.parent.parent / "manifest.json").is_file():
            m = json.loads((p.parent.parent / "manifest.json").read_text())
            model, tp, hardware = model or m["model"], tp or int(m["tp"]), m.get("hardware", hardware)
            engine = engine or {k: v for k, v in (m.get("point", {}).get("engine") or {}).items() if k in _ENGINE_KEYS}
            scale = scale or float((m.get("inference_perf") or {}).get("time_scale") or 1.0)
        if model is None or tp is None:
            raise InputError(p, None, "an inference-perf file does not name the model and TP: pass --model and --tp")
        return read_inference_perf(p, model=model, tp=tp, hardware=hardware, engine=engine, time_scale=scale or 1.0)
    if p.suffix in (".parquet", ".csv") and p.is_file():
        from rooflab.data.adapters import read_requests

        if model is None or tp is None:
            raise InputError(p, None, "a request table does not name the model and TP: pass --model and --tp")
        return trace_from_request_table(read_requests(p), run_id=p.stem, model=model, tp=tp, hardware=hardware,
                                        engine=engine or {}, source=str(p))
    return read_real_trace(spec, root, prefix)


# ---------------------------------------------------------------------------------------------------
# the replay


@dataclass
class ReplayResult:
    run_id: str
    requests: pd.DataFrame  # measured and predicted per request
    steps: pd.DataFrame | None  # per-step start, duration, aggregates (record=True)
    n_steps: int
    sim_time_s: float
    wall_s: float
    stats: dict

    @property
    def steps_per_s(self) -> float:
        return self.n_steps / self.wall_s if self.wall_s > 0 else float("nan")


_AGG = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
        "decode_reqs", "decode_context", "kv_usage", "preemptions", "running", "waiting")


_LOADED: dict = {}


def arch_and_hardware(model: str, hardware: str):
    """The model architecture and GPU datasheet, read once per process (a calibration replays many times)."""
    key = (model, hardware)
    if key not in _LOADED:
        from rooflab.model.arch import load_model
        from rooflab.model.hardware import load_hardware

        _LOADED[key] = (load_model(model), load_hardware(hardware))
    return _LOADED[key]


def engine_for(trace: Trace, timer, *, seed: int = 0):
    from rooflab.twin.engine import Engine
    from rooflab.model.engine_config import EngineConfig

    cfg = EngineConfig(**{k: v for k, v in trace.engine.items() if k in _ENGINE_KEYS})
    arch, hw = arch_and_hardware(trace.model, trace.hardware)
    return Engine(arch, hw, trace.tp, timer, cfg, seed=seed)


def make_requests(trace: Trace) -> list:
    from rooflab.twin.engine import Request

    r = trace.requests
    groups = r["prefix_group"].to_numpy(dtype=object) if "prefix_group" in r else np.full(len(r), None)
    ptok = r["prefix_tokens"].to_numpy(dtype=float) if "prefix_tokens" in r else np.zeros(len(r))
    return [Request(str(i), float(a), int(p), int(o), True, None, g if isinstance(g, str) and g else None,
                    int(pt) if pt == pt else 0)
            for i, a, p, o, g, pt in zip(r["request_id"].to_numpy(), r["arrival_us"].to_numpy(dtype=float),
                                         r["prompt_tokens"].to_numpy(dtype=float), r["output_tokens"].to_numpy(dtype=float),
                                         groups, ptok)]


def run_engine(engine, requests: list, overheads, *, timeout_us: float | None = None, record: bool = False,
               max_steps: int | None = None) -> tuple[int, float, dict | None, dict]:
    """The discrete-event loop of :func:`rooflab.twin.simulate.simulate`, plus client timeouts (a request
    still unfinished ``timeout_us`` after its arrival is aborted) and optional per-step recording.
    Returns (steps, end time µs, recorded steps or None, stats)."""
    import heapq

    from rooflab.errors import InputError as _IE

    heap = []
    for seq, req in enumerate(requests):
        heapq.heappush(heap, (req.arrival_us + overheads.api_us(req), seq, req))
    by_deadline = sorted(requests, key=lambda r: r.arrival_us) if timeout_us is not None else []
    di = 0
    starts, durs, aggs = [], [], []
    now = 0.0
    n_steps = 0
    max_waiting = 0
    aborted = rejected = 0
    while True:
        while heap and heap[0][0] <= now:
            q, _, req = heapq.heappop(heap)
            try:
                engine.add_request(req, q)
            except _IE:
                req.status = "rejected"
                rejected += 1
        if timeout_us is not None:
            while di < len(by_deadline) and by_deadline[di].arrival_us + timeout_us <= now:
                req = by_deadline[di]
                di += 1
                if not req.status and not math.isnan(req.queued_us):
                    if engine.abort(req.request_id, now):
                        aborted += 1
                        req.departed_us = req.arrival_us + timeout_us
        if not engine.has_work:
            if not heap:
                break
            now = heap[0][0]
            continue
        out = engine.step(now)
        if out is None:
            if not heap:
                break
            now = heap[0][0]
            continue
        if record and out.aggregates is not None:
            starts.append(now)
            durs.append(out.duration_us)
            aggs.append(out.aggregates)
        w = len(engine.waiting)
        if w > max_waiting:
            max_waiting = w
        now += out.duration_us
        for req in out.finished:
            if req.status != "abort":
                req.departed_us = req.finished_us + overheads.post_us(req)
        n_steps += 1
        if max_steps is not None and n_steps >= max_steps:
            break
    engine.drain_events()
    steps = None
    if record:
        a = np.array(aggs, dtype=np.float64).reshape(-1, len(_AGG))
        steps = {"t_start_us": np.array(starts), "step_time_us": np.array(durs), **{c: a[:, i] for i, c in enumerate(_AGG)}}
    return n_steps, now, steps, {"max_waiting": max_waiting, "aborted": aborted, "rejected": rejected}


def replay(trace: Trace, coefs: Coefficients | None = None, *, timer=None, overheads=None, record: bool = False,
           timeout: bool = True, max_steps: int | None = None) -> ReplayResult:
    """Replay ``trace`` with the step time of ``coefs`` (or an explicit ``timer``) and predict each request's
    TTFT / ITL / E2E (µs, client side)."""
    if timer is None:
        if coefs is None:
            raise InputError(None, "coefficients", "replay needs a coefficient set or a step timer")
        timer = FittedStepTimer(coefs, *arch_and_hardware(trace.model, trace.hardware), trace.tp)
    if overheads is None:
        overheads = ConstantOverheads(coefs.alpha if coefs is not None else (0.0, 0.0, 0.0))
    engine = engine_for(trace, timer)
    reqs = make_requests(trace)
    t0 = time.perf_counter()
    timeout_us = trace.timeout_s * 1e6 if (timeout and trace.timeout_s) else None
    n, end, steps, stats = run_engine(engine, reqs, overheads, timeout_us=timeout_us, record=record,
                                      max_steps=max_steps)
    wall = time.perf_counter() - t0
    arr = np.array([r.arrival_us for r in reqs])
    first = np.array([r.first_token_us for r in reqs])
    dep = np.array([r.departed_us for r in reqs])
    nout = np.array([r.output_tokens for r in reqs], dtype=float)
    status = np.array([r.status or "unfinished" for r in reqs], dtype=object)
    ok = np.isin(status, ("length", "stop"))
    ttft = np.where(ok, first - arr, np.nan)
    e2e = np.where(ok, dep - arr, np.nan)
    out = trace.requests.copy()
    out["pred_ttft_us"] = ttft
    out["pred_e2e_us"] = e2e
    out["pred_itl_us"] = _itl(ttft, e2e, nout)
    out["pred_status"] = status
    out["pred_failed"] = ~ok
    out["queued_us"] = [r.queued_us for r in reqs]
    out["scheduled_us"] = [r.scheduled_us for r in reqs]
    out["first_token_us"] = first
    out["finished_us"] = [r.finished_us for r in reqs]
    out["preemptions_pred"] = [r.preemptions for r in reqs]
    stats.update({"blocks": engine.num_blocks, "timeout_s": trace.timeout_s if timeout_us else None,
                  "preemptions": int(sum(r.preemptions for r in reqs))})
    steps_df = pd.DataFrame(steps) if steps is not None else None
    return ReplayResult(trace.run_id, out, steps_df, n, end / 1e6, wall, stats)


# ---------------------------------------------------------------------------------------------------
# comparison


def _ape(pred: float, meas: float) -> float:
    return float(abs(pred - meas) / abs(meas)) if meas and np.isfinite(meas) and np.isfinite(pred) else float("nan")


def grade(mape: float, r: float) -> str:
    """Like BLIS ``calibrate``: excellent < 10% with r > 0.95, good < 20% with r > 0.85, fair < 35% with
    r > 0.70, else poor."""
    if not (np.isfinite(mape) and np.isfinite(r)):
        return "n/a"
    for name, m, rr in GRADES:
        if mape < m and r > rr:
            return name
    return "poor"


def compare(result_or_frame, *, scored_only: bool = True) -> dict:
    """Metrics of one replayed run: per metric (ttft, itl, e2e) the APE of the mean / P90 / P99 (over the
    requests that succeeded both in the measurement and in the replay; the mean ITL is the mean over all
    inter-token intervals, Σ(E2E − TTFT)/Σ(n_out − 1)), the per-request APE distribution
    (mean = per-request MAPE, median, P90), Pearson r, a grade (from the per-request MAPE and r), and the
    failure counts."""
    df = result_or_frame.requests if hasattr(result_or_frame, "requests") else result_or_frame
    if scored_only and "scored" in df:
        df = df[df["scored"].to_numpy(dtype=bool)]
    meas_ok = ~df["failed"].to_numpy(dtype=bool)
    pred_ok = ~df["pred_failed"].to_numpy(dtype=bool)
    both = meas_ok & pred_ok
    out = {"requests": int(len(df)), "measured_failed": int((~meas_ok).sum()), "predicted_failed": int((~pred_ok).sum()),
           "compared": int(both.sum())}
    for m in METRICS:
        y = df[f"{m}_us"].to_numpy(dtype=float)
        p = df[f"pred_{m}_us"].to_numpy(dtype=float)
        k = both & np.isfinite(y) & np.isfinite(p) & (y > 0)
        y, p = y[k], p[k]
        if len(y) == 0:
            out[m] = {"n": 0}
            continue
        ape = np.abs(p - y) / y
        r = float(np.corrcoef(p, y)[0, 1]) if len(y) > 2 and np.std(p) > 0 and np.std(y) > 0 else float("nan")
        ym, pm = float(y.mean()), float(p.mean())
        if m == "itl" and "output_tokens" in df:
            # the run's mean ITL is the mean over all inter-token intervals (what a simulator reports):
            # Σ(E2E − TTFT) / Σ(n_out − 1), not the mean of per-request ITLs, which a few requests with a
            # handful of tokens dominate
            gaps = np.clip(df["output_tokens"].to_numpy(dtype=float)[k] - 1, 1, None)
            ym, pm = float((y * gaps).sum() / gaps.sum()), float((p * gaps).sum() / gaps.sum())
        res = {"n": int(len(y)), "measured_mean_ms": ym / 1e3, "predicted_mean_ms": pm / 1e3,
               "mean_ape": _ape(pm, ym), "p50_ape": _ape(np.median(p), np.median(y)),
               "p90_ape": _ape(np.percentile(p, 90), np.percentile(y, 90)),
               "p99_ape": _ape(np.percentile(p, 99), np.percentile(y, 99)),
               "request_mape": float(ape.mean()), "request_median_ape": float(np.median(ape)),
               "request_p90_ape": float(np.percentile(ape, 90)), "pearson_r": r,
               "bias": float((pm - ym) / ym)}
        res["grade"] = grade(res["request_mape"], r)
        out[m] = res
    return out


def summarize(results: dict) -> pd.DataFrame:
    """{run: compare() dict} → one row per run and metric."""
    rows = []
    for run, c in results.items():
        for m in METRICS:
            x = c.get(m) or {}
            if not x.get("n"):
                continue
            rows.append({"run": run, "metric": m, **{k: v for k, v in x.items()}})
    return pd.DataFrame(rows)


def plot_replay(results: dict, path: str | Path, title: str = "") -> Path:
    """Predicted vs measured (per-request, sub-sampled) scatter for TTFT, ITL and E2E, all runs in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, m in zip(axes, METRICS):
        lo, hi = np.inf, 0.0
        for run, df in results.items():
            k = ~df["failed"].to_numpy(dtype=bool) & ~df["pred_failed"].to_numpy(dtype=bool)
            if "scored" in df:
                k &= df["scored"].to_numpy(dtype=bool)
            y = df[f"{m}_us"].to_numpy(dtype=float)[k] / 1e3
            p = df[f"pred_{m}_us"].to_numpy(dtype=float)[k] / 1e3
            good = np.isfinite(y) & np.isfinite(p) & (y > 0) & (p > 0)
            y, p = y[good], p[good]
            if len(y) > 2000:
                idx = np.random.default_rng(0).choice(len(y), 2000, replace=False)
                y, p = y[idx], p[idx]
            if len(y):
                ax.scatter(y, p, s=3, alpha=0.35, label=str(run)[-34:])
                lo, hi = min(lo, y.min(), p.min()), max(hi, y.max(), p.max())
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"measured {m.upper()} (ms)")
        ax.set_ylabel(f"predicted {m.upper()} (ms)")
        ax.set_title(f"{m.upper()} {title}".strip())
    axes[-1].legend(fontsize=6, markerscale=3, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def saturation_report(res: ReplayResult) -> dict:
    """How the replay handled an overloaded run: queue growth, predicted vs measured failures (timeouts)."""
    df = res.requests
    arr = (df["arrival_us"] - df["arrival_us"].min()) / 1e6
    ok_m = ~df["failed"].to_numpy(dtype=bool)
    ok_p = ~df["pred_failed"].to_numpy(dtype=bool)
    # TTFT by 100 s arrival window: the queue growth
    bins = np.arange(0, float(arr.max()) + 100.0, 100.0)
    growth = []
    for a, b in zip(bins[:-1], bins[1:]):
        k = (arr >= a) & (arr < b)
        mt = df.loc[k & ok_m, "ttft_us"].mean() / 1e6
        pt = df.loc[k & ok_p, "pred_ttft_us"].mean() / 1e6
        growth.append({"window_s": [float(a), float(b)], "measured_ttft_s": None if mt != mt else float(mt),
                       "predicted_ttft_s": None if pt != pt else float(pt),
                       "measured_failed": int((k & ~ok_m).sum()), "predicted_failed": int((k & ~ok_p).sum())})
    return {"requests": int(len(df)), "measured_failed": int((~ok_m).sum()), "predicted_failed": int((~ok_p).sum()),
            "both_failed": int((~ok_m & ~ok_p).sum()), "max_waiting": res.stats.get("max_waiting"),
            "aborted": res.stats.get("aborted"), "timeout_s": res.stats.get("timeout_s"), "ttft_by_window": growth}


# ---------------------------------------------------------------------------------------------------
# held-out replay error from the data store (the campaign's stop rule, flows/validate.py)


def as_coefficients(coefficients) -> Coefficients:
    """A :class:`Coefficients` from itself, a file path, a ``Calibration`` or a fit-result dict."""
    if isinstance(coefficients, Coefficients):
        return coefficients
    if isinstance(coefficients, (str, Path)):
        return load_coefficients(coefficients)
    if hasattr(coefficients, "to_dict"):
        coefficients = coefficients.to_dict()
    return coefficients_from_doc(coefficients, "coefficients")


def store_replay_error(store, coefficients, *, campaign: str | None = None, split: str | None = "validation",
                       runs=None, metric: str = "mean_ape") -> dict:
    """Replay the data store's runs (those of ``split``, or the ``runs`` given) with ``coefficients`` and
    report the held-out request-level error: per run :func:`compare`, and the median over runs of
    ``metric`` (default: APE of the run's mean) for TTFT, ITL and E2E (NaN when there is no such run).

    ``coefficients``: :class:`Coefficients`, a coefficients/fit file, a ``Calibration`` or its dict."""
    from rooflab.data.store import Store

    st = store if isinstance(store, Store) else Store(store)
    coefs = as_coefficients(coefficients)
    if runs is None:
        table = st.runs(campaign=campaign, split=split)
        runs = table["run_id"].tolist()
    per_run = {}
    for rid in runs:
        try:
            trace = read_store_trace(st, rid)
        except InputError as exc:
            per_run[rid] = {"error": str(exc)}
            continue
        per_run[rid] = compare(replay(trace, coefs))
    out = {"runs": per_run, "n_runs": sum(1 for v in per_run.values() if "error" not in v), "metric": metric}
    for m in METRICS:
        vals = [v[m][metric] for v in per_run.values() if "error" not in v and (v.get(m) or {}).get("n")]
        out[m] = float(np.median(vals)) if vals else float("nan")
    return out
