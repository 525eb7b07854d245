"""Training throughput of the tiny config (configs/tiny_cpu.yaml) with 1 and 2 ranks, side by side.

    python bench/train.py [--steps 20] [--warmup 3] [--ranks 1 2] [--config configs/tiny_cpu.yaml]

Writes a synthetic word corpus, a sentencepiece tokenizer and shards (seq_len from the config) to a temp
dir, then runs the real ``cacheaug train`` (1 rank: plain process; N ranks: launchers/local.sh N) for
``--steps`` steps with ZeRO-3 and reads step time and tokens/s from each run's metrics.jsonl (median over
the steps after ``--warmup``). Tokens/s counts sequence tokens (global batch x seq_len) per second.
Everything printed is measured; nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools import make_shards, train_tokenizer  # noqa: E402
from dist_cacheaug import load_config  # noqa: E402  # noqa: E402

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bag of "
    "numbers letters and small stories about rivers mountains cities trains"
).split()


def make_data(tmp: Path, seq_len: int) -> Path:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 400))) + "." for _ in range(600)]
    train_tokenizer(iter(docs), str(tmp / "tok"), vocab_size=400, byte_fallback=True, num_threads=1)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    make_shards(
        str(tmp / "tok"),
        [str(corpus)],
        str(tmp / "shards"),
        seq_len=seq_len,
        shard_samples=16,
        val_fraction=0.05,
        doc_sep="\n\n",
        workers=1,
        progress=False,
    )
    return tmp / "shards"


def run(ranks: int, config: str, shards: Path, run_dir: Path, steps: int) -> list[dict]:
    sets = [
        f"data.train_shards=[{shards}]",
        f"data.val_shards=[{shards}]",
        f"train.run_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.log_interval=1",
        "train.eval_interval=0",
        f"train.checkpoint_interval={steps}",
        "logging.console=false",
    ]
    args = ["--config", config, *[a for s in sets for a in ("--set", s)]]
    cmd = (
        [sys.executable, "-m", "dist_cacheaug.cli", "train", *args]
        if ranks == 1
        else ["bash", str(ROOT / "launchers" / "local.sh"), str(ranks), *args[1:]]
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{ranks}-rank run failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    args = p.parse_args()
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shards = make_data(tmp, cfg.data.seq_len)
        results = {}
        for ranks in args.ranks:
            rows = run(ranks, args.config, shards, tmp / f"run{ranks}", args.steps)[args.warmup :]
            results[ranks] = (
                statistics.median(r["step_time"] for r in rows),
                statistics.median(r["tokens_per_s"] for r in rows),
                max(r["peak_mem_gib"] for r in rows),
            )
    print(
        f"tiny config {args.config}: global batch {cfg.train.global_batch_size} x seq_len {cfg.data.seq_len}, "
        f"P={cfg.model.num_positions}, N_L={cfg.model.num_latents}, N_A={cfg.model.num_ahead}, ZeRO-{cfg.zero.stage}, "
        f"{os.cpu_count()} CPU cores; medians over steps {args.warmup + 1}..{args.steps}"
    )
    print(f"{'ranks':>5} {'step time (s)':>14} {'tokens/s':>10} {'peak RSS/rank (GiB)':>20}")
    for ranks, (st, tps, mem) in results.items():
        print(f"{ranks:>5} {st:>14.3f} {tps:>10.0f} {mem:>20.2f}")


if __name__ == "__main__":
    main()
