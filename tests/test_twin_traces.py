"""The twin's traces round-trip: the instrumented-vLLM OTEL JSONL it writes reads back (through the same
adapter that reads the real fork's traces) into exactly the engine's own step and request tables."""

import numpy as np
import pandas as pd

from rooflab.data.adapters.otel import read_otel_traces
from rooflab.data.saturation import route_steps
from rooflab.model.arch import load_model
from rooflab.model.engine_config import EngineConfig
from rooflab.model.hardware import load_hardware
from rooflab.twin.engine import Engine, Request
from rooflab.twin.otel import TraceWriter
from rooflab.twin.simulate import constant_rate_workload, simulate
from rooflab.twin.truth import TruthModel

H100 = load_hardware("H100-SXM")
AGG = ["prefill_reqs", "prefill_tokens", "prefill_context", "prefill_attn_pairs", "prefill_logits", "decode_reqs",
       "decode_context", "preemptions"]


def _run(tmp_path, model, tp, requests, config, seed=0):
    arch = load_model(model)
    truth = TruthModel.from_config("H100-SXM", arch, tp, seed=seed)
    engine = Engine(arch, H100, tp, truth, config)
    path = tmp_path / "traces.jsonl"
    with TraceWriter(path, seed=seed) as w:
        res = simulate(engine, requests, overheads=truth, trace=w, run_id="r1")
    read = read_otel_traces(path, run_id="r1", model=model, tp=tp, hardware="H100-SXM",
                            max_num_batched_tokens=config.max_num_batched_tokens)
    return res, read


def test_round_trip_with_chunking_and_preemption(tmp_path):
    reqs = constant_rate_workload(40, 80, 300, 60, seed=1) + [Request("long", 200_000.0, 3000, 20)]
    res, read = _run(tmp_path, "llama-3.1-8b", 1, reqs, EngineConfig(num_gpu_blocks=500, max_num_batched_tokens=1024))
    own, got = res.steps.set_index("step_id"), read.steps.set_index("step_id")
    assert own.preemptions.sum() > 0 and (own.prefill_tokens == 1024 - own.decode_reqs).any()  # the hard cases occur
    assert list(got.index) == list(own.index)
    pd.testing.assert_frame_equal(got[AGG], own[AGG], check_dtype=False)
    # step time = cycle time, equal to the engine's step duration wherever the engine stayed busy
    ok = got.step_time_us.notna()
    assert ok.mean() > 0.8
    np.testing.assert_allclose(got.step_time_us[ok], own.step_time_us[ok], rtol=0, atol=1e-3)
    # requests: the same lifecycle on the server's clock (ns in traces → µs)
    a = res.requests.set_index("request_id").sort_index()
    b = read.requests.set_index("request_id").sort_index()
    assert len(b) == len(a) == 81
    for col in ("arrived_us", "queued_us", "scheduled_us", "first_token_us", "finished_us", "departed_us"):
        np.testing.assert_allclose(b[col], a[col], atol=1e-3, err_msg=col)
    assert (b.output_tokens == a.output_tokens).all() and (b.preemptions == a.preemptions).all()


def test_round_trip_moe_tp2(tmp_path):
    res, read = _run(tmp_path, "mixtral-8x7b", 2, constant_rate_workload(10, 30, 500, 30, seed=2), EngineConfig())
    pd.testing.assert_frame_equal(read.steps.set_index("step_id")[AGG], res.steps.set_index("step_id")[AGG],
                                  check_dtype=False)


def test_saturating_workload_shows_in_the_traces(tmp_path):
    """Far above capacity: the KV cache fills (> 95%), requests are preempted, the router sees it."""
    reqs = constant_rate_workload(500, 300, 1500, 800, seed=3)
    res, read = _run(tmp_path, "llama-3.1-8b", 1, reqs, EngineConfig(num_gpu_blocks=3000, max_num_seqs=128))
    s = read.steps
    assert s.kv_usage.max() > 0.95
    assert s.preemptions.sum() > 0 and (read.requests.preemptions > 0).any()
    routing = route_steps(s)
    assert routing.by_kv > 0 and routing.by_preemption > 0
    assert (read.requests.output_tokens == 800).all()  # recompute restores progress: everyone completes


def test_round_trip_of_prefix_cache_hits(tmp_path):
    """Requests sharing a prefix: the traces give back the engine's computed prefill tokens and its cache hits
    (from each request's first SCHEDULED step and its computed tokens there)."""
    reqs = [Request(f"r{i}", i * 150_000.0, 900, 12, True, None, "sys", 768) for i in range(30)]
    res, read = _run(tmp_path, "llama-3.1-8b", 1, reqs, EngineConfig(enable_prefix_caching=True))
    own, got = res.steps.set_index("step_id"), read.steps.set_index("step_id")
    assert own.prefill_cached_tokens.sum() == 29 * 768  # every request after the first hits 48 full blocks
    pd.testing.assert_frame_equal(got[AGG + ["prefill_cached_tokens"]], own[AGG + ["prefill_cached_tokens"]],
                                  check_dtype=False)
