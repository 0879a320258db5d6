"""The sim-to-real benchmark kit (``../shared/data/s2r/``) as typed objects: :func:`load_kit` reads
``experiments.json`` (and, for the 15 trainval runs, ``src/trained_physics_iter29.json``) into one
:class:`Experiment` per run — model, hardware, TP, vLLM engine settings, the requested workload
(:class:`WorkloadSpec`), the measured client-side metrics (:class:`Measured`, ms) and every simulator's
predictions in the same layout.

Rules taken from the kit (``s2r/README.md``, ``experiments.json["schema"]``):

* every field is ``{value, src, note}``; a ``null`` value is "not known" (nothing is guessed here either);
* metrics are ms; stage keys ``overall`` (= stage_index −1, the whole run), ``stage_0``, ``stage_1``; ITL is
  derived ``(mean E2E − mean TTFT) / (mean output length − 1)``, so ``itl_p90`` / ``itl_p99`` are always None;
* the 12 ``withheld_eval_experiments`` have no measurements and no predictions: ``measured`` is None and
  ``withheld`` is True. Nothing here looks them up anywhere else (the README forbids it);
* engine defaults the kit records as null (prefix caching, chunked prefill) are vLLM v0.15.1's: both on;
  block size 16; ``gpu_memory_utilization`` null (the 3 date-named trainval runs) means the 0.9 default;
* KV blocks: only the trainval runs have them (kit trap 1; vLLM's "GPU KV cache size" tokens // 16). vLLM keeps
  one of them as the null block, so :meth:`EngineSettings.engine_dict` passes ``total_kv_blocks − 1`` as the
  usable ``num_gpu_blocks`` (the ``kv_blocks_total_gpu`` convention of ``../real/``);
* kit trap 5: :attr:`Experiment.real_run` names the request-level run of ``../real/`` an experiment *is*
  (eval 2, 3, 6, 7, 9, 10, 11 and the three date-named trainval runs).

A malformed field raises a one-line :class:`~rooflab.errors.InputError` naming the file and the field path,
e.g. ``.../experiments.json: experiments[3].tp.value: expected int, got str 'two'``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rooflab.data.workload_spec import SharedPrefix, Stage, WorkloadSpec
from rooflab.errors import InputError
from rooflab.model.arch import list_models, resolve_model_name
from rooflab.paths import CONFIGS_DIR, S2R_DIR

# the kit's names (experiments.json "schema"; S2R_CODE metrics.py)
METRIC_NAMES = ("e2e_mean", "e2e_p90", "e2e_p99", "ttft_mean", "ttft_p90", "ttft_p99", "itl_mean", "itl_p90", "itl_p99")
SCORED_METRICS = METRIC_NAMES[:7]  # itl_p90 / itl_p99 are never computed
OVERALL = "overall"
EXTRA_NAMES = ("successes", "failures", "prompt_len_mean", "output_len_mean", "output_len_min", "output_len_max",
               "requested_rate", "achieved_rate", "send_duration_s")
SIMULATORS = ("blis-trained-physics", "blis-evolved", "blis-roofline", "llmservingsim", "vidur",
              "llm-optimizer-estimate", "aiconfigurator-estimate", "blis-trained-physics-iter29-golden")
SPLITS = ("eval", "trainval")
HARDWARE = {"H100": "H100-SXM", "A100-80GB": "A100-80GB", "L40S": "L40S"}  # kit label -> configs/hardware
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
ITER29 = "src/trained_physics_iter29.json"
_RUN_NAME = re.compile(r"\b(\d{8}-\d{6}-[A-Za-z0-9.\-]+[A-Za-z0-9])")


def stage_key(index: int) -> str:
    """The kit's key of stage ``index`` (−1 = the whole run)."""
    return OVERALL if index < 0 else f"stage_{index}"


