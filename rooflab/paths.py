"""Where rooflab finds its shipped files and the shared data beside the repository: one place for every path.

``ROOFLAB_CONFIGS``, ``ROOFLAB_WORKLOADS`` and ``ROOFLAB_SHARED`` override the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = Path(os.environ.get("ROOFLAB_CONFIGS", REPO_ROOT / "configs"))
WORKLOADS_DIR = Path(os.environ.get("ROOFLAB_WORKLOADS", REPO_ROOT / "workloads"))
# ../shared beside the project root: the real H100 data and the sim-to-real kit
SHARED_DIR = Path(os.environ.get("ROOFLAB_SHARED", REPO_ROOT.parent / "shared"))
REAL_DATA_DIR = SHARED_DIR / "data" / "real"
S2R_DIR = SHARED_DIR / "data" / "s2r"
