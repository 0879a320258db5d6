"""The sim-to-real benchmark (``make bench-s2r``, ``rooflab bench s2r``): rooflab beside every simulator of the
kit on its eval experiments (see :mod:`rooflab.evaluation.s2r` for the protocol). Prints the cross-validation,
the side-by-side tables (all eval experiments with measurements, per GPU, the kit's shared subsets), the
parity check of BLIS's coefficients through rooflab, the runtime; writes the predictions of record
(``benchmarks/results/s2r-predictions.csv``: every eval experiment, withheld ones included, for the three
coefficient sets) and a bar chart (``docs/s2r_medians.png``).

    .venv/bin/python benchmarks/s2r.py [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rooflab.evaluation.s2r_report import main  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one candidate per variant family (a shorter check)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    sys.exit(main(workers=args.workers, quick=args.quick, out=args.out, png=ROOT / "docs" / "s2r_medians.png"))