class _Where:
    """Where a value sits, for one-line errors: ``<file>: experiments[i].<path>: <problem>``."""

    def __init__(self, source: Path, prefix: str):
        self.source, self.prefix = source, prefix

    def error(self, path: str, problem: str) -> InputError:
        return InputError(self.source, ".".join(x for x in (self.prefix, path) if x) or None, problem)

    def sub(self, path: str) -> _Where:
        return _Where(self.source, ".".join(x for x in (self.prefix, path) if x))

    def at(self, obj: Any, path: str) -> Any:
        cur, done = obj, []
        for part in path.split("."):
            done.append(part)
            if not isinstance(cur, dict) or part not in cur:
                raise self.error(".".join(done), "missing")
            cur = cur[part]
        return cur

    def check(self, v: Any, path: str, kind: str, optional: bool = False) -> Any:
        if v is None:
            if optional:
                return None
            raise self.error(path, f"expected {kind}, got null")
        ok = {"int": isinstance(v, int) and not isinstance(v, bool),
              "float": isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": isinstance(v, str), "bool": isinstance(v, bool), "dict": isinstance(v, dict),
              "list": isinstance(v, list), "id": isinstance(v, (int, str)) and not isinstance(v, bool)}[kind]
        if not ok:
            raise self.error(path, f"expected {kind}, got {type(v).__name__} {repr(v)[:60]}")
        return float(v) if kind == "float" else v

    def get(self, obj: Any, path: str, kind: str, optional: bool = False) -> Any:
        return self.check(self.at(obj, path), path, kind, optional)

    def value(self, obj: Any, path: str, kind: str, optional: bool = False) -> Any:  # a {value, src, note} field
        node = self.at(obj, path)
        if not isinstance(node, dict) or "value" not in node:
            raise self.error(path, "expected a {value, src, note} field")
        return self.check(node["value"], path + ".value", kind, optional)


@dataclass(frozen=True)
class StageMetrics:
    """One stage's (or the whole run's) client-side metrics in ms, the kit's names; None = not known."""

    e2e_mean: float | None = None
    e2e_p90: float | None = None
    e2e_p99: float | None = None
    ttft_mean: float | None = None
    ttft_p90: float | None = None
    ttft_p99: float | None = None
    itl_mean: float | None = None
    itl_p90: float | None = None
    itl_p99: float | None = None
    # inference-perf's own counts (only the 10 runs with raw outputs: actual.inference_perf_extras)
    completed: int | None = None  # successes
    failures: int | None = None
    prompt_len_mean: float | None = None
    output_len_mean: float | None = None  # client re-tokenised count (notes §3.7), not what was generated
    extras: dict[str, float | None] = field(default_factory=dict)  # the other EXTRA_NAMES

    def metric(self, name: str) -> float | None:
        if name not in METRIC_NAMES:
            raise InputError(None, "metric", f"unknown {name!r} (known: {', '.join(METRIC_NAMES)})")
        return getattr(self, name)

    def as_dict(self) -> dict[str, float | None]:
        """The kit's layout: ``{e2e_mean, …, itl_p99}``."""
        return {m: getattr(self, m) for m in METRIC_NAMES}


@dataclass(frozen=True)
class Measured:
    """Metrics per stage key (``overall``, ``stage_0``, …): the measurement, or one simulator's prediction."""

    stages: dict[str, StageMetrics]
    src: tuple[str, ...] = ()
    note: str | None = None
    completed_requests: int | None = None  # a simulator's own count (BLIS iter29)
    reference: StageMetrics | None = None  # LLMServingSim's own ground truth: the first 300 requests

    @property
    def overall(self) -> StageMetrics:
        return self.stages[OVERALL]

    def get(self, metric: str, stage: str = OVERALL) -> float | None:
        s = self.stages.get(stage)
        return None if s is None else s.metric(metric)

    def to_ms_dict(self) -> dict[str, dict[str, float | None]]:
        return {k: s.as_dict() for k, s in self.stages.items()}


@dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    gpu_memory_utilization: float | None  # None: not recorded (vLLM default 0.9)
    block_size: int = 16
    enable_prefix_caching: bool = True  # vLLM v0.15.1 default (kit: null = no flag)
    enable_chunked_prefill: bool = True
    cpu_offload: bool | None = None  # the manifest's knob (kit trap 3: meaning unverified)
    cpu_offload_mechanism: str | None = None
    cpu_kv_blocks: int | None = None
    total_kv_blocks: int | None = None  # vLLM's log count (GPU KV cache size // 16); trainval only
    kv_blocks_source: str | None = None

    def engine_dict(self) -> dict[str, Any]:
        """The :data:`rooflab.data.traces.ENGINE_KEYS` subset a :class:`~rooflab.data.traces.Trace` carries."""
        gmu = self.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
        d: dict[str, Any] = {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                             "block_size": self.block_size, "max_model_len": self.max_model_len,
                             "gpu_memory_utilization": gmu, "enable_prefix_caching": self.enable_prefix_caching}
        if self.total_kv_blocks is not None:
            d["num_gpu_blocks"] = self.total_kv_blocks - 1  # one block is vLLM's null block
        return d


@dataclass(frozen=True)
class Experiment:
    exp_id: int | str
    id: str
    split: str
    withheld: bool
    model: str  # Hugging Face id
    model_config: Path  # absolute path of the kit's config.json
    rooflab_model: str | None  # configs/models/<folder>, None when rooflab ships no config for it
    hardware: str  # rooflab name (configs/hardware)
    tp: int
    engine: EngineSettings
    workload: WorkloadSpec
    measured: Measured | None
    predictions: dict[str, Measured]
    blis_iter29: Measured | None = None  # BLIS's simulated golden outputs (trainval; overall only)
    blis_iter29_totals: dict[str, int] = field(default_factory=dict)  # total_input/output_tokens, ttft_sum_us
    real_run: str | None = None  # the ../real/ request-level run this experiment is (kit trap 5)
    kit_hardware: str = ""
    gpu_memory_gb: float | None = None
    precision: str | None = None
    dp: int | None = None
    index: int = -1  # position in experiments.json

    @property
    def key(self) -> str:
        return str(self.exp_id)

    @property
    def model_name(self) -> str:
        """What :func:`rooflab.model.arch.load_model` reads: the rooflab folder, else the kit's config path."""
        return self.rooflab_model or str(self.model_config)

    def require_rooflab_model(self) -> str:
        if self.rooflab_model is None:
            raise InputError(self.model_config.parents[2] / "experiments.json", f"experiments[{self.index}].model",
                             f"{self.model} has no configs/models folder (add an alias to configs/models/aliases.yaml "
                             f"or load {self.model_config} directly)")
        return self.rooflab_model


@dataclass(frozen=True)
class S2RKit:
    root: Path
    experiments: list[Experiment]
    withheld_ids: tuple[int | str, ...]
    sources: dict[str, dict]

    def get(self, exp_id: int | str) -> Experiment:
        for e in self.experiments:
            if e.key == str(exp_id) or e.id == str(exp_id):
                return e
        raise InputError(self.root / "experiments.json", "experiments", f"no experiment {exp_id!r}")

    def split(self, name: str) -> list[Experiment]:
        return [e for e in self.experiments if e.split == name]

    def scored(self) -> list[Experiment]:
        """The experiments with measurements (not withheld)."""
        return [e for e in self.experiments if e.measured is not None]


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_kit_model(hf_id: str, config: Path) -> str | None:
    """The rooflab model folder of a kit model: its alias (``configs/models/aliases.yaml``) or lower-cased
    repo name, else a shipped folder whose config.json equals the kit's; None if there is none."""
    known, base = set(list_models()), hf_id.split("/")[-1]
    for cand in (resolve_model_name(hf_id), resolve_model_name(base), resolve_model_name(base.lower())):
        if cand in known:
            return cand
    mine = _json_or_none(config)
    same = [n for n in sorted(known) if mine and _json_or_none(CONFIGS_DIR / "models" / n / "config.json") == mine]
    return same[0] if same else None


