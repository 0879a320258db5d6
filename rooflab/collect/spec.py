"""Campaign config: the typed campaign spec, its checks, and the :class:`Campaign` the rest of rooflab uses
(SPEC §3, §4, §10).

A campaign YAML (``configs/campaigns/<name>.yaml``) names the (model, TP, hardware) combos to train on
and to hold out, the workload families and parameter values allowed, the run duration, vLLM engine
options, the GPU budget, a cron schedule, collection limits, the endpoint, named designs and the campaign
loop's settings. :class:`CampaignSpec` (pydantic v2, every section a frozen ``extra="forbid"`` model) is
the single source of every setting's type, bounds and default; :func:`parse_campaign` then checks what
needs more than one field or the model/hardware registry (TP divides the heads, weights + KV cache fit,
``max_model_len`` covers the longest request, no duplicate combo, design points are candidates, ...) and
builds the :class:`Campaign`. The **candidate space** is the cross product of every combo with every
allowed family point; each candidate carries its split (``validation`` on held-out combos). Every problem
is a one-line :class:`~rooflab.errors.InputError` ``<file>: <field.path>: <problem>``.

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
    loop: {batch_size: 6, max_iterations: 4, targeting: d-optimal}
    designs:
      static99: {generator: static99}

Depends on :mod:`rooflab.collect.endpoint_spec` (model building blocks, error conversion, the endpoint
models), :mod:`rooflab.collect.designs` (designs, static plan), :mod:`rooflab.collect.workloads`,
:mod:`rooflab.data.sweep`, the model/hardware registry (:mod:`rooflab.model`) and ``cronsim``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from rooflab.collect.designs import (  # noqa: F401  (SEED_ORDER, _canon, static99: re-exported)
    SEED_ORDER,
    TP,
    DesignName,
    DesignSpec,
    FamilyName,
    FamilyValues,
    SelectorSpec,
    _canon,
    build_designs,
    check_selectors,
    static99,
    unknown_family,
    v1_default,
)
from rooflab.collect.endpoint_spec import (
    AS_LIST,
    DISTINCT,
    AnyEndpoint,
    Flag,
    Int,
    Num,
    Origin,
    Spec,
    Text,
    TwinSpec,
    problem,
    validate,
)
from rooflab.collect.workloads import FAMILIES, PARAMS, make_params
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.errors import InputError
from rooflab.model.arch import ModelArch, list_models, load_model
from rooflab.model.engine_config import EngineConfig, kv_capacity_blocks
from rooflab.model.features import FORMULAS
from rooflab.model.hardware import Hardware, list_hardware, load_hardware
from rooflab.model.variants import DEFAULT_VARIANT, VARIANTS
from rooflab.paths import CONFIGS_DIR

CAMPAIGNS_DIR = CONFIGS_DIR / "campaigns"
MAX_ENGINE_INT = 10_000_000
Targeting = Literal["d-optimal", "menu", "random"]
TARGETING = get_args(Targeting)
CRON_FIELDS = ("minute", "hour", "day of month", "month", "day of week")
TPs = Annotated[tuple[TP, ...], AS_LIST, DISTINCT]  # a TP degree or a list of them


# ---------------------------------------------------------------------------------------------- scalar checks
def _campaign_name(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
        raise problem(f"{v!r}: use letters, digits, '.', '_' and '-' only")
    return v


def _member(what: str, known: Any) -> AfterValidator:
    def check(v: str) -> str:
        if v not in known:
            raise problem(f"unknown {what} {v!r} (known: {', '.join(known)})")
        return v

    return AfterValidator(check)


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a standard 5-field cron string (minute hour day-of-month month day-of-week), as
    ``cronsim`` (the parser of ``rooflab serve``'s fire times) reads it; None when it is one."""
    from cronsim import CronSim, CronSimError

    parts = expr.split()
    if len(parts) != 5:  # cronsim reads 6 fields as seconds-first, Prefect's croniter as seconds-last: refuse both
        return f"{expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
    try:
        CronSim(expr, datetime(2000, 1, 1))
    except CronSimError as exc:
        msg = str(exc)
        for part, name in zip(parts, CRON_FIELDS):
            if msg.lower() == f"bad {name.replace(' ', '-')}":
                return f"{expr!r}: {name} field {part!r} is invalid ({msg})"
        return f"{expr!r}: {msg}"
    return None


