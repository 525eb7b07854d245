"""dist_cacheaug.data: rank/worker split, seeded epochs, exact resume, manifest checks, corruption."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from data_tools import DataError, write_token_shards
from dist_cacheaug.data import build_eval_loader, build_train_loader, read_manifest

SEQ = 8
IDENT = "synthetic:test"


def _samples(n: int, offset: int = 0):
    """Sample i holds i in its first token, so every sample is identifiable."""
    for i in range(offset, offset + n):
        a = np.arange(SEQ, dtype=np.int64) + 7
        a[0] = i
        yield a


@pytest.fixture()
def shards(tmp_path):
    """67 train samples in 12 shards (6 per shard, the last 1), 10 val samples in 3 shards."""
    out = str(tmp_path / "shards")
    write_token_shards(
        out,
        {"train": _samples(67), "val": _samples(10, 1000)},
        seq_len=SEQ,
        tokenizer={"identity": IDENT, "vocab_size": 2000},
        shard_samples=6,
    )
    return out


def _ids(batch) -> list[int]:
    x = batch["input_ids"]
    assert x.dtype.is_floating_point is False and x.shape[1] == SEQ
    return x[:, 0].tolist()


def _take(loader, n_batches: int) -> list[list[int]]:
    it = iter(loader)
    out = [_ids(next(it)) for _ in range(n_batches)]
    loader.close()
    return out


def _loader(shards, **kw):
    args = dict(
        seq_len=SEQ, micro_batch_size=1, rank=0, world_size=1, seed=0, num_workers=0, shuffle_buffer=4
    )
    return build_train_loader(shards, **{**args, **kw})


def test_each_sample_once_per_epoch_2_ranks_2_workers(shards):
    """De-interleave each rank's batches into its 2 worker streams and cut them at epoch boundaries."""
    epochs = {0: Counter(), 1: Counter(), 2: Counter()}
    orders = {0: [], 1: []}
    for rank in range(2):
        loader = _loader(shards, rank=rank, world_size=2, num_workers=2)
        plan = loader._ds.plan
        batches = _take(loader, 200)
        for w in range(2):
            stream = [b[0] for b in batches[w::2]]
            pos = 0
            for e in epochs:
                n = plan.epoch_len(e, w)
                epochs[e].update(stream[pos : pos + n])
                if w == 0 and rank == 0:
                    orders.setdefault(e, []).append(stream[pos : pos + n])
                pos += n
            assert pos <= len(stream)
    for e, seen in epochs.items():
        assert seen == Counter(range(67)), f"epoch {e}"
    assert orders[0] != orders[1]  # reshuffled each epoch
    # same seed -> same order; another seed -> another order
    assert _take(_loader(shards, rank=1, world_size=2, num_workers=2), 40) == _take(
        _loader(shards, rank=1, world_size=2, num_workers=2), 40
    )
    assert _take(_loader(shards, seed=1), 40) != _take(_loader(shards, seed=0), 40)


def test_single_stream_epochs(shards):
    loader = _loader(shards, micro_batch_size=67)
    it = iter(loader)
    e0, e1 = sorted(_ids(next(it))), _ids(next(it))
    assert e0 == list(range(67)) and sorted(e1) == e0 and loader.epoch == 2


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [0, 5, 23])
def test_resume_is_exact(shards, workers, k):
    kw = dict(rank=1, world_size=2, num_workers=workers, micro_batch_size=3, seed=7)
    full = _take(_loader(shards, **kw), 40)  # ~4 epochs of this rank
    first = _loader(shards, **kw)
    assert _take(first, k) == full[:k]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches_consumed"] == k and state["world_size"] == 2
    resumed = _loader(shards, **kw)
    resumed.load_state_dict(state)
    assert _take(resumed, 40 - k) == full[k:]
    # the same state restores the other rank too (batches_consumed is the same on every rank)
    other = _loader(shards, **{**kw, "rank": 0})
    other.load_state_dict(state)
    assert _take(other, 5) == _take(_loader(shards, **{**kw, "rank": 0}), k + 5)[k:]


