"""Model variants: named lists of terms (coefficient × feature column) that the fit estimates.

A variant is one small declaration; the fitting, health and residual code work on any of them.
Declaration order matters in one case: when two prior-free terms have proportional columns in the data
(the per-step constant and β_L·L when all steps share one layer count), the fit cannot tell them apart,
so the later-declared, more specific term takes the shared effect and the earlier one is held at 0 —
reported as a tie, never decided silently by the solver.
``roofline7`` is exactly docs/spec.md §1; ``roofline7+layers`` adds a per-layer overhead term β_L·L, which the
seed folded into β7 and which cross-model transfer may need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rooflab.errors import InputError
from rooflab.model.features import BASIS_COLUMNS


@dataclass(frozen=True)
class Term:
    name: str  # coefficient name, e.g. "beta1"
    feature: str  # column of the feature frame it multiplies
    meaning: str
    unit: str  # unit of the coefficient
    prior: float | None = None  # Gaussian prior mean (efficiency corrections: 1.0); None = no prior
    lower: float = 0.0
    upper: float = np.inf


@dataclass(frozen=True)
class Variant:
    name: str
    terms: tuple[Term, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    @property
    def features(self) -> list[str]:
        return [t.feature for t in self.terms]

    def design_matrix(self, features: pd.DataFrame | dict) -> np.ndarray:
        return np.column_stack([np.asarray(features[t.feature], dtype=np.float64) for t in self.terms])

    def predict(self, features: pd.DataFrame | dict, beta: np.ndarray) -> np.ndarray:
        return self.design_matrix(features) @ np.asarray(beta, dtype=np.float64)


ROOFLINE7 = (
    Term("beta1", "f_prefill", "prefill roofline max(F_pf_compute, F_pf_kv)", "×", prior=1.0),
    Term("beta2", "f_decode", "decode roofline max(F_dc_compute, F_dc_kv)", "×", prior=1.0),
    Term("beta3", "f_weight_static", "static weight loading", "×", prior=1.0),
    Term("beta4", "f_weight_moe", "routed-expert weight loading", "×", prior=1.0),
    Term("beta5", "f_tp", "TP all-reduce", "×", prior=1.0),
    Term("beta6", "n_requests", "per-request overhead", "µs/request"),
    Term("beta7", "one", "per-step overhead", "µs/step"),
)

VARIANTS = {
    "roofline7": Variant("roofline7", ROOFLINE7),
    "roofline7+layers": Variant("roofline7+layers", ROOFLINE7 + (
        Term("beta_layer", "n_layers", "per-layer overhead (launches, norms)", "µs/layer"),)),
}
DEFAULT_VARIANT = "roofline7+layers"  # what campaigns, replay and `rooflab fit` use unless told otherwise
assert all(t.feature in BASIS_COLUMNS for v in VARIANTS.values() for t in v.terms)


def get_variant(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise InputError(None, "variant", f"unknown model variant {name!r} (known: {', '.join(VARIANTS)})")
    return VARIANTS[name]
