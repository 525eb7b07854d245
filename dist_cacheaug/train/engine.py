"""The one module that imports DeepSpeed.

It wraps the trainable part of a :class:`CacheAugmentedLM` (coprocessor + soft tokens; the frozen
decoder is a plain attribute, so DeepSpeed never sees it) in a ZeRO engine built from the generated
JSON (``config.deepspeed_config``), with our AdamW and our LR schedule (``LambdaLR`` from
``cfg.optim``) as client objects. The decoder must already exist when this runs: DeepSpeed's ZeRO-3
conversion touches only the parameters of the module it is given, and no ``HfDeepSpeedConfig`` is
ever created, so nothing partitions the decoder.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

from ..config import ConfigError, RunConfig, deepspeed_config
from ..core.model import CacheAugmentedLM, TrainingLossOutput

DS_TAG = "deepspeed"  # subdirectory of a checkpoint holding DeepSpeed's own files


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


@dataclass
class Engine:
    engine: deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer  # the client optimizer (its param_groups carry the lr)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ds_config: dict

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

    def consolidated_fp32(self) -> dict[str, torch.Tensor]:
        """Full fp32 master weights by parameter name, on CPU, identical on every rank. Collective."""
        out = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:  # no ZeRO optimizer (stage 0 without a master copy)
                with gathered(self.engine.module):
                    full = p.detach()
            out[name] = full.detach().float().cpu().clone()
        return out


@contextmanager
def gathered(module: torch.nn.Module):
    """Inside: the full (16-bit under bf16) parameters of ``module`` on every rank. Collective."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


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
    path is the same for every stage (:meth:`Engine.consolidated_fp32`, :func:`gathered`)."""
    if cfg.zero.shard_decoder:
        raise ConfigError(
            "zero.shard_decoder=true (ZeRO-3 inference for the frozen decoder) is not "
            "implemented yet; the decoder is replicated on every rank"
        )
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
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False
    )
    _tensor_outputs(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    return Engine(engine=engine, optimizer=optimizer, scheduler=scheduler, ds_config=ds_config)