def _cron(v: str) -> str:
    bad = cron_problem(v)
    if bad:
        raise problem(bad)
    return " ".join(v.split())


def validate_cron(expr: object, source: str = "<cron>", where: str = "schedule") -> str:
    """``expr`` normalised (single spaces) if it is a valid 5-field cron string, else a one-line InputError."""
    if not isinstance(expr, str):
        raise InputError(source, where, f"expected a cron string, got {expr!r}")
    bad = cron_problem(expr)
    if bad:
        raise InputError(source, where, bad)
    return " ".join(expr.split())


# ---------------------------------------------------------------------------------------------- section models
class EngineSettings(Spec):
    """vLLM options of every run (the twin's too)."""

    max_num_seqs: Annotated[Int, Field(ge=1, le=MAX_ENGINE_INT)] = 256
    max_num_batched_tokens: Annotated[Int, Field(ge=1, le=MAX_ENGINE_INT)] = 2048
    max_model_len: Annotated[Int, Field(ge=1, le=MAX_ENGINE_INT)] = 16384
    gpu_memory_utilization: Annotated[Num, Field(gt=0, le=1)] = 0.9
    enable_prefix_caching: Flag = False

    def config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump())


ENGINE_DEFAULTS = EngineSettings().model_dump()  # the engine options a campaign that gives none runs with


class Collection(Spec):
    """How runs are collected."""

    concurrency: Annotated[Int, Field(ge=1, le=256)] = 1  # runs collected at once
    max_retries: Annotated[Int, Field(ge=0, le=20)] = 2  # a failed run is retried this often, then recorded failed
    timeout_s: Annotated[Num, Field(gt=0, le=7 * 86400)] = 1800.0  # wall-clock limit of one run


class LoopSettings(Spec):
    """The campaign loop (``rooflab campaign``, :mod:`flows.campaign`): bootstrap → calibrate → target → …"""

    batch_size: Annotated[Int, Field(ge=1, le=10_000)] = 6  # sweep points per targeted iteration
    max_iterations: Annotated[Int, Field(ge=1, le=1000)] = 4  # iteration cap (bootstrap = iteration 0)
    variant: Annotated[Text, _member("variant", VARIANTS)] = DEFAULT_VARIANT  # model variant fitted
    formulas: Annotated[Text, _member("formulas", FORMULAS)] | None = None  # None: the variant's own formulas
    targeting: Targeting = "d-optimal"  # how the next batch is picked
    n_boot: Annotated[Int, Field(ge=2, le=100_000)] = 100  # bootstrap resamples of each fit
    replay_stop: Flag = False  # the stop rule also requires the held-out replay error

    @field_validator("formulas")
    @classmethod
    def _formulas_fit_the_variant(cls, v: str | None, info: ValidationInfo) -> str | None:
        variant = info.data.get("variant")
        if v is not None and variant in VARIANTS and v not in VARIANTS[variant].formulas:
            raise problem(f"variant {variant} uses the {' or '.join(VARIANTS[variant].formulas)} formulas, not {v!r}")
        return v


class ComboSpec(Spec):
    model: Text  # configs/models name or alias
    tp: TPs  # a TP degree or a list of them
    hardware: Text | None = None  # default: the campaign's hardware


class ValidationSpec(Spec):
    models: tuple[ComboSpec, ...] = ()  # held-out combos
    points: tuple[SelectorSpec, ...] = Field(default_factory=v1_default)  # V1: what static99 runs on them


def _all_families() -> dict[str, FamilyValues]:
    return {f: FamilyValues() for f in FAMILIES}


BudgetHours = Annotated[Num, Field(gt=0, le=1_000_000)] | None  # GPU-hours; None: unlimited


class BudgetOnly(Spec):
    budget_gpu_hours: BudgetHours = None


