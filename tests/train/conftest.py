import pytest
from slurm_helpers import SETS, require_cluster, submit, wait_done
from train_helpers import tiny_run_config


@pytest.fixture(scope="session")
def one_node_job(shards, tmp_path_factory):
    """A 1-node x 2-task SLURM job of 16 steps, run to the end: the reference every other SLURM test
    (one node or several, preempted or not) compares its metrics with. (job id, config, run dir)"""
    require_cluster(1)
    tmp = tmp_path_factory.mktemp("slurm_one_node")
    config = tiny_run_config(tmp, shards)
    run_dir = tmp / "run"
    job_id = submit(config, run_dir, *SETS, sbatch=("--nodes=1", "--ntasks-per-node=2"))
    wait_done(job_id)
    return job_id, config, run_dir
