"""Request journeys of inference-sim's OTEL traces (``journey.*`` events of the ``llm_core`` spans) and what is
derived from them: the per-step entries a journey implies (:func:`reconstruct_steps`, for steps whose
snapshots are missing), the request table rows, and per-step aggregates of entries. The file reader is
:mod:`rooflab.data.adapters.otel`; its docstring states the rules (phase, clocks, statuses)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from rooflab.data.tables import aggregate_entries, validate_requests, with_cache_hits

JOURNEY_NAMES = ("QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED")
_RANK = {n: i for i, n in enumerate(JOURNEY_NAMES)}
_FINISH_TO_STATUS = {"stopped": "ok", "stop": "ok", "length": "ok", "aborted": "aborted", "abort": "aborted",
                     "error": "error", "ignored": "ignored"}
AGGREGATE_COLUMNS = ("prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits",
             "decode_reqs", "decode_context", "prefill_cached_tokens")


@dataclass
class OtelTables:
    steps: pd.DataFrame
    requests: pd.DataFrame
    report: dict = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class JourneyEvent:
    """One ``journey.*`` event of a request, parsed (name without the ``journey.`` prefix)."""

    name: str
    ts_ns: int
    step: int | None
    prefill_done: int = 0
    prefill_total: int = 0
    decode_done: int = 0
    decode_max: int = 0
    num_preemptions: int = 0
    schedule_kind: str = ""
    finish_status: str = ""


@dataclass
class Reconstruction:
    """Output of :func:`reconstruct_steps`: per-(step, request) entries and what could not be used."""

    entries: pd.DataFrame  # step_id, request_id, phase, tokens, context_before, prompt_tokens
    preempted: dict[int, int]  # step id -> PREEMPTED events
    skipped: dict[str, int]  # reason -> requests left out of the reconstruction
    inconsistent: dict[str, int]  # reason -> segments whose token counts did not add up


def journey_sort_key(e: JourneyEvent) -> tuple[int, int, int]:
    return (e.ts_ns, -1 if e.step is None else e.step, _RANK.get(e.name, 9))


def entry_phase(prompt: ArrayLike, computed: ArrayLike, output: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised phase rule (see the module docstring): returns (is_decode, effective prompt)."""
    p = np.asarray(prompt, dtype=np.float64)
    c = np.asarray(computed, dtype=np.float64)
    o = np.asarray(output, dtype=np.float64)
    is_decode = (o > 0) & (c >= p + o - 1)
    return is_decode, p + o


