"""Tokenized, packed webdataset shards: writing (``make_shards``), reading, checking (``verify_shards``).

Layout of a shard directory::

    manifest.json            written last, atomically; a directory without it is not a dataset
    train-000000.tar ...     webdataset tars; sample key "train_0000000042" (split + global index)
    val-000000.tar ...       each sample holds one member "<key>.input_ids.u16" (or .u32): seq_len
                             little-endian token ids, raw bytes; dtype also recorded in the manifest

Packing: documents are tokenized, EOS is appended after every document, and the token stream of each
split is cut into fixed ``seq_len`` samples (samples cross document boundaries; the last partial
sample is dropped and its token count reported). The validation split is a set of whole documents
picked with ``seed``. Same inputs and options give byte-identical shards and manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from .corpus import expand_inputs, iter_corpus, iter_documents
from .errors import DataError
from .tokenizer import Tokenizer, load_tokenizer

MANIFEST_NAME = "manifest.json"
FORMAT = "dist_cacheaug.shards"
VERSION = 1
SPLITS = ("train", "val")
DTYPES = {"uint16": "u16", "uint32": "u32"}


def _progress(total=None, desc="", unit="it", enabled=True, **kw):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False, **kw)


def sample_field(dtype: str) -> str:
    return f"input_ids.{DTYPES[dtype]}"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:010d}"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


# --------------------------------------------------------------------------------------------- manifest
def read_manifest(shard_dir: str) -> dict[str, Any]:
    """Load and check ``shard_dir/manifest.json``; errors name the directory and the field."""
    shard_dir = os.fspath(shard_dir)
    if not os.path.isdir(shard_dir):
        raise DataError(f"shard directory {shard_dir!r} does not exist")
    path = os.path.join(shard_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(
            f"{shard_dir!r} has no {MANIFEST_NAME} (not a finished shard directory; "
            "create one with `python -m data_tools make-shards`)"
        )
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read manifest: {e}") from e

    def bad(field, why):
        return DataError(f"{path}: field {field!r} {why}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad("format", f"must be {FORMAT!r}")
    if m.get("version") != VERSION:
        raise bad("version", f"is {m.get('version')!r}; this code reads version {VERSION}")
    if not isinstance(m.get("seq_len"), int) or m["seq_len"] <= 0:
        raise bad("seq_len", "must be a positive integer")
    if m.get("dtype") not in DTYPES:
        raise bad("dtype", f"must be one of {sorted(DTYPES)}")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("identity"), str):
        raise bad("tokenizer.identity", "is missing")
    splits = m.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits", "is missing")
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise bad(f"splits.{split}.shards", "must be a list")
        for i, s in enumerate(shards):
            for key, typ in (("name", str), ("num_samples", int), ("sha256", str), ("bytes", int)):
                if not isinstance(s, dict) or not isinstance(s.get(key), typ):
                    raise bad(f"splits.{split}.shards[{i}].{key}", f"must be a {typ.__name__}")
            if os.path.basename(s["name"]) != s["name"]:
                raise bad(f"splits.{split}.shards[{i}].name", "must be a plain file name")
    return m


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- reading
def read_shard(path: str, entry: dict, *, seq_len: int, dtype: str, verify_checksum: bool = True) -> list:
    """All samples of one shard as numpy arrays (dtype as stored), checked against its manifest entry.

    Raises DataError naming the shard when it is missing, has the wrong size or sha256, does not parse
    as a tar, or holds a sample with the wrong key, field or length. Uses webdataset's tar iterators.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    name = entry["name"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"shard {path!r} is missing or unreadable: {e}") from e
    if len(data) != entry["bytes"]:
        raise DataError(f"shard {path!r} is corrupt: {len(data)} bytes, manifest says {entry['bytes']}")
    if verify_checksum and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"shard {path!r} is corrupt: sha256 differs from the manifest")
    field = sample_field(dtype)
    nbytes = seq_len * np.dtype(dtype).itemsize
    split = name.split("-", 1)[0]
    first = entry.get("first_sample", 0)
    samples = []
    try:
        stream = group_by_keys(tar_file_expander([{"url": name, "stream": io.BytesIO(data)}]))
        for j, s in enumerate(stream):
            want = sample_key(split, first + j)
            if s["__key__"] != want or field not in s or len(s) != 3:  # __key__, __url__, field
                raise DataError(f"sample {j} is {s['__key__']!r} with {sorted(s)}, expected {want}.{field}")
            raw = s[field]
            if len(raw) != nbytes:
                raise DataError(f"sample {s['__key__']} has {len(raw)} bytes, expected {nbytes}")
            samples.append(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")))
    except DataError as e:
        raise DataError(f"shard {path!r} is corrupt: {e}") from e
    except Exception as e:  # tarfile.ReadError, ValueError from webdataset, ...
        raise DataError(f"shard {path!r} is corrupt: cannot parse tar ({type(e).__name__}: {e})") from e
    if len(samples) != entry["num_samples"]:
        raise DataError(
            f"shard {path!r} is corrupt: {len(samples)} samples, manifest says {entry['num_samples']}"
        )
    return samples


# --------------------------------------------------------------------------------------------- writing
class _HashingFile:
    """File wrapper that hashes what is written (tarfile in stream mode only calls write)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


class SplitWriter:
    """Writes one split's samples into ``<split>-NNNNNN.tar`` shards of ``shard_samples`` samples.

    Each shard is written to a hidden temp name and renamed once complete. Tar members have fixed
    mtime/uid/gid/mode, so the bytes depend only on the samples.
    """

    def __init__(self, out_dir: str, split: str, *, seq_len: int, dtype: str, shard_samples: int):
        self.out_dir, self.split, self.seq_len, self.dtype = out_dir, split, seq_len, dtype
        self.shard_samples = shard_samples
        self.field = sample_field(dtype)
        self.shards: list[dict] = []
        self.written: list[str] = []  # final paths, for cleanup on failure
        self.num_samples = 0
        self._tar = None

    def _open(self):
        import webdataset as wds

        name = shard_name(self.split, len(self.shards))
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp")
        self._file = open(self._tmp, "wb")
        self._hf = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hf, user="", group="", mode=0o444, encoder=False, mtime=0)
        self._entry = {"name": name, "first_sample": self.num_samples, "num_samples": 0}

    def write(self, sample: np.ndarray) -> None:
        if sample.shape != (self.seq_len,):
            raise ValueError(f"sample shape {sample.shape} != ({self.seq_len},)")
        if self._tar is None:
            self._open()
        raw = np.ascontiguousarray(sample, dtype=np.dtype(self.dtype).newbyteorder("<")).tobytes()
        self._tar.write({"__key__": sample_key(self.split, self.num_samples), self.field: raw})
        self.num_samples += 1
        self._entry["num_samples"] += 1
        if self._entry["num_samples"] == self.shard_samples:
            self._close_shard()

    def _close_shard(self):
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = None
        final = os.path.join(self.out_dir, self._entry["name"])
        os.replace(self._tmp, final)
        self.written.append(final)
        self._entry.update(bytes=self._hf.size, sha256=self._hf.sha.hexdigest())
        self.shards.append(self._entry)

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:
                pass
            self._file.close()
            self._tar = None
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
        for p in self.written:
            if os.path.exists(p):
                os.remove(p)


class _Packer:
    """Concatenates token arrays and cuts fixed-length samples."""

    def __init__(self, seq_len: int):
        self.seq_len, self.parts, self.n = seq_len, [], 0

    def add(self, ids: np.ndarray) -> list[np.ndarray]:
        self.parts.append(ids)
        self.n += len(ids)
        if self.n < self.seq_len:
            return []
        flat = np.concatenate(self.parts)
        k = len(flat) // self.seq_len
        out = [flat[i * self.seq_len : (i + 1) * self.seq_len] for i in range(k)]
        rest = flat[k * self.seq_len :]
        self.parts, self.n = [rest], len(rest)
        return out


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _tokenize_chunk(chunk: list[tuple[int, int, str]]) -> list[tuple[int, int, np.ndarray, int]]:
    tok = _WORKER_TOKENIZER
    out = []
    for doc_index, file_index, text in chunk:
        ids = np.asarray(tok.encode(text), dtype=np.int64)
        n_unk = int(np.count_nonzero(ids == tok.unk_id)) if tok.unk_id is not None else 0
        out.append((doc_index, file_index, ids, n_unk))
    return out


def _chunks(corpus: Iterator[tuple[int, str]], max_chars: int = 1 << 20, max_docs: int = 512):
    chunk, chars = [], 0
    for doc_index, (file_index, text) in enumerate(corpus):
        chunk.append((doc_index, file_index, text))
        chars += len(text)
        if chars >= max_chars or len(chunk) >= max_docs:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    ours = [
        n
        for n in os.listdir(out_dir)
        if n == MANIFEST_NAME or (n.endswith(".tar") and n.split("-", 1)[0] in SPLITS) or n.endswith(".tmp")
    ]
    if ours and not overwrite:
        raise DataError(
            f"output directory {out_dir!r} already holds shards; pass --overwrite to replace them"
        )
    if os.path.exists(manifest):  # the manifest goes first: from here on the directory is not valid
        os.remove(manifest)
    for n in ours:
        p = os.path.join(out_dir, n)
        if os.path.exists(p):
            os.remove(p)


def make_shards(
    tokenizer: str | Tokenizer,
    inputs: list[str],
    out_dir: str,
    *,
    seq_len: int,
    shard_samples: int = 1024,
    val_fraction: float = 0.0,
    val_docs: int | None = None,
    jsonl_field: str = "text",
    doc_sep: str | None = None,
    workers: int | None = None,
    seed: int = 0,
    max_unk_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs``, pack into ``seq_len`` samples, write train/val shards + manifest; returns it."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    if shard_samples < 1:
        raise DataError(f"--shard-samples must be >= 1, got {shard_samples}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_docs is not None and val_docs < 0:
        raise DataError(f"--val-docs must be >= 0, got {val_docs}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise DataError(f"tokenizer {tok.path!r} defines no EOS token (needed between documents)")
    dtype = dtype_for_vocab(tok.vocab_size)
    files = expand_inputs(inputs)
    workers = max(1, workers or os.cpu_count() or 1)

    # Pass 1: count documents (also surfaces unreadable / malformed files before anything is written).
    docs_per_file = []
    with _progress(len(files), "counting documents", "file", progress) as bar:
        for path in files:
            docs_per_file.append(
                sum(1 for _ in iter_documents(path, jsonl_field=jsonl_field, doc_sep=doc_sep))
            )
            bar.update()
    n_docs = sum(docs_per_file)
    if n_docs == 0:
        raise DataError(f"empty corpus: no non-blank documents in {len(files)} input file(s)")
    n_val = val_docs if val_docs is not None else int(round(val_fraction * n_docs))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n_docs:
        raise DataError(
            f"validation split of {n_val} documents leaves no training documents (corpus has {n_docs})"
        )
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True

    _prepare_out_dir(out_dir, overwrite)
    writers = {
        s: SplitWriter(out_dir, s, seq_len=seq_len, dtype=dtype, shard_samples=shard_samples) for s in SPLITS
    }
    packers = {s: _Packer(seq_len) for s in SPLITS}
    stats = {s: {"documents": 0, "doc_tokens": 0} for s in SPLITS}
    file_stats = [
        {"path": p, "documents": c, "tokens": 0, "unk_tokens": 0} for p, c in zip(files, docs_per_file)
    ]
    eos = np.array([tok.eos_id], dtype=np.int64)
    max_id = np.iinfo(dtype).max

    def check_file(fi: int) -> None:
        fs = file_stats[fi]
        if fs["tokens"] and fs["unk_tokens"] / fs["tokens"] > max_unk_fraction:
            raise DataError(
                f"input file {fs['path']!r}: {fs['unk_tokens']} of {fs['tokens']} tokens are <unk> "
                f"(> --max-unk-fraction {max_unk_fraction}); the tokenizer cannot encode this text "
                "(train one on it, or use byte fallback)"
            )

    pool = None
    try:
        corpus_chunks = _chunks(iter_corpus(files, jsonl_field=jsonl_field, doc_sep=doc_sep))
        if workers > 1:
            pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tok,))
            results = pool.imap(_tokenize_chunk, corpus_chunks)  # imap keeps input order: deterministic
        else:
            _init_worker(tok)
            results = map(_tokenize_chunk, corpus_chunks)
        last_file = 0
        with _progress(n_docs, "tokenizing", "doc", progress) as bar:
            for chunk in results:
                for doc_index, fi, ids, n_unk in chunk:
                    if fi != last_file:
                        check_file(last_file)
                        last_file = fi
                    if len(ids) and int(ids.max()) > max_id:
                        raise DataError(f"token id {int(ids.max())} does not fit {dtype}")
                    file_stats[fi]["tokens"] += len(ids)
                    file_stats[fi]["unk_tokens"] += n_unk
                    split = "val" if is_val[doc_index] else "train"
                    stats[split]["documents"] += 1
                    stats[split]["doc_tokens"] += len(ids) + 1
                    for sample in packers[split].add(np.concatenate([ids, eos])):
                        writers[split].write(sample)
                bar.update(len(chunk))
        check_file(last_file)
        for split in SPLITS:
            if stats[split]["documents"] and writers[split].num_samples == 0:
                hint = "" if split == "train" else " (raise --val-fraction / --val-docs)"
                raise DataError(
                    f"the {split} split has {stats[split]['doc_tokens']} tokens (EOS included), fewer than "
                    f"--seq-len {seq_len}: it cannot fill a single sample{hint}"
                )
        split_info = {}
        for split in SPLITS:
            shards = writers[split].finish()
            n = writers[split].num_samples
            split_info[split] = {
                **stats[split],
                "num_samples": n,
                "num_tokens": n * seq_len,
                "dropped_tokens": packers[split].n,
                "shards": shards,
            }
        manifest = _manifest(
            seq_len=seq_len,
            dtype=dtype,
            tokenizer={
                "identity": tok.identity,
                "kind": tok.kind,
                "path": tok.path,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "bos_id": tok.bos_id,
                "pad_id": tok.pad_id,
                "unk_id": tok.unk_id,
            },
            options={
                "seed": seed,
                "shard_samples": shard_samples,
                "val_fraction": val_fraction,
                "val_docs": val_docs,
                "jsonl_field": jsonl_field,
                "doc_sep": doc_sep,
            },
            inputs=file_stats,
            split_info=split_info,
        )
        _write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)  # last: marks the dir complete
        return manifest
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _manifest(*, seq_len, dtype, tokenizer, options, inputs, split_info) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": seq_len,
        "dtype": dtype,
        "sample_field": sample_field(dtype),
        "eos_between_documents": True,
        "tokenizer": tokenizer,
        "options": options,
        "inputs": inputs,
        "total_documents": sum(s.get("documents", 0) for s in split_info.values()),
        "total_tokens": sum(s["num_tokens"] for s in split_info.values()),
        "splits": split_info,
    }


def write_token_shards(
    out_dir: str,
    samples: dict[str, Any],
    *,
    seq_len: int,
    tokenizer: dict[str, Any],
    shard_samples: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write already-tokenized samples (``{split: iterable of int arrays [seq_len]}``) as a shard dir.

    For synthetic data (tests, benchmarks) and tokenizers outside ``load_tokenizer``; ``tokenizer``
    needs at least ``identity`` and ``vocab_size``.
    """
    dtype = dtype_for_vocab(int(tokenizer["vocab_size"]))
    _prepare_out_dir(out_dir, overwrite)
    writers = {
        s: SplitWriter(out_dir, s, seq_len=seq_len, dtype=dtype, shard_samples=shard_samples) for s in samples
    }
    try:
        for split, it in samples.items():
            for a in it:
                writers[split].write(np.asarray(a))
        split_info = {
            s: {
                "documents": 0,
                "num_samples": w.num_samples,
                "num_tokens": w.num_samples * seq_len,
                "dropped_tokens": 0,
                "shards": w.finish(),
            }
            for s, w in writers.items()
        }
        tok = {
            "kind": "external",
            "path": None,
            "eos_id": None,
            "bos_id": None,
            "pad_id": None,
            "unk_id": None,
        }
        manifest = _manifest(
            seq_len=seq_len,
            dtype=dtype,
            tokenizer={**tok, **tokenizer},
            options={"shard_samples": shard_samples},
            inputs=[],
            split_info=split_info,
        )
        _write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
        return manifest
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


# --------------------------------------------------------------------------------------------- checking
def _verify_one(args) -> tuple[str, str | None, int]:
    path, entry, seq_len, dtype, vocab_size = args
    try:
        samples = read_shard(path, entry, seq_len=seq_len, dtype=dtype)
    except DataError as e:
        return entry["name"], str(e), 0
    top = max((int(s.max()) for s in samples), default=0)
    if vocab_size and top >= vocab_size:
        return entry["name"], f"shard {path!r}: token id {top} >= vocab_size {vocab_size}", len(samples)
    return entry["name"], None, len(samples)


def verify_shards(shard_dir: str, *, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Check every shard against the manifest. Returns {"ok", "checked", "problems": [message...]}."""
    m = read_manifest(shard_dir)
    jobs = [
        (os.path.join(shard_dir, e["name"]), e, m["seq_len"], m["dtype"], m["tokenizer"].get("vocab_size"))
        for split in m["splits"].values()
        for e in split["shards"]
    ]
    import webdataset  # noqa: F401  (imports torch: once here, not in every forked worker)

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with _progress(len(jobs), "verifying", "shard", progress) as bar:
        if workers > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                results = list(_tqdm_iter(pool.imap(_verify_one, jobs), bar))
        else:
            results = list(_tqdm_iter(map(_verify_one, jobs), bar))
    problems = [msg for _name, msg, _n in results if msg]
    for split, info in m["splits"].items():
        total = sum(e["num_samples"] for e in info["shards"])
        if total != info.get("num_samples", total):
            problems.append(
                f"manifest: split {split} lists {total} samples in shards "
                f"but num_samples={info['num_samples']}"
            )
    return {"ok": not problems, "checked": len(jobs), "problems": problems}


def _tqdm_iter(it, bar):
    for x in it:
        bar.update()
        yield x


def inspect_shards(
    shard_dir: str, *, samples: int = 2, tokenizer: str | None = None, chars: int = 400
) -> str:
    """Human-readable summary of a shard directory plus a few decoded samples."""
    m = read_manifest(shard_dir)
    t = m["tokenizer"]
    lines = [
        f"shard dir   {shard_dir}",
        f"seq_len     {m['seq_len']}   dtype {m['dtype']}   documents {m['total_documents']}   "
        f"tokens {m['total_tokens']:,}",
        f"tokenizer   {t['identity']}  (vocab {t['vocab_size']}, eos {t['eos_id']}, path {t['path']})",
    ]
    for split, info in m["splits"].items():
        sizes = [e["num_samples"] for e in info["shards"]]
        lines.append(
            f"{split:<6}      {info['num_samples']:,} samples in {len(sizes)} shards "
            f"({min(sizes, default=0)}-{max(sizes, default=0)} per shard), {info['documents']} docs, "
            f"{info['num_tokens']:,} tokens, {info['dropped_tokens']} dropped in the last partial sample"
        )
    train = m["splits"].get("train", {}).get("shards", [])
    if samples > 0 and train:
        tok = None
        try:
            tok = load_tokenizer(tokenizer or t["path"])
            if tok.identity != t["identity"]:
                lines.append(f"(tokenizer at {tok.path} differs from the manifest's; showing ids only)")
                tok = None
        except DataError as e:
            lines.append(f"(cannot load tokenizer to decode: {e}; showing ids only)")
        arrs = read_shard(
            os.path.join(shard_dir, train[0]["name"]), train[0], seq_len=m["seq_len"], dtype=m["dtype"]
        )
        eos_rate = float(np.mean([np.count_nonzero(a == t["eos_id"]) for a in arrs])) if arrs else 0.0
        lines.append(f"first shard: {eos_rate:.2f} EOS (document ends) per sample on average")
        for j, a in enumerate(arrs[:samples]):
            if tok:  # decode document by document so the boundaries stay visible
                cuts = np.flatnonzero(a == t["eos_id"]) + 1
                body = "<eos>".join(tok.decode(seg.tolist()) for seg in np.split(a, cuts))
            else:
                body = " ".join(map(str, a[:64].tolist()))
            body = body[:chars] + (" ..." if len(body) > chars else "")
            lines.append(f"--- sample {sample_key('train', j)} ---\n{body}")
    return "\n".join(lines)
