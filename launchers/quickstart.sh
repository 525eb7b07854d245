#!/usr/bin/env bash
# The main job: a small end-to-end run on one machine (CPU by default, a GPU when present).
#   corpus -> sentencepiece tokenizer -> webdataset shards -> coprocessor training -> export
# Usage: bash launchers/quickstart.sh [RUN_DIR] [--set key=value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="runs/quickstart"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then RUN="$1"; shift; fi
bash "$ROOT/launchers/setup_env.sh"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"  # the launchers call `python` and `deepspeed`
PY="$VENV/bin/python"
cd "$ROOT"
if "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cuda; echo "[quickstart] GPU found: training on it"
else
  export DS_ACCELERATOR=cpu; echo "[quickstart] no GPU: training on CPU"
fi
mkdir -p "$RUN"
DATA="$RUN/data"
if [ ! -f "$DATA/shards/manifest.json" ]; then
  echo "[quickstart] 1/3 corpus + tokenizer + shards -> $DATA"
  "$PY" -m data_tools synth-arithmetic --out "$DATA/corpus/arith.jsonl" --docs 1500 --seed 0
  "$PY" -m data_tools train-tokenizer --input "$DATA/corpus/arith.jsonl" --out "$DATA/tokenizer" \
      --vocab-size 512 --no-progress
  "$PY" -m data_tools make-shards --tokenizer "$DATA/tokenizer" --input "$DATA/corpus/arith.jsonl" \
      --out "$DATA/shards" --seq-len 256 --shard-samples 64 --val-fraction 0.05 --no-progress
fi
echo "[quickstart] 2/3 training a coprocessor (configs/tiny_cpu.yaml) -> $RUN/train"
"$VENV/bin/cacheaug" train --config configs/tiny_cpu.yaml \
    --set train.run_dir="$RUN/train" --set data.train_shards="[$DATA/shards]" \
    --set data.val_shards="[$DATA/shards]" --set data.tokenizer="$DATA/tokenizer" \
    --set model.decoder_config.vocab_size=512 "$@"
echo "[quickstart] 3/3 done"
echo "  metrics:     $RUN/train/metrics.jsonl"
echo "  export:      $RUN/train/export   (CacheAugmentedLM.from_pretrained)"
echo "  TensorBoard: $VENV/bin/tensorboard --logdir $RUN/train/tb"
