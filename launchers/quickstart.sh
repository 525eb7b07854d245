#!/usr/bin/env bash
# The main job: a small-scale reproduction of the paper on one machine (CPU by default, a GPU when present).
#   Shakespeare + arithmetic corpus -> sentencepiece tokenizer -> shards -> pretrain a tiny base -> freeze it
#   -> coprocessors (N_L = 4, 16), pause tokens, base-extra-steps control -> Table-1 loss at k, held-out answers
#   -> RUN_DIR/report.md (+ results.json, PNGs, TensorBoard)            (dist_cacheaug/demo/pipeline.py)
# Usage: bash launchers/quickstart.sh [--quick | --full | --budget NAME|FILE] [RUN_DIR] [--publish DIR] [--replicas N | --replica R]
#   --quick (default) about 7.6 min on 2 idle CPU cores (+ 1-3 min of set-up on first use); --full about 50 min
#   (docs/results.md comes from it). Errors a user can fix print one line `error: ...`; --debug adds tracebacks.
#   Running it again resumes: finished stages are skipped, a training run resumes from its checkpoint.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CACHEAUG_DEMO_COMMAND="bash launchers/quickstart.sh${*:+ $*}"  # recorded in the report
ARGS=()
BUDGET=quick
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) BUDGET=quick ;;
    --full) BUDGET=full ;;
    --budget) [ $# -gt 1 ] || { echo "error: launchers/quickstart.sh --budget needs a value: quick, full, micro or a budget .yaml file" >&2; exit 2; }
              BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    --debug) ARGS+=(--debug) ;;  # a flag: the word after it is not its value
    --*=*) ARGS+=("$1") ;;
    --*) ARGS+=("$1") ; if [ $# -gt 1 ] && [[ "$2" != --* ]]; then ARGS+=("$2"); shift; fi ;;
    *) ARGS+=(--run-dir "$1") ;;
  esac
  shift
done
bash "$ROOT/launchers/setup_env.sh"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"  # the demo calls `python -m ...` subprocesses
cd "$ROOT"
if "$VENV/bin/python" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cuda; echo "[quickstart] GPU found: training on it"
else
  export DS_ACCELERATOR=cpu; echo "[quickstart] no GPU: training on CPU"
fi
exec "$VENV/bin/cacheaug" demo --budget "$BUDGET" ${ARGS[@]+"${ARGS[@]}"}
