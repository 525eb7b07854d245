"""Training and evaluation loaders over the shards written by ``python -m data_tools make-shards``.

Sample order (a pure function of the seed, so it can be replayed):

* A *stream* is one (rank, DataLoader worker) pair; there are ``world_size * max(1, num_workers)``.
  Each epoch, the shard list is permuted with ``(seed, epoch)`` (the same permutation on every rank)
  and dealt round robin to the streams. Every training sample therefore appears exactly once per
  epoch across all ranks; epochs differ in order; the same seed gives the same order.
* Within a stream, the samples of its shards (read in that order) go through a shuffle buffer of
  ``shuffle_buffer`` samples seeded with ``(seed, epoch, rank, worker)``; the buffer drains at the end
  of the epoch. A stream runs epoch after epoch forever and emits batches of ``micro_batch_size``
  (a batch may straddle an epoch boundary of its stream).
* With ``num_workers = N > 0`` torch's DataLoader takes its i-th batch from worker ``i % N`` (round
  robin, in order), so the rank's batch sequence is deterministic too: batch ``b`` of the rank always
  comes from stream ``b % N`` (a resumed DataLoader's worker ``w`` plays stream ``(w + B) % N``).

Resume. The only progress variable is ``batches_consumed`` — the number of batches the trainer took
from this loader. Worker ``w`` produced ``ceil((B - w) / N)`` of them, so on restore every worker
regenerates its stream's order from the seed and skips exactly that many samples (whole epochs and
whole shards are skipped arithmetically from the manifest's counts; only a partly consumed shard is
read again, and its arrays are not converted). ``batches_consumed`` is the same on every rank (all
ranks take one micro-batch per micro-step), so a state saved on any rank restores every rank of a run
with the same world size, worker count, micro-batch size, seed, buffer and shard set: the resumed run
sees exactly the samples the uninterrupted one would have seen.

Elastic resume (different world size / workers / micro-batch / shards): ``load_state_dict(state,
strict=False)`` restarts every new stream in the saved epoch at the saved *fraction* of that epoch
(``epoch_fraction``: the share of the epoch's samples this rank had consumed). This is approximate:
within that epoch some samples are seen twice or not at all, but the count of samples left in the
epoch is right to within one shard per stream, and later epochs are exact permutations again. With
``strict=True`` (the default) a mismatch is an error naming the fields.

Corruption. Each shard is read whole and checked (size, sha256, every sample's key and length) before
any of its samples is emitted. A bad shard raises ``DataError`` naming it; with ``skip_corrupt=True``
its samples are left out, ``.corrupt_skipped`` counts it and a warning names it (exact resume is then
only guaranteed for positions before the first skip).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools import storage
from data_tools.errors import DataError
from data_tools.shards import read_manifest, read_shard
from data_tools.storage import DEFAULT_RETRY, Retry

__all__ = [
    "DataError",
    "EvalLoader",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "read_manifest",
]

STATE_KIND = "dist_cacheaug.TrainLoader"
STATE_VERSION = 1


class _Shard:
    """One shard file (or URL) and its manifest entry (picklable; what workers need to read it)."""

    def __init__(self, path: str, entry: dict, seq_len: int, dtype: str, retry: Retry = DEFAULT_RETRY):
        self.path, self.entry, self.seq_len, self.dtype, self.retry = path, entry, seq_len, dtype, retry
        self.num_samples = int(entry["num_samples"])

    def read(self, verify_checksum: bool = True) -> list[np.ndarray]:
        return read_shard(
            self.path,
            self.entry,
            seq_len=self.seq_len,
            dtype=self.dtype,
            verify_checksum=verify_checksum,
            retry=self.retry,
        )


class _Prefetcher:
    """Reads the next ``depth`` shards of a stream in background threads while the current one is
    consumed, so a remote read overlaps training. Memory: at most ``depth`` shards beyond the current."""

    def __init__(self, depth: int, verify_checksums: bool):
        self.depth, self.verify = depth, verify_checksums
        self.pool = ThreadPoolExecutor(depth, thread_name_prefix="shard-prefetch") if depth else None
        self.pending: dict[int, Future] = {}  # shard index -> its read

    def read(self, shards: list[_Shard], index: int, upcoming) -> list[np.ndarray]:
        """Shard ``index``'s samples (raising its DataError), after queueing the reads of ``upcoming``."""
        if self.pool is not None:
            for i in upcoming[: self.depth]:
                i = int(i)
                if i != index and i not in self.pending:
                    self.pending[i] = self.pool.submit(shards[i].read, self.verify)
        future = self.pending.pop(index, None)
        return future.result() if future is not None else shards[index].read(self.verify)

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=False)


