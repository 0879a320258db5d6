"""Thin Prefect tasks over rooflab: each wraps one step of the loop (launch a sweep point, calibrate,
target, track) so Prefect can retry, observe and distribute it. The logic stays in ``rooflab``."""
