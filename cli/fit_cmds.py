"""``rooflab fit``, ``models``, ``hardware`` and ``export``: fitting step-time coefficients to collected steps,
listing the shipped model configs and GPU datasheets, and exporting a fit for simulators (BLIS's YAML or
rooflab's coefficients JSON). A fit records this invocation (:func:`cli.app.invocation`) in its provenance."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cli.app import app, invocation
from rooflab.errors import InputError
from rooflab.files import atomic_write_text, json_dumps
from rooflab.model.variants import DEFAULT_VARIANT, get_variant


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
    variant: str = typer.Option(DEFAULT_VARIANT, help="model variant, e.g. roofline7+layers, *+attn, blis-tp10"),
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
                          command=invocation())
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
    for why in (doc.get("unidentified") or {}).values():  # βs the fit's data could not see
        print(f"warning: {why}: exported as fitted, but do not trust it outside the data it came from",
              file=sys.stderr)
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
    from rooflab.model.provenance import provenance_path, write_provenance

    atomic_write_text(out, text)
    record = write_provenance(doc, provenance_path(out))
    print(f"wrote {out} ({fmt}{', exact BLIS variant' if ex.is_blis_variant(doc) else ''}) and its provenance "
          f"record {record}")


