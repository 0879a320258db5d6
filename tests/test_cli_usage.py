"""The ``rooflab`` command line's contract with its user: usage errors and out-of-bounds flags are one ``error:``
line with exit status 2 and no side effect; ``--help``; and ``rooflab replay`` telling what it assumed (engine
defaults, trace notes, coefficient warnings), with the BLIS SimResult output and the P50/P90/P99 values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli.main import main
from rooflab.model.coefficients import Coefficients
from rooflab.replay.blis_output import write_blis_trace

ROOT = Path(__file__).resolve().parents[1]
COEFS = Coefficients({"beta1": 1.1, "beta2": 1.3, "beta3": 1.05, "beta4": 1.2, "beta5": 1.4, "beta6": 20.0,
                      "beta7": 300.0, "beta_layer": 12.0}, (12000.0, 800.0, 40.0), "roofline7+layers")


def _one_error_line(capsys, *needles: str) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# usage errors


@pytest.mark.parametrize("argv, needles", [
    (["models", "--bogus"], ["No such option: --bogus", "rooflab models --help"]),
    (["collect", "--campaign", "smoke", "--limit", "abc"], ["--limit", "rooflab collect --help"]),
    (["fit"], ["Missing option '--steps'"]),
    (["nosuch"], ["No such command 'nosuch'"]),
    (["collect", "--campaign", "smoke", "--limit"], ["--limit", "requires an argument"]),
    (["replay", "--coefficients", "x.json"], ["Missing option '--requests'"]),
], ids=["unknown-option", "bad-int", "missing-option", "unknown-command", "option-without-value", "missing-repeat"])
def test_usage_errors_are_one_line(capsys, argv, needles):
    assert main(argv) == 2
    _one_error_line(capsys, *needles)
    assert capsys.readouterr().out == ""


def test_help_and_no_arguments(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich shortens long option names to fit the terminal
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "replay" in out and "calibrate-e2e" in out and "collect" in out
    assert main(["replay", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--vllm-version", "--gpu-memory-utilization", "--max-concurrency", "--blis-results"):
        assert flag in out
    assert "BLIS" in out
    assert main([]) == 2  # as typer's no_args_is_help: the help, status 2
    assert "fit" in capsys.readouterr().out


def test_a_commands_exit_status_is_mains(capsys):
    """typer hands a command's exit status back instead of raising it: main() returns it (the twin's argparse
    exits 2 on a usage error, 0 on --help)."""
    assert main(["twin", "serve", "--bogus"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["twin", "serve", "--help"]) == 0
    assert "--model" in capsys.readouterr().out


def test_python_dash_m_cli_usage_error_is_one_line():
    p = subprocess.run([sys.executable, "-m", "cli", "collect", "--campaign", "smoke", "--limit", "abc"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "--limit" in p.stderr


# ---------------------------------------------------------------------------------------------------
# bounds, checked before anything is written


@pytest.mark.parametrize("flags, needle", [
    (["--limit", "-1"], "--limit: must be >= 1, got -1"),
    (["--limit", "0"], "--limit: must be >= 1"),
    (["--replicates", "0"], "--replicates: must be between 1 and 100"),
    (["--replicates", "-2"], "--replicates"),
    (["--replicates", "1000000"], "--replicates"),
    (["--concurrency", "0"], "--concurrency: must be between 1 and 256"),
    (["--concurrency", "257"], "--concurrency"),
    (["--max-retries", "-1"], "--max-retries: must be between 0 and 20"),
    (["--max-retries", "21"], "--max-retries"),
])
def test_collect_bounds(tmp_path, capsys, flags, needle):
    store = tmp_path / "store"
    assert main(["collect", "--campaign", "smoke", "--store", str(store), "--launcher", "direct", *flags]) == 2
    _one_error_line(capsys, needle)
    assert not store.exists()


@pytest.mark.parametrize("flag, value, field", [
    ("--batch-size", "0", "loop.batch_size"),
    ("--max-iterations", "0", "loop.max_iterations"),
    ("--boot", "0", "loop.n_boot"),
])
def test_campaign_loop_overrides_are_checked_before_the_flow(tmp_path, capsys, flag, value, field):
    store, mlruns = tmp_path / "store", tmp_path / "mlruns"
    assert main(["campaign", "--campaign", "smoke", "--fast", "--store", str(store), "--mlruns", str(mlruns),
                 flag, value]) == 2
    _one_error_line(capsys, field)
    assert not store.exists() and not mlruns.exists()  # no iteration plan saved, no tracking store created


@pytest.mark.parametrize("argv", [
    ["collect", "--campaign", "smoke", "--launcher", "direct", "--store", "{file}"],
    ["campaign", "--campaign", "smoke", "--fast", "--store", "{file}", "--mlruns", "{dir}/mlruns"],
    ["campaign", "--campaign", "smoke", "--fast", "--store", "{dir}/store", "--mlruns", "{file}"],
    ["collect", "--campaign", "smoke", "--launcher", "direct", "--store", "{file}/sub"],
], ids=["collect-store", "campaign-store", "campaign-mlruns", "below-a-file"])
def test_store_folders_that_are_files(tmp_path, capsys, argv):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    argv = [a.format(file=f, dir=tmp_path) for a in argv]
    assert main(argv) == 2
    _one_error_line(capsys, str(f))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_store_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["collect", "--campaign", "smoke", "--launcher", "direct", "--store", str(ro / "store")]) == 2
        _one_error_line(capsys, str(ro), "not writable")
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------------
# replay of a BLIS trace


def _blis_trace(folder: Path, n: int = 40, seed: int = 0) -> Path:
    """A small BLIS TraceV3 (header + CSV) of an open-loop client: llama-3.1-8b TP1, the header naming only
    max_num_seqs of the engine (so the rest is assumed)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(20, 80, n)
    ttft = rng.uniform(20_000, 40_000, n)
    frame = pd.DataFrame({"request_id": [str(i) for i in range(n)], "arrival_us": np.arange(n) * 20_000.0,
                          "prompt_tokens": rng.integers(100, 600, n), "output_tokens": out, "ttft_us": ttft,
                          "e2e_us": ttft + (out - 1) * 9_000.0, "failed": False})
    header = {"server": {"type": "vllm", "model": "meta-llama/Llama-3.1-8B-Instruct", "tensor_parallel": 1,
                         "max_num_seqs": 64}}
    write_blis_trace(frame, header, folder)
    return folder


