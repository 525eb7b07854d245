"""The training loop: one code path for 1 process, the ``deepspeed`` launcher and ``srun``.

    cacheaug train --config C [--set k=v ...]      # run again on the same run_dir to resume

Order matters: the frozen decoder is built first (no DeepSpeed object exists yet, so nothing can
partition it), the coprocessor is built around it, then the engine (``engine.py``, the only DeepSpeed
module) wraps just the trainable part. :func:`_start` builds all of it into one :class:`Run`, restoring
the newest checkpoint; :func:`_loop` then repeats :func:`_train_step` (a :class:`StepResult`), :func:`_evaluate`,
:func:`_log_step` and :func:`_checkpoint`. Checkpointing (``checkpoint.py``), monitoring
(``metrics.py``) and validation (``validation.py``) sit beside it.

Fault injection for tests comes from one debug switch, ``CACHEAUG_FAULTS`` (``data_tools/faults.py``),
read once at start on every rank into :class:`TestHooks`: a NaN loss at given steps, a trace of every
sample consumed, a rank that sleeps in a phase (:class:`SleepInjection`).

A watchdog thread per rank (``watchdog.py``) ends a rank that stops making progress, and
``stragglers.py`` reports a rank that is merely slow; both follow the phases the loop (and the model,
``core.phases``) announce.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.faults import read_faults
from data_tools.storage import Retry

from .. import distributed
from ..config import ConfigError, RunConfig
from ..core import phases
from ..core.decoder import build_decoder
from ..core.model import sample_positions
from ..data import build_eval_loader, build_train_loader
from ..errors import UserError
from ..variants import build_trainable
from . import checkpoint
from .estimate import flops_per_sequence
from .metrics import MetricsLogger, peak_flops, peak_memory_gib
from .run_state import GeneratorState, ProcessRngs, Stateful, load_state_dicts, state_dicts
from .stragglers import PhaseClock, StragglerReport
from .validation import eval_samples_for, summarize, validation_sums
from .watchdog import Watchdog, is_collective_failure

if TYPE_CHECKING:  # engine.py imports DeepSpeed, which must wait until the decoder exists
    from .engine import Engine


class TrainingAborted(UserError, RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


def train(cfg: RunConfig) -> None:
    """Train (or resume) the run described by ``cfg`` on this process's rank."""
    # torch's own deprecation notice, raised from inside DeepSpeed's ZeRO-3 collectives every step.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    env = distributed.resolve()
    inputs = check_data(cfg)  # before any rendezvous: missing shards or tokenizer fail at once, on every rank
    device = distributed.device_for(env)
    t = cfg.train
    watch = Watchdog(
        Path(t.run_dir),
        env.rank,
        env.world_size,
        timeout_s=t.hang_timeout_s,
        slow_phase_s=t.hang_slow_phase_s,
    ).start()  # from here: a rendezvous, start-up or step that never ends becomes a report and an exit
    try:
        distributed.init_process_group(env, device, timeout_s=t.collective_timeout_s)
        try:  # errors a user can fix (checkpoint, data, aborted run) reach the CLI, which prints one line
            _train(cfg, env, device, inputs, watch)
        except Exception as e:
            if is_collective_failure(e):
                watch.collective_failed(e)  # the hang report and exit: no clean-up collective can finish now
            raise
        finally:
            distributed.destroy()
    finally:
        watch.close()


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's numbers, already averaged over every rank and micro-batch."""

    loss: float
    per_offset: list[float]  # loss at ahead offset k = 1..num_ahead
    nonfinite: bool  # some micro-batch's loss was not finite, on some rank
    applied: bool  # the optimizer applied the update (DeepSpeed drops non-finite gradients)
    stop: bool  # some rank received a stop signal

    @property
    def skipped(self) -> bool:
        return self.nonfinite or not self.applied


@dataclass
class TrainState:
    step: int = 0
    nonfinite_total: int = 0  # steps skipped because the loss or gradient was not finite
    nonfinite_run: int = 0  # ... of them in a row, up to now

    def advance(self, result: StepResult, max_nonfinite_steps: int) -> None:
        """Count the step just taken; too many skipped steps in a row abort the run."""
        self.step += 1
        if not result.skipped:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        if self.nonfinite_run > max_nonfinite_steps:
            raise TrainingAborted(
                f"non-finite loss/gradient in {self.nonfinite_run} consecutive steps (up to step "
                f"{self.step}; train.max_nonfinite_steps={max_nonfinite_steps}): stopping. Lower "
                "optim.lr or check the data; the newest checkpoint predates the problem."
            )

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_run = int(state["nonfinite_run"])


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


