"""The hooks: wrappers around vLLM 0.32's v1 scheduler (engine-core process) and AsyncLLM / OpenAI handlers
(API-server process). See FORMAT.md for the lines they write.

Scheduler facts these wrappers rely on (vLLM 0.32.0, ``vllm/v1/core/sched/scheduler.py``):

* ``schedule()`` ends with ``_update_after_schedule``, which advances ``request.num_computed_tokens`` by the
  tokens scheduled this step: the context before the step is ``num_computed_tokens − num_scheduled_tokens``.
* Preemption (``_preempt_request``) happens inside ``schedule()``; its ids are in
  ``SchedulerOutput.preempted_req_ids``; a preempted request restarts from ``num_computed_tokens = 0``.
* ``update_from_output(scheduler_output, model_runner_output)`` appends the sampled tokens, stops finished
  requests and frees them (they leave ``self.requests``); ``finish_requests`` handles aborts from outside.
* ``EngineCore.step`` is schedule → execute_model (→ sample_tokens) → update_from_output; with a batch
  queue (async scheduling, pipeline parallel) schedules and updates interleave, so a step is matched to its
  update by the ``SchedulerOutput`` object itself, not by order.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import threading
import time

from vllm_steplog import SCHEMA, __version__

_installed = False
_lock = threading.Lock()
_writer = None
_http_arrival: contextvars.ContextVar[int | None] = contextvars.ContextVar("steplog_http_arrival", default=None)
# internal engine request id -> external (user-visible) id, filled where EngineCoreRequest becomes Request
_external_ids: dict[str, str] = {}


class _Writer:
    """Appends whole lines with one os.write each (O_APPEND): safe across processes sharing the file."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None
        self.pid = None

    def write(self, obj: dict) -> None:
        pid = os.getpid()
        if self.fd is None or self.pid != pid:  # opened lazily, and again in a forked child
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.pid = pid
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        n = os.write(self.fd, data)
        if n != len(data):  # a short write to a regular file means the disk is full: say so, loudly
            raise OSError(f"vllm-steplog: short write to {self.path} ({n} of {len(data)} bytes)")


def _now() -> int:
    return time.monotonic_ns()


def _wall_to_mono_ns(wall_s: float | None) -> int | None:
    if wall_s is None:
        return None
    return int(round(wall_s * 1e9 - time.time_ns() + time.monotonic_ns()))


def install(path: str, version: str) -> None:
    global _installed, _writer
    with _lock:
        if _installed:
            return
        _writer = _Writer(path)
        _patch_scheduler(version)
        _patch_api(version)
        _installed = True


# ==================================================================================== engine core (scheduler)
class _Req:
    __slots__ = ("request", "running", "first_token", "preemptions")

    def __init__(self, request):
        self.request = request
        self.running = False
        self.first_token = False
        self.preemptions = 0


class _State:
    def __init__(self):
        self.step = 0
        self.reqs: dict[str, _Req] = {}
        self.pending: dict[int, tuple] = {}  # id(SchedulerOutput) -> (output, record)


def _state(sched) -> _State:
    st = getattr(sched, "_steplog_state", None)
    if st is None:
        st = _State()
        sched._steplog_state = st
    return st


def _finish_status(request) -> str:
    name = str(getattr(request.status, "name", request.status))
    return {"FINISHED_STOPPED": "stopped", "FINISHED_LENGTH_CAPPED": "length", "FINISHED_ABORTED": "aborted",
            "FINISHED_IGNORED": "ignored", "FINISHED_ERROR": "error",
            "FINISHED_REPETITION": "repetition"}.get(name, name.lower())


def _engine_start(sched, version: str) -> None:
    cfg = getattr(sched, "vllm_config", None)
    sc = getattr(sched, "scheduler_config", None)
    cc = getattr(sched, "cache_config", None)
    mc = getattr(cfg, "model_config", None) if cfg is not None else None
    pc = getattr(sched, "parallel_config", None)
    line = {"kind": "engine", "schema": SCHEMA, "plugin": __version__, "vllm": version, "pid": os.getpid(),
            "t_ns": _now(), "wall_ns": time.time_ns(), "clock": "CLOCK_MONOTONIC",
            "max_num_batched_tokens": getattr(sc, "max_num_batched_tokens", None),
            "max_num_seqs": getattr(sc, "max_num_seqs", None),
            "max_model_len": getattr(mc, "max_model_len", None) or getattr(sc, "max_model_len", None),
            "async_scheduling": bool(getattr(sc, "async_scheduling", False)),
            "chunked_prefill": getattr(sc, "enable_chunked_prefill", None),
            "block_size": getattr(cc, "block_size", None), "num_gpu_blocks": getattr(cc, "num_gpu_blocks", None),
            "prefix_caching": getattr(cc, "enable_prefix_caching", None),
            "model": getattr(mc, "served_model_name", None) or getattr(mc, "model", None),
            "tp": getattr(pc, "tensor_parallel_size", None), "dp_rank": getattr(pc, "data_parallel_rank", None)}
    if isinstance(line["model"], (list, tuple)):
        line["model"] = line["model"][0] if line["model"] else None
    _writer.write(line)


