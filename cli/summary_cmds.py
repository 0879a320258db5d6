"""``rooflab calibrate-summaries``: fit β and α to experiments described by their workload, their engine and the
measured aggregates of an inference-perf summary (per stage mean TTFT and mean E2E), alone or together with
per-request traces, starting from (and held near) any coefficient set — e.g. a step-level ``rooflab fit --out``
on step records, which is how step records join the fit (:mod:`rooflab.fit.summary_level` says how and why).

Experiments are read in the sim-to-real kit's schema (``experiments.json`` with ``model_configs/`` beside it;
``../shared/data/s2r`` by default, docs/s2r.md): the kit itself, or a user's own file written the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from cli.app import app, check_range
from cli.replay_inputs import REQ_HELP, announce, coefficient_warnings, engine_overrides, load_traces
from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.model.variants import get_variant


def _experiments(kit_path: Path, ids: str | None, split: str | None) -> list[Any]:
    from rooflab.data.s2r import load_kit

    root = kit_path.parent if kit_path.is_file() else kit_path
    kit = load_kit(root)
    chosen = kit.split(split) if split else kit.experiments
    if ids:
        chosen = [kit.get(i.strip()) for i in ids.split(",") if i.strip()]
    usable = [e for e in chosen if e.measured is not None]
    for e in chosen:
        if e.measured is None:
            print(f"note: experiment {e.exp_id} has no measurements (withheld or missing): not used", file=sys.stderr)
    return usable


@app.command("calibrate-summaries")
def calibrate_summaries_cmd(
    experiments: Path | None = typer.Option(None, help="experiments in the sim-to-real kit's schema: a folder with "
                                            "experiments.json (and model_configs/) or that file "
                                            "(default ../shared/data/s2r)"),
    ids: str | None = typer.Option(None, help="comma-separated experiment ids to train on (default: all with "
                                   "measurements, or --split)"),
    split: str | None = typer.Option(None, help="train on this split of the file (e.g. trainval)"),
    no_experiments: bool = typer.Option(False, "--no-experiments", help="train on --requests traces only"),
    requests: list[str] = typer.Option([], "--requests", help="also train on these runs' request traces (their "
                                       "measured means per stage). " + REQ_HELP),
    hardware: str | None = typer.Option(None, help="--requests: GPU where the trace does not say"),
    start: str = typer.Option("neutral", help="start point and prior centre: 'neutral' (efficiencies 1, typical "
                              "overheads) or a coefficients file, e.g. `rooflab fit --out` on step records"),
    variant: str = typer.Option("roofline7+layers+attn", help="model variant (with --start neutral)"),
    prior: float = typer.Option(1e-2, help="prior strength λ toward the start point"),
    iterations: int = typer.Option(2, help="anchored replay → solve rounds"),
    whole_run: bool = typer.Option(False, "--whole-run", help="fit each experiment's whole-run means only (BLIS's "
                                   "trainer); default: every stage's means"),
    posterior_draws: int = typer.Option(100, "--posterior-draws", help="whole-experiment bootstrap draws of the "
                                        "result's posterior (stored with the coefficients; 0: none)"),
    out: Path | None = typer.Option(None, help="write the coefficients (rooflab coefficients JSON) here"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Calibrate from run summaries: every training experiment is replayed under its engine, anchored at its
    measured operating point, and the coefficients are solved against its per-stage mean TTFT and E2E."""
    from rooflab import replay as rp
    from rooflab.evaluation.s2r import NEUTRAL, neutral_coefficients, training_target
    from rooflab.fit.summary_level import SummaryOptions, calibrate_from_summaries, trace_target
    from rooflab.paths import S2R_DIR

    check_range(prior, "--prior", 0.0, 1e6)
    check_range(iterations, "--iterations", 1, 20)
    check_range(posterior_draws, "--posterior-draws", 0, 10_000)
    if start == "neutral":
        get_variant(variant)
        if variant not in NEUTRAL:
            raise InputError(None, "--variant", f"no neutral start for {variant!r} (known: {', '.join(NEUTRAL)}); "
                             "give --start a coefficients file")
        start_c = neutral_coefficients(variant)
    else:
        start_c = rp.load_coefficients(start)
        for w in coefficient_warnings(Path(start), start_c):
            print(f"warning: --start: {w}", file=sys.stderr)
    targets = []
    if not no_experiments:
        exps = _experiments(experiments or S2R_DIR, ids, split)
        targets += [training_target(e) for e in exps]
        if not as_json:
            print(f"experiments: {len(exps)} with measured summaries ({', '.join(str(e.exp_id) for e in exps)})")
    if requests:
        loaded = load_traces(requests, root=None, prefix="prompt", model=None, tp=None, hardware=hardware,
                             engine=engine_overrides(None, None, None, None, None, None))
        announce(loaded, as_json)
        targets += [trace_target(tr) for tr, _ in loaded]
    if not targets:
        raise InputError(None, "--experiments", "nothing to train on: no experiment with measurements and no "
                         "--requests")
    if not as_json:
        print(f"assumed: start and prior centre {start_c.source} ({start_c.variant}), λ = {prior:g}, "
              f"{'whole-run' if whole_run else 'per-stage'} means, TTFT and E2E weighted equally per experiment")
    options = SummaryOptions(prior_strength=prior, iterations=iterations, per_stage=not whole_run)
    fit = calibrate_from_summaries(targets, start_c, options,
                                   progress=None if as_json else (lambda m: print(m, flush=True)))
    c = fit.coefficients
    c.source = f"calibrate-summaries on {len(targets)} experiments"
    if posterior_draws:  # what `rooflab replay --interval` draws from
        from rooflab.fit.replay_posterior import summary_posterior

        c.posterior = summary_posterior(targets, c, options, prior=start_c, n_boot=posterior_draws)
    for w in coefficient_warnings(None, c):
        print(f"warning: {w}", file=sys.stderr)
    doc = {"coefficients": c.to_dict(), "history": fit.history, "training": [t.name for t in targets]}
    if out:
        atomic_write_text(out, json_dumps(c.to_dict()))
    if as_json:
        print(json_dumps(doc))
        return
    print("β: " + ", ".join(f"{k}={v:.4g}" for k, v in c.beta.items()))
    print(f"α: α0={c.alpha[0]:.4g} µs, α1={c.alpha[1]:.4g} µs, α2={c.alpha[2]:.4g} µs/token")
    if out:
        print(f"wrote {out}")