@dataclass(frozen=True)
class TestHooks:
    """Test-only behaviour, from the ``CACHEAUG_FAULTS`` switch read once at start (module docstring)."""

    __test__ = False  # not a pytest test class

    nan_steps: frozenset[int] = frozenset()  # 1-based steps whose loss rank 0 makes NaN
    trace: _DataTrace | None = None
    sleep: SleepInjection | None = None  # of this rank

    @classmethod
    def from_env(cls, run_dir: Path, rank: int, environ: Mapping[str, str] = os.environ) -> TestHooks:
        faults = read_faults(environ)
        sleep = SleepInjection.parse(faults["sleep"], run_dir) if faults.get("sleep") else None
        return cls(
            nan_steps=frozenset(int(s) for s in faults.get("nan_steps", ())),
            trace=_DataTrace(run_dir, rank) if faults.get("data_trace") else None,
            sleep=sleep if sleep is not None and sleep.rank == rank else None,
        )

    def inject_nan(self, step: int, rank: int) -> bool:
        return rank == 0 and step in self.nan_steps


def injected_sleep(seconds: float) -> None:
    """The frame a test finds in the hang report."""
    time.sleep(seconds)


@dataclass(frozen=True)
class SleepInjection:
    """Fault ``"sleep": {"rank": R, "step": S, "phase": P, "seconds": X}``: rank R sleeps X seconds on
    entering phase P (a ``watchdog.PHASE_ORDER`` name) of step S, once per run directory (a marker
    file), so that the requeued run goes on; ``"step": "all"``: at every step (a straggler).
    ``"phase": "worker"``: inside the data worker, before it makes its S-th batch."""

    rank: int
    step: int | None  # None: every step
    phase: str
    seconds: float
    marker: str  # created by the first sleep of a one-off injection

    @classmethod
    def parse(cls, fields: dict, run_dir: Path) -> SleepInjection:
        step = fields.get("step", "all")
        return cls(
            rank=int(fields["rank"]),
            step=None if step == "all" else int(step),
            phase=fields["phase"],
            seconds=float(fields["seconds"]),
            marker=str(run_dir / ".injected-sleep"),
        )

    def _due(self) -> bool:
        if self.step is None:
            return True
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def at_phase(self, step: int, phase: str) -> None:
        if phase == self.phase and self.step in (None, step) and self._due():
            injected_sleep(self.seconds)

    def __call__(self, batch: int) -> None:  # the loader's before_batch, in the worker
        if self.phase == "worker" and self.step in (None, batch) and self._due():
            injected_sleep(self.seconds)


@dataclass
class Run:
    """Everything one training process holds while it trains: built by :func:`_start`, then passed to
    every part of the loop."""

    cfg: RunConfig
    env: distributed.DistEnv
    device: torch.device
    eng: Engine
    model: torch.nn.Module  # the trainable part (``variants.build_trainable``) around the frozen decoder
    loader: object  # the resumable training loader (``data.build_train_loader``)
    positions: torch.Generator  # draws each step's augmentation positions
    log: MetricsLogger
    accum: int  # micro-batches per optimizer step on this rank
    anchor_id: int | None  # token id of ``model.anchor_text``
    hooks: TestHooks = field(default_factory=TestHooks)
    state: TrainState = field(default_factory=TrainState)
    stop: StopSignal = field(default_factory=StopSignal)
    watch: Watchdog | None = None  # this rank's hang watchdog
    clock: PhaseClock | None = None  # this rank's data-wait and compute seconds, for the straggler report
    stragglers: StragglerReport | None = None
    unlisten: list[Callable[[], None]] = field(default_factory=list)  # ends each core.phases listener

    def close(self) -> None:
        self.stop.uninstall()
        for stop_listening in self.unlisten:
            stop_listening()
        self.loader.close()
        self.log.close()


@dataclass(frozen=True)
class Throughput:
    """What a step's wall time turns into: tokens/s and model FLOPs utilisation."""

    tokens_per_step: int
    flops_per_step: float
    peak_flops: float | None  # all ranks together; None when the device's peak is unknown

    @classmethod
    def of(cls, run: Run) -> Throughput:
        t = run.cfg.train
        peak = peak_flops(run.device)
        return cls(
            tokens_per_step=t.global_batch_size * run.cfg.data.seq_len,
            flops_per_step=flops_per_sequence(run.cfg)["total"] * t.global_batch_size,
            peak_flops=peak * run.env.world_size if peak else None,
        )

    def metrics(self, step_time: float) -> dict:
        return {
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time": step_time,
            "mfu": self.flops_per_step / step_time / self.peak_flops if self.peak_flops else None,
        }


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


