"""Prefect flows: campaign (the active-learning loop), refit (from the data store), validate (V1 on a
model/TP) and new_model (V1, then a full sweep when V1 MAPE > 10%); deployments in deployments.py."""
