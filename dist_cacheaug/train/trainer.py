"""The training loop: one code path for 1 process, the ``deepspeed`` launcher and ``srun``.

    cacheaug train --config C [--set k=v ...]      # run again on the same run_dir to resume

Order matters: the frozen decoder is built first (no DeepSpeed object exists yet, so nothing can
partition it), the coprocessor is built around it, then the engine (``engine.py``, the only DeepSpeed
module) wraps just the trainable part. The loop itself is :func:`_loop`; checkpointing
(``checkpoint.py``), monitoring (``metrics.py``) and validation (``validation.py``) sit beside it.

Test hooks (environment variables, read on every rank):
``CACHEAUG_INJECT_NAN_STEPS=3,4`` makes rank 0's loss NaN at those (1-based) steps;
``CACHEAUG_DATA_TRACE=1`` appends a hash of every training sample each rank consumes to
``run_dir/data_trace/rank<r>.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..config import ConfigError, RunConfig
from ..core.decoder import build_decoder
from ..core.model import sample_positions
from ..data import build_eval_loader, build_train_loader
from ..variants import build_trainable
from . import checkpoint
from .estimate import flops_per_sequence
from .metrics import MetricsLogger, peak_flops, peak_memory_gib
from .validation import eval_samples_for, summarize, validation_sums


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


def train(cfg: RunConfig) -> None:
    """Train (or resume) the run described by ``cfg`` on this process's rank."""
    # torch's own deprecation notice, raised from inside DeepSpeed's ZeRO-3 collectives every step.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    env = distributed.resolve()
    device = distributed.device_for(env)
    distributed.init_process_group(env, device)
    try:
        _train(cfg, env, device)
    except (checkpoint.CheckpointError, TrainingAborted) as e:
        raise SystemExit(f"cacheaug train (rank {env.rank}): {e}") from None
    finally:
        distributed.destroy()


@dataclass
class TrainState:
    step: int = 0
    nonfinite_total: int = 0  # steps skipped because the loss or gradient was not finite
    nonfinite_run: int = 0  # ... of them in a row, up to now


