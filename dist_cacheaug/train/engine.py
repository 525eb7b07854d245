"""The one module that imports DeepSpeed, and the one that partitions models across ranks.

It wraps the trainable part of a :class:`CacheAugmentedLM` (coprocessor + soft tokens; the frozen
decoder is a plain attribute, so DeepSpeed never sees it) in a ZeRO engine built from the generated
JSON (``config.deepspeed_config``), with our AdamW and our LR schedule (``LambdaLR`` from
``cfg.optim``) as client objects. The decoder must already exist when this runs: DeepSpeed's ZeRO-3
conversion touches only the parameters of the module it is given, and no ``HfDeepSpeedConfig`` is
ever created, so DeepSpeed never partitions the decoder.

With ``zero.shard_decoder`` the frozen decoder's transformer layers are partitioned by PyTorch FSDP2
instead (:func:`shard_decoder`): frozen parameters need all-gathers only, never a reduce-scatter or
optimizer state, and FSDP2 re-gathers a layer in backward, which is how the gradient reaches the
coprocessor through the frozen decoder. The model code (``core/``) calls the decoder as before.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..config import ConfigError, RunConfig, deepspeed_config
from ..core.model import CacheAugmentedLM, TensorFileWriter, TrainingLossOutput
from .tensor_stream import SafetensorsWriter, tensor_order

DS_TAG = "deepspeed"  # subdirectory of a checkpoint holding DeepSpeed's own files
#: What DeepSpeed prints on every start that says nothing to a user (one line per rank per run:
#: "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on CPU, even when cached).
NOTICES = ("built successfully",)


@contextmanager
def without_lines(dropped: tuple[str, ...]):
    """Runs the block with Python's stdout captured, then prints every captured line except those
    containing one of ``dropped`` (anything else a library says is kept, in order)."""
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            yield
    finally:
        kept = [ln for ln in buf.getvalue().splitlines(keepends=True) if not any(d in ln for d in dropped)]
        sys.stdout.write("".join(kept))


def lr_multiplier(cfg: RunConfig):
    """step (0-based count of applied updates) -> multiple of ``optim.lr``: linear warmup from
    1/warmup to 1 over ``warmup_steps`` updates, then cosine/linear decay to ``min_lr_ratio`` at
    ``train.max_steps`` (or constant)."""
    o, total = cfg.optim, cfg.train.max_steps

    def fn(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            return 1.0 - (1.0 - o.min_lr_ratio) * progress
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(model: CacheAugmentedLM, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices; none on norms, biases and the soft tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and name != "soft_tokens" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class DecoderShards:
    """How :func:`shard_decoder` laid out the frozen decoder on this rank."""

    layers: int  # transformer layers, each an FSDP2 unit gathered when it runs
    shard_size: int  # ranks one copy of the layers is split over
    replicas: int  # copies (world size / shard_size; > 1 is HSDP: replicated across groups)
    layer_params: int  # parameters in the layers, whole (what the shards add up to)
    local_layer_params: int  # this rank's shard of them
    replicated_params: int  # embeddings, final norm, LM head: full on every rank

    def describe(self, element_size: int) -> str:
        gib = 1024**3
        where = "all ranks" if self.replicas == 1 else f"{self.shard_size} ranks, {self.replicas} copies"
        return (
            f"frozen decoder sharded (FSDP2): {self.layers} layers over {where}: "
            f"{self.local_layer_params * element_size / gib:.2f} GiB of "
            f"{self.layer_params * element_size / gib:.2f} GiB here, + "
            f"{self.replicated_params * element_size / gib:.2f} GiB replicated (embeddings, norm, head)"
        )


def shard_decoder(
    decoder: nn.Module, *, world_size: int, shard_size: int, device: torch.device
) -> DecoderShards:
    """Partition ``decoder``'s transformer layers (``decoder.base_model.layers``) over ranks with
    PyTorch FSDP2 ``fully_shard``, in place. Collective; the process group must exist.

    * Each layer is one unit: gathered when it runs and freed after (``reshard_after_forward``), in the
      no-grad prefix pass, the trace pass and the backward through the trace pass (FSDP2 gathers it
      again before the layer's backward, also when activation checkpointing recomputes it).
    * Its parameters stay frozen: no gradient, so nothing is reduce-scattered, and no optimizer state.
    * The base model is the FSDP2 root, holding no parameters of its own (``ignored_params``): the
      embeddings, final norm and LM head stay whole on every rank, because the model code calls the
      embedding outside the base model's forward and reads the head's weight directly (chunked CE).
    * Layer i prefetches layer i+1 in forward and layer i-1 in backward. Layer 0 "prefetches" the root,
      which has nothing to gather: a non-empty list turns off FSDP2's implicit backward prefetch, which
      would follow the order recorded by the no-grad prefix pass and gather the last layer once more.
    * ``shard_size`` ranks (consecutive: one node) hold one copy; with fewer than ``world_size`` the
      copy is replicated across groups (a 2-D mesh, HSDP) and every gather stays inside the group.
      0, or more than ``world_size``: one copy over all ranks.

    Parameters outside the layers are moved to ``device`` here; FSDP2 moves each layer's parameters
    to ``device`` as it shards them, so a decoder built in host memory never exists whole on a GPU."""
    s = min(shard_size or world_size, world_size)
    if world_size % s:
        raise ValueError(f"decoder shard size {s} does not divide the world size {world_size}")
    base = decoder.base_model
    layers = list(base.layers)
    in_layers = {id(p) for p in base.layers.parameters()}
    outside = [p for p in decoder.parameters() if id(p) not in in_layers]
    for parent in (decoder, base):
        for child in parent.children():
            if child is not base and child is not base.layers:
                child.to(device)  # in place: a tied LM head keeps sharing the embedding
    if s == world_size:
        mesh = init_device_mesh(device.type, (world_size,))
    else:
        mesh = init_device_mesh(device.type, (world_size // s, s), mesh_dim_names=("replicate", "shard"))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(base, mesh=mesh, reshard_after_forward=True, ignored_params=set(outside))
    for prev, nxt in zip(layers, layers[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])
    if layers:
        layers[0].set_modules_to_backward_prefetch([base])
    local = sum(p.to_local().numel() for layer in layers for p in layer.parameters())
    return DecoderShards(
        layers=len(layers),
        shard_size=s,
        replicas=world_size // s,
        layer_params=sum(p.numel() for layer in layers for p in layer.parameters()),
        local_layer_params=local,
        replicated_params=sum(p.numel() for p in outside),
    )


def is_sharded(decoder: nn.Module) -> bool:
    """Whether :func:`shard_decoder` partitioned ``decoder``."""
    return isinstance(decoder.base_model, FSDPModule)


def _partition_now(model: nn.Module, ds_config: dict, device: torch.device) -> None:
    """ZeRO-3-partition ``model``'s parameters before the engine is built, one parameter at a time
    (``deepspeed.zero.Init(module=...)``): the engine would otherwise move the whole coprocessor to the
    GPU first, which a 70B coprocessor does not fit. Buffers (rotary tables) are moved to ``device``
    here, since the engine leaves the placement of a partitioned model alone. ``mem_efficient_linear``
    is off: it would replace ``F.linear`` for every module, the frozen decoder's too."""
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, mem_efficient_linear=False)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