class CampaignSpec(Spec):
    """A campaign document, typed: every setting with its bounds and default."""

    name: Annotated[Text, AfterValidator(_campaign_name)]  # the campaign id
    hardware: Text = "H100-SXM"  # of combos that name none
    models: tuple[ComboSpec, ...]  # training combos
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    families: dict[FamilyName, FamilyValues] = Field(default_factory=_all_families)
    duration_s: Annotated[Int, Field(ge=1, le=86400)] = 120  # stage duration: inference-perf takes whole seconds
    replicates: Annotated[Int, Field(ge=1, le=100)] = 1
    seed: Annotated[Int, Field(ge=0, lt=2**32)] = 0
    engine: EngineSettings = Field(default_factory=EngineSettings)
    budget_gpu_hours: BudgetHours = None
    schedule: Annotated[Text, AfterValidator(_cron)] | None = None  # cron (``rooflab serve``)
    collection: Collection = Field(default_factory=Collection)
    endpoint: AnyEndpoint = TwinSpec()
    loop: LoopSettings = Field(default_factory=LoopSettings)
    designs: dict[DesignName, DesignSpec] = Field(default_factory=dict)

    @field_validator("families", mode="before")
    @classmethod
    def _family_list(cls, v: Any) -> Any:
        if isinstance(v, list):  # families: [W1, W3] = those families with their seed values
            for i, f in enumerate(v):
                if not isinstance(f, str) or f not in FAMILIES:
                    raise problem(unknown_family(f), i)
            if len(set(v)) != len(v):
                raise problem("a family is listed twice")
            v = {f: None for f in v}
        if isinstance(v, dict) and not v:
            raise problem("no family allowed")
        return v


# ---------------------------------------------------------------------------------------------- the campaign
@dataclass(frozen=True)
class Combo:
    """One (model, TP, hardware) setting and the split all its runs serve."""

    model: str  # configs/models folder name (aliases resolved)
    tp: int
    hardware: str
    split: str = "train"

    def label(self) -> str:
        return f"{self.model}/tp{self.tp}/{self.hardware}"


