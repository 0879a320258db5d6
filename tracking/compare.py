"""Campaigns side by side, from MLflow: one row per (campaign, iteration) with β and its interval, MAPE,
GPU-hours and the stop reason (``rooflab compare``)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from rooflab.errors import InputError
from tracking.campaign_runs import _parents
from tracking.store import (
    EXPERIMENT_PREFIX,
    HEALTH,
    ITERATION,
    ROLE,
    STOP_REASON,
    TrackingStore,
    experiment,
    search_all,
)


def _beta_order(name: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"beta(\d+)", name)
    return (0, int(m.group(1)), "") if m else (1, 0, name)


def compare(ts: TrackingStore, campaigns: list[str] | None = None) -> pd.DataFrame:
    """One row per (campaign, iteration): β values and intervals, MAPE, cumulative GPU-hours, stop
    reason. ``campaigns`` None = every ``rooflab/…`` experiment of the store."""
    c = ts.client
    if campaigns:
        exps = []
        for name in campaigns:
            exp = experiment(ts, name, create=False)
            if exp is None or exp.lifecycle_stage == "deleted":
                known = [e.name[len(EXPERIMENT_PREFIX):] for e in c.search_experiments(
                    filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'")]
                raise InputError(None, "campaign", f"no campaign {name!r} in {c.tracking_uri} "
                                                   f"(known: {', '.join(sorted(known)) or 'none'})")
            exps.append(exp)
    else:
        exps = list(c.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'"))
    rows, betas = [], set()
    for exp in exps:
        campaign = exp.name[len(EXPERIMENT_PREFIX):]
        parents = {r.info.run_id: r for r in _parents(ts, exp.experiment_id)}
        children = search_all(ts, [exp.experiment_id], f"tags.`{ROLE}` = 'iteration'")
        last = {}
        for r in children:
            if r.info.status == "FINISHED" and r.data.tags.get(ITERATION) is not None:
                pid = r.data.tags.get("mlflow.parentRunId")
                last[pid] = max(last.get(pid, -1), int(r.data.tags[ITERATION]))
        for r in children:
            t, m = r.data.tags, r.data.metrics
            if t.get(ITERATION) is None or r.info.status != "FINISHED":
                continue
            it = int(t[ITERATION])
            pid = t.get("mlflow.parentRunId")
            stop = t.get(STOP_REASON, "")
            parent = parents.get(pid)
            if not stop and parent is not None and it == last.get(pid):
                stop = parent.data.tags.get(STOP_REASON, "")
            row = {"campaign": campaign, "iteration": it, "run_id": r.info.run_id}
            for k, v in m.items():
                if re.fullmatch(r"beta\w*", k):
                    betas.add(k)
                    row[k] = v
                    row[f"{k}.lower"] = m.get(f"{k}.lower", np.nan)
                    row[f"{k}.upper"] = m.get(f"{k}.upper", np.nan)
            row.update({"mape.train": m.get("mape.train", np.nan), "mape.validation": m.get("mape.validation", np.nan),
                        "gpu_hours": m.get("gpu_hours", np.nan), "n_picks": m.get("n_picks", np.nan),
                        "hotspots": m.get("hotspots", np.nan), "health": t.get(HEALTH, ""), "stop_reason": stop,
                        "campaign_status": parent.info.status if parent is not None else ""})
            rows.append(row)
    bcols = []
    for b in sorted(betas, key=_beta_order):
        bcols += [b, f"{b}.lower", f"{b}.upper"]
    cols = ["campaign", "iteration", "run_id", *bcols, "mape.train", "mape.validation", "gpu_hours", "n_picks",
            "hotspots", "health", "stop_reason", "campaign_status"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["campaign", "iteration"], ignore_index=True)
