"""Checkpoints of a run: written atomically, found on restart, refused when corrupt or incompatible.

Layout (``run_dir/checkpoints/``)::

    step_000100/
        deepspeed/                 DeepSpeed's files: module + ZeRO partitions of fp32 params and
                                   optimizer state, one file per rank (exact resume at this world size)
        model_fp32.safetensors     consolidated fp32 coprocessor + soft tokens (elastic resume, tools),
                                   streamed by rank 0 one parameter at a time (see below)
        train_state.pt             the run state, one entry per component (``run_state.py``): shared
                                   ("train": step and non-finite counters, "scheduler") and, under
                                   "ranks", each rank's ("loader", "positions", "rngs")
        meta.json                  step, world size, model fingerprint, size of every file above
    latest                         name of the newest checkpoint (written last)

A checkpoint is written under ``.tmp-step_XXXXXX`` and renamed when every rank has finished, so a
``step_*`` directory is always complete; ``latest`` is updated after the rename; then checkpoints
beyond ``train.keep_checkpoints`` are deleted, oldest first. On restart the newest ``step_*``
directory is used. One that fails its checks (missing or truncated file, unreadable state, another
model shape) stops the run with a :class:`CheckpointError` naming it; nothing is deleted or overwritten.

Memory at scale. Every save writes DeepSpeed's sharded files (exact resume) and the consolidated fp32
weights (elastic resume at another world size, tools). The consolidated file is never built in memory:
its header comes from the parameters' shapes, then each parameter's fp32 partitions are gathered onto
rank 0, written, and dropped (``Engine.fp32_to_main``, ``tensor_stream.SafetensorsWriter``), so the extra
host memory is one parameter on rank 0 and about nothing elsewhere (``bench/checkpoint_memory.py``
measures it). An elastic resume reads it back one tensor at a time (:func:`copy_weights_into`). Why not
consolidate only on demand: an elastic resume is exactly when the run that could consolidate is gone
(a node lost), and the stream costs one fp32 copy's bytes per save, not memory.

A save that fails (disk full, quota, I/O error) on any rank removes its partial ``.tmp-step_*`` and
raises :class:`CheckpointError` on every rank: the previous checkpoint and ``latest`` are untouched.

Nothing here imports DeepSpeed: the engine is passed in (``save(dir)``, ``fp32_specs()``,
``fp32_to_main(names)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .. import distributed
from ..config import RunConfig
from ..core.model import decoder_fingerprint
from ..errors import UserError
from .tensor_stream import SafetensorsWriter, read_tensors, tensor_order

STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHTS = "model_fp32.safetensors"
STATE = "train_state.pt"
META = "meta.json"
FORMAT_VERSION = 2
#: Format 1 (before 2026-12-07) kept the run state in flat dicts; it is read by :func:`upgrade_state`.
READABLE_VERSIONS = (1, 2)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used. The message names it; it is left untouched."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step_*`` directories), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def fingerprint(model: torch.nn.Module, cfg: RunConfig) -> dict:
    """What must match for a checkpoint to load into this model: architecture and trainable shapes."""
    extra = {} if cfg.model.variant == "coprocessor" else {"variant": cfg.model.variant}
    return {
        **extra,
        "decoder": decoder_fingerprint(model.decoder.config),
        "num_latents": cfg.model.num_latents,
        "convention": cfg.model.convention,
        "latent_final_norm": cfg.model.latent_final_norm,
        "trainable": {n: list(p.shape) for n, p in model.named_parameters()},
    }


def decoder_digest(decoder: torch.nn.Module) -> str:
    """sha256 over every named parameter and buffer of the decoder (name, dtype, shape, bytes). A
    sharded decoder (``zero.shard_decoder``) gives the digest of the whole one: each shard is gathered,
    one parameter at a time, so every rank must call this (collective)."""
    h = hashlib.sha256()
    tensors = list(decoder.named_parameters()) + list(decoder.named_buffers())
    for name, t in sorted(tensors, key=lambda x: x[0]):
        if hasattr(t, "full_tensor"):  # a DTensor shard (FSDP2)
            t = t.full_tensor()
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != META
    }


def _fingerprint_diff(saved: dict, have: dict) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(have)):
        a, b = saved.get(key), have.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            shown = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in inner[:4])
            diffs.append(f"{key} ({shown}{', ...' if len(inner) > 4 else ''})")
        else:
            diffs.append(f"{key}: {a!r} vs {b!r}")
    return diffs


def save(
    root: str | Path, step: int, engine, local_state: dict, global_state: dict, *, keep: int, is_main: bool
) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it). Returns the final directory; raises
    :class:`CheckpointError` on every rank when any rank could not write its part."""
    root = Path(root)
    name = step_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a partial write from a crash: never a complete checkpoint
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    error = _attempt(lambda: engine.save(str(tmp)))
    consolidated = write_consolidated(engine, tmp / WEIGHTS, is_main)  # always: its gathers are collective
    error = error or consolidated
    states = distributed.all_gather_object(local_state)
    if is_main and error is None:
        error = _attempt(lambda: _write_state(tmp, step, global_state, states))
    errors = [e for e in distributed.all_gather_object(error) if e]
    if errors:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(root)
        raise CheckpointError(
            f"checkpoint of step {step} could not be written to {tmp} ({errors[0]}); removed the partial "
            f"write, the previous checkpoint {previous or '(none yet)'} is intact. Free space under {root} "
            "(or lower train.keep_checkpoints) and run again: it resumes from the previous checkpoint"
        )
    if is_main:
        if final.exists():  # cannot happen when resuming from the newest; keep it rather than replace it
            final.rename(root / f"{name}.replaced-{int(time.time())}")
        os.rename(tmp, final)
        tmp_latest = root / ".latest.tmp"
        tmp_latest.write_text(name + "\n")
        os.replace(tmp_latest, root / "latest")
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _attempt(write) -> str | None:
    """Run one write; an OS-level failure (ENOSPC, EDQUOT, EIO) becomes its message, for every rank to see."""
    try:
        write()
    except OSError as e:
        return _os_error(e)
    return None


