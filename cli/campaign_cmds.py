"""``rooflab collect``, ``campaign``, ``serve`` and ``compare``: collecting a design's sweep points into the data
store, the active-learning campaign (Prefect flow, MLflow tracking), serving its deployments, and comparing
tracked campaigns.

Every flag is checked before anything starts — bounds (the campaign spec's own, ``rooflab.collect.spec``), the
loop overrides (the campaign spec's ``with_loop``), and the ``--store`` / ``--mlruns`` folders (not a file,
writable) — so a bad one is one ``error:`` line, exit status 2, and nothing written.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

from cli.app import app, check_range, check_writable_folder
from rooflab.errors import InputError
from rooflab.files import json_dumps

# the campaign spec's bounds (rooflab.collect.spec: Campaign.replicates, Collection.concurrency / max_retries)
REPLICATES = (1, 100)
CONCURRENCY = (1, 256)
MAX_RETRIES = (0, 20)


@app.command()
def collect(
    campaign: str = typer.Option(..., help="campaign config (path, or a name under configs/campaigns)"),
    design: str = typer.Option("static99", help="a design of the campaign (static99, candidates, or one it names) "
                                                "or a YAML/JSON file with a list of points"),
    store: Path = typer.Option(Path("store"), help="the data store folder"),
    launcher: str = typer.Option("inference-perf", help="inference-perf (real client against the campaign's "
                                                        "endpoint) | direct (twin fast mode, no HTTP)"),
    replicates: int | None = typer.Option(None, help="override the campaign's replicates (1-100)"),
    concurrency: int | None = typer.Option(None, help="override collection.concurrency (1-256)"),
    max_retries: int | None = typer.Option(None, help="override collection.max_retries (0-20)"),
    limit: int | None = typer.Option(None, help="only the first N points of the design (N >= 1)"),
    direct_traces: bool = typer.Option(False, help="direct launcher: also write OTEL traces (slower)"),
):
    """Run a design's sweep points into the data store. Resumable: run the same command again."""
    check_range(replicates, "--replicates", *REPLICATES)
    check_range(concurrency, "--concurrency", *CONCURRENCY)
    check_range(max_retries, "--max-retries", *MAX_RETRIES)
    check_range(limit, "--limit", 1)
    check_writable_folder(store, "--store")

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from rooflab.collect.collector import collect as run_collect
    from rooflab.collect.launchers.factory import close_launcher, make_launcher
    from rooflab.collect.spec import load_campaign
    from rooflab.data.store import Store

    camp = load_campaign(campaign)
    points = _design_points(camp, design)
    if limit is not None:
        points = points[:limit]
    st = Store(store)
    lau = make_launcher(camp, launcher, st.root, direct_traces=direct_traces)
    reps = camp.replicates if replicates is None else replicates
    total = len(points) * reps
    print(f"campaign {camp.name}: design {design}, {len(points)} points x {reps} replicate(s) = {total} runs, "
          f"store {st.root}, launcher {launcher}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("runs", total=total)

        def show(p):
            bar.update(task, completed=p.done + p.skipped + p.failed,
                       description=f"done {p.done} (+{p.skipped} already) failed {p.failed} remaining {p.remaining} "
                                   f"GPU-h {p.gpu_seconds / 3600:.3f}")
        try:
            prog = run_collect(st, lau, camp.name, points, replicates=reps,
                               concurrency=camp.collection.concurrency if concurrency is None else concurrency,
                               max_retries=camp.collection.max_retries if max_retries is None else max_retries,
                               on_progress=show)
        finally:
            close_launcher(lau)
    for line in prog.warnings:  # stale leases taken over, damaged runs quarantined
        print(f"warning: {line}")
    failed = [m for m in st.manifests() if m["campaign"] == camp.name and m["status"] == "failed"]
    for m in failed[:10]:
        print(f"failed: {m['run_id']} {m['point']['family']} {m['model']} tp{m['tp']}: {m['reason']}")
    for line in prog.leased[:10]:
        print(f"skipped: {line}")
    print(f"collected {prog.done}, already complete {prog.skipped}, failed {prog.failed}"
          + (f", {len(prog.leased)} held by another process (run this again when it is done)" if prog.leased else "")
          + f"; store holds {st.gpu_seconds(campaign=camp.name) / 3600:.3f} GPU-hours for {camp.name}")
    if prog.failed:
        raise typer.Exit(1)


@app.command("campaign")
def campaign_cmd(
    campaign: str = typer.Option("demo", help="campaign config (path, or a name under configs/campaigns)"),
    store: Path = typer.Option(Path("store"), help="the data store folder"),
    mlruns: Path = typer.Option(Path("mlruns"), help="the MLflow store folder (SQLite + artifacts)"),
    fast: bool = typer.Option(False, "--fast", help="direct launcher (twin fast mode) instead of inference-perf"),
    batch_size: int | None = typer.Option(None, help="override loop.batch_size (sweep points per iteration)"),
    max_iterations: int | None = typer.Option(None, help="override loop.max_iterations (bootstrap = iteration 0)"),
    variant: str | None = typer.Option(None, help="override loop.variant (the model variant to fit)"),
    boot: int | None = typer.Option(None, help="override loop.n_boot (bootstrap draws per fit)"),
    targeting: str | None = typer.Option(None, help="override loop.targeting: d-optimal | menu | random"),
    replay_stop: bool | None = typer.Option(None, "--replay-stop/--no-replay-stop",
                                               help="override loop.replay_stop: the stop rule also requires the "
                                                    "held-out request-level replay error within its targets"),
    accept_changed_inputs: bool = typer.Option(False, help="go on when a completed iteration's fitted runs changed "
                                                           "(deleted, quarantined, re-collected): new iterations fit "
                                                           "the data the store holds now, and the change is recorded"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="log to this MLflow tracking server "
                                            "(http://host:5000) instead of --mlruns"),
    pool: str | None = typer.Option(None, "--pool", help="run each collection run on this Prefect work pool's workers "
                                    "(rooflab serve deploys rooflab-run/POOL) instead of in this process"),
):
    """Run the active-learning campaign (Prefect flow, MLflow tracking) until the stop rule. Resumable. The loop
    settings come from the campaign's `loop:` section; a flag overrides one for this run."""
    from rooflab.collect.spec import load_campaign

    overrides = {k: v for k, v in {"batch_size": batch_size, "max_iterations": max_iterations, "variant": variant,
                                   "n_boot": boot, "targeting": targeting, "replay_stop": replay_stop}.items()
                 if v is not None}
    camp = load_campaign(campaign).with_loop(**overrides)  # one-line errors before anything starts
    check_writable_folder(store, "--store")
    if tracking_uri is None:
        check_writable_folder(mlruns, "--mlruns")
    else:
        from tracking.store import is_server

        if not is_server(tracking_uri):
            raise InputError(None, "--tracking-uri",
                             f"expected an http(s):// URL of an MLflow server, got {tracking_uri!r}")
    where = tracking_uri or str(mlruns)

    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.campaign import campaign_flow
    from tracking.compare import compare as compare_campaigns
    from tracking.store import open_tracking

    print(f"campaign {camp.name}: " + ", ".join(f"{k} {v}" for k, v in camp.loop.model_dump().items())
          + (f" (overridden: {', '.join(sorted(overrides))})" if overrides else ""))
    from rooflab.data.store import Store

    # the campaign lock before Prefect starts: a second start is refused in one line, at once (the flow takes the
    # same lock again, nested in this process)
    with Store(store).campaign_lock(camp.name):
        result = campaign_flow(campaign=campaign, store=str(store), mlruns=where,
                               launcher="direct" if fast else "inference-perf", overrides=overrides,
                               accept_changed_inputs=accept_changed_inputs, pool=pool)
    print()
    print(f"campaign {result['campaign']}: {result['iterations']} iterations, "
          f"{result['gpu_hours']:.3f} GPU-hours, stopped: {result['stop_reason']}")
    ts = open_tracking(where)
    table = compare_campaigns(ts, [result["campaign"]])
    if len(table):
        print(compare_table(table))
    print()
    if result.get("blis_coefficients"):
        print(f"BLIS coefficients:   {result['blis_coefficients']}  (the last calibration, BLIS defaults.yaml layout)")
        print(f"provenance record:   {result['provenance']}")
        print(f"rooflab coefficients: {result['coefficients']}  (replay with `rooflab replay --coefficients ...`)")
    print(f"open the MLflow UI:  {ts.uri}" if tracking_uri else
          f"open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {ts.uri} --port 5000")
    print(f"compare campaigns:   .venv/bin/rooflab compare {result['campaign']}")


@app.command("serve")
def serve_cmd(
    campaign: str = typer.Option("demo", help="campaign config whose deployments to register (a path the workers can "
                                              "read, or a shipped name)"),
    store: Path = typer.Option(Path("store"), help="the data store: a path every worker sees (shared filesystem)"),
    mlruns: Path = typer.Option(Path("mlruns"), help="the MLflow store folder (one machine)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="an MLflow tracking server "
                                            "(http://host:5000) every worker logs to, instead of --mlruns"),
    launcher: str = typer.Option("inference-perf", help="inference-perf | direct | kubernetes"),
    pool: str = typer.Option("rooflab", help="the Prefect work pool to deploy to (created if missing)"),
    pool_type: str = typer.Option("process", "--pool-type", help="process | kubernetes (prefect-kubernetes' worker; "
                                  "the base job template adds GPU, node-selector and data-store variables)"),
    gpus: list[str] | None = typer.Option(None, "--gpus", help="HARDWARE=N: the cluster has N GPUs of that kind "
                                          "(sets the global concurrency limit gpu:HARDWARE); repeatable"),
    image: str | None = typer.Option(None, help="kubernetes pool: the image of the flow-run pods"),
    namespace: str = typer.Option("rooflab", help="kubernetes pool: the namespace of the flow-run pods"),
    store_claim: str = typer.Option("rooflab-store", help="kubernetes pool: the data store's PersistentVolumeClaim"),
    job_template_out: Path | None = typer.Option(None, help="kubernetes pool: also write the base job template here "
                                                 "(JSON, for `prefect work-pool create --base-job-template`)"),
    local: bool = typer.Option(False, "--local", help="serve the deployments from this process instead (no pool; "
                               "the campaign's runs are tasks of its flow)"),
):
    """Register the campaign's deployments on a work pool — the campaign (on its cron schedule, if any), the refit on
    rooflab.data.arrived, the new-model trigger, and the per-run flow rooflab-run/POOL — so that
    `prefect worker start --pool POOL` on any number of machines executes them, each collection run in its own
    process (or pod), holding TP slots of gpu:HARDWARE. Needs a Prefect server (PREFECT_API_URL)."""
    from rooflab.collect.spec import load_campaign

    camp = load_campaign(campaign)
    hw_gpus = _parse_gpus(gpus or [])
    where = tracking_uri or str(mlruns)
    if tracking_uri is not None:
        from tracking.store import is_server

        if not is_server(tracking_uri):
            raise InputError(None, "--tracking-uri",
                             f"expected an http(s):// URL of an MLflow server, got {tracking_uri!r}")
    else:
        check_writable_folder(mlruns, "--mlruns")
    check_writable_folder(store, "--store")
    from flows.deployments import build_deployments, deploy_to_pool, next_fire_times, serve_all

    if local:
        for d in build_deployments(campaign, store=str(store), mlruns=where, launcher=launcher):
            print(f"deployment {d.name}")
        if camp.schedule:
            print("next scheduled runs: " + ", ".join(t.isoformat() for t in next_fire_times(camp.schedule)))
        serve_all(campaign, store=str(store), mlruns=where, launcher=launcher)
        return
    from flows.gpu_slots import set_gpus
    from flows.work_pool import ensure_pool, kubernetes_job_template

    template = None
    if pool_type == "kubernetes":
        template = kubernetes_job_template(image=image, namespace=namespace, store_claim=store_claim,
                                           store_mount=str(store.absolute()))
        if job_template_out is not None:
            job_template_out.write_text(json_dumps(template))
            print(f"base job template: {job_template_out}")
    print(ensure_pool(pool, pool_type, template))
    for hw, n in hw_gpus.items():
        print(f"global concurrency limit {set_gpus(hw, n)}: {n} slots")
    spec = campaign if not Path(campaign).is_file() else str(Path(campaign).absolute())
    ids = deploy_to_pool(spec, pool, store=str(store.absolute()),
                         mlruns=where if tracking_uri else str(mlruns.absolute()), launcher=launcher,
                         image=image if pool_type == "kubernetes" else None)
    print(f"{len(ids)} deployments on work pool {pool}")
    if camp.schedule:
        print("next scheduled runs: " + ", ".join(t.isoformat() for t in next_fire_times(camp.schedule)))
    print(f"start workers:   prefect worker start --pool {pool}" + (" --type kubernetes" if pool_type == "kubernetes"
                                                                   else ""))
    print(f"run it now:      prefect deployment run 'rooflab-campaign/{camp.name}"
          + ("-scheduled'" if camp.schedule else "'"))


def _parse_gpus(items: list[str]) -> dict[str, int]:
    """``--gpus H100-SXM=16`` → {"H100-SXM": 16}; the hardware must be a shipped datasheet."""
    from rooflab.model.hardware import load_hardware

    out: dict[str, int] = {}
    for item in items:
        hw, _, n = item.partition("=")
        if not hw or not n.strip().isdigit() or int(n) < 1:
            raise InputError(None, "--gpus", f"expected HARDWARE=N with N >= 1, got {item!r}")
        load_hardware(hw)  # a one-line error for an unknown hardware name
        out[hw] = int(n)
    return out


def _design_points(camp, design: str):
    p = Path(design)
    if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
        import yaml

        from rooflab.data.sweep import SweepPoint

        try:
            doc = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            raise InputError(p, None, "malformed YAML/JSON") from None
        if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
            raise InputError(p, None, "expected a list of sweep points")
        try:
            return [SweepPoint.from_dict(d) for d in doc]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(p, str(exc).strip("'"), "bad sweep point") from None
    return camp.design(design)


@app.command()
def compare(
    campaigns: list[str] | None = typer.Argument(None, help="campaign names (default: all in the store); with "
                                                 "--baseline: the campaign whose held-out runs to replay"),
    mlruns: Path = typer.Option(Path("mlruns"), "--mlruns", help="the MLflow store folder (holds mlflow.db)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON records instead of a table"),
    baseline: str | None = typer.Option(None, "--baseline", help="compare two coefficient sets on the same held-out "
                                        "data: the 'before' set — champion | challenger | a version number of the "
                                        "registered model | a coefficients file"),
    candidate: str = typer.Option("challenger", "--candidate", help="--baseline: the 'after' set (same forms)"),
    store: Path = typer.Option(Path("store"), "--store", help="--baseline: the data store whose validation runs "
                               "of the campaign are the held-out data"),
    registered_model: str | None = typer.Option(None, "--registered-model", help="--baseline: the registered "
                                                "model (default: the campaign's scope in --store)"),
    requests: list[str] | None = typer.Option(None, "--requests", help="--baseline: held-out request traces "
                                              "instead of the store's validation runs (as for `rooflab replay`)"),
):
    """Compare campaigns tracked in MLflow: β with intervals, validation MAPE, GPU-hours, stop reason per
    iteration. With --baseline: before/after of two coefficient sets (registered versions or files) replayed on the
    same held-out runs, and the registry's promotion verdict."""
    if baseline is not None:
        _compare_sets(campaigns or [], mlruns, baseline, candidate, store, registered_model, requests, as_json)
        return
    from tracking.compare import compare as compare_campaigns
    from tracking.store import existing_tracking

    df = compare_campaigns(existing_tracking(mlruns), campaigns or None)
    if as_json:
        print(json_dumps(df.to_dict(orient="records")))
        return
    if df.empty:
        print(f"no iterations logged in {mlruns}")
        return
    print(compare_table(df))


def _interval(v, lo, hi) -> str:
    def f(x) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    return f"{f(v)} [{f(lo)}, {f(hi)}]"


def compare_table(df) -> str:
    """Campaign iterations as a compact text table: β with intervals, held-out MAPE, GPU-h, stop reason."""
    betas = [c for c in df.columns if c.startswith("beta") and "." not in c]
    header = ["campaign", "iter", *betas, "val MAPE", "GPU-h", "stop reason"]
    rows = []
    for r in df.to_dict(orient="records"):
        val = r.get("mape.validation")
        rows.append([r["campaign"], str(r["iteration"]),
                     *[_interval(r[b], r[f"{b}.lower"], r[f"{b}.upper"]) for b in betas],
                     "-" if val is None or val != val else f"{val:.2%}",
                     "-" if r["gpu_hours"] != r["gpu_hours"] else f"{r['gpu_hours']:.3f}",
                     (r["stop_reason"] or "")[:90]])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
                     for line in [header, ["-" * w for w in widths], *rows])


