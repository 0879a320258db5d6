"""Workload templates (inference-perf configs), twin requests of a point, campaign configs and the static plan."""

import copy
import math
from collections import Counter

import numpy as np
import pytest
import yaml

from rooflab.collect import workloads as W
from rooflab.collect.spec import (
    CAMPAIGNS_DIR,
    LoopSettings,
    gpu_seconds,
    load_campaign,
    parse_campaign,
    static99,
    validate_cron,
)
from rooflab.collect.workloads import (
    FAMILIES,
    make_params,
    point_requests,
    render_config,
    validate_config,
    write_config,
)
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.errors import InputError

DEFAULT = CAMPAIGNS_DIR / "default.yaml"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer"))  # render_config only checks it is a local directory


def point(family, duration=120.0, seed=0, **params):
    return SweepPoint("llama-3.1-8b", 1, "H100-SXM", family, tuple(params.items()), duration_s=duration, seed=seed)


def render(p, tok, **kw):
    return render_config(p, base_url="http://127.0.0.1:8000", model_name="llama-3.1-8b", tokenizer_dir=tok,
                         output_dir="/tmp/rooflab-run/{timestamp}", **kw)


# ------------------------------------------------------------------------------------------------ workloads
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_every_family_renders_and_passes_inference_perf_validation(fam, tok):
    for params in FAMILIES[fam].params():
        cfg = render(point(fam, **params), tok)
        stage = cfg["load"]["stages"]
        assert stage == [{"rate": params["rate"], "duration": 120}]
        assert cfg["data"]["type"] == "random" and "shared_prefix" not in cfg["data"]
        for d, n in (("input_distribution", params["input_tokens"]), ("output_distribution", params["output_tokens"])):
            assert cfg["data"][d] == {"type": "fixed", "min": n, "max": n, "mean": n, "std_dev": 0}
        assert cfg["server"]["ignore_eos"] is True and cfg["api"]["streaming"] is True
        assert cfg["report"]["request_lifecycle"]["per_request"] is True
        assert cfg["tokenizer"]["pretrained_model_name_or_path"] == tok
        assert cfg["load"]["type"] == "constant" and cfg["load"]["num_workers"] >= 1


def test_v1_template_is_the_w2_w3_template(tok):
    # V1 points render from their own family's template; V1.yaml is the same body for hand use
    assert W.load_template("V1") == W.load_template("W2") == W.load_template("W3")
    values = {"input_tokens": 1024, "output_tokens": 512, "rate": 0.05, "duration": 120, "seed": 0,
              "base_url": "http://x:1", "model_name": "m", "tokenizer_dir": tok, "output_dir": "/tmp/o"}
    validate_config(W._fill(W.load_template("V1"), values, "V1.yaml"), "V1.yaml")


def test_written_config_is_read_back_by_inference_perf(tok, tmp_path):
    from inference_perf.config import read_config

    p = point("W4-A", **make_params(1024, 4, 128))
    path = write_config(render(p, tok), tmp_path / "cfg" / "config.yaml")
    assert [f.name for f in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    conf = read_config(str(path))
    assert conf.load.stages[0].rate == 128 and conf.load.stages[0].duration == 120
    assert conf.data.input_distribution.mean == 1024 and conf.load.base_seed == 0
    assert "{timestamp}" not in conf.storage.local_storage.path  # substituted by inference-perf


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["load"]["stages"][0].__setitem__("rate", -1.0), "load.stages[0].rate"),
    (lambda c: c["load"].__setitem__("type", "bursty"), "load.type"),
    (lambda c: c["load"]["stages"][0].__setitem__("duration", 0), "load.stages[0].duration"),
    (lambda c: c["data"].__setitem__("prompt_len", 5), "data.prompt_len"),
    (lambda c: c["data"]["input_distribution"].__setitem__("min", 10**6), "data.input_distribution"),
    (lambda c: c["server"].pop("base_url"), "server.base_url"),
    (lambda c: c["api"].__setitem__("type", "chat"), "api.type"),
])
def test_broken_rendered_config_names_the_field(mutate, field, tok):
    cfg = render(point("W3", **make_params(256, 256, 8)), tok)
    bad = copy.deepcopy(cfg)
    mutate(bad)
    with pytest.raises(InputError) as ei:
        validate_config(bad, "run.yaml")
    msg = str(ei.value)
    assert msg.startswith(f"run.yaml: {field}: ") and "\n" not in msg


