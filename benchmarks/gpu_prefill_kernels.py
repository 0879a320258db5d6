"""Prefill on a real GPU, kernel by kernel: does attention run at its own efficiency (issue 15's model form)?

Times one decoder layer of Llama-3.1-8B (bf16, random weights: d 4096, 32 heads, 8 KV heads, head 128, SwiGLU
14336) on a chunk of n prompt tokens over c tokens of cached context — the work of one chunked-prefill step of
one request — with PyTorch on CUDA: the GEMMs (QKV, O, gate-up, down), attention (``scaled_dot_product_attention``
with a lower-right causal mask over c + n keys, grouped-query heads) and the whole layer run together. Reports
each part's achieved TFLOP/s. rooflab's `roofline7+layers` prices GEMM and attention FLOPs with one β1; if
attention's efficiency differs from the GEMMs' and moves with n and c, one β1 cannot fit long and short prompts
at once, which is what `roofline7+layers+attn` separates.

This needs a CUDA GPU and PyTorch (not part of rooflab's dependencies); it is run on a lent GPU machine, not in
CI. Writes ``gpu_prefill_kernels.csv`` (one row per (n, c)) to ``--out``; ``benchmarks/results/`` holds the
result of record with the GPU it ran on.

    python3 benchmarks/gpu_prefill_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

D, H, HKV, HD, FFN = 4096, 32, 8, 128, 14336
CHUNKS = (64, 256, 512, 1024, 2048, 4096, 8192)
CONTEXTS = (0, 1024, 4096, 16384, 32768)
MAX_KEYS = 40960


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 2
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    w_qkv = torch.randn(D, (H + 2 * HKV) * HD, device=dev, dtype=dt) * 0.02
    w_o = torch.randn(H * HD, D, device=dev, dtype=dt) * 0.02
    w_gu = torch.randn(D, 2 * FFN, device=dev, dtype=dt) * 0.02
    w_dn = torch.randn(FFN, D, device=dev, dtype=dt) * 0.02

    gqa = {"native": True}

    def sdpa(q, k, v, mask):
        """Grouped-query attention; where no kernel takes the lower-right mask with GQA, the KV heads are
        expanded first (the expansion is then timed too, and the run says so)."""
        if gqa["native"]:
            try:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            except RuntimeError as exc:
                print(f"note: no GQA kernel with a lower-right causal mask ({str(exc).splitlines()[0]}): "
                      "expanding the KV heads", flush=True)
                gqa["native"] = False
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), attn_mask=mask)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3)  # µs
        return statistics.median(times)

    rows = []
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    for n in CHUNKS:
        x = torch.randn(n, D, device=dev, dtype=dt)
        mid = torch.randn(n, FFN, device=dev, dtype=dt)
        ao = torch.randn(n, H * HD, device=dev, dtype=dt)
        for c in CONTEXTS:
            if c + n > MAX_KEYS:
                continue
            q = torch.randn(1, H, n, HD, device=dev, dtype=dt)
            k = torch.randn(1, HKV, c + n, HD, device=dev, dtype=dt)
            v = torch.randn(1, HKV, c + n, HD, device=dev, dtype=dt)
            mask = causal_lower_right(n, c + n)

            def attn(q=q, k=k, v=v, mask=mask):
                return sdpa(q, k, v, mask)

            def gemms(x=x, mid=mid, ao=ao):
                x @ w_qkv
                ao @ w_o
                x @ w_gu
                mid @ w_dn

            def layer(x=x, k=k, v=v, mask=mask, n=n):
                qkv = x @ w_qkv
                qh = qkv[:, : H * HD].view(n, H, HD).transpose(0, 1).unsqueeze(0)
                o = sdpa(qh, k, v, mask)
                h = x + o.squeeze(0).transpose(0, 1).reshape(n, H * HD) @ w_o
                gu = h @ w_gu
                return h + (F.silu(gu[:, :FFN]) * gu[:, FFN:]) @ w_dn

            t_attn, t_gemm, t_layer = timed(attn), timed(gemms), timed(layer)
            pairs = n * c + n * (n + 1) / 2  # causal (query, key) pairs
            f_attn = 4 * H * HD * pairs  # QKᵀ and PV, as rooflab's F_pf_attn counts them
            f_gemm = 2 * n * D * (H + 2 * HKV) * HD + 2 * n * H * HD * D + 6 * n * D * FFN
            rows.append({"gpu": gpu, "chunk": n, "context": c, "attn_pairs": pairs,
                         "attn_us": round(t_attn, 2), "gemm_us": round(t_gemm, 2), "layer_us": round(t_layer, 2),
                         "attn_flops": f_attn, "gemm_flops": f_gemm,
                         "attn_tflops": round(f_attn / t_attn / 1e6, 1),
                         "gemm_tflops": round(f_gemm / t_gemm / 1e6, 1), "gqa_native": gqa["native"]})
            r = rows[-1]
            print(f"n={n:5d} c={c:6d}  attention {r['attn_us']:9.1f} µs {r['attn_tflops']:6.1f} TFLOP/s   "
                  f"GEMMs {r['gemm_us']:8.1f} µs {r['gemm_tflops']:6.1f} TFLOP/s   layer {r['layer_us']:9.1f} µs",
                  flush=True)
    out = Path(args.out) / "gpu_prefill_kernels.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
