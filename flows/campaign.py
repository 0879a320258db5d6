"""The campaign flow: bootstrap → collect → calibrate → diagnose → target → collect → … until the stop rule.

Resumable by construction: each iteration's plan (its sweep points) is saved in the data store before
it runs and marked complete after it is logged; collection skips complete runs; MLflow logging skips
logged iterations; calibration is deterministic given the data. Killing the flow anywhere and starting
it again continues where it was, with no run collected twice and no iteration logged twice.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from rooflab.collect.spec import load_campaign
from rooflab.data.store import Store
from rooflab.data.sweep import SweepPoint
from tasks.analyze import (
    calibrate_from_store,
    decide_stop,
    heldout_replay_error,
    pick_next,
)
from tasks.launch import launch_point
from tracking import campaign_runs as track


def collected_keys(store: Store, campaign: str) -> set[str]:
    """Points with a manifest in this campaign (failed ones too: never picked again)."""
    return {SweepPoint.from_dict(m["point"]).key for m in store.manifests() if m["campaign"] == campaign}


def collect_points(store: Store, launcher, campaign: str, points: list[SweepPoint], *, concurrency: int,
                   max_retries: int, replicates: int = 1) -> list[dict]:
    """Run points as Prefect tasks, at most ``concurrency`` at a time."""
    jobs = [(p, r) for p in points for r in range(replicates)]
    manifests = []
    for i in range(0, len(jobs), max(1, concurrency)):
        wave = [launch_point.submit(str(store.root), launcher, campaign, p, r, max_retries)
                for p, r in jobs[i:i + concurrency]]
        for fut in wave:
            try:
                manifests.append(fut.result())
            except Exception as exc:  # retries exhausted on a transient error: recorded in the store
                print(f"  run failed after retries: {exc}")
    return manifests


def _beta_line(calib) -> str:
    b = calib.beta
    return " ".join(f"{n}={v:.3g}" for n, v in zip(b.names, b.beta))


@flow(name="rooflab-campaign", log_prints=True)
def campaign_flow(campaign: str = "demo", store: str = "store", mlruns: str = "mlruns",
                  launcher: str = "inference-perf", batch_size: int = 6, max_iterations: int = 4,
                  variant: str = "roofline7+layers", formulas: str = "vllm", n_boot: int = 100,
                  targeting: str = "d-optimal", replay_stop: bool = False) -> dict:
    from rooflab.collect.launchers.factory import close_launcher, make_launcher
    from rooflab.targeting.stop import StopDecision

    camp = load_campaign(campaign)
    st = Store(store)
    lau = make_launcher(camp, launcher, st.root)
    client = track.client(Path(mlruns))
    parent = track.start_campaign(client, camp.name, params={
        "campaign": camp.name, "launcher": launcher, "batch_size": batch_size, "max_iterations": max_iterations,
        "variant": variant, "formulas": formulas, "budget_gpu_hours": camp.budget_gpu_hours, "targeting": targeting, "replay_stop": replay_stop,
        "combos": ", ".join(f"{c.model}/tp{c.tp}" for c in camp.combos)})
    options = {"variant": variant, "formulas": formulas, "n_boot": n_boot}
    budget_s = camp.budget_gpu_hours * 3600 if camp.budget_gpu_hours else None
    artifacts_root = Path(mlruns) / "work" / camp.name

    plans = {p["iteration"]: p for p in st.iterations(camp.name)}
    if 0 not in plans:
        picks = pick_next(None, camp, collected_keys(st, camp.name), batch_size, budget_s, 0, targeting=targeting,
                          store_root=str(st.root), options=options)
        st.save_iteration(camp.name, 0, {"points": [p.to_dict() for p in picks], "complete": False})
        plans = {p["iteration"]: p for p in st.iterations(camp.name)}
    it = min((i for i, p in plans.items() if not p.get("complete")), default=max(plans) + 1)
    stop = None
    calib = None
    try:
        while it in plans and not plans[it].get("complete"):
            points = [SweepPoint.from_dict(p["point"]) for p in plans[it]["points"]]
            print(f"iteration {it}: collecting {len(points)} runs")
            manifests = collect_points(st, lau, camp.name, points, concurrency=camp.collection.concurrency,
                                       max_retries=camp.collection.max_retries, replicates=camp.replicates)
            failed = sum(m["status"] == "failed" for m in manifests)
            if st.runs(campaign=camp.name, statuses=("ok",)).empty:
                from rooflab.errors import InputError

                reasons = sorted({m["reason"] for m in manifests if m["status"] == "failed"})
                raise InputError(None, "campaign", f"{camp.name}: no unsaturated run has completed, nothing to "
                                 f"calibrate ({failed} failed: {'; '.join(reasons)[:300]})")
            spent = st.gpu_seconds(campaign=camp.name)
            calib = calibrate_from_store(str(st.root), camp.name, options, str(artifacts_root / f"iter-{it}" / "plots"))
            replay = heldout_replay_error(str(st.root), camp.name, calib) if replay_stop else None
            stop = decide_stop(calib, camp, gpu_seconds_spent=spent, budget_gpu_seconds=budget_s,
                               iterations_done=it + 1, max_iterations=max_iterations, replay=replay)
            nxt = []
            if not stop.stop:
                left = None if budget_s is None else budget_s - spent
                nxt = pick_next(calib, camp, collected_keys(st, camp.name), batch_size, left, it + 1,
                                targeting=targeting, store_root=str(st.root), options=options)
                if not nxt:
                    stop = StopDecision(True, "no candidate left that fits the budget", stop.criteria)
            track.log_iteration(client, parent, it, calib, picks=[p.to_dict() for p in nxt], gpu_seconds=spent,
                                stop={"stop": stop.stop, "reason": stop.reason}, artifacts_dir=artifacts_root / f"iter-{it}")
            if nxt:
                st.save_iteration(camp.name, it + 1, {"points": [p.to_dict() for p in nxt], "complete": False})
            val = calib.accuracy.get("validation", {}).get("mape")
            st.save_iteration(camp.name, it, {**plans[it], "complete": True, "stop": stop.stop,
                                              "stop_reason": stop.reason, "gpu_seconds": spent,
                                              "train_mape": calib.accuracy.get("train", {}).get("mape"),
                                              "validation_mape": val, "beta": calib.beta.coefficients()})
            print(f"iteration {it}: {len(manifests) - failed} runs ok, {failed} failed; GPU-h {spent / 3600:.3f}"
                  + (f" of {camp.budget_gpu_hours:g}" if camp.budget_gpu_hours else "")
                  + f"; train MAPE {calib.accuracy['train']['mape']:.1%}"
                  + (f", held-out MAPE {val:.1%}" if val is not None else "") + f"; {_beta_line(calib)}")
            print(f"iteration {it}: {'STOP — ' + stop.reason if stop.stop else 'next: ' + str(len(nxt)) + ' points'}")
            for p in nxt:
                print(f"    + {p.point.label()}: {p.reason}")
            plans = {p["iteration"]: p for p in st.iterations(camp.name)}
            it += 1
    finally:
        close_launcher(lau)
    last = st.iterations(camp.name)[-1] if st.iterations(camp.name) else {}
    reason = stop.reason if stop is not None else last.get("stop_reason", "")
    if stop is None or stop.stop:
        track.finish_campaign(client, parent, stop_reason=reason,
                              summary={"iterations": len(st.iterations(camp.name)),
                                       "gpu_hours": st.gpu_seconds(campaign=camp.name) / 3600})
    return {"campaign": camp.name, "iterations": len(st.iterations(camp.name)), "stop_reason": reason,
            "gpu_hours": st.gpu_seconds(campaign=camp.name) / 3600, "parent_run_id": parent}
