"""BLIS TraceV2/V3 files (docs/blis.md §9): reading observe / run exports into a rooflab trace, auto-detection,
the client concurrency cap, one-line errors, and writing replay predictions back in BLIS's formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rooflab.data.adapters.blis_trace import (
    BlisTrace,
    find_blis_trace,
    infer_concurrency_cap,
    is_blis_trace,
    read_blis_trace,
    read_itl_means,
)
from rooflab.errors import InputError
from rooflab.model.coefficients import Coefficients
from rooflab.replay.blis_output import (
    blis_header_for,
    blis_request_id,
    blis_results,
    write_blis_results,
    write_blis_trace,
)
from rooflab.replay.predict import replay

T = 1_700_000_000_000_000  # observe's send / chunk times are absolute Unix µs
# the data CSV's columns as BLIS writes them, vllm_priority (optional) after slo_class
COLUMNS = ["request_id", "client_id", "tenant_id", "slo_class", "vllm_priority", "session_id", "round_index",
           "prefix_group", "prefix_length", "streaming", "input_tokens", "output_tokens", "text_tokens",
           "image_tokens", "audio_tokens", "video_tokens", "reason_ratio", "model", "deadline_us",
           "server_input_tokens", "arrival_time_us", "send_time_us", "first_chunk_time_us", "last_chunk_time_us",
           "num_chunks", "status", "error_message", "finish_reason"]
DEFAULTS = {"client_id": "c0", "tenant_id": "", "slo_class": "standard", "vllm_priority": 0, "session_id": "",
            "round_index": 0, "prefix_group": "", "prefix_length": 0, "streaming": "true", "text_tokens": 0,
            "image_tokens": 0, "audio_tokens": 0, "video_tokens": 0, "reason_ratio": 0, "model": "",
            "deadline_us": 0, "server_input_tokens": 0, "num_chunks": 0, "status": "ok", "error_message": "",
            "finish_reason": "length"}
OBSERVE_HEADER = """\
trace_version: 3
time_unit: us
created_at: "2026-01-01T00:00:00Z"
mode: real
warm_up_requests: 1
server:
  type: vllm
  model: Qwen/Qwen3-14B
  tensor_parallel: 2
  max_num_seqs: 64
  block_size: 16
network:
  measured_rtt_ms: 0.5
