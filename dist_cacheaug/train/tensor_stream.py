"""A ``.safetensors`` file written one tensor at a time.

``safetensors.torch.save_file`` takes every tensor at once, so writing a model means holding all of it. A
safetensors file is an 8-byte header length, a JSON header (names, dtypes, shapes, byte offsets) and the
tensors' bytes back to back, so when the names, dtypes and shapes are known up front (they are: from the
parameters' shapes) the header can go first and each tensor can follow as soon as it exists, then be
dropped. The result is byte-identical to ``save_file`` of the same tensors (tested), so every reader of
today's files reads these.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

# safetensors' dtype names, in the order of its Rust ``Dtype`` enum: ``save_file`` writes tensors sorted
# by dtype, that order reversed, then by name; matching it keeps the files byte-identical.
_DTYPES = [
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
]
_NAME = dict(_DTYPES)
_RANK = {dtype: i for i, (dtype, _) in enumerate(_DTYPES)}


def tensor_order(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """The order ``save_file`` lays tensors out in (and so :meth:`SafetensorsWriter.write` expects them):
    every rank of a collective write can compute it without opening the file."""
    return sorted(specs, key=lambda n: (-_RANK[specs[n][0]], n))


class SafetensorsWriter:
    """``specs``: name -> (dtype, shape) of every tensor the file will hold. :attr:`order` is the order
    :meth:`write` must receive them in; :meth:`close` checks that all came. Use as a context manager; on
    an exception the partial file is left for the caller's temporary-directory cleanup."""

    def __init__(
        self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata=None
    ):
        unknown = sorted({str(d) for d, _ in specs.values() if d not in _NAME})
        if unknown:
            raise ValueError(f"{path}: dtypes {unknown} have no safetensors name")
        self.order = tensor_order(specs)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._sizes = {}
        for name in self.order:
            dtype, shape = specs[name]
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _NAME[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._sizes[name] = size
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as save_file pads it
        self._specs = specs
        self._next = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._file.write(struct.pack("<Q", len(text)) + text)
        self.bytes = 8 + len(text) + offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next] if self._next < len(self.order) else None
        if name != expected:
            raise ValueError(f"tensor {name!r} written out of order (expected {expected!r})")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {tuple(shape)}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        missing = self.order[self._next :]
        self._file.close()
        if missing:
            raise ValueError(f"{len(missing)} tensors never written, first {missing[0]!r}")

    def abort(self) -> None:
        """Close without the completeness check (a failed write: the caller removes the file)."""
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_tensors(path: str | Path, names=None, *, reuse: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a ``.safetensors`` file (``names``, default all, in that order), read one at a time
    with plain reads. Not ``safe_open``: it maps the whole file, and every page a read touches stays in
    the process's resident memory until the file is closed (measured: the whole file), which is what an
    elastic resume of a large model must not do. ``reuse``: every tensor is read into one buffer the
    size of the largest (valid until the next is asked for): a fresh allocation per tensor leaves the
    allocator's heap fragmented (measured 8-10x the largest tensor)."""
    by_name = {v: k for k, v in _NAME.items()}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        start = 8 + length
        wanted = list(header if names is None else names)
        missing = [n for n in wanted if n not in header]
        if missing:
            raise KeyError(f"{path}: no tensor {missing[0]!r}")
        sizes = [header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in wanted]
        buffer = torch.empty(max(sizes, default=0), dtype=torch.uint8) if reuse else None
        for name, size in zip(wanted, sizes):
            entry = header[name]
            begin, end = entry["data_offsets"]
            raw = buffer.narrow(0, 0, size) if reuse else torch.empty(size, dtype=torch.uint8)
            t = raw.view(by_name[entry["dtype"]]).view(entry["shape"])
            view = raw.numpy()
            f.seek(start + begin)
            if f.readinto(memoryview(view)) != end - begin:
                raise ValueError(f"{path}: tensor {name!r} is truncated")
            yield name, t


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    """``save_file`` with this writer: the reference the streamed paths are tested against."""
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata) as w:
        for name in w.order:
            w.write(name, tensors[name])