def _coefs(tmp_path: Path, **extra) -> Path:
    p = tmp_path / "coefs.json"
    p.write_text(json.dumps({**COEFS.to_dict(), **extra}))
    return p


def test_replay_of_a_blis_trace_says_what_it_assumed(tmp_path, capsys):
    trace = _blis_trace(tmp_path / "exp1")
    out, res, per = tmp_path / "m.json", tmp_path / "sim_results.json", tmp_path / "per.csv"
    assert main(["replay", "--coefficients", str(_coefs(tmp_path)), "--requests", str(trace),
                 "--max-concurrency", "2", "--out", str(out), "--blis-results", str(res),
                 "--per-request", str(per)]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assumed = [x for x in lines if x.startswith("assumed: exp1: ")]
    assert any("max_num_batched_tokens = 8192" in x and "H100-SXM" in x for x in assumed), cap.out
    assert any("enable_prefix_caching = True" in x for x in assumed)
    assert any("KV cache = " in x and "gpu_memory_utilization 0.9" in x for x in assumed)
    assert not any("max_num_seqs" in x for x in assumed)  # the header gave it
    notes = [x for x in lines if x.startswith("note: exp1: ")]
    assert any("H100-SXM assumed" in x for x in notes)  # the BLIS reader's warning
    assert any("concurrency cap 2" in x for x in notes)
    assert "E2E" in cap.out and cap.err == ""

    doc = json.loads(out.read_text())
    run = doc["runs"]["exp1"]
    assert run["setup"]["max_concurrency"] == 2 and run["setup"]["engine"]["max_num_batched_tokens"] == 8192
    assert run["setup"]["assumed"] == [x.removeprefix("assumed: exp1: ") for x in assumed]
    for m in ("ttft", "e2e"):
        for q in (50, 90, 99):
            assert run[m][f"measured_p{q}_ms"] > 0 and run[m][f"predicted_p{q}_ms"] > 0
        assert run[m]["measured_p50_ms"] <= run[m]["measured_p90_ms"] <= run[m]["measured_p99_ms"]
    # the measured P90 is the P90 of the trace's E2E
    frame = pd.read_csv(per)
    assert run["e2e"]["measured_p90_ms"] == pytest.approx(np.percentile(frame["e2e_us"], 90) / 1e3)

    # the cap: never more than 2 requests in flight; some waited for a slot
    send, end = frame["pred_send_us"].to_numpy(), (frame["pred_send_us"] + frame["pred_e2e_us"]).to_numpy()
    in_flight = [int(((send <= t) & (t < end)).sum()) for t in send]
    assert max(in_flight) <= 2
    assert (frame["pred_send_us"] > frame["arrival_us"] + 1).any()

    results = json.load(res.open())
    assert isinstance(results, list) and len(results) == 40
    assert all(isinstance(r, dict) and {"request_id", "ttft_us", "e2e_us"} <= set(r) for r in results)
    assert run["blis_results"] == str(res)


def test_replay_flags_replace_assumptions(tmp_path, capsys):
    trace = _blis_trace(tmp_path / "exp1")
    coefs = _coefs(tmp_path)
    blocks = {}
    for gmu in ("0.9", "0.5"):
        assert main(["replay", "--coefficients", str(coefs), "--requests", str(trace), "--json",
                     "--gpu-memory-utilization", gmu, "--max-num-batched-tokens", "2048", "--hardware", "H200",
                     "--vllm-version", "0.11.0"]) == 0
        cap = capsys.readouterr()
        run = json.loads(cap.out)["runs"]["exp1"]  # stdout is only the JSON; the lines go to stderr
        assert run["setup"]["hardware"] == "H200"
        assert not any("max_num_batched_tokens" in a for a in run["setup"]["assumed"])
        assert not any("gpu_memory_utilization =" in a for a in run["setup"]["assumed"])
        assert any(f"gpu_memory_utilization {float(gmu):g}" in a for a in run["setup"]["assumed"])
        assert any("vLLM 0.11.0" in a for a in run["setup"]["assumed"])
        assert "assumed: exp1: " in cap.err and not any("H100-SXM assumed" in n for n in run["setup"]["notes"])
        blocks[gmu] = run["replay"]["blocks"]
    assert blocks["0.5"] < blocks["0.9"]


@pytest.mark.parametrize("flags, needle", [
    (["--max-concurrency", "0"], "--max-concurrency: must be >= 1"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization: must be in (0, 1]"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--max-num-seqs", "0"], "--max-num-seqs: must be >= 1"),
])
def test_replay_bounds(tmp_path, capsys, flags, needle):
    trace = _blis_trace(tmp_path / "exp1")
    out = tmp_path / "m.json"
    assert main(["replay", "--coefficients", str(_coefs(tmp_path)), "--requests", str(trace), "--out", str(out),
                 *flags]) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()


