"""Hung and slow ranks (train/watchdog.py, train/stragglers.py): the watchdog's limits, reports and exit
as units, then real 2-rank gloo runs where a fault (CACHEAUG_FAULTS's "sleep") makes rank 1 sleep inside
the trace pass, inside its data worker, or a little at every step. The SLURM requeue after a hang is in
test_slurm.py."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch
from train_helpers import metrics, run_train
from train_helpers import tiny_run_config as _config

from data_tools.faults import faults_env
from dist_cacheaug.config import ConfigError, load_config
from dist_cacheaug.train import stragglers, watchdog
from dist_cacheaug.train.stragglers import PhaseClock, StragglerReport
from dist_cacheaug.train.watchdog import EXIT_HUNG, Watchdog, is_collective_failure, read_header

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
HANG_S = 5  # train.hang_timeout_s of the real runs


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _watchdog(tmp_path, **kw) -> Watchdog:
    defaults = dict(timeout_s=None, slow_phase_s=1800.0, clock=Clock())
    return Watchdog(tmp_path, kw.pop("rank", 0), kw.pop("world_size", 1), **{**defaults, **kw})


# ---------------------------------------------------------------------------------------------- unit
def test_limit_is_the_slow_allowance_until_sized_then_ten_median_steps_with_a_floor(tmp_path):
    w = _watchdog(tmp_path)
    assert w.limit() == 1800  # start-up: before the first step (it compiles, on GPU)
    w.enter("data")
    w.step_done(1, 90.0)  # the first step is not counted: it compiles
    for step in range(2, 12):
        assert w.limit() == 1800, step  # not sized yet
        w.step_done(step, 40.0 + step)
    assert w.limit() == pytest.approx(10 * 46.5)  # 10 x the median of steps 2..11
    w.enter("checkpoint")
    assert w.limit() == 1800
    small = _watchdog(tmp_path)
    small.enter("data")
    for step in range(1, 12):
        small.step_done(step, 0.5)
    assert small.limit() == watchdog.AUTO_MIN_S
    fixed = _watchdog(tmp_path, timeout_s=7.0)
    fixed.enter("data")
    assert fixed.limit() == 1800  # the first step still gets the slow allowance
    fixed.step_done(1, 0.5)
    assert fixed.limit() == 7.0
    assert not _watchdog(tmp_path, timeout_s=0.0).enabled


def test_progress_is_a_step_or_a_change_between_step_and_slow_phases(tmp_path):
    clock = Clock()
    w = _watchdog(tmp_path, clock=clock)
    clock.now = 10
    w.enter("data")  # leaving start-up
    assert w.mark == 10
    clock.now = 11
    w.enter("trace")  # a phase inside the step is not progress
    assert w.mark == 10 and w.phase_since == 11
    clock.now = 12
    w.step_done(1, 2.0)
    assert w.mark == 12 and w.step == 1
    clock.now = 13
    w.enter("checkpoint")
    assert w.mark == 13


def test_report_names_the_rank_behind_or_the_ranks_without_a_report(tmp_path):
    w = _watchdog(tmp_path, world_size=3)

    def head(phase, step=3):
        return {"step": step, "phase": phase}

    assert "behind: rank(s) 1 (step 3, phase trace)" in w.ranks_behind(
        {0: head("backward"), 1: head("trace"), 2: head("backward")}
    )
    assert "behind: rank(s) 2 (step 3, phase data)" in w.ranks_behind(
        {0: head("optimizer", 4), 1: head("coprocessor"), 2: head("data")}
    )
    assert "every rank is in step 3, phase sync" in w.ranks_behind({r: head("sync") for r in range(3)})
    assert "no report from rank(s) 1, 2" in w.ranks_behind({0: head("sync")})


def test_fire_writes_the_header_and_every_threads_stack_then_ends_with_75(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(watchdog, "LINGER_S", 0.0)
    codes = []
    w = _watchdog(tmp_path, end=codes.append, step=6, clock=time.monotonic)
    w.enter("coprocessor")
    release = threading.Event()

    def stuck_in_a_named_frame():
        release.wait(30)

    t = threading.Thread(target=stuck_in_a_named_frame)
    t.start()
    try:
        w.fire("no progress for 9 s (limit 8 s)")
    finally:
        release.set()
        t.join()
    assert codes == [EXIT_HUNG]
    report = tmp_path / "hang" / "rank-0.txt"
    head = read_header(report)
    assert (head["rank"], head["step"], head["phase"]) == (0, 7, "coprocessor")
    text = report.read_text()
    assert "stuck_in_a_named_frame" in text and "test_fire_writes_the_header" in text
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "hang: rank 0" in line and "step 7, phase coprocessor" in line
    assert f"exiting with {EXIT_HUNG}" in line and "the only rank" in line
    w.fire("again")  # fires once
    assert codes == [EXIT_HUNG]
    w.close()


def test_collective_failures_are_told_from_other_errors():
    gloo = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"
    assert is_collective_failure(RuntimeError(gloo))
    assert is_collective_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:26004"))
    assert not is_collective_failure(RuntimeError("CUDA out of memory"))
    assert not is_collective_failure(ValueError("Timed out waiting"))


def test_watch_settings_are_checked(tmp_path):
    for bad, what in (
        ("train.hang_timeout_s=-1", "train.hang_timeout_s must be >= 0"),
        ("train.hang_slow_phase_s=0", "train.hang_slow_phase_s must be > 0"),
        ("train.collective_timeout_s=0", "train.collective_timeout_s must be > 0"),
    ):
        with pytest.raises(ConfigError, match=re.escape(what)):
            load_config(TINY, [bad])
    assert load_config(TINY, ["train.hang_timeout_s=null"]).train.hang_timeout_s is None


def test_phase_clock_counts_data_wait_and_the_decoder_passes_only():
    clock = PhaseClock(torch.device("cpu"))
    for phase, seconds in (("data", 0.05), ("prefix", 0.02), ("coprocessor", 0.2), ("trace", 0.03)):
        clock.enter(phase)
        time.sleep(seconds)
    clock.enter("backward")
    time.sleep(0.1)
    clock.step_done()
    data_wait, compute = clock.take()
    assert 0.05 <= data_wait < 0.09 and 0.05 <= compute < 0.12  # not the coprocessor's or backward's
    assert clock.take() == (0.0, 0.0)


def test_straggler_warning_needs_a_rank_persistently_slow_and_costly():
    report = StragglerReport(rank=0, world_size=4, device=torch.device("cpu"))
    slow = torch.tensor([[0.0, 0.1], [0.0, 0.5], [0.0, 0.1], [0.0, 0.1]], dtype=torch.float64)
    warnings = [report._warning(1, 5.0, slow) for _ in range(stragglers.PERSISTENT)]
    assert warnings[:-1] == [None] * (stragglers.PERSISTENT - 1)
    assert "rank 1 has been 5.0x the median rank for 3 log intervals" in warnings[-1]
    assert report._warning(2, 5.0, slow) is None and report.streak == 1  # another rank: a new streak
    assert report._warning(2, 1.2, slow) is None and report.streak == 0  # not slow: no streak


# ------------------------------------------------------------------------------- real 2-rank runs
def _hung_run(tmp_path, shards, sleep: dict, *sets: str):
    """A 2-rank run in which rank 1 sleeps as ``sleep`` says; (process, seconds from the start of the
    sleep to the end of the run, rank 1's report header)."""
    cfg = _config(tmp_path, shards, max_steps=8)
    run_dir = tmp_path / "run"
    started = time.time()
    proc = run_train(2, cfg, f"train.hang_timeout_s={HANG_S}", *sets, check=False, **faults_env(sleep=sleep))
    ended = time.time()
    head = read_header(run_dir / "hang" / "rank-1.txt")
    assert head is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    slept_at = head["time"] - head["phase_seconds"]
    assert started < slept_at < ended
    return proc, ended - slept_at, head


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_sleeping_in_the_trace_pass_is_dumped_named_and_stops_the_run(tmp_path, shards):
    proc, hang_to_exit, head = _hung_run(
        tmp_path, shards, {"rank": 1, "step": 3, "phase": "trace", "seconds": 600}
    )
    assert proc.returncode == EXIT_HUNG, proc.stderr[-3000:]
    assert hang_to_exit < HANG_S + 30, hang_to_exit
    print(f"hang to exit: {hang_to_exit:.1f} s (train.hang_timeout_s={HANG_S})")
    assert (head["step"], head["phase"]) == (3, "trace")
    stacks = (tmp_path / "run" / "hang" / "rank-1.txt").read_text()
    assert "injected_sleep" in stacks and "training_loss" in stacks  # the sleeping frame, in the model
    out = proc.stdout + proc.stderr
    [rank0] = [ln for ln in out.splitlines() if "hang: rank 0" in ln]
    assert "behind: rank(s) 1 (step 3, phase trace)" in rank0 and "stacks: " in rank0
    assert read_header(tmp_path / "run" / "hang" / "rank-0.txt")["step"] == 3
    assert "Traceback" not in out  # one line per rank, no traceback


@pytest.mark.slow
@pytest.mark.distributed
def test_data_worker_that_sleeps_is_in_its_ranks_report(tmp_path, shards):
    proc, hang_to_exit, head = _hung_run(
        tmp_path, shards, {"rank": 1, "step": 3, "phase": "worker", "seconds": 600}, "data.num_workers=1"
    )
    assert proc.returncode == EXIT_HUNG and hang_to_exit < HANG_S + 30, proc.stderr[-3000:]
    assert (head["step"], head["phase"]) == (3, "data")
    stacks = (tmp_path / "run" / "hang" / "rank-1.txt").read_text()
    worker = stacks[stacks.index("# data worker pid") :]
    assert "injected_sleep" in worker and "_worker_loop" in worker  # the frame is in the worker process
    [rank0] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "hang: rank 0" in ln]
    assert "behind: rank(s) 1 (step 3, phase data)" in rank0


