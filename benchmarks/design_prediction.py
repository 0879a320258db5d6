"""How fast and how faithful the D-optimal targeting's candidate predictions are (rooflab.targeting.doptimal).

Predicts every training candidate of the default campaign under the starting coefficients, once sampled
the way targeting does it (the first 1,500 requests / 3,000 steps, the rest of the cost extrapolated)
and once simulated whole, and prints the time of each pass and the predicted GPU-hours of both.

    .venv/bin/python benchmarks/design_prediction.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import numpy as np

    from rooflab.collect.spec import load_campaign
    from rooflab.targeting.information import START_BETA
    from rooflab.targeting.prediction import predict_point, simulate_point

    train = [p for p in load_campaign("default").candidates() if p.split == "train"]
    t0 = time.perf_counter()
    sampled = np.array([predict_point(p, START_BETA).gpu_s for p in train])
    t1 = time.perf_counter()
    whole = np.array([simulate_point(p, START_BETA, "roofline7+layers", "vllm", max_requests=10 ** 9,
                                     max_steps=10 ** 9)[2] for p in train])
    t2 = time.perf_counter()
    rel = sampled / whole - 1
    print(f"{len(train)} training candidates of the default campaign, starting coefficients")
    print(f"  sampled prediction (what targeting runs): {t1 - t0:6.1f} s, {sampled.sum() / 3600:.2f} GPU-h predicted")
    print(f"  whole-run simulation:                     {t2 - t1:6.1f} s, {whole.sum() / 3600:.2f} GPU-h")
    print(f"  per candidate, sampled vs whole: median |error| {np.median(np.abs(rel)):.1%}, "
          f"worst {np.max(np.abs(rel)):.1%} ({train[int(np.argmax(np.abs(rel)))].label()}; "
          f"{int((np.abs(rel) > 0.05).sum())} candidates off by more than 5%)")


if __name__ == "__main__":
    main()
