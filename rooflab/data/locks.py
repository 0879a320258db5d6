"""Inter-process locks on a shared folder (docs/spec.md §11): an exclusive ``flock`` for short critical sections
(:func:`file_lock`) and *claims* — a campaign lock or a run's lease — that last as long as their owner works.

A claim is a small JSON file naming its owner: pid, host, start time, a heartbeat and a random token. It is
created with ``O_CREAT|O_EXCL``; every check, takeover, refresh and release runs under an ``flock`` on a guard
file, so two processes never both take the same claim. A claim is **live** while its owner is:

* on the same machine (same hostname, boot id and pid namespace): while the owner's pid exists with the process
  start time it had (a reused pid is not the owner);
* on another machine: while its heartbeat is younger than :func:`timeout_s` (``ROOFLAB_LEASE_TIMEOUT_S``,
  default 120 s). This assumes the machines' clocks agree to well within that.

A claim that is not live is *stale*: the next process takes it over and says so. Held claims are refreshed by
one daemon thread per process every :func:`heartbeat_s` (``ROOFLAB_HEARTBEAT_S``, default 10 s); a refresh that
finds another owner's token marks the claim lost (it was taken over: this process must not write as its owner).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rooflab.errors import InputError
from rooflab.files import atomic_write_bytes

HEARTBEAT_S = 10.0
TIMEOUT_S = 120.0


def heartbeat_s() -> float:
    return float(os.environ.get("ROOFLAB_HEARTBEAT_S", HEARTBEAT_S))


def timeout_s() -> float:
    return float(os.environ.get("ROOFLAB_LEASE_TIMEOUT_S", TIMEOUT_S))


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the duration of the block. Excludes other
    processes and other threads of this one (each call opens its own file description)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ------------------------------------------------------------------------------------------ owners
def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if unknown."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _machine() -> str:
    """What makes pids comparable: the boot and the pid namespace (containers on one host differ)."""
    boot = (_read("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return f"{boot}:{ns}"


HOST = socket.gethostname()
MACHINE = _machine()


@dataclass(frozen=True)
class Owner:
    """Who holds a claim."""

    pid: int
    host: str
    machine: str
    proc_start: str | None
    started_at: str  # ISO time the claim was taken
    heartbeat: float  # time.time() of the last refresh
    token: str  # this claim's identity (a takeover gets a new one)

    @classmethod
    def me(cls) -> Owner:
        now = time.time()
        return cls(os.getpid(), HOST, MACHINE, proc_start(os.getpid()),
                   datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"), now, uuid.uuid4().hex)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Owner:
        return cls(int(d["pid"]), str(d["host"]), str(d.get("machine", "")), d.get("proc_start"),
                   str(d.get("started_at", "?")), float(d.get("heartbeat", 0.0)), str(d["token"]))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @property
    def local(self) -> bool:
        return self.host == HOST and self.machine == MACHINE

    @property
    def this_process(self) -> bool:
        return self.local and self.pid == os.getpid() and self.proc_start == proc_start(os.getpid())

    def alive(self, timeout: float | None = None) -> bool:
        if self.local:
            if not pid_alive(self.pid):
                return False
            now = proc_start(self.pid)
            return self.proc_start is None or now is None or now == self.proc_start
        return time.time() - self.heartbeat < (timeout_s() if timeout is None else timeout)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started_at}"


def read_owner(path: Path) -> Owner | None:
    """The owner recorded in a claim file; None if there is none. A file that cannot be read as an owner (a
    torn or hand-edited file) counts as a dead owner."""
    text = _read(str(path))
    if text is None:
        return None
    try:
        return Owner.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError):
        return Owner(-1, "?", "?", None, "?", 0.0, "corrupt")


class ClaimHeld(InputError):
    """The claim is held by a live owner (``owner``)."""

    def __init__(self, problem: str, owner: Owner):
        super().__init__(None, None, problem)
        self.owner = owner


# ------------------------------------------------------------------------------------------ claims
class Claim:
    """A held claim on ``path`` (see the module doc). ``previous``: the stale owner it was taken over from."""

    def __init__(self, path: Path, guard: Path, owner: Owner, previous: Owner | None):
        self.path, self.guard, self.owner, self.previous = path, guard, owner, previous
        self.lost = False
        self.depth = 1  # nested acquisitions by this process (shared claims)

    @property
    def token(self) -> str:
        return self.owner.token

    @classmethod
    def acquire(cls, path: str | Path, guard: str | Path, *, what: str, share: bool = False,
                timeout: float | None = None) -> Claim:
        """Take the claim on ``path`` or raise :class:`ClaimHeld` (``"<what> is held by pid N on host H since
        T"``). Stale claims are taken over (``previous`` says from whom). A claim this process already holds is
        shared when ``share`` (a nested acquisition; released with the outermost) and taken anew otherwise."""
        path, guard = Path(path), Path(guard)
        with file_lock(guard):
            cur = read_owner(path)
            if cur is not None and cur.this_process and share:
                held = _BEATER.find(path, cur.token)
                if held is not None:
                    held.depth += 1
                    return held
            if cur is not None and not cur.this_process and cur.alive(timeout):
                raise ClaimHeld(f"{what} is held by {cur.describe()}", cur)
            me = Owner.me()
            if cur is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:  # written without the guard (another tool): never overwrite it
                    raise ClaimHeld(f"{what} is held (the claim file {path} appeared meanwhile)",
                                    read_owner(path) or me) from None
                with os.fdopen(fd, "wb") as fh:
                    fh.write(me.to_json())
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                atomic_write_bytes(path, me.to_json())
            claim = cls(path, guard, me, None if (cur is None or cur.this_process) else cur)
        _BEATER.add(claim)
        return claim

    def held(self) -> bool:
        """Whether the claim file still names this claim's owner."""
        if self.lost:
            return False
        cur = read_owner(self.path)
        return cur is not None and cur.token == self.token

    def refresh(self) -> bool:
        """Write a new heartbeat; False (and ``lost``) when the claim was taken over or removed."""
        if self.lost:
            return False
        try:
            with file_lock(self.guard):
                cur = read_owner(self.path)
                if cur is None or cur.token != self.token:
                    self.lost = True
                    return False
                self.owner = Owner(**{**asdict(self.owner), "heartbeat": time.time()})
                atomic_write_bytes(self.path, self.owner.to_json())
        except OSError:  # the folder moved (quarantine) or the disk hiccuped: try again next beat
            return self.held()
        return True

    def release(self) -> None:
        """Give the claim up (the outermost release of a shared claim removes the file, if still ours)."""
        self.depth -= 1
        if self.depth > 0:
            return
        _BEATER.remove(self)
        try:
            with file_lock(self.guard):
                cur = read_owner(self.path)
                if cur is not None and cur.token == self.token:
                    self.path.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Beater:
    """One daemon thread per process that refreshes every held claim."""

    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, claim: Claim) -> None:
        with self.lock:
            self.claims.append(claim)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="rooflab-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, claim: Claim) -> None:
        with self.lock:
            self.claims = [c for c in self.claims if c is not claim]

    def find(self, path: Path, token: str) -> Claim | None:
        with self.lock:
            return next((c for c in self.claims if c.path == path and c.token == token), None)

    def _run(self) -> None:
        while True:
            every = heartbeat_s()
            time.sleep(min(every, 0.5))  # wakes often, so a changed ROOFLAB_HEARTBEAT_S applies at once
            with self.lock:
                claims = list(self.claims)
            for c in claims:
                if time.time() - c.owner.heartbeat >= every and not c.refresh():
                    self.remove(c)


_BEATER = _Beater()