@pytest.mark.slow
@pytest.mark.distributed
def test_collective_timeout_without_the_watchdog_ends_the_same_way(tmp_path, shards):
    cfg = _config(tmp_path, shards, max_steps=8)
    proc = run_train(
        2,
        cfg,
        "train.hang_timeout_s=0",
        "train.collective_timeout_s=4",
        check=False,
        # Rank 1 (no watchdog) wakes after rank 0 has gone: its next collective fails at once. (Asleep
        # for longer, it would ignore the launcher's SIGTERM, a clean-stop request, until its SIGKILL.)
        **faults_env(sleep={"rank": 1, "step": 3, "phase": "trace", "seconds": 30}),
    )
    assert proc.returncode == EXIT_HUNG, proc.stderr[-3000:]
    [rank0] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "hang: rank 0" in ln]
    assert "a collective failed: " in rank0 and "no report from rank(s) 1" in rank0
    assert read_header(tmp_path / "run" / "hang" / "rank-0.txt")["step"] == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_slow_rank_shows_in_the_straggler_metrics_and_a_warning(tmp_path, shards):
    cfg = _config(tmp_path, shards, max_steps=8)
    proc = run_train(2, cfg, **faults_env(sleep={"rank": 1, "step": "all", "phase": "trace", "seconds": 0.3}))
    rows = metrics(tmp_path / "run")
    assert [r["straggler_rank"] for r in rows] == [1] * 8
    for r in rows:
        assert r["straggler_compute_max"] - r["straggler_compute_median"] > 0.25, r
        assert r["straggler_ratio"] > 1.5
    assert "straggler: rank 1 has been" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "run" / "tb"))
    tb.Reload()
    assert {"straggler/rank", "straggler/compute_max", "perf/data_wait"} <= set(tb.Tags()["scalars"])
    assert [e.value for e in tb.Scalars("straggler/rank")] == [1.0] * 8
    assert not (tmp_path / "run" / "hang").exists()
