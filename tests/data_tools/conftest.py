"""Fixtures shared by the data_tools tests: a small multi-file corpus with its tokenizer, runs of
make-shards killed at a chosen point, and a dataset's bytes for identity checks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
from types import SimpleNamespace

import pytest

from data_tools import make_shards, train_tokenizer
from data_tools.faults import faults_env

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bag".split()


def make_docs(n: int, seed: int, max_words: int = 120) -> list[str]:
    """Unique, multi-line documents of 5..max_words words (some longer than a 32-token sample)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, max_words))]
        lines = [" ".join(words[k : k + 9]) for k in range(0, len(words), 9)]
        docs.append(f"Document {seed}-{i}.\n" + "\n".join(lines))
    return docs


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory):
    """Four .jsonl files of 60 documents each and a 320-piece sentencepiece tokenizer trained on them:
    ``.dir`` (the corpus directory), ``.files``, ``.docs`` (all, in input order), ``.tok``."""
    root = tmp_path_factory.mktemp("jsonl_corpus")
    corpus = root / "corpus"
    corpus.mkdir()
    docs, files = [], []
    for k in range(4):
        part = make_docs(60, seed=k)
        path = corpus / f"part{k}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(part)))
        docs += part
        files.append(str(path))
    tok = root / "tok"
    train_tokenizer(iter(docs), str(tok), vocab_size=320, byte_fallback=True, num_threads=1)
    return SimpleNamespace(dir=str(corpus), files=files, docs=docs, tok=str(tok))


def dataset_bytes(shard_dir) -> dict[str, bytes]:
    """What a trainer reads: manifest.json and every shard, by name."""
    names = sorted(n for n in os.listdir(shard_dir) if n == "manifest.json" or n.endswith(".tar"))
    return {n: open(os.path.join(shard_dir, n), "rb").read() for n in names}


@pytest.fixture(scope="session")
def read_dataset():
    return dataset_bytes


def _killed_child(kill_at: str, kwargs: dict) -> None:
    os.environ.update(faults_env(make_kill_at=kill_at))
    make_shards(**kwargs)


@pytest.fixture(scope="session")
def run_killed():
    """``run_killed(kill_at, **make_shards_kwargs)``: make_shards in a forked process that SIGKILLs
    itself at ``kill_at`` (data_tools.make._KillHook); returns the exit code (-9: killed there)."""

    def run(kill_at: str, **kwargs) -> int:
        p = mp.get_context("fork").Process(
            target=_killed_child, args=(kill_at, {"progress": False, **kwargs})
        )
        p.start()
        p.join(120)
        assert p.exitcode is not None, "the killed run hung"
        return p.exitcode

    return run
