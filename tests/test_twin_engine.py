"""Scheduler invariants of the twin engine (vLLM-v1-like), property-based where it fits."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rooflab.errors import InputError
from rooflab.model.arch import load_model
from rooflab.model.engine_config import EngineConfig, kv_capacity_blocks
from rooflab.model.hardware import load_hardware
from rooflab.twin.engine import Engine, Request
from rooflab.twin.simulate import constant_rate_workload, simulate

ARCH = load_model("llama-3.1-8b")
H100 = load_hardware("H100-SXM")


class LinearTimer:
    """A transparent step timer for scheduler tests (the truth model is tested on its own)."""

    def step_time_us(self, decode_contexts, prefills, n_logits):
        return 4000 + 15 * len(decode_contexts) + 0.002 * float(np.sum(decode_contexts)) \
            + sum(n * (1 + c / 2000) for n, c, _ in prefills) * 8 + n_logits

    def scheduler_cpu_us(self, n):
        return 300 + 2 * n


def run(config, requests, lazy=True, **kw):
    e = Engine(ARCH, H100, 1, LinearTimer(), config)
    e.lazy = lazy
    return e, simulate(e, requests, **kw)


workloads = st.tuples(
    st.floats(1, 200),  # rate
    st.integers(1, 120),  # requests
    st.integers(1, 3000),  # prompt
    st.integers(1, 300),  # output
    st.integers(0, 10_000),  # seed
)
configs = st.builds(EngineConfig, max_num_seqs=st.integers(1, 64), max_num_batched_tokens=st.integers(64, 4096),
                    num_gpu_blocks=st.one_of(st.none(), st.integers(200, 2000)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, workloads)
# found by hypothesis: a prefill's 1-token last chunk once passed for a decode on the lazy path
@example(EngineConfig(max_num_seqs=21, max_num_batched_tokens=64), (48.0, 22, 23, 133, 0))
def test_scheduler_invariants(config, wl):
    rate, n, prompt, out, seed = wl
    reqs = constant_rate_workload(rate, n, prompt, out, seed=seed)
    try:
        e, r = run(config, reqs)
    except InputError:
        # a request longer than the KV cache or max_model_len is refused up front, as vLLM does
        assert prompt + out > e_max_len(config)
        return
    s = r.steps
    assert ((s.prefill_tokens + s.decode_reqs) <= config.max_num_batched_tokens).all()  # token budget
    assert (s.running <= config.max_num_seqs).all()
    assert ((s.kv_usage >= 0) & (s.kv_usage <= 1)).all()  # KV accounting never negative, never above capacity
    assert (s.step_time_us > 0).all()
    # every admitted request finishes with exactly its requested output (ignore_eos), preempted or not
    assert (r.requests.status == "length").all()
    assert (r.requests.output_tokens == out).all()
    assert e.free_blocks == e.num_blocks  # no leaked blocks
    # the lazy O(1) path decides exactly what the general path decides
    e2, r2 = run(config, constant_rate_workload(rate, n, prompt, out, seed=seed), lazy=False)
    pd.testing.assert_frame_equal(r.steps, r2.steps)
    pd.testing.assert_frame_equal(r.requests, r2.requests)


def e_max_len(config):
    return Engine(ARCH, H100, 1, LinearTimer(), config).max_model_len


def test_preemption_restores_progress_and_recomputes():
    cfg = EngineConfig(num_gpu_blocks=120, max_num_seqs=32)
    e, r = run(cfg, constant_rate_workload(400, 40, 600, 200, seed=1))
    assert r.steps.preemptions.sum() > 0 and (r.requests.preemptions > 0).any()
    assert (r.requests.output_tokens == 200).all() and e.free_blocks == e.num_blocks
    # recompute: a preempted request's prefill work is redone (prompt + outputs so far)
    assert r.steps.prefill_tokens.sum() > 40 * 600
    pre = r.steps[r.steps.preemptions > 0]
    assert len(pre) and (r.steps.kv_usage.max() > 0.9)


def test_single_request_decode_context_grows_by_one():
    e, r = run(EngineConfig(), [Request("a", 0.0, 100, 20)])
    s = r.steps
    assert s.prefill_tokens.iloc[0] == 100 and s.decode_reqs.iloc[0] == 0
    ctx = s.decode_context.iloc[1:].to_numpy()
    assert (np.diff(ctx) == 1).all() and ctx[0] == 100
    assert len(s) == 20  # one prefill step (samples token 1) + 19 decodes


def test_chunked_prefill_splits_long_prompts_under_the_budget():
    e, r = run(EngineConfig(max_num_batched_tokens=512), [Request("a", 0.0, 1500, 3)])
    s = r.steps
    assert s.prefill_tokens.tolist()[:3] == [512, 512, 476]
    assert s.prefill_context.tolist()[:3] == [0, 512, 1024]  # chunk context = pre-step computed tokens
    assert s.prefill_logits.tolist()[:3] == [0, 0, 1]  # only the last chunk samples


def test_decodes_go_first_then_prefill_chunks():
    reqs = [Request("a", 0.0, 100, 50), Request("b", 100_000.0, 3000, 5)]
    e, r = run(EngineConfig(max_num_batched_tokens=1024), reqs)
    mixed = r.steps[(r.steps.prefill_tokens > 0) & (r.steps.decode_reqs > 0)]
    # the decode is scheduled in every mixed step, and the prefill takes what the budget leaves
    assert len(mixed) == 3 and (mixed.decode_reqs == 1).all()
    assert mixed.prefill_tokens.tolist() == [1023, 1023, 3000 - 2046]


def test_max_num_seqs_queues_the_rest():
    e, r = run(EngineConfig(max_num_seqs=4), constant_rate_workload(1000, 20, 50, 30, seed=0))
    assert r.steps.running.max() == 4 and r.steps.waiting.max() > 0


def test_stop_at_natural_length_without_ignore_eos():
    reqs = [Request("a", 0.0, 50, 100, ignore_eos=False, natural_len=7), Request("b", 0.0, 50, 10)]
    e, r = run(EngineConfig(), reqs)
    got = r.requests.set_index("request_id")
    assert got.loc["a", "output_tokens"] == 7 and got.loc["a", "status"] == "stop"
    assert got.loc["b", "output_tokens"] == 10 and got.loc["b", "status"] == "length"


def test_prefix_caching_skips_shared_prefix_blocks():
    reqs = [Request(str(i), i * 1e6, 1000, 2, prefix_group="sys", prefix_tokens=800) for i in range(3)]
    _, cold = run(EngineConfig(enable_prefix_caching=False), reqs)
    reqs = [Request(str(i), i * 1e6, 1000, 2, prefix_group="sys", prefix_tokens=800) for i in range(3)]
    e, warm = run(EngineConfig(enable_prefix_caching=True), reqs)
    assert cold.steps.prefill_tokens.sum() == 3000
    # first request computes everything; the next two reuse 50 full blocks (800 tokens)
    assert warm.steps.prefill_tokens.sum() == 1000 + 2 * 200
    assert e.free_blocks == e.num_blocks  # cached blocks are resident but evictable


def test_request_longer_than_max_model_len_is_refused():
    e = Engine(ARCH, H100, 1, LinearTimer(), EngineConfig(max_model_len=1024))
    with pytest.raises(InputError, match="maximum context length is 1024"):
        e.add_request(Request("x", 0, 1000, 100), 0)


def test_kv_capacity_matches_the_real_h100_runs():
    """vLLM's block count in the real runs' request files: 31356 (Llama-2-70B TP4), 26602 (CodeLlama-34B TP2)."""
    for model, tp, real in (("llama-2-70b", 4, 31356), ("codellama-34b", 2, 26602)):
        got = kv_capacity_blocks(load_model(model), H100, tp, EngineConfig())
        assert got == pytest.approx(real, rel=0.01)
    with pytest.raises(InputError, match="does not fit"):
        kv_capacity_blocks(load_model("llama-3.1-70b"), H100, 1, EngineConfig())


def test_alpha_overheads_shape_the_request_timeline():
    class Over:
        def api_us(self, req):
            return 15000.0

        def post_us(self, req):
            return 800 + 45 * req.output_tokens

    e, r = run(EngineConfig(), constant_rate_workload(5, 10, 100, 20, seed=0), overheads=Over())
    q = r.requests
    assert np.allclose(q.queued_us - q.arrived_us, 15000)
    assert np.allclose(q.departed_us - q.finished_us, 800 + 45 * 20)
    assert (q.scheduled_us >= q.queued_us).all() and (q.first_token_us > q.scheduled_us).all()