def _patch_scheduler(version: str) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    if getattr(Scheduler, "_steplog_patched", False):
        return
    for name in ("schedule", "update_from_output", "add_request", "finish_requests", "__init__"):
        if not callable(getattr(Scheduler, name, None)):
            from vllm_steplog import UnsupportedVLLMVersion

            raise UnsupportedVLLMVersion(f"vllm-steplog: vLLM {version} has no Scheduler.{name}")

    orig_from_ecr = Request.from_engine_core_request.__func__

    @classmethod
    @functools.wraps(orig_from_ecr)
    def from_engine_core_request(cls, request, *args, **kwargs):
        req = orig_from_ecr(cls, request, *args, **kwargs)
        ext = getattr(request, "external_req_id", None)
        if ext:
            _external_ids[req.request_id] = ext
        return req

    Request.from_engine_core_request = from_engine_core_request

    orig_init = Scheduler.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        _state(self)
        _engine_start(self, version)

    orig_add = Scheduler.add_request

    @functools.wraps(orig_add)
    def add_request(self, request):
        st = _state(self)
        new = request.request_id not in self.requests
        orig_add(self, request)
        if not new:  # a streaming-input continuation of a known request
            return
        rid = request.request_id
        st.reqs[rid] = _Req(request)
        sp = getattr(request, "sampling_params", None)
        _writer.write({"kind": "req", "ev": "queued", "id": rid, "ext": _external_ids.pop(rid, None), "t_ns": _now(),
                       "arrival_ns": _wall_to_mono_ns(getattr(request, "arrival_time", None)),
                       "prompt": int(request.num_prompt_tokens),
                       "max_tokens": getattr(sp, "max_tokens", None) if sp is not None else None})

    orig_schedule = Scheduler.schedule

    @functools.wraps(orig_schedule)
    def schedule(self, *args, **kwargs):
        st = _state(self)
        t0 = _now()
        out = orig_schedule(self, *args, **kwargs)
        t1 = _now()
        step = st.step
        st.step += 1
        prefill, decode, events = [], [], []
        for rid in getattr(out, "preempted_req_ids", None) or ():
            r = st.reqs.get(rid)
            n_out = r.request.num_output_tokens if r is not None else None
            if r is not None:
                r.running = False
                r.preemptions += 1
            events.append({"kind": "req", "ev": "preempted", "id": rid, "t_ns": t1, "step": step, "out": n_out})
        for rid, n in out.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None:
                continue
            before = int(request.num_computed_tokens) - int(n)
            n_tok = int(request.num_tokens)
            if request.num_output_tokens > 0 and before >= n_tok - 1:
                decode.append([rid, before])
            else:  # a prompt chunk, or the recompute of a preempted request (prompt + outputs from context 0)
                prefill.append([rid, int(n), before, n_tok])
            r = st.reqs.get(rid)
            if r is None:  # added before the plugin saw it (should not happen): track from here
                r = st.reqs[rid] = _Req(request)
            if not r.running:
                r.running = True
                events.append({"kind": "req", "ev": "scheduled", "id": rid, "t_ns": t1, "step": step,
                               "resume": r.preemptions > 0, "computed": before})
        running, waiting = self.get_request_counts()
        record = {"kind": "step", "step": step, "pid": os.getpid(), "t0_ns": t0, "t_sched_ns": t1,
                  "tokens": int(out.total_num_scheduled_tokens), "prefill": prefill, "decode": decode,
                  "kv": round(float(self.get_kv_cache_usage()), 6),
                  "preempted": [e["id"] for e in events if e["ev"] == "preempted"],
                  "running": int(running), "waiting": int(waiting)}
        st.pending[id(out)] = (out, record)
        for e in events:
            _writer.write(e)
        return out

    orig_update = Scheduler.update_from_output

    @functools.wraps(orig_update)
    def update_from_output(self, scheduler_output, model_runner_output):
        st = _state(self)
        t2 = _now()
        res = orig_update(self, scheduler_output, model_runner_output)
        t3 = _now()
        pend = st.pending.pop(id(scheduler_output), None)
        step = pend[1]["step"] if pend is not None else None
        n_fin = 0
        for rid in scheduler_output.num_scheduled_tokens:
            r = st.reqs.get(rid)
            if r is None:
                continue
            request = r.request
            if not r.first_token and request.num_output_tokens > 0:
                r.first_token = True
                _writer.write({"kind": "req", "ev": "first_token", "id": rid, "t_ns": t3, "step": step})
            if request.is_finished():
                n_fin += 1
                _finished(st, rid, r, t3, step)
        if pend is not None:
            record = pend[1]
            record.update(t_upd_ns=t2, t1_ns=t3, finished=n_fin)
            _writer.write(record)
        return res

    orig_finish = Scheduler.finish_requests

    @functools.wraps(orig_finish)
    def finish_requests(self, request_ids, finished_status):
        st = _state(self)
        done = orig_finish(self, request_ids, finished_status)
        t = _now()
        for request in done or ():
            r = st.reqs.get(request.request_id)
            if r is not None:
                _finished(st, request.request_id, r, t, None)
        return done

    Scheduler.__init__ = __init__
    Scheduler.add_request = add_request
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
    Scheduler.finish_requests = finish_requests
    Scheduler._steplog_patched = True


