"""Shared by the SLURM tests: submit `slurm/train.sbatch` to the local test cluster
(`bash slurm/local_cluster.sh start [--nodes 3]`, as root), follow the job, read what it left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "train.sbatch"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# 16 steps, a checkpoint every 4: a preemption after the first checkpoint lands mid-run.
SETS = ("train.max_steps=16", "train.checkpoint_interval=4", "train.log_interval=1")


def responding_nodes() -> list[str]:
    """Names of the cluster's nodes that can run jobs now ([] without a cluster)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    rows = (line.split() for line in out.stdout.splitlines())
    return sorted(
        {r[0] for r in rows if len(r) == 2 and r[1] in ("idle", "mixed", "allocated", "completing")}
    )


def require_cluster(nodes: int) -> None:
    """Skip (fail under CI, which must run the SLURM tests) unless `nodes` nodes can take jobs."""
    have = responding_nodes()
    if len(have) >= nodes:
        return
    how = "sudo bash slurm/local_cluster.sh start" + (f" --nodes {max(nodes, 3)}" if nodes > 1 else "")
    msg = f"needs a SLURM cluster with {nodes} node(s) up, found {len(have)}: start one with `{how}`"
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI must run the SLURM tests)")
    pytest.skip(msg)


def submit(
    config: Path,
    run_dir: Path,
    *sets: str,
    sbatch: tuple[str, ...] = ("--ntasks-per-node=2",),
    environ: dict[str, str] | None = None,
) -> str:
    """`sbatch [sbatch...] slurm/train.sbatch CONFIG --set ...`; returns the job id. The job script's
    log is RUN_DIR/../sbatch-JOB.out. One CPU per task: every test node has only this machine's CPUs.
    ``environ``: more variables for the job (sbatch passes the submitter's environment on)."""
    env = dict(os.environ, CACHEAUG_PYTHON=sys.executable, PYTHONUNBUFFERED="1", **(environ or {}))
    cmd = [
        "sbatch",
        "--parsable",
        *sbatch,
        "--cpus-per-task=1",
        f"--output={run_dir.parent}/sbatch-%j.out",
        str(SBATCH),
        str(config),
        "--set",
        f"train.run_dir={run_dir}",
        *[a for s in sets for a in ("--set", s)],
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return out.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def wait(pred, what: str, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_done(job_id: str, restarts: int = 0) -> dict:
    """Wait until the job has ended after `restarts` requeues; its final `scontrol show job` record."""

    def done() -> bool:
        info = job(job_id)
        return info.get("JobState") in DONE and info.get("Restarts") == str(restarts)

    wait(done, f"job {job_id} to finish after {restarts} requeue(s)")
    return job(job_id)


def preempt_after_first_checkpoint(job_id: str, run_dir: Path, before_signal=None) -> None:
    """What a preempting scheduler does, once the run is mid-way: SIGUSR1 to the batch script."""
    wait(lambda: (run_dir / "checkpoints" / "latest").is_file(), "the first checkpoint", timeout=300)
    if before_signal is not None:
        before_signal()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)


def hostnames(nodelist: str) -> list[str]:
    """node[1-2] -> [node1, node2], by SLURM itself."""
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def set_node_state(node: str, state: str, reason: str = "") -> None:
    """`scontrol update` of one node (drain needs a reason; resume gives the node back)."""
    cmd = ["scontrol", "update", f"nodename={node}", f"state={state}"]
    subprocess.run(cmd + ([f"reason={reason}"] if reason else []), check=True)


def starts(log: str) -> list[dict]:
    """One entry per (re)start of the job script, from its '[sbatch] job J restart R: ...' lines:
    the restart count, the allocation's node names and the rendezvous address and port."""
    found = []
    for m in re.finditer(
        r"^\[sbatch\] job \d+ restart (\d+): (\d+) node\(s\) (\S+), \d+ task\(s\), master (\S+):(\d+),",
        log,
        re.M,
    ):
        hosts = hostnames(m.group(3))
        assert len(hosts) == int(m.group(2)), m.group(0)
        found.append(dict(restart=int(m.group(1)), nodes=hosts, master=m.group(4), port=int(m.group(5))))
    return found


def check_resumed(log: str, rank0: str, max_steps: int = 16) -> int:
    """The job stopped at a checkpoint before the end, requeued, and rank 0 resumed from it: that step."""
    stopped = re.search(rf"training exited with 0 at checkpoint step (\d+) of {max_steps}", log)
    assert stopped and "requeueing job" in log and int(stopped.group(1)) < max_steps, log
    assert f"checkpointed step {stopped.group(1)}" in rank0
    assert re.search(rf"resum\w* .*step_0*{stopped.group(1)}\b", rank0, re.I), rank0[-2000:]
    return int(stopped.group(1))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(run_dir: Path, reference_dir: Path, max_steps: int = 16, exact: bool = False) -> None:
    """Step for step the same metrics as the reference run. `exact`: bit for bit (two ranks from scratch:
    a sum of two floats does not depend on the order, so only a change of samples or arithmetic can
    differ); else the loss to rel 1e-5 and the lr to 1e-9 (a resumed run reloads its state)."""
    ours, ref = metrics(run_dir), metrics(reference_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, max_steps + 1))
    for a, b in zip(ours, ref):
        if exact:
            keys = [k for k in b if k == "lr" or k == "grad_norm" or k.startswith("loss")]
            assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]
        else:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
