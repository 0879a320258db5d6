"""Synthetic step tables with known β (y = Xβ × noise; no twin involved), for tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from rooflab.model.features import featurize
from rooflab.model.variants import get_variant

# 4 dense + 2 MoE settings, 3 TP1 and 3 TP>1, 5 distinct static weights: every β moves independently
SETTINGS = (("llama-3.1-8b", 1), ("llama-3.1-8b", 4), ("mixtral-8x7b", 2), ("qwen3-30b-a3b", 1),
            ("llama-3.1-70b", 8), ("qwen3-14b", 1))
TRUE_BETA = np.array([1.6, 1.3, 0.9, 1.2, 3.0, 25.0, 400.0])


def synthetic_steps(n_runs: int = 12, steps_per_run: int = 600,
                    settings: tuple[tuple[str, int], ...] = SETTINGS, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for r in range(n_runs):
        model, tp = settings[r % len(settings)]
        n = steps_per_run
        pf_reqs = rng.integers(0, 4, n)
        pf_tok = np.where(pf_reqs > 0, rng.integers(64, 4096, n), 0)
        pf_reqs = np.where(pf_tok > 0, pf_reqs, 0)
        dc = rng.integers(0, 160, n)
        dc = np.where((pf_tok == 0) & (dc == 0), 1, dc)
        frames.append(pd.DataFrame({
            "run_id": f"run{r:02d}", "step_id": np.arange(n), "model": model, "tp": tp, "hardware": "H100-SXM",
            "prefill_reqs": pf_reqs, "prefill_tokens": pf_tok,
            "prefill_context": pf_reqs * rng.integers(0, 3000, n), "decode_reqs": dc,
            "decode_context": dc * rng.integers(64, 6000, n), "kv_usage": rng.uniform(0.05, 0.9, n),
            "preemptions": 0, "workload": "synthetic"}))
    return pd.concat(frames, ignore_index=True)


def with_step_times(steps: pd.DataFrame, beta: ArrayLike = TRUE_BETA, variant: str = "roofline7", noise: float = 0.03,
                    seed: int = 1, formulas: str = "vllm") -> pd.DataFrame:
    """Step times from the model itself times lognormal noise, plus a per-run multiplicative offset of
    noise/3 (steps of one run share conditions, as on real GPUs)."""
    rng = np.random.default_rng(seed)
    X = get_variant(variant).design_matrix(featurize(steps, formulas))
    run_effect = steps["run_id"].map({r: rng.lognormal(0, noise / 3) for r in steps["run_id"].unique()})
    out = steps.copy()
    out["step_time_us"] = X @ np.asarray(beta) * rng.lognormal(0, noise, len(steps)) * run_effect.to_numpy()
    return out