def test_resume_continues_after_restore_and_save(shards):
    kw = dict(num_workers=2, micro_batch_size=2, seed=3)
    full = _take(_loader(shards, **kw), 30)
    a = _loader(shards, **kw)
    _take(a, 10)
    b = _loader(shards, **kw)
    b.load_state_dict(a.state_dict())
    assert _take(b, 7) == full[10:17]
    c = _loader(shards, **kw)
    c.load_state_dict(b.state_dict())
    assert _take(c, 13) == full[17:30]


def test_state_mismatch(shards):
    a = _loader(shards, world_size=2, num_workers=2, micro_batch_size=2)
    _take(a, 40)
    state = a.state_dict()
    b = _loader(shards, world_size=4, num_workers=1, micro_batch_size=2)
    with pytest.raises(DataError, match="world_size: saved 2, now 4"):
        b.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="approximate data resume"):
        b.load_state_dict(state, strict=False)
    assert b.epoch == state["epoch"]
    assert len(_take(b, 3)) == 3
    with pytest.raises(DataError, match="kind"):
        b.load_state_dict({"batches_consumed": 3})


def test_manifest_mismatch_errors(shards, tmp_path):
    with pytest.raises(DataError, match=r"shards.*'seq_len' is 8 .*seq_len=16"):
        _loader(shards, seq_len=16)
    with pytest.raises(DataError, match=r"'tokenizer.identity' is 'synthetic:test'"):
        _loader(shards, tokenizer_identity="sentencepiece:abc")
    with pytest.raises(DataError, match="has no manifest.json"):
        _loader(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(str(tmp_path / "nope"))
    other = str(tmp_path / "other")
    write_token_shards(
        other, {"train": _samples(6)}, seq_len=SEQ, tokenizer={"identity": "x", "vocab_size": 99}
    )
    with pytest.raises(DataError, match="different tokenizers"):
        _loader([shards, other])


def test_two_dirs_combined(shards, tmp_path):
    other = str(tmp_path / "other")
    write_token_shards(
        other, {"train": _samples(12, 500)}, seq_len=SEQ, tokenizer={"identity": IDENT, "vocab_size": 70000}
    )
    assert read_manifest(other)["dtype"] == "uint32"
    seen = sum(_take(_loader([shards, other], micro_batch_size=79), 1), [])
    assert sorted(seen) == list(range(67)) + list(range(500, 512))


def test_too_few_shards(shards):
    with pytest.raises(DataError, match="need at least 16"):
        _loader(shards, world_size=4, num_workers=4)


def _flip(path: str, at: int = 700) -> None:
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard(shards, workers):
    _flip(os.path.join(shards, "train-000003.tar"))
    with pytest.raises(DataError, match="train-000003.tar' is corrupt: sha256"):
        _take(_loader(shards, num_workers=workers, micro_batch_size=4), 20)
    loader = _loader(shards, num_workers=workers, micro_batch_size=4, skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match="train-000003.tar"):
        seen = sum(_take(loader, 15), [])  # 60 samples: one epoch minus the bad shard is 61
    assert loader.corrupt_skipped >= 1
    assert not set(seen) & set(range(18, 24)) and len(set(seen)) >= 55


def test_eval_loader(shards):
    full = [_ids(b) for b in build_eval_loader(shards, seq_len=SEQ, batch_size=4)]
    assert full == [[1000, 1001, 1002, 1003], [1004, 1005, 1006, 1007], [1008, 1009]]
    assert [_ids(b) for b in build_eval_loader(shards, seq_len=SEQ, batch_size=4)] == full  # re-iterable
    r0 = build_eval_loader(shards, seq_len=SEQ, batch_size=2, rank=0, world_size=2, max_samples=7)
    r1 = build_eval_loader(shards, seq_len=SEQ, batch_size=2, rank=1, world_size=2, max_samples=7)
    assert sum((_ids(b) for b in r0), []) == [1000, 1002, 1004, 1006] and len(r0) == 2
    assert sum((_ids(b) for b in r1), []) == [1001, 1003, 1005]
    with pytest.raises(DataError, match="no 'test' shards"):
        build_eval_loader(shards, seq_len=SEQ, batch_size=2, split="test")
