"""Run-level saturation checks (docs/spec.md §6) and the reader of the real runs' request data."""

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rooflab.data.adapters.real_requests import RealRun, list_real_runs, read_real_run
from rooflab.data.saturation import (
    StepRouting,
    check_e2e_tail,
    check_failure_rate,
    check_preemption_rate,
    check_queue_growth,
    check_ttft_growth,
    route_run,
    routing_counts,
)
from rooflab.data.tables import REQUEST_COLUMNS
from rooflab.errors import InputError

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not (REAL / "requests").is_dir(), reason="../shared/data/real not beside the project")


def _table(n=100, **cols) -> pd.DataFrame:
    """A request table of ``n`` healthy requests, one per second, TTFT 50 ms, E2E 2 s; ``cols`` override."""
    arr = np.arange(n) * 1e6
    base = {"run_id": "r", "request_id": [str(i) for i in range(n)], "arrived_us": arr, "queued_us": np.nan,
            "scheduled_us": np.nan, "first_token_us": arr + 50_000, "finished_us": np.nan,
            "departed_us": arr + 2e6, "prompt_tokens": 500.0, "output_tokens": 100.0, "preemptions": 0.0,
            "status": "ok"}
    base.update(cols)
    return pd.DataFrame(base)


def _one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


# ---------------------------------------------------------------------------------------------------
# the five checks on constructed tables


def test_failure_rate_boundary_and_sources():
    status = np.array(["ok"] * 100, dtype=object)
    status[:5] = "failed"
    at = check_failure_rate(_table(status=status))
    assert at["available"] and at["value"] == pytest.approx(0.05) and not at["flag"]  # > 5%, not >=
    status[5] = "aborted"
    assert check_failure_rate(_table(status=status))["flag"]
    # an error flag counts too, and 'rejected' is a failure status
    err = np.zeros(100, bool)
    err[:6] = True
    assert check_failure_rate(_table(error=err))["flag"]
    status = np.array(["ok"] * 100, dtype=object)
    status[:6] = "Rejected"
    assert check_failure_rate(_table(status=status))["flag"]


def test_failure_rate_with_a_reported_failure_count():
    # the table holds only the successes: 95 ok + 6 failures reported elsewhere = 6/101
    r = check_failure_rate(_table(95), failures=6)
    assert r["flag"] and r["value"] == pytest.approx(6 / 101) and r["requests"] == 101
    # the table already holds the same failures: no double count
    status = np.array(["ok"] * 100, dtype=object)
    status[:5] = "failed"
    r = check_failure_rate(_table(status=status), failures=5)
    assert r["value"] == pytest.approx(0.05) and not r["flag"]
    assert not check_failure_rate(_table(0))["available"]


def test_queue_growth_prefers_the_real_queue_wait():
    n = 50
    arr = np.arange(n) * 1e6
    growing = _table(n, queued_us=arr + 10, scheduled_us=arr + 10 + 1000.0 * np.arange(n))
    r = check_queue_growth(growing)
    assert r["flag"] and r["value"] == pytest.approx(1.0) and r["slope"] == pytest.approx(1000.0)
    assert r["source"].startswith("scheduled_us")
    # no queue timestamps: TTFT is the proxy (constant here → no growth), and it says so
    r = check_queue_growth(_table(n))
    assert r["available"] and not r["flag"] and r["source"].startswith("ttft") and r["value"] == 0.0
    # a shrinking queue is not growth, whatever its R²
    shrinking = _table(n, first_token_us=arr + 1e6 - 1000.0 * np.arange(n))
    r = check_queue_growth(shrinking)
    assert r["value"] == pytest.approx(1.0) and r["slope"] < 0 and not r["flag"]


