"""The data store (docs/spec.md §2, §11): one folder per run, a manifest written last and atomically.

Layout::

    <root>/runs/<run_id>/
        point.json                  the sweep point, campaign and replicate (written first)
        config.yaml                 rendered inference-perf config (inference-perf launcher)
        inference-perf/             inference-perf's own outputs
        logs/                       launcher and server logs
        traces/traces.jsonl         the server's raw OTEL traces for the run's time window
        tables/steps.parquet        step table (rooflab schema)
        tables/requests.parquet     request table
        manifest.json               written LAST: status, cost, checksums, versions, counts

A run is complete only when its manifest says so (status ``ok`` or ``saturated``). A folder without a
manifest is an interrupted run: it is removed and redone. A ``failed`` manifest records the attempt
count and the reason; the collector retries it until ``max_retries``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError
from rooflab.files import atomic_write_bytes, atomic_write_parquet

COMPLETE = ("ok", "saturated")
STATUSES = ("ok", "saturated", "failed")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("rooflab", "inference-perf", "numpy", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class RunDir:
    root: Path
    run_id: str

    @property
    def path(self) -> Path:
        return self.root / "runs" / self.run_id

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


class Store:
    """A folder of runs. Safe against crashes at any point: nothing is complete before its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()  # absolute: launchers run subprocesses in run folders
        (self.root / "runs").mkdir(parents=True, exist_ok=True)

    # --- one run ------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> RunDir:
        return RunDir(self.root, run_id)

    def manifest(self, run_id: str) -> dict | None:
        path = self.run_dir(run_id).manifest_path
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:  # cannot happen with atomic writes, but never trust a disk
            raise InputError(path, None, f"corrupt manifest: {exc.msg} at line {exc.lineno}") from None

    def status(self, run_id: str) -> str | None:
        """'ok' / 'saturated' / 'failed', 'interrupted' (a folder without manifest), or None (never run)."""
        m = self.manifest(run_id)
        if m is not None:
            return m["status"]
        return "interrupted" if self.run_dir(run_id).path.exists() else None

    def begin(self, run_id: str, point: SweepPoint, campaign: str, replicate: int, attempt: int) -> RunDir:
        """Start (or restart) a run: clear any partial or failed attempt, record the point."""
        rd = self.run_dir(run_id)
        if rd.path.exists():
            shutil.rmtree(rd.path)
        rd.path.mkdir(parents=True)
        atomic_write_bytes(rd.path / "point.json", json.dumps(
            {"run_id": run_id, "campaign": campaign, "replicate": replicate, "attempt": attempt,
             "point": point.to_dict()}, indent=1).encode())
        return rd

    def finish(self, rd: RunDir, *, point: SweepPoint, campaign: str, replicate: int, attempt: int, status: str,
               reason: str = "", steps: pd.DataFrame | None = None, requests: pd.DataFrame | None = None,
               gpu_seconds: float = 0.0, launcher: str = "", engine: dict | None = None, started_at: str = "",
               extra: dict | None = None) -> dict:
        """Write the tables, then the manifest (last, atomically). Returns the manifest."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        if steps is not None:
            atomic_write_parquet(rd.path / "tables" / "steps.parquet", steps)
        if requests is not None:
            atomic_write_parquet(rd.path / "tables" / "requests.parquet", requests)
        files = {}
        for f in sorted(rd.path.rglob("*")):
            if f.is_file() and f.name != "manifest.json" and not f.name.endswith(".tmp"):
                files[str(f.relative_to(rd.path))] = sha256(f)
        manifest = {
            "run_id": rd.run_id, "campaign": campaign, "replicate": replicate, "attempt": attempt,
            "status": status, "reason": reason, "point": point.to_dict(),
            "model": point.model, "tp": point.tp, "hardware": point.hardware, "family": point.family,
            "split": point.split, "gpu_seconds": float(gpu_seconds), "launcher": launcher, "engine": engine or {},
            "started_at": started_at, "ended_at": datetime.now(UTC).isoformat(),
            "versions": versions(), "files": files,
            "counts": {"steps": 0 if steps is None else len(steps),
                       "requests": 0 if requests is None else len(requests)},
            **(extra or {}),
        }
        atomic_write_bytes(rd.manifest_path, json.dumps(manifest, indent=1, default=str).encode())
        return manifest

    # --- many runs ----------------------------------------------------------------------------
    def manifests(self) -> list[dict]:
        out = []
        for d in sorted((self.root / "runs").iterdir()):
            if d.is_dir() and (m := self.manifest(d.name)) is not None:
                out.append(m)
        return out

    def runs(self, *, statuses: Collection[str] = COMPLETE, **filters: Any) -> pd.DataFrame:
        """Runs table (one row per manifest), filtered by campaign, model, tp, hardware, family, split."""
        rows = []
        for m in self.manifests():
            if statuses and m["status"] not in statuses:
                continue
            if any(v is not None and m.get(k) not in (v if isinstance(v, (list, tuple, set)) else [v])
                   for k, v in filters.items()):
                continue
            rows.append({k: m.get(k) for k in ("run_id", "campaign", "model", "tp", "hardware", "family", "split",
                                               "status", "reason", "replicate", "attempt", "gpu_seconds", "launcher",
                                               "started_at", "ended_at")}
                        | {"params": json.dumps(m["point"]["params"], sort_keys=True)})
        cols = ["run_id", "campaign", "model", "tp", "hardware", "family", "split", "status", "reason", "replicate",
                "attempt", "gpu_seconds", "launcher", "started_at", "ended_at", "params"]
        return pd.DataFrame(rows, columns=cols)

    def _table(self, name: str, runs: pd.DataFrame, verify: bool) -> pd.DataFrame:
        frames = []
        for r in runs.itertuples():
            run_id = str(r.run_id)
            path = self.root / "runs" / run_id / "tables" / f"{name}.parquet"
            if not path.is_file():
                continue
            if verify:
                m = self.manifest(run_id)
                if m is None:
                    raise InputError(path.parent.parent, None, "manifest.json disappeared while reading the store")
                want = m["files"].get(f"tables/{name}.parquet")
                if want and sha256(path) != want:
                    raise InputError(path, None, "checksum does not match the manifest (file changed after the run)")
            df = pd.read_parquet(path)
            df["run_id"] = run_id
            for col in ("campaign", "model", "tp", "hardware", "family", "split"):
                df[col] = getattr(r, col)
            if "workload" not in df.columns or name == "steps":
                df["workload"] = df["family"]
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def steps(self, *, verify: bool = False, **filters: Any) -> pd.DataFrame:
        """Step tables of the complete runs that match ``filters``, with run metadata columns."""
        return self._table("steps", self.runs(**filters), verify)

    def requests(self, *, verify: bool = False, **filters: Any) -> pd.DataFrame:
        return self._table("requests", self.runs(**filters), verify)

    def gpu_seconds(self, **filters: Any) -> float:
        runs = self.runs(statuses=STATUSES, **filters)
        return float(runs["gpu_seconds"].sum()) if len(runs) else 0.0

    # --- campaign iterations ------------------------------------------------------------------
    def _plans_dir(self, campaign: str) -> Path:
        return self.root / "campaigns" / campaign

    def save_iteration(self, campaign: str, iteration: int, doc: dict) -> None:
        """Record a campaign iteration's plan and outcome (picks, stop decision), atomically."""
        atomic_write_bytes(self._plans_dir(campaign) / f"iteration-{iteration:03d}.json",
                           json.dumps({"iteration": iteration, **doc}, indent=1, default=str).encode())

    def iterations(self, campaign: str) -> list[dict]:
        d = self._plans_dir(campaign)
        return [json.loads(p.read_text()) for p in sorted(d.glob("iteration-*.json"))] if d.is_dir() else []

    def collected_keys(self, campaign: str) -> set[str]:
        """Keys of the points ``campaign`` has a manifest for (failed ones too: never picked again)."""
        return {SweepPoint.from_dict(m["point"]).key for m in self.manifests() if m["campaign"] == campaign}


