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
        .lease                      while a process works on the run: its owner (pid, host, time, heartbeat)
    <root>/quarantine/<run_id>-<UTC time>/   a run that failed verification, with reason.txt
    <root>/campaigns/<name>/iteration-NNN.json, .lock   a campaign's plans; its lock while it runs
    <root>/.lock                    guard flock of the leases and locks (held for milliseconds)

A run is complete only when its manifest says so (status ``ok`` or ``saturated``). A folder without a
manifest is an interrupted run: it is redone. A ``failed`` manifest records the attempt count and the reason;
the collector retries it until ``max_retries``.

Concurrency: a process works on a run only while it holds the run's **lease** (:meth:`Store.lease`,
:mod:`rooflab.data.locks`): ``begin`` takes it (``O_CREAT|O_EXCL``) and clears the folder only then; a live lease
of another process refuses (:class:`RunLeased`), a stale one (owner dead, heartbeat expired) is taken over. So
several collectors, on one machine or many, can share a store: no run is executed twice at once and no folder
that another live process holds is deleted. A campaign run holds its campaign's lock (:meth:`Store.campaign_lock`).

Verification: :meth:`Store.check_run` checks what a complete run claims (manifest fields, the tables' checksums,
their required columns and row counts); :meth:`Store.verify_campaign` moves the runs that fail into
``quarantine/`` so that nothing unverified enters a calibration.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from rooflab.data.locks import Claim, ClaimHeld, Owner
from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError
from rooflab.files import atomic_write_bytes, atomic_write_parquet

COMPLETE = ("ok", "saturated")
STATUSES = ("ok", "saturated", "failed")
LEASED = "leased"  # the status :func:`rooflab.collect.collector.run_one` reports for a run another process holds
LEASE = ".lease"
# the manifest fields every reader relies on (READ_FIELDS), and all those a collected run has (verification)
READ_FIELDS: dict[str, type | tuple[type, ...]] = {"run_id": str, "campaign": str, "status": str, "point": dict}
MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    **READ_FIELDS, "model": str, "tp": int, "hardware": str, "family": str, "split": str, "attempt": int,
    "gpu_seconds": (int, float), "files": dict}
# the columns a run's stored tables must have for a calibration (the store adds run_id, model, tp, hardware)
TABLE_COLUMNS = {"steps": ("step_id", "step_time_us", "prefill_reqs", "prefill_tokens", "prefill_context",
                           "decode_reqs", "decode_context"),
                 "requests": ("request_id", "prompt_tokens", "output_tokens")}


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