def _finished(st: _State, rid: str, r: _Req, t_ns: int, step) -> None:
    request = r.request
    st.reqs.pop(rid, None)
    _writer.write({"kind": "req", "ev": "finished", "id": rid, "t_ns": t_ns, "step": step,
                   "status": _finish_status(request), "prompt": int(request.num_prompt_tokens),
                   "out": int(request.num_output_tokens), "preemptions": int(getattr(request, "num_preemptions",
                                                                                      r.preemptions))})


# ==================================================================================== API server
async def _generate(inner, ext):
    status = "ok"
    try:
        async for out in inner:
            yield out
    except BaseException as exc:  # the client went away (cancelled / generator closed) or an engine error
        status = "aborted" if isinstance(exc, GeneratorExit) or type(exc).__name__ == "CancelledError" else "error"
        raise
    finally:
        t = _now()
        try:
            await inner.aclose()  # a consumer that closed us must close vLLM's generator too (it aborts the request)
        finally:
            _writer.write({"kind": "api", "ev": "departed", "ext": ext, "t_ns": t, "status": status})


def _patch_api(version: str) -> None:
    """AsyncLLM.generate (arrived, departed) and the OpenAI handlers' entry time (arrived = HTTP handler entry,
    before tokenization). Applied in the process that builds the API server only: other processes never
    construct an AsyncLLM, so the import is skipped there unless vLLM already loaded the module."""
    import sys

    if "vllm.v1.engine.async_llm" not in sys.modules and not any(m.startswith("vllm.entrypoints") for m in sys.modules):
        return
    from vllm.v1.engine.async_llm import AsyncLLM

    if getattr(AsyncLLM, "_steplog_patched", False):
        return
    orig_generate = AsyncLLM.generate
    sig = inspect.signature(orig_generate)

    @functools.wraps(orig_generate)
    def generate(self, *args, **kwargs):
        # a plain function returning the async generator: the HTTP handler's entry time (a context variable)
        # is read here, while the handler is running, not at the first iteration (which may happen later, in
        # the streaming response's task)
        try:
            ext = sig.bind(self, *args, **kwargs).arguments.get("request_id")
        except TypeError:
            ext = kwargs.get("request_id")
        t_http = _http_arrival.get()
        t = _now()
        _writer.write({"kind": "api", "ev": "arrived", "ext": ext, "t_ns": t_http if t_http is not None else t,
                       "t_generate_ns": t})
        return _generate(orig_generate(self, *args, **kwargs), ext)

    AsyncLLM.generate = generate
    AsyncLLM._steplog_patched = True

    for mod, cls, meth in (("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion",
                            "create_completion"),
                           ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat",
                            "create_chat_completion")):
        try:
            klass = getattr(__import__(mod, fromlist=[cls]), cls)
        except (ImportError, AttributeError):
            continue  # then "arrived" is the AsyncLLM.generate entry (after tokenization)
        orig = getattr(klass, meth)

        def make(orig):
            @functools.wraps(orig)
            async def handler(self, *args, **kwargs):
                token = _http_arrival.set(_now())
                try:
                    return await orig(self, *args, **kwargs)
                finally:
                    _http_arrival.reset(token)

            return handler

        setattr(klass, meth, make(orig))