def _stage_metrics(w: _Where, obj: Any, path: str, extras: Any = None, extras_path: str = "") -> StageMetrics:
    w.check(obj, path, "dict")
    sw = w.sub(path)
    missing = [m for m in SCORED_METRICS if m not in obj]
    if missing:
        raise sw.error(missing[0], "missing")
    vals: dict[str, Any] = {m: sw.get(obj, m, "float", optional=True) if m in obj else None for m in METRIC_NAMES}
    if extras is not None:
        ew = w.sub(extras_path)
        ew.check(extras, "", "dict")
        x = {k: ew.check(extras.get(k), k, "float", optional=True) for k in EXTRA_NAMES}
        n, f = x.pop("successes"), x.pop("failures")
        vals.update(completed=None if n is None else int(n), failures=None if f is None else int(f),
                    prompt_len_mean=x.pop("prompt_len_mean"), output_len_mean=x.pop("output_len_mean"), extras=x)
    return StageMetrics(**vals)


def _metrics_block(w: _Where, block: dict, path: str) -> dict[str, StageMetrics]:
    bw = w.sub(path)
    metrics = bw.get(block, "metrics", "dict")
    extras = bw.get(block, "inference_perf_extras", "dict", optional=True) if "inference_perf_extras" in block else None
    out = {key: _stage_metrics(bw, obj, f"metrics.{key}", (extras or {}).get(key), f"inference_perf_extras.{key}")
           for key, obj in metrics.items()}
    if OVERALL not in out:
        raise bw.error(f"metrics.{OVERALL}", "missing")
    return out


def _workload(w: _Where, e: dict) -> WorkloadSpec:
    prof = w.value(e, "workload.requested_profile", "dict")
    p = "workload.requested_profile.value"
    if "inference_perf" in prof:
        shape, sp_path, st_path = "blis", "inference_perf.shared_prefix", "inference_perf.stages"
    elif "data" in prof:
        shape, sp_path, st_path = "profile", "data.shared_prefix", "load.stages"
    else:
        shape, sp_path, st_path = "preset", "shared_prefix", "load.stages"
    pw = w.sub(p)
    sp = pw.get(prof, sp_path, "dict")
    spw = pw.sub(sp_path)
    executed = w.value(e, "workload.executed_config", "dict", optional=True) or {}
    ex_sp = (executed.get("data") or {}).get("shared_prefix") or {}
    ew = w.sub("workload.executed_config.value.data.shared_prefix")
    opt = {k: spw.check(sp.get(k), k, "int", True) for k in ("num_unique_system_prompts",
                                                             "num_users_per_system_prompt")}
    opt.update({k: ew.check(ex_sp.get(k, sp.get(k)), k, "int", True) for k in ("num_groups", "num_prompts_per_group")})
    shared = SharedPrefix(**{k: spw.get(sp, k, "int") for k in ("system_prompt_len", "question_len", "output_len")},
                          enable_multi_turn_chat=spw.check(sp.get("enable_multi_turn_chat", False),
                                                           "enable_multi_turn_chat", "bool"), **opt)
    stages = []
    for i, s in enumerate(pw.get(prof, st_path, "list")):
        sw = pw.sub(f"{st_path}[{i}]")
        rate, dur = sw.get(s, "rate", "float"), sw.get(s, "duration", "float")
        if rate <= 0 or dur <= 0:
            raise sw.error("", f"rate and duration must be > 0, got rate {rate:g}, duration {dur:g}")
        stages.append(Stage(rate, dur))
    if not stages:
        raise pw.error(st_path, "no stages")
    load = prof.get("load") or {}
    seed = w.value(e, "workload.seed", "int", optional=True)
    if seed is None and shape == "blis":
        seed = pw.get(prof, "seed", "int", optional=True)
    nreq = pw.get(prof, "num_requests", "int") if shape == "blis" else \
        w.value(e, "workload.expected_num_requests", "int", optional=True)
    interval = (executed.get("load") or {}).get("interval", 1.0)
    return WorkloadSpec(tuple(stages), shared, w.value(e, "workload.label", "str", optional=True), seed, nreq,
                        str(load.get("type", "constant")), float(interval), shape)


