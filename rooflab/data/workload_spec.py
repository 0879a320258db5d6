"""Workload specs of the sim-to-real kit (:class:`WorkloadSpec`) and the request streams they produce, in two
modes (``/work/notes/s2r.md`` §0, §3; ``/work/notes/blis.md`` §8; kit README trap 2):

``mode="inference-perf"`` — what the pinned inference-perf (e8e0aa99) actually sent:

* 100 prompts = ``num_groups`` × ``num_prompts_per_group`` (10 × 10; the requested ``num_unique_system_prompts``
  / ``num_users_per_system_prompt`` / multi-turn keys were silently dropped), each = one group's system text +
  its own question, shuffled once; request *n* of every stage gets prompt ``n % 100`` (round-robin over the fixed
  permutation, restarting in each stage), so every exact prompt recurs every 100 requests;
* token counts: random ids are decoded and re-encoded, which grows them, and the tokenizer adds BOS. Over the 16
  runs of ``../real/`` (Llama-2 / CodeLlama / Mixtral tokenizers) ``(prompt − 1) / (system + question)`` is
  1.039–1.050 (mean 1.0453) with a per-prompt sd of ~1 %: defaults ``token_growth=1.045``, ``bos_tokens=1``,
  ``length_spread=0.012`` (per part, giving ~1 % per prompt). ``token_growth=1, bos_tokens=0, length_spread=0``
  gives the requested lengths exactly. Unknown for the Llama-3.1 / Qwen3 tokenizers (no request data);
* per stage ``N = int(rate × duration)`` arrivals, i.i.d. exponential gaps rescaled to sum exactly to the duration
  (ConstantLoadTimer): the last request is sent at stage start + duration;
* output length = ``output_len`` exactly (``ignore_eos``; the client-side shortfall is a re-tokenisation
  artifact, notes §0.3); client timeout 300 s (aiohttp default; failed requests are excluded from the metrics);
* prefix caching: each distinct prompt is its own ``prefix_group`` covering the whole prompt; the system part
  shared by the 10 prompts of a group is ``system_group`` / ``system_tokens`` (BOS + system − 1 token, the last
  one may merge with the separator);
* stages run strictly one after another: stage k+1 starts when every stage-k request has finished, + the 1 s
  ``interval`` + the 1 s start offset (``stage_gap_s`` = 2). That depends on completion times, which an open-loop
  trace cannot know, so stage k+1 is placed ``drain_allowance_s`` (default: the 300 s client timeout, the longest
  any request can live) + ``stage_gap_s`` after stage k's last send. A simulated engine has no time-dependent
  state while idle, so this gives the same per-request results as the real drain-then-start as long as stage k
  has drained within the allowance, which the timeout guarantees. A replay that wants the real timeline can
  re-time the stages with :func:`retime_stages` from its own drain times (every row has ``stage_offset_us``).

``mode="blis"`` — what BLIS (inference-sim f90a1e3a, ``sim/workload/inference_perf.go``) generates from the same
spec: ``num_unique_system_prompts × num_users_per_system_prompt`` clients per stage, a group's clients sharing a
``system_prompt_len`` prefix, a fresh ``question_len`` question per request, exact lengths (no growth, no BOS).
Single stage: per-client normalized-exponential gaps summing to the duration; several stages: each stage's
clients are Poisson at ``rate / N`` in their window ``[Σ previous durations, + duration)``. With
``enable_multi_turn_chat`` (all 15 trainval specs) every client is one closed-loop session of its even share of
``int(rate × duration)`` rounds: round 0 at window start + one Poisson gap (``rate / N``), round r+1 at round r's
completion + ``think_time_us = int(N / rate × 1e6)``; session requests carry the 300 s deadline. Only round 0's time
is known up front: later rounds get an estimate (previous + think time + ``round_latency_s``, default BLIS's own
open-loop guess of 1 µs per output token) and ``depends_on`` / ``think_time_us`` so a replay can release them
closed-loop. Not implemented: bit-parity with BLIS's Go RNG streams (same structure and distributions, other
draws), context accumulation (not used by these specs), ``horizon`` cut-offs, per-client timeouts other than the
default, cohorts / multimodal / non-inference-perf specs.

What a replay must do to honour these streams exactly (``rooflab.replay`` runs them open-loop today):
release stage k+1 at stage k's last departure + ``stage_gap_s`` (inference-perf mode; or accept the
timeout-sized allowance), release closed-loop rounds at the previous round's departure + ``think_time_us`` and drop
a session's remaining rounds once one of them times out (blis mode), and key the first ``system_tokens`` of a
prompt's blocks by ``system_group`` (two-level prefix sharing; the engine keys a request's blocks by one group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from rooflab.data.traces import Trace
from rooflab.errors import InputError

if TYPE_CHECKING:
    from rooflab.data.s2r import Experiment

MODES = ("inference-perf", "blis")
TOKEN_GROWTH = 1.045  # mean (prompt − BOS) / requested over the 16 runs of ../real/ (1.039–1.050)
BOS_TOKENS = 1
LENGTH_SPREAD = 0.012  # relative sd of each decoded part's growth (→ ~1 % per prompt, as measured)
CLIENT_TIMEOUT_S = 300.0  # aiohttp's default ClientTimeout(total=300) (inference-perf request_timeout: null)
START_OFFSET_S = 1.0  # run_stage: start_time = perf_counter() + 1
IPERF_GROUPS, IPERF_PROMPTS_PER_GROUP = 10, 10  # SharedPrefix defaults of the pinned inference-perf
BLIS_SESSION_TIMEOUT_S = 300.0  # generator.go DefaultTimeoutUs, session (multi-turn) requests only
COLUMNS = ("request_id", "arrival_us", "stage", "stage_offset_us", "prompt_tokens", "output_tokens", "prefix_group",
           "prefix_tokens", "system_group", "system_tokens", "prompt_slot", "client_id", "session_id", "round",
           "think_time_us", "depends_on", "closed_loop")


class Stage(NamedTuple):
    rate: float  # requests/s
    duration_s: float


@dataclass(frozen=True)
class SharedPrefix:
    """``shared_prefix`` as requested (and, where public, the groups the pinned inference-perf executed)."""

    system_prompt_len: int
    question_len: int
    output_len: int
    num_unique_system_prompts: int | None = None
    num_users_per_system_prompt: int | None = None
    enable_multi_turn_chat: bool = False
    num_groups: int | None = None  # inference-perf's own keys (executed config; e8e0aa99 defaults 10 × 10)
    num_prompts_per_group: int | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    """The workload of one experiment: stages, shared-prefix shape, seed (BLIS's, not the client's)."""

    stages: tuple[Stage, ...]
    shared_prefix: SharedPrefix
    label: str | None = None
    seed: int | None = None
    num_requests: int | None = None  # BLIS spec's num_requests, else the kit's expected_num_requests
    load_type: str = "constant"
    load_interval_s: float = 1.0  # inference-perf's sleep between stages (LoadConfig.interval)
    profile_shape: str = "profile"  # "profile" (profile.yaml) | "preset" (tektonc preset) | "blis" (iter29 spec)

    @property
    def requests_per_stage(self) -> tuple[int, ...]:
        """``int(rate × duration)`` per stage, as inference-perf's ConstantLoadTimer counts them."""
        return tuple(int(s.rate * s.duration_s) for s in self.stages)


