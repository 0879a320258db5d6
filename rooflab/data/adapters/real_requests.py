"""The 16 real H100 vLLM runs' request data (``../shared/data/real/``) -> :class:`RealRun`.

Per run ``<run>``, three files are required and three more are read when present:

* ``requests/<run>.json.gz`` — ``{"experiment", "model_id", "profile", "split", "config": {tensor_parallelism,
  max_num_seqs, max_num_batched_tokens, kv_blocks_total_gpu, block_size, ...}, "model_config", "requests":
  [{index, arrival_time_us, input_tokens, output_tokens, prefix_group, has_error}, ...]}``;
* ``requests/<run>_ground_truth.json.gz`` — ``[{index, has_error, ttft_s, e2e_s}, ...]``: client-side TTFT and
  E2E in seconds (a failed request has no ``ttft_s``; its ``e2e_s`` is the time to the failure);
* ``runs/<run>/exp-config.yaml`` — the vLLM arguments (model, tensor_parallelism, max_model_len, ...);
* optional: ``runs/<run>/results/config.yaml`` (inference-perf's resolved config: the shared-prefix workload
  that actually ran), ``runs/<run>/profile.yaml`` (the submitted profile, one-line JSON: load stages) and
  ``runs/<run>/results/summary_lifecycle_metrics.json`` (inference-perf's success / failure counts).

Facts of this data the reader relies on (checked where the files allow):

* A failed request records ``input_tokens`` = ``output_tokens`` = 0: the client never learned them; they
  are NaN here. inference-perf cycles through ``num_groups × num_prompts_per_group`` (= 100) fixed prompts,
  request ``i`` sending prompt ``i mod 100`` (≈ 99% of consecutive-cycle prompt lengths agree), so
  ``prompt_id`` names the prompt slot and ``slot_prompt_tokens`` the slot's median known prompt length —
  the way to size a failed request in a replay. Repeated prompts can hit vLLM's prefix cache in full.
* ``prefix_group`` is empty in every file (and the files' ``config`` says no prefix groups), but the
  workload that ran is inference-perf ``shared_prefix``: each prompt starts with one of ``num_groups``
  system prompts of ``system_prompt_len`` tokens — that is ``prefix_tokens`` (which group: not recorded).
* inference-perf's own ITL / TPOT is about half the real per-token interval (two stream events per token);
  ``itl_us`` here is (E2E − TTFT) / (output − 1).
* vLLM settings the files do not state but ``../shared/data/real/README.md`` does for all 16 runs (prefix
  caching on, chunked prefill on) are filled in and listed in ``RealRun.vllm_from_readme``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import yaml

from rooflab.data.tables import validate_requests
from rooflab.errors import InputError
from rooflab.model.arch import resolve_model_name
from rooflab.paths import REAL_DATA_DIR

DEFAULT_ROOT = Path(os.environ.get("ROOFLAB_REAL_DATA") or REAL_DATA_DIR)
HARDWARE = "H100-SXM"
WORKLOADS = ("general", "codegen", "roleplay", "reasoning")
_GT_SUFFIX = "_ground_truth"
# Stated for all 16 runs by the data's README (vLLM v0.15.1 defaults), absent from exp-config.yaml.
README_VLLM = {"enable_prefix_caching": True, "enable_chunked_prefill": True, "block_size": 16}
_REQUEST_KEYS = ("index", "arrival_time_us", "input_tokens", "output_tokens", "has_error")
_SLOT_AGREEMENT = 0.9  # share of same-slot prompt lengths that must agree to trust the prompt cycle

_YAML_LOADER: type[yaml.SafeLoader | yaml.CSafeLoader]
try:
    _YAML_LOADER = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML without libyaml
    _YAML_LOADER = yaml.SafeLoader


@dataclass
class RealRun:
    run_id: str
    model: str  # configs/models name, e.g. "llama-2-70b"
    model_id: str  # the Hugging Face name the server ran, e.g. "meta-llama/Llama-2-70b-hf"
    tp: int
    hardware: str
    workload: str  # general / codegen / roleplay / reasoning
    split: str | None  # the training repo's train / validate / test label
    vllm: dict  # max_num_seqs, max_num_batched_tokens, max_model_len, block_size, enable_prefix_caching, ...
    requests: pd.DataFrame
    model_config: dict = field(default_factory=dict)  # the request file's architecture summary
    shared_prefix: dict | None = None  # inference-perf's resolved shared_prefix block
    load_stages: list[dict] | None = None  # [{"rate": req/s, "duration": s}, ...]
    reported: dict | None = None  # inference-perf's own counts: requests, successes, failures
    vllm_from_readme: tuple[str, ...] = ()  # keys of ``vllm`` taken from the data README, not the run's files
    sources: dict[str, str] = field(default_factory=dict)  # role -> file path

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    @property
    def n_errors(self) -> int:
        return int(self.requests["error"].sum())

    @property
    def failures(self) -> int:
        """The run's failure count: inference-perf's, else the error flags'."""
        if self.reported and self.reported.get("failures") is not None:
            return int(self.reported["failures"])
        return self.n_errors

    def requests_table(self) -> pd.DataFrame:
        """The rooflab request table (docs/spec.md §2) on the client clock: arrived = arrival, first_token = arrival +
        TTFT, departed = arrival + E2E; queued / scheduled / finished and preemptions are NaN (the client
        cannot see them); status "ok" / "failed"."""
        r = self.requests
        arr = r["arrival_us"].to_numpy(dtype=np.float64)
        nan = np.full(len(r), np.nan)
        table = pd.DataFrame({
            "run_id": self.run_id, "request_id": r["request_id"].astype(str).to_numpy(),
            "arrived_us": arr, "queued_us": nan, "scheduled_us": nan,
            "first_token_us": arr + r["ttft_us"].to_numpy(), "finished_us": nan,
            "departed_us": arr + r["e2e_us"].to_numpy(),
            "prompt_tokens": r["prompt_tokens"].to_numpy(), "output_tokens": r["output_tokens"].to_numpy(),
            "preemptions": nan, "status": np.where(r["error"].to_numpy(), "failed", "ok"),
        })
        return validate_requests(table, self.sources.get("requests", self.run_id))

    def summary(self) -> dict:
        return {"run_id": self.run_id, "model": self.model, "tp": self.tp, "hardware": self.hardware,
                "workload": self.workload, "split": self.split, "requests": self.n_requests,
                "errors": self.n_errors, "vllm": dict(self.vllm)}