"""
# id, group, prefix, suffix, out, server_in, arrival(offset), send, first, last, status
OBSERVE_ROWS = [
    (0, "", 0, 100, 10, 0, 0, T, T + 20_000, T + 65_000, "ok"),  # warm-up
    (1, "sys", 64, 36, 20, 100, 100_000, T + 100_000, T + 130_000, T + 206_000, "ok"),
    (2, "sys", 64, 50, 5, 120, 200_000, T + 250_000, T + 290_000, T + 330_000, "ok"),  # waited 50 ms to be sent
    (3, "", 0, 80, 0, 0, 300_000, T + 300_000, 0, 0, "error"),
    (4, "", 0, 80, 0, 0, 400_000, 0, 0, 0, "error"),  # failed before it was sent
    (5, "", 0, 200, 1, 0, 500_000, T + 500_000, T + 540_000, T + 540_000, "ok"),
]
# request 1's chunks out of order, one negative delta (skipped); request 2 has one chunk; 99 is not in the trace
ITL_CSV = f"""request_id,chunk_index,timestamp_us
1,1,{T + 133_000}
1,0,{T + 130_000}
1,2,{T + 139_000}
1,3,{T + 138_000}
2,0,{T + 290_000}
99,0,1
99,1,5
"""


def _rows(spec: list[tuple]) -> list[dict]:
    keys = ("request_id", "prefix_group", "prefix_length", "input_tokens", "output_tokens", "server_input_tokens",
            "arrival_time_us", "send_time_us", "first_chunk_time_us", "last_chunk_time_us", "status")
    return [dict(DEFAULTS, **dict(zip(keys, r))) for r in spec]


def _write(folder: Path, header: str, rows: list[dict], *, name: str = "trace", columns: list[str] = COLUMNS,
           itl: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(header)
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    if itl is not None:
        (folder / f"{name}.itl.csv").write_text(itl)
    return folder


@pytest.fixture
def observed(tmp_path: Path) -> Path:
    return _write(tmp_path / "obs", OBSERVE_HEADER, _rows(OBSERVE_ROWS), itl=ITL_CSV)


def test_reads_every_field_of_an_observe_trace(observed: Path):
    bt = read_blis_trace(observed, hardware="H200")
    assert isinstance(bt, BlisTrace)
    t = bt.trace
    assert (t.model, t.tp, t.hardware, t.run_id) == ("qwen3-14b", 2, "H200", "obs")  # HF id resolved
    assert t.engine == {"max_num_seqs": 64, "block_size": 16}  # what server records; nothing made up
    assert bt.header["network"] == {"measured_rtt_ms": 0.5}
    r = t.requests.set_index("request_id")
    assert list(t.requests["request_id"]) == ["0", "1", "2", "3", "4", "5"]
    # start = send time (absolute clock), relative to the first; a request never sent starts on schedule
    assert r["arrival_us"].tolist() == [0, 100_000, 250_000, 300_000, 400_000, 500_000]
    assert r["scheduled_arrival_us"].tolist() == [0, 100_000, 200_000, 300_000, 400_000, 500_000]
    # prompt = prefix + suffix, or the server's count when it reported one
    assert r["prompt_tokens"].tolist() == [100, 100, 120, 80, 80, 200]
    assert r.loc["1", "prefix_group"] == "sys" and r.loc["1", "prefix_tokens"] == 64
    assert pd.isna(r.loc["0", "prefix_group"]) and r.loc["0", "prefix_tokens"] == 0
    assert any("differ" in n and "1 of 2" in n for n in t.notes)
    assert r["failed"].tolist() == [False, False, False, True, True, False]
    assert r["scored"].tolist() == [False, True, True, True, True, True]  # id < warm_up_requests
    assert r.loc["3", "output_tokens"] == r.loc["4", "output_tokens"] == 8  # median completed output (7.5)
    assert r.loc["5", "output_tokens"] == 1
    # measured latencies count from the send
    assert r.loc["2", "ttft_us"] == 40_000 and r.loc["2", "e2e_us"] == 80_000
    assert r.loc["1", "ttft_us"] == 30_000 and r.loc["1", "e2e_us"] == 106_000
    assert np.isnan(r.loc["3", "ttft_us"]) and np.isnan(r.loc["4", "e2e_us"])
    # ITL: request 1 from its chunk times (3000, 6000; -1000 skipped), the rest from (E2E - TTFT)/(out - 1)
    assert r.loc["1", "itl_us"] == 4500
    assert r.loc["2", "itl_us"] == 10_000 and r.loc["0", "itl_us"] == 5000
    assert np.isnan(r.loc["5", "itl_us"])
    assert any("99" in w or "not in the trace" in w for w in bt.warnings)
    assert r.loc["1", "slo_class"] == "standard" and r.loc["3", "status"] == "error"
    assert bt.files.itl == observed / "trace.itl.csv"
    assert bt.max_concurrency is None and t.timeout_s is None


def test_itl_means_follow_blis_calibrate(tmp_path: Path):
    p = tmp_path / "x.itl.csv"
    p.write_text(ITL_CSV)
    assert read_itl_means(p) == {1: 4500.0, 99: 4.0}


def test_cli_arguments_override_the_header(observed: Path):
    bt = read_blis_trace(observed / "trace.csv", tp=4, model="meta-llama/Llama-3.1-8B-Instruct",
                         engine_overrides={"num_gpu_blocks": 900, "max_num_seqs": 8})
    assert (bt.trace.model, bt.trace.tp, bt.trace.hardware) == ("llama-3.1-8b", 4, "H100-SXM")
    assert bt.trace.engine == {"max_num_seqs": 8, "block_size": 16, "num_gpu_blocks": 900}
    assert any("hardware" in w for w in bt.warnings)


def test_run_export_starts_on_schedule_and_keeps_its_deadline(tmp_path: Path):
    """``blis run --trace-output``: microseconds, mode generated, no server block, send = arrival, deadline =
    arrival + 300 s, streaming false (a simulator TTFT is still a TTFT)."""
    header = "trace_version: 3\ntime_unit: microseconds\nmode: generated\nwarm_up_requests: 0\nworkload_seed: 42\n"
    rows = [dict(DEFAULTS, request_id=i, prefix_group="shared", prefix_length=64, input_tokens=300 + i,
                 output_tokens=50, streaming="false", arrival_time_us=200_000 * (i + 1),
                 send_time_us=200_000 * (i + 1), first_chunk_time_us=200_000 * (i + 1) + 30_000,
                 last_chunk_time_us=200_000 * (i + 1) + 30_000 + 49 * 12_000,
                 deadline_us=200_000 * (i + 1) + 300_000_000, slo_class="") for i in range(4)]
    cols = [c for c in COLUMNS if c != "vllm_priority"]
    _write(tmp_path, header, rows, name="run1", columns=cols)
    bt = read_blis_trace(tmp_path / "run1.yaml", model="Qwen/Qwen3-14B", tp=1)
    r = bt.trace.requests
    assert r["arrival_us"].tolist() == [0, 200_000, 400_000, 600_000]
    assert (r["arrival_us"] == r["scheduled_arrival_us"]).all()
    assert (r["ttft_us"] == 30_000).all() and (r["itl_us"] == 12_000).all()
    assert r["prompt_tokens"].tolist() == [364, 365, 366, 367]
    assert bt.trace.timeout_s == 300.0 and bt.trace.run_id == "run1"
    assert bt.trace.engine == {}


def test_auto_detection(observed: Path, tmp_path: Path):
    for p in (observed, observed / "trace.yaml", observed / "trace.csv"):
        assert is_blis_trace(p)
        f = find_blis_trace(p)
        assert (f.header, f.data, f.itl) == (observed / "trace.yaml", observed / "trace.csv",
                                             observed / "trace.itl.csv")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.csv").write_text("a,b\n1,2\n")
    assert not is_blis_trace(other) and not is_blis_trace(other / "x.csv") and not is_blis_trace(tmp_path / "nope")
    _write(tmp_path / "one", OBSERVE_HEADER, _rows(OBSERVE_ROWS), name="exp7")  # a folder's only pair
    assert find_blis_trace(tmp_path / "one").data.name == "exp7.csv"
    assert find_blis_trace(tmp_path / "one").itl is None


# the client concurrency cap


def _capped_rows(n: int = 80, cap: int = 4, *, queue: bool, seed: int = 1) -> list[dict]:
    """A closed-loop client: ``cap`` slots; with ``queue`` requests are scheduled every 10 ms (faster than the
    server) and wait for a slot (``--max-concurrency``), else each user resends as a reply ends (``--concurrency``)."""
    rng = np.random.default_rng(seed)
    free = [T] * cap
    rows = []
    for i in range(n):
        slot = int(np.argmin(free))
        sched = T + i * 10_000 if queue else free[slot] + 200
        send = max(sched, free[slot] + 200)
        dur = int(rng.integers(50_000, 150_000))
        free[slot] = send + dur
        rows.append((i, "", 0, 100, 10, 0, sched - T, send, send + dur // 5, send + dur, "ok"))
    return _rows(rows)


def _open_rows(n: int = 80, seed: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(40_000, n)).astype(int)
    dur = rng.integers(50_000, 150_000, n)
    return _rows([(i, "", 0, 100, 10, 0, int(a), T + int(a), T + int(a + d // 5), T + int(a + d), "ok")
                  for i, (a, d) in enumerate(zip(arr, dur))])


@pytest.mark.parametrize("queue", [True, False])
def test_a_closed_loop_client_is_recognised(tmp_path: Path, queue: bool):
    bt = read_blis_trace(_write(tmp_path, OBSERVE_HEADER.replace("warm_up_requests: 1", "warm_up_requests: 0"),
                                _capped_rows(queue=queue)))
    assert bt.max_concurrency == 4 and bt.concurrency_source == "inferred"
    assert any("concurrency cap 4" in n for n in bt.trace.notes)


def test_an_open_loop_client_has_no_cap(tmp_path: Path):
    bt = read_blis_trace(_write(tmp_path, OBSERVE_HEADER, _open_rows()))
    assert bt.max_concurrency is None and bt.concurrency_source is None
    assert infer_concurrency_cap(bt.trace) is None


def test_the_cap_comes_from_a_concurrency_workload_spec(tmp_path: Path):
    (tmp_path / "wl.yaml").write_text("version: '2'\nclients:\n  - id: a\n    concurrency: 3\n"
                                      "  - id: b\n    concurrency: 2\n")
    bt = read_blis_trace(_write(tmp_path, OBSERVE_HEADER + "workload_spec: wl.yaml\n", _open_rows()))
    assert (bt.max_concurrency, bt.concurrency_source) == (5, "workload_spec")


# one-line errors


def _edit(folder: Path, name: str, old: str, new: str) -> None:
    p = folder / name
    assert old in p.read_text()
    p.write_text(p.read_text().replace(old, new, 1))


@pytest.mark.parametrize("file, old, new, field", [
    ("trace.yaml", "trace_version: 3", "trace_version: [3", None),  # bad YAML
    ("trace.yaml", "mode: real", "mode: real\nfoo: 1", "foo"),
    ("trace.yaml", "  block_size: 16", "  tp: 2", "server.tp"),
    ("trace.yaml", "time_unit: us", "time_unit: ms", "time_unit"),
    ("trace.yaml", "trace_version: 3", "trace_version: 4", "trace_version"),
    ("trace.yaml", "model: Qwen/Qwen3-14B", "model: acme/Frobnicator-7B", "server.model"),
    ("trace.yaml", "  tensor_parallel: 2\n", "", "server.tensor_parallel"),
    ("trace.csv", "send_time_us,", "sent_us,", "send_time_us"),
    ("trace.csv", ",sys,64,true,50,", ",sys,64,true,abc,", "input_tokens"),
    ("trace.csv", ",sys,64,true,36,20,", ",sys,64,true,36,-20,", "output_tokens"),
    ("trace.csv", f",{T + 206_000},", f",{T + 99_000},", "last_chunk_time_us"),
    ("trace.csv", "\n5,c0,", "\n4,c0,", "request_id"),
    ("trace.itl.csv", "1,2,", "1,x,", "chunk_index"),
])
def test_malformed_input_is_one_line_naming_file_and_field(observed: Path, file: str, old: str, new: str,
                                                           field: str | None):
    _edit(observed, file, old, new)
    with pytest.raises(InputError) as exc:
        read_blis_trace(observed)
    msg = str(exc.value)
    assert "\n" not in msg
    assert file in msg
    if field:
        assert field in msg
    if "Frobnicator" in new:
        assert "closest known:" in msg
    if "abc" in new:
        assert "row 3" in msg


def test_missing_files_and_bad_arguments_are_one_line(observed: Path, tmp_path: Path):
    (observed / "trace.yaml").rename(observed / "header.txt")
    for path in (observed / "trace.csv", observed):
        with pytest.raises(InputError) as exc:
            read_blis_trace(path)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    (observed / "header.txt").rename(observed / "trace.yaml")
    (observed / "trace.csv").rename(observed / "data.bin")
    with pytest.raises(InputError, match="no data CSV"):
        read_blis_trace(observed / "trace.yaml")
    (observed / "data.bin").rename(observed / "trace.csv")
    with pytest.raises(InputError, match="engine_overrides.max_batch"):
        read_blis_trace(observed, engine_overrides={"max_batch": 3})
    (observed / "trace.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(InputError, match="no requests"):
        read_blis_trace(observed)


# writing BLIS's formats


COEFS = Coefficients({"beta1": 1.1, "beta2": 1.3, "beta3": 1.05, "beta4": 1.2, "beta5": 1.4, "beta6": 20.0,
                      "beta7": 300.0, "beta_layer": 12.0}, (12000.0, 800.0, 40.0), "roofline7+layers")


def test_results_json_has_blis_simresult_shape(tmp_path: Path):
    frame = pd.DataFrame({
        "request_id": ["request_3", "1", "r7", "2", "0"], "prompt_tokens": [100.0, 50, 70, 80, 90],
        "output_tokens": [10.0, 1, 5, 4, 3], "pred_ttft_us": [1000.5, 2000, 3000, np.nan, 500],
        "pred_e2e_us": [5000.0, 2000, 9000, np.nan, 900], "pred_itl_us": [444.5, np.nan, 1500, np.nan, 200],
        "pred_failed": [False, False, False, True, True]})
    assert [blis_request_id(x) for x in ("request_12", "12", 12, "r12", "request_x")] == [12, 12, 12, None, None]
    path = write_blis_results(frame, tmp_path / "results.json")
    got = json.loads(path.read_text())
    assert got == blis_results(frame)
    assert [g["request_id"] for g in got] == [1, 3]  # sorted; failed and non-numeric ids left out
    assert got[1] == {"request_id": 3, "ttft_us": 1000.5, "e2e_us": 5000.0, "input_tokens": 100,
                      "output_tokens": 10, "itl_mean_us": 444.5}
    assert "itl_mean_us" not in got[0]  # one output token: no ITL (BLIS omits a zero)
    assert all(isinstance(g[k], int) for g in got for k in ("request_id", "input_tokens", "output_tokens"))
    with pytest.raises(InputError, match="pred_e2e_us"):
        blis_results(frame.drop(columns="pred_e2e_us"))


def test_a_replay_round_trips_through_blis_files(observed: Path, tmp_path: Path):
    bt = read_blis_trace(observed, engine_overrides={"num_gpu_blocks": 2000, "enable_prefix_caching": True,
                                                     "max_num_batched_tokens": 2048})
    res = replay(bt.trace, COEFS)
    p = res.requests
    results = json.loads(write_blis_results(p, tmp_path / "res.json").read_text())
    done = p[~p["pred_failed"]]
    assert [r["request_id"] for r in results] == sorted(int(i) for i in done["request_id"])
    by_id = {r["request_id"]: r for r in results}
    for row in done.itertuples():
        assert by_id[int(row.request_id)]["ttft_us"] == pytest.approx(row.pred_ttft_us)
        assert by_id[int(row.request_id)]["input_tokens"] == int(row.prompt_tokens)

    files = write_blis_trace(p, blis_header_for(bt.trace), tmp_path / "pred")
    assert files.header.name == "trace.yaml" and is_blis_trace(files.header)
    back = read_blis_trace(tmp_path / "pred", hardware=bt.trace.hardware)
    assert back.header["mode"] == "replayed" and back.header["warm_up_requests"] == 1
    assert (back.trace.model, back.trace.tp) == (bt.trace.model, bt.trace.tp)
    assert back.trace.engine == {"max_num_seqs": 64, "block_size": 16}  # what a header's server block holds
    a, b = p.set_index("request_id"), back.trace.requests.set_index("request_id")
    assert list(b.index) == list(a.index)
    for c in ("arrival_us", "prompt_tokens", "output_tokens", "prefix_tokens", "scored"):
        assert b[c].tolist() == a[c].tolist(), c
    assert b["prefix_group"].fillna("").tolist() == a["prefix_group"].fillna("").tolist()
    assert b["failed"].tolist() == a["pred_failed"].tolist()
    ok = ~a["pred_failed"]
    np.testing.assert_allclose(b.loc[ok, "ttft_us"], a.loc[ok, "pred_ttft_us"], atol=1.0)
    np.testing.assert_allclose(b.loc[ok, "e2e_us"], a.loc[ok, "pred_e2e_us"], atol=1.0)


def test_trace_writer_renumbers_foreign_ids_and_refuses_unknown_header_keys(tmp_path: Path):
    frame = pd.DataFrame({"request_id": ["b", "a"], "arrival_us": [2000.0, 0.0], "prompt_tokens": [10.0, 20.0],
                          "output_tokens": [3.0, 4.0], "ttft_us": [100.0, 200.0], "e2e_us": [400.0, 900.0],
                          "failed": [False, False]})
    files = write_blis_trace(frame, {"server": {"model": "Qwen/Qwen3-14B", "tensor_parallel": 1}}, tmp_path,
                             name="x", timeout_s=30)
    back = read_blis_trace(files.data).trace
    assert back.requests["request_id"].tolist() == ["0", "1"] and back.requests["prompt_tokens"].tolist() == [20, 10]
    assert back.timeout_s == 30
    with pytest.raises(InputError, match="header.speed"):
        write_blis_trace(frame, {"speed": 1}, tmp_path)
    with pytest.raises(InputError, match="header.server.tp"):
        write_blis_trace(frame, {"server": {"tp": 1}}, tmp_path)
