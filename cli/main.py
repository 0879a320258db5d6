"""The ``rooflab`` command line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.model.variants import DEFAULT_VARIANT, get_variant

COMMAND = "rooflab"  # this invocation, as a shell would re-run it (recorded in provenance)
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="rooflab: calibrate corrected-roofline step-time models of vLLM serving.")


def _prior(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        v = float(value)
    except ValueError:
        raise InputError(None, "--prior", f"expected 'auto' or a non-negative number, got {value!r}") from None
    if v < 0:
        raise InputError(None, "--prior", "must be non-negative")
    return v


@app.command()
def fit(
    steps: Path = typer.Option(..., "--steps", help="step table or aggregated step records (.parquet/.csv)"),
    requests: Path | None = typer.Option(None, "--requests", help="request table for the α fit"),
    hardware: str = typer.Option("H100-SXM", help="GPU of step-record files (they do not name it)"),
    variant: str = typer.Option(DEFAULT_VARIANT, help="model variant: roofline7 | roofline7+layers"),
    formulas: str | None = typer.Option(None, help="feature formulas: vllm | design for rooflab's variants (default "
                                                    "vllm), blis for BLIS's (its only one)"),
    prior: str = typer.Option("auto", help="prior strength λ, or 'auto' (leave-one-run-out choice)"),
    boot: int = typer.Option(200, help="bootstrap draws"),
    seed: int = typer.Option(0),
    plots: Path | None = typer.Option(None, help="folder for residual plots (PNG)"),
    out: Path | None = typer.Option(None, help="write the full result as JSON to this file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of the text report"),
    evaluate: bool = typer.Option(False, help="also report held-out accuracy (leave-one-model-out, "
                                              "leave-one-run-out) of roofline7 and roofline7+layers under "
                                              "both feature formulas"),
):
    """Fit β (and α) to collected steps, check their health, and diagnose the residuals."""
    from rooflab.data.adapters import read_requests, read_steps
    from rooflab.fit.calibration import Options, calibrate
    from rooflab.fit.report import render, render_evaluation
    from rooflab.model.features import FORMULAS

    get_variant(variant)
    if formulas is not None and formulas not in FORMULAS:
        raise InputError(None, "--formulas", f"unknown formulas {formulas!r} (known: {', '.join(FORMULAS)})")
    options = Options(variant=variant, formulas=formulas, prior_strength=_prior(prior), n_boot=boot, seed=seed)
    table = read_steps(steps, hardware=hardware)
    req = read_requests(requests) if requests else None
    result = calibrate(table, req, options, plots_dir=plots)
    from rooflab.model.provenance import file_source, with_provenance

    doc = result.to_dict()
    doc["source"] = {"steps": str(steps), "requests": str(requests) if requests else None}
    doc = with_provenance(doc, sources=[file_source(steps)] + ([file_source(requests)] if requests else []),
                          command=COMMAND)
    evaluation = None
    if evaluate:
        from rooflab.fit.crossval import evaluate as run_evaluation

        evaluation = run_evaluation(table, options)
        doc["evaluation"] = evaluation.to_dict(orient="records")
    if out:
        atomic_write_text(out, json_dumps(doc))
    if as_json:
        print(json_dumps(doc))
        return
    print(render(result))
    if evaluation is not None:
        print()
        print("held-out step-time accuracy (whole runs / whole models held out; "
              "λ chosen by leave-one-run-out on the training runs)")
        print(render_evaluation(evaluation))


@app.command()
def models():
    """List the shipped model configs and their architecture."""
    from rooflab.model.arch import list_models, load_model

    for name in list_models():
        a = load_model(name)
        kind = ("MLA+" if a.mla else "") + (f"MoE {a.n_experts}x top-{a.experts_per_token}" if a.is_moe else "dense")
        print(f"{name:28s} L={a.n_layers:<3d} d={a.hidden:<5d} H={a.n_heads:<3d} H_kv={a.n_kv_heads:<3d} "
              f"{kind:22s} {'fp8' if a.fp8_weights else 'bf16'}")


@app.command("hardware")
def hardware_list():
    """List the shipped GPU datasheets."""
    from rooflab.model.hardware import list_hardware, load_hardware

    for name in list_hardware():
        h = load_hardware(name)
        fp8 = f"{h.peak_tflops_fp8:g}" if h.peak_tflops_fp8 else "-"
        print(f"{name:10s} bf16 {h.peak_tflops_bf16:g} TFLOP/s  fp8 {fp8} TFLOP/s  HBM {h.hbm_tb_s:g} TB/s  "
              f"link {h.nvlink_gb_s_per_direction:g} GB/s/dir  {h.memory_gb:g} GB")


@app.command()
def collect(
    campaign: str = typer.Option(..., help="campaign config (path, or a name under configs/campaigns)"),
    design: str = typer.Option("static99", help="a design of the campaign (static99, candidates, or one it names) "
                                                "or a YAML/JSON file with a list of points"),
    store: Path = typer.Option(Path("store"), help="the data store folder"),
    launcher: str = typer.Option("inference-perf", help="inference-perf (real client against the campaign's "
                                                        "endpoint) | direct (twin fast mode, no HTTP)"),
    replicates: int | None = typer.Option(None, help="override the campaign's replicates"),
    concurrency: int | None = typer.Option(None, help="override collection.concurrency"),
    max_retries: int | None = typer.Option(None, help="override collection.max_retries"),
    limit: int | None = typer.Option(None, help="only the first N points of the design"),
    direct_traces: bool = typer.Option(False, help="direct launcher: also write OTEL traces (slower)"),
):
    """Run a design's sweep points into the data store. Resumable: run the same command again."""
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
    reps = replicates or camp.replicates
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
                               concurrency=concurrency or camp.collection.concurrency,
                               max_retries=max_retries or camp.collection.max_retries, on_progress=show)
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
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.campaign import campaign_flow
    from rooflab.collect.spec import load_campaign
    from tracking.compare import compare as compare_campaigns
    from tracking.store import open_tracking

    overrides = {k: v for k, v in {"batch_size": batch_size, "max_iterations": max_iterations, "variant": variant,
                                   "n_boot": boot, "targeting": targeting, "replay_stop": replay_stop}.items()
                 if v is not None}
    camp = load_campaign(campaign).with_loop(**overrides)  # one-line errors before anything starts
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
    from flows.deployments import build_deployments, next_fire_times, serve_all
    from rooflab.collect.spec import load_campaign

    camp = load_campaign(campaign)
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