@dataclass
class Campaign:
    """A validated campaign: its spec plus what the checks derived (resolved combos, allowed values,
    designs as sweep points, warnings). Settings read through to :attr:`spec`."""

    spec: CampaignSpec
    source: str
    hardware: str  # the resolved name of spec.hardware
    combos: list[Combo]  # training combos first, then the held-out ones
    families: dict[str, dict[str, tuple]]  # family -> parameter -> allowed values (PARAMS order)
    validation_points: list[tuple[str, dict[str, tuple]]]  # V1 selectors: (family, parameter -> values)
    designs: dict[str, dict] = field(default_factory=dict)  # name -> {"generator": g} | {"points": [SweepPoint]}
    warnings: list[str] = field(default_factory=list)  # feasible but doubtful settings (e.g. a tight KV cache)

    # ------------------------------------------------------------------ settings
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def duration_s(self) -> float:
        return float(self.spec.duration_s)

    @property
    def replicates(self) -> int:
        return self.spec.replicates

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def engine(self) -> dict[str, int | float | bool]:
        return self.spec.engine.model_dump()

    @property
    def budget_gpu_hours(self) -> float | None:
        return self.spec.budget_gpu_hours

    @property
    def schedule(self) -> str | None:
        return self.spec.schedule

    @property
    def collection(self) -> Collection:
        return self.spec.collection

    @property
    def endpoint(self) -> AnyEndpoint:
        return self.spec.endpoint

    @property
    def loop(self) -> LoopSettings:
        return self.spec.loop

    def with_loop(self, **overrides: Any) -> Campaign:
        """A copy with some loop settings replaced (None leaves one as it is), validated like the file's."""
        raw = {**self.loop.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        loop = validate(LoopSettings, raw, Origin(self.source, {"loop": raw}), ("loop",))
        return dataclasses.replace(self, spec=self.spec.model_copy(update={"loop": loop}))

    def with_budget(self, gpu_hours: float | None) -> Campaign:
        """A copy with another GPU budget (None: unlimited), validated like the file's ``budget_gpu_hours``."""
        raw = {**self.spec.model_dump(include={"budget_gpu_hours"}), "budget_gpu_hours": gpu_hours}
        checked = validate(BudgetOnly, raw, Origin(self.source, raw), ())
        spec = self.spec.model_copy(update={"budget_gpu_hours": checked.budget_gpu_hours})
        return dataclasses.replace(self, spec=spec)

    # ------------------------------------------------------------------ views
    @property
    def train_combos(self) -> list[Combo]:
        return [c for c in self.combos if c.split == "train"]

    @property
    def validation_combos(self) -> list[Combo]:
        return [c for c in self.combos if c.split == "validation"]

    def point(self, combo: Combo, family: str, params: dict) -> SweepPoint:
        return SweepPoint(model=combo.model, tp=combo.tp, hardware=combo.hardware, family=family,
                          params=tuple(make_params(**params).items()), duration_s=self.duration_s,
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

    def engine_config(self) -> EngineConfig:
        """The twin engine settings of this campaign's runs."""
        return self.spec.engine.config()

    def runs(self, points: list[SweepPoint]) -> list[tuple[str, SweepPoint, int]]:
        """(run id, point, replicate) of every run of ``points`` × ``replicates``."""
        return [(run_id(self.name, p, r), p, r) for p in points for r in range(self.replicates)]

    @staticmethod
    def gpu_seconds(points: list[SweepPoint]) -> float:
        """Planned cost: stage duration × GPUs (TP), summed (the drain after the stage is not counted)."""
        return float(sum(gpu_seconds(p) for p in points))


def gpu_seconds(point: SweepPoint) -> float:
    return float(point.duration_s) * int(point.tp)


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


def parse_campaign(doc: object, *, source: str = "<campaign>") -> Campaign:
    """Validate a parsed campaign document (see the module docstring)."""
    origin = Origin(source, doc)
    if doc is None:
        raise InputError(source, None, "empty campaign file")
    spec = validate(CampaignSpec, doc, origin)
    return _Checks(spec, origin).campaign()


class _Checks:
    """What the typed spec cannot say alone: the registry (models, hardware), vLLM's start-up checks and the
    relations between sections. Raises the first problem as a one-line InputError."""

    def __init__(self, spec: CampaignSpec, origin: Origin) -> None:
        self.spec, self.origin, self.err = spec, origin, origin.error
        self.hw_cache: dict[str, Hardware] = {}
        self.warnings: list[str] = []

    def hardware(self, name: str, loc: tuple) -> Hardware:
        if name not in self.hw_cache:
            try:
                self.hw_cache[name] = load_hardware(name)
            except InputError:
                raise self.err(loc, f"unknown hardware {name!r} (known: {', '.join(list_hardware())})") from None
        return self.hw_cache[name]

    def campaign(self) -> Campaign:
        spec = self.spec
        default_hw = self.hardware(spec.hardware, ("hardware",))
        families = self.families()
        longest = max(max(v["input_tokens"]) + max(v["output_tokens"]) for v in families.values())
        if spec.engine.max_model_len < longest:
            raise self.err(("engine", "max_model_len"), f"{spec.engine.max_model_len} is shorter than the longest "
                           f"allowed request ({longest} tokens = input + output); raise it or drop the long points")
        shape = families.get("W3") or FAMILIES["W3"].values()
        batch_request = max(shape["input_tokens"]) + max(shape["output_tokens"])  # the batch-scaling request size
        combos: list[Combo] = []
        self.combos(spec.models, ("models",), "train", default_hw, batch_request, combos)
        if not combos:
            raise self.err(("models",), "no training combo")
        self.combos(spec.validation.models, ("validation", "models"), "validation", default_hw, batch_request, combos)
        validation_points = check_selectors(spec.validation.points, families, self.origin)
        ep = spec.endpoint
        if isinstance(ep, TwinSpec):  # inference-perf's stage durations are whole seconds of wall time
            wall = spec.duration_s / ep.accel
            if wall < 1 or abs(wall - round(wall)) > 1e-9:
                raise self.err(("endpoint", "accel"), f"duration_s / accel = {float(spec.duration_s):g} / "
                               f"{ep.accel:g} must be a whole number of seconds >= 1 (inference-perf stage "
                               "durations are integers)")
        campaign = Campaign(spec=spec, source=self.origin.source, hardware=default_hw.name, combos=combos,
                            families=families, validation_points=validation_points, warnings=self.warnings)
        campaign.designs = build_designs(spec.designs, campaign, self.origin)
        return campaign

    def families(self) -> dict[str, dict[str, tuple]]:
        duration = self.spec.duration_s
        out: dict[str, dict[str, tuple]] = {}
        for f in FAMILIES:  # canonical order
            if f not in self.spec.families:
                continue
            given = self.spec.families[f]
            vals = {p: getattr(given, p) or FAMILIES[f].values()[p] for p in PARAMS}
            for i, rate in enumerate(vals["rate"]):
                n = rate * duration
                if int(n) < 1:
                    raise self.err(("families", f, "rate", i), f"rate {rate:g} × duration_s {duration} < 1: "
                                   "inference-perf would send no request")
                if n > 1_000_000:
                    raise self.err(("families", f, "rate", i), f"rate {rate:g} × duration_s {duration} = {n:g} "
                                   "requests, more than 1000000 per run: lower the rate or duration_s")
            out[f] = vals
        return out

    def combos(self, items: tuple[ComboSpec, ...], at: tuple, split: str, default_hw: Hardware, batch_request: int,
               combos: list[Combo]) -> None:
        engine = self.spec.engine
        eng_cfg = engine.config()
        for i, item in enumerate(items):
            try:
                arch = load_model(item.model)
            except InputError as exc:
                if exc.field is None and exc.source == item.model:
                    raise self.err(at + (i, "model"), f"unknown model {item.model!r} "
                                   f"(known: {', '.join(list_models())})") from None
                raise self.err(at + (i, "model"), f"{item.model!r}: {exc}") from None
            hw = self.hardware(item.hardware, at + (i, "hardware")) if item.hardware else default_hw
            for j, tp in enumerate(item.tp):
                loc = at + (i, "tp", j)
                kv_tokens = self.check_tp(arch, hw, tp, eng_cfg, loc)
                combo = Combo(arch.name, tp, hw.name, split)
                batch_tokens = engine.max_num_seqs * batch_request
                if kv_tokens < batch_tokens:
                    self.warnings.append(
                        f"{self.origin.source}: {self.origin.path(loc)}: tight: {combo.label()} holds "
                        f"{kv_tokens} KV tokens, fewer than max_num_seqs {engine.max_num_seqs} × {batch_request}-token "
                        f"requests ({batch_tokens}): batch-scaling runs will preempt instead of batching")
                for c in combos:
                    if (c.model, c.tp, c.hardware) == (combo.model, combo.tp, combo.hardware):
                        raise self.err(loc, f"{combo.label()} is listed twice"
                                       + (" (once for training, once held out)" if c.split != split else ""))
                combos.append(combo)

    def check_tp(self, arch: ModelArch, hw: Hardware, tp: int, eng_cfg: EngineConfig, loc: tuple) -> int:
        """vLLM's start-up checks: heads split evenly, weights + KV cache fit, one max-length request fits.
        Returns the KV-cache capacity in tokens."""
        max_len = self.spec.engine.max_model_len
        if arch.n_heads % tp:
            raise self.err(loc, f"TP {tp} does not divide {arch.name}'s {arch.n_heads} attention heads")
        if arch.mla is None and not (arch.n_kv_heads % tp == 0 or tp % arch.n_kv_heads == 0):
            raise self.err(loc, f"TP {tp} and {arch.name}'s {arch.n_kv_heads} KV heads: neither divides the other")
        if arch.max_model_len and max_len > arch.max_model_len:
            raise self.err(("engine", "max_model_len"), f"{max_len} exceeds {arch.name}'s max_position_embeddings "
                           f"{arch.max_model_len}")
        try:
            blocks = kv_capacity_blocks(arch, hw, tp, eng_cfg)
        except InputError as exc:
            raise self.err(loc, f"infeasible: {exc.problem} (gpu_memory_utilization "
                           f"{eng_cfg.gpu_memory_utilization:g}); use more GPUs or a larger GPU") from None
        tokens = blocks * eng_cfg.block_size
        if tokens < max_len:
            raise self.err(loc, f"infeasible: {arch.name} on {tp}× {hw.name} leaves KV cache for {tokens} tokens, "
                           f"less than one max_model_len ({max_len}) request")
        return tokens
