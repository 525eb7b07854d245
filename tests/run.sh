#!/usr/bin/env bash
# The test command: set up the environment (first run only), lint, then run the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow"` for the quick subset.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launchers/setup_env.sh"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"  # the launchers call `python` and `deepspeed`
cd "$ROOT"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$VENV/bin/python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