def _compare_sets(campaigns: list[str], mlruns: Path, baseline: str, candidate: str, store: Path,
                  registered_model: str | None, requests: list[str] | None, as_json: bool) -> None:
    """``rooflab compare --baseline``: both sets replayed on the same held-out traces, per run and metric the APE
    of the run's mean before and after, and the promotion rule's verdict (:mod:`rooflab.replay.promotion`)."""
    from rooflab.data.store import Store
    from rooflab.data.trace_readers import read_store_trace
    from rooflab.replay.promotion import before_after, decide, heldout_comparisons, run_error
    from tracking.registry import campaign_scope, registered_name, resolve_coefficients
    from tracking.store import existing_tracking

    if len(campaigns) > 1:
        raise InputError(None, "CAMPAIGN", "--baseline compares on one campaign's held-out runs; name at most one")
    campaign = campaigns[0] if campaigns else None
    name = registered_model
    if name is None and campaign is not None and (store / "runs").is_dir():
        name = registered_name(campaign_scope(store, campaign))
    ts = existing_tracking(mlruns) if (mlruns / "mlflow.db").is_file() else None
    before, before_label = resolve_coefficients(ts, name, baseline)
    after, after_label = resolve_coefficients(ts, name, candidate)
    if requests:
        from cli.replay_inputs import load_traces

        traces = [tr for tr, _ in load_traces(requests, root=None, prefix="prompt", model=None, tp=None,
                                              hardware=None, engine={})]
        where = f"{len(traces)} request trace(s)"
    else:
        if campaign is None:
            raise InputError(None, "CAMPAIGN", "--baseline needs the campaign whose validation runs to replay "
                                               "(or --requests)")
        st = Store(store)
        ids = st.runs(campaign=campaign, split="validation")["run_id"].astype(str).tolist()
        if not ids:
            raise InputError(store, "split", f"campaign {campaign} has no complete validation run to compare on")
        traces = [read_store_trace(st, rid) for rid in ids]
        where = f"{len(traces)} validation run(s) of campaign {campaign} in {store}"
    b, c = heldout_comparisons(traces, before), heldout_comparisons(traces, after)
    table = before_after(b, c)
    decision = decide({r: run_error(x) for r, x in b.items()}, {r: run_error(x) for r, x in c.items()})
    if as_json:
        print(json_dumps({"baseline": before_label, "candidate": after_label, "held_out": where,
                          "per_metric": table.to_dict(orient="records"), "decision": decision.to_dict()}))
        return
    print(f"baseline (before): {before_label}")
    print(f"candidate (after): {after_label}")
    print(f"held-out data: {where}")
    print("APE of the run's mean, per run and metric:")

    def pct(v: float) -> str:
        return "-" if v != v else f"{100 * v:.2f}%"

    rows = [[str(r.run), r.metric.upper(), pct(r.baseline), pct(r.candidate),
             "-" if r.difference != r.difference else f"{100 * r.difference:+.2f}"] for r in table.itertuples()]
    header = ["run", "metric", "before", "after", "after − before (points)"]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    print()
    print("under the registry's promotion rule (after = challenger, before = champion):")
    print(decision.markdown().rstrip())