@dataclass
class Engine:
    engine: deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer  # the client optimizer (its param_groups carry the lr)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ds_config: dict
    decoder_shards: DecoderShards | None = None  # set when ``zero.shard_decoder`` partitioned it

    # ---- one micro-step ------------------------------------------------------------------------
    def forward(self, input_ids, positions, num_ahead) -> TrainingLossOutput:
        loss, per_offset, count = self.engine(input_ids, positions, num_ahead)
        return TrainingLossOutput(loss=loss, loss_per_offset=per_offset, num_predictions=int(count))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps

    def step(self) -> bool | None:
        """Micro-step bookkeeping; at the accumulation boundary: clip, optimizer step, zero grads.
        Returns None between boundaries, else whether the update was applied (DeepSpeed drops updates
        whose gradient norm is not finite)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return None
        applied = bool(self.engine.was_step_applied())
        if applied:
            self.scheduler.step()
        return applied

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        norm = float(norm)
        return norm if math.isfinite(norm) else None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # ---- state --------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """DeepSpeed's own files (module, ZeRO partitions of params + optimizer state) under
        ``directory/deepspeed``. Collective: every rank writes its partition."""
        self.engine.save_checkpoint(directory, tag=DS_TAG, save_latest=False)

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` wrote (same world size). Raises on missing/corrupt files."""
        path, _ = self.engine.load_checkpoint(
            directory,
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{DS_TAG}")

    def load_scheduler(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        fn = self.scheduler.lr_lambdas[0]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * fn(self.scheduler.last_epoch)

    def fp32_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (float32, full shape) of every trainable parameter: the consolidated file's layout,
        known on every rank without gathering anything (ZeRO-3 keeps the full shape as ``ds_shape``)."""
        return {
            name: (torch.float32, tuple(getattr(p, "ds_shape", p.shape)))
            for name, p in self.engine.module.named_parameters()
        }

    def fp32_to_main(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The full fp32 master weight of each parameter, in ``names``' order, one at a time: on rank 0's
        host, None on the other ranks. Collective: every rank iterates to the end, in the same order.
        A yielded tensor is valid until the next one is asked for (one buffer serves them all; copy it
        to keep it).

        Memory (why not one dict of everything): under ZeRO-3 each rank sends its own fp32 partition to
        rank 0 (send / receive) into one reused buffer the size of the largest parameter, so the extra
        memory is that buffer on rank 0 and none elsewhere (a fresh buffer per parameter would leave the
        allocator's heap fragmented: measured 7x the largest parameter); under ZeRO-1/2 DeepSpeed
        assembles a parameter by an all-reduce, one full parameter on every rank."""
        params = dict(self.engine.module.named_parameters())
        main = not dist.is_initialized() or dist.get_rank() == 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        sharded = [p for p in params.values() if hasattr(p, "ds_id") and p.requires_grad]
        fp32 = (torch.float32, [(p.partition_numel(), p.ds_tensor.device) for p in sharded])
        buffer = _receive_buffers([fp32], world).get(torch.float32) if main else None
        for name in names:
            p = params[name]
            local = safe_get_local_fp32_param(p) if hasattr(p, "ds_id") else None
            if local is not None:
                full = _gather_partitions_to_main(local, p.ds_numel, p.ds_shape, buffer)
            else:
                full = safe_get_full_fp32_param(p)
                if full is None:  # frozen (LoRA's base weights) or no ZeRO optimizer: the weights themselves
                    one = [p] if hasattr(p, "ds_id") else []
                    with deepspeed.zero.GatheredParameters(one, modifier_rank=None, enabled=bool(one)):
                        full = p.detach().clone()
            yield name, (full.detach().float().cpu() if main else None)
            del full

    def consolidated_fp32(self) -> dict[str, torch.Tensor]:
        """Every fp32 master weight at once, on rank 0 (empty elsewhere): for tests and small models only;
        checkpoints stream :meth:`fp32_to_main` instead. Collective."""
        return {n: t.clone() for n, t in self.fp32_to_main(sorted(self.fp32_specs())) if t is not None}


def _receive_buffers(
    partitions: Iterable[tuple[torch.dtype, list[tuple[int, torch.device]]]], world: int
) -> dict[torch.dtype, torch.Tensor]:
    """Rank 0's receive buffers, one per dtype, each the size of the largest parameter's partitions put
    together (``(dtype, [(partition numel, device), ...])`` per group of parameters). Every parameter is
    received into it in turn: one allocation, where a fresh buffer per parameter fragments the heap.
    None needed on one rank: the local partition is the whole parameter."""
    largest: dict[torch.dtype, tuple[int, torch.device]] = {}
    for dtype, parts in partitions:
        for numel, device in parts:
            if world > 1 and numel * world > largest.get(dtype, (0, None))[0]:
                largest[dtype] = (numel * world, device)
    return {d: torch.empty(n, dtype=d, device=dev) for d, (n, dev) in largest.items()}


def _gather_partitions_to_main(local: torch.Tensor, numel: int, shape, buffer) -> torch.Tensor | None:
    """A ZeRO-3 parameter's equal-sized flat partitions (rank order, the last one padded) put together on
    rank 0, in ``buffer``, and viewed in the parameter's shape; None on the other ranks. Collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return local.narrow(0, 0, numel).view(shape)
    local = local.contiguous()
    if dist.get_rank() != 0:
        dist.send(local, dst=0)
        return None
    # Point-to-point, not ``gather``: gloo's gather receives into a flat buffer of its own and copies out
    # (measured: 2-4x the parameter on rank 0); a receive lands in place, in a view of the buffer.
    n = local.numel()
    with torch.no_grad():
        buffer.narrow(0, 0, n).copy_(local)
        for r in range(1, world):
            dist.recv(buffer.narrow(0, r * n, n), src=r)
    return buffer.narrow(0, 0, numel).view(shape)


@contextmanager
def gathered(module: torch.nn.Module):
    """Inside: the full (16-bit under bf16) parameters of ``module`` on every rank. Collective."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def streaming_writer(is_main: bool) -> TensorFileWriter:
    """A ``write_tensors`` for a variant's ``save_pretrained`` under ZeRO: each ZeRO-3 parameter's 16-bit
    partitions (``ds_tensor``) gathered onto rank 0 alone, into one reused buffer, and written as soon as
    it is whole, in the file's order; the other ranks only send their partitions. No rank ever holds the
    module, and no GPU more than one parameter. Collective: every rank calls ``save_pretrained`` with it,
    so every rank makes the same gathers in the same order. The file is byte-identical to ``save_file``
    of the whole gathered module (tested)."""

    def write(path, tensors: dict[str, torch.Tensor]) -> None:
        specs = {n: (t.dtype, tuple(getattr(t, "ds_shape", t.shape))) for n, t in tensors.items()}
        writer = SafetensorsWriter(path, specs) if is_main else None
        world = dist.get_world_size() if dist.is_initialized() else 1
        sharded = [t for t in tensors.values() if hasattr(t, "ds_id")]
        groups = [(t.dtype, [(t.ds_tensor.numel(), t.ds_tensor.device)]) for t in sharded]
        buffers = _receive_buffers(groups, world) if is_main else {}
        for name in tensor_order(specs):
            t = tensors[name]
            if hasattr(t, "ds_id"):
                full = _gather_partitions_to_main(
                    t.ds_tensor.detach().reshape(-1), t.ds_numel, t.ds_shape, buffers.get(t.dtype)
                )
            else:
                full = t
            if writer is not None:
                writer.write(name, full)
        if writer is not None:
            writer.close()

    return write


def _tensor_outputs(model: CacheAugmentedLM) -> None:
    """Make ``model(...)`` return a tuple of tensors. ZeRO-3 finds a module's outputs to hook its
    backward (re-gathering that module's own parameters, here the soft tokens); it cannot see inside
    the ``TrainingLossOutput`` dataclass. Only this instance's ``forward`` changes."""
    training_loss = model.training_loss

    def forward(input_ids, positions, num_ahead):
        out = training_loss(input_ids, positions, num_ahead)
        return out.loss, out.loss_per_offset, torch.tensor(out.num_predictions)

    model.forward = forward


def build_engine(
    cfg: RunConfig,
    model: CacheAugmentedLM,
    *,
    world_size: int,
    device: torch.device,
    bf16: bool | None = None,
) -> Engine:
    """The ZeRO engine around ``model``'s trainable part. ``bf16``: None (default) means bf16 on GPU,
    fp32 on CPU; tests pass True to run DeepSpeed's bf16 path (fp32 gradient accumulation) on CPU.
    ``zero.stage`` 1-3 and ``zero.hpz_partition_size`` come from the generated JSON; the save/export
    path is the same for every stage (:meth:`Engine.consolidated_fp32`, :func:`gathered`).

    ``zero.shard_decoder``: ``model.decoder`` is partitioned first (:func:`shard_decoder`), and under
    stage 3 the trainable part is partitioned before the engine moves it (:func:`_partition_now`); both
    may then arrive in host memory (the trainer builds them there)."""
    bf16 = device.type == "cuda" if bf16 is None else bf16
    ds_config = deepspeed_config(cfg, world_size, bf16=bf16)
    groups = param_groups(model, cfg.optim.weight_decay)
    o = cfg.optim
    if cfg.zero.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=device.type == "cuda"
        )
    with without_lines(NOTICES):
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=cfg.train.collective_timeout_s),
        )
    shards = None
    if cfg.zero.shard_decoder:
        if model.baseline_decoder is not model.decoder:
            raise ConfigError(
                f"zero.shard_decoder: model.variant={cfg.model.variant} trains the decoder; set "
                "zero.shard_decoder=false"
            )
        shards = shard_decoder(
            model.decoder, world_size=world_size, shard_size=cfg.zero.decoder_shard_size, device=device
        )
        if cfg.zero.stage == 3:
            _partition_now(model, ds_config, device)
    _tensor_outputs(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    return Engine(
        engine=engine, optimizer=optimizer, scheduler=scheduler, ds_config=ds_config, decoder_shards=shards
    )