@dataclass
class StopSignal:
    """SIGTERM / SIGUSR1 ask for a clean stop: finish the step, checkpoint, exit 0."""

    received: int | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, decoder) -> None:
    """config.yaml (resolved) and decoder/ (HF config; the weights too when randomly initialised, so
    eval/generate rebuild the same frozen decoder)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    dec_dir = run_dir / "decoder"
    if not (dec_dir / "config.json").is_file():
        if cfg.model.decoder_path is None:
            decoder.save_pretrained(dec_dir)
        else:
            decoder.config.save_pretrained(dec_dir)
            (dec_dir / "SOURCE").write_text(f"weights: {os.path.abspath(cfg.model.decoder_path)}\n")


def _local_state(loader, pos_gen: torch.Generator) -> dict:
    return {
        "loader": loader.state_dict(),
        "positions_rng": pos_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def _restore(loaded: checkpoint.Loaded, eng, loader, pos_gen, state: TrainState, cfg, env, log) -> None:
    restoring = time.perf_counter()
    saved = loaded.state
    same_world = loaded.world_size == env.world_size
    if same_world:
        eng.load(str(loaded.path))
        mine = saved["ranks"][env.rank]
        loader.load_state_dict(mine["loader"], strict=True)
        pos_gen.set_state(mine["positions_rng"])
        torch.set_rng_state(mine["torch_rng"])
        if mine.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda_rng"])
        random.setstate(mine["python_rng"])
        np.random.set_state(mine["numpy_rng"])
    else:  # elastic: weights were loaded before the engine was built; optimizer moments restart
        src = saved["ranks"][env.rank % loaded.world_size]
        loader.load_state_dict(src["loader"], strict=False)
        if env.rank < loaded.world_size:
            pos_gen.set_state(src["positions_rng"])
        else:
            pos_gen.manual_seed(_seed(cfg.train.seed, 1, env.rank, loaded.step))
    eng.load_scheduler(saved["scheduler"])
    state.step = int(saved["step"])
    state.nonfinite_total = int(saved["nonfinite_total"])
    state.nonfinite_run = int(saved["nonfinite_run"])
    how = (
        "exact"
        if same_world
        else (
            f"elastic: written by {loaded.world_size} rank(s), now {env.world_size}; "
            "Adam moments restart, data position approximate"
        )
    )
    log.message(
        f"resumed from {loaded.path} at step {state.step} ({how}) in {time.perf_counter() - restoring:.1f} s"
    )


def _train(cfg: RunConfig, env: distributed.DistEnv, device: torch.device) -> None:
    from .engine import build_engine  # the DeepSpeed import happens here, after the decoder exists

    run_dir, world, rank = Path(cfg.train.run_dir), env.world_size, env.rank
    accum = cfg.grad_accum_steps(world)
    m = cfg.model
    anchor_id = resolve_anchor(cfg)  # a bad marker fails before anything is built

    # 1. The frozen decoder, before any DeepSpeed object exists; then the trainable part around it
    #    (``model.variant``: the coprocessor, or a baseline/ablation from ``variants/``).
    decoder = build_decoder(m, device=device, seed=cfg.train.seed)
    model = build_trainable(cfg, decoder)
    if cfg.zero.activation_checkpointing:
        model.enable_activation_checkpointing()

    # 2. The newest checkpoint, checked before anything is built on it.
    ckpt_root = run_dir / "checkpoints"
    found = checkpoint.latest(ckpt_root)
    loaded = checkpoint.read(found, checkpoint.fingerprint(model, cfg), world_size=world) if found else None
    if loaded is not None and loaded.weights is not None:  # elastic resume: weights before partitioning
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(loaded.weights[name].to(p.dtype))
    if env.is_main:  # only now: a refused checkpoint leaves the run directory as it was
        _prepare_run_dir(cfg, run_dir, decoder)
    distributed.barrier()

    # 3. Engine, data, state.
    eng = build_engine(cfg, model, world_size=world, device=device)
    loader = build_train_loader(
        cfg.data.train_shards,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.data.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        skip_corrupt=cfg.data.skip_corrupt_shards,
    )
    pos_gen = torch.Generator().manual_seed(_seed(cfg.train.seed, 1, rank))
    state = TrainState()
    log = MetricsLogger(
        run_dir,
        enabled=env.is_main,
        tensorboard=cfg.logging.tensorboard,
        console=cfg.logging.console,
        max_steps=cfg.train.max_steps,
        resume_step=loaded.step if loaded else 0,
    )
    if loaded is not None:
        _restore(loaded, eng, loader, pos_gen, state, cfg, env, log)
    elif env.is_main:
        log.message(
            f"new run in {run_dir}: world size {world} x micro batch {cfg.train.micro_batch_size} x "
            f"accumulation {accum} = global batch {cfg.train.global_batch_size}"
        )
    stop = StopSignal().install()
    try:
        _loop(cfg, env, device, eng, model, loader, pos_gen, state, log, stop, accum, anchor_id)
    finally:
        stop.uninstall()
        loader.close()
        log.close()


def resolve_anchor(cfg: RunConfig) -> int | None:
    """The token id of ``model.anchor_text`` in ``data.tokenizer`` (None without an anchor)."""
    text = cfg.model.anchor_text
    if text is None:
        return None
    from data_tools.tokenizer import load_tokenizer

    tid = load_tokenizer(cfg.data.tokenizer).piece_id(text)
    if tid is None:
        raise ConfigError(
            f"model.anchor_text={text!r} is not one token of data.tokenizer {cfg.data.tokenizer} (train the "
            f"tokenizer with it as a special token: train-tokenizer --special-tokens {text!r})"
        )
    return tid


def _loop(
    cfg, env, device, eng, model, loader, pos_gen, state: TrainState, log, stop: StopSignal, accum, anchor_id
) -> None:
    t = cfg.train
    seq_tokens = t.global_batch_size * cfg.data.seq_len
    flops_per_step = flops_per_sequence(cfg)["total"] * t.global_batch_size
    peak = peak_flops(device)
    nan_steps = {int(s) for s in os.environ.get("CACHEAUG_INJECT_NAN_STEPS", "").split(",") if s.strip()}
    trace = _DataTrace(Path(t.run_dir), env.rank) if os.environ.get("CACHEAUG_DATA_TRACE") else None
    data_iter = iter(loader)
    eng.train(True)
    while state.step < t.max_steps:
        start = time.perf_counter()
        inject = state.step + 1 in nan_steps and env.rank == 0
        lr = eng.lr  # the rate this step's update uses (the scheduler moves it after the update)
        r = _train_step(
            cfg,
            eng,
            data_iter,
            pos_gen,
            accum,
            device,
            inject,
            stop.received is not None,
            trace,
            state.step + 1,
            anchor_id,
        )
        state.step += 1
        step_time = time.perf_counter() - start
        if r["nonfinite"] or not r["applied"]:
            state.nonfinite_total += 1
            state.nonfinite_run += 1
            if state.nonfinite_run > t.max_nonfinite_steps:
                raise TrainingAborted(
                    f"non-finite loss/gradient in {state.nonfinite_run} consecutive steps (up to step "
                    f"{state.step}; train.max_nonfinite_steps={t.max_nonfinite_steps}): stopping. Lower "
                    "optim.lr or check the data; the newest checkpoint predates the problem."
                )
        else:
            state.nonfinite_run = 0
        done = state.step == t.max_steps
        stopping = r["stop"] and not done
        values = {}
        if t.eval_interval and cfg.data.val_shards and (state.step % t.eval_interval == 0 or done):
            values.update(_evaluate(cfg, env, device, eng, model.baseline_decoder))
        if values or done or stopping or state.step % t.log_interval == 0:
            values = {
                "loss": r["loss"],
                **{
                    f"loss_k{k}": r["per_offset"][k - 1]
                    for k in cfg.logging.offsets
                    if k <= cfg.model.num_ahead
                },
                "lr": lr,
                "grad_norm": eng.grad_norm() if r["applied"] else None,
                "tokens_per_s": seq_tokens / step_time,
                "step_time": step_time,
                "mfu": flops_per_step / step_time / (peak * env.world_size) if peak else None,
                "peak_mem_gib": peak_memory_gib(device),
                "nonfinite_skipped": state.nonfinite_total,
                "epoch": loader.epoch,
                **values,
            }
            log.log(state.step, values)
        if done or stopping or state.step % t.checkpoint_interval == 0:
            saving = time.perf_counter()
            _save(cfg, env, eng, model, loader, pos_gen, state, final=done)
            log.message(f"checkpoint of step {state.step} saved in {time.perf_counter() - saving:.1f} s")
        if stopping:
            log.message(f"stop signal received: checkpointed step {state.step}, exiting for requeue")
            return
    if state.step == t.max_steps:
        _export(cfg, env, eng, model, log)


def _train_step(
    cfg, eng, data_iter, pos_gen, accum, device, inject_nan, stop_requested, trace, step, anchor_id
) -> dict:
    """One optimizer step over ``accum`` micro-batches; returns the global (all-rank) loss metrics.

    The sums stay on the training device (no host sync per micro-batch), are all-reduced there (nccl
    on GPU) and come to the host once, for the step's log line and the non-finite/stop decisions."""
    na, p = cfg.model.num_ahead, cfg.model.num_positions
    # per-offset loss, loss, non-finite count, stop flag
    sums = torch.zeros(na + 3, dtype=torch.float64, device=device)
    applied = None
    for micro in range(accum):
        ids = next(data_iter)["input_ids"]
        if trace is not None:
            trace.record(step, micro, ids)
        ids = ids.to(device)
        positions = sample_positions(
            ids.shape[0],
            cfg.data.seq_len,
            p,
            na,
            pos_gen,
            device,
            anchor_mask=None if anchor_id is None else ids == anchor_id,
            anchor_fraction=cfg.model.anchor_fraction,
        )
        out = eng.forward(ids, positions, na)
        loss = out.loss * float("nan") if inject_nan else out.loss
        eng.backward(loss)  # a non-finite loss gives non-finite gradients: DeepSpeed drops that update
        applied = eng.step()
        loss = loss.detach()
        sums[:na] += out.loss_per_offset.detach().to(sums)
        sums[na] += loss.to(sums)
        sums[na + 1] += (~torch.isfinite(loss)).to(sums)
    sums[na + 2] = float(stop_requested)
    distributed.all_reduce_(sums)
    host = sums.tolist()  # the step's one device->host transfer
    world = max(1, torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    n = accum * world
    nonfinite = host[na + 1] > 0
    if nonfinite and applied:
        raise TrainingAborted(
            f"step {step}: DeepSpeed applied an update with a non-finite loss; the weights are "
            "no longer trustworthy (use ZeRO stage 1-3, which drop such updates)"
        )
    return {
        "loss": host[na] / n,
        "per_offset": [v / n for v in host[:na]],
        "nonfinite": nonfinite,
        "applied": bool(applied),
        "stop": host[na + 2] > 0,
    }


def _min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` over all ranks (a collective), reduced on the training device."""
    return int(distributed.all_reduce_(torch.tensor([value], device=device), op="min").item())


def _evaluate(cfg, env, device, eng, decoder) -> dict:
    """Validation loss per offset, augmented and baseline, over every rank's share (collective)."""
    n_samples = eval_samples_for(cfg, env.world_size)
    mine = len(
        build_eval_loader(
            cfg.data.val_shards,
            seq_len=cfg.data.seq_len,
            batch_size=cfg.train.micro_batch_size,
            rank=env.rank,
            world_size=env.world_size,
            max_samples=n_samples,
        )
    )
    batches = _min_over_ranks(mine, device)  # ZeRO-3 forwards are collective: the same count everywhere
    eng.train(False)
    try:
        sums = validation_sums(  # on ``device``
            eng.forward,
            decoder,
            cfg,
            rank=env.rank,
            world_size=env.world_size,
            eval_samples=n_samples,
            device=device,
            max_batches=batches,
        )
    finally:
        eng.train(True)
    return summarize(distributed.all_reduce_(sums).cpu(), cfg.logging.offsets)


def _save(cfg, env, eng, model, loader, pos_gen, state: TrainState, *, final: bool) -> None:
    local = _local_state(loader, pos_gen)
    if final:  # proof for tests and users that the frozen decoder never changed
        local["decoder_digest"] = checkpoint.decoder_digest(model.baseline_decoder)
    global_state = {
        "step": state.step,
        "scheduler": eng.scheduler.state_dict(),
        "nonfinite_total": state.nonfinite_total,
        "nonfinite_run": state.nonfinite_run,
        "fingerprint": checkpoint.fingerprint(model, cfg),
        "config": cfg.to_dict(),
    }
    checkpoint.save(
        Path(cfg.train.run_dir) / "checkpoints",
        state.step,
        eng,
        local,
        global_state,
        keep=cfg.train.keep_checkpoints,
        is_main=env.is_main,
    )


def _export(cfg, env, eng, model, log) -> None:
    """``run_dir/export``: the consolidated trainable part (``save_pretrained`` of the variant: for the
    default, the coprocessor + soft tokens), loadable with ``variants.load_pretrained(dir, decoder=...)``
    (``CacheAugmentedLM.from_pretrained`` for the default) without DeepSpeed. Collective."""
    from .engine import gathered

    run_dir = Path(cfg.train.run_dir)
    tmp, final = run_dir / ".tmp-export", run_dir / "export"
    with gathered(eng.engine.module):
        if env.is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
    distributed.barrier()
    log.message(f"exported the coprocessor to {final} (decoder: {run_dir / 'decoder'})")


class _DataTrace:
    """Test hook: sha1 of every sample a rank trains on, by step and micro-step."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "data_trace" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, micro: int, ids: torch.Tensor) -> None:
        hashes = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in ids]
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "micro": micro, "samples": hashes}) + "\n")
