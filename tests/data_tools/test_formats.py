"""Input formats: Parquet (row group by row group), JSON lines (.jsonl/.ndjson/.json, plain, .gz, .zst)
and text give the same documents and the same shards; every bad input is one clear error naming the
file (and line / row group), with nothing left that looks like a dataset."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools import DataError, load_tokenizer, make_shards, read_manifest, read_shard
from data_tools.cli import main as cli_main
from data_tools.corpus import iter_documents


@pytest.fixture(scope="module")
def docs(jsonl_corpus):
    return jsonl_corpus.docs[:70]


def _jsonl(docs, **extra) -> bytes:
    return "".join(
        json.dumps({"meta": {"n": i}, **extra, "text": t}) + "\n" for i, t in enumerate(docs)
    ).encode()


def _zst(data: bytes, frames: int = 3) -> bytes:
    """Several frames with checksums, as `zstd` and multi-threaded writers produce."""
    c = zstandard.ZstdCompressor(write_checksum=True)
    cut = [len(data) * k // frames for k in range(frames + 1)]
    return b"".join(c.compress(data[a:b]) for a, b in zip(cut, cut[1:]))


def _parquet(path, docs, column="text", row_group_size=16, **kw):
    table = pa.table({"id": list(range(len(docs))), column: docs, "score": [0.5] * len(docs)})
    pq.write_table(table, path, row_group_size=row_group_size, **kw)


def write_all_formats(d, docs) -> dict[str, dict]:
    """The same documents in every format; returns {file: iter_documents kwargs}."""
    (d / "a.jsonl").write_bytes(_jsonl(docs))
    (d / "a.ndjson").write_bytes(_jsonl(docs))
    (d / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs)))
    (d / "a.json.gz").write_bytes(gzip.compress(_jsonl(docs)))  # Dolma's extension
    (d / "a.jsonl.zst").write_bytes(_zst(_jsonl(docs)))  # RedPajama's
    (d / "a.json.zstd").write_bytes(_zst(_jsonl(docs, id="x"), frames=1))
    (d / "a.txt").write_text("\n\n\n".join(docs))
    (d / "a.txt.zst").write_bytes(_zst("\n\n\n".join(docs).encode()))
    _parquet(d / "a.parquet", docs, column="content")  # FineWeb's
    files = {n: {} for n in ("a.jsonl", "a.ndjson", "a.jsonl.gz", "a.json.gz", "a.jsonl.zst", "a.json.zstd")}
    files.update({n: {"doc_sep": "\n\n\n"} for n in ("a.txt", "a.txt.zst")})
    files["a.parquet"] = {"text_field": "content"}
    return files


def test_every_format_gives_the_same_documents_and_shards(docs, jsonl_corpus, read_dataset, tmp_path):
    files = write_all_formats(tmp_path, docs)
    shards = {}
    for name, kw in files.items():
        assert list(iter_documents(str(tmp_path / name), **kw)) == docs, name
        out = tmp_path / f"shards-{name}"
        make_shards(jsonl_corpus.tok, [str(tmp_path / name)], str(out), seq_len=32, shard_samples=8,
                    val_fraction=0.1, workers=1, progress=False, **kw)  # fmt: skip
        shards[name] = {n: b for n, b in read_dataset(out).items() if n != "manifest.json"}
    assert len({tuple(s.items()) for s in shards.values()}) == 1 and len(shards["a.jsonl"]) > 3


def test_cli_text_field_for_parquet_and_jsonl(docs, jsonl_corpus, tmp_path, capsys):
    _parquet(tmp_path / "p.parquet", docs, column="body")
    (tmp_path / "j.jsonl.zst").write_bytes(_zst(_jsonl(docs).replace(b'"text"', b'"body"')))
    out = tmp_path / "s"
    rc = cli_main(["make-shards", "--tokenizer", jsonl_corpus.tok, "--input", str(tmp_path / "p.parquet"),
                   str(tmp_path / "j.jsonl.zst"), "--out", str(out), "--seq-len", "32", "--text-field", "body",
                   "--no-progress"])  # fmt: skip
    assert rc == 0 and "wrote" in capsys.readouterr().out
    m = read_manifest(str(out))
    assert [i["documents"] for i in m["inputs"]] == [len(docs), len(docs)] and m["options"][
        "text_field"
    ] == "body"


def test_unicode_line_breaks_inside_json_strings(tmp_path):
    """U+2028/U+2029/U+0085 are legal raw inside JSON strings; only "\\n" ends a JSON line."""
    docs = ["one\u2028two", "three\u2029four\x85five", "plain"]
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    assert list(iter_documents(str(p))) == docs


def test_parquet_is_read_one_row_group_at_a_time(docs, tmp_path, monkeypatch):
    _parquet(tmp_path / "p.parquet", docs, row_group_size=10)
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or original(self, i, **kw)
    )
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **kw: pytest.fail("read the whole file"))
    it = iter_documents(str(tmp_path / "p.parquet"))
    assert [next(it) for _ in range(12)] == docs[:12] and read == [0, 1]
    assert list(it) == docs[12:] and read == list(range(7))


def test_hf_tokenizer_with_a_vocabulary_past_uint16(tmp_path):
    """A 70k-entry HF fast tokenizer: ids above 65535 are stored as uint32 and read back exactly."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    ).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    words = rng.integers(0, 70_000, size=(30, 20))
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(f"w{i}" for i in row)}) + "\n" for row in words)
    )
    m = make_shards(
        str(tmp_path / "tok"), [str(tmp_path / "c.jsonl")], str(tmp_path / "s"), seq_len=21, progress=False
    )
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == len(vocab)
    e = m["splits"]["train"]["shards"][0]
    got = np.stack(read_shard(str(tmp_path / "s" / e["name"]), e, seq_len=21, dtype="uint32"))
    assert load_tokenizer(str(tmp_path / "tok")).eos_id == 2
    np.testing.assert_array_equal(got, np.concatenate([words + 3, np.full((30, 1), 2)], axis=1))
    assert got.max() > 65535


