"""The real H100 step records: adapter (cycle time, never duration_us) and the issue's accuracy targets."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rooflab.data.adapters import read_steps
from rooflab.data.adapters.step_records import step_records_to_steps
from rooflab.errors import InputError
from rooflab.fit.calibration import Options
from rooflab.fit.crossval import leave_one_model_out, leave_one_run_out

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "steps" / "h100_step_records.parquet"
needs_real = pytest.mark.skipif(not REAL.exists(), reason="../shared/data/real not beside the project")


def _records(ids, ts_ms, run="e1"):
    return pd.DataFrame({"step.id": ids, "step.ts_start_ns": np.array(ts_ms) * 1_000_000, "step.duration_us": 400,
                         "batch.num_prefill_reqs": 0, "batch.num_decode_reqs": 10, "batch.prefill_tokens": 0,
                         "kv.usage_gpu_ratio": 0.1, "kv.blocks_total_gpu": 1000, "batch.num_preempted": 0,
                         "experiment_id": run, "model": "llama-2-70b-hf", "tp": 4})


def test_cycle_time_only_between_consecutive_step_ids():
    s = step_records_to_steps(_records([5, 6, 7, 9, 10], [0, 18, 37, 80, 99]), source="x")
    assert s["step_time_us"].tolist()[:2] == [18000, 19000]
    assert np.isnan(s["step_time_us"].iloc[2])  # 7 -> 9: a gap, no cycle time
    assert s["step_time_us"].iloc[3] == 19000 and np.isnan(s["step_time_us"].iloc[4])
    assert (s["model"] == "llama-2-70b").all()  # alias resolved
    # Σ decode context from KV usage: 0.1 × 1000 blocks × 16 − 10 new tokens − 8 per request
    assert s["decode_context"].iloc[0] == pytest.approx(1600 - 10 - 80)


def test_cycle_time_never_crosses_runs_or_uses_duration():
    a, b = _records([1, 2], [0, 20], "a"), _records([3, 4], [100, 121], "b")
    s = step_records_to_steps(pd.concat([a, b]), source="x")
    assert s.groupby("run_id")["step_time_us"].apply(lambda x: x.notna().sum()).tolist() == [1, 1]
    assert not (s["step_time_us"] == 400).any()


def test_missing_column_is_a_one_line_error():
    with pytest.raises(InputError, match=r"x: kv.blocks_total_gpu: required"):
        step_records_to_steps(_records([1], [0]).drop(columns=["kv.blocks_total_gpu"]), source="x")


@pytest.fixture(scope="module")
def real():
    return read_steps(REAL)


@needs_real
def test_real_records_give_about_2000_cycle_times(real):
    assert len(real) == 20112
    t = real["step_time_us"].dropna()
    assert 1900 < len(t) < 2100
    assert 14_000 < t.median() < 20_000  # median 15–19 ms with 16–40 decodes (data README)


@needs_real
@pytest.mark.parametrize("formulas", ["vllm", "design"])
def test_real_data_targets_with_per_layer_term(real, formulas):
    """Issue targets: ≤ 3% median APE leave-one-run-out (Llama-2-70B general ↔ codegen) and ≤ 10%
    cross-model (Llama-2-70B TP4 ↔ CodeLlama-34B TP2), for the roofline7+layers variant."""
    opt = Options(variant="roofline7+layers", formulas=formulas)
    loro = leave_one_run_out(real, opt, within_model="llama-2-70b")
    assert len(loro) == 2 and (loro["median_ape"] <= 0.03).all(), loro
    lomo = leave_one_model_out(real, opt)
    assert len(lomo) == 2 and (lomo["median_ape"] <= 0.10).all(), lomo


@needs_real
def test_plain_roofline7_cannot_transfer_across_models(real):
    """Without a per-layer term one model cannot separate per-step from per-layer cost: cross-model
    error stays > 10% (the issue's 16–19% for a plain NNLS fit). This documents why the variant exists."""
    lomo = leave_one_model_out(real, Options(variant="roofline7", formulas="design"))
    assert (lomo["median_ape"] > 0.10).all(), lomo
    # with the physical all-reduce (vllm formulas) TP2 -> TP4 transfers better, still worse than with β_L·L
    plain = leave_one_model_out(real, Options(variant="roofline7")).set_index("held_out")["median_ape"]
    layers = leave_one_model_out(real, Options(variant="roofline7+layers")).set_index("held_out")["median_ape"]
    assert (plain > 1.5 * layers).all(), (plain, layers)


@needs_real
def test_evaluate_adds_the_requested_variant_under_the_formulas_it_can_use(real):
    """`rooflab fit --evaluate --variant V` reports V beside the reference variants; BLIS's basis only under its
    own formulas (the variant comparison table of the README comes from this)."""
    from rooflab.fit.crossval import evaluate

    table = evaluate(real, Options(variant="blis-tp10"), variants=("roofline7+layers",), formulas=("vllm",))
    combos = set(zip(table["variant"], table["formulas"]))
    assert combos == {("roofline7+layers", "vllm"), ("blis-tp10", "blis")}
    cross = table[(table["kind"] == "leave-one-model-out")].set_index(["variant", "held_out"])["median_ape"]
    assert len(cross) == 4 and cross.notna().all()
