"""SLURM: the rendered job script (no cluster needed), then real jobs on a single-machine cluster
(`bash slurm/local_cluster.sh start`, as root): a 2-task job completes with metrics and a checkpoint;
a preempted job checkpoints, requeues itself, resumes, and ends with the same metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import tiny_run_config

from dist_cacheaug.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "train.sbatch"


def test_dry_run_prints_directives_and_command(capsys, tmp_path):
    code = cli_main(
        [
            "slurm",
            str(ROOT / "configs/gemma2_2b_paper.yaml"),
            "--nodes",
            "8",
            "--gpus-per-node",
            "8",
            "--time",
            "12:00:00",
            "--partition",
            "gpu",
            "--sbatch=--exclusive",
            "--set",
            f"train.run_dir={tmp_path / 'run'}",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for directive in (
        "--nodes=8",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=4",  # default: the config's 2 loader workers + 2
        "--time=12:00:00",
        "--signal=B:USR1@300",
        "--requeue",
        "--partition=gpu",
        "--exclusive",
        f"--output={tmp_path / 'run'}/logs/%x-%j.out",
    ):
        assert f"#SBATCH {directive}\n" in out, directive
    assert f"exec bash {SBATCH} {tmp_path / 'run'}/slurm/config.yaml" in out
    assert f"CACHEAUG_PYTHON={sys.executable}" in out
    assert "world size 64" in out and "gradient accumulation 8" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_job_size_that_does_not_divide_the_batch_is_refused(capsys):
    code = cli_main(
        [
            "slurm",
            str(ROOT / "configs/gemma2_2b_paper.yaml"),
            "--nodes",
            "3",
            "--gpus-per-node",
            "8",
            "--dry-run",
        ]
    )
    assert code == 2
    assert "world size 24" in capsys.readouterr().err


def test_sbatch_script_defaults_are_overridable_directives():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert {"--requeue", "--signal=B:USR1@300", "--open-mode=append"} <= set(directives)
    commands = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert any(ln.lstrip().startswith("srun ") for ln in commands) and "scontrol requeue" in text
    assert not any(re.search(r"\b(ssh|pdsh)\b", ln) for ln in commands)  # srun launches every rank


# ------------------------------------------------------------------------------------ a real cluster
def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(re.search(r"idle|mixed|alloc", out.stdout))


@pytest.fixture(scope="module")
def cluster():
    if not _cluster_up():
        msg = "no running SLURM cluster: start one with `sudo bash slurm/local_cluster.sh start`"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run the SLURM tests)")
        pytest.skip(msg)


def _submit(config: Path, run_dir: Path, *sets: str) -> str:
    env = dict(os.environ, CACHEAUG_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    cmd = [
        "sbatch",
        "--parsable",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",  # the one-node test cluster has as many CPUs as this machine (2)
        f"--output={run_dir.parent}/sbatch-%j.out",
        str(SBATCH),
        str(config),
        "--set",
        f"train.run_dir={run_dir}",
        *[a for s in sets for a in ("--set", s)],
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return out.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def _wait(pred, what: str, timeout: float = 420):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SETS = ("train.max_steps=16", "train.checkpoint_interval=4", "train.log_interval=1")


@pytest.fixture(scope="module")
def finished_job(cluster, shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_full")
    config = tiny_run_config(tmp, shards)
    run_dir = tmp / "run"
    job = _submit(config, run_dir, *SETS)
    _wait(lambda: _job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), f"job {job}")
    return job, config, run_dir


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_completes_with_metrics_and_checkpoint(finished_job):
    job, _, run_dir = finished_job
    info = _job(job)
    log = (run_dir.parent / f"sbatch-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info.get("Restarts") == "0" and "requeueing" not in log
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000016"
    assert (run_dir / "export" / "cacheaug_config.json").is_file()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [
        f"job-{job}.task-0.out",
        f"job-{job}.task-1.out",
    ]
    assert "world size 2" in (run_dir / "logs" / f"job-{job}.task-0.out").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_resumes_and_matches(finished_job, tmp_path):
    _, config, reference_dir = finished_job
    run_dir = tmp_path / "run"
    job = _submit(config, run_dir, *SETS)
    # Preempt once the first periodic checkpoint exists (the run is then mid-way).
    _wait(lambda: (run_dir / "checkpoints" / "latest").is_file(), "the first checkpoint", timeout=300)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    _wait(
        lambda: (
            _job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
            and _job(job).get("Restarts") == "1"
        ),
        f"job {job} to requeue and finish",
    )
    info = _job(job)
    log = (run_dir.parent / f"sbatch-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    stopped = re.search(r"training exited with 0 at checkpoint step (\d+) of 16", log)
    assert stopped and "requeueing job" in log and int(stopped.group(1)) < 16, log
    rank0 = (run_dir / "logs" / f"job-{job}.task-0.out").read_text()
    assert f"checkpointed step {stopped.group(1)}" in rank0
    assert re.search(rf"resum\w* .*step_0*{stopped.group(1)}\b", rank0, re.I), rank0[-2000:]
    # Same final metrics as the uninterrupted job, step for step.
    ours, ref = _metrics(run_dir), _metrics(reference_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, 17))
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
