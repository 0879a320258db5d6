"""The MLflow ``pyfunc`` flavour of a registered calibration (``tracking/registry.py``), as a model from code:
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(batch_table)`` returns the step time (µs) of each
row of a step / batch table (rooflab's step-table columns: ``model``, ``tp``, ``hardware``, ``prefill_reqs``,
``prefill_tokens``, ``prefill_context``, ``decode_reqs``, ``decode_context``, …; docs/spec.md §2), predicted with
the version's point-estimate coefficients. The coefficient set itself (with its posterior) is the model's
``coefficients`` artifact."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class StepTimeModel(PythonModel):
    """Step time (µs) of batch rows under a registered coefficient set."""

    def load_context(self, context: Any) -> None:
        from rooflab.model.coefficients import load_coefficients

        self.coefficients = load_coefficients(context.artifacts["coefficients"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.Series:
        from rooflab.model.features import featurize
        from rooflab.model.variants import get_variant

        c = self.coefficients
        v = get_variant(c.variant)
        feats = featurize(pd.DataFrame(model_input), c.formulas)
        beta = np.array([c.beta.get(n, 0.0) for n in v.names])
        return pd.Series(v.predict(feats, beta), name="step_time_us")


mlflow.models.set_model(StepTimeModel())
