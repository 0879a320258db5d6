"""The workload library (docs/spec.md §3): inference-perf config templates under ``workloads/`` and their families.

Families and their parameter grids (the seed's static plan; a campaign may allow more values):

| family | swept | fixed |
|---|---|---|
| W1 prefill sweep | input_tokens {128, 1024, 4096, 8192} | output_tokens 1, rate 0.5 req/s (B = 1) |
| W2 decode-context sweep | input_tokens {128, 1024, 4096, 8192} | output_tokens 512, rate 0.05 req/s (B ≈ 1) |
| W3 batch scaling | rate {1, 8, 32, 64, 128} | input_tokens 256, output_tokens 256 |
| W4-A mix, prefill-heavy | — | rate 128, input_tokens 1024, output_tokens 4 |
| W4-C mix, decode-heavy | — | rate 32, input_tokens 64, output_tokens 1024 |

W5 (TP scaling) is W3 at several TP degrees of one model; V1 (validation) is W2 at input 1024 and W3 at
rates {1, 64} on held-out combos — V1 points keep the family they were taken from (W2/W3) and carry
``split="validation"``.

A point renders to a complete inference-perf config (``render_config``), checked by inference-perf's own
pydantic ``Config`` model (``validate_config``). ``point_requests`` gives the same workload as twin
requests for the direct (no-HTTP) launcher, with arrivals drawn exactly the way inference-perf's
``constant`` load type draws them.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError
from rooflab.paths import WORKLOADS_DIR  # noqa: E402

if TYPE_CHECKING:
    from pydantic import ValidationError

    from rooflab.twin.engine import Request

PARAMS = ("input_tokens", "output_tokens", "rate")  # every point carries all three


@dataclass(frozen=True, eq=False)
class Family:
    """A workload family: its template, the swept parameter grid and the fixed values."""

    name: str
    purpose: str
    grid: dict[str, tuple] = field(default_factory=dict)  # swept parameter -> values
    fixed: dict[str, float | int] = field(default_factory=dict)

    @property
    def template(self) -> Path:
        return WORKLOADS_DIR / f"{self.name}.yaml"

    def values(self) -> dict[str, tuple]:
        """Every parameter with its allowed values (fixed ones as 1-tuples), in PARAMS order."""
        out = {}
        for p in PARAMS:
            out[p] = tuple(self.grid[p]) if p in self.grid else (self.fixed[p],)
        return out

    def params(self, values: dict[str, tuple] | None = None) -> list[dict]:
        """The parameter dicts of the cross product of ``values`` (default: this family's own)."""
        values = values or self.values()
        return [make_params(**dict(zip(PARAMS, combo))) for combo in itertools.product(*(values[p] for p in PARAMS))]


FAMILIES: dict[str, Family] = {
    "W1": Family("W1", "prefill sweep: β1, β7", {"input_tokens": (128, 1024, 4096, 8192)},
                 {"output_tokens": 1, "rate": 0.5}),
    "W2": Family("W2", "decode-context sweep: β2, β7", {"input_tokens": (128, 1024, 4096, 8192)},
                 {"output_tokens": 512, "rate": 0.05}),
    "W3": Family("W3", "batch scaling: β2 vs β6, β4 (MoE); at several TP = W5 (β5)",
                 {"rate": (1.0, 8.0, 32.0, 64.0, 128.0)},
                 {"input_tokens": 256, "output_tokens": 256}),
    "W4-A": Family("W4-A", "prefill/decode mix, prefill-heavy: β1 vs β2", {},
                   {"rate": 128.0, "input_tokens": 1024, "output_tokens": 4}),
    "W4-C": Family("W4-C", "prefill/decode mix, decode-heavy: β1 vs β2", {},
                   {"rate": 32.0, "input_tokens": 64, "output_tokens": 1024}),
}

# V1 (held out, never fitted): (family, parameter selector) — W2 at 1024, W3 at rates 1 and 64.
V1_POINTS: tuple[tuple[str, dict], ...] = (
    ("W2", {"input_tokens": 1024}), ("W3", {"rate": 1.0}), ("W3", {"rate": 64.0}))


def make_params(input_tokens: float, output_tokens: float, rate: float) -> dict[str, float | int]:
    """Canonical parameter values (token counts int, rate float) so equal points have equal keys/run ids."""
    return {"input_tokens": int(input_tokens), "output_tokens": int(output_tokens), "rate": float(rate)}


def family(name: str, source: str | None = None, field_: str = "family") -> Family:
    if name not in FAMILIES:
        raise InputError(source, field_, f"unknown workload family {name!r} (known: {', '.join(FAMILIES)}; "
                         "W5 = W3 at several TP, V1 = held-out W2/W3 points)")
    return FAMILIES[name]


# ------------------------------------------------------------------------------------------------ templates
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")
PLACEHOLDERS = ("input_tokens", "output_tokens", "rate", "duration", "seed", "base_url", "model_name",
                "tokenizer_dir", "output_dir")


@cache
def _template(path: Path, mtime: float) -> dict:
    from rooflab.files import read_yaml

    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise InputError(path, None, "expected a YAML mapping (an inference-perf config)")
    return doc


def load_template(name: str) -> dict:
    """The parsed template of a family (``workloads/<name>.yaml``, placeholders unfilled)."""
    path = WORKLOADS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError(path, None, f"no workload template for family {name!r}")
    return copy.deepcopy(_template(path, path.stat().st_mtime))


def _fill(node: Any, values: dict, source: str, where: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values, source, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values, source, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        for name in _PLACEHOLDER.findall(node):
            if name not in values:
                raise InputError(source, where, f"unknown placeholder ${{{name}}} (known: {', '.join(PLACEHOLDERS)})")
        m = _PLACEHOLDER.fullmatch(node)
        if m:  # a whole-value placeholder keeps the value's type (numbers stay numbers)
            return values[m.group(1)]
        return _PLACEHOLDER.sub(lambda mm: str(values[mm.group(1)]), node)
    return node


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def render_config(point: SweepPoint, *, base_url: str, model_name: str, tokenizer_dir: str, output_dir: str,
                  overrides: dict | None = None, local_tokenizer: bool = True) -> dict:
    """The inference-perf config of one run: the template of ``point.family`` filled with the point's
    ``input_tokens``, ``output_tokens``, ``rate``, ``duration_s`` and ``seed`` (``load.base_seed``: the
    prompts are reproducible; inference-perf's arrival jitter is not seeded). ``overrides`` is deep-merged
    last (e.g. ``{"load": {"request_timeout": 600}}``). Validated against inference-perf's own model.
    ``local_tokenizer=False``: the tokenizer directory is a path where the client runs (a pod), not checked here."""
    label = point.label()
    family(point.family, label)
    template_path = WORKLOADS_DIR / f"{point.family}.yaml"
    params = dict(point.params)
    for p in PARAMS:
        if p not in params:
            raise InputError(label, f"params.{p}", "required workload parameter is missing")
    for p in ("input_tokens", "output_tokens"):
        v = params[p]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
            raise InputError(label, f"params.{p}", f"expected a positive integer, got {v!r}")
    if isinstance(params["rate"], bool) or not isinstance(params["rate"], (int, float)):
        raise InputError(label, "params.rate", f"expected a number (requests/s), got {params['rate']!r}")
    duration = point.duration_s
    if duration == int(duration):
        duration = int(duration)  # inference-perf's stage duration is an integer number of seconds
    tok = Path(tokenizer_dir)
    if local_tokenizer and not tok.is_dir():
        raise InputError(label, "tokenizer_dir", f"{tokenizer_dir!r} is not a local directory "
                         "(inference-perf runs offline: a hub model id fails)")
    values = {"input_tokens": int(params["input_tokens"]), "output_tokens": int(params["output_tokens"]),
              "rate": float(params["rate"]), "duration": duration, "seed": int(point.seed),
              "base_url": str(base_url), "model_name": str(model_name), "tokenizer_dir": str(tok),
              "output_dir": str(output_dir)}
    cfg = _fill(load_template(point.family), values, str(template_path))
    if overrides:
        cfg = _deep_merge(cfg, overrides)
    source = f"{template_path} [{label}]"
    validate_config(cfg, source)
    check_corrections(cfg, source, local_tokenizer=local_tokenizer)
    return cfg


# ------------------------------------------------------------------------------------------------ validation
_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


def _loc(parts: Iterable[int | str]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", p) and p not in _TYPE_TAGS:
            out += f".{p}" if out else p
        # anything else is a pydantic union/validator tag ('list[StandardLoadStage]', 'function-after[...]')
    return out


def _first_error(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    err = exc.errors()[0]
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err.get("type") not in ("missing",) and "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    loc = _loc(err.get("loc", ()))
    if prefix and loc:
        return f"{prefix}{loc}" if loc.startswith("[") else f"{prefix}.{loc}", msg
    return prefix or loc, msg


def validate_config(cfg: dict, source: str) -> None:
    """Check ``cfg`` against inference-perf's own pydantic ``Config`` the way ``inference-perf -c`` reads it
    (defaults deep-merged, stages typed by ``load.type``), plus the checks its ``main`` makes before a run
    (random/synthetic data need both length distributions and a tokenizer; random data needs the
    completion API). Raises a one-line :class:`InputError` ``<source>: <field.path>: <problem>``."""
    from inference_perf.config import (
        ConcurrentLoadStage,
        Config,
        LoadType,
        StandardLoadStage,
        TraceSessionReplayLoadStage,
        deep_merge,
    )
    from pydantic import ValidationError

    if not isinstance(cfg, dict):
        raise InputError(source, None, "an inference-perf config must be a mapping")
    default = _default_config_dump()
    merged = deep_merge(default, cfg)
    load = merged.get("load")
    if isinstance(load, dict) and load.get("stages"):
        kind = load.get("type", "constant")
        try:
            kind = LoadType(kind).value
        except ValueError:
            raise InputError(source, "load.type", f"unknown load type {kind!r} "
                             f"(known: {', '.join(t.value for t in LoadType)})") from None
        stage_cls = {"concurrent": ConcurrentLoadStage,
                     "trace_session_replay": TraceSessionReplayLoadStage}.get(kind, StandardLoadStage)
        if not isinstance(load["stages"], list):
            raise InputError(source, "load.stages", "expected a list of stages")
        stages = []
        for i, st in enumerate(load["stages"]):
            if not isinstance(st, dict):
                raise InputError(source, f"load.stages[{i}]", "expected a mapping")
            try:
                stages.append(stage_cls(**st))
            except ValidationError as exc:
                where, msg = _first_error(exc, f"load.stages[{i}]")
                raise InputError(source, where, msg) from None
        merged = {**merged, "load": {**load, "stages": stages}}
    try:
        conf = Config(**merged)
    except ValidationError as exc:
        where, msg = _first_error(exc)
        raise InputError(source, where or None, msg) from None
    except (TypeError, ValueError) as exc:
        raise InputError(source, None, str(exc)) from None
    data = conf.data
    if data is not None and data.type.value in ("random", "synthetic") and data.trace is None:
        for f in ("input_distribution", "output_distribution"):
            if getattr(data, f) is None:
                raise InputError(source, f"data.{f}", f"required by data.type {data.type.value!r}")
    if data is not None and data.type.value == "random" and conf.api.type.value != "completion":
        raise InputError(source, "api.type", "data.type 'random' supports only the 'completion' API")
    if data is not None and data.type.value not in ("mock",):
        tok = conf.tokenizer.pretrained_model_name_or_path if conf.tokenizer else None
        if not tok and not (conf.server and conf.server.model_name):
            raise InputError(source, "tokenizer.pretrained_model_name_or_path",
                             f"data.type {data.type.value!r} needs a tokenizer")


@lru_cache(maxsize=1)
def _default_config_dump() -> dict:
    from inference_perf.config import Config

    d = Config().model_dump(mode="json")
    d["load"].pop("base_seed", None)  # a time-based default: leave it to inference-perf at run time
    return d


def check_corrections(cfg: dict, source: str, *, local_tokenizer: bool = True) -> None:
    """rooflab's corrections to the seed's configs (docs/spec.md §3), enforced on every rendered config. The
    tokenizer must be a local directory — here, or (``local_tokenizer=False``) an absolute path where the client
    runs."""
    def get(path: str) -> Any:
        node: Any = cfg
        for k in path.split("."):
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    rules = [("data.type", lambda v: v in ("random", "synthetic"), "must be 'random' or 'synthetic' (unique prompts; "
              "a shared_prefix prompt set lets the prefix cache skip the prefill)"),
             ("server.ignore_eos", lambda v: v is True, "must be true"),
             ("report.request_lifecycle.per_request", lambda v: v is True, "must be true"),
             ("api.streaming", lambda v: v is True, "must be true"),
             ("load.type", lambda v: v == "constant", "must be 'constant'"),
             ("load.stages", lambda v: isinstance(v, list) and len(v) == 1, "must hold exactly one stage"),
             ("tokenizer.pretrained_model_name_or_path",
              lambda v: isinstance(v, str) and (Path(v).is_dir() if local_tokenizer else v.startswith("/")),
              "must be a local tokenizer directory" + ("" if local_tokenizer else " (an absolute path in the pod)"))]
    for path, ok, problem in rules:
        if not ok(get(path)):
            raise InputError(source, path, f"{problem} (got {get(path)!r})")


def write_config(cfg: dict, path: str | Path) -> Path:
    """Write a rendered config as YAML, atomically (temp file in the same folder, fsync, rename)."""
    from rooflab.files import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))


# ------------------------------------------------------------------------------------------------ twin requests
def n_requests(rate: float, duration_s: float) -> int:
    """How many requests inference-perf's constant stage sends: ``int(rate * duration)`` (truncation)."""
    d = int(duration_s) if duration_s == int(duration_s) else duration_s
    return int(float(rate) * d)


def constant_arrivals_s(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival offsets (s) from the stage start, as inference-perf 0.7.0's ``ConstantLoadTimer`` makes them:
    ``int(rate × duration)`` exponential(1/rate) gaps rescaled to sum to exactly ``duration``, so the first
    request comes one gap after the start and the last one at ``duration``."""
    n = n_requests(rate, duration_s)
    if n == 0:
        return np.zeros(0)
    gaps = rng.exponential(1.0 / float(rate), n)
    gaps *= float(duration_s) / gaps.sum()
    return np.cumsum(gaps)


def point_requests(point: SweepPoint, *, seed: int | None = None) -> list[Request]:
    """The requests ``point``'s workload sends, as twin engine requests (direct launcher): fixed input and
    output lengths, ``ignore_eos``, arrivals (µs from the stage start) drawn like inference-perf's
    ``constant`` load. ``seed`` defaults to ``point.seed`` (inference-perf itself does not seed arrivals)."""
    from rooflab.twin.engine import Request

    label = point.label()
    family(point.family, label)
    params = dict(point.params)
    for p in PARAMS:
        if p not in params:
            raise InputError(label, f"params.{p}", "required workload parameter is missing")
    rate = float(params["rate"])
    if not rate > 0:
        raise InputError(label, "params.rate", f"must be > 0, got {rate!r}")
    if not point.duration_s > 0:
        raise InputError(label, "duration_s", f"must be > 0, got {point.duration_s!r}")
    if n_requests(rate, point.duration_s) == 0:
        raise InputError(label, "params.rate", f"rate × duration = {rate * point.duration_s:g} < 1: "
                         "inference-perf would send no request")
    rng = np.random.default_rng(point.seed if seed is None else seed)
    t_us = constant_arrivals_s(rate, point.duration_s, rng) * 1e6
    inp, out = int(params["input_tokens"]), int(params["output_tokens"])
    return [Request(f"req-{i:06d}", float(t), inp, out, ignore_eos=True) for i, t in enumerate(t_us)]

