"""Rank, world size and rendezvous from the environment; one code path for every way of launching.

Resolution order (the first that applies wins):

1. ``RANK`` + ``WORLD_SIZE`` (the ``deepspeed`` launcher, ``torchrun``, or anything that sets them):
   ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR`` / ``MASTER_PORT`` come from there too.
2. SLURM, inside an ``srun`` step (``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS`` set): rank =
   ``SLURM_PROCID``, world = ``SLURM_STEP_NUM_TASKS``, local rank = ``SLURM_LOCALID``; ``MASTER_ADDR``
   defaults to the step's first host, ``MASTER_PORT`` to a port derived from the job id. No ssh/pdsh.
   (A plain ``python`` in an ``salloc`` shell has no step variables and so is world size 1.)
3. Nothing: world size 1 on 127.0.0.1 with a free port. It still initialises a 1-rank process group,
   so a single process runs exactly the DeepSpeed path the multi-rank runs do.

This module imports no DeepSpeed: it sets up ``torch.distributed``, which DeepSpeed then adopts.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError


class LaunchError(UserError, RuntimeError):
    """The launch environment is unusable (a rank variable missing or not a number, no CUDA where
    ``DS_ACCELERATOR=cuda``); the message names the variable. The CLI exits 2 on it."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "env" (deepspeed/torchrun), "slurm" or "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(env, key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise LaunchError(
                f"environment variable {key} is not set; the launcher sets it (unset RANK to run one process)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(
            f"environment variable {key}={raw!r} is not an integer; set it to one or unset it (the launchers set it)"
        ) from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: ``scontrol show hostnames`` when available, else a small parser
    for the common forms (``node[01-04,07],gpu5`` -> ``node01``)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def resolve(environ: dict | None = None) -> DistEnv:
    """Rank, world size and rendezvous address from the environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            launcher="env",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodes)
        port = _int(env, "MASTER_PORT", 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000)
        local_world = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=int(local_world) if local_world.isdigit() else world,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=free_port(),
        launcher="none",
    )


def device_for(env: DistEnv, environ: dict | None = None) -> torch.device:
    """This rank's training device. ``DS_ACCELERATOR`` (set by the launchers, read by DeepSpeed) wins:
    ``cpu`` trains on the CPU even where CUDA is available; ``cuda`` requires CUDA; unset (or another
    value), CUDA when available."""
    env_vars = os.environ if environ is None else environ
    accelerator = env_vars.get("DS_ACCELERATOR", "").strip().lower()
    if accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if accelerator == "cuda":
        raise LaunchError(
            "DS_ACCELERATOR=cuda but torch sees no CUDA device; set DS_ACCELERATOR=cpu to train on the CPU"
        )
    return torch.device("cpu")


def process_group_backend(device_type: str) -> str:
    """The ``torch.distributed`` backend for a run whose training device is of ``device_type``.

    On CUDA: nccl for device tensors *and* gloo for host tensors. A plain "nccl" group serves CUDA
    tensors only; any collective on a CPU tensor (ours, DeepSpeed's, or ``all_gather_object`` on a
    CPU-only path) then fails with "No backend type associated with device type cpu". Elsewhere: gloo.
    """
    if device_type == "cuda":
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Initialise ``torch.distributed`` for ``env`` (backend from :func:`process_group_backend`);
    idempotent. A collective that waits longer than ``timeout_s`` fails instead of waiting forever; on
    CUDA, NCCL's async error handling (unless set already) raises that failure in the waiting thread
    (mode 2: abort the communicator, raise) so that the trainer can report it like a hang."""
    if dist.is_initialized():
        return
    # DeepSpeed and torch read these; set them so every launcher looks the same from here on.
    os.environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    dist.init_process_group(
        backend=process_group_backend(device.type),
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over every rank (a no-op on 1 rank). Pass tensors on the training device:
    the group serves host tensors too (gloo), but a device tensor goes over nccl without a host copy."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(
            tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        )
    return tensor


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
