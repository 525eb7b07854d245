"""slurm/make_shards.sbatch: each array task makes its part and the last one merges (run as SLURM would
run it, with the array variables set, no cluster needed); the time-limit signal requeues the task; and
a real array job on the test cluster (marked slurm)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools import make_shards

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "make_shards.sbatch"
ARGS = ["--seq-len", "32", "--shard-samples", "4", "--val-fraction", "0.1"]


@pytest.fixture(scope="module")
def single(jsonl_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    make_shards(jsonl_corpus.tok, [jsonl_corpus.dir], str(d), seq_len=32, shard_samples=4, val_fraction=0.1,
                per_file=True, workers=1, progress=False)  # fmt: skip
    return d


def _env(**slurm) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CACHEAUG_PYTHON=sys.executable, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return {**env, **{f"SLURM_{k}": str(v) for k, v in slurm.items()}}


def test_directives_are_overridable_defaults():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert {"--requeue", "--signal=B:USR1@120", "--open-mode=append", "--ntasks=1"} <= set(directives)
    assert not any(
        d.startswith("--array") for d in directives
    )  # the array size is the user's: sbatch --array
    assert "scontrol requeue" in text and not re.search(r"^\s*(ssh|pdsh)\b", text, re.M)


def test_array_tasks_make_their_parts_and_the_last_merges(jsonl_corpus, single, read_dataset, tmp_path):
    cmd = [
        "bash",
        str(SBATCH),
        "--tokenizer",
        jsonl_corpus.tok,
        "--input",
        jsonl_corpus.dir,
        "--out",
        str(tmp_path),
        *ARGS,
    ]
    for task in (1, 0):  # any order, as the scheduler pleases
        env = _env(ARRAY_JOB_ID=77, ARRAY_TASK_ID=task, ARRAY_TASK_COUNT=2, CPUS_PER_TASK=2)
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"part {task} of 2" in r.stdout and f"array task 77_{task} exited with 0" in r.stdout
    assert "wrote" in r.stdout and read_dataset(tmp_path) == read_dataset(single)
    # a single task re-run (sbatch --array=1 ... --num-parts 2) finds its part done and leaves the data as is
    env = _env(ARRAY_JOB_ID=78, ARRAY_TASK_ID=1, ARRAY_TASK_COUNT=1, CPUS_PER_TASK=1)
    r = subprocess.run([*cmd, "--num-parts", "2"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and read_dataset(tmp_path) == read_dataset(single), r.stderr


def test_usage_without_an_array_task():
    r = subprocess.run(["bash", str(SBATCH), "--out", "x"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "sbatch --array" in r.stderr


def test_time_limit_signal_requeues_the_task(tmp_path):
    """SIGUSR1 (sent 120 s before the limit) makes the script requeue its own array task."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol.args\n')
    (fake / "python").write_text(
        f"#!/bin/bash\ntouch {tmp_path}/started\nexec sleep 30\n"
    )  # a long make-shards
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {
        **_env(ARRAY_JOB_ID=5, ARRAY_TASK_ID=3, ARRAY_TASK_COUNT=4),
        "CACHEAUG_PYTHON": str(fake / "python"),
    }
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    p = subprocess.Popen(
        ["bash", str(SBATCH), "--out", "x"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 30
        while not (tmp_path / "started").exists():
            assert time.time() < deadline and p.poll() is None
            time.sleep(0.1)
        p.send_signal(signal.SIGUSR1)
        deadline = time.time() + 30
        while not (tmp_path / "scontrol.args").exists():
            assert time.time() < deadline
            time.sleep(0.1)
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "5_3"]
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


# ------------------------------------------------------------------------------------ a real cluster
def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(re.search(r"idle|mixed|alloc", out.stdout))


@pytest.mark.slurm
@pytest.mark.slow
def test_array_job_on_the_cluster(jsonl_corpus, single, read_dataset, tmp_path):
    if not _cluster_up():
        msg = "no running SLURM cluster: start one with `sudo bash slurm/local_cluster.sh start`"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run the SLURM tests)")
        pytest.skip(msg)
    out = tmp_path / "shards"
    cmd = ["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/task-%a.out", str(SBATCH),
           "--tokenizer", jsonl_corpus.tok, "--input", jsonl_corpus.dir, "--out", str(out), *ARGS]  # fmt: skip
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("task-*.out")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert read_dataset(out) == read_dataset(single), logs
