"""``make-shards``: tokenize a corpus, pack it into ``seq_len`` samples, write shards + manifest.

Packing units. By default the whole corpus is one unit: each split's token stream runs through all
input files, and the validation split is exactly ``round(val_fraction * documents)`` (or ``val_docs``)
documents drawn with ``seed`` from the whole corpus (a first pass counts the documents). With
``per_file`` every input file is a unit of its own: its documents are packed into samples and shards of
its own (its last partial sample is dropped), and each document is held out with probability
``val_fraction``, decided by a hash of (seed, file index, document index). Nothing then depends on
other files, which is what makes partitioning exact.

Partitions (``num_parts=N, part=i``, needs ``per_file``): the input files are dealt to N parts by size
(largest first, each to the part with the fewest bytes so far); part i processes its files only and
writes its shards, a journal and ``manifest.part-000i-of-000N.json`` into the shared output directory.
The part that finds all N part manifests present merges them into ``manifest.json`` (``merge_parts``;
idempotent, so parts finishing together are harmless). Shard names, entries and the merged manifest
are byte-identical to a single ``per_file`` run over the same inputs, so the training loader yields
the same samples in the same order.

Resume. After every complete shard the journal (journal.py) records the shard and a checkpoint: the
document being packed (``at``), per split the position (document, token offset) where its next sample
starts (``replay``), and the counts so far. A run started again with the same arguments reads the
journal, deletes what was written after the checkpoint, re-tokenizes only the documents behind the
open shards and continues: the output is byte-identical to an uninterrupted run. Other arguments or
changed inputs (path, size or mtime) are refused. ``workers`` is not part of the run: a run may be
resumed with another worker count. A bad input (DataError) removes the run's files: the same run would
fail the same way.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from . import journal
from .corpus import check_input, expand_inputs, iter_documents
from .errors import DataError
from .faults import read_faults
from .parts import merge_parts
from .plan import (
    PART_FORMAT,
    Options,
    assemble_manifest,
    assign_parts,
    journal_name,
    part_manifest_name,
    zero_totals,
)
from .shards import (
    MANIFEST_NAME,
    SPLITS,
    SplitWriter,
    dtype_for_vocab,
    final_name,
    is_shard_name,
    progress_bar,
    shard_unit,
    write_json_atomic,
)
from .tokenizer import Tokenizer, load_tokenizer

# ------------------------------------------------------------------------------------------- tokenizing
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _tokenize_chunk(chunk: list[tuple]) -> list[tuple]:
    """(file, doc, split, text or None) -> (file, doc, split, ids or None, unk count)."""
    tok = _WORKER_TOKENIZER
    out = []
    for f, j, split, text in chunk:
        if text is None:
            out.append((f, j, split, None, 0))
            continue
        ids = np.asarray(tok.encode(text), dtype=np.uint32)  # not int64: half the bytes back to the writer
        n_unk = int(np.count_nonzero(ids == tok.unk_id)) if tok.unk_id is not None else 0
        out.append((f, j, split, ids, n_unk))
    return out


def _chunks(events: Iterator[tuple], max_chars: int = 1 << 20, max_docs: int = 512):
    chunk, chars = [], 0
    for ev in events:
        chunk.append(ev)
        chars += len(ev[3]) if ev[3] else 0
        if chars >= max_chars or len(chunk) >= max_docs:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class Packer:
    """Concatenates token arrays and cuts fixed-length samples."""

    def __init__(self, seq_len: int):
        self.seq_len, self.parts, self.n = seq_len, [], 0

    def add(self, ids: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        """The samples ``ids`` completes, and for each how many of ``ids``' tokens it holds up to its end
        (every sample ends inside ``ids``: what was carried over is shorter than one sample)."""
        carried = self.n
        self.parts.append(ids)
        self.n += len(ids)
        if self.n < self.seq_len:
            return [], []
        flat = np.concatenate(self.parts)
        k = len(flat) // self.seq_len
        out = [flat[i * self.seq_len : (i + 1) * self.seq_len] for i in range(k)]
        rest = flat[k * self.seq_len :]
        self.parts, self.n = [rest], len(rest)
        return out, [(i + 1) * self.seq_len - carried for i in range(k)]


class _KillHook:
    """Fault ``"make_kill_at": "event:n"`` (``faults.py``) SIGKILLs this process at the n-th ``event``
    (sample: a sample written; renamed: a shard renamed, before its journal line; shard: after it;
    unit: after a unit line; done: before the manifest). How the tests kill a run at an exact point."""

    def __init__(self):
        spec = read_faults().get("make_kill_at", "")
        self.event, _, n = spec.partition(":")
        self.left = int(n or 1) if spec else 0

    def __call__(self, event: str) -> None:
        if self.left and event == self.event:
            self.left -= 1
            if not self.left:
                os.kill(os.getpid(), signal.SIGKILL)


def _is_val_hashed(seed: int, f: int, j: int, fraction: float) -> bool:
    """``per_file``'s held-out draw: a uniform number from (seed, file, document), no state to replay."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}/{f}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


