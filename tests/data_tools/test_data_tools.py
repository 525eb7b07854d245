"""data_tools: tokenizer training, make-shards, verify/inspect and the bad-input errors (CPU, fast)."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from data_tools import DataError, load_tokenizer, make_shards, read_manifest, read_shard, train_tokenizer
from data_tools.cli import main as cli_main
from data_tools.corpus import expand_inputs, iter_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bag".split()


def _doc(rng: random.Random, i: int) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 6))]
    return f"Document {i}.\n" + "\n".join(lines)  # unique, multi-line


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """10 .txt docs, 20 .jsonl docs, 10 .jsonl.gz docs; returns (dir, files, docs in input order)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [_doc(rng, i) for i in range(40)]
    files = []
    for i in range(10):
        p = d / f"a{i:02d}.txt"
        p.write_text(docs[i])
        files.append(str(p))
    p = d / "b.jsonl"
    p.write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(docs[10:30])))
    files.append(str(p))
    p = d / "c.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in docs[30:]))
    files.append(str(p))
    return d, files, docs


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    _, files, _ = corpus
    out = tmp_path_factory.mktemp("tok")
    docs = (t for _, t in iter_corpus(expand_inputs(files)))
    train_tokenizer(docs, str(out), vocab_size=320, byte_fallback=True, num_threads=1)
    return str(out)


def _stream(shard_dir: str, split: str) -> np.ndarray:
    m = read_manifest(shard_dir)
    arrays = [
        a
        for e in m["splits"][split]["shards"]
        for a in read_shard(os.path.join(shard_dir, e["name"]), e, seq_len=m["seq_len"], dtype=m["dtype"])
    ]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def test_corpus_reading(corpus):
    d, files, docs = corpus
    assert [t for _, t in iter_corpus(files)] == docs
    assert expand_inputs([str(d)]) == sorted(files)
    two = d / "two.txt"
    two.write_text("first doc\n\nsecond doc\n\n\n")
    assert [t for _, t in iter_corpus([str(two)], doc_sep="\n\n")] == ["first doc", "second doc"]
    two.unlink()


def test_tokenizer_round_trip(tok_dir, corpus):
    _, _, docs = corpus
    tok = load_tokenizer(tok_dir)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 320
    assert tok.identity.startswith("sentencepiece:")
    assert load_tokenizer(os.path.join(tok_dir, "tokenizer.model")).identity == tok.identity
    meta = json.load(open(os.path.join(tok_dir, "tokenizer_meta.json")))
    assert tok.identity.endswith(meta["sha256"])
    for text in docs[:5] + ["  leading spaces, tabs\tand ünïcödé ✓\n\nend"]:
        assert tok.decode(tok.encode(text)) == text


def test_hf_tokenizer_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.kind == "hf" and tok.identity.startswith("hf:")
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, len(vocab))
    ids = tok.encode("the lazy dog")
    assert ids == [vocab["the"], vocab["lazy"], vocab["dog"]] and tok.decode(ids) == "the lazy dog"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 4))
    m = make_shards(str(tmp_path), [str(text)], str(tmp_path / "s"), seq_len=8, progress=False)
    assert m["tokenizer"]["identity"] == tok.identity and m["splits"]["train"]["num_samples"] == 8


def test_train_tokenizer_cli(corpus, tmp_path, capsys):
    _, files, docs = corpus
    out = tmp_path / "tok"
    args = [
        "--vocab-size",
        "60",
        "--model-type",
        "unigram",
        "--no-byte-fallback",
        "--special-tokens",
        "<sep>",
    ]
    rc = cli_main(
        ["train-tokenizer", "--input", *files, "--out", str(out), *args, "--workers", "1", "--no-progress"]
    )
    assert rc == 0 and "identity sentencepiece:" in capsys.readouterr().out
    meta = json.load(open(out / "tokenizer_meta.json"))
    assert (
        meta["model_type"] == "unigram"
        and meta["byte_fallback"] is False
        and "<sep>" in meta["special_tokens"]
    )
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 60 and tok.decode(tok.encode(docs[0])) == docs[0]
    assert tok.sp.piece_to_id("<sep>") in tok.encode("dog<sep>fox")


