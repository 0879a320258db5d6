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
    failed = [m for m in st.manifests() if m["campaign"] == camp.name and m["status"] == "failed"]
    for m in failed[:10]:
        print(f"failed: {m['run_id']} {m['point']['family']} {m['model']} tp{m['tp']}: {m['reason']}")
    print(f"collected {prog.done}, already complete {prog.skipped}, failed {prog.failed}; "
          f"store holds {st.gpu_seconds(campaign=camp.name) / 3600:.3f} GPU-hours for {camp.name}")
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
):
    """Run the active-learning campaign (Prefect flow, MLflow tracking) until the stop rule. Resumable. The loop
    settings come from the campaign's `loop:` section; a flag overrides one for this run."""
    from rooflab.collect.spec import load_campaign

    overrides = {k: v for k, v in {"batch_size": batch_size, "max_iterations": max_iterations, "variant": variant,
                                   "n_boot": boot, "targeting": targeting, "replay_stop": replay_stop}.items()
                 if v is not None}
    camp = load_campaign(campaign).with_loop(**overrides)  # one-line errors before anything starts
    check_writable_folder(store, "--store")
    check_writable_folder(mlruns, "--mlruns")

    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.campaign import campaign_flow
    from tracking.compare import compare as compare_campaigns
    from tracking.store import open_tracking

    print(f"campaign {camp.name}: " + ", ".join(f"{k} {v}" for k, v in camp.loop.model_dump().items())
          + (f" (overridden: {', '.join(sorted(overrides))})" if overrides else ""))
    result = campaign_flow(campaign=campaign, store=str(store), mlruns=str(mlruns),
                           launcher="direct" if fast else "inference-perf", overrides=overrides)
    print()
    print(f"campaign {result['campaign']}: {result['iterations']} iterations, "
          f"{result['gpu_hours']:.3f} GPU-hours, stopped: {result['stop_reason']}")
    ts = open_tracking(mlruns)
    table = compare_campaigns(ts, [result["campaign"]])
    if len(table):
        print(compare_table(table))
    print()
    print(f"open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {ts.uri} --port 5000")
    print(f"compare campaigns:   .venv/bin/rooflab compare {result['campaign']}")


@app.command("serve")
def serve_cmd(
    campaign: str = typer.Option("demo", help="campaign config whose schedule and triggers to serve"),
    store: Path = typer.Option(Path("store")),
    mlruns: Path = typer.Option(Path("mlruns")),
    launcher: str = typer.Option("inference-perf"),
):
    """Serve the deployments: the scheduled campaign (cron from the config), the refit on
    rooflab.data.arrived and the new-model trigger. Needs a Prefect server (`prefect server start`)."""
    from rooflab.collect.spec import load_campaign

    camp = load_campaign(campaign)
    check_writable_folder(store, "--store")
    check_writable_folder(mlruns, "--mlruns")
    from flows.deployments import build_deployments, next_fire_times, serve_all

    for d in build_deployments(campaign, store=str(store), mlruns=str(mlruns), launcher=launcher):
        print(f"deployment {d.name}")
    if camp.schedule:
        print("next scheduled runs: " + ", ".join(t.isoformat() for t in next_fire_times(camp.schedule)))
    serve_all(campaign, store=str(store), mlruns=str(mlruns), launcher=launcher)


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
    campaigns: list[str] | None = typer.Argument(None, help="campaign names (default: all in the store)"),
    mlruns: Path = typer.Option(Path("mlruns"), "--mlruns", help="the MLflow store folder (holds mlflow.db)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON records instead of a table"),
):
    """Compare campaigns tracked in MLflow: β with intervals, validation MAPE, GPU-hours, stop reason per
    iteration."""
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