@pytest.mark.parametrize("r2,flag", [(0.49, False), (0.51, True)])
def test_queue_growth_r2_boundary(r2, flag):
    n = 200
    x = np.arange(n, dtype=float)
    xc = x - x.mean()
    e = np.sin(x * 1.3)  # a residual made orthogonal to the line, scaled to give exactly R² = r2
    e -= e.mean()
    e -= (e @ xc) / (xc @ xc) * xc
    e *= math.sqrt((xc @ xc) * (1 - r2) / r2 / (e @ e))
    wait = 1e5 + 1000.0 * (xc + e)
    r = check_queue_growth(_table(n, first_token_us=x * 1e6 + wait))
    assert r["value"] == pytest.approx(r2, abs=1e-9) and r["flag"] is flag


def test_queue_growth_not_available_without_times():
    r = check_queue_growth(_table(10, first_token_us=np.nan))
    assert not r["available"] and not r["flag"] and r["value"] is None
    assert not check_queue_growth(_table(2))["available"]  # too few points for a trend


def test_preemption_rate_boundary_and_nan():
    pre = np.zeros(100)
    pre[:15] = 1
    r = check_preemption_rate(_table(preemptions=pre))
    assert r["value"] == pytest.approx(0.15) and not r["flag"]
    pre[15] = 3
    assert check_preemption_rate(_table(preemptions=pre))["flag"]
    r = check_preemption_rate(_table(preemptions=np.nan))
    assert not r["available"] and not r["flag"] and r["value"] is None
    # unknown counts are left out, not taken as 0: 16 of 80 known
    pre = np.full(100, np.nan)
    pre[:80] = 0
    pre[:16] = 1
    r = check_preemption_rate(_table(preemptions=pre))
    assert r["n"] == 80 and r["value"] == pytest.approx(0.2) and r["flag"]


@pytest.mark.parametrize("last,flag", [(2000.0, False), (2001.0, True)])
def test_ttft_growth_boundary(last, flag):
    n = 100
    arr = np.arange(n) * 1e6
    ttft = np.full(n, 1500.0)
    ttft[:20], ttft[-20:] = 1000.0, last
    # shuffled rows: the windows go by arrival time, not row order
    t = _table(n, first_token_us=arr + ttft).sample(frac=1.0, random_state=0)
    r = check_ttft_growth(t)
    assert r["window"] == 20 and r["value"] == pytest.approx(last / 1000.0) and r["flag"] is flag


def test_ttft_growth_nan_handling():
    assert not check_ttft_growth(_table(10, first_token_us=np.nan))["available"]
    # failed requests without a first token are left out of the windows
    n = 100
    arr = np.arange(n) * 1e6
    ft = arr + 1000.0
    ft[-30:] = np.nan
    r = check_ttft_growth(_table(n, first_token_us=ft))
    assert r["available"] and r["n"] == 70 and r["window"] == 14 and not r["flag"]


@pytest.mark.parametrize("tail,flag", [(10.0, False), (10.5, True)])
def test_e2e_tail_boundary(tail, flag):
    n = 100
    arr = np.arange(n) * 1e6
    e2e = np.full(n, 1e6)
    e2e[-2:] = tail * 1e6  # P99 interpolates between the two largest: both = tail × P50
    r = check_e2e_tail(_table(n, departed_us=arr + e2e))
    assert r["value"] == pytest.approx(tail) and r["flag"] is flag


def test_e2e_tail_ignores_failed_requests_and_falls_back_to_finished():
    n = 100
    arr = np.arange(n) * 1e6
    dep = arr + 1e6
    dep[-5:] = arr[-5:] + 300e6  # five timeouts
    status = np.array(["ok"] * n, dtype=object)
    status[-5:] = "failed"
    assert check_e2e_tail(_table(n, departed_us=dep, status=status))["value"] == pytest.approx(1.0)
    r = check_e2e_tail(_table(n, departed_us=np.nan, finished_us=arr + 2e6))
    assert r["available"] and r["value"] == pytest.approx(1.0)
    assert not check_e2e_tail(_table(n, departed_us=np.nan))["available"]