def _collect_shards(
    shard_dir: str | os.PathLike | list,
    split: str,
    seq_len: int,
    tokenizer_identity: str | None,
    retry: Retry = DEFAULT_RETRY,
) -> list[_Shard]:
    """Shards of ``split`` from one or several directories or URLs (``data_tools.storage``), checked
    against the config."""
    dirs = (
        [os.fspath(shard_dir)]
        if isinstance(shard_dir, (str, os.PathLike))
        else [os.fspath(d) for d in shard_dir]
    )
    if not dirs:
        raise DataError("no shard directory given")
    shards: list[_Shard] = []
    first_identity = None
    for d in dirs:
        m = read_manifest(d, retry)
        where = storage.shown(storage.join(d, "manifest.json"))
        if m["seq_len"] != seq_len:
            raise DataError(
                f"{where}: field 'seq_len' is {m['seq_len']} but the config asks for seq_len={seq_len}"
            )
        ident = m["tokenizer"]["identity"]
        if tokenizer_identity is not None and ident != tokenizer_identity:
            raise DataError(
                f"{where}: field 'tokenizer.identity' is {ident!r} but the config's tokenizer is "
                f"{tokenizer_identity!r} (shards were made with a different tokenizer)"
            )
        if first_identity is None:
            first_identity = (d, ident)
        elif ident != first_identity[1]:
            raise DataError(
                f"{where}: field 'tokenizer.identity' differs from {first_identity[0]}'s ({ident!r} vs "
                f"{first_identity[1]!r}); shards made with different tokenizers cannot be mixed"
            )
        for e in m["splits"].get(split, {}).get("shards", []):
            shards.append(_Shard(storage.join(d, e["name"]), e, m["seq_len"], m["dtype"], retry))
    if not shards:
        hint = " (make-shards --val-fraction/--val-docs creates one)" if split == "val" else ""
        raise DataError(f"no {split!r} shards in {', '.join(map(storage.shown, dirs))}{hint}")
    return shards


def _fingerprint(shards: list[_Shard]) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.entry['name']}:{s.entry['sha256']}:{s.num_samples}\n".encode())
    return h.hexdigest()[:16]


def _buffer_shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of items 0..n-1 read in order through a random-eviction buffer of ``buffer`` slots.

    Same semantics as webdataset's ``shuffle`` (fill, then emit a random element per new one), but
    seeded and computed on indices, so a resumed stream can replay it without touching the data.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    draws = rng.random(n)
    buf: list[int] = []
    j = 0
    for pos in range(n):
        buf.append(pos)
        if len(buf) >= buffer:
            i = int(draws[j] * len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out[j] = buf.pop()
            j += 1
    while buf:
        i = int(draws[j] * len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        out[j] = buf.pop()
        j += 1
    return out


class _Plan:
    """The deterministic per-epoch assignment of shards to streams and the order within each stream."""

    def __init__(
        self, counts: list[int], *, seed: int, rank: int, world_size: int, streams: int, buffer: int
    ):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.rank, self.world_size, self.streams, self.buffer = (
            seed,
            rank,
            world_size,
            streams,
            buffer,
        )
        self._len_cache: dict[tuple[int, int], int] = {}

    def epoch_shards(self, epoch: int, stream: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.counts))
        return perm[stream * self.world_size + self.rank :: self.world_size * self.streams]

    def epoch_len(self, epoch: int, stream: int) -> int:
        key = (epoch, stream)
        if key not in self._len_cache:
            if len(self._len_cache) > 4096:
                self._len_cache.clear()
            self._len_cache[key] = int(self.counts[self.epoch_shards(epoch, stream)].sum())
        return self._len_cache[key]

    def epoch_order(self, epoch: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 2, self.rank, stream])
        return _buffer_shuffle_order(self.epoch_len(epoch, stream), self.buffer, rng)

    def advance(self, stream: int, epoch: int, offset: int, k: int) -> tuple[int, int]:
        """Position ``k`` samples after (epoch, offset) in a stream."""
        while True:
            n = self.epoch_len(epoch, stream)
            if offset + k < n:
                return epoch, offset + k
            k -= n - offset
            epoch, offset = epoch + 1, 0

    def start(self, stream: int, base: dict | None) -> tuple[int, int]:
        if not base:
            return 0, 0
        e = int(base["epoch"])
        return self.advance(stream, e, 0, int(round(float(base["fraction"]) * self.epoch_len(e, stream))))