def test_shards_decode_back_to_input(tok_dir, corpus, tmp_path):
    _, files, docs = corpus
    tok = load_tokenizer(tok_dir)
    out = str(tmp_path / "shards")
    m = make_shards(tok_dir, files, out, seq_len=32, shard_samples=7, workers=2, progress=False)
    expected = np.concatenate([np.array(tok.encode(t) + [tok.eos_id]) for t in docs])
    got = _stream(out, "train")
    n = len(expected) // 32 * 32
    assert m["dtype"] == "uint16" and m["splits"]["train"]["num_samples"] == n // 32
    assert m["splits"]["train"]["dropped_tokens"] == len(expected) - n
    assert m["total_tokens"] == n and m["tokenizer"]["identity"] == tok.identity
    np.testing.assert_array_equal(got, expected[:n])
    # decoding document by document gives the input text back
    cuts = np.flatnonzero(got == tok.eos_id) + 1
    assert [tok.decode(seg[:-1].tolist()) for seg in np.split(got, cuts)[:-1]] == docs[: len(cuts)]
    assert sorted(os.listdir(out)) == ["make-shards.progress.jsonl", "manifest.json"] + [
        f"train-{i:06d}.tar" for i in range(len(os.listdir(out)) - 2)
    ]


def test_val_split_is_whole_documents(tok_dir, corpus, tmp_path):
    _, files, docs = corpus
    tok = load_tokenizer(tok_dir)
    m = make_shards(
        tok_dir, files, str(tmp_path), seq_len=16, shard_samples=50, val_docs=6, seed=3, progress=False
    )
    assert m["splits"]["val"]["documents"] == 6 and m["splits"]["train"]["documents"] == 34

    def whole_docs(split):
        s = _stream(str(tmp_path), split)
        return [
            tok.decode(seg[:-1].tolist()) for seg in np.split(s, np.flatnonzero(s == tok.eos_id) + 1)[:-1]
        ]

    val, train = whole_docs("val"), whole_docs("train")
    assert 5 <= len(val) <= 6 and not set(val) & set(train) and set(val) | set(train) <= set(docs)
    m2 = make_shards(tok_dir, files, str(tmp_path / "s4"), seq_len=16, val_docs=6, seed=4, progress=False)
    assert m2["splits"]["val"]["shards"][0]["sha256"] != m["splits"]["val"]["shards"][0]["sha256"]


def test_make_shards_deterministic(tok_dir, corpus, tmp_path):
    _, files, _ = corpus
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_shards(tok_dir, files, a, seq_len=24, shard_samples=5, val_fraction=0.2, workers=2, progress=False)
    make_shards(tok_dir, files, b, seq_len=24, shard_samples=5, val_fraction=0.2, workers=1, progress=False)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len(names) > 3
    for n in names:
        assert open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read(), n


