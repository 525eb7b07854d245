#!/usr/bin/env bash
# The GPU checklist behind docs/performance.md, run from the repo root on one GPU:
#   bash bench/gpu_check.sh OUT_DIR [env] [tests] [bench] [bench-profile] [train]   (default: all but bench-profile)
# env    versions of the driver, torch, transformers, deepspeed
# tests  the GPU-marked tests (flex = eager on the GPU, trainer end to end, golden curve vs CPU fp32)
# bench  `cacheaug bench train` at the paper's shape (Gemma-2 2B widths, 26 layers, random weights;
#        seq 2048, P = 128, N_L = N_A = 16, bf16, flex, activation checkpointing) at MICRO (default 2)
# train  `cacheaug train` (DeepSpeed ZeRO-3, one rank, NCCL) at the same shape on synthetic shards:
#        step time beside the bare benchmark, checkpoint save and resume times
# Each section writes OUT_DIR/<section>.log; the summary lines go to stdout.
# CONFIG=... and DS_ACCELERATOR=cpu run the same sections on another config / the CPU (the test suite
# smoke-tests the train section that way: tests/train/test_gpu_paths_cpu.py).
set -uo pipefail
OUT="${1:?usage: bench/gpu_check.sh OUT_DIR [sections...]}"
shift
SECTIONS="${*:-env tests bench train}"
LIMIT="${SECTION_TIMEOUT:-1200}"  # seconds per section
MICRO="${MICRO:-2}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}" TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
CONFIG="${CONFIG:-configs/gemma2_2b_paper.yaml}"
PAPER=(--config "$CONFIG" --set model.decoder_path=null --set "train.micro_batch_size=$MICRO")

FAILED=0  # exit status: 1 when any section's command failed (the others still run)
section() { echo "== $1 ($(date -u +%H:%M:%S))"; }

for s in $SECTIONS; do
  case "$s" in
    env)
      section env
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        "$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
      } 2>&1 | tee "$OUT/env.log" | grep -v "^\[" ;;
    tests)
      section tests
      CACHEAUG_GOLDEN_OUT="$OUT/golden.json" timeout "$LIMIT" "$PY" -m pytest -p no:cacheprovider -m gpu -q -s tests/test_gpu.py \
        >"$OUT/tests.log" 2>&1 || FAILED=1
      grep -E "golden curve|passed|failed|Error" "$OUT/tests.log" | tail -8 ;;
    bench)
      section "bench (micro batch $MICRO)"
      timeout "$LIMIT" "$PY" -m dist_cacheaug.cli bench train "${PAPER[@]}" --steps 3 --warmup 1 >"$OUT/bench.log" 2>&1 || FAILED=1
      grep -vE "^\[|Warning|warn" "$OUT/bench.log" | tail -12 ;;
    bench-profile)
      section "bench profile (micro batch $MICRO)"
      timeout "$LIMIT" "$PY" -m dist_cacheaug.cli bench train "${PAPER[@]}" --steps 2 --warmup 1 --skip plain naive eager --profile \
        >"$OUT/bench-profile.log" 2>&1 || FAILED=1
      grep -vE "^\[|Warning|warn" "$OUT/bench-profile.log" | tail -45 ;;
    train)
      section "train (ZeRO-3, 1 rank, micro batch $MICRO)"
      D="$(mktemp -d)"
      "$PY" -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import train; print(train.make_data(Path('$D'), $("$PY" -m dist_cacheaug.cli config "$CONFIG" --get data.seq_len)))" \
        >"$OUT/train.log" 2>&1 || FAILED=1
      RUN=(--set "data.train_shards=[$D/shards]" --set "data.val_shards=[$D/shards]" --set data.num_workers=1
           --set "train.run_dir=$D/run" --set "train.global_batch_size=$((MICRO * 2))" --set train.log_interval=1
           --set train.eval_interval=0 --set train.checkpoint_interval=4 --set logging.console=true)
      t0=$(date +%s.%N)
      "$PY" -m dist_cacheaug.cli train "${PAPER[@]}" "${RUN[@]}" --set train.max_steps=4 >>"$OUT/train.log" 2>&1 || FAILED=1
      t1=$(date +%s.%N)
      "$PY" -m dist_cacheaug.cli train "${PAPER[@]}" "${RUN[@]}" --set train.max_steps=6 >>"$OUT/train.log" 2>&1 || FAILED=1
      t2=$(date +%s.%N)
      cp "$D/run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
      echo "first run (4 steps + checkpoint + export) $("$PY" -c "print(round($t1 - $t0, 1))") s; resumed run (2 steps) $("$PY" -c "print(round($t2 - $t1, 1))") s"
      grep -E "checkpoint|restored|resum|step_time|Error|error" "$OUT/train.log" | grep -v "^\[20" | tail -12
      "$PY" -c "import json; rows=[json.loads(l) for l in open('$OUT/train_metrics.jsonl')]; [print({k: r.get(k) for k in ('step','loss','step_time','tokens_per_s','mfu','peak_mem_gib')}) for r in rows]" ;;
    *) echo "unknown section $s" >&2; exit 2 ;;
  esac
done
exit $FAILED
