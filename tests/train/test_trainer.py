"""The distributed trainer end to end on CPU: real `cacheaug train` processes (1 rank, and 2 ranks under
the deepspeed launcher via launchers/local.sh), ZeRO-3 with gloo, a tiny Gemma-2-shaped decoder and tiny
sentencepiece shards. Unit tests of rank resolution, the LR schedule and checkpoint discovery first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import metrics, run_train, train_command, train_env
from train_helpers import tiny_run_config as _config

from data_tools.faults import faults_env
from dist_cacheaug import CacheAugmentedLM, load_config
from dist_cacheaug.core.decoder import build_decoder
from dist_cacheaug.distributed import first_slurm_host, resolve
from dist_cacheaug.train.checkpoint import decoder_digest, latest, list_checkpoints
from dist_cacheaug.train.validation import eval_samples_for, summarize, validation_sums

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "launchers" / "local.sh"


# ---------------------------------------------------------------------------------------------- unit
def test_resolve_rank_world_from_each_launcher():
    ds = resolve(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    )
    assert (ds.rank, ds.world_size, ds.local_rank, ds.master_addr, ds.master_port, ds.launcher) == (
        3,
        8,
        1,
        "n1",
        1234,
        "env",
    )
    slurm = resolve(
        {
            "SLURM_PROCID": "5",
            "SLURM_STEP_NUM_TASKS": "6",
            "SLURM_LOCALID": "2",
            "SLURM_STEP_NODELIST": "gpu[07-09]",
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
        }
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.local_world_size, slurm.launcher) == (
        5,
        6,
        2,
        2,
        "slurm",
    )
    assert slurm.master_addr == "gpu07" and slurm.master_port == 20000 + 4242
    # An salloc shell (no step variables) and no launcher at all: world size 1 on a free local port.
    for env in ({}, {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}):
        one = resolve(env)
        assert (one.rank, one.world_size, one.launcher, one.master_addr) == (0, 1, "none", "127.0.0.1")
        assert 0 < one.master_port < 65536
    assert first_slurm_host("node5") == "node5"
    with pytest.raises(RuntimeError, match="RANK"):
        resolve({"RANK": "x", "WORLD_SIZE": "2"})


def test_lr_schedule_warmup_then_decay():
    from dist_cacheaug.train.engine import lr_multiplier

    cfg = load_config(
        ROOT / "configs" / "tiny_cpu.yaml",
        ["optim.warmup_steps=10", "train.max_steps=110", "optim.min_lr_ratio=0.1"],
    )
    fn = lr_multiplier(cfg)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0) and fn(10) == pytest.approx(1.0)
    assert fn(60) == pytest.approx(0.55) and fn(110) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)
    lin = lr_multiplier(
        load_config(
            ROOT / "configs" / "tiny_cpu.yaml",
            ["optim.warmup_steps=10", "train.max_steps=110", "optim.schedule=linear", "optim.min_lr_ratio=0"],
        )
    )
    assert lin(60) == pytest.approx(0.5)


def test_checkpoint_discovery_ignores_partial_writes(tmp_path):
    for name in ("step_000003", "step_000010", ".tmp-step_000020", "step_000010.replaced-1", "other"):
        (tmp_path / name).mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 10]
    assert latest(tmp_path).name == "step_000010"
    assert latest(tmp_path / "missing") is None


def test_test_hooks_are_read_once_from_the_one_debug_switch(tmp_path):
    from dist_cacheaug.train.trainer import TestHooks

    none = TestHooks.from_env(tmp_path, 0, {})
    assert none.nan_steps == frozenset() and none.trace is None and not none.inject_nan(1, 0)
    hooks = TestHooks.from_env(tmp_path, 1, faults_env(nan_steps=[2, 4], data_trace=True))
    assert hooks.nan_steps == {2, 4}
    assert hooks.inject_nan(2, 0) and not hooks.inject_nan(2, 1) and not hooks.inject_nan(3, 0)  # rank 0 only
    assert hooks.trace.path == tmp_path / "data_trace" / "rank1.jsonl"


def test_train_state_counts_skipped_steps_and_aborts_after_too_many_in_a_row():
    from dist_cacheaug.train.trainer import StepResult, TrainingAborted, TrainState

    def result(nonfinite=False, applied=True):
        return StepResult(loss=1.0, per_offset=[1.0], nonfinite=nonfinite, applied=applied, stop=False)

    state = TrainState()
    for r in (result(), result(nonfinite=True, applied=False), result(applied=False), result()):
        state.advance(r, max_nonfinite_steps=2)
    assert (state.step, state.nonfinite_total, state.nonfinite_run) == (4, 2, 0)
    for _ in range(2):
        state.advance(result(nonfinite=True, applied=False), max_nonfinite_steps=2)
    with pytest.raises(
        TrainingAborted, match="non-finite loss/gradient in 3 consecutive steps .up to step 7"
    ):
        state.advance(result(nonfinite=True, applied=False), max_nonfinite_steps=2)


DETERMINISTIC = ("loss", "loss_k1", "loss_k2", "loss_k4", "lr", "grad_norm", "nonfinite_skipped")


def _wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _steps_logged(run_dir: Path) -> int:
    try:
        return max(
            (json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()), default=0
        )
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------------------------ 2 ranks, ZeRO-3
@pytest.fixture(scope="module")
def zero3_run(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    cfg = _config(tmp, shards, max_steps=24, eval_interval=12, checkpoint_interval=12)
    proc = run_train(2, cfg)
    return tmp / "run", cfg, proc


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_zero3_loss_falls_decoder_frozen_export_reloads(zero3_run):
    run_dir, cfg_path, proc = zero3_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - 0.05, (first, last)
    for key in ("loss_k1", "loss_k4", "lr", "grad_norm", "tokens_per_s", "step_time", "peak_mem_gib"):
        assert all(r[key] is not None and r[key] > 0 for r in rows), key
    assert all(r["mfu"] is None for r in rows)  # CPU: no peak FLOPs to compare with
    # Straggler report every logged step; no rank is slow here, so no warning and no hang report.
    assert all(r["straggler_rank"] in (0, 1) and r["data_wait"] >= 0 and r["compute_time"] > 0 for r in rows)
    assert "straggler:" not in proc.stdout and not (run_dir / "hang").exists()
    final = rows[-1]
    assert final["val_loss"] < final["val_baseline"]  # the coprocessor helps the frozen decoder
    assert {"val_loss_k1", "val_baseline_k1", "val_loss_k4", "val_baseline_k4"} <= set(final)
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb")).Reload()
    written = {e.step: e.value for e in tb.Scalars("checkpoint/bytes")}
    for step in (12, 24):  # every save's size (what meta.json lists) and its time
        assert written[step] == sum(
            json.loads((run_dir / "checkpoints" / f"step_{step:06d}" / "meta.json").read_text())[
                "files"
            ].values()
        )
    assert {e.step for e in tb.Scalars("checkpoint/seconds")} == {12, 24}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest",
        "step_000012",
        "step_000024",
    ]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000024"

    # The frozen decoder: bitwise the seeded random init, on both ranks, at the end of training.
    cfg = load_config(cfg_path)
    state = torch.load(run_dir / "checkpoints" / "step_000024" / "train_state.pt", weights_only=False)
    saved = build_decoder(cfg.model, seed=cfg.train.seed)
    want = decoder_digest(saved)
    assert [r["decoder_digest"] for r in state["ranks"]] == [want, want]
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(run_dir / "decoder", attn_implementation="eager")
    assert decoder_digest(decoder) == want

    # The export reloads without DeepSpeed and reproduces the trainer's own validation loss.
    model = CacheAugmentedLM.from_pretrained(run_dir / "export", decoder=decoder)
    sums = validation_sums(
        model.training_loss,
        decoder,
        cfg,
        rank=0,
        world_size=1,
        eval_samples=eval_samples_for(cfg, 2),
        device=torch.device("cpu"),
    )
    again = summarize(sums, cfg.logging.offsets)
    for key in ("val_loss", "val_baseline", "val_loss_k1", "val_baseline_k4"):
        assert again[key] == pytest.approx(final[key], rel=1e-5), key


@pytest.mark.distributed
@pytest.mark.slow
def test_world_size_1_matches_world_size_2(zero3_run, tmp_path, shards):
    """Same global batch (8 = 1 rank x 4 x 2 accumulation = 2 ranks x 4): same data, same losses; step 2
    also checks that gradients are averaged the same way across ranks and micro-batches."""
    run_dir, _, _ = zero3_run
    cfg = _config(tmp_path, shards, max_steps=24, checkpoint_interval=12)
    run_train(1, cfg, "train.max_steps=2")  # both steps are in warmup: same lr as the 2-rank run
    one, two = metrics(tmp_path / "run"), metrics(run_dir)[:2]
    for a, b in zip(one, two):
        for key in ("loss", "loss_k1", "loss_k4", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert one[1]["grad_norm"] == pytest.approx(two[1]["grad_norm"], rel=1e-4)


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_of_2_ranks_resumes_on_1_rank(zero3_run, tmp_path):
    src, cfg_path, _ = zero3_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000024")  # resume from the middle of the 2-rank run
    before = {r["step"]: r for r in metrics(src)}
    proc = run_train(1, cfg_path, f"train.run_dir={run_dir}", "train.max_steps=24", "train.eval_interval=0")
    assert "elastic: written by 2 rank(s), now 1" in proc.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    resumed = rows[12:]
    # Sane continuation: from the trained weights (not a fresh start), LR schedule carried over.
    assert all(r["loss"] < before[1]["loss"] - 0.05 for r in resumed)
    assert abs(resumed[0]["loss"] - before[13]["loss"]) < 0.05
    assert resumed[0]["lr"] == pytest.approx(before[13]["lr"], rel=1e-6)
    assert (run_dir / "export" / "cacheaug_config.json").is_file()


def _export_equals_checkpoint(run_dir: Path, ckpt: Path) -> None:
    """The export (fp32 on CPU) holds exactly the checkpoint's consolidated weights."""
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model_fp32.safetensors"))
    exported = {
        f"coprocessor.{k}": v
        for k, v in load_file(str(run_dir / "export/coprocessor/model.safetensors")).items()
    }
    exported.update(load_file(str(run_dir / "export/soft_tokens.safetensors")))
    assert exported.keys() == saved.keys()
    for name, t in saved.items():
        assert torch.equal(exported[name], t), name