def test_route_run_two_flags_saturate_and_serialise():
    n = 100
    arr = np.arange(n) * 1e6
    healthy = route_run(_table(n))
    assert healthy.n_flags == 0 and not healthy.saturated
    assert set(healthy.flags) == {"failure_rate", "queue_growth", "preemption_rate", "ttft_growth", "e2e_tail"}
    one = route_run(_table(n, first_token_us=arr + 1000.0 * (1 + np.arange(n))))  # TTFT grows: queue+ttft
    assert one.flags["queue_growth"]["flag"] and one.flags["ttft_growth"]["flag"] and one.n_flags == 2
    assert one.saturated
    pre = np.zeros(n)
    pre[:20] = 1
    only_pre = route_run(_table(n, preemptions=pre))
    assert only_pre.n_flags == 1 and not only_pre.saturated
    with_failures = route_run(_table(n, preemptions=pre), failures=20)
    assert with_failures.raised == ["failure_rate", "preemption_rate"] and with_failures.saturated
    d = one.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["saturated"] and d["n_flags"] == 2 and d["checks"]["preemption_rate"]["available"] is True
    # an infinite ratio (first window's TTFT 0) serialises as null
    ft = arr.copy()
    ft[-20:] += 5000.0
    inf = route_run(_table(n, first_token_us=ft))
    assert inf.flags["ttft_growth"]["flag"] and inf.to_dict()["checks"]["ttft_growth"]["value"] is None
    json.dumps(inf.to_dict(), allow_nan=False)


def test_routing_counts():
    steps = StepRouting(np.array([True, False, False, True, False]), by_kv=1, by_preemption=1)
    healthy = routing_counts(steps, route_run(_table(10)), 10)
    assert healthy["requests"] == {"total": 10, "unsaturated": 10, "saturated": 0}
    assert healthy["steps"]["unsaturated"] == 3 and healthy["steps"]["saturated"] == 2
    assert healthy["steps"]["saturated_run"] == 0 and not healthy["run_saturated"]
    n = 100
    sat_run = route_run(_table(n, first_token_us=np.arange(n) * 1e6 + 1000.0 * (1 + np.arange(n))))
    c = routing_counts(steps, sat_run, n)
    assert c["requests"] == {"total": n, "unsaturated": 0, "saturated": n} and c["run_saturated"]
    assert c["steps"]["saturated"] == 5 and c["steps"]["unsaturated"] == 0 and c["steps"]["saturated_run"] == 3
    assert c["steps"]["saturated_kv_usage"] == 1
    assert routing_counts(None, sat_run, n)["steps"] is None
    json.dumps(c)


# ---------------------------------------------------------------------------------------------------
# the reader on a small constructed run (no dependency on ../shared)


def _write_run(root: Path, run="20260101-000000-llama-2-7b-tp1-general", *, requests=None, truth=None,
               exp="model: meta-llama/Llama-2-7b-hf\ntensor_parallelism: 1\nmax_model_len: 4096\n"
                   "max_num_batched_tokens: 2048\nmax_num_seqs: 128\napp: inference-perf\n"):
    keys = ("index", "arrival_time_us", "input_tokens", "output_tokens", "prefix_group", "has_error")
    reqs = requests if requests is not None else [dict(zip(keys, row)) for row in (
        (0, 0, 500, 11, "", False), (1, 250_000, 510, 1, "g1", False), (2, 400_000, 0, 0, "", True))]
    gt = truth if truth is not None else [
        {"index": 0, "has_error": False, "ttft_s": 0.05, "e2e_s": 1.05},
        {"index": 1, "has_error": False, "ttft_s": 0.04, "e2e_s": 0.04},
        {"index": 2, "has_error": True, "e2e_s": 300.0},
    ]
    doc = {"experiment": run, "model_id": "meta-llama/Llama-2-7b-hf", "profile": "general", "split": "train",
           "config": {"tensor_parallelism": 1, "max_num_seqs": 128, "max_num_batched_tokens": 2048,
                      "kv_blocks_total_gpu": 7462, "block_size": 16},
           "model_config": {"num_layers": 32}, "requests": reqs}
    (root / "requests").mkdir(parents=True, exist_ok=True)
    (root / "runs" / run).mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "requests" / f"{run}.json.gz", "wt") as fh:
        json.dump(doc, fh)
    with gzip.open(root / "requests" / f"{run}_ground_truth.json.gz", "wt") as fh:
        json.dump(gt, fh)
    (root / "runs" / run / "exp-config.yaml").write_text(exp)
    return run


