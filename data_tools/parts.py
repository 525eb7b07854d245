"""Merging the parts of a partitioned make-shards run into one ``manifest.json``."""

from __future__ import annotations

import json
import os
from typing import Any

from . import journal
from .errors import DataError
from .plan import PART_FORMAT, Options, assemble_manifest
from .shards import MANIFEST_NAME, SPLITS, write_json_atomic


def merge_parts(out_dir: str, *, if_complete: bool = False) -> dict[str, Any] | None:
    """Write ``manifest.json`` from the part manifests of a partitioned run (all N must be there).

    With ``if_complete``, missing parts return None instead of raising (what every part does after
    finishing: the last one merges)."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise DataError(f"shard directory {out_dir!r} does not exist")
    parts: dict[int, dict] = {}
    counts = set()
    for name in sorted(os.listdir(out_dir)):
        if not (name.startswith("manifest.part-") and name.endswith(".json")):
            continue
        path = os.path.join(out_dir, name)
        try:
            with open(path) as fh:
                pm = json.load(fh)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read part manifest: {e}") from e
        if not isinstance(pm, dict) or pm.get("format") != PART_FORMAT:
            raise DataError(f"{path}: not a make-shards part manifest")
        counts.add(pm["num_parts"])
        parts[pm["part"]] = pm
    if not parts:
        raise DataError(
            f"{out_dir!r} holds no part manifests (make-shards --num-parts N --part i writes them)"
        )
    if len(counts) > 1:
        raise DataError(f"{out_dir!r} holds parts of runs with different --num-parts {sorted(counts)}")
    (n,) = counts
    missing = [i for i in range(n) if i not in parts]
    if missing:
        if if_complete:
            return None
        raise DataError(f"{out_dir!r}: part(s) {', '.join(map(str, missing))} of {n} are not finished yet")
    first = parts[0]
    for i, pm in parts.items():
        if pm["fingerprint"] != first["fingerprint"]:
            changes = journal.describe_changes(first["fingerprint"], pm["fingerprint"])
            raise DataError(
                f"{out_dir!r}: part {i} was made with other inputs or arguments than part 0 ({changes}); "
                "rerun it with the same ones"
            )
    inputs = first["fingerprint"]["inputs"]
    covered = sorted(int(f) for pm in parts.values() for f in pm["files"])
    if covered != list(range(len(inputs))):
        raise DataError(f"{out_dir!r}: the parts do not cover every input file exactly once")
    for pm in parts.values():
        for s in SPLITS:
            for e in pm["entries"][s]:
                p = os.path.join(out_dir, e["name"])
                if not os.path.isfile(p) or os.path.getsize(p) != e["bytes"]:
                    raise DataError(f"shard {p!r} of part {pm['part']} is missing or has the wrong size")
    opts = Options(**first["fingerprint"]["options"])
    manifest = assemble_manifest(
        opts=opts,
        files=[p for p, *_ in inputs],
        tokenizer=first["tokenizer"],
        dtype=first["dtype"],
        results=[parts[i] for i in range(n)],
    )
    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest
