"""SLURM: the rendered job script (no cluster needed), then real jobs on the single-machine test cluster
(`bash slurm/local_cluster.sh start`, as root): a 1-node 2-task job completes with metrics and a
checkpoint; a preempted job checkpoints, requeues itself, resumes, and ends with the same metrics.
Several nodes: test_slurm_multinode.py."""

from __future__ import annotations

import json
import re
import sys

import pytest
from slurm_helpers import (
    ROOT,
    SBATCH,
    SETS,
    assert_same_metrics,
    check_resumed,
    job,
    metrics,
    preempt_after_first_checkpoint,
    starts,
    submit,
    wait_done,
)

from data_tools.faults import faults_env
from dist_cacheaug.cli import main as cli_main


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
# The reference job (1 node x 2 tasks, run to the end) is the `one_node_job` fixture in conftest.py.
@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_completes_with_metrics_and_checkpoint(one_node_job):
    job_id, _, run_dir = one_node_job
    info = job(job_id)
    log = (run_dir.parent / f"sbatch-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info.get("Restarts") == "0" and "requeueing" not in log
    [start] = starts(log)
    assert len(start["nodes"]) == 1 and start["master"] == start["nodes"][0]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000016"
    assert (run_dir / "export" / "cacheaug_config.json").is_file()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [
        f"job-{job_id}.task-0.out",
        f"job-{job_id}.task-1.out",
    ]
    assert "world size 2" in (run_dir / "logs" / f"job-{job_id}.task-0.out").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_resumes_and_matches(one_node_job, tmp_path):
    _, config, reference_dir = one_node_job
    run_dir = tmp_path / "run"
    job_id = submit(config, run_dir, *SETS, sbatch=("--nodes=1", "--ntasks-per-node=2"))
    preempt_after_first_checkpoint(job_id, run_dir)
    info = wait_done(job_id, restarts=1)
    log = (run_dir.parent / f"sbatch-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    check_resumed(log, (run_dir / "logs" / f"job-{job_id}.task-0.out").read_text())
    first, second = starts(log)
    assert first["port"] != second["port"]  # the restart count is part of the port
    assert_same_metrics(run_dir, reference_dir)


@pytest.mark.slurm
@pytest.mark.slow
def test_hung_job_dumps_exits_requeues_resumes_and_matches(one_node_job, tmp_path):
    """Rank 1 sleeps in the trace pass of step 6 (after the checkpoint of step 4): the watchdog ends both
    ranks with 75, the script requeues, the new job resumes from step 4 and ends like the reference."""
    _, config, reference_dir = one_node_job
    run_dir = tmp_path / "run"
    job_id = submit(
        config,
        run_dir,
        *SETS,
        "train.hang_timeout_s=8",
        sbatch=(
            "--nodes=1",
            "--ntasks-per-node=2",
        ),
        environ=faults_env(sleep={"rank": 1, "step": 6, "phase": "trace", "seconds": 900}),
    )
    info = wait_done(job_id, restarts=1)
    log = (run_dir.parent / f"sbatch-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert re.search(r"training exited with \d+ at checkpoint step 4 of 16", log), log
    assert "a rank hung (stacks: " in log and f"requeueing job {job_id} to resume from step 4" in log
    head = json.loads((run_dir / "hang" / "rank-1.txt").read_text().splitlines()[0])
    assert (head["step"], head["phase"]) == (6, "trace")
    rank0 = (run_dir / "logs" / f"job-{job_id}.task-0.out").read_text()
    assert "behind: rank(s) 1 (step 6, phase trace)" in rank0
    assert re.search(r"resum\w* .*step_0*4\b", rank0), rank0[-2000:]
    assert_same_metrics(run_dir, reference_dir)