def manifest_problem(doc: Any, run_id: str, *, full: bool = True) -> tuple[str | None, str] | None:
    """(field, problem) when ``doc`` is not a manifest of ``run_id`` — a complete one (``full``: every field the
    collector writes, a sweep point that parses) or a readable one (the fields every reader relies on); None when
    it is."""
    if not isinstance(doc, dict):
        return None, "not a JSON object"
    for name, kind in (MANIFEST_FIELDS if full else READ_FIELDS).items():
        if name not in doc:
            return name, "required manifest field is missing"
        if not isinstance(doc[name], kind) or isinstance(doc[name], bool):
            return name, f"expected {getattr(kind, '__name__', 'a number')}, got {type(doc[name]).__name__}"
    if doc["status"] not in STATUSES:
        return "status", f"unknown status {doc['status']!r} (expected {', '.join(STATUSES)})"
    if not full:
        return None
    if doc["run_id"] != run_id:
        return "run_id", f"{doc['run_id']!r} is not this run's folder ({run_id})"
    try:
        SweepPoint.from_dict(doc["point"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return "point", f"not a sweep point ({type(exc).__name__}: {exc})"
    return None


def fingerprint(manifest: dict) -> str:
    """What a calibration takes from a run: its status and the checksums of its tables (16 hex digits)."""
    files = manifest.get("files") or {}
    key = [manifest.get("status"), files.get("tables/steps.parquet"), files.get("tables/requests.parquet")]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


class RunLeased(ClaimHeld):
    """Another live process holds the run's lease."""


@dataclass
class RunDir:
    root: Path
    run_id: str
    lease: Claim | None = field(default=None, compare=False, repr=False)
    own_lease: bool = field(default=False, compare=False, repr=False)  # taken by begin: finish releases it

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


@dataclass(frozen=True)
class Quarantined:
    run_id: str
    reason: str
    path: Path  # where the run's folder went

    def line(self) -> str:
        return f"run {self.run_id} quarantined to {self.path}: {self.reason}"


@dataclass
class CampaignCheck:
    """:meth:`Store.verify_campaign`'s result."""

    good: dict[str, str] = field(default_factory=dict)  # complete, verified runs: run id -> fingerprint
    quarantined: list[Quarantined] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # failed verification but leased by a live process


class Store:
    """A folder of runs. Safe against crashes at any point: nothing is complete before its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()  # absolute: launchers run subprocesses in run folders
        (self.root / "runs").mkdir(parents=True, exist_ok=True)

    @property
    def guard(self) -> Path:
        return self.root / ".lock"

    # --- one run ------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> RunDir:
        return RunDir(self.root, run_id)

    def _raw_manifest(self, run_id: str, *, full: bool = False) -> tuple[Any, tuple[str | None, str] | None]:
        """(document, problem) of a run's manifest (:func:`manifest_problem`); (None, None) when it has none."""
        path = self.run_dir(run_id).manifest_path
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:  # cannot happen with atomic writes, but never trust a disk
            return None, (None, f"corrupt manifest: {exc.msg} at line {exc.lineno}")
        return doc, manifest_problem(doc, run_id, full=full)

    def manifest(self, run_id: str) -> dict | None:
        """The run's manifest (None if it has none); a one-line :class:`InputError` naming the file and the
        field when it is not a usable manifest."""
        doc, problem = self._raw_manifest(run_id)
        if problem is not None:
            raise InputError(self.run_dir(run_id).manifest_path, problem[0], problem[1])
        return doc

    def status(self, run_id: str) -> str | None:
        """'ok' / 'saturated' / 'failed'; 'running' (no manifest, leased by another live process); 'interrupted'
        (a folder without manifest); or None (never run)."""
        m = self.manifest(run_id)
        if m is not None:
            return str(m["status"])
        rd = self.run_dir(run_id)
        if not rd.path.exists():
            return None
        owner = self.lease_owner(run_id)
        return "running" if owner is not None and not owner.this_process and owner.alive() else "interrupted"

    def lease_owner(self, run_id: str) -> Owner | None:
        from rooflab.data.locks import read_owner

        return read_owner(self.run_dir(run_id).path / LEASE)

    def lease(self, run_id: str) -> Claim:
        """Take the run's lease (``runs/<id>/.lease``) or raise :class:`RunLeased` naming its live owner. A stale
        lease is taken over (``claim.previous``); the lease is refreshed by the process's heartbeat thread until
        released."""
        try:
            return Claim.acquire(self.run_dir(run_id).path / LEASE, self.guard, what=f"run {run_id}")
        except ClaimHeld as exc:
            raise RunLeased(f"run {run_id} is leased by {exc.owner.describe()}", exc.owner) from None

    def begin(self, run_id: str, point: SweepPoint, campaign: str, replicate: int, attempt: int, *,
              lease: Claim | None = None) -> RunDir:
        """Start (or restart) a run under its lease (taken here unless given): clear any partial or failed
        attempt — never a folder another live process holds — and record the point."""
        own = lease is None
        if lease is None:
            lease = self.lease(run_id)
        elif not lease.held():
            raise RunLeased(f"run {run_id}: lease lost to {self.lease_owner(run_id) or 'nobody'}",
                            self.lease_owner(run_id) or lease.owner)
        rd = RunDir(self.root, run_id, lease, own)
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.manifest_path.unlink(missing_ok=True)  # first: a half-cleared folder is never complete
        for child in rd.path.iterdir():
            if child.name.lstrip(".").startswith(LEASE.lstrip(".")):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        atomic_write_bytes(rd.path / "point.json", json.dumps(
            {"run_id": run_id, "campaign": campaign, "replicate": replicate, "attempt": attempt,
             "point": point.to_dict()}, indent=1).encode())
        return rd

    def finish(self, rd: RunDir, *, point: SweepPoint, campaign: str, replicate: int, attempt: int, status: str,
               reason: str = "", steps: pd.DataFrame | None = None, requests: pd.DataFrame | None = None,
               gpu_seconds: float = 0.0, launcher: str = "", engine: dict | None = None, started_at: str = "",
               extra: dict | None = None) -> dict:
        """Write the tables, then the manifest (last, atomically) — only while the run's lease is still this
        process's (:class:`RunLeased` otherwise). Returns the manifest."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        if steps is not None:
            atomic_write_parquet(rd.path / "tables" / "steps.parquet", steps)
        if requests is not None:
            atomic_write_parquet(rd.path / "tables" / "requests.parquet", requests)
        files = {}
        for f in sorted(rd.path.rglob("*")):
            if f.is_file() and f.name != "manifest.json" and not f.name.endswith(".tmp") \
                    and not f.name.lstrip(".").startswith(LEASE.lstrip(".")):
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
        if rd.lease is not None and not rd.lease.held():
            owner = self.lease_owner(rd.run_id)
            raise RunLeased(f"run {rd.run_id}: lease lost to {owner.describe() if owner else 'nobody'} while it ran; "
                            "its result was not recorded", owner or rd.lease.owner)
        atomic_write_bytes(rd.manifest_path, json.dumps(manifest, indent=1, default=str).encode())
        if rd.own_lease and rd.lease is not None:
            rd.lease.release()
        return manifest

    # --- verification -------------------------------------------------------------------------
    def check_run(self, run_id: str) -> str | None:
        """Why the run's manifest, or what a complete run claims about its tables (present, checksum, required
        columns, row count, unique step ids), cannot be trusted — one line; None when it can."""
        import pyarrow.parquet as pq

        doc, problem = self._raw_manifest(run_id, full=True)
        if problem is not None:
            return f"manifest.json: {problem[0] + ': ' if problem[0] else ''}{problem[1]}"
        if doc is None:
            return "manifest.json is missing"
        if doc["status"] not in COMPLETE:
            return None
        files, counts = doc["files"], doc.get("counts") or {}
        for name, required in TABLE_COLUMNS.items():
            rel, n = f"tables/{name}.parquet", counts.get(name)
            path = self.run_dir(run_id).path / rel
            if rel not in files:
                if n:
                    return f"{rel}: not in the manifest's checksums"
                continue
            if not path.is_file():
                return f"{rel}: missing"
            if sha256(path) != files[rel]:
                return f"{rel}: checksum does not match the manifest (changed or truncated after the run)"
            try:
                meta = pq.ParquetFile(path)
                names = set(meta.schema_arrow.names)
                rows = meta.metadata.num_rows
            except Exception as exc:  # pyarrow raises several types for a damaged file
                return f"{rel}: not a readable Parquet file ({type(exc).__name__})"
            missing = [c for c in required if c not in names]
            if missing:
                return f"{rel}: {missing[0]}: required column is missing"
            if isinstance(n, int) and rows != n:
                return f"{rel}: {rows} rows, the manifest counts {n}"
            if name == "steps":
                ids = pq.read_table(path, columns=["step_id"]).column(0).to_pandas()
                if ids.duplicated().any():
                    return f"{rel}: step_id: duplicated step {ids[ids.duplicated()].iloc[0]}"
        return None

    def quarantine(self, run_id: str, reason: str, *, lease: Claim | None = None) -> Quarantined:
        """Move the run's files to ``quarantine/<run_id>-<UTC time>/`` with a ``reason.txt`` (the manifest
        first, so what is left is never complete), under the run's lease (taken here unless given:
        :class:`RunLeased` if another live process holds it)."""
        from rooflab.data.locks import file_lock

        claim = self.lease(run_id) if lease is None else lease
        src = self.run_dir(run_id).path
        try:
            me = Owner.me()
            dest = self.root / "quarantine" / f"{run_id}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
            dest.mkdir(parents=True)
            if (src / "manifest.json").exists():
                (src / "manifest.json").rename(dest / "manifest.json")
            for child in sorted(src.iterdir()):
                if not child.name.lstrip(".").startswith(LEASE.lstrip(".")):
                    child.rename(dest / child.name)
            atomic_write_bytes(dest / "reason.txt", f"{reason}\nquarantined from runs/{run_id} at {me.started_at} "
                                                    f"by pid {me.pid} on host {me.host}\n".encode())
        finally:
            if lease is None:
                claim.release()
                with file_lock(self.guard):  # an empty folder goes too (unless someone leased it meanwhile)
                    try:
                        src.rmdir()
                    except OSError:
                        pass
        return Quarantined(run_id, reason, dest)

    def quarantine_reason(self, run_id: str) -> str | None:
        """The latest quarantine of ``run_id`` as ``quarantine/<folder> (<reason>)``, if any."""
        found = sorted((self.root / "quarantine").glob(f"{run_id}-*/reason.txt"))
        if not found:
            return None
        reason = found[-1].read_text().splitlines()[0] if found[-1].stat().st_size else "?"
        return f"quarantined to {found[-1].parent.relative_to(self.root)} ({reason})"

    def verify_campaign(self, campaign: str, *, quarantine: bool = True) -> CampaignCheck:
        """Check every run of ``campaign`` that has a manifest (:meth:`check_run`); quarantine the ones that fail
        (unless ``quarantine`` is False, or another live process holds them). Returns the verified complete runs
        with their fingerprints."""
        out = CampaignCheck()
        for d in sorted((self.root / "runs").iterdir()):
            if not d.is_dir() or not (d / "manifest.json").exists():
                continue
            doc, _ = self._raw_manifest(d.name)
            if self._campaign_of(d.name, doc) != campaign:
                continue
            problem = self.check_run(d.name)
            if problem is None:
                if doc["status"] in COMPLETE:
                    out.good[d.name] = fingerprint(doc)
                continue
            if not quarantine:
                out.busy.append(f"{d.name}: {problem}")
                continue
            try:
                out.quarantined.append(self.quarantine(d.name, problem))
            except RunLeased as exc:
                out.busy.append(f"{d.name}: {problem} ({exc.problem})")
        return out

    def _campaign_of(self, run_id: str, doc: Any) -> str | None:
        if isinstance(doc, dict) and isinstance(doc.get("campaign"), str):
            return str(doc["campaign"])
        try:  # a damaged manifest: point.json, written first, names the campaign too
            return str(json.loads((self.run_dir(run_id).path / "point.json").read_text())["campaign"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextmanager
    def campaign_lock(self, campaign: str) -> Iterator[Claim]:
        """Hold ``campaigns/<name>/.lock`` for the block; a one-line :class:`InputError` ``campaign X is running
        in pid N on host H since T`` when another live process holds it. A stale lock is taken over
        (``claim.previous`` names its dead owner). Nested use by one process shares the lock."""
        try:
            claim = Claim.acquire(self._plans_dir(campaign) / ".lock", self.guard, what=f"campaign {campaign}",
                                  share=True)
        except ClaimHeld as exc:
            raise InputError(None, None, f"campaign {campaign} is running in {exc.owner.describe()}") from None
        try:
            yield claim
        finally:
            claim.release()

    # --- many runs ----------------------------------------------------------------------------
    def manifests(self, campaign: str | None = None) -> list[dict]:
        """Every run's manifest (of ``campaign``, when given). A damaged manifest of those is a one-line
        :class:`InputError` naming the file and the field."""
        out = []
        for d in sorted((self.root / "runs").iterdir()):
            if not d.is_dir():
                continue
            if campaign is not None:
                if not (d / "manifest.json").exists():
                    continue
                doc, _ = self._raw_manifest(d.name)
                if self._campaign_of(d.name, doc) != campaign:
                    continue
            if (m := self.manifest(d.name)) is not None:
                out.append(m)
        return out

    def runs(self, *, statuses: Collection[str] = COMPLETE, **filters: Any) -> pd.DataFrame:
        """Runs table (one row per manifest), filtered by campaign, model, tp, hardware, family, split, run_id."""
        rows = []
        campaign = filters.get("campaign")
        for m in self.manifests(campaign if isinstance(campaign, str) else None):
            if statuses and m["status"] not in statuses:
                continue
            if any(v is not None and m.get(k) not in (v if isinstance(v, (list, tuple, set)) else [v])
                   for k, v in filters.items()):
                continue
            rows.append({k: m.get(k) for k in ("run_id", "campaign", "model", "tp", "hardware", "family", "split",
                                               "status", "reason", "replicate", "attempt", "gpu_seconds", "launcher",
                                               "started_at", "ended_at")}
                        | {"params": json.dumps(m["point"].get("params", {}), sort_keys=True)})
        cols = ["run_id", "campaign", "model", "tp", "hardware", "family", "split", "status", "reason", "replicate",
                "attempt", "gpu_seconds", "launcher", "started_at", "ended_at", "params"]
        return pd.DataFrame(rows, columns=cols)

    def _table(self, name: str, runs: pd.DataFrame, verify: bool) -> pd.DataFrame:
        frames = []
        for r in runs.itertuples():
            run_id = str(r.run_id)
            path = self.root / "runs" / run_id / "tables" / f"{name}.parquet"
            if verify:
                problem = self.check_run(run_id)
                if problem is not None:
                    raise InputError(path.parent.parent, None, problem)
            if not path.is_file():
                continue
            try:
                df = pd.read_parquet(path)
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise InputError(path, None, f"cannot read ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
            df["run_id"] = run_id
            for col in ("campaign", "model", "tp", "hardware", "family", "split"):
                df[col] = getattr(r, col)
            if "workload" not in df.columns or name == "steps":
                df["workload"] = df["family"]
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def steps(self, *, verify: bool = False, **filters: Any) -> pd.DataFrame:
        """Step tables of the complete runs that match ``filters``, with run metadata columns. ``verify``: check
        each run first (:meth:`check_run`; a one-line :class:`InputError` on the first that fails)."""
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
        return {SweepPoint.from_dict(m["point"]).key for m in self.manifests(campaign)}


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