@pytest.mark.distributed
@pytest.mark.slow
def test_elastic_resume_2_to_1_and_1_to_2_ranks_is_exact_in_weights(zero3_run, tmp_path):
    """The streamed consolidated file carries the weights across world sizes bit for bit: resumed at the
    checkpoint's own step (no step taken), the export equals the checkpoint."""
    src, cfg_path, _ = zero3_run
    one = tmp_path / "one"
    shutil.copytree(src, one)
    shutil.rmtree(one / "checkpoints" / "step_000024")
    proc = run_train(1, cfg_path, f"train.run_dir={one}", "train.max_steps=12", "train.eval_interval=0")
    assert "elastic: written by 2 rank(s), now 1" in proc.stdout
    _export_equals_checkpoint(one, one / "checkpoints" / "step_000012")
    # 1 rank trains 2 steps and checkpoints; 2 ranks resume from it
    run_train(1, cfg_path, f"train.run_dir={one}", "train.max_steps=14", "train.eval_interval=0")
    assert latest(one / "checkpoints").name == "step_000014"
    two = tmp_path / "two"
    shutil.copytree(one, two)
    shutil.rmtree(two / "export")
    proc = run_train(2, cfg_path, f"train.run_dir={two}", "train.max_steps=14", "train.eval_interval=0")
    assert "elastic: written by 1 rank(s), now 2" in proc.stdout
    _export_equals_checkpoint(two, two / "checkpoints" / "step_000014")


