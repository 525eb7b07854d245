"""Reading raw documents from the formats corpora come in, chosen by file extension.

=====================================  ================================================================
``*.parquet``                          one document per row, in the string column ``text_field``; read
                                       one row group at a time (pyarrow), never the whole file
``*.jsonl`` ``*.ndjson`` ``*.json``    one JSON object per line, the document in field ``text_field``
                                       (Dolma ships ``.json.gz``, RedPajama ``.jsonl.zst``)
anything else (``*.txt``, ...)         ONE document per file, unless ``doc_sep`` is given: then split on
                                       that literal separator (e.g. ``"\\n\\n"``)
=====================================  ================================================================

JSON lines and text may be compressed: ``.gz`` (gzip) or ``.zst`` / ``.zstd`` (zstandard, multi-frame
files included). JSON lines are streamed line by line, so a file never has to fit in memory.
Whitespace-only documents are skipped. Documents are numbered in input order (files in the order given;
directories expanded recursively, sorted). Every error names the file, and the line (JSON lines) or the
row group and row (Parquet).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIX = ".parquet"
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_BLOCK = 1 << 20


def expand_inputs(paths: list[str]) -> list[str]:
    """Files in the given order; a directory contributes its files recursively in sorted order."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(root, name)
                for root, _dirs, names in os.walk(p)
                for name in names
                if not name.startswith(".")
            )
            if not found:
                raise DataError(f"input directory {p!r} contains no files")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"input file {p!r} does not exist")
    if not files:
        raise DataError("no input files given")
    return files


def input_format(path: str) -> tuple[str, str | None]:
    """(``"parquet"`` | ``"jsonl"`` | ``"text"``, compression or None) from the file name."""
    base, compression = path, None
    for suffix, name in COMPRESSIONS.items():
        if path.endswith(suffix):
            base, compression = path[: -len(suffix)], name
            break
    if base.endswith(PARQUET_SUFFIX):
        if compression:
            raise DataError(f"input file {path!r}: Parquet compresses its pages itself; decompress the file")
        return "parquet", None
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    return "text", compression


# ------------------------------------------------------------------------------------ byte streams
class _ZstdRaw(io.RawIOBase):
    """Decompressed bytes of a zstd file, frame after frame.

    zstandard's own ``stream_reader`` ends quietly when a file is cut off inside a frame; this reader
    raises instead, so a truncated download is an error and not a silently shorter corpus. Corrupt data
    raises zstandard's ``ZstdError`` (frames written with checksums, the ``zstd`` tool's default, catch
    any flipped bit)."""

    def __init__(self, f):
        import zstandard

        self._f, self._dctx = f, zstandard.ZstdDecompressor()
        self._obj, self._fed = self._dctx.decompressobj(), False
        self._out, self._pos = b"", 0  # decompressed bytes not yet handed out: self._out[self._pos:]

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        chunks = []
        while not chunks:
            raw = self._f.read(_BLOCK)
            if not raw:
                if self._fed and not self._obj.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return
            while raw:
                self._fed = True
                chunks.append(self._obj.decompress(raw))
                if not self._obj.eof:
                    break
                raw = self._obj.unused_data  # the next frame starts here
                self._obj, self._fed = self._dctx.decompressobj(), False
            chunks = [c for c in chunks if c]
        self._out, self._pos = b"".join(chunks), 0

    def readinto(self, buf) -> int:
        if self._pos >= len(self._out):
            self._fill()
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_bytes(path: str, compression: str | None):
    """A buffered binary stream of the decompressed file."""
    try:
        if compression == "gzip":
            return gzip.open(path, "rb")
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read input file {path!r}: {e}") from e
    if compression == "zstd":
        return io.BufferedReader(_ZstdRaw(f), _BLOCK)
    return f


def _decode_errors():
    """Exception types that mean the compressed bytes are bad (truncated or corrupt)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _read_text(path: str, compression: str | None) -> str:
    stream = _open_bytes(path, compression)
    try:
        with stream:
            raw = stream.read()
    except _decode_errors() as e:  # permission denied, truncated gzip/zstd, corrupt frame, ...
        raise DataError(f"cannot read input file {path!r}: {e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"input file {path!r} is not valid UTF-8 ({e})") from e


# ------------------------------------------------------------------------------------ documents
def _jsonl_documents(path: str, compression: str | None, field: str) -> Iterator[str]:
    """Lines are split on ``\\n`` only: U+2028 and other Unicode line breaks may appear raw inside JSON
    strings (``str.splitlines`` would cut a document there)."""
    stream = _open_bytes(path, compression)
    lineno = 0
    with stream:
        lines = iter(stream)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except _decode_errors() as e:
                raise DataError(
                    f"cannot read input file {path!r} after line {lineno} ({type(e).__name__}: {e})"
                ) from e
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e})") from e
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}; one JSON object per line)") from e
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(f"{path}:{lineno}: no field {field!r} (set --text-field)")
            doc = obj[field]
            if not isinstance(doc, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(doc).__name__}, not a string")
            if doc.strip():
                yield doc


def _parquet_file(path: str, field: str):
    """The opened ``pyarrow.parquet.ParquetFile``, with ``field`` checked to be a string column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)  # checks pages written with CRCs
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}; set --text-field)")
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise DataError(f"{path}: column {field!r} is {typ}, not a string column")
    return pf


def check_input(path: str, *, text_field: str = "text") -> None:
    """Cheap checks before any work: a Parquet file's footer and text column (other formats can only be
    checked by reading them)."""
    if input_format(path)[0] == "parquet":
        _parquet_file(path, text_field)


def _parquet_documents(path: str, field: str) -> Iterator[str]:
    import pyarrow as pa

    pf = _parquet_file(path, field)
    for rg in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(rg, columns=[field]).column(0)
            docs = column.to_pylist()
        except (OSError, ValueError, pa.ArrowException) as e:  # corrupt pages, bad UTF-8, ...
            raise DataError(f"{path}: row group {rg}: cannot read column {field!r} ({e})") from e
        for row, doc in enumerate(docs):
            if doc is None:
                raise DataError(f"{path}: row group {rg}, row {row}: column {field!r} is null")
            if doc.strip():
                yield doc


def iter_documents(path: str, *, text_field: str = "text", doc_sep: str | None = None) -> Iterator[str]:
    """Yield the non-empty documents of one input file (errors name the file and the line/row group)."""
    kind, compression = input_format(path)
    if kind == "parquet":
        yield from _parquet_documents(path, text_field)
    elif kind == "jsonl":
        yield from _jsonl_documents(path, compression, text_field)
    else:
        text = _read_text(path, compression)
        for doc in [text] if not doc_sep else text.split(doc_sep):
            if doc.strip():
                yield doc


def iter_corpus(
    files: list[str], *, text_field: str = "text", doc_sep: str | None = None
) -> Iterator[tuple[int, str]]:
    """(file index, document) over all files, in order."""
    for i, path in enumerate(files):
        for doc in iter_documents(path, text_field=text_field, doc_sep=doc_sep):
            yield i, doc