def _interval(v, lo, hi) -> str:
    import math

    def f(x) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    return f"{f(v)} [{f(lo)}, {f(hi)}]"


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


@app.command()
def export(
    fit_file: Path = typer.Option(..., "--fit", help="a fit result: the JSON that `rooflab fit --out` writes"),
    fmt: str = typer.Option("json", "--format", help="blis (BLIS defaults.yaml layout) | json (rooflab coefficients)"),
    out: Path | None = typer.Option(None, "--out", help="output file (default: print)"),
    hardware: str | None = typer.Option(None, help="GPU the steps came from (recorded as context; a fit "
                                                      "result does not name it)"),
):
    """Export fitted coefficients for simulators: BLIS's trained-physics YAML or rooflab's JSON."""
    from rooflab.model import export as ex

    if fmt not in ("blis", "json"):
        raise InputError(None, "--format", f"expected blis or json, got {fmt!r}")
    doc = ex.load_fit(fit_file)
    if hardware:
        doc = {**doc, "context": {**(doc.get("context") or {}), "hardware": hardware}}
    if fmt == "blis":
        text = ex.blis_yaml(doc)
        if not (doc.get("alpha") or {}).get("fitted"):
            print("warning: α was not fitted (fit without --requests): alpha_coeffs are written as 0",
                  file=sys.stderr)
    else:
        text = json_dumps(ex.to_json(doc)) + "\n"
    if out is None:
        print(text, end="")
        return
    from rooflab.files import atomic_write_text
    from rooflab.model.provenance import provenance_path, write_provenance

    atomic_write_text(out, text)
    record = write_provenance(doc, provenance_path(out))
    print(f"wrote {out} ({fmt}{', exact BLIS variant' if ex.is_blis_variant(doc) else ''}) and its provenance "
          f"record {record}")


def _engine_overrides(max_num_seqs, max_num_batched_tokens, num_gpu_blocks, max_model_len, prefix_caching) -> dict:
    vals = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "num_gpu_blocks": num_gpu_blocks, "max_model_len": max_model_len,
            "enable_prefix_caching": prefix_caching}
    return {k: v for k, v in vals.items() if v is not None}


def _load_traces(requests: list[str], root, prefix, model, tp, hardware, engine: dict, window: str | None):
    from rooflab.data.trace_readers import read_trace

    traces = []
    for spec in requests:
        tr = read_trace(spec, root=root, prefix=prefix, model=model, tp=tp, hardware=hardware, engine=engine or None)
        tr.engine.update(engine)  # explicit settings win over what the trace recorded
        if window:
            try:
                a, b = (float(x) for x in window.split(":"))
            except ValueError:
                raise InputError(None, "--window", f"expected START:END seconds, got {window!r}") from None
            tr = tr.window(a, b)
        traces.append(tr)
    return traces


