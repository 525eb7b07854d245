"""Checkpoints of a run: written atomically, found on restart, refused when corrupt or incompatible.

Layout (``run_dir/checkpoints/``)::

    step_000100/
        deepspeed/                 DeepSpeed's files: module + ZeRO partitions of fp32 params and
                                   optimizer state, one file per rank (exact resume at this world size)
        model_fp32.safetensors     consolidated fp32 coprocessor + soft tokens (elastic resume, tools)
        train_state.pt             step, LR scheduler, non-finite counters, and for every rank: RNG
                                   states, data-loader position, augmentation-position generator
        meta.json                  step, world size, model fingerprint, size of every file above
    latest                         name of the newest checkpoint (written last)

A checkpoint is written under ``.tmp-step_XXXXXX`` and renamed when every rank has finished, so a
``step_*`` directory is always complete; ``latest`` is updated after the rename; then checkpoints
beyond ``train.keep_checkpoints`` are deleted, oldest first. On restart the newest ``step_*``
directory is used. One that fails its checks (missing or truncated file, unreadable state, another
model shape) stops the run with a :class:`CheckpointError` naming it; nothing is deleted or overwritten.

Nothing here imports DeepSpeed: the engine is passed in (``save(dir)``, ``consolidated_fp32()``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import distributed
from ..config import RunConfig
from ..core.model import decoder_fingerprint

STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHTS = "model_fp32.safetensors"
STATE = "train_state.pt"
META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
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
    """Write checkpoint ``step`` (collective: every rank calls it). Returns the final directory."""
    root = Path(root)
    name = step_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a partial write from a crash: never a complete checkpoint
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    engine.save(str(tmp))
    weights = engine.consolidated_fp32()
    states = distributed.all_gather_object(local_state)
    if is_main:
        save_file(weights, str(tmp / WEIGHTS))
        torch.save({**global_state, "format_version": FORMAT_VERSION, "ranks": states}, tmp / STATE)
        meta = {
            "step": step,
            "world_size": len(states),
            "time": time.time(),
            "fingerprint": global_state["fingerprint"],
            "files": _file_sizes(tmp),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
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


@dataclass
class Loaded:
    path: Path
    step: int
    world_size: int
    state: dict  # train_state.pt
    weights: dict[str, torch.Tensor] | None  # consolidated fp32, read only for an elastic resume


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
        assert state.get("format_version") == FORMAT_VERSION, f"format version {state.get('format_version')}"
        assert len(state["ranks"]) == saved_world and int(state["step"]) == step, (
            "inconsistent with meta.json"
        )
        weights = load_file(str(path / WEIGHTS)) if saved_world != world_size else None
    except Exception as e:  # noqa: BLE001 - any failure here means the files are unusable
        raise CheckpointError(
            f"checkpoint {path} is corrupt: cannot read {STATE}/{WEIGHTS} ({e}). {keep}"
        ) from None
    return Loaded(path=path, step=step, world_size=saved_world, state=state, weights=weights)