def test_render_rejects_bad_points_and_broken_corrections(tok):
    with pytest.raises(InputError, match=r"params.rate: Input should be greater than 0|load.stages\[0\].rate"):
        render(point("W1", **make_params(128, 1, 0.5) | {"rate": -1.0}), tok)
    with pytest.raises(InputError, match="family: unknown workload family 'W9'"):
        render(point("W9", **make_params(128, 1, 1)), tok)
    with pytest.raises(InputError, match="params.output_tokens: required"):
        render(point("W1", input_tokens=128, rate=1.0), tok)
    with pytest.raises(InputError, match="tokenizer_dir: .* not a local directory"):
        render(point("W1", **make_params(128, 1, 1)), "meta-llama/Llama-3.1-8B")
    with pytest.raises(InputError, match=r"load.stages\[0\].duration: .*fractional"):
        render(point("W1", duration=12.5, **make_params(128, 1, 1)), tok)
    with pytest.raises(InputError, match="server.ignore_eos: must be true"):
        render(point("W1", **make_params(128, 1, 1)), tok, overrides={"server": {"ignore_eos": False}})
    cfg = render(point("W1", **make_params(128, 1, 1)), tok, overrides={"load": {"request_timeout": 600}})
    assert cfg["load"]["request_timeout"] == 600


def test_point_requests_match_inference_perf_constant_load():
    from inference_perf.loadgen.load_timer import ConstantLoadTimer

    p = point("W3", seed=7, **make_params(256, 256, 8))
    reqs = point_requests(p)
    assert len(reqs) == 8 * 120 == int(8 * 120.0)
    assert {(r.prompt_tokens, r.max_tokens, r.ignore_eos) for r in reqs} == {(256, 256, True)}
    assert len({r.request_id for r in reqs}) == len(reqs)
    t = np.array([r.arrival_us for r in reqs])
    assert np.all(np.diff(t) >= 0) and t[0] > 0 and math.isclose(t[-1], 120e6, rel_tol=1e-9)
    # exactly inference-perf's ConstantLoadTimer (exponential gaps rescaled to the duration), seeded alike
    timer = ConstantLoadTimer(rate=8.0, duration=120)
    timer._rand = np.random.default_rng(7)
    np.testing.assert_allclose(t, np.array(list(timer.start_timer(0.0))) * 1e6, rtol=1e-12)
    # reproducible, seed-dependent
    assert [r.arrival_us for r in point_requests(p)] == list(t)
    assert [r.arrival_us for r in point_requests(p, seed=8)] != list(t)
    # count is inference-perf's int(rate × duration), e.g. W2's low rate
    assert len(point_requests(point("W2", **make_params(1024, 512, 0.05)))) == 6
    with pytest.raises(InputError, match="params.rate: .*no request"):
        point_requests(point("W2", **make_params(1024, 512, 0.001)))


# ------------------------------------------------------------------------------------------------ campaign
@pytest.fixture(scope="module")
def default():
    return load_campaign(DEFAULT)


def test_default_campaign_loads(default):
    assert default.name == "default" and default.hardware == "H100-SXM"
    assert [(c.model, c.tp) for c in default.train_combos] == [
        ("llama-3.1-8b", 1), ("llama-3.1-8b", 2), ("llama-3.1-70b", 4), ("mixtral-8x7b", 2), ("mixtral-8x22b", 8),
        ("deepseek-v2-lite", 1)]
    assert [(c.model, c.tp) for c in default.validation_combos] == [
        ("qwen3-14b", 1), ("qwen3-30b-a3b", 2), ("codellama-34b", 2)]
    assert default.duration_s == 120 and default.engine["enable_prefix_caching"] is False
    assert default.schedule == "0 3 * * 1" and default.endpoint.kind == "twin" and not default.warnings
    assert "static99" in default.designs and load_campaign("smoke").name == "smoke"


