"""vllm-steplog (issue 8), fast: the adapter on synthetic plugin output and malformed lines, the plugin's hooks
against a stand-in for vLLM 0.32's scheduler, its version guard, and the stock-vLLM endpoint profile."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from rooflab.collect.launchers.endpoints import vllm_command
from rooflab.collect.spec import parse_campaign
from rooflab.data.adapters.inference_perf import response_request_id
from rooflab.data.adapters.steplog import (
    base_request_id,
    client_requests,
    match_client_requests,
    read_steplog,
)
from rooflab.errors import InputError

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "vllm_steplog"
MS = 1_000_000  # ns


# ------------------------------------------------------------------------------------------ synthetic log
def _log(tmp_path: Path, lines: list[dict], tail: bytes = b"") -> Path:
    p = tmp_path / "steplog.jsonl"
    p.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines) + tail)
    return p


def _engine():
    return {"kind": "engine", "schema": 1, "plugin": "0.1.0", "vllm": "0.32.0", "pid": 7, "t_ns": 0,
            "max_num_batched_tokens": 8, "max_num_seqs": 4, "block_size": 16, "num_gpu_blocks": 10}


def _step(k, t0, dur, prefill=(), decode=(), preempted=(), running=1, waiting=0, finished=0):
    tokens = sum(e[1] for e in prefill) + len(decode)
    return {"kind": "step", "step": k, "pid": 7, "t0_ns": t0, "t_sched_ns": t0 + 100_000, "t_upd_ns": t0 + dur - 50_000,
            "t1_ns": t0 + dur, "tokens": tokens, "prefill": [list(e) for e in prefill],
            "decode": [list(e) for e in decode], "kv": 0.5, "preempted": list(preempted), "running": running,
            "waiting": waiting, "finished": finished}


def _req(ev, rid, t, **kw):
    return {"kind": "req", "ev": ev, "id": rid, "t_ns": t, **kw}


def _api(ev, ext, t, **kw):
    return {"kind": "api", "ev": ev, "ext": ext, "t_ns": t, **kw}


def synthetic() -> list[dict]:
    """Two requests (prompt 10, 3 outputs) under an 8-token budget: A is chunked (8 + 2), B's prompt rides
    beside A's decodes; B is preempted once at step 3 and recomputed (prompt 10 + 1 output) from context 0."""
    a, b = "cmpl-A-0-11111111", "cmpl-req-b-0-22222222"
    L = [_engine(),
         _api("arrived", "cmpl-A-0", 1 * MS), _req("queued", a, 2 * MS, ext="cmpl-A-0", prompt=10, max_tokens=3),
         _api("arrived", "cmpl-req-b-0", 3 * MS),
         _req("queued", b, 4 * MS, ext="cmpl-req-b-0", prompt=10, max_tokens=3),
         _req("scheduled", a, 10 * MS, step=0, resume=False, computed=0),
         _step(0, 10 * MS, 5 * MS, prefill=[(a, 8, 0, 10)], running=1, waiting=1),
         _req("scheduled", b, 16 * MS, step=1, resume=False, computed=0),
         _step(1, 15 * MS, 5 * MS, prefill=[(a, 2, 8, 10), (b, 6, 0, 10)], running=2),
         _req("first_token", a, 20 * MS, step=1),
         _step(2, 20 * MS, 5 * MS, prefill=[(b, 4, 6, 10)], decode=[(a, 10)], running=2),
         _req("first_token", b, 25 * MS, step=2),
         _req("preempted", b, 26 * MS, step=3, out=1),
         _step(3, 25 * MS, 5 * MS, decode=[(a, 11)], preempted=[b], running=1, waiting=1, finished=1),
         _req("finished", a, 30 * MS, step=3, status="length", prompt=10, out=3, preemptions=0),
         _api("departed", "cmpl-A-0", 31 * MS, status="ok"),
         _req("scheduled", b, 31 * MS, step=4, resume=True, computed=0),
         _step(4, 30 * MS, 5 * MS, prefill=[(b, 8, 0, 11)], running=1),
         _step(5, 35 * MS, 5 * MS, prefill=[(b, 3, 8, 11)], running=1),
         _step(6, 40 * MS, 5 * MS, decode=[(b, 12)], running=1, finished=1),
         _req("finished", b, 45 * MS, step=6, status="length", prompt=10, out=3, preemptions=1),
         _step(7, 45 * MS, 1 * MS, running=0),  # the step after the last finish: nothing scheduled
         _api("departed", "cmpl-req-b-0", 46 * MS, status="ok")]
    return L


