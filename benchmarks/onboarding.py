"""Onboarding on measured experiments (issue 16; ``rooflab bench onboarding``): pool-based active learning over each
target's real runs, from the sim-to-real benchmark's trainval fit (``rooflab-best`` in
``benchmarks/results/s2r-fits.json``) — targeted (D-optimal per GPU-hour) vs random order (3 seeds) vs all
(leave-one-out), on the sim-to-real kit's eval targets and on the request traces of ``../shared/data/real``. See
:mod:`rooflab.evaluation.onboarding` for the protocol. Prints the per-target table; writes the predictions of record
(``benchmarks/results/s2r-onboarding.csv``, ``real-onboarding.csv``), the curves (``onboarding-curves.csv``,
``onboarding-summary.csv``) and ``docs/onboarding.png`` / ``docs/onboarding-real.png``.

    .venv/bin/python benchmarks/onboarding.py [--workers 2] [--seeds 3] [--prior benchmarks/results/s2r-fits.json]
    .venv/bin/python benchmarks/onboarding.py --replot      # the PNGs again from the written CSVs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rooflab.evaluation.onboarding_report import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="random orders per target")
    ap.add_argument("--prior", type=Path, default=ROOT / "benchmarks" / "results" / "s2r-fits.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "onboarding.png")
    ap.add_argument("--no-real", action="store_true", help="the sim-to-real kit only")
    ap.add_argument("--only", default="", help="comma-separated target names (a shorter check)")
    ap.add_argument("--replot", action="store_true", help="only draw the curves again from --out's CSVs")
    args = ap.parse_args()
    if args.replot:
        from rooflab.evaluation.onboarding_report import replot

        sys.exit(replot(args.out, args.png))
    sys.exit(main(workers=args.workers, prior=args.prior, out=args.out, png=args.png,
                  seeds=tuple(range(1, args.seeds + 1)), real=not args.no_real,
                  only=tuple(x for x in args.only.split(",") if x)))
