"""BLIS's basis as a rooflab variant end to end: fit on twin steps → export in BLIS's layout → load → replay gives
identical predictions; the provenance record beside the export; one-line errors for malformed BLIS YAML."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cli.main import main
from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.fit.calibration import Options, calibrate
from rooflab.model import export
from rooflab.model.arch import load_model
from rooflab.model.blis import BLIS_BETA_ORDER, blis_basis, blis_shape_of, blis_step_time_us, load_blis_hardware
from rooflab.model.coefficients import load_coefficients
from rooflab.model.engine_config import EngineConfig
from rooflab.model.features import featurize
from rooflab.model.hardware import load_hardware
from rooflab.model.provenance import file_source, provenance_path, provenance_record, with_provenance
from rooflab.model.step_timer import BlisStepTimer
from rooflab.replay.predict import replay
from rooflab.twin.engine import Engine
from rooflab.twin.simulate import constant_rate_workload, simulate
from rooflab.twin.truth import TruthModel

H100 = load_hardware("H100-SXM")


def _twin_steps(model: str, tp: int, rate: float, seed: int, prompt: int = 1024, out: int = 128):
    arch = load_model(model)
    truth = TruthModel.from_config("H100-SXM", arch, tp, seed=seed)
    engine = Engine(arch, H100, tp, truth, EngineConfig(max_model_len=4096), seed=seed)
    res = simulate(engine, constant_rate_workload(rate, 120, prompt, out, seed=seed), overheads=truth,
                   run_id=f"{model}-tp{tp}-r{rate:g}-s{seed}")
    s = res.steps.copy()
    return s, res.requests


@pytest.fixture(scope="module")
def blis_fit(tmp_path_factory):
    parts = [_twin_steps("llama-3.1-8b", tp, rate, seed) for tp in (1, 2) for rate, seed in ((2, 0), (8, 1), (16, 2))]
    steps = __import__("pandas").concat([p[0] for p in parts], ignore_index=True)
    reqs = __import__("pandas").concat([p[1] for p in parts], ignore_index=True)
    return calibrate(steps, reqs, Options(variant="blis-tp10", n_boot=20)), steps


def test_the_twin_records_blis_attention_pairs(blis_fit):
    _, steps = blis_fit
    pf = steps[steps.prefill_tokens > 0]
    assert len(pf) and np.isfinite(pf.prefill_prompt_pairs).all()
    # every chunk is charged against its full 1024-token prompt: Σ n·(1024 + n/2) >= Σ causal pairs
    assert (pf.prefill_prompt_pairs >= pf.prefill_attn_pairs - 1e-6).all()


def test_blis_features_match_blis_step_time(blis_fit):
    calib, steps = blis_fit
    feats = featurize(steps.head(300), "blis")
    assert {"blis_pf_compute", "blis_dc_kv", "blis_weight", "blis_tp"} <= set(feats.columns)
    arch = load_model("llama-3.1-8b")
    sub = steps.head(300)
    basis = blis_basis(blis_shape_of(arch), load_blis_hardware("H100-SXM"), 1,
                       {c: sub[c].to_numpy(dtype=float) for c in sub.columns if sub[c].dtype.kind == "f"})
    betas = [calib.beta.coefficients()[n] for n in BLIS_BETA_ORDER[:10]]
    want = blis_step_time_us(betas, basis)
    got = np.trunc(calib.beta.variant.predict(feats, calib.beta.beta))
    tp1 = (sub["tp"] == 1).to_numpy()
    assert np.array_equal(np.maximum(got[tp1], 1), want[tp1])


def test_fit_export_load_replay_round_trip(blis_fit, tmp_path):
    calib, _ = blis_fit
    assert calib.beta.formulas == "blis" and calib.beta.variant.name == "blis-tp10"
    doc = with_provenance(calib.to_dict(), sources=[], command="rooflab fit --variant blis-tp10 (test)")
    text = export.blis_yaml(doc)
    assert "EXACT" in text and "APPROXIMATE" not in text
    path = tmp_path / "blis.yaml"
    path.write_text(text)
    layout = yaml.safe_load(text)["trained_physics_coefficients"]
    assert len(layout["beta_coeffs"]) == 10 and len(layout["alpha_coeffs"]) == 3
    assert layout["beta_coeffs"] == pytest.approx([calib.beta.coefficients()[n] for n in BLIS_BETA_ORDER[:10]])
    loaded = load_coefficients(path)
    assert loaded.variant == "blis-tp10" and loaded.formulas == "blis"
    assert loaded.beta == pytest.approx(calib.beta.coefficients())
    assert loaded.alpha == pytest.approx(tuple(calib.alpha.alpha))
    # identical predictions from the in-memory set and the file BLIS would load
    reqs = constant_rate_workload(6, 60, 900, 64, seed=3)
    import pandas as pd
    frame = pd.DataFrame({"request_id": [r.request_id for r in reqs], "arrival_us": [r.arrival_us for r in reqs],
                          "prompt_tokens": [r.prompt_tokens for r in reqs],
                          "output_tokens": [r.max_tokens for r in reqs],
                          "prefix_group": None, "prefix_tokens": 0.0, "failed": False, "ttft_us": np.nan,
                          "e2e_us": np.nan, "itl_us": np.nan})
    tr = Trace("rt", "llama-3.1-8b", 2, "H100-SXM", {"max_model_len": 4096}, frame)
    a, b = replay(tr, calib.coefficients()).requests, replay(tr, loaded).requests
    assert np.allclose(a.pred_ttft_us, b.pred_ttft_us) and np.allclose(a.pred_e2e_us, b.pred_e2e_us)
    # BLIS semantics: integer step times; α2 added to TTFT
    assert isinstance(replay(tr, loaded, record=True).steps.step_time_us.iloc[0], float)


def test_provenance_record(blis_fit, tmp_path):
    calib, steps = blis_fit
    f = tmp_path / "steps.parquet"
    steps.to_parquet(f)
    doc = with_provenance(calib.to_dict(), sources=[file_source(f)], command="rooflab fit --steps steps.parquet",
                          mlflow_run_id="abc123", vllm_version="0.15.1")
    rec = provenance_record(doc)
    byname = {c["name"]: c for c in rec["coefficients"]}
    assert rec["exact_blis"] and byname["beta1a"]["blis"] == "β1a" and byname["beta2b"]["blis"] == "β2b"
    for c in rec["coefficients"]:
        assert c["method"] == "fitted" and c["ci95"][0] <= c["value"] <= c["ci95"][1] + 1e-9, c
    assert rec["scope"]["models"] == ["llama-3.1-8b"] and rec["scope"]["tp"] == [1, 2]
    assert rec["scope"]["hardware"] == ["H100-SXM"] and rec["scope"]["vllm_version"] == "0.15.1"
    assert rec["sources"][0]["sha256"]["steps.parquet"] and rec["command"].startswith("rooflab fit")
    assert rec["mlflow_run_id"] == "abc123" and rec["rooflab_version"]
    assert provenance_path(tmp_path / "x.yaml").name == "x.provenance.json"


def test_cli_fit_and_export_write_the_record(blis_fit, tmp_path, capsys):
    _, steps = blis_fit
    f = tmp_path / "steps.parquet"
    steps.to_parquet(f)
    fit_json, out = tmp_path / "fit.json", tmp_path / "blis.yaml"
    assert main(["fit", "--steps", str(f), "--variant", "blis-tp10", "--boot", "10", "--out", str(fit_json),
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["export", "--fit", str(fit_json), "--format", "blis", "--out", str(out)]) == 0
    assert "exact BLIS variant" in capsys.readouterr().out
    rec = json.loads(provenance_path(out).read_text())
    assert rec["sources"][0]["id"].endswith("steps.parquet") and "fit" in rec["command"]
    assert load_coefficients(out).variant == "blis-tp10"


def test_non_blis_variant_export_says_it_is_approximate(tmp_path):
    steps, reqs = _twin_steps("llama-3.1-8b", 1, 4, 0)
    calib = calibrate(steps, None, Options(variant="roofline7+layers", n_boot=5))
    text = export.blis_yaml(calib.to_dict())
    assert "APPROXIMATE" in text and len(yaml.safe_load(text)["trained_physics_coefficients"]["beta_coeffs"]) == 11


def test_blis_timer_floors_and_truncates():
    arch = load_model("llama-3.1-8b")
    from rooflab.model.coefficients import Coefficients

    c = Coefficients({n: 0.0 for n in BLIS_BETA_ORDER[:10]} | {"beta7": 2.9}, variant="blis-tp10", formulas="blis")
    t = BlisStepTimer(c, arch, H100, 1)
    assert t.step_time_us(np.array([100.0]), [], 1) == 2.0  # 2.9 truncated
    assert t.step_time_us(np.array([]), [], 0) == 1.0  # BLIS: an empty batch costs 1 µs


def test_bad_blis_yaml_is_one_line(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("trained_physics_coefficients:\n  alpha_coeffs: [1, 2, 3]\n  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n")
    with pytest.raises(InputError) as e:
        load_coefficients(p)
    assert "beta_coeffs" in str(e.value) and "\n" not in str(e.value)


def test_the_attention_extension_of_blis_times_steps_like_its_features_and_is_never_exported_as_blis(blis_fit):
    """blis-tp10+attn: β1a's compute split at its attention share. The step timer equals the variant's own
    prediction on the features (truncated as BLIS does); with β1a_attn = β1a it is blis-tp10 exactly; a BLIS
    export is refused in one line (BLIS has one prefill compute slot)."""
    from rooflab.model.coefficients import Coefficients
    from rooflab.model.variants import get_variant

    calib, steps = blis_fit
    base = calib.beta.coefficients()
    arch = load_model("llama-3.1-8b")
    sub = steps[(steps["tp"] == 1) & (steps["prefill_tokens"] > 0)].head(200)
    feats = featurize(sub, "blis")
    np.testing.assert_allclose(feats["blis_pf_dense"] + feats["blis_pf_attn"], feats["blis_pf_compute"], rtol=1e-12)
    v = get_variant("blis-tp10+attn")
    for attn in (base["beta1a"], 3.0 * base["beta1a"]):
        beta = {**base, "beta1a_attn": attn}
        timer = BlisStepTimer(Coefficients(beta, variant=v.name, formulas="blis"), arch, H100, 1)
        got = [timer.time_from_aggregates(r.prefill_reqs, r.prefill_tokens, r.prefill_prompt_pairs, r.decode_reqs,
                                          r.decode_context) for r in sub.itertuples()]
        want = np.maximum(np.trunc(v.predict(feats, np.array([beta[n] for n in v.names]))), 1)
        np.testing.assert_allclose(got, want, atol=1.0)  # truncation of sums computed in another order
    same = BlisStepTimer(Coefficients({**base, "beta1a_attn": base["beta1a"]}, variant=v.name, formulas="blis"),
                         arch, H100, 1)
    plain = BlisStepTimer(Coefficients(base, variant="blis-tp10", formulas="blis"), arch, H100, 1)
    assert same.step_time_us(np.array([300.0, 20.0]), [(512, 0, 2048)], 1) == \
        plain.step_time_us(np.array([300.0, 20.0]), [(512, 0, 2048)], 1)
    fit = calibrate(steps, None, Options(variant="blis-tp10+attn", n_boot=5))
    with pytest.raises(InputError) as e:
        export.blis_yaml(fit.to_dict())
    assert "beta1a_attn" in str(e.value) and "cannot load" in str(e.value) and "\n" not in str(e.value)
    assert "beta1a_attn" in export.to_json(fit.to_dict())["beta"]