def test_synthetic_log_to_tables(tmp_path):
    t = read_steplog(_log(tmp_path, synthetic()), run_id="r1", model="tiny-llama", tp=1, hardware="CPU-EPYC-Zen2-1core")
    s = t.steps.set_index("step_id")
    assert list(s.index) == list(range(8))
    # step time = measured end - start; no forward pass -> NaN
    assert s.step_time_us.iloc[:7].tolist() == [5000.0] * 7 and np.isnan(s.step_time_us[7])
    assert s.loc[1, "prefill_tokens"] == 8 and s.loc[1, "prefill_reqs"] == 2 and s.loc[1, "prefill_context"] == 8
    assert s.loc[1, "prefill_attn_pairs"] == (2 * 8 + 3) + (0 + 21)  # Σ n·c + n(n+1)/2
    assert s.loc[1, "prefill_logits"] == 1  # A's last chunk
    assert s.loc[2, "decode_reqs"] == 1 and s.loc[2, "decode_context"] == 10
    assert s.loc[3, "preemptions"] == 1 and s.preemptions.sum() == 1
    assert (s.prefill_tokens + s.decode_reqs == s.scheduled_tokens).all() and t.report["steps_token_mismatch"] == 0
    assert s.loc[1, "schedule_us"] == 100 and s.loc[1, "execute_us"] == 4850 and s.loc[1, "update_us"] == 50
    # the cycle check: consecutive busy steps, cycle == measured here (no gap)
    assert t.report["cycle_check"]["median_gap_us"] == 0 and t.report["cycle_check"]["median_measured_over_cycle"] == 1
    assert np.isnan(s.loc[6, "cycle_us"])  # nothing left after step 6: the engine may idle, no cycle time
    r = t.requests.set_index("request_id")
    assert set(r.index) == {"A", "req-b"}  # cmpl-<X-Request-Id>-<i> -> the id the client sent
    assert r.loc["A", "arrived_us"] == 1000 and r.loc["A", "queued_us"] == 2000 and r.loc["A", "departed_us"] == 31000
    assert r.loc["A", "first_token_us"] == 20000 and r.loc["A", "finished_us"] == 30000
    assert r.loc["req-b", "scheduled_us"] == 16000  # the first scheduling, not the resume
    assert r.loc["req-b", "preemptions"] == 1 and (r.output_tokens == 3).all() and (r.status == "ok").all()
    assert r.loc["A", "engine_request_id"] == "cmpl-A-0-11111111"
    assert t.engine["max_num_batched_tokens"] == 8 and t.report["engine"]["vllm"] == "0.32.0"
    e = t.entries
    assert len(e) == 9 and set(e.request_id) == {"A", "req-b"}


