"""One process per device for the evaluation commands (``cacheaug eval``, ``cacheaug downstream``).

Under any launcher that sets ``RANK`` / ``WORLD_SIZE`` (``torchrun``, the ``deepspeed`` launcher) or
inside ``srun`` every process evaluates its share of the data on its own device, and the results are
all-gathered; a plain ``python`` run is world size 1 and starts no process group. Rank 0 alone prints
and writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..distributed import DistEnv, all_gather_object, destroy, device_for, init_process_group, resolve


def eval_device(env: DistEnv, requested: str | None) -> torch.device | str | None:
    """This rank's device. World size 1: ``--device`` as given (None: cuda when available). Several
    ranks: ``--device`` when it names one (a bare ``cuda`` becomes ``cuda:LOCAL_RANK``), else the
    training rule (:func:`~dist_cacheaug.distributed.device_for`: ``DS_ACCELERATOR``, then CUDA)."""
    if env.world_size == 1:
        return requested
    if requested is None:
        return device_for(env)
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return device


@contextmanager
def data_parallel(requested_device: str | None) -> Iterator[tuple[DistEnv, torch.device | str | None]]:
    """(rank environment, this rank's device); with several ranks, a process group for the block
    (started here unless one exists, and then destroyed on the way out)."""
    env = resolve()
    device = eval_device(env, requested_device)
    started = False
    if env.world_size > 1 and not dist.is_initialized():
        init_process_group(env, torch.device(device))
        started = True
    try:
        yield env, device
    finally:
        if started:
            destroy()


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """``(rank, world size)``, or a ValueError; with several ranks torch.distributed must be running
    with that world size (a partial result is never returned as if it were the whole)."""
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard rank {rank} is not in [0, world_size={world})")
    if world > 1 and (not dist.is_initialized() or dist.get_world_size() != world):
        raise RuntimeError(
            f"the work is split over {world} ranks but torch.distributed is not initialised with that world size"
        )
    return rank, world


def gather_indexed(local: list[tuple[int, object]], total: int, world: int) -> list:
    """Every rank's ``(index, result)`` pairs, all-gathered, as one list in index order 0..total-1."""
    parts = all_gather_object(local) if world > 1 else [local]
    merged = dict(pair for part in parts for pair in part)
    missing = sorted(set(range(total)) - set(merged))
    if missing:
        raise RuntimeError(
            f"results of {len(missing)} requests are missing after the gather (first: {missing[0]})"
        )
    return [merged[i] for i in range(total)]