class SchedulerState:
    """The LR schedule as a component: loading it sets the optimizer's learning rates too."""

    def __init__(self, eng: Engine):
        self.eng = eng

    def state_dict(self) -> dict:
        return self.eng.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.eng.load_scheduler(state)


def shared_state(run: Run) -> dict[str, Stateful]:
    """What every rank holds alike: saved once per checkpoint."""
    return {"train": run.state, "scheduler": SchedulerState(run.eng)}


def rank_state(run: Run) -> dict[str, Stateful]:
    """What each rank holds for itself: saved per rank, restored on the same rank (an exact resume)."""
    return {"loader": run.loader, "positions": GeneratorState(run.positions), "rngs": ProcessRngs()}


def _restore(run: Run, loaded: checkpoint.Loaded) -> None:
    """Continue from ``loaded``: exactly (same world size: engine, data position, every RNG) or elastically
    (weights were copied in before the engine was built; optimizer moments restart)."""
    restoring = time.perf_counter()
    env, saved = run.env, loaded.state
    same_world = loaded.world_size == env.world_size
    load_state_dicts(shared_state(run), saved, str(loaded.path))
    if same_world:
        run.eng.load(str(loaded.path))
        load_state_dicts(rank_state(run), saved["ranks"][env.rank], f"{loaded.path} (rank {env.rank})")
    else:  # another world size: each rank takes a saved rank's data position; fresh draws where none
        src = saved["ranks"][env.rank % loaded.world_size]
        run.loader.load_state_dict(src["loader"], strict=False)
        if env.rank < loaded.world_size:
            GeneratorState(run.positions).load_state_dict(src["positions"])
        else:
            run.positions.manual_seed(_seed(run.cfg.train.seed, 1, env.rank, loaded.step))
    how = (
        "exact"
        if same_world
        else (
            f"elastic: written by {loaded.world_size} rank(s), now {env.world_size}; "
            "Adam moments restart, data position approximate"
        )
    )
    run.log.message(
        f"resumed from {loaded.path} at step {run.state.step} ({how}) in {time.perf_counter() - restoring:.1f} s"
    )


def _train(
    cfg: RunConfig, env: distributed.DistEnv, device: torch.device, inputs: DataCheck, watch: Watchdog
) -> None:
    run = _start(cfg, env, device, inputs, watch)
    run.stop.install()
    try:
        _loop(run)
    finally:
        run.close()