# ------------------------------------------------------------------------------------------- one run
def _zero_file() -> dict[str, int]:
    return {"documents": 0, "tokens": 0, "unk_tokens": 0}


class _Run:
    """One make-shards process (the whole corpus, or one part): its plan, state and journal."""

    def __init__(self, tok: Tokenizer, files: list[str], opts: Options, out_dir: str, *, part, num_parts):
        self.tok, self.files, self.opts, self.out_dir = tok, files, opts, out_dir
        self.part, self.num_parts = part, num_parts
        self.dtype = dtype_for_vocab(tok.vocab_size)
        self.journal_path = os.path.join(out_dir, journal_name(part, num_parts))
        stats = [os.stat(p) for p in files]
        sizes = [s.st_size for s in stats]
        owner = assign_parts(sizes, num_parts) if part is not None else [None] * len(files)
        self.mine = [f for f in range(len(files)) if owner[f] == part]
        self._mine_set = set(self.mine)
        self.next_file = dict(zip(self.mine, self.mine[1:] + [len(files)]))  # the file after each of mine
        self.fingerprint = {
            "tokenizer": tok.identity,
            "options": asdict(opts),
            "inputs": [[p, s.st_size, s.st_mtime_ns] for p, s in zip(files, stats)],
            "num_parts": num_parts if part is not None else None,
        }
        self.kill_hook = _KillHook()

    # ---------------------------------------------------------------- files this run owns
    def _owns(self, name: str) -> bool:
        """Whether ``name`` (or the file the temp file ``name`` was going to be) is this run's: for a
        whole-corpus run everything make-shards writes, for a part only its units, journal and part
        manifest (the other parts may be writing beside it)."""
        base = final_name(name) or name
        if is_shard_name(base):
            return self.part is None or shard_unit(base) in self._mine_set
        if self.part is None:
            return base == MANIFEST_NAME or base.startswith(("manifest.part-", "make-shards."))
        return base in (os.path.basename(self.journal_path), part_manifest_name(self.part, self.num_parts))

    def remove_files(self, keep: set[str] = frozenset()) -> None:
        """Delete this run's files (the manifest first: from then on the directory is not a dataset).
        A part also deletes the merged manifest: it no longer describes the parts."""
        names = [n for n in os.listdir(self.out_dir) if self._owns(n) or n == MANIFEST_NAME]
        for n in sorted(set(names) - set(keep), key=lambda n: n != MANIFEST_NAME):
            p = os.path.join(self.out_dir, n)
            if os.path.exists(p):
                os.remove(p)

    # ---------------------------------------------------------------- start or resume
    def open(self, overwrite: bool, progress: bool) -> list[dict]:
        """Start fresh or pick up the journal; returns its records (empty for a fresh run)."""
        os.makedirs(self.out_dir, exist_ok=True)
        header = journal.read_header(self.journal_path) if not overwrite else None
        if header is not None:
            if header["fingerprint"] != self.fingerprint:
                raise journal.refuse(self.out_dir, header["fingerprint"], self.fingerprint)
            self.docs_per_file = header["docs_per_file"]
            self.is_val = self._val_set()
            records = journal.load(self.journal_path)
            self.writer = journal.Writer(self.journal_path)
            return records
        if not overwrite and any(self._owns(n) for n in os.listdir(self.out_dir) if not final_name(n)):
            raise DataError(
                f"output directory {self.out_dir!r} already holds shards; pass --overwrite to replace them"
            )
        for f in self.mine:
            check_input(self.files[f], text_field=self.opts.text_field)
        self.docs_per_file = None if self.opts.per_file else self._count_documents(progress)
        self.is_val = self._val_set()  # its errors, too, come before anything is written
        self.remove_files()
        journal.create(
            self.journal_path,
            {"fingerprint": self.fingerprint, "part": self.part, "docs_per_file": self.docs_per_file},
        )
        self.writer = journal.Writer(self.journal_path)
        return []

    def _count_documents(self, progress: bool) -> list[int]:
        """Pass 1 of a corpus-wide run: documents per file (reads everything once before writing)."""
        counts = []
        with progress_bar(len(self.files), "counting documents", "file", progress) as bar:
            for path in self.files:
                counts.append(
                    sum(
                        1
                        for _ in iter_documents(
                            path, text_field=self.opts.text_field, doc_sep=self.opts.doc_sep
                        )
                    )
                )
                bar.update()
        n_docs = sum(counts)
        if n_docs == 0:
            raise DataError(f"empty corpus: no non-blank documents in {len(self.files)} input file(s)")
        return counts

    def _val_set(self) -> np.ndarray | None:
        if self.opts.per_file:
            return None
        n_docs = sum(self.docs_per_file)
        o = self.opts
        n_val = o.val_docs if o.val_docs is not None else int(round(o.val_fraction * n_docs))
        if o.val_fraction > 0 and n_val == 0:
            n_val = 1
        if n_val >= n_docs:
            raise DataError(
                f"validation split of {n_val} documents leaves no training documents (corpus has {n_docs})"
            )
        is_val = np.zeros(n_docs, dtype=bool)
        is_val[np.random.default_rng(o.seed).choice(n_docs, size=n_val, replace=False)] = True
        return is_val

    def split_of(self, f: int, j: int) -> str:
        if self.is_val is None:
            return "val" if _is_val_hashed(self.opts.seed, f, j, self.opts.val_fraction) else "train"
        return "val" if self.is_val[self.first_doc[f] + j] else "train"

    # ---------------------------------------------------------------- state
    def restore(self, records: list[dict]) -> None:
        """The state after the journal's last checkpoint (or the initial state)."""
        if self.docs_per_file is not None:
            self.first_doc = np.concatenate([[0], np.cumsum(self.docs_per_file)]).tolist()
        first = self.mine[0] if self.mine else len(self.files)
        self.at = (first, 0)
        self.replay = {s: (first, 0, 0) for s in SPLITS}
        self.totals = zero_totals()
        self.file_stats: dict[int, dict[str, int]] = {}
        self.done_entries: dict[str, list[dict]] = {s: [] for s in SPLITS}  # of finished units
        unit_entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for rec in records:
            if rec["kind"] == "file":
                self.file_stats[rec["index"]] = rec["stats"]
            elif rec["kind"] == "shard":
                unit_entries[rec["split"]].append(rec["entry"])
                self.at = tuple(rec["at"])
                self.replay = {s: tuple(v) for s, v in rec["replay"].items()}
                self.totals = rec["totals"]
                f, stats = rec["file"]
                self.file_stats[f] = stats
            elif rec["kind"] == "unit":
                for s in SPLITS:
                    self.done_entries[s] += unit_entries[s] + rec["entries"][s]
                unit_entries = {s: [] for s in SPLITS}
                self.at = tuple(rec["at"])
                self.replay = {s: (self.at[0], 0, 0) for s in SPLITS}
                self.totals = rec["totals"]
        self.resume_at = self.at
        self.file_stats.setdefault(self.at[0], _zero_file())
        keep = {e["name"] for s in SPLITS for e in self.done_entries[s] + unit_entries[s]}
        keep.add(os.path.basename(self.journal_path))
        if self.done():
            keep.add(MANIFEST_NAME)  # nothing left to do: what is there stays valid
        self.remove_files(keep=keep)  # shards written after the checkpoint, temp files, stale manifests
        self._new_unit(unit_entries)

    def _unit_of(self, f: int) -> int | None:
        return f if self.opts.per_file else None

    def _new_unit(self, entries: dict[str, list[dict]] | None = None) -> None:
        o, unit = self.opts, self._unit_of(self.at[0])
        self.packers = {s: Packer(o.seq_len) for s in SPLITS}
        self.writers = {
            s: SplitWriter(
                self.out_dir,
                s,
                seq_len=o.seq_len,
                dtype=self.dtype,
                shard_samples=o.shard_samples,
                unit=unit,
                shards=(entries or {}).get(s),
            )
            for s in SPLITS
        }
        self.journaled = {s: len(self.writers[s].shards) for s in SPLITS}

    def done(self) -> bool:
        return self.at[0] >= len(self.files) or bool(self.mine and self.at[0] > self.mine[-1])

    # ---------------------------------------------------------------- the documents still to read
    def events(self) -> Iterator[tuple]:
        """(file, doc, split, text) from the earliest position still needed; ``text`` is None for a
        document no split needs again, and ``doc = -1`` marks the end of a file. (Runs in the pool's
        feeder thread: it reads only the state as it was at the start.)"""
        resume_at, replay = self.resume_at, dict(self.replay)
        start = min([resume_at] + [r[:2] for r in replay.values()])
        o = self.opts
        for f in self.mine:
            if f < start[0]:
                continue
            skip = start[1] if f == start[0] else 0
            for j, text in enumerate(
                iter_documents(self.files[f], text_field=o.text_field, doc_sep=o.doc_sep)
            ):
                if j < skip:
                    continue
                split = self.split_of(f, j)
                needed = (f, j) >= resume_at or (f, j) >= replay[split][:2]
                yield f, j, split, text if needed else None
            yield f, -1, None, None

    # ---------------------------------------------------------------- processing
    def add_document(self, f: int, j: int, split: str, ids: np.ndarray, n_unk: int, eos: np.ndarray) -> None:
        counting = (f, j) >= self.resume_at
        rf, rj, ro = self.replay[split]
        if (f, j) < (rf, rj):
            return  # already inside this split's complete shards
        skip = ro if (f, j) == (rf, rj) else 0
        tokens = np.concatenate([ids, eos])[skip:]
        samples, ends = self.packers[split].add(tokens)
        for sample, end in zip(samples, ends):
            self.kill_hook("sample")
            if self.writers[split].write(sample):
                if not counting:  # replayed documents only refill shards that were open at the checkpoint
                    raise RuntimeError(f"{self.journal_path} does not match the shards it lists")
                self.kill_hook("renamed")
                self.replay[split] = (f, j, skip + end)
                self._checkpoint(split, (f, j))
                self.kill_hook("shard")
        if counting:
            t = self.totals[split]
            t["documents"] += 1
            t["doc_tokens"] += len(ids) + 1
            fs = self.file_stats[f]
            fs["documents"] += 1
            fs["tokens"] += len(ids)
            fs["unk_tokens"] += n_unk

    def _checkpoint(self, split: str, at: tuple[int, int]) -> None:
        entry = self.writers[split].shards[-1]
        self.journaled[split] += 1
        self.writer.append(
            {
                "kind": "shard",
                "split": split,
                "entry": entry,
                "at": list(at),
                "replay": {s: list(v) for s, v in self.replay.items()},
                "totals": self.totals,
                "file": [at[0], self.file_stats[at[0]]],
            }
        )

    def end_of_file(self, f: int) -> None:
        if f < self.resume_at[0]:
            return  # finished before the checkpoint: counted and journaled then
        fs = self.file_stats[f]
        limit = self.opts.max_unk_fraction
        if fs["tokens"] and fs["unk_tokens"] / fs["tokens"] > limit:
            raise DataError(
                f"input file {self.files[f]!r}: {fs['unk_tokens']} of {fs['tokens']} tokens are <unk> "
                f"(> --max-unk-fraction {limit}); the tokenizer cannot encode this text "
                "(train one on it, or use byte fallback)"
            )
        self.writer.append({"kind": "file", "index": f, "stats": fs})
        self.file_stats[self.next_file[f]] = _zero_file()
        if self.opts.per_file:
            self.end_unit(self.next_file[f])

    def end_unit(self, next_file: int) -> None:
        """Close the unit's last partial shards (no checkpoint between them) and journal the unit."""
        final = {}
        for s in SPLITS:
            self.totals[s]["dropped_tokens"] += self.packers[s].n
            shards = self.writers[s].finish()
            final[s] = shards[self.journaled[s] :]
            self.done_entries[s] += shards
        self.at = (next_file, 0)
        self.writer.append({"kind": "unit", "entries": final, "at": list(self.at), "totals": self.totals})
        self.kill_hook("unit")
        self.replay = {s: (next_file, 0, 0) for s in SPLITS}
        self._new_unit()

    def abort_writers(self) -> None:
        for w in getattr(self, "writers", {}).values():
            w.abort(remove_written=False)

    # ---------------------------------------------------------------- results
    def result(self) -> dict[str, Any]:
        """What this run produced: the counts and entries a manifest is assembled from."""
        return {
            "totals": self.totals,
            "entries": self.done_entries,
            "files": {str(f): self.file_stats[f] for f in self.mine},
        }

    def tokenizer_info(self) -> dict[str, Any]:
        t = self.tok
        return {
            "identity": t.identity,
            "kind": t.kind,
            "path": t.path,
            "vocab_size": t.vocab_size,
            "eos_id": t.eos_id,
            "bos_id": t.bos_id,
            "pad_id": t.pad_id,
            "unk_id": t.unk_id,
        }


