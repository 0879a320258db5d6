"""Request traces: one run's requests (arrival, prompt / output tokens, prefix groups), the vLLM settings it
ran under and the measured client-side TTFT / E2E where known. The readers that build them from each source are
:mod:`rooflab.data.trace_readers`; replay (:mod:`rooflab.replay`) runs them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# traces


@dataclass
class Trace:
    """One run's requests and the settings to replay them under.

    ``requests`` columns: request_id (str), arrival_us, prompt_tokens, output_tokens (what the server
    produced; the replay sends it as max_tokens with ignore_eos), prefix_group, prefix_tokens, failed
    (bool, the client saw an error), and the measured client-side ttft_us, e2e_us, itl_us (NaN where
    unknown)."""

    run_id: str
    model: str
    tp: int
    hardware: str
    engine: dict  # EngineConfig fields
    requests: pd.DataFrame
    timeout_s: float | None = None  # client request timeout (the request is aborted at arrival + timeout)
    workload: str | None = None
    split: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    max_concurrency: int | None = None  # a closed-loop client: at most this many requests in flight
    stage_gap_s: float | None = None  # sequential stages: stage k+1 starts this long after stage k drains (None:
    #                                  stages are time windows, the arrivals stand as given)

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    def window(self, t0_s: float, t1_s: float, lead_s: float = 30.0) -> Trace:
        """The requests arriving in [t0 − lead, t1) seconds after the first arrival; those before t0 only
        warm the engine up (column ``scored`` False)."""
        r = self.requests
        t = (r["arrival_us"] - r["arrival_us"].min()) / 1e6
        keep = (t >= t0_s - lead_s) & (t < t1_s)
        sub = r[keep].copy()
        sub["scored"] = (t[keep] >= t0_s).to_numpy() & sub.get("scored", pd.Series(True, index=sub.index)).to_numpy()
        return Trace(self.run_id, self.model, self.tp, self.hardware, dict(self.engine), sub.reset_index(drop=True),
                     self.timeout_s, self.workload, self.split, self.source, list(self.notes), self.max_concurrency,
                     self.stage_gap_s)


_TRACE_COLUMNS = ("request_id", "arrival_us", "prompt_tokens", "output_tokens", "prefix_group", "prefix_tokens",
                  "failed", "ttft_us", "e2e_us", "itl_us")


def request_itl(ttft: np.ndarray, e2e: np.ndarray, out: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(out > 1, (e2e - ttft) / (out - 1), np.nan)


ENGINE_KEYS = ("max_num_seqs", "max_num_batched_tokens", "block_size", "gpu_memory_utilization", "max_model_len",
                "enable_prefix_caching", "num_gpu_blocks")
