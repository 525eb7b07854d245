"""The shard directory format: names, manifest, writing a split (``SplitWriter``), reading and checking
(``read_shard``, ``verify_shards``, ``inspect_shards``). ``make.py`` fills it from a corpus.

Layout of a shard directory::

    manifest.json            written last, atomically; a directory without it is not a dataset
    train-000000.tar ...     webdataset tars; sample key "train_0000000042" (split + index)
    val-000000.tar ...       each sample holds one member "<key>.input_ids.u16" (or .u32): seq_len
                             little-endian token ids, raw bytes; dtype also recorded in the manifest

With ``make-shards --per-file`` (manifest version 2) every input file is a *unit* of its own: its shards
are ``train-f000012-000000.tar`` ... (unit = the file's index among the inputs) with keys
``train_f000012_0000000042`` (index within the unit), and each manifest entry records its ``unit``.

Packing: documents are tokenized, EOS is appended after every document, and the token stream of each
split (of each unit) is cut into fixed ``seq_len`` samples (samples cross document boundaries; the last
partial sample is dropped and its token count reported). Same inputs and options give byte-identical
shards and manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import socket
import sys
from typing import Any

import numpy as np

from . import storage
from .errors import DataError
from .storage import DEFAULT_RETRY, Retry
from .tokenizer import load_tokenizer

MANIFEST_NAME = "manifest.json"
FORMAT = "dist_cacheaug.shards"
VERSION = 1  # corpus-wide packing
VERSION_UNITS = 2  # --per-file: shard entries carry "unit"
SPLITS = ("train", "val")
DTYPES = {"uint16": "u16", "uint32": "u32"}


def progress_bar(total=None, desc="", unit="it", enabled=True, **kw):
    """A tqdm bar on stderr, shown only when ``enabled``, on a terminal, and not turned off by
    ``TQDM_DISABLE``: never frames in a log file. (tqdm's ``disable=False`` would force frames into a
    file; ``disable=None`` alone means "terminal only" but overrides the user's ``TQDM_DISABLE``.)"""
    from tqdm import tqdm

    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(
        total=total, desc=desc, unit=unit, disable=True if off else None, file=sys.stderr, leave=False, **kw
    )


def sample_field(dtype: str) -> str:
    return f"input_ids.{DTYPES[dtype]}"


def sample_key(split: str, index: int, unit: int | None = None) -> str:
    return f"{split}_{index:010d}" if unit is None else f"{split}_f{unit:06d}_{index:010d}"


def shard_name(split: str, number: int, unit: int | None = None) -> str:
    return f"{split}-{number:06d}.tar" if unit is None else f"{split}-f{unit:06d}-{number:06d}.tar"


def is_shard_name(name: str) -> bool:
    return name.endswith(".tar") and name.split("-", 1)[0] in SPLITS


def shard_unit(name: str) -> int | None:
    """The unit of a shard file name (``train-f000012-000003.tar`` -> 12), None for corpus-wide shards."""
    parts = name[: -len(".tar")].split("-")
    return int(parts[1][1:]) if len(parts) == 3 and parts[1][:1] == "f" and parts[1][1:].isdigit() else None


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


# --------------------------------------------------------------------------------------------- manifest
def read_manifest(shard_dir: str, retry: Retry = DEFAULT_RETRY) -> dict[str, Any]:
    """Load and check ``shard_dir/manifest.json`` (a directory or a URL, ``storage``); errors name the
    directory and the field."""
    shard_dir = os.fspath(shard_dir)
    if not storage.is_remote(shard_dir) and not os.path.isdir(shard_dir):
        raise DataError(f"shard directory {shard_dir!r} does not exist")
    path = storage.join(shard_dir, MANIFEST_NAME)
    missing = DataError(
        f"{storage.shown(shard_dir)!r} has no {MANIFEST_NAME} (not a finished shard directory; "
        "create one with `python -m data_tools make-shards`)"
    )
    if not storage.is_remote(shard_dir) and not os.path.isfile(path):
        raise missing
    try:
        m = json.loads(storage.read_bytes(path, retry=retry))
    except FileNotFoundError:
        raise missing from None
    except (OSError, ValueError) as e:
        raise DataError(f"{storage.shown(path)}: cannot read manifest: {e}") from e
    path = storage.shown(path)

    def bad(field, why):
        return DataError(f"{path}: field {field!r} {why}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad("format", f"must be {FORMAT!r}")
    if m.get("version") not in (VERSION, VERSION_UNITS):
        raise bad(
            "version", f"is {m.get('version')!r}; this code reads versions {VERSION} and {VERSION_UNITS}"
        )
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
            if s.get("unit") is not None and not isinstance(s["unit"], int):
                raise bad(f"splits.{split}.shards[{i}].unit", "must be an int")
    return m


def temp_name(name: str) -> str:
    """The hidden name a file is written under before it is renamed to ``name``: private to this host
    and process (the parts of a partitioned run may write the same manifest at once on several nodes)."""
    host = socket.gethostname().replace(".", "_")
    return f".{name}.{host}-{os.getpid()}.tmp"


def final_name(name: str) -> str | None:
    """The file a :func:`temp_name` file was going to become, None for any other name."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    return name[1:-4].rsplit(".", 1)[0]


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``path`` so that it is either absent/old or complete: a private temp file, fsync, rename."""
    tmp = os.path.join(os.path.dirname(path), temp_name(os.path.basename(path)))
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- reading
def read_shard(
    path: str,
    entry: dict,
    *,
    seq_len: int,
    dtype: str,
    verify_checksum: bool = True,
    retry: Retry = DEFAULT_RETRY,
) -> list:
    """All samples of one shard as numpy arrays (dtype as stored), checked against its manifest entry.
    ``path``: a file or a URL (``storage``; remote reads are retried by ``retry``).

    Raises DataError naming the shard when it is missing, has the wrong size or sha256, does not parse
    as a tar, or holds a sample with the wrong key, field or length. Uses webdataset's tar iterators.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    name = entry["name"]
    try:
        data = storage.read_bytes(path, size=entry["bytes"], retry=retry)
    except OSError as e:
        raise DataError(f"shard {storage.shown(path)!r} is missing or unreadable: {e}") from e
    path = storage.shown(path)
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
            want = sample_key(split, first + j, entry.get("unit"))
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
    """Writes one split's samples (of one unit) into shards of ``shard_samples`` samples.

    Each shard is written to a hidden temp name and renamed once complete. Tar members have fixed
    mtime/uid/gid/mode, so the bytes depend only on the samples. ``shards``: entries of shards already
    complete (a resumed run continues after them).
    """

    def __init__(
        self,
        out_dir: str,
        split: str,
        *,
        seq_len: int,
        dtype: str,
        shard_samples: int,
        unit: int | None = None,
        shards: list[dict] | None = None,
    ):
        self.out_dir, self.split, self.seq_len, self.dtype = out_dir, split, seq_len, dtype
        self.shard_samples, self.unit = shard_samples, unit
        self.field = sample_field(dtype)
        self.shards: list[dict] = list(shards or [])
        self.written: list[str] = []  # final paths written by this object, for cleanup on failure
        self.num_samples = sum(e["num_samples"] for e in self.shards)
        self._tar = None

    def _open(self):
        import webdataset as wds

        name = shard_name(self.split, len(self.shards), self.unit)
        self._tmp = os.path.join(self.out_dir, temp_name(name))
        self._file = open(self._tmp, "wb")
        self._hf = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hf, user="", group="", mode=0o444, encoder=False, mtime=0)
        self._entry = {"name": name, "first_sample": self.num_samples, "num_samples": 0}
        if self.unit is not None:
            self._entry["unit"] = self.unit

    def write(self, sample: np.ndarray) -> bool:
        """Add one sample; True when it completed a shard (now renamed into place: ``shards[-1]``)."""
        if sample.shape != (self.seq_len,):
            raise ValueError(f"sample shape {sample.shape} != ({self.seq_len},)")
        if self._tar is None:
            self._open()
        raw = np.ascontiguousarray(sample, dtype=np.dtype(self.dtype).newbyteorder("<")).tobytes()
        self._tar.write({"__key__": sample_key(self.split, self.num_samples, self.unit), self.field: raw})
        self.num_samples += 1
        self._entry["num_samples"] += 1
        if self._entry["num_samples"] == self.shard_samples:
            self._close_shard()
            return True
        return False

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

    def abort(self, remove_written: bool = True) -> None:
        """Drop the open shard's temp file; with ``remove_written`` also the shards this object wrote."""
        if self._tar is not None:
            self._tar = None
            self._file.close()  # not tar.close(): that would write the end-of-archive blocks first
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
        if remove_written:
            for p in self.written:
                if os.path.exists(p):
                    os.remove(p)


def build_manifest(*, seq_len, dtype, tokenizer, options, inputs, split_info, version=VERSION) -> dict:
    return {
        "format": FORMAT,
        "version": version,
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


def _clear_out_dir(out_dir: str, overwrite: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    ours = [n for n in os.listdir(out_dir) if n == MANIFEST_NAME or is_shard_name(n) or n.endswith(".tmp")]
    if ours and not overwrite:
        raise DataError(
            f"output directory {out_dir!r} already holds shards; pass --overwrite to replace them"
        )
    for n in sorted(ours, key=lambda n: n != MANIFEST_NAME):  # the manifest first: the dir is invalid
        p = os.path.join(out_dir, n)
        if os.path.exists(p):
            os.remove(p)


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
    _clear_out_dir(out_dir, overwrite)
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
        manifest = build_manifest(
            seq_len=seq_len,
            dtype=dtype,
            tokenizer={**tok, **tokenizer},
            options={"shard_samples": shard_samples},
            inputs=[],
            split_info=split_info,
        )
        write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
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
        (storage.join(shard_dir, e["name"]), e, m["seq_len"], m["dtype"], m["tokenizer"].get("vocab_size"))
        for split in m["splits"].values()
        for e in split["shards"]
    ]
    import webdataset  # noqa: F401  (imports torch: once here, not in every forked worker)

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with progress_bar(len(jobs), "verifying", "shard", progress) as bar:
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
        f"shard dir   {storage.shown(os.fspath(shard_dir))}",
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
            storage.join(shard_dir, train[0]["name"]), train[0], seq_len=m["seq_len"], dtype=m["dtype"]
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
