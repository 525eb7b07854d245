"""Training-loader throughput (tokens/s per rank) against what the paper's run needs per GPU.

    python bench/loader.py [--workers 0 2] [--seq-len 2048] [--vocab 256000] [--step-time 1.0]

Writes synthetic uint16/uint32 shards (random ids; the loader never looks at values) to a temp dir,
then times ``build_train_loader`` for each worker count after a warm-up, plus the time a resumed loader
takes to deliver its first batch. The requirement line is derived, not measured: the paper's global
batch (1024 x 2048 tokens) spread over ``--gpus`` GPUs at an assumed ``--step-time``; "keeps up down to"
is the step time at which the measured rate would be just enough.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools import write_token_shards  # noqa: E402
from dist_cacheaug.data import build_train_loader  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--vocab", type=int, default=256000, help="Gemma-2's vocabulary: > 65536, so uint32 shards"
    )
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--shard-samples", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=200, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--step-time", type=float, default=1.0, help="assumed seconds per optimizer step")
    p.add_argument("--dir", default=None, help="existing/scratch dir for the synthetic shards")
    a = p.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        t0 = time.perf_counter()
        m = write_token_shards(
            tmp,
            {"train": (rng.integers(0, a.vocab, a.seq_len) for _ in range(a.samples))},
            seq_len=a.seq_len,
            tokenizer={"identity": "synthetic:bench", "vocab_size": a.vocab},
            shard_samples=a.shard_samples,
        )
        t_write = time.perf_counter() - t0
        n_shards = len(m["splits"]["train"]["shards"])
        print(
            f"shards: {a.samples} samples x {a.seq_len} tokens ({m['dtype']}) in {n_shards} shards, "
            f"written at "
            f"{a.samples * a.seq_len / t_write / 1e6:.1f} M tokens/s; cpu cores {os.cpu_count()}"
        )
        need_per_step = a.global_batch * a.seq_len / a.gpus
        need = need_per_step / a.step_time
        print(
            f"need per GPU: {a.global_batch} x {a.seq_len} tokens / {a.gpus} GPUs = "
            f"{need_per_step:,.0f} tokens/step"
            f" -> {need:,.0f} tokens/s at an assumed {a.step_time:g} s/step"
        )
        for nw in a.workers:
            kw = dict(seq_len=a.seq_len, micro_batch_size=a.micro_batch, rank=0, world_size=1, seed=0)
            loader = build_train_loader(tmp, num_workers=nw, shuffle_buffer=a.shuffle_buffer, **kw)
            it = iter(loader)
            for _ in range(a.warmup):
                next(it)
            t0 = time.perf_counter()
            for _ in range(a.batches):
                batch = next(it)["input_ids"]
                batch.sum()  # touch the data like a consumer would
            dt = time.perf_counter() - t0
            loader.close()
            rate = a.batches * a.micro_batch * a.seq_len / dt
            state = loader.state_dict()
            resumed = build_train_loader(tmp, num_workers=nw, shuffle_buffer=a.shuffle_buffer, **kw)
            resumed.load_state_dict(state)
            t0 = time.perf_counter()
            next(iter(resumed))
            t_resume = time.perf_counter() - t0
            resumed.close()
            print(
                f"workers={nw}: {rate:,.0f} tokens/s ({rate / a.seq_len:,.1f} samples/s, micro-batch "
                f"{a.micro_batch}); headroom x{rate / need:.1f}; "
                f"keeps up down to {need_per_step / rate:.3f} s/step; "
                f"resume at batch {state['batches_consumed']}: first batch after {t_resume:.2f} s"
            )


if __name__ == "__main__":
    main()