def test_static99_plan(default):
    plan = static99(default)
    assert plan == default.design("static99")
    assert len(plan) == 99
    split = Counter(p.split for p in plan)
    assert split == {"train": 90, "validation": 9}
    per_combo = Counter((p.model, p.tp, p.split) for p in plan)
    assert len([k for k in per_combo if k[2] == "train"]) == 6
    assert len([k for k in per_combo if k[2] == "validation"]) == 3
    assert all(n == 15 for k, n in per_combo.items() if k[2] == "train")
    assert all(n == 3 for k, n in per_combo.items() if k[2] == "validation")
    fams = Counter(p.family for p in plan if (p.model, p.tp) == ("llama-3.1-70b", 4))
    assert fams == {"W1": 4, "W2": 4, "W3": 5, "W4-A": 1, "W4-C": 1}
    v1 = sorted((p.family, p.param("input_tokens"), p.param("rate")) for p in plan if p.model == "qwen3-14b")
    assert v1 == [("W2", 1024, 0.05), ("W3", 256, 1.0), ("W3", 256, 64.0)]
    assert all(p.duration_s == 120 for p in plan)
    ids = {run_id(default.name, p) for p in plan}
    assert len(ids) == 99
    assert [r[0] for r in default.runs(plan)] == [run_id(default.name, p, 0) for p in plan]
    hours = default.gpu_seconds(plan) / 3600
    print(f"\nstatic99: {len(plan)} runs, {hours:.2f} GPU-hours (duration × TP)")
    assert hours == pytest.approx((1 + 2 + 4 + 2 + 8 + 1) * 15 * 120 / 3600 + (1 + 2 + 2) * 3 * 120 / 3600)
    assert default.budget_gpu_hours == pytest.approx(hours)


def test_candidates_cover_the_cross_product(default):
    cands = default.candidates()
    per_combo = sum(math.prod(len(v) for v in vals.values()) for vals in default.families.values())
    assert len(cands) == len(default.combos) * per_combo
    assert len({p.key for p in cands}) == len(cands)
    keys = {p.key for p in cands}
    assert {p.key for p in static99(default)} <= keys
    assert {p.split for p in cands if p.model in ("qwen3-14b", "codellama-34b")} == {"validation"}
    assert {p.split for p in cands if p.model == "llama-3.1-70b"} == {"train"}
    assert all(p.params == tuple(sorted(make_params(**dict(p.params)).items())) for p in cands)
    assert gpu_seconds(cands[0]) == cands[0].duration_s * cands[0].tp
    assert len(default.design("all")) == len(cands)


def test_smoke_design_points():
    c = load_campaign("smoke")
    (p,) = c.design("first")
    assert (p.model, p.tp, p.family, p.param("rate"), p.param("input_tokens")) == ("llama-3.1-8b", 1, "W3", 4.0, 128)
    assert p.key in {q.key for q in c.candidates()}


def _write(tmp_path, doc=None, text=None):
    path = tmp_path / "campaign.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(doc))
    return path


def _mutated(mutate):
    doc = yaml.safe_load(DEFAULT.read_text())
    mutate(doc)
    return doc


@pytest.mark.parametrize("doc, text, field, problem", [
    (None, "name: x\nmodels: [\n  {model: a\n", None, "malformed YAML at line 4"),
    (_mutated(lambda d: d["models"].append({"model": "llama-9b", "tp": 1})), None, "models[5].model", "unknown model"),
    (_mutated(lambda d: d["models"].__setitem__(4, {"model": "deepseek-v3", "tp": [4]})), None, "models[4].tp[0]",
     "does not fit on 4× H100-SXM"),
    (_mutated(lambda d: d["models"].__setitem__(3, {"model": "mixtral-8x22b", "tp": 2})), None, "models[3].tp",
     "infeasible"),
    (_mutated(lambda d: d.__setitem__("schedule", "0 3 * *")), None, "schedule", "expected 5 fields"),
    (_mutated(lambda d: d.__setitem__("schedule", "0 25 * * *")), None, "schedule", "hour field '25'"),
    (_mutated(lambda d: d["families"].__setitem__("W5", {"rate": 8})), None, "families.W5", "unknown workload family"),
    (_mutated(lambda d: d["engine"].__setitem__("max_model_len", 4096)), None, "engine.max_model_len",
     "shorter than the longest allowed request (8704"),
    (_mutated(lambda d: d["engine"].__setitem__("max_model_len", 131072)), None, "engine.max_model_len",
     "exceeds mixtral-8x7b's max_position_embeddings"),
    (_mutated(lambda d: d.__setitem__("hardware", "H900")), None, "hardware", "unknown hardware 'H900'"),
    (_mutated(lambda d: d.__setitem__("endpoint", {"kind": "command", "template": ["vllm", "{prt}"]})), None,
     "endpoint.template[1]", "unknown placeholder {prt}"),
    (_mutated(lambda d: d.__setitem__("endpoint", {"kind": "external", "base_url": "http://h:8000"})), None,
     "endpoint.trace_path", "required"),
    (_mutated(lambda d: d["validation"]["points"].append({"family": "W3", "rate": 3})), None,
     "validation.points[2].rate", "not an allowed W3 value"),
    (_mutated(lambda d: d["collection"].__setitem__("timeout", 5)), None, "collection.timeout", "unknown field"),
    (_mutated(lambda d: d.pop("name")), None, "name", "required"),
])
def test_bad_campaign_gives_one_line_error(tmp_path, doc, text, field, problem):
    path = _write(tmp_path, doc, text)
    with pytest.raises(InputError) as ei:
        load_campaign(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    if field:
        assert msg.startswith(f"{path}: {field}: "), msg
    assert problem in msg, msg


def test_tight_combo_is_a_warning_not_an_error(tmp_path):
    path = _write(tmp_path, _mutated(lambda d: d["models"].append({"model": "mixtral-8x22b", "tp": 4})))
    c = load_campaign(path)
    assert len(c.warnings) == 1 and "models[5].tp: tight: mixtral-8x22b/tp4/H100-SXM" in c.warnings[0]
    assert len(static99(c)) == 99 + 15


@pytest.mark.parametrize("expr, ok", [("0 3 * * 1", True), ("*/15 0-6,22 1 jan-mar MON-fri", True),
                                      ("0 0 * * 7", True), ("0 3 * * * *", False), ("60 * * * *", False),
                                      ("0 0 0 * *", False), ("0 0 * * 1/0", False), ("5-1 * * * *", False),
                                      ("@daily", False), ("0 0 L * *", True), ("0 0 30 2 *", False)])
def test_cron_validation(expr, ok):
    if ok:
        assert validate_cron(expr) == expr
    else:
        with pytest.raises(InputError, match="^<cron>: schedule: "):
            validate_cron(expr)


# ------------------------------------------------------------------------------------------ typed spec
@pytest.mark.parametrize("path", sorted(CAMPAIGNS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_campaigns_load(path):
    c = load_campaign(path)
    assert c.candidates() and isinstance(c.loop, LoopSettings)
    if path.stem == "onboard":  # the template of `rooflab onboard`: a candidate space for one combo, no static plan
        assert c.name == "onboard-template" and len(c.combos) == 1
        return
    assert c.name == path.stem
    assert {p.key for p in c.design("static99")} <= {p.key for p in c.candidates()}


def test_loop_section_defaults_and_overrides(tmp_path, default):
    from rooflab.model.features import DEFAULT_FORMULAS
    from rooflab.model.variants import DEFAULT_VARIANT

    # the shipped default campaign fits the attention split (README, "Prefill the data can see")
    assert default.loop == LoopSettings(batch_size=6, max_iterations=4, variant="roofline7+layers+attn",
                                        formulas=DEFAULT_FORMULAS, targeting="d-optimal", n_boot=100,
                                        replay_stop=False)
    c = load_campaign(_write(tmp_path, _mutated(lambda d: d.__setitem__(
        "loop", {"batch_size": 3, "targeting": "menu", "replay_stop": True}))))
    assert (c.loop.batch_size, c.loop.targeting, c.loop.replay_stop, c.loop.n_boot) == (3, "menu", True, 100)
    assert c.loop.variant == DEFAULT_VARIANT  # a loop section that names no variant gets the library default
    c2 = c.with_loop(max_iterations=9, n_boot=20, targeting=None)  # None keeps the campaign's value
    assert (c2.loop.max_iterations, c2.loop.n_boot, c2.loop.targeting, c2.loop.batch_size) == (9, 20, "menu", 3)
    assert c.loop.max_iterations == 4 and c2.spec.loop == c2.loop  # a copy; the original is unchanged
    assert [p.key for p in c2.candidates()] == [p.key for p in c.candidates()]
    with pytest.raises(InputError) as ei:
        c.with_loop(batch_size=0)
    assert str(ei.value) == f"{c.source}: loop.batch_size: must be >= 1, got 0"
    with pytest.raises(InputError, match=r": loop\.variant: unknown variant 'nope'"):
        default.with_loop(variant="nope")
    with pytest.raises(InputError, match=r": loop\.bogus: unknown field \(known: batch_size, "):
        default.with_loop(bogus=1)


def _set(key, value):
    return _mutated(lambda d: d.__setitem__(key, value))


@pytest.mark.parametrize("doc, field, problem", [
    (_set("loop", {"variant": "roofline9"}), "loop.variant", "unknown variant 'roofline9'"),
    (_set("loop", {"batch_size": 0}), "loop.batch_size", "must be >= 1"),
    (_set("loop", {"max_iterations": 0}), "loop.max_iterations", "must be >= 1"),
    (_set("loop", {"targeting": "greedy"}), "loop.targeting", "expected one of d-optimal, menu, random"),
    (_set("loop", {"formulas": "exact"}), "loop.formulas", "unknown formulas 'exact'"),
    (_set("loop", {"n_boot": 1}), "loop.n_boot", "must be >= 2"),
    (_set("loop", {"replay_stop": "yes"}), "loop.replay_stop", "expected true or false"),
    (_set("loop", {"batch": 4}), "loop.batch", "unknown field (known: batch_size, max_iterations"),
    (_set("duration_s", math.inf), "duration_s", "expected an integer, got inf"),
    (_set("duration_s", 1e8), "duration_s", "must be <= 86400"),
    (_set("duration_s", 12.5), "duration_s", "expected an integer"),
    (_set("replicates", 0), "replicates", "must be >= 1"),
    (_set("replicates", -2), "replicates", "must be >= 1"),
    (_set("replicates", 1e20), "replicates", "must be <= 100"),
    (_set("replicates", True), "replicates", "expected an integer, got True"),
    (_set("seed", -1), "seed", "must be >= 0"),
    (_set("seed", 2**32), "seed", "must be < 4294967296"),
    (_set("budget_gpu_hours", math.inf), "budget_gpu_hours", "expected a finite number, got inf"),
    (_set("budget_gpu_hours", 2e6), "budget_gpu_hours", "must be <= 1000000"),
    (_mutated(lambda d: d["families"]["W3"].__setitem__("rate", [1, math.nan])), "families.W3.rate[1]",
     "expected a finite number, got nan"),
    (_mutated(lambda d: d["families"]["W1"].__setitem__("rate", -0.5)), "families.W1.rate", "must be > 0"),
    (_mutated(lambda d: d["families"]["W3"].__setitem__("rate", [1, 100000])), "families.W3.rate[1]",
     "more than 1000000 per run"),
    (_mutated(lambda d: d["collection"].__setitem__("timeout_s", 0)), "collection.timeout_s", "must be > 0"),
    (_mutated(lambda d: d["collection"].__setitem__("timeout_s", 8 * 86400)), "collection.timeout_s",
     "must be <= 604800"),
    (_mutated(lambda d: d["collection"].__setitem__("timeout_s", math.inf)), "collection.timeout_s", "finite"),
    (_mutated(lambda d: d["collection"].__setitem__("concurrency", 0)), "collection.concurrency", "must be >= 1"),
    (_mutated(lambda d: d["collection"].__setitem__("concurrency", 257)), "collection.concurrency", "must be <= 256"),
    (_mutated(lambda d: d["collection"].__setitem__("max_retries", 21)), "collection.max_retries", "must be <= 20"),
    (_mutated(lambda d: d["engine"].__setitem__("max_num_seqs", 0)), "engine.max_num_seqs", "must be >= 1"),
    (_mutated(lambda d: d["engine"].__setitem__("max_model_len", 10**8)), "engine.max_model_len", "must be <="),
    (_mutated(lambda d: d["engine"].__setitem__("max_num_batched_tokens", "abc")), "engine.max_num_batched_tokens",
     "expected an integer, got 'abc'"),
    (_mutated(lambda d: d["engine"].__setitem__("gpu_memory_utilization", 1.5)), "engine.gpu_memory_utilization",
     "must be <= 1"),
    (_mutated(lambda d: d["engine"].__setitem__("gpu_memory_utilization", math.nan)),
     "engine.gpu_memory_utilization", "finite"),
    (_set("schedule", "0 0 30 2 *"), "schedule", "day of month field '30'"),
    (_set("schedule", "0 3 * * * *"), "schedule", "expected 5 fields"),
    (_mutated(lambda d: d["models"][0].__setitem__("tp", [1, "x"])), "models[0].tp[1]", "expected an integer, got 'x'"),
    (_mutated(lambda d: d["models"].append({"model": "llama-3.1-8b", "tp": 2})), "models[5].tp", "listed twice"),
    (_set("endpoint", {"kind": "magic"}), "endpoint.kind", "expected one of twin, external, command, vllm"),
    (_set("endpoint", {"kind": "twin", "accel": 7}), "endpoint.accel", "whole number of seconds"),
    (_mutated(lambda d: d["designs"].__setitem__("x", {"points": [
        {"model": "llama-3.1-8b", "tp": 1, "family": "W1", "input_tokens": 100}]})),
     "designs.x.points[0].input_tokens", "100 is not an allowed W1 value"),
])
def test_bounds_and_loop_errors_are_one_line(tmp_path, doc, field, problem):
    path = _write(tmp_path, doc)
    with pytest.raises(InputError) as ei:
        load_campaign(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{path}: {field}: "), msg
    assert problem in msg, msg


def test_cron_error_comes_from_cronsim():
    with pytest.raises(InputError) as ei:
        validate_cron("0 25 * * *")
    assert str(ei.value) == "<cron>: schedule: '0 25 * * *': hour field '25' is invalid (Bad hour)"
    with pytest.raises(InputError, match=r"^c\.yaml: schedule: expected a string, got 5$"):
        parse_campaign(_set("schedule", 5), source="c.yaml")
    assert validate_cron("0  3 * * 1") == "0 3 * * 1"
    assert parse_campaign(_set("schedule", "*/30  2 * * mon"), source="c.yaml").schedule == "*/30 2 * * mon"


def test_typed_spec_defaults_are_declared_once():
    from rooflab.collect.spec import (
        ENGINE_DEFAULTS,
        CampaignSpec,
        Collection,
        EngineSettings,
    )

    doc = {"name": "tiny", "models": [{"model": "llama-3.1-8b", "tp": 1}],
           "families": {"W3": {"rate": [1, 4], "input_tokens": 128, "output_tokens": 32}},
           "validation": {"points": []}, "engine": {"max_model_len": 4096}}
    c = parse_campaign(doc, source="tiny.yaml")
    assert c.spec == CampaignSpec.model_validate(doc) and c.hardware == "H100-SXM"
    assert (c.duration_s, c.replicates, c.seed, c.budget_gpu_hours, c.schedule) == (120.0, 1, 0, None, None)
    assert c.collection == Collection() and c.endpoint.kind == "twin" and c.endpoint.accel == 20.0
    assert c.engine == {**ENGINE_DEFAULTS, "max_model_len": 4096} and ENGINE_DEFAULTS == EngineSettings().model_dump()
    assert c.engine_config().max_model_len == 4096 and c.loop == LoopSettings()
    # static99 keeps the seed's W3 rates the campaign allows ({1, 8, 32, 64, 128} ∩ {1, 4}), nothing held out
    assert list(c.designs) == ["static99"] and [p.param("rate") for p in static99(c)] == [1.0]

