"""Request-level parity with BLIS's simulator (the benchmark's fast case), and the client behaviours it needs:
closed-loop multi-turn rounds and sequential inference-perf stages."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rooflab.data.traces import Trace
from rooflab.model.coefficients import Coefficients
from rooflab.paths import S2R_DIR
from rooflab.replay.predict import replay

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
needs_kit = pytest.mark.skipif(not (S2R_DIR / "src" / "trained_physics_iter29.json").is_file(),
                               reason="../shared/data/s2r not present")


@needs_kit
@pytest.mark.parametrize("exp_id", ["66", "62"])
def test_iter29_experiment_within_5_percent_of_blis(exp_id):
    from blis_parity import iter29, parity

    coefs, exps = iter29()
    row = parity(next(e for e in exps if e["id"] == exp_id), coefs)
    assert row["completed"] == row["blis_completed"]
    assert abs(row["ttft_diff"]) < 0.05 and abs(row["e2e_diff"]) < 0.05, row


COEFS = Coefficients({"beta1": 1.0, "beta2": 1.0, "beta3": 1.0, "beta4": 1.0, "beta5": 1.0, "beta6": 10.0,
                      "beta7": 300.0, "beta_layer": 20.0}, (1000.0, 500.0, 10.0), "roofline7+layers", "vllm")


def _frame(n: int, **cols) -> pd.DataFrame:
    base = {"request_id": [f"r{i}" for i in range(n)], "arrival_us": 0.0, "prompt_tokens": 300.0,
            "output_tokens": 16.0, "prefix_group": None, "prefix_tokens": 0.0, "failed": False, "ttft_us": np.nan,
            "e2e_us": np.nan, "itl_us": np.nan}
    base.update(cols)
    return pd.DataFrame(base)


def test_closed_loop_round_waits_for_its_predecessor():
    f = _frame(3, depends_on=[None, "r0", "r1"], think_time_us=[0.0, 5e5, 5e5])
    q = replay(Trace("s", "llama-3.1-8b", 1, "H100-SXM", {}, f), COEFS).requests.set_index("request_id")
    fin = q["finished_us"]
    # round k+1 is sent 0.5 s after round k produced its last token (BLIS: completion excludes α1)
    assert q.loc["r1", "pred_send_us"] == pytest.approx(fin["r0"] + 5e5)
    assert q.loc["r2", "pred_send_us"] == pytest.approx(fin["r1"] + 5e5)
    assert not q["pred_failed"].any()


def test_failed_round_cancels_the_rest_of_its_session():
    f = _frame(3, depends_on=[None, "r0", "r1"], think_time_us=0.0, prompt_tokens=[10 ** 6, 300.0, 300.0])
    q = replay(Trace("s", "llama-3.1-8b", 1, "H100-SXM", {"max_model_len": 4096}, f), COEFS).requests
    assert q["pred_status"].tolist() == ["rejected", "cancelled", "cancelled"]


def test_sequential_stages_start_after_the_previous_drains():
    f = _frame(6, stage=[0, 0, 0, 1, 1, 1], stage_offset_us=[0.0, 1e5, 2e5, 0.0, 1e5, 2e5],
               arrival_us=[0.0, 1e5, 2e5, 9e9, 9e9, 9e9])
    q = replay(Trace("s", "llama-3.1-8b", 1, "H100-SXM", {}, f, stage_gap_s=2.0), COEFS).requests
    drain = q.loc[q.stage == 0, "pred_send_us"].add(q.loc[q.stage == 0, "pred_e2e_us"]).max()
    assert q.loc[q.stage == 1, "pred_send_us"].tolist() == pytest.approx([drain + 2e6, drain + 2.1e6, drain + 2.2e6])
    # without stage_gap_s the stages are time windows: arrivals stand as given
    q2 = replay(Trace("s", "llama-3.1-8b", 1, "H100-SXM", {}, f), COEFS).requests
    assert "pred_send_us" not in q2 and (q2.loc[q2.stage == 1, "pred_e2e_us"] > 0).all()