def test_reader_on_a_constructed_run(tmp_path):
    run = _write_run(tmp_path)
    assert list_real_runs(tmp_path) == [run]
    r = read_real_run(run, tmp_path)
    assert isinstance(r, RealRun)
    assert (r.model, r.tp, r.hardware, r.workload, r.split) == ("llama-2-7b", 1, "H100-SXM", "general", "train")
    assert r.vllm["kv_blocks_total_gpu"] == 7462 and r.vllm["max_num_seqs"] == 128 and r.vllm["block_size"] == 16
    assert r.vllm["enable_prefix_caching"] is True and "enable_prefix_caching" in r.vllm_from_readme
    q = r.requests
    assert q["request_id"].tolist() == [0, 1, 2] and q["error"].tolist() == [False, False, True]
    assert q["ttft_us"].iloc[0] == pytest.approx(50_000) and q["e2e_us"].iloc[0] == pytest.approx(1.05e6)
    assert q["itl_us"].iloc[0] == pytest.approx(100_000)  # (1.05 − 0.05) s / (11 − 1)
    assert np.isnan(q["itl_us"].iloc[1]) and np.isnan(q["ttft_us"].iloc[2])
    assert np.isnan(q["prompt_tokens"].iloc[2])  # a failed request's 0 tokens are unknown, not 0
    assert q["prefix_group"].iloc[1] == "g1" and pd.isna(q["prefix_group"].iloc[0])
    t = r.requests_table()
    assert list(t.columns[: len(REQUEST_COLUMNS)]) == list(REQUEST_COLUMNS)
    assert t["first_token_us"].iloc[0] == pytest.approx(50_000) and t["departed_us"].iloc[1] == pytest.approx(290_000)
    assert t["status"].tolist() == ["ok", "ok", "failed"]
    assert t[["queued_us", "scheduled_us", "finished_us", "preemptions"]].isna().all().all()
    # the request file's path works as well as the name
    assert read_real_run(tmp_path / "requests" / f"{run}.json.gz").run_id == run


def test_reader_bad_files_name_the_file_and_field(tmp_path):
    run = _write_run(tmp_path)
    req = tmp_path / "requests" / f"{run}.json.gz"
    gt = tmp_path / "requests" / f"{run}_ground_truth.json.gz"
    exp = tmp_path / "runs" / run / "exp-config.yaml"

    gt.unlink()
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, gt.name, "file not found")

    _write_run(tmp_path)
    req.write_bytes(req.read_bytes()[:-20])  # truncated gzip
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, req.name, "gzip")

    with gzip.open(req, "wt") as fh:
        fh.write('{"config": {}, "requests": [')
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, req.name, "malformed JSON")

    bad = [{"index": 0, "arrival_time_us": 0, "input_tokens": 5, "output_tokens": 2, "has_error": False},
           {"index": 1, "arrival_time_us": 1, "output_tokens": 2, "has_error": False}]
    _write_run(tmp_path, requests=bad)
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, req.name, "requests[1].input_tokens", "missing")

    bad[1]["input_tokens"] = "many"
    _write_run(tmp_path, requests=bad)
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, req.name, "requests[].input_tokens[1]")

    _write_run(tmp_path, truth=[{"index": 0, "has_error": False, "ttft_s": 0.05, "e2e_s": 1.05},
                                {"index": 1, "has_error": True, "e2e_s": 0.04},
                                {"index": 2, "has_error": True, "e2e_s": 300.0}])
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, gt.name, "[1].has_error", "disagrees")

    _write_run(tmp_path, truth=[{"index": 0, "has_error": False, "e2e_s": 1.05},
                                {"index": 1, "has_error": False, "ttft_s": 0.04, "e2e_s": 0.04},
                                {"index": 2, "has_error": True, "e2e_s": 300.0}])
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, gt.name, "[0].ttft_s")

    _write_run(tmp_path, exp="model: [unclosed\n")
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, exp.name, "malformed YAML")

    _write_run(tmp_path, exp="model: meta-llama/Llama-2-7b-hf\ntensor_parallelism: 2\n")
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, "tensor_parallelism")

    exp.unlink()
    with pytest.raises(InputError) as e:
        read_real_run(run, tmp_path)
    _one_line(e, exp.name, "file not found")

    with pytest.raises(InputError) as e:
        list_real_runs(tmp_path / "nowhere")
    _one_line(e, "nowhere")


