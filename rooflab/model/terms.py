"""A step-time model as a declaration: :class:`Term` (one coefficient × one feature column) and
:class:`Variant` (a named tuple of terms plus the feature formulas its columns come from). The fit, health
checks, residuals, targeting and replay work on any variant; the registry is :mod:`rooflab.model.variants`.

Declaration order matters in one case: when two prior-free terms have proportional columns in the data (the
per-step constant and β_L·L when all steps share one layer count), the fit cannot tell them apart, so the
later-declared, more specific term takes the shared effect and the earlier one is held at 0 — reported as a
tie, never decided silently by the solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Term:
    name: str  # coefficient name, e.g. "beta1"
    feature: str  # column of the feature frame it multiplies
    meaning: str
    unit: str  # unit of the coefficient
    prior: float | None = None  # Gaussian prior mean (efficiency corrections: 1.0); None = no prior
    lower: float = 0.0
    upper: float = np.inf
    # efficiency corrections: the β at which the data's view of the term is judged (rooflab.fit.coverage;
    # None: the prior) and the range the stop rule accepts as physical (None: its default, [0.3, 5])
    typical: float | None = None
    plausible: tuple[float, float] | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    terms: tuple[Term, ...]
    # the feature formula sets whose columns the terms use; the first is the default
    formulas: tuple[str, ...] = ("vllm", "design")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    @property
    def features(self) -> list[str]:
        return [t.feature for t in self.terms]

    @property
    def default_formulas(self) -> str:
        return self.formulas[0]

    def design_matrix(self, features: pd.DataFrame | dict[str, Any]) -> np.ndarray:
        return np.column_stack([np.asarray(features[t.feature], dtype=np.float64) for t in self.terms])

    def predict(self, features: pd.DataFrame | dict[str, Any], beta: np.ndarray) -> np.ndarray:
        return self.design_matrix(features) @ np.asarray(beta, dtype=np.float64)
