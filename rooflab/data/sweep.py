"""Sweep points: one experiment run's definition (docs/spec.md §3).

A sweep point = (model, TP, hardware, workload family, parameter values, duration, seed), plus the split
it serves (training or held-out validation). Its ``key`` is canonical JSON, so the run id derived from
(campaign, key, replicate) is stable across processes and machines.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class SweepPoint:
    model: str  # configs/models name
    tp: int
    hardware: str  # configs/hardware name
    family: str  # workload family: W1, W2, W3, W4-A, W4-C (W5 = W3 across TP; V1 = held-out W2/W3 points)
    params: tuple[tuple[str, float | int | str], ...] = ()  # sorted (name, value): input_tokens, output_tokens, rate
    duration_s: float = 120.0  # stage duration: requests = rate × duration
    seed: int = 0
    split: str = "train"
    engine: tuple[tuple[str, float | int | str | bool], ...] = field(default=())  # vLLM options (max_num_seqs, ...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(sorted(dict(self.params).items())))
        object.__setattr__(self, "engine", tuple(sorted(dict(self.engine).items())))

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @property
    def n_requests(self) -> int:
        """Requests the stage sends: inference-perf truncates rate × duration."""
        return max(1, int(float(self.param("rate")) * self.duration_s))

    @property
    def key(self) -> str:
        return json.dumps({"model": self.model, "tp": self.tp, "hardware": self.hardware, "family": self.family,
                           "params": dict(self.params), "duration_s": self.duration_s, "seed": self.seed,
                           "split": self.split, "engine": dict(self.engine)}, sort_keys=True, separators=(",", ":"))

    def label(self) -> str:
        p = ",".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in self.params)
        return f"{self.model}/tp{self.tp}/{self.hardware}/{self.family}[{p}]"

    def to_dict(self) -> dict:
        return json.loads(self.key)

    @classmethod
    def from_dict(cls, d: dict) -> SweepPoint:
        return cls(model=d["model"], tp=int(d["tp"]), hardware=d["hardware"], family=d["family"],
                   params=tuple(d.get("params", {}).items()), duration_s=float(d.get("duration_s", 120.0)),
                   seed=int(d.get("seed", 0)), split=d.get("split", "train"),
                   engine=tuple(d.get("engine", {}).items()))


def run_id(campaign: str, point: SweepPoint, replicate: int = 0) -> str:
    """Stable id of one run: hash of (campaign, sweep point, replicate)."""
    h = hashlib.sha256(f"{campaign}\n{point.key}\n{replicate}".encode()).hexdigest()[:16]
    return f"{point.family.lower()}-{h}"
