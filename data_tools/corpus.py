"""Reading raw documents from ``.txt`` / ``.jsonl`` files (optionally gzipped).

A ``.txt`` file is ONE document unless ``doc_sep`` is given, in which case it is split on that literal
separator (e.g. ``"\\n\\n"`` for blank-line separated blocks). A ``.jsonl`` file holds one document per
line, in the string field ``jsonl_field``. Whitespace-only documents are skipped. Documents are
numbered in input order (files in the order given; directories expanded recursively, sorted).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


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


def is_jsonl(path: str) -> bool:
    base = path[:-3] if path.endswith(".gz") else path
    return base.endswith(JSONL_SUFFIXES)


def _read_text(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as e:  # permission denied, truncated gzip, ...
        raise DataError(f"cannot read input file {path!r}: {e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"input file {path!r} is not valid UTF-8 ({e})") from e


def iter_documents(path: str, *, jsonl_field: str = "text", doc_sep: str | None = None) -> Iterator[str]:
    """Yield the non-empty documents of one input file (errors name the file, and the line for jsonl)."""
    text = _read_text(path)
    if is_jsonl(path):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or jsonl_field not in obj:
                raise DataError(f"{path}:{lineno}: no field {jsonl_field!r} (set --jsonl-field)")
            doc = obj[jsonl_field]
            if not isinstance(doc, str):
                raise DataError(
                    f"{path}:{lineno}: field {jsonl_field!r} is {type(doc).__name__}, not a string"
                )
            if doc.strip():
                yield doc
    else:
        parts = [text] if not doc_sep else text.split(doc_sep)
        for doc in parts:
            if doc.strip():
                yield doc


def iter_corpus(
    files: list[str], *, jsonl_field: str = "text", doc_sep: str | None = None
) -> Iterator[tuple[int, str]]:
    """(file index, document) over all files, in order."""
    for i, path in enumerate(files):
        for doc in iter_documents(path, jsonl_field=jsonl_field, doc_sep=doc_sep):
            yield i, doc
