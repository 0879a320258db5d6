"""MLflow tracking of rooflab campaigns (the app layer: the core never imports MLflow).

store.py          the tracking store (SQLite + artifacts) and the campaign experiments
metrics.py        what one calibration logs: metric and param names, values, batching
campaign_runs.py  the campaign's parent run, one child run per iteration, refits
compare.py        campaigns side by side
registry.py       the model registry of calibrations: versions per scope, champion / challenger, decisions
pyfunc_model.py   the registered calibrations' pyfunc flavour (step time from a batch table)
"""