def test_fallbacks_without_api_lines(tmp_path):
    lines = [x for x in synthetic() if x["kind"] != "api"]
    lines[1]["arrival_ns"] = 1_500_000  # vLLM's own arrival time (converted to the monotonic clock)
    t = read_steplog(_log(tmp_path, lines), run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    r = t.requests.set_index("request_id")
    assert r.loc["A", "arrived_us"] == 1500 and np.isnan(r.loc["req-b", "arrived_us"])
    assert r.departed_us.isna().all() and len(r) == 2


def test_incomplete_and_out_of_order_requests_are_excluded(tmp_path):
    lines = synthetic()
    lines = [x for x in lines if not (x["kind"] == "req" and x["ev"] == "finished" and x["id"].startswith("cmpl-req-b"))
             and not (x["kind"] == "api" and x["ev"] == "departed" and x["ext"] == "cmpl-req-b-0")]
    t = read_steplog(_log(tmp_path, lines), run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    assert list(t.requests.request_id) == ["A"]
    assert t.report["requests_excluded"] == {"incomplete: no finished/departed": 1}
    lines = synthetic()
    for x in lines:
        if x["kind"] == "req" and x["ev"] == "first_token" and x["id"].startswith("cmpl-A"):
            x["t_ns"] = 35 * MS  # after its finish
    t = read_steplog(_log(tmp_path, lines), run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    assert t.report["requests_excluded"] == {"events out of lifecycle order": 1}


def test_truncated_last_line_is_skipped_and_counted(tmp_path):
    t = read_steplog(_log(tmp_path, synthetic(), tail=b'{"kind":"step","step":8,"t0_'), run_id="r",
                     model="tiny-llama", tp=1, hardware="H100-SXM")
    assert t.report["truncated_last_line"] == 1 and len(t.steps) == 8


@pytest.mark.parametrize("mutate, where, problem", [
    (lambda L: L.insert(3, "not json"), "line 4", "not a JSON line"),
    (lambda L: L.insert(3, [1, 2]), "line 4", "expected a JSON object"),
    (lambda L: L.insert(3, {"kind": "weird"}), "line 4: kind", "unknown line kind 'weird'"),
    (lambda L: L[6].pop("t1_ns"), "line 7 (step): t1_ns", "required field is missing"),
    (lambda L: L[6].update(t1_ns=1), "line 7 (step): t1_ns", "step ends before it starts"),
    (lambda L: L[6].update(prefill=[["x", 1]]), "line 7 (step): prefill[0]", "expected [request id, int, int"),
    (lambda L: L[6].update(decode=[["x", -1]]), "line 7 (step): decode[0]", "expected [request id, int]"),
    (lambda L: L[6].update(kv=1.7), "line 7 (step): kv", "expected a KV usage in [0, 1]"),
    (lambda L: L[2].update(ev="teleported"), "line 3 (req): ev", "unknown request event 'teleported'"),
    (lambda L: L[2].update(prompt="10"), "line 3 (req): prompt", "expected an integer"),
    (lambda L: L[1].pop("ext"), "line 2 (api): ext", "required field is missing"),
    (lambda L: L[0].update(schema=2), "line 1 (engine): schema", "schema 2 is not supported"),
])
def test_malformed_lines_are_one_line_errors(tmp_path, mutate, where, problem):
    lines = synthetic()
    mutate(lines)
    p = tmp_path / "steplog.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(InputError) as ei:
        read_steplog(p, run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    msg = str(ei.value)
    assert msg.startswith(f"{p}: {where}: ") and problem in msg and "\n" not in msg, msg


def test_empty_file_and_two_engines_are_errors(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(InputError, match="empty steplog"):
        read_steplog(p, run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    lines = synthetic()
    lines[-2]["pid"] = 8
    with pytest.raises(InputError, match="2 engine processes"):
        read_steplog(_log(tmp_path, lines), run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    with pytest.raises(InputError, match="file not found"):
        read_steplog(tmp_path / "missing.jsonl", run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")


def test_request_ids():
    assert base_request_id("cmpl-abc-0") == "abc" and base_request_id("chatcmpl-x-y-3") == "x-y"
    assert base_request_id("0") == "0" and base_request_id(None) is None
    assert response_request_id("cmpl-abc") == "abc" and response_request_id("chatcmpl-x-y") == "x-y"


def test_client_match(tmp_path):
    t = read_steplog(_log(tmp_path, synthetic()), run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    recs = []
    for rid, start, first, end in (("A", 0.0009, 0.021, 0.032), ("req-b", 0.0029, 0.026, 0.047), ("zz", 0.1, 0.2, 0.3)):
        recs.append({"start_time": start, "end_time": end, "error": None,
                     "response": f'data: {{"id":"cmpl-{rid}","object":"text_completion"}}\n\n',
                     "info": {"response_metrics": {"chunk_times": [first], "server_usage": {"completion_tokens": 3}}}})
    p = tmp_path / "per_request_lifecycle_metrics.json"
    p.write_text(json.dumps(recs))
    c = client_requests(p)
    assert list(c.request_id) == ["A", "req-b", "zz"] and c.client_start_us.iloc[0] == pytest.approx(900)
    joined, rep = match_client_requests(t.requests, c)
    assert rep["matched"] == 2 and rep["client_only"] == 1 and rep["server_only"] == 0
    assert rep["violations"] == {"send_after_arrival": 0, "departure_after_client_end": 0,
                                 "first_token_after_client_first_chunk": 0, "output_tokens_differ": 0}
    c.loc[0, "client_start_us"] = 5000  # the client says it sent A after the server saw it
    _, rep = match_client_requests(t.requests, c, tolerance_us=1000)
    assert rep["violations"]["send_after_arrival"] == 1


# ------------------------------------------------------------------------------------------ the plugin
@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN))
    for m in [m for m in sys.modules if m.startswith("vllm_steplog")]:
        monkeypatch.delitem(sys.modules, m)
    import vllm_steplog

    return vllm_steplog


def test_version_guard(plugin):
    assert plugin.check_version("0.32.0") == "0.32.0" and plugin.check_version("0.32.0+cpu") == "0.32.0+cpu"
    for bad in ("0.31.2", "0.33.0", "0.32.1", "0.32.0.dev12+g1234", "unknown"):
        with pytest.raises(plugin.UnsupportedVLLMVersion,
                           match=re.escape(f"supports vLLM 0.32.0 only, but vLLM {bad} is installed")):
            plugin.check_version(bad)


def test_inactive_without_output_path(plugin, monkeypatch):
    monkeypatch.delenv("ROOFLAB_STEPLOG_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing vllm would fail: register() must not try
    assert plugin.register() is None


def test_entry_point_declared():
    text = (PLUGIN / "pyproject.toml").read_text()
    assert '[project.entry-points."vllm.general_plugins"]' in text and 'steplog = "vllm_steplog:register"' in text


class _Status:
    def __init__(self, name, finished):
        self.name, self._f = name, finished


RUNNING, WAITING, LENGTH = _Status("RUNNING", False), _Status("WAITING", False), _Status("FINISHED_LENGTH_CAPPED", True)


class FakeRequest:
    """The vLLM 0.32 Request attributes the hooks read."""

    def __init__(self, rid, prompt, max_tokens):
        self.request_id, self.num_prompt_tokens, self.max_tokens = rid, prompt, max_tokens
        self.sampling_params = types.SimpleNamespace(max_tokens=max_tokens)
        self.arrival_time = None
        self.num_computed_tokens, self.num_output_tokens, self.num_preemptions = 0, 0, 0
        self.status = WAITING

    @property
    def num_tokens(self):
        return self.num_prompt_tokens + self.num_output_tokens

    def is_finished(self):
        return self.status._f

    @classmethod
    def from_engine_core_request(cls, ecr, block_hasher=None):
        return cls(ecr.request_id, ecr.prompt, ecr.max_tokens)


class FakeScheduler:
    """A chunked-prefill scheduler with vLLM 0.32's method names and SchedulerOutput fields: a token budget,
    FIFO admission, preemption of the newest running request when `kv_tokens` would overflow."""

    def __init__(self, budget=8, kv_tokens=24):
        self.budget, self.kv_tokens = budget, kv_tokens
        self.requests, self.running, self.waiting = {}, [], []

    def add_request(self, request):
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def get_request_counts(self):
        return len(self.running), len(self.waiting)

    def get_kv_cache_usage(self):
        return min(1.0, sum(r.num_computed_tokens for r in self.running) / self.kv_tokens)

    def schedule(self):
        budget, sched, preempted = self.budget, {}, set()

        def used():
            return sum(x.num_computed_tokens for x in self.running) + sum(sched.values())

        for r in list(self.running):  # running requests first (decodes and continuing chunks)
            if r not in self.running or budget == 0:
                continue
            need = min(budget, r.num_tokens - r.num_computed_tokens)
            while used() + need > self.kv_tokens and self.running[-1] is not r:  # preempt the newest
                victim = self.running.pop()
                budget += sched.pop(victim.request_id, 0)
                victim.status, victim.num_computed_tokens = WAITING, 0
                victim.num_preemptions += 1
                self.waiting.insert(0, victim)
                preempted.add(victim.request_id)
            sched[r.request_id] = need
            budget -= need
        while self.waiting and budget > 0 and not preempted:  # then admit from the queue
            r = self.waiting[0]
            n = min(budget, r.num_tokens)
            if used() + n > self.kv_tokens:
                break
            self.waiting.pop(0)
            r.status = RUNNING
            self.running.append(r)
            sched[r.request_id] = n
            budget -= n
        for rid, n in sched.items():  # _update_after_schedule
            self.requests[rid].num_computed_tokens += n
        return types.SimpleNamespace(num_scheduled_tokens=sched, total_num_scheduled_tokens=sum(sched.values()),
                                     preempted_req_ids=preempted)

    def update_from_output(self, out, model_output):
        for rid in out.num_scheduled_tokens:
            r = self.requests[rid]
            if r.num_computed_tokens >= r.num_tokens:  # the whole sequence is computed: a token is sampled
                r.num_output_tokens += 1
                if r.num_output_tokens >= r.max_tokens:
                    r.status = LENGTH
                    self.running.remove(r)
                    del self.requests[rid]
        return {}

    def finish_requests(self, request_ids, finished_status):
        return []


def test_hooks_on_a_stand_in_scheduler(plugin, tmp_path, monkeypatch):
    """The hooks, installed on a scheduler with vLLM 0.32's interface: one step line per schedule/update pair,
    lifecycle events, and output that the adapter reads back consistently (chunking, preemption, recompute)."""
    sched_mod = types.ModuleType("vllm.v1.core.sched.scheduler")

    class Scheduler(FakeScheduler):
        pass

    sched_mod.Scheduler = Scheduler
    req_mod = types.ModuleType("vllm.v1.request")
    req_mod.Request = FakeRequest
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.32.0"
    for name, mod in (("vllm", vllm), ("vllm.v1", types.ModuleType("vllm.v1")),
                      ("vllm.v1.core", types.ModuleType("vllm.v1.core")),
                      ("vllm.v1.core.sched", types.ModuleType("vllm.v1.core.sched")),
                      ("vllm.v1.core.sched.scheduler", sched_mod), ("vllm.v1.request", req_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    log = tmp_path / "steplog.jsonl"
    monkeypatch.setenv("ROOFLAB_STEPLOG_PATH", str(log))
    plugin.register()
    s = Scheduler(budget=8, kv_tokens=24)
    for i in range(3):
        ecr = types.SimpleNamespace(request_id=f"cmpl-r{i}-0-abcdefgh", external_req_id=f"cmpl-r{i}-0", prompt=10,
                                    max_tokens=4)
        s.add_request(FakeRequest.from_engine_core_request(ecr))
    for _ in range(60):
        if not s.requests:
            break
        out = s.schedule()
        s.update_from_output(out, None)
    assert not s.requests
    t = read_steplog(log, run_id="r", model="tiny-llama", tp=1, hardware="H100-SXM")
    assert t.report["steps_token_mismatch"] == 0 and (t.steps.scheduled_tokens <= 8).all()
    r = t.requests.set_index("request_id")
    assert sorted(r.index) == ["r0", "r1", "r2"] and (r.output_tokens == 4).all() and (r.status == "ok").all()
    assert r.preemptions.sum() >= 1 and t.steps.preemptions.sum() == r.preemptions.sum()
    for rid, g in t.entries.sort_values("step_id").groupby("request_id"):
        ph, ctx, tok = g.phase.to_numpy(), g.context_before.to_numpy(), g.tokens.to_numpy()
        for i in range(1, len(g)):
            if ph[i] == "decode":  # a decode's context is everything computed before it
                assert ctx[i] == ctx[i - 1] + tok[i - 1], (rid, g)
        restarts = int(((g.phase == "prefill") & (g.context_before == 0)).sum())
        assert restarts == r.loc[rid, "preemptions"] + 1
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["kind"] == "engine" and lines[0]["vllm"] == "0.32.0"
    assert lines[1]["kind"] == "req" and lines[1]["ev"] == "queued" and lines[1]["ext"] == "cmpl-r0-0"
    plugin.hooks._installed = False  # let another test install again


# ------------------------------------------------------------------------------------------ the endpoint profile
def _campaign(endpoint: dict) -> dict:
    return {"name": "v", "hardware": "CPU-EPYC-Zen2-1core", "models": [{"model": "tiny-llama", "tp": 1}],
            "validation": {"points": [{"family": "W3", "rate": 4}]},
            "families": {"W3": {"rate": [4], "input_tokens": 128, "output_tokens": 32}}, "duration_s": 8,
            "engine": {"max_model_len": 1024, "max_num_batched_tokens": 256}, "endpoint": endpoint}


def test_vllm_endpoint_profile():
    c = parse_campaign(_campaign({"kind": "vllm", "python": "/opt/v/bin/python", "model_path": "/m/{model}",
                                  "args": ["--dtype", "float32", "--compilation-config", '{"level": 0}'],
                                  "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": 0}}), source="c.yaml")
    ep = c.endpoint
    assert ep.kind == "vllm" and ep.trace_format == "steplog" and ep.env == (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),)
    cmd = vllm_command(ep.python, ep.model_path.format(model="tiny-llama"), "tiny-llama", c.engine, ep.args,
                       dict(ep.env))
    filled = [a.format(tp=1, port=8000, trace="/t/s.jsonl") for a in cmd]
    assert filled[:4] == ["env", "ROOFLAB_STEPLOG_PATH=/t/s.jsonl", "VLLM_ENABLE_V1_MULTIPROCESSING=0",
                          "/opt/v/bin/python"]
    s = " ".join(filled)
    assert "-m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8000 --model /m/tiny-llama" in s
    assert "--tensor-parallel-size 1" in s and "--max-num-batched-tokens 256" in s and "--max-model-len 1024" in s
    assert "--no-enable-prefix-caching" in s and filled[-1] == '{"level": 0}'  # braces survive the template


@pytest.mark.parametrize("endpoint, where, problem", [
    ({"kind": "vllm", "args": ["--port", "9"]}, "endpoint.args[0]", "--port is set by rooflab"),
    ({"kind": "vllm", "args": ["--max-model-len=9"]}, "endpoint.args[0]", "--max-model-len is set by rooflab"),
    ({"kind": "vllm", "model_path": "/m/{tp}"}, "endpoint.model_path", "only the {model} placeholder"),
    ({"kind": "vllm", "env": {"1BAD": "x"}}, "endpoint.env.1BAD", "not an environment variable name"),
    ({"kind": "vllm", "bogus": 1}, "endpoint.bogus", "unknown field"),
    ({"kind": "external", "base_url": "http://h:1", "trace_path": "/t", "tokenizer": "/k", "trace_format": "x"},
     "endpoint.trace_format", "expected one of otel, steplog"),
])
def test_vllm_endpoint_errors(endpoint, where, problem):
    with pytest.raises(InputError) as ei:
        parse_campaign(_campaign(endpoint), source="c.yaml")
    assert str(ei.value).startswith(f"c.yaml: {where}: ") and problem in str(ei.value)


def test_shipped_vllm_cpu_campaign_loads():
    from rooflab.collect.spec import load_campaign

    c = load_campaign("vllm-cpu")
    assert c.endpoint.kind == "vllm" and c.hardware == "CPU-EPYC-Zen2-1core" and len(c.design("ci")) == 5
