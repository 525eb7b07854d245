"""Partitioned make-shards: N parts (any order, one killed and resumed) merge into exactly the shards
and manifest of one --per-file run, and the training loader yields the same samples in the same order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from data_tools import DataError, load_tokenizer, make_shards, merge_parts, read_manifest, read_shard
from data_tools.plan import assign_parts
from dist_cacheaug.data import build_eval_loader, build_train_loader

ARGS = {"seq_len": 32, "shard_samples": 4, "val_fraction": 0.1, "per_file": True, "progress": False}


@pytest.fixture(scope="module")
def single(jsonl_corpus, tmp_path_factory):
    """One process over the whole corpus: the reference."""
    d = tmp_path_factory.mktemp("single")
    make_shards(jsonl_corpus.tok, [jsonl_corpus.dir], str(d), workers=1, **ARGS)
    return d


def _parts(jsonl_corpus, out, n: int, order) -> list[dict]:
    return [
        make_shards(jsonl_corpus.tok, [jsonl_corpus.dir], str(out), num_parts=n, part=i, workers=1, **ARGS)
        for i in order
    ]


@pytest.mark.parametrize("n", [2, 3])
def test_parts_merge_into_the_single_run(n, jsonl_corpus, single, read_dataset, tmp_path):
    results = _parts(jsonl_corpus, tmp_path, n, reversed(range(n)))
    assert [r["merged"] for r in results] == [False] * (n - 1) + [True]  # the last part to finish merges
    assert sorted(int(f) for r in results for f in r["files"]) == [0, 1, 2, 3]
    assert read_dataset(tmp_path) == read_dataset(single)
    assert merge_parts(str(tmp_path)) == read_manifest(str(tmp_path))  # merging again changes nothing


def test_no_dataset_before_the_last_part(jsonl_corpus, tmp_path):
    _parts(jsonl_corpus, tmp_path, 3, [0, 2])
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    with pytest.raises(DataError, match=r"part\(s\) 1 of 3 are not finished yet"):
        merge_parts(str(tmp_path))


def test_a_killed_part_resumes_and_the_merge_is_unchanged(
    jsonl_corpus, single, run_killed, read_dataset, tmp_path
):
    kw = dict(
        tokenizer=jsonl_corpus.tok, inputs=[jsonl_corpus.dir], out_dir=str(tmp_path), num_parts=2, **ARGS
    )
    _parts(jsonl_corpus, tmp_path, 2, [1])
    assert run_killed("shard:7", part=0, workers=2, **kw) == -9
    assert run_killed("unit:1", part=0, workers=1, **kw) == -9
    assert make_shards(part=0, workers=2, **kw)["merged"]
    assert read_dataset(tmp_path) == read_dataset(single)


def _batches(shard_dir, *, rank: int, world_size: int, n: int) -> list[torch.Tensor]:
    loader = build_train_loader(
        str(shard_dir),
        seq_len=32,
        micro_batch_size=3,
        rank=rank,
        world_size=world_size,
        seed=7,
        shuffle_buffer=16,
    )
    it = iter(loader)
    return [next(it)["input_ids"] for _ in range(n)]


def test_merged_dataset_trains_like_the_single_run(jsonl_corpus, single, tmp_path):
    """Through the loader: the same batches on every rank for three epochs, and the same eval batches."""
    _parts(jsonl_corpus, tmp_path, 3, [1, 0, 2])
    m = read_manifest(str(single))
    epoch = m["splits"]["train"]["num_samples"] // 3
    for world_size in (1, 2):
        for rank in range(world_size):
            ours = _batches(tmp_path, rank=rank, world_size=world_size, n=3 * epoch // world_size)
            ref = _batches(single, rank=rank, world_size=world_size, n=3 * epoch // world_size)
            assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    ev = [b["input_ids"] for b in build_eval_loader(str(tmp_path), seq_len=32, batch_size=4)]
    ref = [b["input_ids"] for b in build_eval_loader(str(single), seq_len=32, batch_size=4)]
    assert len(ev) == len(ref) > 0 and all(torch.equal(a, b) for a, b in zip(ev, ref))


def test_per_file_packing_keeps_each_file_apart(jsonl_corpus, single):
    """Every unit's samples are its own file's documents in order (EOS after each), the first held-out
    document never in them; the last partial sample of each file is dropped."""
    tok = load_tokenizer(jsonl_corpus.tok)
    m = read_manifest(str(single))
    assert m["version"] == 2 and m["options"]["per_file"] is True
    per_file = len(jsonl_corpus.docs) // 4
    for f in range(4):
        docs = jsonl_corpus.docs[f * per_file : (f + 1) * per_file]
        for split in ("train", "val"):
            entries = [e for e in m["splits"][split]["shards"] if e["unit"] == f]
            got = np.concatenate(
                [
                    a
                    for e in entries
                    for a in read_shard(os.path.join(single, e["name"]), e, seq_len=32, dtype="uint16")
                ]
            )
            cuts = np.flatnonzero(got == tok.eos_id) + 1
            texts = [tok.decode(seg[:-1].tolist()) for seg in np.split(got, cuts)[:-1]]
            assert texts and all(t in docs for t in texts)
            order = [docs.index(t) for t in texts]
            assert order == sorted(order)  # in file order, no document twice
            if split == "val":
                held_out = set(order)
    train_docs = sum(i["documents"] for i in m["inputs"])
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == train_docs == 240
    assert 0.04 < m["splits"]["val"]["documents"] / train_docs < 0.2 and held_out


def test_partition_errors(jsonl_corpus, tmp_path):
    kw = dict(
        tokenizer=jsonl_corpus.tok,
        inputs=[jsonl_corpus.dir],
        out_dir=str(tmp_path),
        seq_len=32,
        progress=False,
    )
    with pytest.raises(DataError, match="--num-parts needs --per-file"):
        make_shards(num_parts=2, part=0, **kw)
    with pytest.raises(DataError, match=r"--part must be in \[0, --num-parts=2\), got 2"):
        make_shards(num_parts=2, part=2, per_file=True, **kw)
    with pytest.raises(DataError, match="--num-parts 5 is more than the 4 input file"):
        make_shards(num_parts=5, part=0, per_file=True, **kw)
    with pytest.raises(DataError, match="with --per-file use --val-fraction"):
        make_shards(per_file=True, val_docs=3, **kw)
    make_shards(num_parts=2, part=0, per_file=True, **kw)
    other = r"part 1 was made with other inputs or arguments than part 0 \(seq_len: 32 -> 16\)"
    with pytest.raises(DataError, match=other):  # another run's part: its own merge attempt refuses
        make_shards(num_parts=2, part=1, per_file=True, **{**kw, "seq_len": 16})
    with pytest.raises(DataError, match=other):
        merge_parts(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no part manifests"):
        merge_parts(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        merge_parts(str(tmp_path / "missing"))


def test_assign_parts_deals_files_by_size():
    sizes = [100, 5, 5, 60, 40, 1, 1, 90]
    part = assign_parts(sizes, 3)
    assert part == assign_parts(sizes, 3) and sorted(set(part)) == [0, 1, 2]
    loads = [sum(s for s, p in zip(sizes, part) if p == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(sizes)
    assert assign_parts([7, 7, 7, 7], 4) == [0, 1, 2, 3]