def _start(
    cfg: RunConfig, env: distributed.DistEnv, device: torch.device, inputs: DataCheck, watch: Watchdog
) -> Run:
    """Build (or rebuild, on resume) everything the loop needs, in the order that matters."""
    from .engine import build_engine  # the DeepSpeed import happens here, after the decoder exists

    run_dir, world, rank = Path(cfg.train.run_dir), env.world_size, env.rank

    # 1. The frozen decoder, before any DeepSpeed object exists; then the trainable part around it
    #    (``model.variant``: the coprocessor, or a baseline/ablation from ``variants/``).
    #    A decoder to be sharded is built in host memory: no GPU holds it whole (engine.shard_decoder).
    load_device = "cpu" if cfg.zero.shard_decoder else None
    decoder = build_decoder(cfg.model, device=device, seed=cfg.train.seed, load_device=load_device)
    if decoder.config.vocab_size < inputs.vocab_size:
        raise DataError(
            f"data.train_shards were made with a {inputs.vocab_size}-token vocabulary but the decoder has "
            f"{decoder.config.vocab_size}; set model.decoder_config.vocab_size >= {inputs.vocab_size} (or use a "
            "decoder_path whose vocabulary covers the tokenizer's)"
        )
    model = build_trainable(cfg, decoder)
    if cfg.zero.activation_checkpointing:
        model.enable_activation_checkpointing()

    # 2. The newest checkpoint, checked before anything is built on it.
    found = checkpoint.latest(run_dir / "checkpoints")
    loaded = checkpoint.read(found, checkpoint.fingerprint(model, cfg), world_size=world) if found else None
    if loaded is not None and loaded.weights is not None:  # elastic resume: weights before partitioning
        checkpoint.copy_weights_into(model, loaded.weights)
    if env.is_main:  # only now: a refused checkpoint leaves the run directory as it was
        _prepare_run_dir(cfg, run_dir, decoder)
    distributed.barrier()

    # 3. Engine, data, state; then the checkpoint's state on top.
    hooks = TestHooks.from_env(run_dir, rank)
    run = Run(
        cfg=cfg,
        env=env,
        device=device,
        eng=build_engine(cfg, model, world_size=world, device=device),
        model=model,
        loader=build_train_loader(
            cfg.data.train_shards,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            rank=rank,
            world_size=world,
            seed=cfg.data.seed,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            skip_corrupt=cfg.data.skip_corrupt_shards,
            worker_init_fn=watch.worker_init(),
            before_batch=hooks.sleep,
            prefetch_shards=cfg.data.prefetch_shards,
            retry=Retry(attempts=cfg.data.read_retries, timeout_s=cfg.data.read_timeout_s),
        ),
        positions=torch.Generator().manual_seed(_seed(cfg.train.seed, 1, rank)),
        log=MetricsLogger(
            run_dir,
            enabled=env.is_main,
            tensorboard=cfg.logging.tensorboard,
            console=cfg.logging.console,
            max_steps=cfg.train.max_steps,
            resume_step=loaded.step if loaded else 0,
        ),
        accum=cfg.grad_accum_steps(world),
        anchor_id=inputs.anchor_id,
        hooks=hooks,
        watch=watch,
        clock=PhaseClock(device),
        stragglers=StragglerReport(rank, world, device),
    )
    run.unlisten.append(phases.listen(run.clock.enter))
    if hooks.sleep is not None:
        sleep = hooks.sleep
        run.unlisten.append(phases.listen(lambda name: sleep.at_phase(watch.step + 1, name)))
    if run.eng.decoder_shards is not None and env.is_main:
        run.log.message(run.eng.decoder_shards.describe(next(decoder.parameters()).element_size()))
    if loaded is not None:
        _restore(run, loaded)
    elif env.is_main:
        run.log.message(
            f"new run in {run_dir}: world size {world} x micro batch {cfg.train.micro_batch_size} x "
            f"accumulation {run.accum} = global batch {cfg.train.global_batch_size}"
        )
    return run


@dataclass(frozen=True)
class DataCheck:
    vocab_size: int  # the largest tokenizer vocabulary among the shards (0: not recorded)
    anchor_id: int | None  # token id of ``model.anchor_text``


def check_data(cfg: RunConfig) -> DataCheck:
    """Read every shard manifest the run needs (validation shards only when it validates) and the
    tokenizer; an error names the config field and how to make the data."""
    from data_tools.shards import read_manifest

    fields = [("data.train_shards", cfg.data.train_shards)]
    if cfg.train.eval_interval > 0:
        fields.append(("data.val_shards", cfg.data.val_shards))
    vocab = 0
    for key, dirs in fields:
        for d in dirs:
            try:
                vocab = max(vocab, int(read_manifest(d)["tokenizer"].get("vocab_size") or 0))
            except DataError as e:
                how = (
                    ""
                    if "make-shards" in str(e)
                    else f"; make it with `python -m data_tools make-shards --out {d} ...`"
                )
                raise DataError(f"{key}: {e}{how} (README: Data, Training)") from None
    return DataCheck(vocab_size=vocab, anchor_id=resolve_anchor(cfg))


def resolve_anchor(cfg: RunConfig) -> int | None:
    """The token id of ``model.anchor_text`` in ``data.tokenizer`` (None without an anchor)."""
    text = cfg.model.anchor_text
    if text is None:
        return None
    from data_tools.tokenizer import load_tokenizer

    try:
        tid = load_tokenizer(cfg.data.tokenizer).piece_id(text)
    except DataError as e:
        raise DataError(
            f"data.tokenizer: {e}; give the tokenizer the shards were made with (python -m data_tools "
            "train-tokenizer makes one)"
        ) from None
    if tid is None:
        raise ConfigError(
            f"model.anchor_text={text!r} is not one token of data.tokenizer {cfg.data.tokenizer} (train the "
            f"tokenizer with it as a special token: train-tokenizer --special-tokens {text!r})"
        )
    return tid