_REQ_HELP = ("request trace: a real run name (or its request file) under --root, a data store run folder "
             "(store/runs/<id>), an inference-perf per_request_lifecycle_metrics.json, or a request table "
             "(.parquet/.csv; these two need --model/--tp). Repeat for several runs")


@app.command()
def replay(
    coefficients: Path = typer.Option(..., "--coefficients", help="fitted coefficients: `rooflab fit --out` JSON, "
                                      "`rooflab export --format json`, `calibrate-e2e --out`, or a BLIS YAML"),
    requests: list[str] = typer.Option(..., "--requests", help=_REQ_HELP),
    root: Path | None = typer.Option(None, help="real data folder (default ../shared/data/real)"),
    prefix: str = typer.Option("prompt", help="real runs: prefix cache groups prompt | system | none"),
    model: str | None = typer.Option(None), tp: int | None = typer.Option(None),
    hardware: str = typer.Option("H100-SXM"),
    max_num_seqs: int | None = typer.Option(None), max_num_batched_tokens: int | None = typer.Option(None),
    num_gpu_blocks: int | None = typer.Option(None), max_model_len: int | None = typer.Option(None),
    prefix_caching: bool | None = typer.Option(None, "--prefix-caching/--no-prefix-caching"),
    window: str | None = typer.Option(None, help="replay only requests arriving in START:END seconds "
                                                    "(after a 30 s warm-up that is not scored)"),
    no_timeout: bool = typer.Option(False, "--no-timeout", help="never abort requests at the client timeout"),
    plot: Path | None = typer.Option(None, help="predicted-vs-measured plot (PNG)"),
    out: Path | None = typer.Option(None, help="write metrics (JSON) here"),
    per_request: Path | None = typer.Option(None, help="write per-request predictions (.parquet/.csv)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of the table"),
):
    """Replay request traces through the twin's scheduler with the fitted step-time model and α; compare the
    predicted TTFT / ITL / E2E with the measured ones (per run: APE of mean / P90 / P99, per-request APE,
    Pearson r, grade)."""
    from rooflab import replay as rp

    if prefix not in ("prompt", "system", "none"):
        raise InputError(None, "--prefix", f"expected prompt, system or none, got {prefix!r}")
    coefs = rp.load_coefficients(coefficients)
    engine = _engine_overrides(max_num_seqs, max_num_batched_tokens, num_gpu_blocks, max_model_len, prefix_caching)
    traces = _load_traces(requests, root, prefix, model, tp, hardware, engine, window)
    results, frames = {}, {}
    for tr in traces:
        res = rp.replay(tr, coefs, timeout=not no_timeout)
        c = rp.compare(res)
        c["replay"] = {"steps": res.n_steps, "wall_s": round(res.wall_s, 3), "steps_per_s": round(res.steps_per_s),
                       "sim_s": res.sim_time_s, **res.stats}
        if c["measured_failed"] or c["predicted_failed"]:
            c["saturation"] = rp.saturation_report(res)
        results[tr.run_id] = c
        frames[tr.run_id] = res.requests
    doc = {"coefficients": coefs.to_dict(), "runs": results}
    if plot:
        rp.plot_replay(frames, plot)
    if per_request:
        import pandas as pd

        df = pd.concat([f.assign(run_id=k) for k, f in frames.items()], ignore_index=True)
        df["prefix_group"] = df["prefix_group"].astype("string")
        per_request.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(per_request, index=False) if per_request.suffix == ".csv" else df.to_parquet(per_request)
    if out:
        atomic_write_text(out, json_dumps(doc))
    if as_json:
        print(json_dumps(doc))
        return
    for note in coefs.notes:
        print(f"note: {note}")
    print(replay_table(results))