def _process(run: _Run, workers: int, progress: bool) -> None:
    eos = np.array([run.tok.eos_id], dtype=np.uint32)
    max_id = np.iinfo(run.dtype).max
    pool = None
    try:
        chunks = _chunks(run.events())
        if workers > 1:
            pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(run.tok,))
            results = pool.imap(_tokenize_chunk, chunks)  # imap keeps input order: deterministic
        else:
            _init_worker(run.tok)
            results = map(_tokenize_chunk, chunks)
        total = None if run.docs_per_file is None else sum(run.docs_per_file[f] for f in run.mine)
        with progress_bar(total, "tokenizing", "doc", progress) as bar:
            for chunk in results:
                for f, j, split, ids, n_unk in chunk:
                    if j < 0:
                        run.end_of_file(f)
                        continue
                    bar.update()
                    if ids is None:
                        continue
                    if len(ids) and int(ids.max()) > max_id:
                        raise DataError(f"token id {int(ids.max())} does not fit {run.dtype}")
                    run.add_document(f, j, split, ids, n_unk, eos)
        if not run.opts.per_file and not run.done():
            run.end_unit(len(run.files))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def make_shards(
    tokenizer: str | Tokenizer,
    inputs: list[str],
    out_dir: str,
    *,
    seq_len: int,
    shard_samples: int = 1024,
    val_fraction: float = 0.0,
    val_docs: int | None = None,
    text_field: str = "text",
    doc_sep: str | None = None,
    workers: int | None = None,
    seed: int = 0,
    max_unk_fraction: float = 0.01,
    per_file: bool = False,
    num_parts: int = 1,
    part: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs``, pack into ``seq_len`` samples, write train/val shards + manifest.

    Returns the manifest; for a part (``part`` given) the part's manifest, whose ``"merged"`` says
    whether it completed the set and ``manifest.json`` was written. See the module docstring for
    units, partitions and resuming.
    """
    opts = Options(
        seq_len=seq_len,
        shard_samples=shard_samples,
        val_fraction=val_fraction,
        val_docs=val_docs,
        text_field=text_field,
        doc_sep=doc_sep,
        seed=seed,
        max_unk_fraction=max_unk_fraction,
        per_file=per_file,
    )
    opts.check()
    if part is not None or num_parts != 1:
        if part is None or not 0 <= part < num_parts:
            raise DataError(f"--part must be in [0, --num-parts={num_parts}), got {part}")
        if not per_file:
            raise DataError(
                "--num-parts needs --per-file (every input file packed on its own, so that the parts "
                "merge into exactly the shards of one run)"
            )
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise DataError(f"tokenizer {tok.path!r} defines no EOS token (needed between documents)")
    files = expand_inputs(inputs)
    if part is not None and num_parts > len(files):
        raise DataError(f"--num-parts {num_parts} is more than the {len(files)} input file(s)")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    run = _Run(tok, files, opts, os.fspath(out_dir), part=part, num_parts=num_parts)
    records = run.open(overwrite, progress)
    try:
        run.restore(records)
        _process(run, max(1, workers), progress)
        run.kill_hook("done")
        if part is None:
            manifest = assemble_manifest(
                opts=opts,
                files=files,
                tokenizer=run.tokenizer_info(),
                dtype=run.dtype,
                results=[run.result()],
            )
            write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)  # last: marks the dir complete
            return manifest
        part_manifest = {
            "format": PART_FORMAT,
            "part": part,
            "num_parts": num_parts,
            "fingerprint": run.fingerprint,
            "tokenizer": run.tokenizer_info(),
            "dtype": run.dtype,
            **run.result(),
        }
        write_json_atomic(os.path.join(out_dir, part_manifest_name(part, num_parts)), part_manifest)
    except DataError:
        run.abort_writers()
        run.remove_files()  # bad input: the same run would fail the same way, so nothing is kept
        raise
    except BaseException:
        run.abort_writers()  # the journal and complete shards stay: run again to continue
        raise
    finally:
        run.writer.close()
    merged = merge_parts(out_dir, if_complete=True)
    return {**part_manifest, "merged": merged is not None}
