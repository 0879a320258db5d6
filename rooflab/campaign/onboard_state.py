"""An onboarding on disk (issue 16): what is being onboarded, its prior, its campaign, the runs proposed to the outside
world as ready inference-perf configs, and the results handed back — so that onboarding resumes across days.

Layout of the state folder (``rooflab onboard --state DIR``)::

    setup.json                     what is onboarded: model, GPU, TP, vLLM version, budget, prior strength, endpoint
    prior.json                     the prior coefficient set (fitted on other setups)
    campaign.yaml                  the generated campaign: one training combo, the template's candidate space
    store/                         a data store: the ingested runs, and the loop's plans (campaigns/<name>/)
    proposals/iteration-NNN/       <run id>.yaml (inference-perf configs), PLAN.md (what, why, cost), plan.json
    fits/iteration-NNN.json        each refit: coefficients, predicted accuracy with its uncertainty, stop decision
    coefficients.json              the latest fit's coefficient set (``rooflab replay --coefficients`` reads it)

**Ingest.** A result answers one proposed run: an inference-perf output (its ``per_request_lifecycle_metrics.json``
or the folder holding it), a BLIS trace, or a data-store run folder — whatever
:func:`rooflab.data.trace_readers.read_trace` reads. Which run it answers: ``--run`` when given; a data-store run
whose sweep point is the proposed one; else the proposed run id in its path (the configs write to
``results/<run id>/``). It is written into the state's store as that run (request table, step table where the
source has one, the raw files kept under ``raw/``), with run-level saturation routing (docs/spec.md §6).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from rooflab.collect.spec import CAMPAIGNS_DIR, Campaign, parse_campaign
from rooflab.collect.workloads import point_requests, render_config, write_config
from rooflab.data.saturation import route_run
from rooflab.data.store import COMPLETE, Store, StorePlans
from rooflab.data.sweep import SweepPoint
from rooflab.data.tables import validate_requests
from rooflab.data.traces import ENGINE_KEYS, Trace
from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps, read_yaml
from rooflab.model.arch import load_model
from rooflab.model.coefficients import Coefficients, coefficients_from_doc
from rooflab.model.engine_config import complete_engine
from rooflab.model.hardware import load_hardware
from rooflab.targeting.candidates import describe

SETUP_FILE, PRIOR_FILE, CAMPAIGN_FILE = "setup.json", "prior.json", "campaign.yaml"
COEFFICIENTS_FILE = "coefficients.json"  # the latest fit (rooflab replay --coefficients reads it)
DEFAULT_TEMPLATE = "onboard"
# what a coefficient pins, in words (a pick's "serves" → its PLAN.md line)
PINS = {"beta1": "prefill compute", "beta1_attn": "prefill attention", "beta2": "decode (KV reads, attention)",
        "beta3": "weight streaming", "beta4": "MoE expert weights", "beta5": "tensor-parallel all-reduce",
        "beta6": "per-request CPU cost", "beta7": "per-step overhead", "beta_layer": "per-layer overhead",
        "alpha0": "API overhead (queueing in the server)", "alpha1": "post-decode overhead",
        "alpha2": "per-output-token overhead"}


@dataclass(frozen=True)
class OnboardSetup:
    """What is onboarded and how (``setup.json``)."""

    model: str
    hardware: str
    tp: int
    vllm_version: str | None = None
    budget_gpu_hours: float | None = None
    prior_strength: float = 1e-2  # λ of the summary fit around the prior
    batch_size: int = 2  # runs proposed per iteration
    max_iterations: int = 8
    template: str = DEFAULT_TEMPLATE  # campaign template (its candidate space and engine settings)
    base_url: str = "http://localhost:8000"  # where the proposed configs send their requests
    served_model_name: str | None = None  # the server's model name (default: ``model``)
    tokenizer_dir: str | None = None  # a local tokenizer directory for the configs (default: the twin's)

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "-", f"onboard-{self.model}-tp{self.tp}-{self.hardware}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any, source: str | Path) -> OnboardSetup:
        if not isinstance(doc, dict):
            raise InputError(source, None, "expected a JSON object")
        known = {f.name for f in fields(cls)}
        for k in ("model", "hardware", "tp"):
            if k not in doc:
                raise InputError(source, k, "missing")
        bad = sorted(set(doc) - known)
        if bad:
            raise InputError(source, bad[0], "unknown field")
        if not isinstance(doc["tp"], int) or isinstance(doc["tp"], bool) or doc["tp"] < 1:
            raise InputError(source, "tp", f"expected an integer >= 1, got {doc['tp']!r}")
        return cls(**doc)


@dataclass
class OnboardState:
    root: Path
    setup: OnboardSetup
    prior: Coefficients
    campaign: Campaign

    @property
    def store(self) -> Store:
        return Store(self.root / "store")

    @property
    def plans(self) -> StorePlans:
        return StorePlans(self.store, self.campaign.name)

    def proposal_dir(self, iteration: int) -> Path:
        return self.root / "proposals" / f"iteration-{iteration:03d}"

    def fit_path(self, iteration: int) -> Path:
        return self.root / "fits" / f"iteration-{iteration:03d}.json"

    def load_fit(self, iteration: int) -> dict[str, Any] | None:
        p = self.fit_path(iteration)
        if not p.is_file():
            return None
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(p, None, f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
        return doc if isinstance(doc, dict) else None

    def fits(self) -> list[dict[str, Any]]:
        return [d for d in (self.load_fit(int(p.stem.split("-")[-1])) for p in sorted((self.root / "fits").glob(
            "iteration-*.json"))) if d is not None]

    def waiting(self) -> dict[str, SweepPoint]:
        """Run id -> point of every proposed run not complete in the store (the open iteration's)."""
        out: dict[str, SweepPoint] = {}
        st = self.store
        for plan in self.plans.plans():
            if plan.get("complete"):
                continue
            points = [SweepPoint.from_dict(p["point"]) for p in plan.get("points", [])]
            for rid, p, _ in self.campaign.runs(points):
                if st.status(rid) not in COMPLETE and st.status(rid) != "failed":
                    out[rid] = p
        return out


# ================================================================================================ creating
def _template_doc(template: str) -> tuple[dict[str, Any], str]:
    p = Path(template)
    if not p.is_file():
        p = CAMPAIGNS_DIR / f"{template}.yaml"
    if not p.is_file():
        raise InputError(template, None, f"no such campaign template (a YAML path, or a name under {CAMPAIGNS_DIR})")
    doc = read_yaml(p)
    if not isinstance(doc, dict):
        raise InputError(p, None, "expected a YAML mapping (a campaign)")
    return doc, str(p)


def campaign_document(setup: OnboardSetup, prior: Coefficients) -> dict[str, Any]:
    """The onboarding's campaign: the template's families, duration and engine settings on one training combo
    (the setup's), no held-out combo, the setup's budget and loop settings, the prior's variant. ``max_model_len``
    is capped at the model's and points longer than it are dropped."""
    doc, source = _template_doc(setup.template)
    arch = load_model(setup.model)
    engine = dict(doc.get("engine") or {})
    max_len = int(engine.get("max_model_len", 16384))
    if arch.max_model_len:
        max_len = min(max_len, int(arch.max_model_len))
    engine["max_model_len"] = max_len
    families = {}
    for fam, vals in (doc.get("families") or {}).items():
        vals = dict(vals or {})
        ins = vals.get("input_tokens")
        out = vals.get("output_tokens", 1)
        outs = out if isinstance(out, list) else [out]
        if isinstance(ins, list):
            ins = [i for i in ins if i + max(outs) <= max_len]
            if not ins:
                continue
            vals["input_tokens"] = ins
        elif ins is not None and ins + max(outs) > max_len:
            continue
        families[fam] = vals
    if not families:
        raise InputError(source, "families", f"no point of the template fits max_model_len {max_len}")
    loop = {**(doc.get("loop") or {}), "batch_size": setup.batch_size, "max_iterations": setup.max_iterations,
            "variant": prior.variant, "targeting": "d-optimal"}
    loop.pop("formulas", None)
    return {**{k: v for k, v in doc.items() if k not in ("designs", "validation", "schedule")},
            "name": setup.name, "hardware": setup.hardware, "models": [{"model": setup.model, "tp": setup.tp}],
            "validation": {"models": [], "points": []}, "families": families, "engine": engine,
            "budget_gpu_hours": setup.budget_gpu_hours, "loop": loop}


def create_state(root: str | Path, setup: OnboardSetup, prior: Coefficients) -> OnboardState:
    """Start an onboarding in ``root`` (a new or empty folder)."""
    root = Path(root)
    if (root / SETUP_FILE).exists():
        raise InputError(root / SETUP_FILE, None, "an onboarding already lives here: resume it (omit the setup "
                         "flags) or choose another --state")
    load_hardware(setup.hardware)  # one-line errors for unknown names before anything is written
    doc = campaign_document(setup, prior)
    campaign = parse_campaign(doc, source=str(root / CAMPAIGN_FILE))
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / CAMPAIGN_FILE, yaml.safe_dump(doc, sort_keys=False))
    atomic_write_text(root / PRIOR_FILE, json_dumps(prior.to_dict()))
    atomic_write_text(root / SETUP_FILE, json_dumps(setup.to_dict()))  # last: the state exists once this does
    return OnboardState(root, setup, prior, campaign)


