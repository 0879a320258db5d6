"""GPU datasheet numbers (``configs/hardware/<name>.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rooflab.errors import InputError
from rooflab.files import read_yaml
from rooflab.paths import CONFIGS_DIR

_FIELDS = ("peak_tflops_bf16", "peak_tflops_fp8", "hbm_tb_s", "nvlink_gb_s_per_direction", "memory_gb")
# per-hop latency of the GPU interconnect (α of the α-β model; 0 = unknown); the memory CUDA reports as the
# device total (torch.cuda.mem_get_info), in GiB (0 = unknown: 99% of memory_gb GiB, H100-80GB's ratio)
_OPTIONAL = {"link_latency_us": 0.0, "usable_memory_gib": 0.0}


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops_bf16: float  # dense (no sparsity)
    peak_tflops_fp8: float | None  # dense; None where the GPU has no fp8 tensor cores
    hbm_tb_s: float
    nvlink_gb_s_per_direction: float
    memory_gb: float
    source: str = ""
    link_latency_us: float = 0.0  # per hop of a ring all-reduce; 0: unknown, β5 absorbs the latency
    usable_memory_gib: float = 0.0  # what CUDA reports as the device's total memory; 0: unknown

    def __post_init__(self) -> None:
        if not self.usable_memory_gib:
            object.__setattr__(self, "usable_memory_gib", 0.99 * self.memory_gb)

    def gemm_tflops(self, fp8: bool) -> float:
        """Peak for a GEMM whose weights are fp8 (fp8 peak where the GPU has one) or not."""
        return self.peak_tflops_fp8 if (fp8 and self.peak_tflops_fp8) else self.peak_tflops_bf16


def parse_hardware(doc: dict, *, source: str) -> Hardware:
    if not isinstance(doc, dict):
        raise InputError(source, None, "expected a YAML mapping")
    unknown = set(doc) - set(_FIELDS) - set(_OPTIONAL) - {"name"}
    if unknown:
        raise InputError(source, sorted(unknown)[0],
                         f"unknown field (known: name, {', '.join(_FIELDS + tuple(_OPTIONAL))})")
    values: dict[str, Any] = {}
    for f in _FIELDS:
        if f not in doc:
            raise InputError(source, f, "required field is missing")
        v = doc[f]
        if v is None and f == "peak_tflops_fp8":
            values[f] = None
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(source, f, f"expected a positive number, got {v!r}")
        values[f] = float(v)
    for f, default in _OPTIONAL.items():
        v = doc.get(f, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise InputError(source, f, f"expected a non-negative number, got {v!r}")
        values[f] = float(v)
    name = doc.get("name") or Path(source).stem
    return Hardware(name=str(name), source=source, **values)


def load_hardware(name_or_path: str | Path) -> Hardware:
    p = Path(name_or_path)
    path = p if p.suffix in (".yaml", ".yml") and p.is_file() else CONFIGS_DIR / "hardware" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InputError(name_or_path, None, f"no such hardware (known: {', '.join(list_hardware())})")
    return parse_hardware(read_yaml(path), source=str(path))


def list_hardware() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "hardware").glob("*.yaml"))
