"""The Bayesian information targeting works with, in the fit's relative-error units (docs/spec.md §9).

Each step row contributes ``z zᵀ / σ²`` with ``z = x / ŷ`` (σ: the fit's relative residual RMS, floored at 2%).
Steps of one run share conditions and the bootstrap resamples whole runs, so a run counts as at most
:data:`STEPS_PER_RUN` independent steps. The prior: efficiency corrections β1–β5 ~ N(1, 0.5²) (the physical
range [0.3, 5] is ±2σ on a log scale around 1); overhead terms (β6, β7, β_L) ~ N(β̂, β̂²) — weak, so their
information comes from data. ``M = prior + Σ collected runs``. Used by the D-optimal design and by the stop
rule's identifiability criterion."""

from __future__ import annotations

import math

import numpy as np

from rooflab.fit.beta import BetaFit
from rooflab.fit.calibration import Calibration
from rooflab.model.variants import get_variant

STEPS_PER_RUN = 100  # a run counts as at most this many independent step observations
MIN_SIGMA = 0.02  # relative residual floor (the fit's noise can look smaller than the model error)
PRIOR_SD = 0.5  # efficiency corrections β1–β5 ~ N(1, 0.5²) for targeting
# Starting coefficients before any fit (iteration 0): efficiency corrections at their prior 1 and the
# overhead terms at the magnitudes of the real H100 fit (`make real`), rounded.
START_BETA = {"beta1": 1.0, "beta2": 1.0, "beta3": 1.0, "beta4": 1.0, "beta5": 1.0, "beta6": 10.0,
              "beta7": 300.0, "beta_layer": 20.0}


# ----------------------------------------------------------------------------------------- information
def prior_precision(variant: str, beta: dict) -> np.ndarray:
    """Diagonal prior precision of the targeting posterior (see the module doc)."""
    v = get_variant(variant)
    d = []
    for t in v.terms:
        if t.prior is not None:
            d.append(1.0 / PRIOR_SD ** 2)
        else:
            scale = abs(beta.get(t.name, 0.0)) or START_BETA.get(t.name, 1.0)
            d.append(1.0 / scale ** 2)
    return np.diag(d)


def data_information(fit: BetaFit | None, sigma: float) -> np.ndarray | float:
    """Information of the fitted training steps (measured step times), from the fit's per-run Gram
    matrices of the relative rows ``x/y``; each run capped at :data:`STEPS_PER_RUN` steps (module doc).
    Without fitted steps: 0.0, which adds to a prior precision like a zero matrix."""
    if fit is None or not len(fit.run_rows):
        return 0.0
    n = np.maximum(fit.run_rows, 1.0)
    w = np.minimum(fit.run_rows, STEPS_PER_RUN) / n
    return np.tensordot(w, fit.run_gram[:, :-1, :-1], axes=1) / sigma ** 2


def _logdet(M: np.ndarray) -> float:
    sign, val = np.linalg.slogdet(M)
    return float(val) if sign > 0 else -math.inf


def _subset_logdet(M: np.ndarray, idx: list[int]) -> float:
    """log det of the marginal posterior precision of the βs ``idx`` (Dₛ-optimality)."""
    if not idx:
        return 0.0
    cov = np.linalg.inv(M)
    return -_logdet(cov[np.ix_(idx, idx)])


def gain(M: np.ndarray, Mc: np.ndarray, flagged: list[int]) -> tuple[float, float]:
    """(D gain, Dₛ gain on the flagged βs) of adding information ``Mc`` to the posterior precision ``M``."""
    d = _logdet(M + Mc) - _logdet(M)
    ds = _subset_logdet(M + Mc, flagged) - _subset_logdet(M, flagged) if flagged else 0.0
    return d, ds


def sigma_of(calib: Calibration | None) -> float:
    if calib is None:
        return 0.05
    mape = (calib.accuracy.get("train") or {}).get("mape")
    # RMS relative error ≈ 1.25 × mean absolute relative error (Gaussian residuals)
    return max(MIN_SIGMA, 1.25 * float(mape) if mape is not None and np.isfinite(mape) else 0.05)


def beta_of(calib: Calibration | None, variant: str) -> dict[str, float]:
    if calib is None:
        names = get_variant(variant).names
        return {n: START_BETA.get(n, 1.0) for n in names}
    return calib.beta.coefficients()
