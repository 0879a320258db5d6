"""Saturation routing (SPEC §6). A saturated step mixes GPU physics with scheduler policy (cache
pressure, recompute), so it is kept out of the β fit — and kept for α fitting and simulator validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

KV_USAGE_LIMIT = 0.95


@dataclass(frozen=True)
class StepRouting:
    saturated: np.ndarray  # bool per step
    by_kv: int
    by_preemption: int

    @property
    def n_saturated(self) -> int:
        return int(self.saturated.sum())

    @property
    def n_unsaturated(self) -> int:
        return int((~self.saturated).sum())

    def counts(self) -> dict:
        return {"steps": len(self.saturated), "unsaturated": self.n_unsaturated, "saturated": self.n_saturated,
                "saturated_kv_usage": self.by_kv, "saturated_preemption": self.by_preemption}


def route_steps(steps: pd.DataFrame, kv_limit: float = KV_USAGE_LIMIT) -> StepRouting:
    """A step is saturated if its KV usage exceeds ``kv_limit`` or it preempted any request."""
    kv = steps["kv_usage"].to_numpy(dtype=np.float64) if "kv_usage" in steps else np.full(len(steps), np.nan)
    pre = steps["preemptions"].to_numpy(dtype=np.float64) if "preemptions" in steps else np.zeros(len(steps))
    by_kv = np.nan_to_num(kv, nan=0.0) > kv_limit
    by_pre = np.nan_to_num(pre, nan=0.0) > 0
    return StepRouting(by_kv | by_pre, int(by_kv.sum()), int(by_pre.sum()))
