"""The progress journal of a make-shards run: what lets a killed run continue where it stopped.

One file per run (per part of a partitioned run) in the output directory, one JSON object per line:

    {"kind": "header", ...}   written once, atomically, before the first shard: the run's fingerprint
                              (tokenizer, options, every input's path/size/mtime) and its plan
    {"kind": "shard", ...}    appended after a shard was renamed into place: its manifest entry and
                              everything needed to continue right after it (make.py, ``_Run``)
    {"kind": "file", ...}     after the last document of an input file: that file's counts
    {"kind": "unit", ...}     after a unit's last, partial shards (``--per-file``: after each file)

Every line is written with one ``write`` and fsynced. A kill can leave the last line cut off; ``load``
drops it, and everything after the last complete checkpoint (a shard or unit line), and truncates the
file there, so the journal describes exactly the shards the resumed run keeps.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import DataError
from .shards import temp_name

JOURNAL_FORMAT = "dist_cacheaug.make_shards.journal"
CHECKPOINTS = ("shard", "unit")


def _encode(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()


def create(path: str, header: dict[str, Any]) -> None:
    """Start a journal holding only ``header`` (a temp file renamed into place: complete or absent)."""
    tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
    with open(tmp, "wb") as f:
        f.write(_encode({"kind": "header", "format": JOURNAL_FORMAT, **header}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str) -> dict[str, Any] | None:
    """The header of the journal at ``path``, or None when there is none (or it is unreadable: a journal
    is only ever created whole, so that means it is not one of ours)."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
        header = json.loads(first)
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        return None
    return header


def load(path: str) -> list[dict[str, Any]]:
    """The records after the header, up to and including the last checkpoint; the file is truncated
    after it (a cut-off line and records the killed run wrote after its last checkpoint go)."""
    with open(path, "rb") as f:
        data = f.read()
    records, keep, offset = [], [], 0
    for raw in data.splitlines(keepends=True):
        offset += len(raw)
        if not raw.endswith(b"\n"):
            break  # cut off by the kill
        try:
            rec = json.loads(raw)
        except ValueError:
            break
        if rec.get("kind") == "header":
            continue
        records.append(rec)
        if rec.get("kind") in CHECKPOINTS:
            keep, end = list(records), offset
    if not keep:
        end = len(data.split(b"\n", 1)[0]) + 1  # the header line only
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    return keep


class Writer:
    """Appends records to an existing journal."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: dict[str, Any]) -> None:
        line = _encode(record)
        if os.write(self._fd, line) != len(line):
            raise OSError(f"{self.path}: short write")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two run fingerprints, for the refusal message."""
    out = []
    if old.get("tokenizer") != new.get("tokenizer"):
        out.append("the tokenizer")
    for key in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(key), new.get("options", {}).get(key)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    a_in, b_in = old.get("inputs", []), new.get("inputs", [])
    if [p for p, *_ in a_in] != [p for p, *_ in b_in]:
        out.append(f"the input files ({len(a_in)} before, {len(b_in)} now, or in another order)")
    else:
        changed = [p for (p, *x), (_, *y) in zip(a_in, b_in) if x != y]
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            out.append(f"input file(s) changed since (size or mtime): {', '.join(changed[:3])}{more}")
    for key in sorted((set(old) | set(new)) - {"tokenizer", "options", "inputs"}):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return "; ".join(out) or "the journal's format"


def refuse(out_dir: str, old: dict[str, Any], new: dict[str, Any]) -> DataError:
    return DataError(
        f"{out_dir!r} holds an unfinished or finished make-shards run with other inputs or arguments "
        f"({describe_changes(old, new)}); rerun with the original ones to continue it, or pass "
        "--overwrite to start over"
    )