# ---- the loop --------------------------------------------------------------------------------------
def _loop(run: Run) -> None:
    """Step until ``train.max_steps`` (then export) or until a stop signal (checkpoint, return)."""
    t, state = run.cfg.train, run.state
    batches = iter(run.loader)
    speed = Throughput.of(run)
    run.eng.train(True)
    if run.watch is not None:
        run.watch.step = state.step
    while state.step < t.max_steps:
        start = time.perf_counter()
        lr = run.eng.lr  # the rate this step's update uses (the scheduler moves it after the update)
        result = _train_step(run, batches)
        state.advance(result, t.max_nonfinite_steps)
        step_time = time.perf_counter() - start
        if run.watch is not None:
            run.watch.step_done(state.step, step_time)
        if run.clock is not None:
            run.clock.step_done()
        done = state.step == t.max_steps
        stopping = result.stop and not done
        validation = _evaluate(run) if _evaluation_due(run.cfg, state.step) else {}
        if validation or done or stopping or state.step % t.log_interval == 0:
            _log_step(run, result, lr, speed.metrics(step_time), validation)
        if done or stopping or state.step % t.checkpoint_interval == 0:
            _checkpoint(run, final=done)
        if stopping:
            run.log.message(f"stop signal received: checkpointed step {state.step}, exiting for requeue")
            return
    if state.step == t.max_steps:
        _export(run)


def _train_step(run: Run, batches: Iterator[dict]) -> StepResult:
    """Optimizer step ``run.state.step + 1`` over ``run.accum`` micro-batches from ``batches``; returns the
    global (all-rank) loss metrics. Does not advance ``run.state``.

    The sums stay on the training device (no host sync per micro-batch), are all-reduced there (nccl
    on GPU) and come to the host once, for the step's log line and the non-finite/stop decisions."""
    cfg, eng, device = run.cfg, run.eng, run.device
    na, p = cfg.model.num_ahead, cfg.model.num_positions
    step = run.state.step + 1
    inject_nan = run.hooks.inject_nan(step, run.env.rank)
    # per-offset loss, loss, non-finite count, stop flag
    sums = torch.zeros(na + 3, dtype=torch.float64, device=device)
    applied = None
    for micro in range(run.accum):
        phases.enter("data")
        ids = next(batches)["input_ids"]
        if run.hooks.trace is not None:
            run.hooks.trace.record(step, micro, ids)
        ids = ids.to(device)
        positions = sample_positions(
            ids.shape[0],
            cfg.data.seq_len,
            p,
            na,
            run.positions,
            device,
            anchor_mask=None if run.anchor_id is None else ids == run.anchor_id,
            anchor_fraction=cfg.model.anchor_fraction,
        )
        out = eng.forward(ids, positions, na)  # announces prefix, coprocessor, trace (core.phases)
        loss = out.loss * float("nan") if inject_nan else out.loss
        phases.enter("backward")
        eng.backward(loss)  # a non-finite loss gives non-finite gradients: DeepSpeed drops that update
        phases.enter("optimizer")
        applied = eng.step()
        loss = loss.detach()
        sums[:na] += out.loss_per_offset.detach().to(sums)
        sums[na] += loss.to(sums)
        sums[na + 1] += (~torch.isfinite(loss)).to(sums)
    sums[na + 2] = float(run.stop.received is not None)
    phases.enter("sync")
    distributed.all_reduce_(sums)
    host = sums.tolist()  # the step's one device->host transfer
    n = run.accum * max(1, run.env.world_size)
    nonfinite = host[na + 1] > 0
    if nonfinite and applied:
        raise TrainingAborted(
            f"step {step}: DeepSpeed applied an update with a non-finite loss; the weights are "
            "no longer trustworthy (use ZeRO stage 1-3, which drop such updates)"
        )
    return StepResult(
        loss=host[na] / n,
        per_offset=[v / n for v in host[:na]],
        nonfinite=nonfinite,
        applied=bool(applied),
        stop=host[na + 2] > 0,
    )


def _evaluation_due(cfg: RunConfig, step: int) -> bool:
    t = cfg.train
    return bool(t.eval_interval and cfg.data.val_shards) and (
        step % t.eval_interval == 0 or step == t.max_steps
    )


def _log_step(run: Run, result: StepResult, lr: float, speed: dict, validation: dict) -> None:
    phases.enter("log")
    slow, warning = (
        ({}, None) if run.stragglers is None else run.stragglers.metrics(run.clock, speed["step_time"])
    )
    run.log.log(run.state.step, {**_step_metrics(run, result, lr, speed), **slow, **validation})
    if warning is not None:
        run.log.message(warning)


