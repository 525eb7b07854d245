"""SLURM across nodes, on the test cluster of three nodes on this machine
(`bash slurm/local_cluster.sh start --nodes 3`, as root: one slurmd per node, node1..node3 on
127.0.2.1-3). Each job has one task per node, so the ranks meet only through the rendezvous that
`slurm/train.sbatch` derives from the allocation (MASTER_ADDR = first node, port from job id and restart
count). Every run must end with the metrics of the 1-node x 2-task reference job (`one_node_job`):
the same world size sees the same samples and sums the same gradients."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from slurm_helpers import (
    ROOT,
    SETS,
    assert_same_metrics,
    check_resumed,
    hostnames,
    job,
    preempt_after_first_checkpoint,
    require_cluster,
    set_node_state,
    starts,
    submit,
    wait_done,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")


@pytest.fixture(scope="module")
def three_nodes():
    """Three nodes: two for a job, and a third for its requeue to move to."""
    require_cluster(3)


def _task_logs(run_dir, job_id):
    return sorted(p.name for p in (run_dir / "logs").iterdir() if p.name.startswith(f"job-{job_id}.task-"))


def test_two_node_job_from_cacheaug_slurm_matches_one_node(three_nodes, one_node_job, tmp_path):
    """`cacheaug slurm CONFIG --nodes 2` (the README's command): one rank per node, same metrics."""
    _, config, reference_dir = one_node_job
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_cacheaug.cli", "slurm", str(config), "--nodes", "2"]
    cmd += ["--cpus-per-task", "1", "--set", f"train.run_dir={run_dir}"]
    for s in SETS:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    info = wait_done(job_id)
    log = (run_dir / "logs" / f"cacheaug-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    [start] = starts(log)
    assert len(start["nodes"]) == 2 and start["master"] == start["nodes"][0], start
    assert info["NumNodes"] == "2" and info["NumTasks"] == "2"
    assert _task_logs(run_dir, job_id) == [f"job-{job_id}.task-0.out", f"job-{job_id}.task-1.out"]
    rank0 = (run_dir / "logs" / f"job-{job_id}.task-0.out").read_text()
    assert "world size 2" in rank0
    assert_same_metrics(run_dir, reference_dir, exact=True)


def test_preempted_two_node_job_requeues_and_resumes_on_the_same_nodes(three_nodes, one_node_job, tmp_path):
    """Pinned to two nodes (--nodelist), the requeued job comes back on them; the restart count
    moves the rendezvous port, so the old job's port cannot be in the way."""
    _, config, reference_dir = one_node_job
    run_dir = tmp_path / "run"
    job_id = submit(config, run_dir, *SETS, sbatch=(*TWO_NODES, "--nodelist=node[2-3]"))
    preempt_after_first_checkpoint(job_id, run_dir)
    info = wait_done(job_id, restarts=1)
    log = (run_dir.parent / f"sbatch-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    check_resumed(log, (run_dir / "logs" / f"job-{job_id}.task-0.out").read_text())
    first, second = starts(log)
    assert first["nodes"] == second["nodes"] == ["node2", "node3"]
    assert first["master"] == second["master"] == "node2" and first["port"] != second["port"]
    assert_same_metrics(run_dir, reference_dir)


def test_requeued_job_resumes_on_a_different_node_set(three_nodes, one_node_job, tmp_path):
    """The node that held rank 0 is drained (an admin takes it away) while the job runs; the job is
    preempted, and its second allocation must be another node set with another master."""
    _, config, reference_dir = one_node_job
    run_dir = tmp_path / "run"
    job_id = submit(config, run_dir, *SETS, sbatch=TWO_NODES)
    drained = []

    def drain_master():
        drained.append(hostnames(job(job_id)["NodeList"])[0])
        set_node_state(drained[0], "drain", reason="cacheaug-test-moves-a-job")

    try:
        preempt_after_first_checkpoint(job_id, run_dir, before_signal=drain_master)
        info = wait_done(job_id, restarts=1)
    finally:
        if drained:
            set_node_state(drained[0], "resume")
    log = (run_dir.parent / f"sbatch-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    check_resumed(log, (run_dir / "logs" / f"job-{job_id}.task-0.out").read_text())
    first, second = starts(log)
    assert first["master"] == drained[0] and drained[0] not in second["nodes"], (first, second)
    assert set(first["nodes"]) != set(second["nodes"]) and second["master"] != first["master"]
    assert len(second["nodes"]) == 2
    assert_same_metrics(run_dir, reference_dir)
