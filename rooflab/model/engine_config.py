"""vLLM engine settings (the options a run is served with), vLLM's own defaults for them, and the KV-cache
capacity they imply.

The consumer-facing description of a serving setup: the twin's scheduler, replay, campaign feasibility checks
and the sim-to-real benchmark all size the KV cache here, with vLLM 0.15.1's accounting (docs/vllm.md):
``blocks = (⌈total × utilization⌉ − weights − profiling peak) // bytes per block``, one of them vLLM's null
block. The profiling peak (activations of the profile run, the sampler's logits, NCCL buffers) is the one
fitted piece: ``0.422 + 0.254·[TP > 1] + 0.569·vocab/1e5`` GiB, least squares on the 11 H100 configurations
whose block counts are known (the sim-to-real kit's training experiments and the real runs; never its eval
set); ``benchmarks/kv_blocks.py`` reports its error (≤ 0.62%, leave-one-out ≤ 0.83%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rooflab.errors import InputError
from rooflab.model.arch import ModelArch
from rooflab.model.features import (
    Setting,
    expert_weight_bytes,
    kv_bytes_per_token_layer,
    static_weight_bytes,
)
from rooflab.model.hardware import Hardware

GIB = 2**30


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = 4096
    enable_prefix_caching: bool = False
    num_gpu_blocks: int | None = None  # usable KV blocks: overrides the capacity computed from memory

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise InputError(None, name, "must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InputError(None, "gpu_memory_utilization", "must be in (0, 1]")



# vLLM 0.15.1's profiling peak beyond the weights (GiB), fitted as the module docstring says
PROFILE_PEAK_GIB = (0.422, 0.254, 0.569)  # base, extra at TP > 1, per 1e5 vocabulary entries


def vllm_weight_bytes(arch: ModelArch, hardware: Hardware, tp: int) -> float:
    """Weights per GPU as vLLM loads them: everything the step reads (attention, dense FFN, every expert, shared
    experts, router, LM head) plus the vocab-parallel input embedding (padded to 64 rows)."""
    s = Setting(arch, hardware, tp, "vllm")
    vocab = -(-arch.vocab // 64) * 64
    return static_weight_bytes(s) + arch.n_experts * expert_weight_bytes(s) + vocab * arch.hidden * 2.0 / tp


def profile_peak_bytes(arch: ModelArch, tp: int) -> float:
    base, multi_gpu, per_vocab = PROFILE_PEAK_GIB
    return (base + (multi_gpu if tp > 1 else 0.0) + per_vocab * arch.vocab / 1e5) * GIB


def kv_block_bytes(arch: ModelArch, hardware: Hardware, tp: int, block_size: int = 16) -> float:
    """KV-cache bytes of one block over all layers, per GPU (KV heads split over TP, replicated below 1 per rank)."""
    return block_size * arch.n_layers * kv_bytes_per_token_layer(Setting(arch, hardware, tp, "vllm"))


def kv_capacity_blocks(arch: ModelArch, hardware: Hardware, tp: int, config: EngineConfig) -> int:
    """Usable GPU KV blocks as vLLM 0.15.1 sizes them (the module docstring), without its null block;
    ``config.num_gpu_blocks`` when given."""
    if config.num_gpu_blocks is not None:
        return int(config.num_gpu_blocks)
    weights = vllm_weight_bytes(arch, hardware, tp)
    requested = math.ceil(hardware.usable_memory_gib * GIB * config.gpu_memory_utilization)
    budget = requested - weights - profile_peak_bytes(arch, tp)
    blocks = int(budget // kv_block_bytes(arch, hardware, tp, config.block_size)) - 1  # minus vLLM's null block
    if blocks <= 0:
        raise InputError(None, "tp", f"{arch.name} does not fit on {tp}× {hardware.name}: "
                         f"{weights / GIB:.1f} GiB of weights per GPU leave no room for the KV cache")
    return blocks


def vllm_server_defaults(hardware: Hardware, vllm_version: str | None = None) -> dict[str, int | float | bool]:
    """What ``vllm serve`` (the OpenAI API server) uses when an option is not given, as vLLM 0.15.1 sets it
    (``vllm/engine/arg_utils.py``, ``get_batch_defaults``): on GPUs with ≥ 70 GiB that are not A100s, 8192
    batched tokens and 1024 sequences; otherwise 2048 and 256. Block size 16, 90% of GPU memory, prefix caching
    and chunked prefill on. Other versions are assumed to match (the caller says so)."""
    big = hardware.memory_gb >= 70 and "a100" not in hardware.name.lower()
    return {"max_num_batched_tokens": 8192 if big else 2048, "max_num_seqs": 1024 if big else 256,
            "block_size": 16, "gpu_memory_utilization": 0.9, "enable_prefix_caching": True}


def complete_engine(engine: dict[str, Any], arch: ModelArch, hardware: Hardware, tp: int, *,
                    vllm_version: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """``engine`` with every setting it does not give filled from vLLM's server defaults (max_model_len: the
    model's maximum), and one line per assumption made — what a replay tells its user."""
    out = dict(engine)
    assumed = []
    version = vllm_version or "0.15.1"
    for k, v in vllm_server_defaults(hardware, vllm_version).items():
        if out.get(k) is None:
            out[k] = v
            assumed.append(f"{k} = {v} (vLLM {version} server default on {hardware.name})")
    if out.get("max_model_len") is None:
        out["max_model_len"] = arch.max_model_len
        assumed.append(f"max_model_len = {arch.max_model_len} (the model's max_position_embeddings)")
    if out.get("num_gpu_blocks") is None:
        cfg = EngineConfig(**{k: v for k, v in out.items() if k in EngineConfig.__dataclass_fields__})
        blocks = kv_capacity_blocks(arch, hardware, tp, cfg)
        assumed.append(f"KV cache = {blocks} blocks of {cfg.block_size} tokens, derived from "
                       f"gpu_memory_utilization {cfg.gpu_memory_utilization:g} (vLLM 0.15.1 accounting)")
    if vllm_version and not vllm_version.startswith("0.15"):
        assumed.append(f"vLLM {vllm_version}: defaults and memory accounting assumed equal to 0.15.1's")
    return out, assumed