def _step_metrics(run: Run, result: StepResult, lr: float, speed: dict) -> dict:
    cfg = run.cfg
    return {
        "loss": result.loss,
        **{f"loss_k{k}": result.per_offset[k - 1] for k in cfg.logging.offsets if k <= cfg.model.num_ahead},
        "lr": lr,
        "grad_norm": run.eng.grad_norm() if result.applied else None,
        **speed,
        "peak_mem_gib": peak_memory_gib(run.device),
        "nonfinite_skipped": run.state.nonfinite_total,
        "epoch": run.loader.epoch,
    }


def _min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` over all ranks (a collective), reduced on the training device."""
    return int(distributed.all_reduce_(torch.tensor([value], device=device), op="min").item())


def _evaluate(run: Run) -> dict:
    """Validation loss per offset, augmented and baseline, over every rank's share (collective)."""
    cfg, env, device = run.cfg, run.env, run.device
    phases.enter("validation")
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
    run.eng.train(False)
    try:
        sums = validation_sums(  # on ``device``
            run.eng.forward,
            run.model.baseline_decoder,
            cfg,
            rank=env.rank,
            world_size=env.world_size,
            eval_samples=n_samples,
            device=device,
            max_batches=batches,
        )
    finally:
        run.eng.train(True)
    return summarize(distributed.all_reduce_(sums).cpu(), cfg.logging.offsets)


# ---- checkpoint and export -------------------------------------------------------------------------
def _checkpoint(run: Run, *, final: bool) -> None:
    phases.enter("checkpoint")
    saving = time.perf_counter()
    path = _save(run, final=final)
    seconds = time.perf_counter() - saving
    if run.env.is_main:
        written = checkpoint.saved_bytes(path)
        run.log.tensorboard_scalars(
            run.state.step, {"checkpoint/bytes": written, "checkpoint/seconds": seconds}
        )
        run.log.message(
            f"checkpoint of step {run.state.step} saved in {seconds:.1f} s ({written / 2**20:,.1f} MiB)"
        )


def _save(run: Run, *, final: bool) -> Path:
    cfg, state = run.cfg, run.state
    local = state_dicts(rank_state(run))
    if final:  # proof for tests and users that the frozen decoder never changed
        local["decoder_digest"] = checkpoint.decoder_digest(run.model.baseline_decoder)
    global_state = {
        **state_dicts(shared_state(run)),
        "fingerprint": checkpoint.fingerprint(run.model, cfg),
        "config": cfg.to_dict(),
    }
    return checkpoint.save(
        Path(cfg.train.run_dir) / "checkpoints",
        state.step,
        run.eng,
        local,
        global_state,
        keep=cfg.train.keep_checkpoints,
        is_main=run.env.is_main,
    )


def _export(run: Run) -> None:
    """``run_dir/export``: the consolidated trainable part (``save_pretrained`` of the variant: for the
    default, the coprocessor + soft tokens), loadable with ``variants.load_pretrained(dir, decoder=...)``
    (``CacheAugmentedLM.from_pretrained`` for the default) without DeepSpeed. Collective.

    A variant with ``streamed_export`` is written one parameter at a time (``engine.streaming_writer``):
    no GPU ever holds the whole coprocessor. Every rank runs the same ``save_pretrained`` so that every
    rank makes the same gathers; the others write their small files into a scratch directory."""
    from .engine import gathered, streaming_writer

    phases.enter("export")
    run_dir, main = Path(run.cfg.train.run_dir), run.env.is_main
    tmp, final = run_dir / ".tmp-export", run_dir / "export"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if getattr(run.model, "streamed_export", False):
        write = streaming_writer(main)
        if main:
            run.model.save_pretrained(tmp, write)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                run.model.save_pretrained(scratch, write)
    else:  # saved through Hugging Face's save_pretrained: the whole module gathered first
        with gathered(run.eng.engine.module):
            if main:
                run.model.save_pretrained(tmp)
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    distributed.barrier()
    run.log.message(f"exported the coprocessor to {final} (decoder: {run_dir / 'decoder'})")


class _DataTrace:
    """Test hook: sha1 of every sample a rank trains on, by step and micro-step."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "data_trace" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, micro: int, ids: torch.Tensor) -> None:
        hashes = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in ids]
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "micro": micro, "samples": hashes}) + "\n")
