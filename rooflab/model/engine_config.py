"""vLLM engine settings (the options a run is served with) and the KV-cache capacity they imply.

The consumer-facing description of a serving setup: the twin's scheduler, replay, campaign feasibility
checks and the sim-to-real benchmark all size the KV cache here, from the same accounting as vLLM's
start-up (GPU memory × utilization − weights − activation reserve).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    num_gpu_blocks: int | None = None  # override the capacity computed from memory
    activation_reserve_gib: float = 1.75  # peak activation memory vLLM's profiling run reserves

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise InputError(None, name, "must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InputError(None, "gpu_memory_utilization", "must be in (0, 1]")



def kv_capacity_blocks(arch: ModelArch, hardware: Hardware, tp: int, config: EngineConfig) -> int:
    """GPU KV blocks as vLLM sizes them: memory × utilization − weights − activation reserve."""
    if config.num_gpu_blocks is not None:
        return int(config.num_gpu_blocks)
    s = Setting(arch, hardware, tp, "vllm")
    weights = static_weight_bytes(s) + arch.n_experts * expert_weight_bytes(s)
    budget = hardware.memory_gb * GIB * config.gpu_memory_utilization - weights - config.activation_reserve_gib * GIB
    per_block = config.block_size * arch.n_layers * kv_bytes_per_token_layer(s)
    blocks = int(budget // per_block)
    if blocks <= 0:
        raise InputError(None, "tp", f"{arch.name} does not fit on {tp}× {hardware.name}: "
                         f"{weights / GIB:.1f} GiB of weights per GPU leave no room for the KV cache")
    return blocks