def replay_table(results: dict) -> str:
    def pct(v) -> str:
        return "-" if v is None or v != v else f"{100 * v:.1f}%"

    header = ["run", "metric", "measured mean", "predicted mean", "mean APE", "P90 APE", "P99 APE",
              "per-req MAPE", "r", "grade", "failed meas/pred"]
    rows = []
    for run, c in results.items():
        for m in ("ttft", "itl", "e2e"):
            x = c.get(m) or {}
            if not x.get("n"):
                continue
            rows.append([str(run), m.upper(), f"{x['measured_mean_ms']:.1f} ms", f"{x['predicted_mean_ms']:.1f} ms",
                         pct(x["mean_ape"]), pct(x["p90_ape"]), pct(x["p99_ape"]), pct(x["request_mape"]),
                         f"{x['pearson_r']:.3f}", x["grade"], f"{c['measured_failed']}/{c['predicted_failed']}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                     for r in [header, ["-" * w for w in widths], *rows])


@app.command("calibrate-e2e")
def calibrate_e2e_cmd(
    requests: list[str] = typer.Option(..., "--requests", help="training runs' request traces. " + _REQ_HELP),
    start: str = typer.Option("priors", help="start point: 'priors' or a coefficients file (e.g. a step-level "
                                             "`rooflab fit --out`)"),
    root: Path | None = typer.Option(None, help="real data folder (default ../shared/data/real)"),
    prefix: str = typer.Option("prompt", help="real runs: prefix cache groups prompt | system | none"),
    model: str | None = typer.Option(None), tp: int | None = typer.Option(None),
    hardware: str = typer.Option("H100-SXM"),
    max_num_seqs: int | None = typer.Option(None), max_num_batched_tokens: int | None = typer.Option(None),
    num_gpu_blocks: int | None = typer.Option(None), max_model_len: int | None = typer.Option(None),
    prefix_caching: bool | None = typer.Option(None, "--prefix-caching/--no-prefix-caching"),
    variant: str = typer.Option(DEFAULT_VARIANT, help="model variant: roofline7 | roofline7+layers"),
    prior: float = typer.Option(1e-3, help="prior strength λ toward β1–β5 = 1"),
    iterations: int = typer.Option(4, help="stacked per-request fixed-point iterations"),
    polish: int = typer.Option(12, help="Nelder–Mead replay evaluations after the stacked fit (0: none)"),
    window_s: float = typer.Option(180.0, help="seconds of each run replayed per window during the search (0: all)"),
    windows: int = typer.Option(2, help="windows per run"),
    alpha_only: bool = typer.Option(False, "--alpha-only", help="keep β of --start, fit α only"),
    out: Path | None = typer.Option(None, help="write the coefficients (rooflab coefficients JSON) here"),
    check: bool = typer.Option(True, "--check/--no-check", help="replay the full training runs with the result"),
    as_json: bool = typer.Option(False, "--json"),
):
    """End-to-end calibration: fit β/α from request data only, by minimising the replay error (TTFT and E2E
    APE) of the training runs."""
    from rooflab import replay as rp
    from rooflab.fit.request_level import E2EOptions, calibrate_e2e

    get_variant(variant)
    engine = _engine_overrides(max_num_seqs, max_num_batched_tokens, num_gpu_blocks, max_model_len, prefix_caching)
    traces = _load_traces(requests, root, prefix, model, tp, hardware, engine, None)
    start_c = None if start == "priors" else rp.load_coefficients(start)
    opts = E2EOptions(variant=variant, prior_strength=prior, iterations=iterations, polish_evals=polish,
                      window_s=window_s or None, windows=windows, fit_beta=not alpha_only)
    res = calibrate_e2e(traces, start_c, opts, log=None if as_json else (lambda m: print(m, flush=True)))
    doc = {"coefficients": res.coefficients.to_dict(), "calibration": res.to_dict()}
    if check:
        doc["full_replay"] = {tr.run_id: rp.compare(rp.replay(tr, res.coefficients)) for tr in traces}
    if out:
        atomic_write_text(out, json_dumps(res.coefficients.to_dict()))
    if as_json:
        print(json_dumps(doc))
        return
    c = res.coefficients
    print("β: " + ", ".join(f"{k}={v:.4g}" for k, v in c.beta.items()))
    print(f"α: α0={c.alpha[0]:.4g} µs, α1={c.alpha[1]:.4g} µs, α2={c.alpha[2]:.4g} µs/token")
    print(f"{res.seconds:.0f} s")
    if check:
        print(replay_table(doc["full_replay"]))


@app.command("twin", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def twin(ctx: typer.Context):
    """The twin, a simulated vLLM server: `rooflab twin serve --model M --tp N ...`, `rooflab twin tokenizer`
    (options: `rooflab twin serve --help`)."""
    from rooflab.twin.__main__ import main as twin_main

    raise typer.Exit(twin_main(list(ctx.args)))


def main(argv: list[str] | None = None) -> int:
    global COMMAND
    COMMAND = "rooflab " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        app(args=argv, standalone_mode=False)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
