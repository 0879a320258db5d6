"""One β1 or two? Prefill model forms against real GPU kernel times (``benchmarks/gpu_prefill_kernels.py``'s CSV).

Each row of the CSV is one decoder layer of Llama-3.1-8B timed on a chunk of n prompt tokens over c cached
tokens; × the model's 32 layers it stands for the layer work of a prefill-only step. Both model forms get the
same other terms (static weights, a constant per step) and are fitted by relative least squares, as rooflab's
β fit does, and scored leave-one-point-out:

* ``roofline7+layers``: β1 · f_prefill (GEMM and attention FLOPs at one efficiency);
* ``roofline7+layers+attn``: β1 · f_pf_dense + β1_attn · f_pf_attn.

    .venv/bin/python benchmarks/gpu_prefill_model.py [--csv benchmarks/results/gpu-prefill-kernels-h200.csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMS = {"roofline7+layers": ("f_prefill",), "roofline7+layers+attn": ("f_pf_dense", "f_pf_attn")}


def main() -> None:
    from rooflab.model.arch import load_model
    from rooflab.model.features import Setting, compute_features
    from rooflab.model.hardware import load_hardware

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "gpu-prefill-kernels-h200.csv"))
    ap.add_argument("--hardware", default="H200", help="rooflab hardware name of the GPU the CSV was measured on")
    args = ap.parse_args()
    d = pd.read_csv(args.csv)
    arch, hw = load_model("llama-3.1-8b"), load_hardware(args.hardware)
    n, c = d["chunk"].to_numpy(float), d["context"].to_numpy(float)
    zeros = np.zeros(len(d))
    f = compute_features(Setting(arch, hw, 1, "vllm"), {
        "prefill_reqs": np.ones(len(d)), "prefill_tokens": n, "prefill_context": c,
        "prefill_attn_pairs": n * c + n * (n + 1) / 2, "prefill_logits": zeros,
        "decode_reqs": zeros, "decode_context": zeros})
    y = d["layer_us"].to_numpy(float) * arch.n_layers
    print(f"{len(d)} (chunk, context) points on {d['gpu'].iloc[0]}, chunk {int(n.min())}–{int(n.max())}, "
          f"context {int(c.min())}–{int(c.max())}; step time = 32 × measured layer time")
    print(f"measured efficiency: GEMMs {d['gemm_tflops'].median():.0f} TFLOP/s median "
          f"({d['gemm_tflops'].median() / hw.peak_tflops_bf16:.0%} of the {hw.peak_tflops_bf16:g} bf16 peak), "
          f"attention {d['attn_tflops'].min():.0f}–{d['attn_tflops'].max():.0f} TFLOP/s "
          f"(median {d['attn_tflops'].median():.0f})")
    print(f"\n{'variant':24s} {'LOO MAPE':>9s} {'median':>7s} {'max':>6s}  fitted prefill βs")
    for name, cols in FORMS.items():
        X = np.column_stack([f[k] for k in cols] + [np.ones(len(d))])
        Z, t = X / y[:, None], np.ones(len(d))
        errs = []
        for i in range(len(d)):
            m = np.arange(len(d)) != i
            b = np.linalg.lstsq(Z[m], t[m], rcond=None)[0]
            errs.append(abs(X[i] @ b - y[i]) / y[i])
        b = np.linalg.lstsq(Z, t, rcond=None)[0]
        e = np.array(errs)
        betas = ", ".join(f"{k}: {v:.2f}" for k, v in zip(("beta1", "beta1_attn")[:len(cols)], b))
        print(f"{name:24s} {e.mean():9.1%} {np.median(e):7.1%} {e.max():6.1%}  {betas}")


if __name__ == "__main__":
    main()
