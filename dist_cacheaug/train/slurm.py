"""``cacheaug slurm``: render an sbatch job for a run (resolved config saved beside it) and submit it.

The job script only sets ``#SBATCH`` directives and hands over to ``slurm/train.sbatch``, which owns
the launch (srun, rendezvous, preemption signal, requeue). Nothing here is imported by training.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config
from ..resources import repo_file


@dataclass
class JobSpec:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None  # default: the config's loader workers + 2 (the rank, its threads)
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "cacheaug"
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: checkpoint, then requeue
    extra: tuple[str, ...] = ()  # more #SBATCH lines, e.g. ("--exclusive", "--qos=high")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def render(cfg: RunConfig, spec: JobSpec, config_path: Path, workdir: Path, python: str) -> str:
    """The job script text. ``config_path`` is the resolved config the job trains with."""
    if spec.nodes < 1 or spec.ntasks_per_node < 1 or spec.gpus_per_node < 0:
        raise ConfigError("--nodes and tasks per node must be >= 1, --gpus-per-node >= 0")
    accum = cfg.grad_accum_steps(spec.world_size)  # checks divisibility for this world size
    log_dir = Path(cfg.train.run_dir).resolve() / "logs"
    directives = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.ntasks_per_node}",
    ]
    if spec.gpus_per_node:
        directives.append(f"--gpus-per-node={spec.gpus_per_node}")
    cpus = spec.cpus_per_task or cfg.data.num_workers + 2
    directives.append(f"--cpus-per-task={cpus}")
    directives += [
        f"--time={spec.time}",
        f"--signal=B:USR1@{spec.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={log_dir}/%x-%j.out",
    ]
    if spec.partition:
        directives.append(f"--partition={spec.partition}")
    if spec.account:
        directives.append(f"--account={spec.account}")
    directives += list(spec.extra)
    lines = [
        "#!/bin/bash",
        f"# Rendered by `cacheaug slurm` for run {cfg.train.run_dir}: world size {spec.world_size} "
        f"({spec.nodes} node(s) × {spec.ntasks_per_node} task(s)), micro batch {cfg.train.micro_batch_size}, "
        f"gradient accumulation {accum}, global batch {cfg.train.global_batch_size}.",
        *[f"#SBATCH {d}" for d in directives],
        f"cd {shlex.quote(str(workdir))}",
        f"export CACHEAUG_PYTHON={shlex.quote(python)}",
        f"exec bash {shlex.quote(str(repo_file('slurm/train.sbatch')))} {shlex.quote(str(config_path))}",
        "",
    ]
    return "\n".join(lines)


def submit(config: str, overrides: list[str], spec: JobSpec, *, dry_run: bool = False) -> str:
    """Write RUN_DIR/slurm/{config.yaml,job.sbatch} and ``sbatch`` it; with ``dry_run`` write nothing
    and return the script. Returns sbatch's output (the job id line) otherwise."""
    cfg = load_config(config, overrides)
    run_dir = Path(cfg.train.run_dir).resolve()
    job_dir = run_dir / "slurm"
    config_path = job_dir / "config.yaml"
    script = render(cfg, spec, config_path, Path.cwd(), sys.executable)
    if dry_run:
        return script
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(cfg.to_yaml())
    script_path = job_dir / "job.sbatch"
    script_path.write_text(script)
    try:
        out = subprocess.run(["sbatch", str(script_path)], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError("sbatch not found: run this on a SLURM login node (or use --dry-run)") from e
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {script_path} failed: {out.stderr.strip()}")
    return out.stdout.strip()
