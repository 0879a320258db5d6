"""Tests of the ``rooflab`` command line (``cli.main.main``)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli.main import main
from rooflab.model.features import featurize
from rooflab.model.variants import get_variant

REAL_STEPS = Path(__file__).resolve().parents[1].parent / "shared" / "data/real/steps/h100_step_records.parquet"
GPUS = ["H100-SXM", "H200", "A100-80GB", "L40S", "B200"]
TRUE_BETA = np.array([1.5, 1.2, 0.9, 1.0, 3.0, 20.0, 300.0])


def _stderr_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Listings


def test_models_lists_shipped_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) >= 15
    by_name = {line.split()[0]: line for line in lines}
    assert "deepseek-v3" in by_name and "mixtral-8x7b" in by_name
    assert "MLA+MoE 256x top-8" in by_name["deepseek-v3"] and "fp8" in by_name["deepseek-v3"]
    assert "MoE 8x top-2" in by_name["mixtral-8x7b"]
    assert "dense" in by_name["llama-3.1-8b"]


def test_hardware_lists_all_gpus(capsys):
    assert main(["hardware"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert sorted(names) == sorted(GPUS + ["CPU-EPYC-Zen2-1core"])  # + the CPU integration test's machine
    h100 = next(line for line in out.splitlines() if line.startswith("H100-SXM"))
    assert "989.5" in h100 and "3.35" in h100
    a100 = next(line for line in out.splitlines() if line.startswith("A100-80GB"))
    assert "fp8 -" in a100


# ---------------------------------------------------------------------------------------------------
# Input errors: exit status 2 and one "error:" line on stderr


def test_fit_missing_steps_file(tmp_path, capsys):
    p = tmp_path / "nope" / "missing_steps.parquet"
    assert main(["fit", "--steps", str(p)]) == 2
    _stderr_error_line(capsys, str(p))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("args, needle", [
    (["--variant", "roofline99"], "roofline99"),
    (["--formulas", "magic"], "magic"),
    (["--prior", "notanumber"], "notanumber"),
    (["--prior", "-1"], "--prior"),
], ids=["variant", "formulas", "prior", "negative_prior"])
def test_fit_bad_options(tmp_path, capsys, args, needle):
    p = tmp_path / "steps.parquet"
    assert main(["fit", "--steps", str(p), *args]) == 2
    _stderr_error_line(capsys, needle)


def test_fit_bad_step_table(tmp_path, capsys):
    p = tmp_path / "bad_steps.csv"
    pd.DataFrame({"run_id": ["r"], "step_id": [0]}).to_csv(p, index=False)
    assert main(["fit", "--steps", str(p)]) == 2
    _stderr_error_line(capsys, str(p), "model")


# ---------------------------------------------------------------------------------------------------
# A fit on synthetic steps with known β


@pytest.fixture(scope="module")
def synthetic_steps(tmp_path_factory):
    rng = np.random.default_rng(42)
    frames = []
    for r, tp in enumerate([1, 2, 1, 2]):
        n = 250
        pf_reqs = rng.integers(0, 3, n).astype(float)
        pf_tokens = np.where(pf_reqs > 0, pf_reqs * rng.integers(64, 1024, n), 0.0)
        pf_ctx = np.where(pf_reqs > 0, rng.integers(0, 2048, n), 0.0).astype(float)
        dc_reqs = rng.integers(1, 128, n).astype(float)
        dc_ctx = dc_reqs * rng.integers(100, 4000, n)
        frames.append(pd.DataFrame({
            "run_id": f"run{r}", "step_id": np.arange(n), "model": "llama-3.1-8b", "tp": tp,
            "hardware": "H100-SXM", "prefill_reqs": pf_reqs, "prefill_tokens": pf_tokens,
            "prefill_context": pf_ctx, "decode_reqs": dc_reqs, "decode_context": dc_ctx.astype(float),
        }))
    steps = pd.concat(frames, ignore_index=True)
    X = get_variant("roofline7").design_matrix(featurize(steps))
    steps["step_time_us"] = X @ TRUE_BETA * rng.lognormal(0.0, 0.02, len(steps))
    cols = ["run_id", "step_id", "model", "tp", "hardware", "step_time_us", "prefill_reqs", "prefill_tokens",
            "prefill_context", "decode_reqs", "decode_context"]
    p = tmp_path_factory.mktemp("synthetic") / "steps.parquet"
    steps[cols].to_parquet(p)
    return p


def _fit_json(capsys, *argv):
    rc = main(["fit", "--variant", "roofline7", *argv])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_fit_json_recovers_beta(synthetic_steps, capsys):
    doc = _fit_json(capsys, "--steps", str(synthetic_steps), "--boot", "20", "--json")
    assert {"beta", "health", "accuracy", "routing"} <= set(doc)
    coefs = doc["beta"]["coefficients"]
    assert list(coefs) == get_variant("roofline7").names
    b1 = coefs["beta1"]["value"]
    assert abs(b1 - TRUE_BETA[0]) / TRUE_BETA[0] < 0.10, b1
    assert coefs["beta1"]["lower"] <= b1 <= coefs["beta1"]["upper"]
    assert abs(coefs["beta2"]["value"] - TRUE_BETA[1]) / TRUE_BETA[1] < 0.10
    total = doc["routing"]["total"]
    assert total["steps"] == 1000 and total["with_step_time"] == 1000 and total["fit"] == 1000
    assert total["saturated"] == 0
    assert set(doc["routing"]["per_run"]) == {"run0", "run1", "run2", "run3"}
    assert doc["accuracy"]["train"]  # a summary of the training fit exists
    assert doc["health"]["overall"]
    assert doc["beta"]["bootstrap"]["draws"] == 20
    assert doc["source"]["steps"] == str(synthetic_steps)


def test_fit_text_report(synthetic_steps, capsys):
    assert main(["fit", "--steps", str(synthetic_steps), "--boot", "5"]) == 0
    out = capsys.readouterr().out
    assert "beta1" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_fit_out_file_and_plots(synthetic_steps, tmp_path, capsys):
    out = tmp_path / "results" / "fit.json"
    plots = tmp_path / "plots"
    assert main(["fit", "--steps", str(synthetic_steps), "--boot", "5", "--out", str(out),
                 "--plots", str(plots)]) == 0
    capsys.readouterr()
    assert out.is_file()
    assert not out.with_suffix(".json.tmp").exists()
    doc = json.loads(out.read_text())
    assert "beta1" in doc["beta"]["coefficients"]
    # the invocation main() recorded, as a shell would re-run it
    assert doc["provenance"]["command"] == f"rooflab fit --steps {synthetic_steps} --boot 5 --out {out} --plots {plots}"
    pngs = sorted(plots.glob("*.png"))
    assert pngs
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(doc["plots"]) == sorted(str(p) for p in pngs)


# ---------------------------------------------------------------------------------------------------
# The real H100 step records


def test_fit_real_h100_step_records(capsys):
    if not REAL_STEPS.exists():
        pytest.skip(f"real data not present: {REAL_STEPS}")
    doc = _fit_json(capsys, "--steps", str(REAL_STEPS), "--boot", "20", "--json")
    total = doc["routing"]["total"]
    assert 1900 <= total["with_step_time"] <= 2100, total
    assert total["fit"] <= total["with_step_time"] <= total["steps"]
    assert {"beta", "health", "accuracy"} <= set(doc)