@dataclass(frozen=True)
class WorkloadStream:
    """Requests (:data:`COLUMNS`, arrival order) and how they must be replayed."""

    mode: str
    requests: pd.DataFrame
    timeout_s: float | None  # client timeout: abort at arrival + timeout, exclude from the metrics
    stage_gap_s: float | None  # inference-perf: idle time between stage k draining and stage k+1 starting
    drain_allowance_s: float | None  # what the open-loop placement assumes for stage k to drain
    notes: tuple[str, ...] = ()


def _frame(rows: Mapping[str, list], order: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame({c: np.asarray(rows[c], dtype=object if c in ("depends_on",) else None)[order]
                       for c in COLUMNS if c != "request_id"})
    df.insert(0, "request_id", [f"request_{i}" for i in range(len(df))])
    return df


def inference_perf_stream(spec: WorkloadSpec, *, seed: int = 0, token_growth: float = TOKEN_GROWTH,
                          bos_tokens: int = BOS_TOKENS, length_spread: float = LENGTH_SPREAD,
                          timeout_s: float = CLIENT_TIMEOUT_S,
                          drain_allowance_s: float | None = None) -> WorkloadStream:
    """The stream the pinned inference-perf sent for ``spec`` (module docstring); ``seed`` draws one of the
    (unseeded, unrecorded) client randomisations: prompt lengths, the permutation and the arrival gaps."""
    sp = spec.shared_prefix
    groups, per = sp.num_groups or IPERF_GROUPS, sp.num_prompts_per_group or IPERF_PROMPTS_PER_GROUP
    if token_growth <= 0 or length_spread < 0 or bos_tokens < 0:
        raise InputError(None, "token_growth", "token_growth must be > 0, length_spread and bos_tokens >= 0")
    rng = np.random.default_rng(seed)
    n_prompts = groups * per

    def grown(n_tokens: int, count: int) -> np.ndarray:  # decode → re-encode growth, per decoded part
        return np.maximum(np.rint(n_tokens * token_growth * (1 + length_spread * rng.standard_normal(count))), 0)

    sys_len, q_len = grown(sp.system_prompt_len, groups), grown(sp.question_len, n_prompts)
    group_of = np.arange(n_prompts) // per
    prompt_len = (bos_tokens + sys_len[group_of] + q_len).astype(int)
    perm = rng.permutation(n_prompts)  # prompts[k] is built prompt perm[k]
    gap = spec.load_interval_s + START_OFFSET_S
    allowance = timeout_s if drain_allowance_s is None else drain_allowance_s
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    start = 0.0
    for k, (rate, dur) in enumerate(spec.stages):
        n = int(rate * dur)
        gaps = rng.exponential(1.0 / rate, n)
        offsets = np.cumsum(gaps * (dur / gaps.sum())) if n else np.zeros(0)
        slot = perm[np.arange(n) % n_prompts]
        cols["arrival_us"] += list((start + offsets) * 1e6)
        cols["stage"] += [k] * n
        cols["stage_offset_us"] += list(offsets * 1e6)
        cols["prompt_tokens"] += list(prompt_len[slot])
        cols["prefix_group"] += [f"ip-p{s}" for s in slot]
        cols["prefix_tokens"] += list(prompt_len[slot])
        cols["system_group"] += [f"ip-g{g}" for g in group_of[slot]]
        cols["system_tokens"] += list(np.maximum(bos_tokens + sys_len[group_of[slot]] - 1, 0).astype(int))
        cols["prompt_slot"] += list(np.arange(n) % n_prompts)
        start += dur + allowance + gap
    m = len(cols["stage"])
    cols.update(output_tokens=[sp.output_len] * m, client_id=[""] * m, session_id=[""] * m, round=[0] * m,
                think_time_us=[0.0] * m, depends_on=[None] * m, closed_loop=[False] * m)
    order = np.argsort(np.asarray(cols["arrival_us"]), kind="stable")
    notes = (f"inference-perf e8e0aa99: {groups}x{per} prompts round-robin per stage, token_growth {token_growth:g}, "
             f"BOS {bos_tokens}; stage k+1 placed {allowance:g}+{gap:g} s after stage k's last send",)
    return WorkloadStream("inference-perf", _frame(cols, order), timeout_s, gap, allowance, notes)


def distribute_evenly(total: int, n: int) -> list[int]:
    """BLIS's ``distributeRequestsEvenly``: floor share each, the first ``total % n`` clients one more."""
    base, rem = divmod(total, n)
    return [base + (1 if i < rem else 0) for i in range(n)]


def _poisson_gap_us(rng: np.random.Generator, rate_per_us: float) -> int:
    return max(1, int(rng.exponential() / rate_per_us))  # PoissonSampler: int64(ExpFloat64/rate), min 1


def blis_stream(spec: WorkloadSpec, *, seed: int | None = None, round_latency_s: float | None = None) -> WorkloadStream:
    """The stream BLIS generates from ``spec`` (module docstring). ``seed`` defaults to the spec's (42)."""
    sp = spec.shared_prefix
    if not sp.num_unique_system_prompts or not sp.num_users_per_system_prompt:
        raise InputError(None, "shared_prefix", "blis mode needs num_unique_system_prompts and "
                         "num_users_per_system_prompt (> 0)")
    n_clients = sp.num_unique_system_prompts * sp.num_users_per_system_prompt
    multi = len(spec.stages) > 1
    seeds = np.random.SeedSequence(spec.seed if seed is None else seed).spawn(len(spec.stages) * n_clients)
    prompt = sp.system_prompt_len + sp.question_len
    cols: dict[str, list] = {c: [] for c in COLUMNS}

    def add(t_us: float, k: int, win0: float, p: int, client: str, sess: str, rnd: int, think: float) -> None:
        for c, v in (("arrival_us", t_us), ("stage", k), ("stage_offset_us", t_us - win0), ("client_id", client),
                     ("session_id", sess), ("round", rnd), ("think_time_us", think), ("prefix_group", f"prompt-{p}"),
                     ("system_group", f"prompt-{p}")):
            cols[c].append(v)

    win0 = 0.0
    for k, (rate, dur) in enumerate(spec.stages):
        win1, total = win0 + dur * 1e6, int(rate * dur)
        if total < 1:
            raise InputError(None, f"stages[{k}]", f"rate {rate:g} x duration {dur:g} gives no request")
        share = distribute_evenly(total, n_clients)
        think = float(int(n_clients / rate * 1e6))
        for c in range(n_clients):
            rng = np.random.default_rng(seeds[k * n_clients + c])
            p, u = divmod(c, sp.num_users_per_system_prompt)
            client = f"stage-{k}-prompt-{p}-user-{u}" if multi else f"prompt-{p}-user-{u}"
            if sp.enable_multi_turn_chat:  # one closed-loop session per client
                t = win0 + _poisson_gap_us(rng, rate / n_clients / 1e6)
                if multi and t >= win1:
                    continue  # BLIS drops a session whose start falls outside its window
                latency = sp.output_len if round_latency_s is None else round_latency_s * 1e6
                for r in range(share[c]):
                    add(t, k, win0, p, client, f"{client}/s", r, think)
                    t += think + latency
            elif not multi:  # normalized exponential gaps summing to the duration (int µs, min 1)
                raw = rng.exponential(size=share[c])
                gaps = np.maximum(np.floor(raw * (dur * 1e6 / raw.sum())), 1.0)
                for t in np.cumsum(gaps):
                    add(float(t), k, win0, p, client, "", 0, 0.0)
            else:  # Poisson at rate/N from t = 0, kept inside the stage's window
                t = 0.0
                while True:
                    t += _poisson_gap_us(rng, rate / n_clients / 1e6)
                    if t >= win1:
                        break
                    if t >= win0:
                        add(t, k, win0, p, client, "", 0, 0.0)
        win0 = win1
    m = len(cols["stage"])
    arrival = np.asarray(cols["arrival_us"], dtype=float)
    order = np.argsort(arrival, kind="stable")
    if not sp.enable_multi_turn_chat and spec.num_requests and m > spec.num_requests:
        order = order[: spec.num_requests]  # merge-sort then truncate to num_requests
    cols.update(prompt_tokens=[prompt] * m, output_tokens=[sp.output_len] * m, prefix_tokens=[sp.system_prompt_len] * m,
                system_tokens=[sp.system_prompt_len] * m, prompt_slot=[-1] * m,
                closed_loop=[sp.enable_multi_turn_chat] * m, depends_on=[None] * m)
    df = _frame(cols, order)
    if sp.enable_multi_turn_chat:  # each round waits for the previous round of its session
        prev = df.sort_values(["session_id", "round"]).groupby("session_id")["request_id"].shift(1)
        df["depends_on"] = prev.reindex(df.index).astype(object).where(prev.notna(), None)
    loop = "closed-loop sessions (follow-up arrivals are estimates)" if sp.enable_multi_turn_chat else "open loop"
    notes = (f"BLIS inference_perf expansion: {n_clients} clients/stage, {loop}",)
    return WorkloadStream("blis", df, BLIS_SESSION_TIMEOUT_S if sp.enable_multi_turn_chat else None, None, None, notes)


def generate(spec: WorkloadSpec, mode: str = "inference-perf", **options: float | int | None) -> WorkloadStream:
    """The request stream of ``spec`` in ``mode`` (:data:`MODES`); ``options`` go to :func:`inference_perf_stream`
    or :func:`blis_stream`."""
    if mode == "inference-perf":
        return inference_perf_stream(spec, **options)  # type: ignore[arg-type]
    if mode == "blis":
        return blis_stream(spec, **options)  # type: ignore[arg-type]
    raise InputError(None, "mode", f"expected one of {', '.join(MODES)}, got {mode!r}")


def retime_stages(requests: pd.DataFrame, drain_end_us: Sequence[float], stage_gap_s: float) -> pd.DataFrame:
    """Re-time stages 1.. to start ``stage_gap_s`` after the previous stage drained: ``drain_end_us[k]`` is when
    stage k's last request finished (e.g. from a replay of stages 0..k)."""
    out = requests.copy()
    for k in range(1, int(out["stage"].max()) + 1):
        if k - 1 >= len(drain_end_us):
            raise InputError(None, "drain_end_us", f"no drain time for stage {k - 1}")
        mask = out["stage"] == k
        out.loc[mask, "arrival_us"] = drain_end_us[k - 1] + stage_gap_s * 1e6 + out.loc[mask, "stage_offset_us"]
    return out.sort_values("arrival_us", kind="stable").reset_index(drop=True)


def to_trace(stream: WorkloadStream, experiment: Experiment, *, run_id: str | None = None) -> Trace:
    """A replayable :class:`~rooflab.data.traces.Trace` (no measurements) of ``experiment`` under its engine."""
    r = stream.requests.copy()
    r["prompt_tokens"] = r["prompt_tokens"].astype(float)
    r["output_tokens"] = r["output_tokens"].astype(float)
    r["prefix_tokens"] = r["prefix_tokens"].astype(float)
    r["failed"] = False
    for c in ("ttft_us", "e2e_us", "itl_us"):
        r[c] = np.nan
    notes = list(stream.notes) + [f"s2r exp {experiment.key}: workload generated ({stream.mode} mode), not measured"]
    return Trace(run_id or f"s2r-{experiment.key}-{stream.mode}", experiment.model_name, experiment.tp,
                 experiment.hardware, experiment.engine.engine_dict(), r, stream.timeout_s, experiment.workload.label,
                 experiment.split, f"{experiment.model_config.parents[2] / 'experiments.json'}#{experiment.key}", notes,
                 stage_gap_s=stream.stage_gap_s)


def experiment_trace(experiment: Experiment, mode: str = "inference-perf", **options: float | int | None) -> Trace:
    """:func:`generate` + :func:`to_trace` for one kit experiment."""
    return to_trace(generate(experiment.workload, mode, **options), experiment)