@dataclass(frozen=True)
class StorePlans:
    """A campaign's iteration plans in the data store (the campaign loop's plan book)."""

    store: Store
    campaign: str

    def plans(self) -> list[dict]:
        return self.store.iterations(self.campaign)

    def save(self, iteration: int, plan: dict) -> None:
        self.store.save_iteration(self.campaign, iteration, plan)


def run_sources(store: Store, run_ids: list[str]) -> list[dict]:
    """Provenance of fitted runs: each run's id and the content hashes of its tables (from its manifest)."""
    out = []
    for rid in run_ids:
        m = store.manifest(rid)
        files = (m or {}).get("files") or {}
        out.append({"kind": "run", "id": rid,
                    "sha256": {k: v for k, v in files.items() if k.startswith("tables/")} or files})
    return out


def engine_scope(store: Store, run_ids: list[str]) -> dict:
    """The serving setup the runs were collected under, from their manifests: engine kinds and vLLM versions
    seen, and the vLLM options of the sweep points (when all runs agree on one)."""
    kinds, versions_seen, options = set(), set(), []
    for rid in run_ids:
        m = store.manifest(rid) or {}
        e = m.get("engine") or {}
        kinds.add(str(e.get("kind", "unknown")))
        if e.get("vllm"):
            versions_seen.add(str(e["vllm"]))
        options.append(json.dumps((m.get("point") or {}).get("engine") or {}, sort_keys=True))
    opts = json.loads(options[0]) if options and len(set(options)) == 1 else None
    return {"engine_kinds": sorted(kinds), "vllm_version": ", ".join(sorted(versions_seen)) or None,
            "engine": opts}
