#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install dist_cacheaug with its dev extras.
# Sourced by the README's two commands; safe to run again (it only installs what is missing).
#   VENV=path   where the venv lives (default: <repo>/.venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # Without a GPU, prefer the CPU build pinned in this repo's tested versions (a plain `torch`
  # from PyPI is a multi-GB CUDA build); with a GPU, take PyPI's default (CUDA) build.
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch
  else
    "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null || "$VPY" -m pip install -q torch
  fi
fi
if ! "$VPY" -c "import dist_cacheaug, data_tools, deepspeed, webdataset, pytest" >/dev/null 2>&1 \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.cacheaug-installed" ]; then
  echo "[setup] installing dist_cacheaug (editable) and its dependencies"
  "$VPY" -m pip install -q -e "$ROOT[dev]"
  touch "$VENV/.cacheaug-installed"
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