def _batches_of_stream(batches: int, stream: int, streams: int) -> int:
    """How many of the rank's first ``batches`` batches came from ``stream`` (round robin)."""
    return max(0, (batches - stream + streams - 1) // streams)


class _TrainStream(IterableDataset):
    """The endless batch stream of one rank; inside a DataLoader worker, that worker's share of it."""

    def __init__(
        self,
        shards,
        plan: _Plan,
        *,
        micro_batch_size: int,
        skip_corrupt: bool,
        verify_checksums: bool,
        prefetch_shards: int = 0,
    ):
        self.shards, self.plan, self.prefetch_shards = shards, plan, prefetch_shards
        self.micro_batch_size, self.skip_corrupt, self.verify_checksums = (
            micro_batch_size,
            skip_corrupt,
            verify_checksums,
        )
        self.base: dict | None = None
        self.batches_consumed = 0
        #: Called with the 1-based number of each batch this iterator makes, before making it (inside
        #: the worker that makes it): the trainer's fault injection for tests. Must be picklable.
        self.before_batch: Callable[[int], None] | None = None

    def position(self, stream: int) -> tuple[int, int]:
        k = _batches_of_stream(self.batches_consumed, stream, self.plan.streams) * self.micro_batch_size
        e, off = self.plan.start(stream, self.base)
        return self.plan.advance(stream, e, off, k)

    def _samples(self, stream: int, epoch: int, offset: int, skipped: list[str]) -> Iterator[np.ndarray]:
        prefetch = _Prefetcher(self.prefetch_shards, self.verify_checksums)
        try:
            yield from self._epochs(stream, epoch, offset, skipped, prefetch)
        finally:
            prefetch.close()

    def _epochs(
        self, stream: int, epoch: int, offset: int, skipped: list[str], prefetch: _Prefetcher
    ) -> Iterator[np.ndarray]:
        plan = self.plan
        while True:
            shard_ids = plan.epoch_shards(epoch, stream)
            counts = plan.counts[shard_ids]
            starts = np.concatenate([[0], np.cumsum(counts)])
            order = plan.epoch_order(epoch, stream)
            emitted = np.zeros(len(order), dtype=bool)
            emitted[order[:offset]] = True
            cache: dict[int, np.ndarray] = {}
            # shards wholly before the first position still needed are never opened
            k = (
                int(np.searchsorted(starts, order[offset:].min(), side="right") - 1)
                if offset < len(order)
                else 0
            )
            loaded_upto = int(starts[k])
            produced = 0
            for pos in order[offset:]:
                pos = int(pos)
                while pos >= loaded_upto:
                    shard = self.shards[int(shard_ids[k])]
                    try:
                        arrays = prefetch.read(self.shards, int(shard_ids[k]), shard_ids[k + 1 :])
                    except DataError:
                        if not self.skip_corrupt:
                            raise
                        skipped.append(shard.path)
                        arrays = []
                    base = int(starts[k])
                    for j, a in enumerate(arrays):
                        if not emitted[base + j]:
                            cache[base + j] = a
                    loaded_upto = int(starts[k + 1])
                    k += 1
                a = cache.pop(pos, None)
                if a is not None:  # None: its shard was corrupt and skipped
                    produced += 1
                    yield a
            if produced == 0 and len(order) > offset:
                raise DataError(
                    f"every shard of stream (rank {plan.rank}, worker {stream}) in epoch {epoch} is corrupt: "
                    f"{skipped[-3:]}"
                )
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        if (info.num_workers if info is not None else 1) != self.plan.streams:
            raise RuntimeError("worker count differs from the loader's plan")
        # A fresh DataLoader asks worker 0 first, but batch number B belongs to stream B % N: rotate.
        stream = ((info.id if info is not None else 0) + self.batches_consumed) % self.plan.streams
        epoch, offset = self.position(stream)
        skipped: list[str] = []
        samples = self._samples(stream, epoch, offset, skipped)
        mb = self.micro_batch_size
        made = 0
        while True:
            made += 1
            if self.before_batch is not None:
                self.before_batch(made)
            batch = np.stack([next(samples) for _ in range(mb)]).astype(np.int64)
            report = list(skipped)
            skipped.clear()
            yield torch.from_numpy(batch), report


class TrainLoader:
    """Endless iterable of ``{"input_ids": LongTensor[micro_batch_size, seq_len]}`` for one rank.

    ``iter(loader)`` starts from the current position (fresh, or what ``load_state_dict`` set); one
    active iterator at a time (a new ``iter`` closes the previous one). ``state_dict()`` is plain JSON.
    """

    def __init__(
        self,
        dataset: _TrainStream,
        *,
        num_workers: int,
        seq_len: int,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
    ):
        self._ds = dataset
        self.pin_memory, self.worker_init_fn = pin_memory, worker_init_fn
        self.num_workers, self.seq_len, self.prefetch_factor = num_workers, seq_len, prefetch_factor
        self.micro_batch_size = dataset.micro_batch_size
        self.rank, self.world_size = dataset.plan.rank, dataset.plan.world_size
        self.corrupt_skipped = 0
        self._fingerprint = _fingerprint(dataset.shards)
        self._remote = any(storage.is_remote(s.path) for s in dataset.shards)
        self._active = None

    # -------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.close()
        if self.num_workers == 0:
            source = iter(self._ds)
        else:
            if self._remote:
                storage.release_clients()  # workers fork: they must not inherit live remote clients
            source = iter(
                DataLoader(
                    self._ds,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_factor,
                    pin_memory=self.pin_memory,
                    in_order=True,
                    worker_init_fn=self.worker_init_fn,
                )
            )
        self._active = self._consume(source)
        return self._active

    def _consume(self, source) -> Iterator[dict[str, torch.Tensor]]:
        for input_ids, skipped in source:
            for path in skipped:
                self.corrupt_skipped += 1
                warnings.warn(
                    f"skipped corrupt shard {path} (skip_corrupt=True)", RuntimeWarning, stacklevel=2
                )
            self._ds.batches_consumed += 1
            yield {"input_ids": input_ids}

    def close(self) -> None:
        """Stop the active iterator (and its worker processes)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    # -------------------------------------------------------------------------------- position
    @property
    def batches_consumed(self) -> int:
        return self._ds.batches_consumed

    def _positions(self) -> list[tuple[int, int]]:
        return [self._ds.position(s) for s in range(self._ds.plan.streams)]

    @property
    def epoch(self) -> int:
        """The earliest epoch not yet fully consumed by this rank (its workers may be in different ones)."""
        return min(e for e, _ in self._positions())

    def _epoch_fraction(self, positions, epoch: int) -> float:
        plan = self._ds.plan
        done = total = 0
        for s, (e, off) in enumerate(positions):
            n = plan.epoch_len(epoch, s)
            total += n
            done += n if e > epoch else off
        return done / total if total else 0.0

    def _config(self) -> dict[str, Any]:
        p = self._ds.plan
        return {
            "seed": p.seed,
            "world_size": p.world_size,
            "num_workers": self.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "shuffle_buffer": p.buffer,
            "seq_len": self.seq_len,
            "shards_fingerprint": self._fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        positions = self._positions()
        epoch = min(e for e, _ in positions)
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            **self._config(),
            "rank": self.rank,
            "base": self._ds.base,
            "batches_consumed": self._ds.batches_consumed,
            "samples_consumed": self._ds.batches_consumed * self.micro_batch_size,
            "epoch": epoch,
            "epoch_fraction": self._epoch_fraction(positions, epoch),
            "corrupt_skipped": self.corrupt_skipped,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a position saved by ``state_dict`` (on any rank of the same run; see module doc)."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise DataError("not a TrainLoader state (field 'kind' missing or wrong)")
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"TrainLoader state version {state.get('version')!r}; this code reads {STATE_VERSION}"
            )
        self.close()
        mine = self._config()
        diffs = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if not diffs:
            self._ds.base = state.get("base")
            self._ds.batches_consumed = int(state["batches_consumed"])
        elif strict:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diffs.items())
            raise DataError(
                f"cannot resume the data loader exactly ({what}); "
                "load_state_dict(state, strict=False) resumes "
                f"approximately at epoch {state.get('epoch')} fraction {state.get('epoch_fraction', 0):.4f}"
            )
        else:
            warnings.warn(
                f"approximate data resume ({', '.join(diffs)} changed): every stream restarts epoch "
                f"{state['epoch']} at fraction {state['epoch_fraction']:.4f}",
                RuntimeWarning,
                stacklevel=2,
            )
            self._ds.base = {"epoch": int(state["epoch"]), "fraction": float(state["epoch_fraction"])}
            self._ds.batches_consumed = 0
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))

    def __repr__(self) -> str:
        return (
            f"TrainLoader(rank={self.rank}/{self.world_size}, shards={len(self._ds.shards)}, "
            f"micro_batch={self.micro_batch_size}, seq_len={self.seq_len}, workers={self.num_workers}, "
            f"batches_consumed={self.batches_consumed})"
        )


def build_train_loader(
    shard_dir: str | list[str],
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    tokenizer_identity: str | None = None,
    skip_corrupt: bool = False,
    verify_checksums: bool = True,
    pin_memory: bool = False,
    split: str = "train",
    worker_init_fn: Callable[[int], None] | None = None,
    before_batch: Callable[[int], None] | None = None,
    prefetch_shards: int = 0,
    retry: Retry = DEFAULT_RETRY,
) -> TrainLoader:
    """The endless, resumable training loader of one rank (see the module docstring for the order).
    ``worker_init_fn``: DataLoader's, run in each worker as it starts (the trainer registers a stack dump
    there). ``before_batch``: see ``_TrainStream.before_batch``. ``prefetch_shards``: shards each stream
    reads ahead in background threads. ``retry``: how remote reads are retried (``data_tools.storage``)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    shards = _collect_shards(shard_dir, split, seq_len, tokenizer_identity, retry)
    streams = max(1, num_workers)
    if len(shards) < world_size * streams:
        raise DataError(
            f"{len(shards)} {split} shard(s) in {shard_dir} but {world_size} rank(s) x {streams} worker "
            f"stream(s) need at least {world_size * streams}: re-run make-shards with a smaller "
            "--shard-samples, or use fewer data workers"
        )
    plan = _Plan(
        [s.num_samples for s in shards],
        seed=seed,
        rank=rank,
        world_size=world_size,
        streams=streams,
        buffer=shuffle_buffer,
    )
    ds = _TrainStream(
        shards,
        plan,
        micro_batch_size=micro_batch_size,
        skip_corrupt=skip_corrupt,
        verify_checksums=verify_checksums,
        prefetch_shards=prefetch_shards,
    )
    ds.before_batch = before_batch
    return TrainLoader(
        ds, num_workers=num_workers, seq_len=seq_len, pin_memory=pin_memory, worker_init_fn=worker_init_fn
    )


