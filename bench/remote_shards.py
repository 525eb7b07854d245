"""Training-loader throughput from object storage vs local disk, with and without shard prefetch.

    python bench/remote_shards.py [--workers 1 2] [--prefetch 0 2] [--latency 0.2] [--samples 1536]

Writes synthetic uint32 shards (Gemma-2's 256k vocabulary) to a temp dir, uploads them to moto's S3
server on loopback (the same server the tests use, started here), and times ``build_train_loader`` on
each source for every (workers, prefetch_shards) pair, in one run so the ratios are side by side:

- ``local``: the shard directory on disk;
- ``s3``: ``s3://`` on the loopback server (s3fs through fsspec, as in training);
- ``s3+latency``: the same behind a proxy that holds each shard GET for ``--latency`` seconds before
  answering, a stand-in for the time to first byte of a remote object store (loopback has none).

Each cell builds a fresh loader, waits for its first batch (the shuffle buffer filling, reported as
"first batch"), then times ``--batches`` batches. The consumer does no work, so the rate is what the
loader can deliver, an upper bound on what it costs training. The requirement line is derived, not
measured: the paper's global batch (1024 x 2048 tokens) over ``--gpus`` GPUs at an assumed
``--step-time``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_tools import write_token_shards  # noqa: E402
from dist_cacheaug.data import build_train_loader  # noqa: E402

# The loopback servers live with the tests that use them; the benchmark reuses them rather than copying.
from tests.object_store_helpers import FaultProxy, environ, moto_server, s3_env, upload_dir  # noqa: E402


def time_loader(source: str, a: argparse.Namespace, workers: int, prefetch: int) -> tuple[float, float]:
    """(tokens/s over the timed batches, seconds to the first batch) of a fresh loader on ``source``."""
    t0 = time.perf_counter()
    loader = build_train_loader(
        source,
        seq_len=a.seq_len,
        micro_batch_size=a.micro_batch,
        rank=0,
        world_size=1,
        seed=0,
        num_workers=workers,
        shuffle_buffer=a.shuffle_buffer,
        prefetch_shards=prefetch,
    )
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.batches):
        next(it)["input_ids"].sum()  # touch the data like a consumer would
    dt = time.perf_counter() - t0
    loader.close()
    return a.batches * a.micro_batch * a.seq_len / dt, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prefetch", type=int, nargs="+", default=[0, 2], help="data.prefetch_shards values")
    p.add_argument("--latency", type=float, default=0.2, help="seconds held per shard GET (0: skip)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--samples", type=int, default=1536)
    p.add_argument("--shard-samples", type=int, default=32, help="32 x 2048 x 4 B = 256 KiB per shard")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=120, help="timed batches per cell")
    p.add_argument("--shuffle-buffer", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--step-time", type=float, default=1.0, help="assumed seconds per optimizer step")
    a = p.parse_args()
    need_per_step = a.global_batch * a.seq_len / a.gpus
    need = need_per_step / a.step_time
    timed = a.batches * a.micro_batch

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint, environ(s3_env(endpoint)):
        m = write_token_shards(
            tmp,
            {"train": (rng.integers(0, a.vocab, a.seq_len) for _ in range(a.samples))},
            seq_len=a.seq_len,
            tokenizer={"identity": "synthetic:bench", "vocab_size": a.vocab},
            shard_samples=a.shard_samples,
        )
        n_shards = len(m["splits"]["train"]["shards"])
        url = upload_dir(endpoint, Path(tmp), "bench")
        shard_mib = a.shard_samples * a.seq_len * np.dtype(m["dtype"]).itemsize / 2**20
        print(
            f"shards: {a.samples} samples x {a.seq_len} tokens ({m['dtype']}) in {n_shards} shards of "
            f"{shard_mib:.2f} MiB; micro batch {a.micro_batch}; {timed} samples timed per cell; "
            f"cpu cores {os.cpu_count()}"
        )
        print(
            f"need per GPU: {a.global_batch} x {a.seq_len} tokens / {a.gpus} GPUs = "
            f"{need_per_step:,.0f} tokens/step -> {need:,.0f} tokens/s at an assumed {a.step_time:g} s/step"
        )
        sources = [("local", tmp), ("s3", url)]
        proxy = None
        if a.latency > 0:
            proxy = FaultProxy(endpoint, match=".tar", slow_s=a.latency).__enter__()
            proxy.always = "slow"
            sources.append((f"s3+{a.latency:g}s", url))
        rates: dict[tuple[str, int, int], float] = {}
        try:
            print("source      workers prefetch   tokens/s  first batch  headroom  vs local  vs prefetch 0")
            for name, source in sources:
                env = {"AWS_ENDPOINT_URL": proxy.url if proxy and "+" in name else endpoint}
                with environ(env):
                    for w in a.workers:
                        for pf in a.prefetch:
                            rate, first = time_loader(source, a, w, pf)
                            rates[name, w, pf] = rate
                            print(
                                f"{name:<11} {w:>7} {pf:>8} {rate:>10,.0f} {first:>11.2f}s "
                                f"{rate / need:>8.1f}x {rate / rates['local', w, pf]:>8.2f}x "
                                f"{rate / rates[name, w, a.prefetch[0]]:>13.2f}x",
                                flush=True,
                            )
        finally:
            if proxy is not None:
                proxy.__exit__(None, None, None)


if __name__ == "__main__":
    main()