# ---------------------------------------------------------------------------------------------------
# the 16 real runs

EXPECTED_MODELS = {"llama-2-7b": 1, "llama-2-70b": 4, "mixtral-8x7b": 2, "codellama-34b": 2}


@pytest.fixture(scope="module")
def real_runs():
    return {name: read_real_run(name, REAL) for name in list_real_runs(REAL)}


@needs_real
def test_all_real_runs_load(real_runs):
    assert len(real_runs) == 16
    assert sum(r.n_requests for r in real_runs.values()) == 151_200  # the data README's count
    by_workload = {}
    for name, r in real_runs.items():
        assert r.run_id == name and r.hardware == "H100-SXM"
        assert EXPECTED_MODELS[r.model] == r.tp
        by_workload.setdefault(r.workload, []).append(name)
        assert r.vllm["max_num_seqs"] == 128 and r.vllm["max_num_batched_tokens"] == 2048
        assert r.vllm["max_model_len"] == 4096 and r.vllm["block_size"] == 16 and r.vllm["kv_blocks_total_gpu"] > 0
        q = r.requests
        assert q["arrival_us"].is_monotonic_increasing and q["arrival_us"].iloc[0] >= 0
        ok = ~q["error"]
        assert (q.loc[ok, "ttft_us"] > 0).all() and (q.loc[ok, "e2e_us"] >= q.loc[ok, "ttft_us"]).all()
        assert (q.loc[ok, "prompt_tokens"] > 0).all()
        assert r.n_errors == r.reported["failures"]  # the error flags agree with inference-perf's count
        assert (q["prefix_tokens"] == r.shared_prefix["system_prompt_len"]).all()
        assert (q["prompt_id"] >= 0).all()  # the 100-prompt cycle is confirmed in every run
    assert {k: len(v) for k, v in by_workload.items()} == {"general": 4, "codegen": 4, "roleplay": 4, "reasoning": 4}
    reasoning = {r.run_id: r.n_errors / r.n_requests for r in real_runs.values() if r.workload == "reasoning"}
    assert sorted(reasoning.values())[1:] > [0.3] * 3  # 3 of 4 overloaded runs lose > 30% of their requests
    assert all(r.n_errors == 0 for r in real_runs.values() if r.workload != "reasoning")


@needs_real
def test_real_runs_saturation(real_runs):
    for name, r in real_runs.items():
        routing = route_run(r.requests_table(), failures=r.failures)
        assert not routing.flags["preemption_rate"]["available"]  # the client cannot see preemptions
        assert routing.flags["queue_growth"]["source"].startswith("ttft")
        if r.workload == "reasoning":
            assert routing.saturated and routing.n_flags >= 2, (name, routing.to_dict())
        else:
            assert not routing.saturated, (name, routing.to_dict())


@needs_real
def test_real_file_corrupt_copy(tmp_path):
    name = next(n for n in list_real_runs(REAL) if n.endswith("reasoning"))
    (tmp_path / "requests").mkdir()
    shutil.copytree(REAL / "runs" / name, tmp_path / "runs" / name)
    src = REAL / "requests" / f"{name}.json.gz"
    (tmp_path / "requests" / src.name).write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    shutil.copy(REAL / "requests" / f"{name}_ground_truth.json.gz", tmp_path / "requests")
    with pytest.raises(InputError) as e:
        read_real_run(name, tmp_path)
    _one_line(e, src.name)
