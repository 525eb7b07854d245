"""What a make-shards run is: its options, how input files are dealt to parts, the files' names, and
how a manifest is assembled from what the run (or its parts) produced."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .shards import SPLITS, VERSION, VERSION_UNITS, build_manifest

PART_FORMAT = "dist_cacheaug.shards.part"


@dataclass(frozen=True)
class Options:
    """Everything that decides the output (``workers``, progress and overwrite do not)."""

    seq_len: int
    shard_samples: int = 1024
    val_fraction: float = 0.0
    val_docs: int | None = None
    text_field: str = "text"
    doc_sep: str | None = None
    seed: int = 0
    max_unk_fraction: float = 0.01
    per_file: bool = False

    def check(self) -> None:
        if self.seq_len < 2:
            raise DataError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.shard_samples < 1:
            raise DataError(f"--shard-samples must be >= 1, got {self.shard_samples}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_docs is not None and self.val_docs < 0:
            raise DataError(f"--val-docs must be >= 0, got {self.val_docs}")
        if self.per_file and self.val_docs is not None:
            raise DataError(
                "--val-docs needs the whole corpus counted first; with --per-file use --val-fraction"
            )

    def manifest_options(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shard_samples": self.shard_samples,
            "val_fraction": self.val_fraction,
            "val_docs": self.val_docs,
            "text_field": self.text_field,
            "doc_sep": self.doc_sep,
            "per_file": self.per_file,
        }


# ------------------------------------------------------------------------------------------- partitions
def assign_parts(sizes: list[int], num_parts: int) -> list[int]:
    """The part of every file: largest first, each to the part with the fewest bytes so far (ties: the
    lower file index, the lower part). Every part gets a file when there are at least ``num_parts``."""
    heap = [(0, p) for p in range(num_parts)]
    part = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, p = heapq.heappop(heap)
        part[i] = p
        heapq.heappush(heap, (load + sizes[i], p))
    return part


def part_tag(part: int, num_parts: int) -> str:
    return f"part-{part:04d}-of-{num_parts:04d}"


def journal_name(part: int | None, num_parts: int) -> str:
    return (
        "make-shards.progress.jsonl"
        if part is None
        else f"make-shards.{part_tag(part, num_parts)}.progress.jsonl"
    )


def part_manifest_name(part: int, num_parts: int) -> str:
    return f"manifest.{part_tag(part, num_parts)}.json"


def zero_totals() -> dict[str, dict[str, int]]:
    return {s: {"documents": 0, "doc_tokens": 0, "dropped_tokens": 0} for s in SPLITS}


def assemble_manifest(
    *, opts: Options, files: list[str], tokenizer: dict, dtype: str, results: list[dict]
) -> dict[str, Any]:
    """The manifest of a whole corpus from the results of its runs (one, or the N parts): per split the
    summed counts and the shard entries in unit order. Checks what only the whole corpus can tell."""
    totals = zero_totals()
    entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
    file_stats: dict[int, dict] = {}
    for r in results:
        for s in SPLITS:
            for k in totals[s]:
                totals[s][k] += r["totals"][s][k]
            entries[s] += r["entries"][s]
        file_stats.update({int(f): st for f, st in r["files"].items()})
    if sum(t["documents"] for t in totals.values()) == 0:
        raise DataError(f"empty corpus: no non-blank documents in {len(files)} input file(s)")
    if opts.val_fraction > 0 and totals["val"]["documents"] == 0:
        raise DataError(
            f"--val-fraction {opts.val_fraction} held out no document of {totals['train']['documents']} "
            "(raise it)"
        )
    split_info = {}
    for s in SPLITS:
        shards = sorted(entries[s], key=lambda e: (e.get("unit") or 0, e["first_sample"]))
        n = sum(e["num_samples"] for e in shards)
        if totals[s]["documents"] and n == 0:
            hint = "" if s == "train" else " (raise --val-fraction / --val-docs)"
            per = " per input file (--per-file)" if opts.per_file else ""
            raise DataError(
                f"the {s} split has {totals[s]['doc_tokens']} tokens (EOS included), fewer than "
                f"--seq-len {opts.seq_len}{per}: it cannot fill a single sample{hint}"
            )
        split_info[s] = {**totals[s], "num_samples": n, "num_tokens": n * opts.seq_len, "shards": shards}
    inputs = [{"path": p, **file_stats[f]} for f, p in enumerate(files)]
    return build_manifest(
        seq_len=opts.seq_len,
        dtype=dtype,
        tokenizer=tokenizer,
        options=opts.manifest_options(),
        inputs=inputs,
        split_info=split_info,
        version=VERSION_UNITS if opts.per_file else VERSION,
    )