def _engine(w: _Where, e: dict, iter29: dict | None) -> EngineSettings:
    g = w.value
    blocks = g(e, "engine.total_kv_blocks", "int", optional=True)
    cpu_blocks = g(e, "engine.cpu_kv_blocks", "int", optional=True)
    source = "experiments.json" if blocks is not None else None
    if iter29 is not None:
        for name, mine in (("total_kv_blocks", blocks), ("cpu_kv_blocks", cpu_blocks)):
            theirs = iter29.get(name)
            if mine is not None and theirs is not None and int(theirs) != mine:
                raise w.error(f"engine.{name}.value", f"{mine} disagrees with {ITER29} ({theirs})")
        if blocks is None and iter29.get("total_kv_blocks") is not None:
            blocks, source = int(iter29["total_kv_blocks"]), ITER29
        if cpu_blocks is None and iter29.get("cpu_kv_blocks") is not None:
            cpu_blocks = int(iter29["cpu_kv_blocks"])
    pc, cp = (g(e, f"engine.{k}", "bool", optional=True) for k in ("enable_prefix_caching", "enable_chunked_prefill"))
    gmu = g(e, "engine.gpu_memory_utilization", "float", optional=True)
    if gmu is not None and not 0 < gmu <= 1:
        raise w.error("engine.gpu_memory_utilization.value", f"must be in (0, 1], got {gmu:g}")
    return EngineSettings(
        max_num_seqs=g(e, "engine.max_num_seqs", "int"), max_model_len=g(e, "engine.max_model_len", "int"),
        max_num_batched_tokens=g(e, "engine.max_num_batched_tokens", "int"), gpu_memory_utilization=gmu,
        block_size=g(e, "engine.block_size", "int", optional=True) or 16,
        enable_prefix_caching=True if pc is None else pc, enable_chunked_prefill=True if cp is None else cp,
        cpu_offload=g(e, "engine.cpu_offload", "bool", optional=True),
        cpu_offload_mechanism=w.check((e["engine"].get("cpu_offload") or {}).get("mechanism"),
                                      "engine.cpu_offload.mechanism", "str", True),
        cpu_kv_blocks=cpu_blocks, total_kv_blocks=blocks, kv_blocks_source=source)


def _predictions(w: _Where, e: dict) -> dict[str, Measured]:
    preds = w.get(e, "predictions", "dict", optional=True) or {}
    out: dict[str, Measured] = {}
    for sim, block in preds.items():
        if sim.startswith("_") or sim == "withheld":
            continue
        pw = w.sub("predictions")
        pw.check(block, sim, "dict")
        ref, src = block.get("actual_first_300_requests"), block.get("src")
        out[sim] = Measured(_metrics_block(pw, block, sim), tuple([src] if isinstance(src, str) else src or ()),
                            block.get("note"), block.get("completed_requests"),
                            _stage_metrics(pw, ref, f"{sim}.actual_first_300_requests") if ref is not None else None)
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(path, None, "file not found (not an s2r kit folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno}: {exc.msg}") from None


def _iter29(root: Path) -> dict[str, tuple[int, dict]]:
    """BLIS's iter29 golden file by experiment id: (index in the file, entry); {} if the kit lacks it."""
    path = root / ITER29
    if not path.is_file():
        return {}
    doc, w, out = _read_json(path), _Where(path, ""), {}
    for i, x in enumerate(w.check(doc.get("experiments") if isinstance(doc, dict) else None, "experiments", "list")):
        xw = w.sub(f"experiments[{i}]")
        xw.check(x, "", "dict")
        xw.get(x, "expected", "dict")
        out[str(xw.get(x, "id", "id"))] = (i, x)
    return out


def _blis_iter29(path: Path, i: int, x: dict) -> tuple[Measured, dict[str, int]]:
    w = _Where(path, f"experiments[{i}].expected")
    ex = x["expected"]
    vals = {m: w.get(ex, f"{m}_ms", "float") for m in SCORED_METRICS}
    totals = {k: int(w.get(ex, k, "float")) for k in ("completed_requests", "total_input_tokens",
                                                      "total_output_tokens", "ttft_sum_us")}
    return (Measured({OVERALL: StageMetrics(**vals, completed=totals["completed_requests"])}, ("BLIS_TP29",),
                     "BLIS-simulated (iter29 coefficients), not measured", totals["completed_requests"]), totals)


