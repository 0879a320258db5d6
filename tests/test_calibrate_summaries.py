"""Calibration from run summaries as a user runs it: ``rooflab calibrate-summaries`` on experiments in the
sim-to-real kit's schema, mixed with a per-request trace, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.fit.summary_level import OVERALL, trace_target
from rooflab.paths import S2R_DIR

needs_kit = pytest.mark.skipif(not (S2R_DIR / "experiments.json").is_file(), reason="../shared/data/s2r not present")


def _trace(stage: bool = True) -> Trace:
    q = pd.DataFrame({"request_id": [f"r{i}" for i in range(6)], "arrival_us": np.arange(6) * 1e5,
                      "prompt_tokens": 100, "output_tokens": 10, "prefix_group": -1, "prefix_tokens": 0,
                      "failed": [False, False, True, False, False, False],
                      "ttft_us": [10.0, 20.0, 999.0, 30.0, 50.0, np.nan],
                      "e2e_us": [100.0, 200.0, 999.0, 300.0, 500.0, 600.0], "itl_us": np.nan})
    if stage:
        q["stage"] = [0, 0, 0, 1, 1, 1]
    return Trace("t", "llama-3.1-8b", 1, "H100-SXM", {}, q)


def test_trace_target_means_skip_failed_and_unmeasured_requests():
    t = trace_target(_trace())
    assert t.name == "t"
    assert t.means_us[OVERALL] == pytest.approx((27.5, 275.0))  # r2 failed, r5 has no TTFT
    assert t.means_us["stage_0"] == pytest.approx((15.0, 150.0))
    assert t.means_us["stage_1"] == pytest.approx((40.0, 400.0))
    assert t.stage_keys(per_stage=True) == ["stage_0", "stage_1"] and t.stage_keys(False) == [OVERALL]
    assert list(trace_target(_trace(stage=False)).means_us) == [OVERALL]


def test_trace_without_measurements_is_one_line():
    tr = _trace()
    tr.requests["ttft_us"] = np.nan
    with pytest.raises(InputError, match="ttft_us: run t: no measured ttft_us"):
        trace_target(tr)


@needs_kit
def test_cli_fits_two_kit_experiments_and_writes_a_loadable_set(tmp_path, capsys):
    from cli.main import main
    from rooflab.evaluation.s2r import neutral_coefficients
    from rooflab.model.coefficients import load_coefficients

    out = tmp_path / "c.json"
    # the two smallest training experiments (1,200 requests each), one round: a minute on 2 cores
    rc = main(["calibrate-summaries", "--ids", "48,66", "--variant", "roofline7+layers", "--iterations", "1",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "experiments: 2 with measured summaries (48, 66)" in text and "assumed: start and prior centre" in text
    c = load_coefficients(out)
    assert c.variant == "roofline7+layers" and set(c.beta) == set(neutral_coefficients("roofline7+layers").beta)
    assert c.beta != neutral_coefficients("roofline7+layers").beta  # the data moved it
    assert all(np.isfinite(list(c.beta.values()))) and all(a >= 0 for a in c.alpha)
    assert json.loads(out.read_text())["variant"] == "roofline7+layers"
    assert c.posterior is not None and len(c.draws(5)) == 5  # what `rooflab replay --interval` draws from


@needs_kit
@pytest.mark.parametrize("args, expect", [
    (["--ids", "nope"], "experiments: no experiment 'nope'"),
    (["--variant", "blis-tp11"], "--variant: no neutral start for 'blis-tp11'"),
    (["--no-experiments"], "nothing to train on"),
    (["--prior", "-1"], "--prior"),
])
def test_bad_input_is_one_line(args, expect, capsys):
    from cli.main import main

    rc = main(["calibrate-summaries", *args])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@needs_kit
def test_the_kit_path_may_be_the_file_or_its_folder(tmp_path):
    from cli.summary_cmds import _experiments

    by_file = _experiments(S2R_DIR / "experiments.json", "48,66", None)
    by_folder = _experiments(S2R_DIR, "48,66", None)
    assert [str(e.exp_id) for e in by_file] == [str(e.exp_id) for e in by_folder] == ["48", "66"]
    with pytest.raises(InputError, match="experiments.json"):
        _experiments(Path(tmp_path) / "experiments.json", None, None)
