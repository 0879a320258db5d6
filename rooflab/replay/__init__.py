"""Request-level replay: predict TTFT / ITL / E2E of request traces with a coefficient set and score them.

predict.py  the replay itself (the twin's event loop with a fitted step timer)
metrics.py  scoring against the measurement
plots.py    predicted-vs-measured figures
heldout.py  held-out error over a data store's runs
intervals.py       prediction intervals from posterior draws (common random numbers), SLO probabilities
interval_plots.py  calibration plot, predicted-vs-measured with interval bars
promotion.py       the registry's promotion rule (paired held-out comparison)
"""

from rooflab.model.coefficients import load_coefficients
from rooflab.replay.heldout import store_replay_error
from rooflab.replay.metrics import compare, saturation_report, summarize
from rooflab.replay.plots import plot_replay
from rooflab.replay.predict import ReplayResult, replay

__all__ = ["ReplayResult", "compare", "load_coefficients", "plot_replay", "replay", "saturation_report",
           "store_replay_error", "summarize"]