def _real_run(root: Path, e: dict) -> str | None:
    text = f"{((e.get('workload') or {}).get('executed_config') or {}).get('note') or ''} {e.get('id', '')}"
    return next((n for n in _RUN_NAME.findall(text) if (root / "src" / "training_default_args" / n).is_dir()), None)


def _experiment(root: Path, source: Path, i: int, e: Any, withheld_ids: set[str],
                iter29: dict[str, tuple[int, dict]]) -> Experiment:
    w = _Where(source, f"experiments[{i}]")
    w.check(e, "", "dict")
    exp_id = w.get(e, "exp_id", "id")
    split = w.get(e, "split", "str")
    if split not in SPLITS:
        raise w.error("split", f"expected eval or trainval, got {split!r}")
    actual = w.get(e, "actual", "dict")
    withheld = bool(actual.get("withheld", False))
    if withheld != (str(exp_id) in withheld_ids):
        raise w.error("actual.withheld", f"{withheld} disagrees with withheld_eval_experiments for exp {exp_id}")
    model = w.value(e, "model", "str")
    cfg = root / w.value(e, "model_config", "str")
    if not cfg.is_file():
        raise w.error("model_config.value", f"no such file {cfg}")
    kit_hw = w.value(e, "hardware", "str")
    if kit_hw not in HARDWARE:
        raise w.error("hardware.value", f"unknown hardware {kit_hw!r} (known: {', '.join(HARDWARE)})")
    i29, it = iter29.get(str(exp_id), (-1, None)) if split == "trainval" else (-1, None)
    measured = None if withheld else Measured(_metrics_block(w, actual, "actual"), tuple(actual.get("src") or ()),
                                              actual.get("note"))
    blis, totals = _blis_iter29(root / ITER29, i29, it) if it is not None else (None, {})
    tp = w.value(e, "tp", "int")
    if tp < 1:
        raise w.error("tp.value", f"must be >= 1, got {tp}")
    return Experiment(
        exp_id=exp_id, id=w.get(e, "id", "str"), split=split, withheld=withheld, model=model, model_config=cfg,
        rooflab_model=resolve_kit_model(model, cfg), hardware=HARDWARE[kit_hw], tp=tp,
        engine=_engine(w, e, it), workload=_workload(w, e), measured=measured,
        predictions={} if withheld else _predictions(w, e), blis_iter29=blis, blis_iter29_totals=totals,
        real_run=_real_run(root, e), kit_hardware=kit_hw,
        gpu_memory_gb=w.check(e["hardware"].get("memory_gb"), "hardware.memory_gb", "float", True),
        precision=w.value(e, "precision", "str", optional=True) if "precision" in e else None,
        dp=w.value(e, "dp", "int", optional=True) if "dp" in e else None, index=i)


def load_kit(root: str | Path = S2R_DIR) -> S2RKit:
    """Read the kit at ``root`` (default ``rooflab.paths.S2R_DIR``): all experiments, typed and checked."""
    root = Path(root)
    source = root / "experiments.json"
    doc = _read_json(source)
    top = _Where(source, "")
    if not isinstance(doc, dict):
        raise InputError(source, None, "expected a JSON object")
    withheld = tuple(top.check(doc.get("withheld_eval_experiments", []), "withheld_eval_experiments", "list"))
    raw = top.check(doc.get("experiments"), "experiments", "list")
    iter29 = _iter29(root)
    exps = [_experiment(root, source, i, e, {str(x) for x in withheld}, iter29) for i, e in enumerate(raw)]
    keys = [e.key for e in exps]
    for e in exps:
        if keys.count(e.key) > 1:
            raise InputError(source, f"experiments[{e.index}].exp_id", f"duplicate exp_id {e.exp_id!r}")
    return S2RKit(root, exps, withheld, dict(doc.get("sources") or {}))
