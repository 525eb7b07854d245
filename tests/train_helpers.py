"""Shared set-up for tests that run the real trainer: tiny sentencepiece shards and a tiny run config."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

from data_tools import make_shards, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launchers" / "local.sh"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bag".split()


def make_tiny_shards(d: Path) -> Path:
    """Tiny corpus -> sentencepiece (320) -> one sample per shard (seq_len 64), 10 % held out."""
    rng = random.Random(0)
    docs = []
    for i in range(400):
        parts = []
        for _ in range(rng.randint(2, 6)):
            s = rng.randint(0, len(WORDS) - 4)
            parts.append(" ".join(WORDS[s : s + rng.randint(3, 8)]) + ".")
        docs.append(f"Document {i}. " + " ".join(parts))
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    train_tokenizer(iter(docs), str(d / "tok"), vocab_size=320, byte_fallback=True, num_threads=1)
    make_shards(
        str(d / "tok"),
        [str(corpus)],
        str(d / "shards"),
        seq_len=64,
        shard_samples=1,
        val_fraction=0.1,
        doc_sep="\n\n",
        workers=1,
        progress=False,
    )
    return d / "shards"


def tiny_run_config(tmp_path: Path, shards: Path, name: str = "cfg.yaml", **train) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    cfg["model"]["decoder_config"].update(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    # Every valid position (64 - 4): the positions are the same whatever the rank layout.
    cfg["model"].update(num_latents=2, num_ahead=4, num_positions=60)
    cfg["data"].update(train_shards=[str(shards)], val_shards=[str(shards)], seq_len=64, shuffle_buffer=1)
    cfg["optim"].update(lr=3e-3, warmup_steps=2, weight_decay=0.01)
    cfg["train"].update(
        dict(
            run_dir=str(tmp_path / "run"),
            global_batch_size=8,
            micro_batch_size=4,
            max_steps=6,
            log_interval=1,
            eval_interval=0,
            eval_batches=2,
            checkpoint_interval=100,
            keep_checkpoints=2,
        ),
        **train,
    )
    cfg["zero"].update(stage=3, activation_checkpointing=True)
    cfg["logging"]["offsets"] = [1, 2, 4]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(nproc: int, config: Path, sets: list[str]) -> list[str]:
    args = ["--config", str(config), *[a for s in sets for a in ("--set", s)]]
    if nproc == 1:
        return [sys.executable, "-m", "dist_cacheaug.cli", "train", *args]
    return ["bash", str(LOCAL_SH), str(nproc), *args[1:]]


def train_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train(nproc: int, config: Path, *sets: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_command(nproc, config, list(sets)),
        env=train_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