def reconstruct_steps(journeys: Mapping[str, Sequence[JourneyEvent]],
                      max_num_batched_tokens: int | None) -> Reconstruction:
    """Teacher-forced batch membership from journey events (docs/spec.md §2).

    Each request is active from its SCHEDULED step: its first prefill runs through the FIRST_TOKEN step,
    then it decodes one token per step through FINISHED (inclusive) or to the step before a PREEMPTED
    (preemption by recompute: the request is not in the batch of the step that preempts it). A RESUME with
    ``d`` output tokens recomputes prompt + d tokens from context 0; the number of recompute steps follows
    from the output tokens made by the segment's end (one per decode step, plus one by the last recompute
    chunk). A prefill that spans one step gets its exact tokens; a multi-step one is distributed greedily in
    step order: in each step, after one token per decode and the known tokens of single-step prefills and
    last chunks, the other active prefills in order of joining the batch take what the
    ``max_num_batched_tokens`` budget leaves (at least 1 token, keeping 1 per remaining step); a segment's
    last step takes its remainder. Without a budget the tokens are split evenly. Prefix-cache hits are
    not visible in journeys and are assumed absent.
    """
    skipped: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    preempted: Counter[int] = Counter()
    dec: list[tuple[str, int, int, int, int]] = []  # rid, start, end, out0, prompt
    pf: list[list] = []  # [rid, start, end, need|None, prompt_eff, join_key, done]

    for rid, evs in journeys.items():
        evs = sorted(evs, key=journey_sort_key)
        if not any(e.name == "SCHEDULED" for e in evs):
            skipped["never scheduled"] += 1
            continue
        if any(e.step is None for e in evs if e.name != "QUEUED"):
            skipped["journey event without scheduler.step"] += 1
            continue
        prompt = max((e.prefill_total for e in evs), default=0)
        state = None  # None | "prefill" | "decode" | "resume"
        start = 0
        join = (0, 0)
        done0 = 0
        d_r = 0
        out0 = 0
        ok = True
        local_dec: list[tuple[str, int, int, int, int]] = []
        local_pf: list[list] = []

        def close_resume(end_step: int, d_end: int) -> None:
            length = end_step - start + 1
            if length < 1:
                return
            produced = d_end - d_r
            if produced >= 1:
                l_rc, need = length - (produced - 1), prompt + d_r
            else:
                l_rc, need = length, None
            if l_rc < 1:
                bad["resume: more output tokens than active steps"] += 1
                l_rc = 1
            local_pf.append([rid, start, start + l_rc - 1, need, prompt + d_r, join, 0])
            if start + l_rc <= end_step:
                local_dec.append((rid, start + l_rc, end_step, d_r + 1, prompt))

        for e in evs:
            if e.name == "QUEUED":
                continue
            step = e.step
            assert step is not None  # checked above: every event but QUEUED has a scheduler step
            if e.name == "PREEMPTED":
                preempted[step] += 1
            if e.name == "SCHEDULED":
                if state is not None:
                    ok = False
                    break
                start, join = step, (step, e.ts_ns)
                if e.decode_done > 0:
                    state, d_r = "resume", e.decode_done
                else:
                    state, done0 = "prefill", e.prefill_done
            elif e.name == "FIRST_TOKEN":
                if state != "prefill" or step < start:
                    ok = False
                    break
                local_pf.append([rid, start, step, prompt, prompt, join, 0])
                state, start, out0 = "decode", step + 1, max(1, e.decode_done)
            elif e.name in ("PREEMPTED", "FINISHED"):
                end = step - 1 if e.name == "PREEMPTED" else step
                if state == "prefill":
                    if end >= start:
                        # recompute restarts at 0: the tokens done in this segment are the high-water mark
                        # if it rose (or this is the first segment); otherwise unknown
                        rose = e.prefill_done > done0 or done0 == 0
                        need = e.prefill_done if rose and e.prefill_done > 0 else None
                        local_pf.append([rid, start, end, need, prompt, join, 0])
                elif state == "decode":
                    if end >= start:
                        local_dec.append((rid, start, end, out0, prompt))
                        if e.decode_done != out0 + (end - start) + 1:
                            bad["decode tokens != active decode steps"] += 1
                elif state == "resume":
                    close_resume(end, e.decode_done)
                state = None
                if e.name == "FINISHED":
                    break
        if not ok:
            skipped["inconsistent journey order"] += 1
            continue
        if state is not None:  # still running at the end of the trace: unknown end, leave it out
            skipped["no FINISHED (still active)"] += 1
            continue
        dec.extend(local_dec)
        pf.extend(local_pf)

    # decode entries, vectorised
    frames = []
    if dec:
        d_rid = np.array([d[0] for d in dec], dtype=object)
        d_start = np.array([d[1] for d in dec], dtype=np.int64)
        d_end = np.array([d[2] for d in dec], dtype=np.int64)
        d_out0 = np.array([d[3] for d in dec], dtype=np.int64)
        d_prompt = np.array([d[4] for d in dec], dtype=np.int64)
        lens = d_end - d_start + 1
        seg = np.repeat(np.arange(len(dec)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        steps = d_start[seg] + offs
        frames.append(pd.DataFrame({
            "step_id": steps, "request_id": d_rid[seg], "phase": "decode", "tokens": 1.0,
            "context_before": (d_prompt[seg] + d_out0[seg] - 1 + offs).astype(np.float64),
            "prompt_tokens": d_prompt[seg].astype(np.float64)}))
        lo, hi = int(steps.min()), int(steps.max())
        n_dec = np.bincount(steps - lo, minlength=hi - lo + 1)
    else:
        lo, n_dec = 0, np.zeros(0, dtype=np.int64)

    def decodes_at(step: int) -> int:
        i = step - lo
        return int(n_dec[i]) if 0 <= i < len(n_dec) else 0

    # prefill entries, step by step in order of joining the batch
    by_step: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(pf):
        for st in range(s[1], s[2] + 1):
            by_step[st].append(i)
    rows = []
    for st in sorted(by_step):
        budget = None if max_num_batched_tokens is None else int(max_num_batched_tokens) - decodes_at(st)
        fixed: list[int] = []
        greedy: list[int] = []
        for i in sorted(by_step[st], key=lambda j: (pf[j][5], pf[j][0])):
            need, s1, done = pf[i][3], pf[i][2], pf[i][6]
            # a single-step prefill or the last chunk of one has known tokens; a non-last chunk stopped at
            # the budget, so it takes what the known ones and the decodes leave, in order of joining
            (fixed if need is not None and s1 == st else greedy).append(i)
        for i in fixed:
            tok = pf[i][3] - pf[i][6]
            if budget is not None:
                budget -= tok
            if tok > 0:
                rows.append((st, pf[i][0], tok, pf[i][6], pf[i][4]))
                pf[i][6] += tok
            elif tok < 0:
                bad["prefill tokens < active prefill steps"] += 1
        for i in greedy:
            rid, s0, s1, need, p_eff, _, done = pf[i]
            after = s1 - st
            if need is not None:
                remaining = need - done
                if budget is None:
                    tok = -(-remaining // (after + 1))
                else:
                    tok = min(max(budget, 1), remaining - after)
                if tok < 1:
                    bad["prefill tokens < active prefill steps"] += 1
                    tok = 1 if remaining > 0 else 0
            else:
                if budget is None:
                    bad["unknown prefill tokens without a budget"] += 1
                    continue
                tok = max(budget, 1)
            if tok <= 0:
                continue
            rows.append((st, rid, tok, done, p_eff))
            pf[i][6] = done + tok
            if budget is not None:
                budget -= tok
    if rows:
        frames.append(pd.DataFrame({
            "step_id": np.array([r[0] for r in rows], dtype=np.int64),
            "request_id": np.array([r[1] for r in rows], dtype=object), "phase": "prefill",
            "tokens": np.array([r[2] for r in rows], dtype=np.float64),
            "context_before": np.array([r[3] for r in rows], dtype=np.float64),
            "prompt_tokens": np.array([r[4] for r in rows], dtype=np.float64)}))
    if frames:
        entries = pd.concat(frames, ignore_index=True).sort_values(["step_id", "phase"], kind="stable")
    else:
        entries = pd.DataFrame({"step_id": np.array([], dtype=np.int64), "request_id": [], "phase": [],
                                "tokens": [], "context_before": [], "prompt_tokens": []})
    return Reconstruction(entries.reset_index(drop=True), dict(preempted), dict(skipped), dict(bad))


def request_rows(journeys: Mapping[str, Sequence[JourneyEvent]], api: Mapping[str, Mapping[str, int]],
                  require_api: bool, run_id: str) -> tuple[list[dict], Counter[str]]:
    rows: list[dict] = []
    excluded: Counter[str] = Counter()
    for rid in list(journeys) + [r for r in api if r not in journeys]:
        evs = sorted(journeys.get(rid, ()), key=journey_sort_key)
        a = api.get(rid, {})
        first: dict[str, JourneyEvent] = {}
        for e in evs:
            first.setdefault(e.name, e)
        fin = first.get("FINISHED")
        if fin is None and "DEPARTED" not in a and "ABORTED" not in a:
            excluded["incomplete: no FINISHED/DEPARTED/ABORTED"] += 1
            continue
        finish = fin.finish_status if fin is not None else ""
        if "ABORTED" in a:
            status = "aborted"
        elif fin is not None:
            status = _FINISH_TO_STATUS.get(finish, "ok" if not finish else finish)
        else:
            status = "ok"
        ts = {"arrived_us": a.get("ARRIVED"), "queued_us": first["QUEUED"].ts_ns if "QUEUED" in first else None,
              "scheduled_us": first["SCHEDULED"].ts_ns if "SCHEDULED" in first else None,
              "first_token_us": first["FIRST_TOKEN"].ts_ns if "FIRST_TOKEN" in first else None,
              "finished_us": fin.ts_ns if fin is not None else None, "departed_us": a.get("DEPARTED"),
              "aborted_us": a.get("ABORTED")}
        if status == "ok":
            need = ["QUEUED", "SCHEDULED", "FIRST_TOKEN", "FINISHED"]
            missing = [f"journey.{n}" for n in need if n not in first]
            if require_api:
                missing += [f"api.{n}" for n in ("ARRIVED", "DEPARTED") if n not in a]
            if missing:
                excluded[f"missing {missing[0]}"] += 1
                continue
            chain = [v for v in (ts[k] for k in ("arrived_us", "queued_us", "scheduled_us", "first_token_us",
                                                 "finished_us", "departed_us")) if v is not None]
            s_sched, s_first, s_fin = (first[n].step for n in ("SCHEDULED", "FIRST_TOKEN", "FINISHED"))
            if (any(b < x for x, b in zip(chain, chain[1:])) or s_sched is None or s_first is None
                    or s_fin is None or not s_sched <= s_first <= s_fin):
                excluded["events out of lifecycle order"] += 1
                continue
        elif not evs and not a:
            excluded["no events"] += 1
            continue
        prompt = max((e.prefill_total for e in evs), default=None)
        out = fin.decode_done if fin is not None else max((e.decode_done for e in evs), default=None)
        n_pre = sum(1 for e in evs if e.name == "PREEMPTED")
        if evs:
            n_pre = max(n_pre, max(e.num_preemptions for e in evs))
        row: dict[str, object] = {"run_id": run_id, "request_id": rid}
        for k, v in ts.items():
            row[k] = np.nan if v is None else v / 1e3
        row.update(prompt_tokens=np.nan if prompt is None else float(prompt),
                   output_tokens=np.nan if out is None else float(out), preemptions=float(n_pre), status=status)
        rows.append(row)
    return rows, excluded


def requests_frame(rows: list[dict], source: str) -> pd.DataFrame:
    cols = ["run_id", "request_id", "arrived_us", "queued_us", "scheduled_us", "first_token_us", "finished_us",
            "departed_us", "prompt_tokens", "output_tokens", "preemptions", "status", "aborted_us"]
    df = pd.DataFrame(rows, columns=cols)
    return validate_requests(df, source)


def snapshot_entries(rows: Sequence[tuple], run_id: str) -> pd.DataFrame:
    """rows: (step_id, request_id, prompt, computed, output, scheduled) with scheduled > 0."""
    arr = np.array([r[2:] for r in rows], dtype=np.float64).reshape(-1, 4)
    is_dec, p_eff = entry_phase(arr[:, 0], arr[:, 1], arr[:, 2])
    return pd.DataFrame({"run_id": run_id, "step_id": np.array([r[0] for r in rows], dtype=np.int64),
                         "request_id": np.array([str(r[1]) for r in rows], dtype=object),
                         "phase": np.where(is_dec, "decode", "prefill"), "tokens": arr[:, 3],
                         "context_before": arr[:, 1], "prompt_tokens": p_eff})


def first_scheduled_steps(journeys: Mapping[str, Sequence[JourneyEvent]]) -> dict[str, int]:
    """Request id -> the step of its first SCHEDULED event (where vLLM counts its prefix-cache hits)."""
    out: dict[str, int] = {}
    for rid, evs in journeys.items():
        steps = [e.step for e in evs if e.name == "SCHEDULED" and e.step is not None]
        if steps:
            out[str(rid)] = min(steps)
    return out


def aggregate_by_step(entries: pd.DataFrame | None, run_id: str,
                      first_scheduled: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Per-step aggregates of ``entries``; with ``first_scheduled`` (request id -> step of its first scheduling)
    they count prefix-cache hits too (``prefill_cached_tokens``), else that column is NaN (unknown)."""
    if entries is None or len(entries) == 0:
        return pd.DataFrame(columns=list(AGGREGATE_COLUMNS), index=pd.Index([], dtype=np.int64, name="step_id"))
    e = entries if "run_id" in entries.columns else entries.assign(run_id=run_id)
    if first_scheduled is not None:
        e = with_cache_hits(e, first_scheduled)
    agg = aggregate_entries(e)
    return agg.drop(columns=["run_id"]).set_index("step_id")
