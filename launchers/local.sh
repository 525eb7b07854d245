#!/usr/bin/env bash
# Train on one machine with NPROC ranks under the `deepspeed` launcher.
#
#   launchers/local.sh NPROC CONFIG [--set key=value ...]
#
# Without a GPU the ranks run on CPU (DS_ACCELERATOR=cpu, gloo). MASTER_PORT picks the rendezvous port
# (default: a free one). World size 1 needs no launcher: `cacheaug train --config CONFIG` does the same.
# Signals: the deepspeed launcher kills its ranks on SIGTERM and exits 1; to stop cleanly (checkpoint,
# exit 0) send SIGTERM or SIGUSR1 to the rank processes themselves (as `srun`/SLURM does).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "error: $0 needs the number of ranks and a config: $0 NPROC CONFIG [--set key=value ...]" >&2
    exit 2
fi
NPROC=$1
CONFIG=$2
shift 2
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $0: NPROC must be a number of ranks >= 1, got '$NPROC'" >&2
    exit 2
fi
if [[ ! -f "$CONFIG" ]]; then
    echo "error: $0: config file not found: $CONFIG (see configs/)" >&2
    exit 2
fi

if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    # Two ranks on a small machine: don't let each one start a thread per core.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# The launcher's own INFO lines (hostfile, world info, spawned commands) only with --debug / CACHEAUG_DEBUG=1.
LOG_LEVEL=error
if [[ "${CACHEAUG_DEBUG:-}" == 1 || " $* " == *" --debug "* ]]; then LOG_LEVEL=info; fi

# --no_local_rank: ranks read LOCAL_RANK from the environment (the flag would land before `train`).
exec deepspeed --log_level "$LOG_LEVEL" --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank \
    --module dist_cacheaug.cli train --config "$CONFIG" "$@"