class EvalLoader:
    """Finite, deterministic batches of the held-out split; rank r takes global samples r, r+W, ..."""

    def __init__(
        self, shards: list[_Shard], *, batch_size: int, rank: int, world_size: int, max_samples: int | None
    ):
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        total = sum(s.num_samples for s in shards)
        self.total_samples = total if max_samples is None else min(total, max_samples)
        self.num_samples = len(range(rank, self.total_samples, world_size))  # this rank's share

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        i, batch = 0, []
        for shard in self.shards:
            if i >= self.total_samples:
                break
            for a in shard.read():
                if i >= self.total_samples:
                    break
                if i % self.world_size == self.rank:
                    batch.append(a)
                    if len(batch) == self.batch_size:
                        yield {"input_ids": torch.from_numpy(np.stack(batch).astype(np.int64))}
                        batch = []
                i += 1
        if batch:
            yield {"input_ids": torch.from_numpy(np.stack(batch).astype(np.int64))}


def build_eval_loader(
    shard_dir: str | list[str],
    *,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    tokenizer_identity: str | None = None,
    split: str = "val",
) -> EvalLoader:
    """Held-out batches in manifest order (finite; the last batch may be smaller)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    shards = _collect_shards(shard_dir, split, seq_len, tokenizer_identity)
    return EvalLoader(
        shards, batch_size=batch_size, rank=rank, world_size=world_size, max_samples=max_samples
    )