# ---------------------------------------------------------------------------------------------------
# file readers: every failure is one InputError line naming the file (and the field)


def _json_gz(path: Path) -> Any:
    if not path.is_file():
        raise InputError(path, None, "file not found")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(path, None, f"not a readable gzip file ({type(exc).__name__}: {exc})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 JSON") from None


@overload
def _yaml_mapping(path: Path, *, required: Literal[True]) -> dict: ...
@overload
def _yaml_mapping(path: Path, *, required: Literal[False]) -> dict | None: ...
def _yaml_mapping(path: Path, *, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise InputError(path, None, "file not found")
        return None
    from rooflab.files import read_yaml

    doc = read_yaml(path, loader=_YAML_LOADER)
    if not isinstance(doc, dict):
        raise InputError(path, None, "expected a mapping")
    return doc


def _int_field(value: Any, path: Path, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise InputError(path, name, f"expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _columns(rows: Any, path: Path, keys: tuple[str, ...], prefix: str) -> dict[str, list]:
    """Column lists from a list of dicts; a missing key → InputError naming the first row that lacks it."""
    if not isinstance(rows, list):
        raise InputError(path, prefix or None, "expected a list of records")
    out = {}
    for key in keys:
        try:
            out[key] = [row[key] for row in rows]
        except (KeyError, TypeError):
            i = next(i for i, row in enumerate(rows) if not isinstance(row, dict) or key not in row)
            raise InputError(path, f"{prefix}[{i}].{key}", "missing") from None
    return out


def _numbers(values: list, path: Path, name: str) -> np.ndarray:
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        i = next(i for i, v in enumerate(values) if isinstance(v, (bool, str)) or not isinstance(v, (int, float)))
        raise InputError(path, f"{name}[{i}]", f"not a number: {values[i]!r}") from None
    if arr.ndim != 1:
        raise InputError(path, name, "not a list of numbers")
    return arr


def _flags(values: list, path: Path, name: str) -> np.ndarray:
    bad = next((i for i, v in enumerate(values) if not isinstance(v, bool)), None)
    if bad is not None:
        raise InputError(path, f"{name}[{bad}]", f"expected true/false, got {values[bad]!r}")
    return np.array(values, dtype=bool)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


# ---------------------------------------------------------------------------------------------------


def list_real_runs(root: str | Path = DEFAULT_ROOT) -> list[str]:
    """The run names under ``<root>/requests`` (each ``<run>.json.gz`` beside its ground truth), sorted."""
    folder = Path(root) / "requests"
    if not folder.is_dir():
        raise InputError(folder, None, "folder not found")
    names = (p.name[: -len(".json.gz")] for p in folder.glob("*.json.gz"))
    return sorted(n for n in names if not n.endswith(_GT_SUFFIX))


def _resolve(run: str | Path, root: Path) -> tuple[str, Path]:
    p = Path(run)
    if p.name.endswith(".json.gz") and (p.is_file() or p.parent.name == "requests"):
        name = p.name[: -len(".json.gz")]
        return name.removesuffix(_GT_SUFFIX), p.parent.parent
    if p.is_dir() and p.parent.name == "runs":
        return p.name, p.parent.parent
    return str(run), root


def _workload(run_id: str, profile: Any, path: Path) -> str:
    tail = run_id.rsplit("-", 1)[-1].lower()
    if tail in WORKLOADS:
        return tail
    if isinstance(profile, str) and profile.lower() in WORKLOADS:
        return profile.lower()
    raise InputError(path, "profile", f"unknown workload for run {run_id!r} (expected one of {', '.join(WORKLOADS)})")


def _tp_from_name(run_id: str) -> int | None:
    m = re.search(r"-tp(\d+)(?:-|$)", run_id)
    return int(m.group(1)) if m else None


def _read_requests(doc: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(doc, dict):
        raise InputError(path, None, "expected a JSON object with 'config' and 'requests'")
    for key in ("config", "requests"):
        if key not in doc:
            raise InputError(path, key, "missing")
    if not isinstance(doc["config"], dict):
        raise InputError(path, "config", "expected an object")
    rows = doc["requests"]
    cols = _columns(rows, path, _REQUEST_KEYS, "requests")
    if not rows:
        raise InputError(path, "requests", "no requests")
    out: dict[str, Any] = {
        "index": _numbers(cols["index"], path, "requests[].index"),
        "arrival": _numbers(cols["arrival_time_us"], path, "requests[].arrival_time_us"),
        "input": _numbers(cols["input_tokens"], path, "requests[].input_tokens"),
        "output": _numbers(cols["output_tokens"], path, "requests[].output_tokens"),
        "error": _flags(cols["has_error"], path, "requests[].has_error"),
        "prefix_group": [row.get("prefix_group") or None for row in rows],
    }
    for key, name in (("arrival", "arrival_time_us"), ("input", "input_tokens"), ("output", "output_tokens")):
        bad = ~np.isfinite(out[key]) | (out[key] < 0)
        if bad.any():
            i = _first_bad(bad)
            raise InputError(path, f"requests[{i}].{name}", f"negative or non-finite value {out[key][i]!r}")
    idx = out["index"]
    bad = ~np.isfinite(idx) | (idx < 0) | (idx != np.round(idx))
    if bad.any():
        i = _first_bad(bad)
        raise InputError(path, f"requests[{i}].index", f"not a non-negative integer: {cols['index'][i]!r}")
    if len(np.unique(idx)) != len(idx):
        raise InputError(path, "requests[].index", "duplicate request index")
    return doc, out


def _read_truth(rows: Any, path: Path, req: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    cols = _columns(rows, path, ("index", "has_error", "e2e_s"), "")
    n = len(req["index"])
    if len(rows) != n:
        raise InputError(path, None, f"{len(rows)} records but the request file has {n}")
    idx = _numbers(cols["index"], path, "index")
    if not np.array_equal(idx, req["index"]):
        i = _first_bad(idx != req["index"])
        raise InputError(path, f"[{i}].index", f"{idx[i]:.0f} does not match the request file's {req['index'][i]:.0f}")
    err = _flags(cols["has_error"], path, "has_error")
    if not np.array_equal(err, req["error"]):
        i = _first_bad(err != req["error"])
        raise InputError(path, f"[{i}].has_error", "disagrees with the request file")
    e2e = _numbers(cols["e2e_s"], path, "e2e_s")
    ttft = np.array([row.get("ttft_s", np.nan) for row in rows], dtype=object)
    try:
        ttft = np.array([np.nan if v is None else v for v in ttft], dtype=np.float64)
    except (TypeError, ValueError):
        i = next(i for i, v in enumerate(ttft) if isinstance(v, (str, bool)) or not isinstance(v, (int, float)))
        raise InputError(path, f"[{i}].ttft_s", f"not a number: {ttft[i]!r}") from None
    ok = ~err
    for name, vals in (("ttft_s", ttft), ("e2e_s", e2e)):
        bad = ok & ~(np.isfinite(vals) & (vals > 0))
        if bad.any():
            i = _first_bad(bad)
            raise InputError(path, f"[{i}].{name}", f"missing or non-positive for a successful request ({vals[i]!r})")
    bad = ok & (ttft > e2e)
    if bad.any():
        i = _first_bad(bad)
        raise InputError(path, f"[{i}].ttft_s", f"TTFT {ttft[i]} s exceeds E2E {e2e[i]} s")
    return ttft * 1e6, e2e * 1e6


def _prompt_slots(prompt: np.ndarray, index: np.ndarray, period: int | None) -> tuple[np.ndarray, np.ndarray]:
    """prompt_id = index mod period where the data confirm the cycle; the slot's median known prompt length."""
    n = len(prompt)
    if not period or period < 1 or n <= period:
        return np.full(n, -1, dtype=np.int64), np.full(n, np.nan)
    a, b = prompt[:-period], prompt[period:]
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any() or (np.abs(a[both] - b[both]) <= 0).mean() < _SLOT_AGREEMENT:
        return np.full(n, -1, dtype=np.int64), np.full(n, np.nan)
    slot = index.astype(np.int64) % period
    known = pd.Series(prompt).where(np.isfinite(prompt))
    med = known.groupby(slot).median()
    return slot, med.reindex(slot).to_numpy(dtype=np.float64)


def read_real_run(run: str | Path, root: str | Path = DEFAULT_ROOT, *, hardware: str = HARDWARE) -> RealRun:
    """One real run by name (or the path of its request file or ``runs/<run>`` folder)."""
    run_id, root = _resolve(run, Path(root))
    req_path = root / "requests" / f"{run_id}.json.gz"
    gt_path = root / "requests" / f"{run_id}{_GT_SUFFIX}.json.gz"
    run_dir = root / "runs" / run_id
    exp_path = run_dir / "exp-config.yaml"
    resolved_path = run_dir / "results" / "config.yaml"
    profile_path = run_dir / "profile.yaml"
    summary_path = run_dir / "results" / "summary_lifecycle_metrics.json"

    doc, req = _read_requests(_json_gz(req_path), req_path)
    ttft_us, e2e_us = _read_truth(_json_gz(gt_path), gt_path, req)
    exp = _yaml_mapping(exp_path, required=True)
    cfg = doc["config"]

    # model and TP: exp-config.yaml is the server's own arguments; the other sources must agree with it
    model_id = exp.get("model")
    if not isinstance(model_id, str) or not model_id.strip():
        raise InputError(exp_path, "model", "missing or not a string")
    model = resolve_model_name(model_id.strip().rstrip("/").rsplit("/", 1)[-1])
    if "tensor_parallelism" not in exp:
        raise InputError(exp_path, "tensor_parallelism", "missing")
    tp = _int_field(exp["tensor_parallelism"], exp_path, "tensor_parallelism", minimum=1)
    if "tensor_parallelism" in cfg and _int_field(cfg["tensor_parallelism"], req_path, "config.tensor_parallelism",
                                                  minimum=1) != tp:
        raise InputError(req_path, "config.tensor_parallelism",
                         f"{cfg['tensor_parallelism']} disagrees with {exp_path.name}'s {tp}")
    name_tp = _tp_from_name(run_id)
    if name_tp is not None and name_tp != tp:
        raise InputError(exp_path, "tensor_parallelism", f"{tp} disagrees with the run name's tp{name_tp}")

    # vLLM settings: exp-config.yaml first, then the request file's config, then the README's statement
    vllm: dict = {}
    for key, value in exp.items():
        if key not in ("model", "tensor_parallelism", "app"):
            vllm[key] = value
    for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "kv_blocks_total_gpu"):
        if key in cfg:
            value = _int_field(cfg[key], req_path, f"config.{key}", minimum=1)
            if key in vllm and vllm[key] != value:
                raise InputError(req_path, f"config.{key}", f"{value} disagrees with {exp_path.name}'s {vllm[key]}")
            vllm[key] = value
    for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        if key in vllm:
            vllm[key] = _int_field(vllm[key], exp_path, key, minimum=1)
    if "kv_blocks_total_gpu" not in vllm:
        raise InputError(req_path, "config.kv_blocks_total_gpu", "missing")
    from_readme = tuple(k for k in README_VLLM if k not in vllm)
    for key in from_readme:
        vllm[key] = README_VLLM[key]

    # workload as inference-perf ran it (optional files)
    resolved = _yaml_mapping(resolved_path, required=False)
    shared_prefix = None
    if resolved is not None:
        data = resolved.get("data") or {}
        shared_prefix = data.get("shared_prefix") if isinstance(data, dict) else None
        if shared_prefix is not None and not isinstance(shared_prefix, dict):
            raise InputError(resolved_path, "data.shared_prefix", "expected a mapping")
    profile = _yaml_mapping(profile_path, required=False)  # one-line JSON is YAML
    load_stages = None
    if profile is not None:
        load = profile.get("load") or {}
        load_stages = load.get("stages") if isinstance(load, dict) else None
        if load_stages is not None and not isinstance(load_stages, list):
            raise InputError(profile_path, "load.stages", "expected a list")
    reported = None
    if summary_path.is_file():
        summ = _read_json(summary_path)
        reported = {"requests": _count(summ, "load_summary"), "successes": _count(summ, "successes"),
                    "failures": _count(summ, "failures")}

    # per-request table
    err = req["error"]
    prompt = np.where(err & (req["input"] == 0), np.nan, req["input"])
    output = np.where(err & (req["output"] == 0), np.nan, req["output"])
    itl_us = np.full(len(prompt), np.nan)
    many = ~err & (output > 1)
    itl_us[many] = (e2e_us[many] - ttft_us[many]) / (output[many] - 1)
    period = None
    prefix_len = np.nan
    if shared_prefix:
        try:
            period = int(shared_prefix.get("num_groups", 0)) * int(shared_prefix.get("num_prompts_per_group", 0))
            prefix_len = float(shared_prefix.get("system_prompt_len", np.nan))
        except (TypeError, ValueError):
            raise InputError(resolved_path, "data.shared_prefix", "num_groups / num_prompts_per_group / "
                             "system_prompt_len must be numbers") from None
    slot, slot_prompt = _prompt_slots(prompt, req["index"], period)
    requests = pd.DataFrame({
        "request_id": req["index"].astype(np.int64),
        "arrival_us": req["arrival"],
        "prompt_tokens": prompt,
        "output_tokens": output,
        "prefix_group": pd.array(req["prefix_group"], dtype="string"),
        "prefix_tokens": np.where(np.isfinite(prompt), np.minimum(prefix_len, prompt), prefix_len),
        "prompt_id": slot,
        "slot_prompt_tokens": slot_prompt,
        "error": err,
        "ttft_us": ttft_us,
        "e2e_us": e2e_us,
        "itl_us": itl_us,
    })
    if not requests["arrival_us"].is_monotonic_increasing:
        requests = requests.sort_values("arrival_us", kind="stable").reset_index(drop=True)

    model_config = doc.get("model_config")
    return RealRun(
        run_id=run_id, model=model, model_id=model_id.strip(), tp=tp, hardware=hardware,
        workload=_workload(run_id, doc.get("profile"), req_path),
        split=doc.get("split") if isinstance(doc.get("split"), str) else None,
        vllm=vllm, requests=requests,
        model_config=model_config if isinstance(model_config, dict) else {},
        shared_prefix=dict(shared_prefix) if shared_prefix else None, load_stages=load_stages, reported=reported,
        vllm_from_readme=from_readme,
        sources={"requests": str(req_path), "ground_truth": str(gt_path), "exp_config": str(exp_path),
                 **({"resolved_config": str(resolved_path)} if resolved is not None else {}),
                 **({"profile": str(profile_path)} if profile is not None else {}),
                 **({"lifecycle_summary": str(summary_path)} if reported is not None else {})},
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise InputError(path, None, "not UTF-8 JSON") from None


def _count(doc: Any, key: str) -> int | None:
    block = doc.get(key) if isinstance(doc, dict) else None
    value = block.get("count") if isinstance(block, dict) else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