def open_state(root: str | Path) -> OnboardState:
    root = Path(root)
    path = root / SETUP_FILE
    if not path.is_file():
        raise InputError(path, None, "not an onboarding state folder (start one with rooflab onboard --model M "
                         "--hardware H --tp N --state DIR)")
    try:
        setup = OnboardSetup.from_dict(json.loads(path.read_text()), path)
        prior_doc = json.loads((root / PRIOR_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, None, f"malformed JSON at line {exc.lineno}: {exc.msg}") from None
    except FileNotFoundError as exc:
        raise InputError(exc.filename, None, "missing from the onboarding state") from None
    prior = coefficients_from_doc(prior_doc, str(root / PRIOR_FILE))
    campaign = parse_campaign(read_yaml(root / CAMPAIGN_FILE), source=str(root / CAMPAIGN_FILE))
    return OnboardState(root, setup, prior, campaign)


# ================================================================================================ proposals
def point_trace(point: SweepPoint) -> Trace:
    """The requests ``point``'s workload sends (:func:`rooflab.collect.workloads.point_requests`) as a trace to
    replay, under the point's engine settings (nothing measured)."""
    reqs = point_requests(point)
    n = len(reqs)
    table = pd.DataFrame({"request_id": [r.request_id for r in reqs], "arrival_us": [r.arrival_us for r in reqs],
                          "prompt_tokens": [r.prompt_tokens for r in reqs],
                          "output_tokens": [r.max_tokens for r in reqs], "prefix_group": [None] * n,
                          "prefix_tokens": np.zeros(n), "failed": np.zeros(n, bool), "ttft_us": np.full(n, np.nan),
                          "e2e_us": np.full(n, np.nan), "itl_us": np.full(n, np.nan)})
    engine = {k: v for k, v in dict(point.engine).items() if k in ENGINE_KEYS}
    return Trace(point.label(), point.model, point.tp, point.hardware, engine, table, source=point.label())


def vllm_command(state: OnboardState) -> tuple[str, list[str]]:
    """The ``vllm serve`` line every proposed run assumes, and what was assumed about the vLLM version."""
    s, e = state.setup, state.campaign.engine
    arch, hw = load_model(s.model), load_hardware(s.hardware)
    _, assumed = complete_engine(dict(e), arch, hw, s.tp, vllm_version=s.vllm_version)
    cmd = (f"vllm serve <{s.model}: its Hugging Face id or local path> --tensor-parallel-size {s.tp} "
           f"--max-num-seqs {e['max_num_seqs']} --max-num-batched-tokens {e['max_num_batched_tokens']} "
           f"--max-model-len {e['max_model_len']} --gpu-memory-utilization {e['gpu_memory_utilization']} "
           + ("--enable-prefix-caching" if e.get("enable_prefix_caching") else "--no-enable-prefix-caching"))
    if s.served_model_name:
        cmd += f" --served-model-name {s.served_model_name}"
    return cmd, [a for a in assumed if "vLLM" in a and "0.15.1" in a and "assumed" in a]


def write_proposals(state: OnboardState, iteration: int, picks: list[dict[str, Any]],
                    pending: dict[str, SweepPoint]) -> Path:
    """Ready inference-perf configs for the pending runs of ``iteration`` (``<run id>.yaml``, writing their output
    to ``results/<run id>/``), with PLAN.md (what to run, why, predicted cost and latencies) and plan.json."""
    from rooflab.twin.tokenizer import ensure_tokenizer

    s = state.setup
    out = state.proposal_dir(iteration)
    tok = s.tokenizer_dir or str(ensure_tokenizer())
    by_key = {json.dumps(p["point"], sort_keys=True, separators=(",", ":")): p for p in picks}
    rows = []
    for rid, point in pending.items():
        cfg = render_config(point, base_url=s.base_url, model_name=s.served_model_name or s.model, tokenizer_dir=tok,
                            output_dir=f"results/{rid}")
        write_config(cfg, out / f"{rid}.yaml")
        pick = by_key.get(point.key, {})
        rows.append({"run_id": rid, "config": str(out / f"{rid}.yaml"), "point": describe(point),
                     "reason": pick.get("reason", ""), "serves": pick.get("serves", ""),
                     "pins": PINS.get(str(pick.get("serves", "")), str(pick.get("serves", ""))),
                     "predicted_gpu_s": float(pick.get("cost_gpu_s", point.duration_s * point.tp)),
                     "predicted": (pick.get("details") or {}).get("predicted", {})})
    cmd, notes = vllm_command(state)
    lines = [f"# Onboarding {s.model} on {s.tp}× {s.hardware}" + (f" (vLLM {s.vllm_version})" if s.vllm_version else "")
             + f": iteration {iteration}, {len(rows)} run(s) to do", "",
             "Serve the model with these settings (every run of this onboarding):", "", f"    {cmd}", *[
                 f"    # note: {n}" for n in notes], "",
             "Run each config with inference-perf (it writes `results/<run id>/`), then hand the results back:", "",
             f"    inference-perf -c {out}/<run id>.yaml",
             f"    rooflab onboard ingest --state {state.root} results/<run id>/", "",
             "| run | what | pins | predicted cost | predicted mean TTFT / E2E (90%) |", "|---|---|---|---|---|"]
    for r in rows:
        p = r["predicted"]
        pred = (f"{p['ttft_ms']:.0f} ms ±{p['ttft_rel90']:.0%} / {p['e2e_ms']:.0f} ms ±{p['e2e_rel90']:.0%}"
                if p else "-")
        minutes = r["predicted_gpu_s"] / 60
        cost = f"{minutes:.{0 if minutes >= 10 else 1}f} GPU-minutes"
        lines.append(f"| `{r['run_id']}` | {r['point']} | {r['pins']} | {cost} | {pred} |")
    lines += ["", "Why each run:", ""] + [f"- `{r['run_id']}`: {r['reason']}" for r in rows]
    atomic_write_text(out / "PLAN.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "plan.json", json_dumps({"iteration": iteration, "vllm": cmd, "runs": rows}))
    return out / "PLAN.md"


# ================================================================================================ ingest
@dataclass(frozen=True)
class Ingested:
    run_id: str
    source: str
    status: str
    requests: int
    failed: int
    gpu_seconds: float
    skipped: bool = False  # already in the store

    def line(self) -> str:
        if self.skipped:
            return f"{self.run_id}: already ingested ({self.source})"
        return (f"{self.run_id}: {self.status}, {self.requests} requests ({self.failed} failed), "
                f"{self.gpu_seconds / 60:.1f} GPU-minutes, from {self.source}")


def _match(path: Path, waiting: dict[str, SweepPoint], run: str | None, all_runs: dict[str, SweepPoint]
           ) -> str | None:
    if run is not None:
        hits = [r for r in all_runs if r == run or r.startswith(run)]
        if len(hits) != 1:
            raise InputError(None, "--run", f"{run!r} names {'no' if not hits else 'more than one'} proposed run "
                             f"(waiting: {', '.join(waiting) or 'none'})")
        return hits[0]
    if (path / "manifest.json").is_file():
        m = json.loads((path / "manifest.json").read_text())
        key = SweepPoint.from_dict(m["point"]).key if isinstance(m, dict) and "point" in m else None
        hits = [r for r, p in all_runs.items() if p.key == key or r == m.get("run_id")]
        if hits:
            return hits[0]
    hits = [r for r in all_runs if r in str(path.resolve())]
    return hits[0] if len(hits) == 1 else None


def _request_table(trace: Trace) -> pd.DataFrame:
    r = trace.requests
    arr = r["arrival_us"].to_numpy(dtype=float)
    nan = np.full(len(r), np.nan)
    failed = r["failed"].to_numpy(dtype=bool)
    return validate_requests(pd.DataFrame({
        "run_id": trace.run_id, "request_id": r["request_id"].astype(str).to_numpy(), "arrived_us": arr,
        "queued_us": nan, "scheduled_us": nan, "first_token_us": arr + r["ttft_us"].to_numpy(dtype=float),
        "finished_us": nan, "departed_us": arr + r["e2e_us"].to_numpy(dtype=float),
        "prompt_tokens": r["prompt_tokens"].to_numpy(dtype=float), "output_tokens": r["output_tokens"].to_numpy(float),
        "preemptions": nan, "status": np.where(failed, "failed", "ok")}), trace.source or trace.run_id)


def ingest(state: OnboardState, paths: list[str | Path], *, run: str | None = None) -> list[Ingested]:
    """Write each result into the state's store as the proposed run it answers (see the module doc)."""
    from rooflab.data.trace_readers import read_trace

    if run is not None and len(paths) != 1:
        raise InputError(None, "--run", "names one proposed run: give one result with it")
    st = state.store
    all_runs: dict[str, SweepPoint] = {}
    for plan in state.plans.plans():
        points = [SweepPoint.from_dict(p["point"]) for p in plan.get("points", [])]
        all_runs.update({rid: p for rid, p, _ in state.campaign.runs(points)})
    waiting = state.waiting()
    out = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(path, None, "no such file or folder")
        rid = _match(path, waiting, run, all_runs)
        if rid is None:
            raise InputError(path, None, "cannot tell which proposed run this answers: pass --run RUN_ID (waiting: "
                             f"{', '.join(waiting) or 'none'})")
        if rid not in waiting:
            out.append(Ingested(rid, str(path), str(st.status(rid)), 0, 0, 0.0, skipped=True))
            continue
        point = waiting[rid]
        steps = None
        src = path
        if path.is_dir() and not (path / "manifest.json").is_file() and \
                (path / "per_request_lifecycle_metrics.json").is_file():
            src = path / "per_request_lifecycle_metrics.json"
        if (path / "manifest.json").is_file():
            requests = pd.read_parquet(path / "tables" / "requests.parquet")
            if (path / "tables" / "steps.parquet").is_file():
                steps = pd.read_parquet(path / "tables" / "steps.parquet")
            m = json.loads((path / "manifest.json").read_text())
            gpu_s, kind = float(m.get("gpu_seconds") or 0.0), f"data-store run ({m.get('launcher', '?')})"
            requests = validate_requests(requests.assign(run_id=rid), str(path))
        else:
            engine = {k: v for k, v in dict(point.engine).items() if k in ENGINE_KEYS}
            trace = read_trace(src, model=point.model, tp=point.tp, hardware=point.hardware, engine=engine)
            requests = _request_table(Trace(rid, trace.model, trace.tp, trace.hardware, trace.engine, trace.requests,
                                            source=trace.source))
            span = (requests["departed_us"].max() - requests["arrived_us"].min()) / 1e6 if len(requests) else 0.0
            gpu_s, kind = float(span) * point.tp, "request trace"
        ok = requests["status"].astype(str).isin(["ok", "length", "stop"])
        status, reason = "ok", ""
        if not ok.any():
            status, reason = "failed", f"every one of {len(requests)} requests failed"
        elif route_run(requests).saturated:
            status, reason = "saturated", "run-level saturation (docs/spec.md §6): kept out of the fit"
        rd = st.begin(rid, point, state.campaign.name, 0, 1)
        dest = rd.path / "raw" / path.name
        if path.is_dir():
            shutil.copytree(path, dest, ignore=shutil.ignore_patterns(".lease*", "manifest.json"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        st.finish(rd, point=point, campaign=state.campaign.name, replicate=0, attempt=1, status=status, reason=reason,
                  steps=steps, requests=requests, gpu_seconds=gpu_s, launcher="ingested",
                  engine={"kind": kind, "vllm": state.setup.vllm_version}, extra={"ingested_from": str(path)})
        out.append(Ingested(rid, str(path), status, len(requests), int((~ok).sum()), gpu_s))
        waiting.pop(rid, None)
    return out
