"""``rooflab onboard``: onboard a new model / GPU / vLLM version from the fewest real runs
(:mod:`rooflab.campaign.onboard`) — propose the next runs as ready inference-perf configs, ingest their results,
recalibrate around a prior fitted on other setups, report the predicted accuracy with its uncertainty, and stop when
the onboarding stop rule says the setup is calibrated. Resumable across days: everything lives in ``--state``.
Logged to MLflow like a campaign (``tracking/onboard_runs.py``) unless ``--no-mlflow``.

Also ``rooflab bench onboarding`` (the benchmark of record, :mod:`rooflab.evaluation.onboarding_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cli.app import app, check_range, check_writable_folder
from cli.bench_cmds import bench
from rooflab.errors import InputError
from rooflab.paths import REPO_ROOT

DEFAULT_PRIOR = REPO_ROOT / "benchmarks" / "results" / "s2r-fits.json"
onboard_app = typer.Typer(help="Onboard a new model / GPU / vLLM version from the fewest real runs (resumable).")
app.add_typer(onboard_app, name="onboard")


def _tracker(state: Any, mlruns: Path | None) -> tuple[Any, Any]:
    """(on_record callback, finish callback) logging to MLflow under ``mlruns`` (None: no tracking)."""
    if mlruns is None:
        return None, None
    from tracking.onboard_runs import finish_onboarding, log_onboard_iteration, start_onboarding
    from tracking.store import open_tracking

    ts = open_tracking(mlruns)
    parent = start_onboarding(ts, state.campaign.name, params={**state.setup.to_dict(),
                                                                "prior_source": state.prior.source})
    work = Path(mlruns) / "work" / state.campaign.name

    def on_record(rec: Any) -> None:
        log_onboard_iteration(ts, parent, rec, artifacts_dir=work)

    def finish(reason: str, summary: dict[str, Any]) -> None:
        finish_onboarding(ts, parent, stop_reason=reason, summary=summary)
    return on_record, finish


def _print_proposals(plan_json: Path) -> None:
    """One line per proposed run: what it is, what it pins, its predicted cost and latencies, its config."""
    import json

    if not plan_json.is_file():
        return
    plan = json.loads(plan_json.read_text())
    print(f"next runs (iteration {plan['iteration']}), on a server started as:\n    {plan['vllm']}")
    for r in plan.get("runs", []):
        minutes = float(r["predicted_gpu_s"]) / 60
        p = r.get("predicted") or {}
        pred = (f"; predicted mean TTFT {p['ttft_ms']:.0f} ms ±{p['ttft_rel90']:.0%}, E2E {p['e2e_ms']:.0f} ms "
                f"±{p['e2e_rel90']:.0%} (90%)" if p else "")
        print(f"  {r['point']} pins {r['pins'] or 'nothing in particular'}: {minutes:.{0 if minutes >= 10 else 1}f} "
              f"GPU-minutes{pred}\n      inference-perf -c {r['config']}")


def _continue(state_dir: Path, mlruns: Path | None, fast: bool) -> None:
    from rooflab.campaign.onboard import onboard
    from rooflab.campaign.onboard_state import open_state

    state = open_state(state_dir)
    launcher = None
    if fast:
        from rooflab.collect.launchers.direct import DirectLauncher

        launcher = DirectLauncher()
    on_record, finish = _tracker(state, mlruns)
    out = onboard(state, launcher=launcher, on_record=on_record)
    print()
    if out.waiting:
        it = out.iterations
        _print_proposals(state.proposal_dir(it) / "plan.json")
        print(f"waiting for {len(out.waiting)} run(s): see {state.proposal_dir(it) / 'PLAN.md'}")
        print(f"when they are done:  rooflab onboard ingest --state {state_dir} results/<run id>/ ...")
        return
    fits = state.fits()
    last = fits[-1] if fits else {}
    print(f"onboarding {state.campaign.name}: {out.iterations} iteration(s), {out.spend.total_s / 3600:.3f} GPU-hours; "
          f"{'stopped: ' + out.stop_reason if out.stopped else 'not finished'}")
    if last:
        print(f"coefficients: {state.root / 'coefficients.json'} (iteration {last['iteration']}; with predicted "
              f"accuracy: {state.fit_path(int(last['iteration']))})")
    if out.stopped and finish is not None:
        finish(out.stop_reason, {"iterations": out.iterations, "gpu_hours": out.spend.total_s / 3600,
                                 "converged": out.converged})


@onboard_app.callback(invoke_without_command=True)
def onboard_cmd(
    ctx: typer.Context,
    model: str | None = typer.Option(None, help="the model to onboard (configs/models name or alias)"),
    hardware: str | None = typer.Option(None, help="its GPU (configs/hardware name)"),
    tp: int | None = typer.Option(None, help="tensor-parallel degree (>= 1)"),
    vllm_version: str | None = typer.Option(None, help="the vLLM version it runs (recorded; defaults assumed "
                                                       "equal to 0.15.1's otherwise)"),
    budget_gpu_hours: float | None = typer.Option(None, help="GPU budget of the onboarding (> 0; default none)"),
    state: Path = typer.Option(Path("onboard"), help="the onboarding's state folder (created, then resumed)"),
    prior: Path = typer.Option(DEFAULT_PRIOR, help="coefficient sets fitted on other setups (JSON: set -> "
                                                   "coefficients; `rooflab bench s2r` writes it)"),
    prior_set: str = typer.Option("rooflab-best", help="which set of --prior"),
    prior_strength: float | None = typer.Option(None, help="λ of the fit around the prior (> 0; default: the "
                                                           "prior's own, else 0.01)"),
    batch_size: int = typer.Option(2, help="runs proposed per iteration (1-100)"),
    max_iterations: int = typer.Option(8, help="iteration cap (1-1000)"),
    template: str = typer.Option("onboard", help="campaign template: candidate space and vLLM settings"),
    results: list[Path] | None = typer.Option(None, "--results", help="results to ingest before continuing"),
    run: str | None = typer.Option(None, help="the proposed run --results answers (when its path does not say)"),
    base_url: str = typer.Option("http://localhost:8000", help="server URL written into the proposed configs"),
    served_model_name: str | None = typer.Option(None, help="the server's model name (default: --model)"),
    tokenizer: Path | None = typer.Option(None, help="local tokenizer directory for the configs (default: the "
                                                     "twin's; pass the model's for a real server)"),
    mlruns: Path = typer.Option(Path("mlruns"), help="MLflow store folder"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow"),
    fast: bool = typer.Option(False, "--fast", help="collect the proposed runs in place on the twin (direct "
                                                   "launcher) instead of waiting for them"),
) -> None:
    """Start or resume an onboarding: propose runs (inference-perf configs under STATE/proposals/), ingest results,
    recalibrate, report predicted accuracy, stop when calibrated."""
    if ctx.invoked_subcommand is not None:
        return
    check_range(tp, "--tp", 1)
    check_range(batch_size, "--batch-size", 1, 100)
    check_range(max_iterations, "--max-iterations", 1, 1000)
    if budget_gpu_hours is not None and not budget_gpu_hours > 0:
        raise InputError(None, "--budget-gpu-hours", f"must be > 0, got {budget_gpu_hours:g}")
    if prior_strength is not None and not prior_strength > 0:
        raise InputError(None, "--prior-strength", f"must be > 0, got {prior_strength:g}")
    if tokenizer is not None and not tokenizer.is_dir():
        raise InputError(None, "--tokenizer", f"{tokenizer} is not a local directory")
    check_writable_folder(state, "--state")
    if not no_mlflow:
        check_writable_folder(mlruns, "--mlruns")
    from rooflab.campaign.onboard_state import SETUP_FILE, OnboardSetup, create_state, ingest, open_state

    if (state / SETUP_FILE).is_file():
        st = open_state(state)
        for flag, given, have in (("--model", model, st.setup.model), ("--hardware", hardware, st.setup.hardware),
                                  ("--tp", tp, st.setup.tp)):
            if given is not None and given != have:
                raise InputError(state / SETUP_FILE, flag, f"this onboarding is of {have}, not {given}: use another "
                                 "--state")
        print(f"resuming onboarding {st.campaign.name} in {state}")
    else:
        missing = [f for f, v in (("--model", model), ("--hardware", hardware), ("--tp", tp)) if v is None]
        if missing:
            raise InputError(None, missing[0], f"required to start an onboarding ({state} holds none)")
        from rooflab.evaluation.onboarding import load_prior

        coefs, lam = load_prior(prior, prior_set)
        assert model is not None and hardware is not None and tp is not None
        setup = OnboardSetup(model, hardware, tp, vllm_version, budget_gpu_hours, prior_strength or lam, batch_size,
                             max_iterations, template, base_url, served_model_name,
                             str(tokenizer) if tokenizer else None)
        st = create_state(state, setup, coefs)
        print(f"onboarding {st.campaign.name}: prior {coefs.source or prior} (λ={setup.prior_strength:g}), "
              f"{len(st.campaign.candidates())} candidate runs, state in {state}")
    if results:
        for got in ingest(st, list(results), run=run):
            print(f"ingested {got.line()}")
    _continue(state, None if no_mlflow else mlruns, fast)


@onboard_app.command("ingest")
def ingest_cmd(
    results: list[Path] = typer.Argument(..., help="inference-perf outputs, BLIS traces or data-store run folders"),
    state: Path = typer.Option(Path("onboard"), help="the onboarding's state folder"),
    run: str | None = typer.Option(None, help="the proposed run the (single) result answers"),
    mlruns: Path = typer.Option(Path("mlruns"), help="MLflow store folder"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow"),
    stay: bool = typer.Option(False, "--no-continue", help="only ingest; do not recalibrate yet"),
) -> None:
    """Hand results of proposed runs back, then recalibrate and propose what is next (or stop)."""
    from rooflab.campaign.onboard_state import ingest, open_state

    if not no_mlflow:
        check_writable_folder(mlruns, "--mlruns")
    st = open_state(state)
    for got in ingest(st, list(results), run=run):
        print(f"ingested {got.line()}")
    if not stay:
        _continue(state, None if no_mlflow else mlruns, False)


@onboard_app.command("status")
def status_cmd(state: Path = typer.Option(Path("onboard"), help="the onboarding's state folder")) -> None:
    """What the onboarding waits for and what its last fit predicts."""
    from rooflab.campaign.onboard_state import open_state

    st = open_state(state)
    waiting = st.waiting()
    print(f"onboarding {st.campaign.name}: {len(waiting)} run(s) waiting" + (": " + ", ".join(waiting) if waiting
                                                                             else ""))
    fits = st.fits()
    if not fits:
        print("no fit yet")
        return
    last = fits[-1]
    print(f"iteration {last['iteration']}: {last['stop']['reason']}")
    for p in last.get("predicted", []):
        print(f"  {p['point']}: mean TTFT {p['ttft_ms']:.0f} ms ±{p['ttft_rel90']:.1%}, "
              f"E2E {p['e2e_ms']:.0f} ms ±{p['e2e_rel90']:.1%} (90%)")


@bench.command("onboarding")
def bench_onboarding(
    workers: int = typer.Option(2, help="worker processes (one target each)"),
    prior: Path = typer.Option(DEFAULT_PRIOR, help="the sim-to-real benchmark's fits (its rooflab-best set)"),
    out: Path = typer.Option(REPO_ROOT / "benchmarks" / "results", help="folder for the CSVs of record"),
    png: Path = typer.Option(REPO_ROOT / "docs" / "onboarding.png", help="the learning curves"),
    seeds: int = typer.Option(3, help="random orders per target (>= 1)"),
) -> None:
    """Onboarding on measured experiments: targeted vs random vs all, on the sim-to-real kit and the real traces."""
    from rooflab.evaluation.onboarding_report import main

    check_range(workers, "--workers", 1, 64)
    check_range(seeds, "--seeds", 1, 20)
    raise typer.Exit(main(workers=workers, prior=prior, out=out, png=png, seeds=tuple(range(1, seeds + 1))))