@pytest.mark.distributed
@pytest.mark.slow
def test_kill9_then_rerun_resumes_exactly(shards, tmp_path):
    cfg = _config(tmp_path, shards, max_steps=12, checkpoint_interval=3)
    sets = ["train.run_dir=" + str(tmp_path / "a")]
    run_train(2, cfg, *sets, **faults_env(data_trace=True))
    b_dir = tmp_path / "b"
    cmd = train_command(2, cfg, [f"train.run_dir={b_dir}"])
    proc = subprocess.Popen(
        cmd,
        env=train_env(**faults_env(data_trace=True)),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(
            lambda: (b_dir / "checkpoints" / "step_000003").is_dir() and _steps_logged(b_dir) >= 4, proc
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _steps_logged(b_dir) < 12
    out = run_train(2, cfg, f"train.run_dir={b_dir}", **faults_env(data_trace=True))
    assert "resumed from" in out.stdout and "(exact)" in out.stdout
    a, b = metrics(tmp_path / "a"), metrics(b_dir)
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        for key in DETERMINISTIC:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)

    # Data: per rank, the samples of each step (the rerun's record wins) equal the uninterrupted run's.
    def per_step(run: Path, rank: int) -> dict:
        seen = {}
        for line in (run / "data_trace" / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen[(rec["step"], rec["micro"])] = rec["samples"]
        return seen

    for rank in (0, 1):
        sa, sb = per_step(tmp_path / "a", rank), per_step(b_dir, rank)
        assert sa == sb and len(sa) == 12
    flat = [
        s
        for rank in (0, 1)
        for line in (b_dir / "data_trace" / f"rank{rank}.jsonl").read_text().splitlines()
        for s in json.loads(line)["samples"]
    ]
    # Records after the checkpoint were written twice (before the kill, after the rerun); none other repeats.
    assert len(set(flat)) == 12 * 8


# ----------------------------------------------------------------------------------- faults, 1 rank
@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero_then_corrupt_or_incompatible_is_refused(shards, tmp_path):
    cfg = _config(tmp_path, shards, max_steps=200)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(1, cfg, []),
        env=train_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: _steps_logged(run_dir) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    step = _steps_logged(run_dir)
    assert 2 <= step < 200 and "stop signal received" in out
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", ckpt.name]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == step and all((ckpt / f).stat().st_size == n for f, n in meta["files"].items())
    assert not (run_dir / "export").exists()  # not finished: nothing exported

    # Another model shape: refused, naming the checkpoint; nothing touched.
    files = {p: p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    bad = run_train(1, cfg, "model.num_latents=3", check=False)
    assert bad.returncode != 0
    assert f"checkpoint {ckpt} is incompatible" in bad.stderr and "num_latents" in bad.stderr
    # A truncated file: refused as corrupt; left in place.
    state = ckpt / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    files[state] = 100
    bad = run_train(1, cfg, check=False)
    assert (
        bad.returncode != 0
        and f"checkpoint {ckpt} is corrupt" in bad.stderr
        and "train_state.pt" in bad.stderr
    )
    assert {p: p.stat().st_size for p in ckpt.rglob("*") if p.is_file()} == files
    assert _steps_logged(run_dir) == step


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_and_counted_then_aborts(shards, tmp_path):
    cfg = _config(tmp_path, shards, max_steps=5)
    run_train(1, cfg, "optim.warmup_steps=4", **faults_env(nan_steps=[2, 3]))
    rows = metrics(tmp_path / "run")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 2, 2, 2]
    assert [r["loss"] is None for r in rows] == [False, True, True, False, False]
    assert rows[1]["grad_norm"] is None and rows[3]["grad_norm"] is not None
    assert rows[3]["lr"] == rows[1]["lr"]  # skipped updates do not advance the schedule
    assert all(r["loss"] is not None and r["loss"] < 6.5 for r in rows[3:])  # weights not poisoned

    bad = run_train(
        1,
        cfg,
        f"train.run_dir={tmp_path / 'abort'}",
        "train.max_nonfinite_steps=1",
        check=False,
        **faults_env(nan_steps=[2, 3, 4]),
    )
    assert bad.returncode != 0
    assert (
        "non-finite loss/gradient in 2 consecutive steps" in bad.stderr
        and "max_nonfinite_steps=1" in bad.stderr
    )
