"""Endpoints: where a run's requests go and where its traces come from.

* ``CommandEndpoint`` — a server started by rooflab from a command template (vLLM with tracing flags, or
  the twin): placeholders ``{model} {tp} {hardware} {port} {trace} {tokenizer}``; health wait with a
  timeout; drain (wait until it reports no running or waiting request); stop (SIGTERM to its process
  group, SIGKILL after a grace period). Points of one (model, TP, hardware) reuse one server.
* ``twin_command`` — the template that starts ``rooflab twin serve``: the twin is a CommandEndpoint.
* ``ExternalEndpoint`` — a server someone else runs: base URL and where its trace file is.
* ``vllm_command`` — the stock-vLLM profile: the template that starts vLLM's OpenAI server with the
  vllm-steplog plugin writing to ``{trace}`` (``trace_format = "steplog"``); a CommandEndpoint too.

The run's traces are the bytes the server appended to its trace file between the run's start mark and
the end of the drain (runs on one server are sequential).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rooflab.errors import InputError

if TYPE_CHECKING:
    from rooflab.data.sweep import SweepPoint

_METRIC = re.compile(r"^(vllm:num_requests_(?:running|waiting))\{[^}]*\}\s+([0-9.eE+-]+)", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float, what: str = "server") -> None:
    """Poll ``url``/health until it answers 200. A process that exits first, or a timeout, raises a
    one-line InputError naming the server."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise InputError(None, "endpoint", f"{what} exited with code {proc.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise InputError(None, "endpoint", f"{what} never became healthy within {timeout_s:g} s")


def twin_command(accel: float = 20.0, engine: dict | None = None, seed: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "rooflab.twin", "serve", "--model", "{model}", "--tp", "{tp}",
           "--hardware", "{hardware}", "--port", "{port}", "--trace", "{trace}", "--accel", str(accel),
           "--seed", str(seed)]
    for k, v in sorted((engine or {}).items()):
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd += [flag] if v else []
        else:
            cmd += [flag, str(v)]
    return cmd


STEPLOG_ENV = "ROOFLAB_STEPLOG_PATH"  # where the vllm-steplog plugin writes (unset: the plugin is inactive)
# campaign engine option -> vLLM flag (booleans become --flag / --no-flag)
_VLLM_FLAGS = {"max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-num-batched-tokens",
               "max_model_len": "--max-model-len", "gpu_memory_utilization": "--gpu-memory-utilization",
               "enable_prefix_caching": "--enable-prefix-caching"}


def expand_path(text: str) -> str:
    """``~`` and environment variables; ``$ROOFLAB_CACHE`` defaults to ``~/.cache/rooflab``."""
    cache = os.environ.get("ROOFLAB_CACHE") or str(Path.home() / ".cache" / "rooflab")
    text = text.replace("${ROOFLAB_CACHE}", cache).replace("$ROOFLAB_CACHE", cache)
    return os.path.expanduser(os.path.expandvars(text))


def vllm_command(python: str, model_path: str, served_model_name: str, engine: dict | None = None,
                 args: tuple[str, ...] | list[str] = (), env: dict | None = None) -> list[str]:
    """The stock-vLLM profile's template (placeholders ``{tp} {port} {trace}``; ``{model}`` in ``model_path`` /
    ``served_model_name`` is filled by the caller): ``env ROOFLAB_STEPLOG_PATH={trace} <python> -m
    vllm.entrypoints.openai.api_server --host 127.0.0.1 --port {port} --model <model_path>
    --served-model-name <name> --tensor-parallel-size {tp}`` plus the campaign's engine options and ``args``.
    Arguments are brace-escaped so that only rooflab's placeholders are substituted."""
    esc = lambda a: str(a).replace("{", "{{").replace("}", "}}")  # noqa: E731
    cmd = ["env", f"{STEPLOG_ENV}={{trace}}"] + [f"{k}={esc(v)}" for k, v in sorted((env or {}).items())]
    cmd += [esc(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", "{port}",
            "--model", esc(model_path), "--served-model-name", esc(served_model_name),
            "--tensor-parallel-size", "{tp}"]
    return cmd + vllm_engine_flags(engine) + [esc(a) for a in args]


def vllm_engine_flags(engine: dict | None) -> list[str]:
    """vLLM's flags for the campaign's engine options (``max_num_seqs`` → ``--max-num-seqs 256``, a bool →
    ``--enable-…`` / ``--no-enable-…``); options vLLM has no flag for are left out."""
    out: list[str] = []
    for k, v in sorted((engine or {}).items()):
        flag = _VLLM_FLAGS.get(k)
        if flag is None or v is None:
            continue
        if isinstance(v, bool):
            out.append(flag if v else flag.replace("--", "--no-", 1))
        else:
            out += [flag, str(v)]
    return out


class Endpoint:
    base_url: str
    trace_path: Path | None
    tokenizer_dir: str
    model_name: str
    time_scale: float = 1.0  # simulated seconds per wall second (the twin's --accel; 1 for a real server)
    trace_format: str = "otel"  # "otel" (instrumented fork, twin) or "steplog" (stock vLLM + vllm-steplog)
    lock: threading.Lock  # one run at a time per server (trace windows must not interleave)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return {k: float(v) for k, v in _METRIC.findall(text)}

    def drain(self, timeout_s: float = 120.0, settle_s: float = 0.3) -> None:
        """Wait until the server has no running or waiting request (and its trace exporter flushed)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            m = self.metrics()
            if m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0) == 0:
                time.sleep(settle_s)
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.base_url} did not drain within {timeout_s:g} s")

    def trace_mark(self) -> int:
        return self.trace_path.stat().st_size if self.trace_path and self.trace_path.exists() else 0

    def copy_traces(self, mark: int, dest: Path) -> int:
        """Copy the trace bytes appended since ``mark`` (whole lines only) to ``dest``; returns bytes."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not self.trace_path or not self.trace_path.exists():
            dest.write_bytes(b"")
            return 0
        with open(self.trace_path, "rb") as fh:
            fh.seek(mark)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written stays for the next run's reader
        dest.write_bytes(data[:end])
        return end


class ExternalEndpoint(Endpoint):
    def __init__(self, base_url: str, trace_path: str | Path | None, tokenizer_dir: str, model_name: str,
                 trace_format: str = "otel"):
        self.base_url = base_url.rstrip("/")
        self.trace_path = Path(trace_path) if trace_path else None
        self.tokenizer_dir, self.model_name = tokenizer_dir, model_name
        self.trace_format = trace_format
        self.lock = threading.Lock()


class CommandEndpoint(Endpoint):
    def __init__(self, template: list[str], *, model: str, tp: int, hardware: str, workdir: str | Path,
                 tokenizer_dir: str, model_name: str | None = None, health_timeout_s: float = 180.0,
                 env: dict | None = None, time_scale: float = 1.0, trace_format: str = "otel"):
        self.template, self.model, self.tp, self.hardware = list(template), model, tp, hardware
        self.time_scale = float(time_scale)
        self.trace_format = trace_format
        self.workdir = Path(workdir)
        self.tokenizer_dir = tokenizer_dir
        self.model_name = model_name or model
        self.health_timeout_s = health_timeout_s
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.trace_path = None
        self.base_url = ""
        self.lock = threading.Lock()  # one run at a time per server (trace windows must not interleave)

    def command(self) -> list[str]:
        values = {"model": self.model, "tp": str(self.tp), "hardware": self.hardware, "port": str(self.port),
                  "trace": str(self.trace_path), "tokenizer": self.tokenizer_dir}
        try:
            return [part.format(**values) for part in self.template]
        except (KeyError, IndexError) as exc:
            raise InputError(None, "endpoint.template",
                             f"unknown placeholder {exc} (known: {', '.join(values)})") from None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.trace_path = self.workdir / f"traces-{self.port}.jsonl"
        self.base_url = f"http://127.0.0.1:{self.port}"
        log = open(self.workdir / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(self.env or {})})
        log.close()
        try:
            wait_healthy(self.base_url, self.proc, self.health_timeout_s,
                         f"server ({' '.join(self.command())}; log: {self.workdir / f'server-{self.port}.log'})")
        except InputError:
            self.stop()
            raise

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)  # graceful: servers flush their traces
                self.proc.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.proc = None


class EndpointPool:
    """One started endpoint per (model, TP, hardware, engine options), reused across sweep points."""

    def __init__(self, factory: Callable[[SweepPoint], Endpoint], max_servers: int = 2) -> None:
        self.factory, self.max_servers = factory, max_servers
        self.servers: dict[tuple, Endpoint] = {}
        self.lock = threading.Lock()

    def get(self, point: SweepPoint) -> Endpoint:
        key = (point.model, point.tp, point.hardware, point.engine)
        with self.lock:
            ep = self.servers.get(key)
            if ep is None:
                while len(self.servers) >= self.max_servers:
                    old_key = next(iter(self.servers))
                    old = self.servers.pop(old_key)
                    with old.lock:
                        old.stop()
                ep = self.factory(point)
                self.servers[key] = ep
        ep.start()
        return ep

    def close(self) -> None:
        with self.lock:
            for ep in self.servers.values():
                ep.stop()
            self.servers.clear()
