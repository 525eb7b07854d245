#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install dist_cacheaug with its dev extras.
# Sourced by the README's two commands; safe to run again (it only installs what is missing).
#   VENV=path            where the venv lives (default: <repo>/.venv)
#   CACHEAUG_DEPS=locked the known-good set in constraints.txt (default)
#   CACHEAUG_DEPS=newest the newest versions pyproject's ranges allow (CI checks these too)
#   CACHEAUG_DEPS=oldest transformers at pyproject's lower bound, the rest as pip resolves them
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
DEPS="${CACHEAUG_DEPS:-locked}"
LOCKED_TORCH="torch==$(sed -n 's/^torch==//p' "$ROOT/constraints.txt")"
case "$DEPS" in
  locked) PINS=(-c "$ROOT/constraints.txt"); TORCH="$LOCKED_TORCH" ;;
  newest) PINS=(); TORCH="torch==2.13.0" ;;  # pyproject's newest allowed torch (PyPI's plain newest is a multi-GB CUDA build)
  oldest) PINS=("transformers==$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' "$ROOT/pyproject.toml")")
          TORCH="$LOCKED_TORCH" ;;
  *) echo "[setup] CACHEAUG_DEPS must be locked, newest or oldest, got '$DEPS'" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # torch first and alone: on a machine without a GPU the pinned version resolves to the CPU build
  # already on disk; with a GPU, PyPI's default (CUDA) build of the same version.
  "$VPY" -m pip install -q "$TORCH" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  # (torch warns that NumPy is missing until the project's dependencies are in: not worth a user's attention)
  if ! check=$("$VPY" -c "import torch" 2>&1); then
    echo "$check" >&2; echo "[setup] installing $TORCH failed: see pip's output above" >&2; exit 1
  fi
fi
if ! "$VPY" -c "import dist_cacheaug, data_tools, deepspeed, webdataset, pytest, pyarrow, zstandard" >/dev/null 2>&1 \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.cacheaug-installed" ] \
   || [ "$ROOT/constraints.txt" -nt "$VENV/.cacheaug-installed" ] \
   || [ "$(cat "$VENV/.cacheaug-installed" 2>/dev/null)" != "$DEPS" ]; then
  echo "[setup] installing dist_cacheaug (editable) and its dependencies ($DEPS versions)"
  # PYTHONWARNINGS: no notice walls from the build backend (setuptools' editable-install notes); errors still show.
  PYTHONWARNINGS=ignore "$VPY" -m pip install -q -e "$ROOT[dev]" "${PINS[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  if ! check=$(DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" "$VPY" -c "import dist_cacheaug, data_tools, deepspeed, webdataset, pytest, pyarrow, zstandard" 2>&1); then
    echo "$check" >&2
    echo "[setup] install failed: see pip's output above" >&2
    exit 1
  fi
  echo "$DEPS" >"$VENV/.cacheaug-installed"
fi
# DeepSpeed JIT-builds a CPU op on first use: it needs a C++ compiler (ninja comes from the dev extra).
if ! command -v g++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing g++ (DeepSpeed builds a CPU op with it)"
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
  else
    echo "[setup] warning: g++ not found; DeepSpeed's CPU op build will fail (install g++)" >&2
  fi
fi