def _os_error(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"


def write_consolidated(engine, path: Path, is_main: bool) -> str | None:
    """Stream the fp32 weights into ``path`` on rank 0. Collective: every rank walks every parameter
    even after a failed write on rank 0, so no rank is left waiting in a gather. Returns the error."""
    specs = engine.fp32_specs()
    writer, error = None, None
    if is_main:
        try:
            writer = SafetensorsWriter(path, specs)
        except OSError as e:
            error = _os_error(e)
    for name, tensor in engine.fp32_to_main(tensor_order(specs)):
        if writer is not None and error is None:
            try:
                writer.write(name, tensor)
            except OSError as e:
                error = _os_error(e)
        del tensor
    if writer is not None:
        error = error or _attempt(writer.close)
        if error:
            writer.abort()
    return error


def _write_state(tmp: Path, step: int, global_state: dict, states: list) -> None:
    torch.save({**global_state, "format_version": FORMAT_VERSION, "ranks": states}, tmp / STATE)
    meta = {
        "step": step,
        "world_size": len(states),
        "time": time.time(),
        "fingerprint": global_state["fingerprint"],
        "files": _file_sizes(tmp),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))


def upgrade_state(state: dict) -> dict:
    """A train_state.pt of any readable version in today's layout (format 1 had flat dicts)."""
    if state["format_version"] == FORMAT_VERSION:
        return state
    ranks = []
    for r in state["ranks"]:
        rank = {
            "loader": r["loader"],
            "positions": {"state": r["positions_rng"]},
            "rngs": {
                "torch": r["torch_rng"],
                "cuda": r["cuda_rng"],
                "python": r["python_rng"],
                "numpy": r["numpy_rng"],
            },
        }
        if "decoder_digest" in r:
            rank["decoder_digest"] = r["decoder_digest"]
        ranks.append(rank)
    counters = ("step", "nonfinite_total", "nonfinite_run")
    rest = {k: v for k, v in state.items() if k not in (*counters, "ranks", "format_version")}
    return {
        **rest,
        "format_version": FORMAT_VERSION,
        "train": {k: state[k] for k in counters},
        "ranks": ranks,
    }


def saved_bytes(path: Path) -> int:
    """Bytes a checkpoint holds, from its meta.json (every file but meta.json itself)."""
    return sum(json.loads((Path(path) / META).read_text())["files"].values())


def iter_weights(path: Path, names) -> Iterator[tuple[str, torch.Tensor]]:
    """The consolidated fp32 tensors ``names``, read one at a time into one buffer (never the file whole,
    nor mapped): each is valid until the next is asked for."""
    yield from read_tensors(path, names, reuse=True)


def copy_weights_into(model: torch.nn.Module, path: Path) -> None:
    """An elastic resume: the consolidated fp32 weights into ``model``'s parameters, one tensor at a time."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in iter_weights(path, list(params)):
            params[name].copy_(t.to(params[name].dtype))


@dataclass
class Loaded:
    path: Path
    step: int
    world_size: int
    state: dict  # train_state.pt
    weights: Path | None  # the consolidated fp32 file, for an elastic resume (read by copy_weights_into)


def read(path: str | Path, expected_fingerprint: dict, *, world_size: int) -> Loaded:
    """Check and read a checkpoint. Raises :class:`CheckpointError` naming it when it is corrupt or
    was written for another model."""
    path = Path(path)
    keep = (
        f"It was left untouched: move it out of {path.parent} to resume from an older checkpoint, "
        "or use another train.run_dir."
    )
    try:
        meta = json.loads((path / META).read_text())
        files, step, saved_world = meta["files"], int(meta["step"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {META} ({e}). {keep}") from None
    bad = []
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            bad.append(f"{rel} missing")
        elif f.stat().st_size != size:
            bad.append(f"{rel} has {f.stat().st_size} bytes, expected {size}")
    if bad:
        raise CheckpointError(f"checkpoint {path} is corrupt: {'; '.join(bad[:5])}. {keep}")
    diffs = _fingerprint_diff(meta.get("fingerprint", {}), expected_fingerprint)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is incompatible with this config (saved vs now: {'; '.join(diffs)}). {keep}"
        )
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {STATE} ({e}). {keep}") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this version of dist_cacheaug reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Resume it with the dist_cacheaug that wrote it. {keep}"
        )
    try:
        state = upgrade_state(state)
        assert len(state["ranks"]) == saved_world and int(state["train"]["step"]) == step, (
            "inconsistent with meta.json"
        )
        weights = None
        if saved_world != world_size:  # the header names every trainable tensor (read now; the data later)
            with safe_open(str(path / WEIGHTS), framework="pt") as f:
                missing = sorted(set(expected_fingerprint.get("trainable", {})) - set(f.keys()))
            assert not missing, f"{WEIGHTS} lacks {missing[:3]}"
            weights = path / WEIGHTS
    except Exception as e:  # noqa: BLE001 - any failure here means the files are unusable
        raise CheckpointError(
            f"checkpoint {path} is corrupt: cannot read {STATE}/{WEIGHTS} ({e}). {keep}"
        ) from None
    return Loaded(path=path, step=step, world_size=saved_world, state=state, weights=weights)