def test_verify_and_inspect_cli(tok_dir, corpus, tmp_path, capsys):
    _, files, _ = corpus
    out = str(tmp_path / "s")
    rc = cli_main(["make-shards", "--tokenizer", tok_dir, "--input", *files, "--out", out, "--seq-len", "32",
                   "--shard-samples", "8", "--val-fraction", "0.1", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert cli_main(["verify", out, "--no-progress"]) == 0
    assert cli_main(["inspect", out, "--samples", "1"]) == 0
    assert "Document 0." in capsys.readouterr().out
    # flip one byte inside a sample of the second shard
    victim = os.path.join(out, "train-000001.tar")
    data = bytearray(open(victim, "rb").read())
    data[600] ^= 0x01
    open(victim, "wb").write(bytes(data))
    os.remove(os.path.join(out, "train-000002.tar"))
    assert cli_main(["verify", out, "--no-progress", "--workers", "1"]) == 1
    text = capsys.readouterr().out
    assert "train-000001.tar" in text and "sha256" in text
    assert "train-000002.tar" in text and "missing" in text
    assert "train-000000.tar" not in text


def test_cli_subprocess_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-m", "data_tools", "verify", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "error:" in r.stderr and "manifest.json" in r.stderr


# ----------------------------------------------------------------------------------------------- bad input
def _bad(tmp_path, tok, inputs, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        make_shards(tok, [str(p) for p in inputs], str(out), progress=False, **{"seq_len": 16, **kw})
    # nothing left that looks valid
    assert not out.exists() or not [n for n in os.listdir(out) if n.endswith((".tar", ".json"))]


def test_missing_and_unreadable_files(tok_dir, tmp_path):
    _bad(tmp_path, tok_dir, [tmp_path / "nope.txt"], "nope.txt.*does not exist")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 50)[:30])
    _bad(tmp_path, tok_dir, [broken], "cannot read input file.*broken.jsonl.gz")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    _bad(tmp_path, tok_dir, [latin1], "latin1.txt.*UTF-8")


def test_jsonl_errors(tok_dir, tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    _bad(tmp_path, tok_dir, [p], r"x.jsonl:2: no field 'text'")
    p.write_text('{"text": "ok"}\n{not json\n')
    _bad(tmp_path, tok_dir, [p], r"x.jsonl:2: invalid JSON")


def test_empty_corpus(tok_dir, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n\n")
    _bad(tmp_path, tok_dir, [p], "empty corpus")


def test_seq_len_too_long(tok_dir, corpus, tmp_path):
    _, files, _ = corpus
    _bad(tmp_path, tok_dir, files[:1], "cannot fill a single sample", seq_len=100_000)
    _bad(tmp_path, tok_dir, files, "val split.*cannot fill", seq_len=512, val_docs=1)


def test_unencodable_text(corpus, tmp_path):
    _, files, _ = corpus
    tok = tmp_path / "nobf"
    docs = (t for _, t in iter_corpus(files))
    train_tokenizer(
        docs, str(tok), vocab_size=120, byte_fallback=False, character_coverage=1.0, num_threads=1
    )
    greek = tmp_path / "greek.txt"
    greek.write_text("αβγδε ζηθικ λμνξο " * 20)
    _bad(tmp_path, str(tok), [greek], "greek.txt.*<unk>.*cannot encode")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="neither tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="empty"):
        train_tokenizer(iter(["", "  "]), str(tmp_path / "t"), vocab_size=100)


def test_same_run_again_is_a_no_op_and_another_is_refused(tok_dir, corpus, tmp_path):
    _, files, _ = corpus
    m = make_shards(tok_dir, files, str(tmp_path), seq_len=64, progress=False)
    before = {n: os.stat(tmp_path / n).st_mtime_ns for n in os.listdir(tmp_path) if n.endswith(".tar")}
    assert make_shards(tok_dir, files, str(tmp_path), seq_len=64, progress=False) == m
    assert before == {
        n: os.stat(tmp_path / n).st_mtime_ns for n in os.listdir(tmp_path) if n.endswith(".tar")
    }
    with pytest.raises(DataError, match=r"seq_len: 64 -> 128.*--overwrite"):
        make_shards(tok_dir, files, str(tmp_path), seq_len=128, progress=False)
    assert read_manifest(str(tmp_path)) == m  # the refused run touched nothing
    make_shards(tok_dir, files, str(tmp_path), seq_len=128, overwrite=True, progress=False)
    assert read_manifest(str(tmp_path))["seq_len"] == 128


def test_shards_of_another_tool_are_not_overwritten(tok_dir, corpus, tmp_path):
    _, files, _ = corpus
    (tmp_path / "train-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(DataError, match="already holds shards; pass --overwrite"):
        make_shards(tok_dir, files, str(tmp_path), seq_len=64, progress=False)
    assert (tmp_path / "train-000000.tar").read_bytes() == b"someone else's"


def test_decode_maps_ids_past_the_tokenizer_to_unk(tmp_path):
    from data_tools import load_tokenizer, train_tokenizer

    docs = [f"line {i} of a small corpus with words" for i in range(200)]
    train_tokenizer(iter(docs), str(tmp_path / "tok"), vocab_size=320, byte_fallback=True, num_threads=1)
    tok = load_tokenizer(str(tmp_path / "tok"))
    ids = tok.encode("line 7")
    assert tok.decode(ids) == "line 7"
    assert tok.decode([*ids, tok.vocab_size + 5]) == tok.decode([*ids, tok.unk_id])


def test_progress_bar_writes_nothing_into_a_log_file(monkeypatch):
    """make-shards' bars stay on a terminal: with stderr redirected to a file, no tqdm frames."""
    import io

    from data_tools import shards

    log = io.StringIO()  # isatty() is False, like a log file
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = shards.progress_bar(total=3, desc="shards", enabled=True)
    bar.update(3)
    bar.close()
    assert log.getvalue() == ""
