"""rooflab — active-learning calibration of corrected-roofline step-time models for vLLM serving.

The domain core: no Prefect or MLflow imports here (those live in ``tasks/`` and ``flows/``).
"""

__version__ = "0.1.0"