def test_blis_results_of_several_traces(tmp_path, capsys):
    a, b = _blis_trace(tmp_path / "exp1"), _blis_trace(tmp_path / "exp2", seed=1)
    coefs = _coefs(tmp_path)
    res = tmp_path / "out" / "sim.json"
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(a), "--requests", str(b),
                 "--blis-results", str(res)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in res.parent.iterdir()) == ["sim.exp1.json", "sim.exp2.json"]
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(a), "--blis-results", str(folder)]) == 0
    capsys.readouterr()
    assert [p.name for p in folder.iterdir()] == ["exp1.json"]
    # the same run twice is refused, not silently merged
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(a), "--requests", str(a)]) == 2
    _one_error_line(capsys, "exp1")


def test_replay_warns_about_the_coefficient_set(tmp_path, capsys):
    trace = _blis_trace(tmp_path / "exp1")
    health = {"overall": "fail", "checks": [
        {"check": "leave-one-run-out change", "target": "beta3", "status": "fail"},
        {"check": "condition number", "target": "design", "status": "pass"}]}
    coefs = _coefs(tmp_path, health=health)
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(trace)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the coefficient set's own health check failed ("), err
    assert "leave-one-run-out change: beta3" in err[0] and "condition number" not in err[0]

    doc = COEFS.to_dict()
    doc["alpha"]["coefficients"]["alpha0"]["value"] = 0.0
    doc["alpha"]["coefficients"]["alpha2"]["value"] = 100.0
    doc["health"] = {"overall": "warn", "checks": []}
    coefs.write_text(json.dumps(doc))
    out = tmp_path / "m.json"
    assert main(["replay", "--coefficients", str(coefs), "--requests", str(trace), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "alpha0 = 0 µs" in err[0] and "lower bound" in err[0]
    assert "alpha2 = 100 µs/token" in err[1] and "upper bound" in err[1]
    assert len(json.loads(out.read_text())["warnings"]) == 2


def test_calibrate_e2e_on_a_blis_trace(tmp_path, capsys):
    trace = _blis_trace(tmp_path / "exp1")
    out = tmp_path / "e2e.json"
    assert main(["calibrate-e2e", "--requests", str(trace / "trace.yaml"), "--iterations", "1", "--polish", "0",
                 "--window-s", "0", "--out", str(out), "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert "assumed: exp1: " in cap.err
    assert doc["setup"]["exp1"]["model"] == "llama-3.1-8b"
    assert doc["full_replay"]["exp1"]["e2e"]["measured_p99_ms"] > 0
    assert json.loads(out.read_text())["format"] == "rooflab.coefficients/1"
