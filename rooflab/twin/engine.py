"""The twin's engine: a vLLM-v1-like scheduler over a paged KV cache.

Why this module is long: the scheduler has a general path and an O(1) "lazy" fast path for steady decode
steps; both must live on one class over one structure-of-arrays state, and tests/test_twin_engine.py
property-tests that they give the same steps.

Scheduling follows vLLM v1's ``Scheduler.schedule()``: running requests first, in order, each taking
``min(tokens it still needs, remaining token budget)`` (decodes need 1; a partially prefilled request
needs the rest of its prompt, so chunked prefill falls out naturally); when a running request cannot get
KV blocks, the most recently admitted running request is preempted (recompute: its blocks are freed, its
progress reset, it goes back to the front of the waiting queue). Then, if nothing was preempted, waiting
requests are admitted in arrival order while ``max_num_seqs``, the token budget and free blocks allow.
After the forward pass every request whose known tokens are all computed samples one token; it finishes
at ``max_tokens`` (``ignore_eos``), at its natural length (no ``ignore_eos``) or at ``max_model_len``.

The running set is kept as arrays (structure of arrays) so a step costs a few vector operations rather
than a Python loop over the batch; Python loops run only on the rare paths (preemption, admission).

Step time comes from a *step timer*: the hidden truth model (``rooflab.twin.truth``) for the twin, or a
fitted model when rooflab predicts a candidate's batches (targeting, replay). The engine never reads
the truth's constants.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rooflab.errors import InputError
from rooflab.model.arch import ModelArch
from rooflab.model.engine_config import EngineConfig, kv_capacity_blocks
from rooflab.model.hardware import Hardware
from rooflab.twin import records as R


class StepTimer(Protocol):
    def step_time_us(self, decode_contexts: np.ndarray, prefills: list[tuple[int, int, int]], n_logits: int) -> float:
        """``prefills``: (tokens this step, tokens computed before, the request's full prompt) per prefill chunk."""
        ...

    def scheduler_cpu_us(self, n_requests: int) -> float: ...


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    arrival_us: float  # when the API server received it (api.ARRIVED)
    prompt_tokens: int
    max_tokens: int
    ignore_eos: bool = True
    natural_len: int | None = None  # output length at which the "model" emits EOS (ignore_eos off)
    prefix_group: str | None = None  # requests of one group share their first prefix_tokens tokens
    prefix_tokens: int = 0
    # lifecycle (µs on the engine clock), filled by the engine
    queued_us: float = math.nan
    scheduled_us: float = math.nan
    first_token_us: float = math.nan
    finished_us: float = math.nan
    departed_us: float = math.nan
    output_tokens: int = 0
    preemptions: int = 0
    status: str = ""  # "length" | "stop" | "abort" once finished
    token_times_us: list[float] = field(default_factory=list)


class _PrefixCache:
    """Block-level prefix cache: full blocks inside a request's shared prefix, keyed (group, index),
    reference counted; unreferenced cached blocks stay resident but evictable (count as free)."""

    def __init__(self) -> None:
        self.refs: dict[tuple, int] = {}
        self.evictable: dict[tuple, None] = {}  # insertion-ordered = LRU

    def hits(self, req: Request, block_size: int) -> int:
        if not req.prefix_group:
            return 0
        limit = min(req.prefix_tokens, req.prompt_tokens - 1) // block_size
        n = 0
        while n < limit and (req.prefix_group, n) in self.refs:
            n += 1
        return n

    def acquire(self, req: Request, n: int) -> int:
        """Reference the first n cached blocks; returns how many were evictable (no longer free)."""
        revived = 0
        for i in range(n):
            key = (req.prefix_group, i)
            if self.refs[key] == 0:
                self.evictable.pop(key, None)
                revived += 1
            self.refs[key] += 1
        return revived

    def register(self, req: Request, computed: int, block_size: int, held: int) -> int:
        """Full blocks of the shared prefix this request has computed become cacheable: ownership moves
        from the request to the cache (the request keeps a reference). Registration stays contiguous from
        block 0; a block another request registered first stays the request's own. Returns the new
        number of held (referenced) prefix blocks."""
        if not req.prefix_group:
            return held
        full = min(computed, req.prefix_tokens) // block_size
        while held < full and (req.prefix_group, held) not in self.refs:
            self.refs[(req.prefix_group, held)] = 1
            held += 1
        return held

    def release(self, req: Request, held: int) -> int:
        """Drop the request's references to its first ``held`` prefix blocks; returns how many are now
        unreferenced (resident, evictable — they count as free)."""
        unreferenced = 0
        for i in range(held):
            key = (req.prefix_group, i)
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.evictable[key] = None
                unreferenced += 1
        return unreferenced

    def evict(self, n: int) -> int:
        done = 0
        while done < n and self.evictable:
            key = next(iter(self.evictable))
            del self.evictable[key]
            del self.refs[key]
            done += 1
        return done


@dataclass
class StepOutcome:
    step_id: int
    duration_us: float
    tokens: list[tuple[Request, bool]]  # (request, finished) for every request that produced a token this step
    finished: list[Request]  # requests that finished this step
    preempted: list[Request]
    record: R.StepRecord | None = None
    # rooflab.twin.simulate.AGGREGATES: (prefill_reqs, prefill_tokens, prefill_context, attn_pairs, logits_pf,
    # decode_reqs, decode_context, kv_usage, preemptions, running, waiting, prefill_prompt_pairs,
    # prefill_cached_tokens)
    aggregates: tuple[float, ...] | None = None


class Engine:
    """One simulated vLLM engine (one model at one TP degree on one GPU type)."""

    def __init__(self, arch: ModelArch, hardware: Hardware, tp: int, timer: StepTimer,
                 config: EngineConfig = EngineConfig(), *, record_steps: bool = False, seed: int = 0):
        self.arch, self.hardware, self.tp, self.timer, self.config = arch, hardware, tp, timer, config
        self.record_steps = record_steps
        self.rng = np.random.default_rng(seed)
        self.num_blocks = kv_capacity_blocks(arch, hardware, tp, config)
        self.max_model_len = config.max_model_len or arch.max_model_len or 4096
        if math.ceil(self.max_model_len / config.block_size) > self.num_blocks:
            self.max_model_len = self.num_blocks * config.block_size  # vLLM refuses; we cap and say so
        self.free_blocks = self.num_blocks
        self.prefix = _PrefixCache() if config.enable_prefix_caching else None
        self.step_cached = 0.0  # prefix-cache hits of the requests admitted in the current step
        self.waiting: deque[Request] = deque()
        cap = config.max_num_seqs
        self.reqs: list[Request] = []  # running, in scheduling order
        # float64 arrays (token counts are exact far beyond any context length; no casts on the hot path)
        self.computed = np.zeros(cap)  # tokens in the KV cache
        self.total = np.zeros(cap)  # prompt + output tokens known so far
        self.prompt = np.zeros(cap)
        self.out = np.zeros(cap)  # output tokens so far
        self.stop_at = np.zeros(cap)  # output count at which the request finishes
        self.emit_tokens = False  # server mode: report every produced token (StepOutcome.tokens)
        self.lazy = True  # use the O(1) path for common steps (tests turn it off to check equivalence)
        # lazy decode clock: while every running request decodes and nobody waits, a step advances all
        # of them by one token; arrays are brought up to date (``_materialize``) only when needed
        self.lag = 0
        self.fast_ready = False
        self.residues = [0] * config.block_size  # running requests by computed % block_size
        self.finish_lag = 0  # lag at which the first running request finishes
        self.ctx_sum = 0.0  # Σ computed over running requests (at lag 0)
        self.blocks = np.zeros(cap)  # KV blocks held
        self.prefix_held = np.zeros(cap)  # of which shared prefix blocks (prefix caching)
        self.step_id = 0
        self.finished_since_last_step = 0  # the fork's batch.num_finished: finishes since the previous step
        self.events: list[R.RequestEvent] = []  # journey events, drained by the caller (traces)

    # -------------------------------------------------------------------------------------------
    @property
    def n_running(self) -> int:
        return len(self.reqs)

    @property
    def has_work(self) -> bool:
        return bool(self.reqs) or bool(self.waiting)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks

    def check_request(self, req: Request) -> None:
        """vLLM's admission checks (the server maps these to HTTP 400)."""
        if req.prompt_tokens < 1:
            raise InputError(None, "prompt", "the prompt must contain at least one token")
        if req.prompt_tokens + req.max_tokens > self.max_model_len:
            raise InputError(None, "max_tokens", f"This model's maximum context length is {self.max_model_len} "
                             f"tokens. However, you requested {req.prompt_tokens + req.max_tokens} tokens "
                             f"({req.prompt_tokens} in the messages, {req.max_tokens} in the completion).")

    def add_request(self, req: Request, now_us: float) -> None:
        self.check_request(req)
        req.queued_us = now_us
        self.waiting.append(req)
        self.events.append(R.RequestEvent(req.request_id, R.QUEUED, int(now_us * 1000), None, req.prompt_tokens,
                                          max_tokens=req.max_tokens))

    def abort(self, request_id: str, now_us: float) -> bool:
        self._materialize()
        for k, r in enumerate(self.reqs):
            if r.request_id == request_id:
                r.output_tokens = int(self.out[k])
                self._free(k)
                self._remove([k])
                self._finish(r, now_us, "abort")
                return True
        for r in list(self.waiting):
            if r.request_id == request_id:
                self.waiting.remove(r)
                self._finish(r, now_us, "abort")
                return True
        return False

    # -------------------------------------------------------------------------------------------
    def _free(self, k: int) -> None:
        req = self.reqs[k]
        held = int(self.prefix_held[k])
        own = int(self.blocks[k]) - held
        if self.prefix is not None:
            cached = self.prefix.release(req, held)
            self.free_blocks += cached  # resident but evictable: counts as free
        self.free_blocks += own

    def _take_blocks(self, n: int) -> bool:
        if n > self.free_blocks:
            return False
        if self.prefix is not None:  # free capacity may be evictable cache: evict what we use
            truly_free = self.free_blocks - len(self.prefix.evictable)
            if n > truly_free:
                self.prefix.evict(n - truly_free)
        self.free_blocks -= n
        return True

    def _remove(self, idx: list[int]) -> None:
        """Remove running requests at ``idx`` (ascending), keeping the order of the others."""
        n = len(self.reqs)
        arrays = (self.computed, self.total, self.prompt, self.out, self.stop_at, self.blocks, self.prefix_held)
        for k in reversed(idx):
            if k < n - 1:
                for a in arrays:
                    a[k:n - 1] = a[k + 1:n]
            del self.reqs[k]
            n -= 1

    def _preempt_last(self, now_us: float) -> Request:
        k = len(self.reqs) - 1
        req = self.reqs[k]
        req.output_tokens = int(self.out[k])
        computed_before = int(self.computed[k])  # the fork reports progress from before the reset
        self._free(k)
        self.reqs.pop()
        req.preemptions += 1
        self.waiting.appendleft(req)
        self.events.append(R.RequestEvent(req.request_id, R.PREEMPTED, int(now_us * 1000), self.step_id,
                                          req.prompt_tokens, req.output_tokens, computed_before, req.preemptions))
        return req

    def _finish(self, req: Request, now_us: float, status: str) -> None:
        req.finished_us = now_us
        req.status = status
        self.events.append(R.RequestEvent(req.request_id, R.FINISHED, int(now_us * 1000), self.step_id,
                                          req.prompt_tokens, req.output_tokens, req.prompt_tokens + req.output_tokens,
                                          req.preemptions, finish_status=status))

    # -------------------------------------------------------------------------------------------
    def _schedule(self, now_us: float) -> tuple[np.ndarray, list[Request]]:
        """Decide this step's tokens per running request (after admissions); returns (scheduled, preempted)."""
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        preempted: list[Request] = []
        n = len(self.reqs)
        sched = np.zeros(n)
        if n:
            need = np.minimum(self.total[:n] - self.computed[:n], self.max_model_len - self.computed[:n])
            csum = np.cumsum(need)
            if csum[-1] <= budget:
                sched[:] = need
            else:
                prev = np.concatenate(([0], csum[:-1]))
                sched[:] = np.clip(np.minimum(need, budget - prev), 0, None)
            new_blocks = np.maximum(-(-(self.computed[:n] + sched) // bs) - self.blocks[:n], 0)
            total_new = int(new_blocks.sum())
            if self._take_blocks(total_new):
                self.blocks[:n] += new_blocks
            else:  # not enough KV: vLLM's sequential allocate-or-preempt loop
                sched, preempted = self._schedule_running_slow(need, now_us)
            budget -= int(sched.sum())
        if not preempted:
            sched = self._admit(sched, budget, now_us)
        return sched, preempted

    def _schedule_running_slow(self, need: np.ndarray, now_us: float) -> tuple[np.ndarray, list[Request]]:
        bs = self.config.block_size
        budget = self.config.max_num_batched_tokens
        preempted: list[Request] = []
        sched_list: list[int] = []
        k = 0
        while k < len(self.reqs):
            want = int(min(need[k], budget))
            if want <= 0:
                sched_list.append(0)
                k += 1
                continue
            blocks_needed = max(-(-(int(self.computed[k]) + want) // bs) - int(self.blocks[k]), 0)
            while not self._take_blocks(blocks_needed):
                victim = self._preempt_last(now_us)
                preempted.append(victim)
                if k >= len(self.reqs):  # preempted itself
                    break
            else:
                self.blocks[k] += blocks_needed
                sched_list.append(want)
                budget -= want
                k += 1
                continue
            break
        return np.array(sched_list, np.float64), preempted

    def _admit(self, sched: np.ndarray, budget: int, now_us: float) -> np.ndarray:
        cfg = self.config
        bs = cfg.block_size
        added = []
        while self.waiting and budget > 0 and len(self.reqs) < cfg.max_num_seqs:
            req = self.waiting[0]
            tokens = req.prompt_tokens + req.output_tokens  # a preempted request recomputes its outputs too
            hits = self.prefix.hits(req, bs) if self.prefix is not None else 0
            computed = hits * bs
            want = min(tokens - computed, budget)
            own_blocks = -(-(computed + want) // bs) - hits
            revived = self.prefix.acquire(req, hits) if hits and self.prefix is not None else 0
            self.free_blocks -= revived
            if not self._take_blocks(own_blocks):
                if hits and self.prefix is not None:
                    self.free_blocks += self.prefix.release(req, hits)
                break
            self.waiting.popleft()
            k = len(self.reqs)
            self.reqs.append(req)
            self.computed[k], self.total[k], self.prompt[k] = computed, tokens, req.prompt_tokens
            stop = (req.max_tokens if (req.ignore_eos or req.natural_len is None)
                    else min(req.max_tokens, req.natural_len))
            self.out[k], self.stop_at[k] = req.output_tokens, stop
            self.blocks[k], self.prefix_held[k] = own_blocks + hits, hits
            added.append(want)
            budget -= want
            first = math.isnan(req.scheduled_us)
            if first:
                req.scheduled_us = now_us
                self.step_cached += computed  # prompt tokens served from the prefix cache (vLLM's num_cached_tokens)
            self.events.append(R.RequestEvent(req.request_id, R.SCHEDULED, int(now_us * 1000), self.step_id,
                                              req.prompt_tokens, req.output_tokens, computed, req.preemptions,
                                              schedule_kind="FIRST" if first else "RESUME"))
        if added:
            sched = np.concatenate((sched, np.array(added, np.float64)))
        return sched

    # -------------------------------------------------------------------------------------------
    def _materialize(self, keep_fast: bool = False) -> None:
        """Apply the decode-clock lag to the arrays (every running request decoded ``lag`` times).
        With ``keep_fast`` the O(1) bookkeeping is shifted to lag 0 instead of being dropped."""
        L = self.lag
        if L:
            n = len(self.reqs)
            c0 = self.computed[:n]
            bs = self.config.block_size
            c0 += L
            # between steps a request holds exactly the blocks its computed tokens fill (shared prefix
            # blocks included), so the lazily allocated ones need no separate bookkeeping
            np.ceil(c0 / bs, out=self.blocks[:n])
            self.total[:n] += L
            self.out[:n] += L
            self.lag = 0
            if keep_fast:
                r = self.residues
                self.residues = [r[(i - L) % bs] for i in range(bs)]
                self.ctx_sum += n * L
                self.finish_lag -= L
        if not keep_fast:
            self.fast_ready = False

    def _prepare_fast(self) -> bool:
        """Check that every running request decodes and set up the O(1) bookkeeping."""
        n = len(self.reqs)
        c = self.computed[:n]
        # decoding = exactly one token to compute AND past the prompt (a prefill's 1-token last chunk is not)
        if n > self.config.max_num_batched_tokens or np.any(self.total[:n] - c != 1) or np.any(c < self.prompt[:n]):
            return False
        bs = self.config.block_size
        self.residues = np.bincount((c % bs).astype(np.int64), minlength=bs).tolist()
        self.finish_lag = (int(min((self.stop_at[:n] - self.out[:n]).min(),
                                   (self.max_model_len - self.total[:n]).min()))
                           if n else 1 << 60)
        self.ctx_sum = float(c.sum())
        self.fast_ready = True
        return True

    def _lazy_step(self, now_us: float) -> StepOutcome | None:
        """The common step in O(1 + admitted + finished) Python: every running request decodes; waiting
        requests are admitted whole (prompt within the budget, blocks free); requests that finish are
        removed. Anything else (chunking, preemption, prefix caching) returns None: the general path."""
        cfg = self.config
        L = self.lag
        bs = cfg.block_size
        n = len(self.reqs)
        budget = cfg.max_num_batched_tokens - n
        need_blocks = self.residues[(-L) % bs]  # decoders whose next token opens a new block
        free = self.free_blocks
        new: list[tuple[Request, int, int]] = []
        if self.waiting:
            if self.prefix is not None:
                return None
            for req in self.waiting:
                if n + len(new) >= cfg.max_num_seqs:
                    break
                tokens = req.prompt_tokens + req.output_tokens
                nb = -(-tokens // bs)
                if tokens > budget or need_blocks + nb > free:
                    # the general path may admit a chunk of it: leave the whole step to it
                    if budget > 0:
                        return None
                    break
                need_blocks += nb
                budget -= tokens
                new.append((req, tokens, nb))
        if need_blocks > free:
            return None
        self.free_blocks = free - need_blocks
        for _ in new:
            self.waiting.popleft()
        contexts = self.computed[:n] + L
        if new:
            prefills = [(t, 0, r.prompt_tokens) for r, t, _ in new]
            pf_tok = float(sum(t for _, t, _ in new))
            pairs = float(sum(t * (t + 1) / 2 for _, t, _ in new))
            prompt_pairs = float(sum(t * (r.prompt_tokens + t / 2) for r, t, _ in new))
        else:
            prefills, pf_tok, pairs, prompt_pairs = [], 0.0, 0.0, 0.0
        duration = float(self.timer.step_time_us(contexts, prefills, n + len(new)))
        aggregates = (float(len(new)), pf_tok, 0.0, pairs, float(len(new)), float(n), self.ctx_sum + n * L,
                      1.0 - self.free_blocks / self.num_blocks, 0.0, float(n + len(new)), float(len(self.waiting)),
                      prompt_pairs, 0.0)
        end = now_us + duration
        L1 = L + 1
        self.lag = L1
        for req, tokens, nb in new:
            k = len(self.reqs)
            self.reqs.append(req)
            stop = (req.max_tokens if (req.ignore_eos or req.natural_len is None)
                    else min(req.max_tokens, req.natural_len))
            out_after = req.output_tokens + 1
            c0 = tokens - L1  # stored so that stored + lag == true value
            self.computed[k], self.total[k], self.out[k] = c0, tokens + 1 - L1, out_after - L1
            self.prompt[k], self.stop_at[k], self.prefix_held[k] = req.prompt_tokens, stop, 0
            self.blocks[k] = nb
            self.residues[int(c0 % bs)] += 1
            self.ctx_sum += c0
            self.finish_lag = min(self.finish_lag, stop - (out_after - L1), self.max_model_len - (tokens + 1 - L1))
            first = math.isnan(req.scheduled_us)
            if first:
                req.scheduled_us = now_us
            self.events.append(R.RequestEvent(req.request_id, R.SCHEDULED, int(now_us * 1000), self.step_id,
                                              req.prompt_tokens, req.output_tokens, 0, req.preemptions,
                                              schedule_kind="FIRST" if first else "RESUME"))
            if math.isnan(req.first_token_us):
                req.first_token_us = end
                self.events.append(R.RequestEvent(req.request_id, R.FIRST_TOKEN, int(end * 1000), self.step_id,
                                                  req.prompt_tokens, 1, tokens, req.preemptions))
        finished = []
        if L1 >= self.finish_lag:
            self._materialize(keep_fast=True)
            m = len(self.reqs)
            done = (self.out[:m] >= self.stop_at[:m]) | (self.total[:m] >= self.max_model_len)
            idx = np.flatnonzero(done).tolist()
            for k in idx:
                req = self.reqs[k]
                req.output_tokens = int(self.out[k])
                finished.append(req)
                self._finish(req, end, "length" if (req.output_tokens >= req.max_tokens or req.ignore_eos
                                                    or self.total[k] >= self.max_model_len) else "stop")
                self._free(k)
                c = self.computed[k]
                self.residues[int(c % bs)] -= 1
                self.ctx_sum -= c
            self._remove(idx)
            m = len(self.reqs)
            self.finish_lag = (int(min((self.stop_at[:m] - self.out[:m]).min(),
                                       (self.max_model_len - self.total[:m]).min())) if m else 1 << 60)
        self.finished_since_last_step = len(finished)
        out = StepOutcome(self.step_id, duration, [], finished, [], None, aggregates)
        self.step_id += 1
        return out

    def _decode_only_step(self, now_us: float) -> StepOutcome | None:
        """The common steady state — every running request decodes, nobody waits: the same decisions as
        the general path in a handful of vector operations. None if the KV cache cannot grow."""
        n = len(self.reqs)
        computed = self.computed[:n]
        grow = (computed % self.config.block_size) == 0  # the new token starts a new block
        n_new = int(np.count_nonzero(grow))
        if not self._take_blocks(n_new):
            return None
        self.blocks[:n] += grow
        duration = float(self.timer.step_time_us(computed.astype(np.float64), [], n))
        aggregates = (0.0, 0.0, 0.0, 0.0, 0.0, float(n), float(computed.sum()), self.kv_usage, 0.0, float(n), 0.0, 0.0,
                      0.0)
        end = now_us + duration
        computed += 1
        self.total[:n] += 1
        out_n = self.out[:n]
        out_n += 1
        done = (out_n >= self.stop_at[:n]) | (self.total[:n] >= self.max_model_len)
        finished, tokens = [], []
        if self.emit_tokens:
            for k, req in enumerate(self.reqs):
                req.output_tokens = int(out_n[k])
                req.token_times_us.append(end)
                tokens.append((req, bool(done[k])))
        if done.any():
            finished_idx = np.flatnonzero(done).tolist()
            for k in finished_idx:
                req = self.reqs[k]
                req.output_tokens = int(out_n[k])
                finished.append(req)
                self._finish(req, end, "length" if (req.output_tokens >= req.max_tokens or req.ignore_eos
                                                    or self.total[k] >= self.max_model_len) else "stop")
                self._free(k)
            self._remove(finished_idx)
        self.finished_since_last_step = len(finished)
        out = StepOutcome(self.step_id, duration, tokens, finished, [], None, aggregates)
        self.step_id += 1
        return out

    def step(self, now_us: float) -> StepOutcome | None:
        """Run one scheduler step starting at ``now_us``; None when there is nothing to schedule."""
        if not self.has_work:
            return None
        n = len(self.reqs)
        if self.lazy and not self.record_steps and not self.emit_tokens:
            if self.fast_ready or self._prepare_fast():
                out = self._lazy_step(now_us)
                if out is not None:
                    return out
        self._materialize()
        if (not self.waiting and not self.record_steps and 0 < n <= self.config.max_num_batched_tokens
                and not np.any(self.total[:n] - self.computed[:n] != 1)
                and not np.any(self.computed[:n] < self.prompt[:n])):
            out = self._decode_only_step(now_us)
            if out is not None:
                return out
        self.step_cached = 0.0
        sched, preempted = self._schedule(now_us)
        n = len(self.reqs)
        active = sched > 0
        if not active.any():
            if preempted or self.waiting:
                # nothing fits at all (a single request larger than the cache): abort the head
                req = self.waiting.popleft()
                self._finish(req, now_us, "abort")
                return StepOutcome(self.step_id, 0.0, [], [req], preempted)
            return None
        computed = self.computed[:n]
        total = self.total[:n]
        # a decode computes the one token sampled last step; everything else (prompt chunks, recompute of a
        # preempted request) is prefill work
        is_dec = (sched == 1) & (computed == total - 1) & (computed >= self.prompt[:n]) & active
        is_pf = active & ~is_dec
        completes = active & (computed + sched == total)
        dec_ctx = computed[is_dec].astype(np.float64)
        pf_idx = np.flatnonzero(is_pf)
        prefills = [(int(sched[k]), int(computed[k]), int(self.prompt[k])) for k in pf_idx]
        n_logits = int(completes.sum())
        n_sched = int(active.sum())
        duration = float(self.timer.step_time_us(dec_ctx, prefills, n_logits))

        pf_tok = float(sched[is_pf].sum())
        pf_ctx = float(computed[is_pf].sum())
        s_pf = sched[is_pf].astype(np.float64)
        pairs = float((s_pf * computed[is_pf] + s_pf * (s_pf + 1) / 2).sum())
        prompt_pairs = float((s_pf * (self.prompt[:n][is_pf] + s_pf / 2)).sum())
        logits_pf = float((completes & is_pf).sum())
        running_depth = n
        aggregates = (float(len(pf_idx)), pf_tok, pf_ctx, pairs, logits_pf, float(is_dec.sum()), float(dec_ctx.sum()),
                      self.kv_usage, float(len(preempted)), float(running_depth), float(len(self.waiting)),
                      prompt_pairs, self.step_cached)

        record = None
        if self.record_steps:
            entries = [R.StepEntry(self.reqs[k].request_id, "DECODE" if is_dec[k] else "PREFILL",
                                   self.reqs[k].prompt_tokens, int(computed[k]), int(self.out[k]), int(sched[k]))
                       for k in np.flatnonzero(active)]
            cpu = self.timer.scheduler_cpu_us(n_sched)
            record = R.StepRecord(self.step_id, int(now_us * 1000), int((now_us + cpu) * 1000), int(cpu),
                                  running_depth, len(self.waiting), len(pf_idx), int(is_dec.sum()),
                                  int(sched.sum()), int(pf_tok), int(is_dec.sum()), self.finished_since_last_step,
                                  len(preempted),
                                  self.kv_usage, self.num_blocks, self.free_blocks, entries,
                                  [r.request_id for r in preempted])

        # the forward pass: KV now holds the scheduled tokens; completed requests sample one token
        end = now_us + duration
        self.computed[:n] += sched
        if self.prefix is not None:
            for k in pf_idx:
                self.prefix_held[k] = self.prefix.register(self.reqs[k], int(self.computed[k]),
                                                           self.config.block_size, int(self.prefix_held[k]))
        self.out[:n] += completes
        self.total[:n] += completes
        out_n = self.out[:n]
        for k in np.flatnonzero(completes & (out_n == 1)):
            req = self.reqs[k]
            if math.isnan(req.first_token_us):
                req.first_token_us = end
                self.events.append(R.RequestEvent(req.request_id, R.FIRST_TOKEN, int(end * 1000), self.step_id,
                                                  req.prompt_tokens, 1, int(self.computed[k]), req.preemptions))
        done = completes & ((out_n >= self.stop_at[:n]) | (self.total[:n] >= self.max_model_len))
        finished_idx = np.flatnonzero(done).tolist()
        finished = []
        for i in finished_idx:
            req = self.reqs[i]
            req.output_tokens = int(out_n[i])
            status = "length" if (req.output_tokens >= req.max_tokens or req.ignore_eos
                                  or self.total[i] >= self.max_model_len) else "stop"
            finished.append(req)
            self._finish(req, end, status)
        tokens = []
        if self.emit_tokens:
            for k in np.flatnonzero(completes):
                req = self.reqs[k]
                req.output_tokens = int(out_n[k])
                req.token_times_us.append(end)
                tokens.append((req, bool(done[k])))
        if finished_idx:
            for i in finished_idx:
                self._free(i)
            self._remove(finished_idx)
        self.finished_since_last_step = len(finished)
        out = StepOutcome(self.step_id, duration, tokens, finished, preempted, record, aggregates)
        self.step_id += 1
        return out

    def drain_events(self) -> list[R.RequestEvent]:
        ev, self.events = self.events, []
        return ev