# ----------------------------------------------------------------------------------------------- bad input
def _bad(tmp_path, tok, inputs, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match) as e:
        make_shards(
            tok, [str(p) for p in inputs], str(out), progress=False, workers=1, **{"seq_len": 16, **kw}
        )
    assert "\n" not in str(e.value)
    assert not out.exists() or not os.listdir(out)  # nothing left, least of all something that looks valid
    return str(e.value)


def _corrupt_row_group(path, rg: int) -> None:
    group = pq.ParquetFile(path).metadata.row_group(rg)
    col = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "text")
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + col.total_compressed_size // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def test_bad_parquet(docs, jsonl_corpus, tmp_path):
    tok = jsonl_corpus.tok
    good = tmp_path / "good.parquet"
    _parquet(good, docs)
    _bad(tmp_path, tok, [good], r"good.parquet: no column 'body' \(columns: id, text, score; set --text-field\)",
         text_field="body")  # fmt: skip
    _bad(
        tmp_path,
        tok,
        [good],
        r"good.parquet: column 'score' is double, not a string column",
        text_field="score",
    )
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1" + b"\0" * 100)
    _bad(tmp_path, tok, [good, garbage], r"garbage.parquet: not a readable Parquet file")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-100])
    _bad(tmp_path, tok, [cut], r"cut.parquet: not a readable Parquet file")
    nulls = tmp_path / "nulls.parquet"
    _parquet(nulls, docs[:20] + [None] + docs[20:], row_group_size=8)
    _bad(tmp_path, tok, [nulls], r"nulls.parquet: row group 2, row 4: column 'text' is null")
    corrupt = tmp_path / "corrupt.parquet"
    _parquet(corrupt, docs, row_group_size=20, write_page_checksum=True)
    _corrupt_row_group(corrupt, 2)
    msg = _bad(tmp_path, tok, [corrupt], r"corrupt.parquet: row group 2: cannot read column 'text'")
    assert "CRC" in msg
    zipped = tmp_path / "x.parquet.gz"
    zipped.write_bytes(gzip.compress(good.read_bytes()))
    _bad(tmp_path, tok, [zipped], r"x.parquet.gz.*Parquet compresses its pages itself")


def test_bad_compressed_json_lines(docs, jsonl_corpus, tmp_path):
    tok = jsonl_corpus.tok
    data = _zst(_jsonl(docs), frames=1)
    flipped = tmp_path / "flipped.jsonl.zst"
    flipped.write_bytes(
        data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
    )
    _bad(
        tmp_path,
        tok,
        [flipped],
        r"cannot read input file '.*flipped.jsonl.zst' after line \d+ \(ZstdError: .*",
    )
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(data[: len(data) // 2])  # zstandard's own reader would end quietly here
    _bad(tmp_path, tok, [cut], r"cut.jsonl.zst' after line \d+ \(EOFError: the file ends inside a zstd frame")
    not_zstd = tmp_path / "plain.jsonl.zst"
    not_zstd.write_bytes(_jsonl(docs))
    _bad(tmp_path, tok, [not_zstd], r"plain.jsonl.zst' after line 0 \(ZstdError")
    gz = tmp_path / "cut.json.gz"
    gz.write_bytes(gzip.compress(_jsonl(docs) * 20)[:3000])
    _bad(tmp_path, tok, [gz], r"cut.json.gz' after line \d+ \(EOFError: Compressed file ended")
    latin1 = tmp_path / "latin1.jsonl.gz"
    latin1.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    _bad(tmp_path, tok, [latin1], r"latin1.jsonl.gz:2: not valid UTF-8")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    _bad(tmp_path, tok, [array], r"array.json:1: invalid JSON .*one JSON object per line")


def test_cli_bad_input_is_one_line(docs, jsonl_corpus, tmp_path, capsys):
    _parquet(tmp_path / "p.parquet", docs)
    rc = cli_main(["make-shards", "--tokenizer", jsonl_corpus.tok, "--input", str(tmp_path / "p.parquet"),
                   "--out", str(tmp_path / "s"), "--seq-len", "32", "--text-field", "body", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.count("\n") == 1
        and err.startswith("error: ")
        and "p.parquet: no column 'body'" in err
    )
