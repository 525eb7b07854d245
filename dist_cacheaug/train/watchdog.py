"""A rank that stops making progress writes its stacks and exits, so the job fails and requeues instead of
waiting, every rank with it, for SLURM's time limit.

Every rank runs one :class:`Watchdog` thread. The loop tells it when a step completes
(:meth:`Watchdog.step_done`) and which phase the rank enters (``core.phases``: ``data``, ``prefix``,
``coprocessor``, ``trace``, ``backward``, ``optimizer``, ``sync``; and the slow ones, ``validation``,
``checkpoint``, ``export``). When the limit passes without progress, the thread:

1. writes ``RUN_DIR/hang/rank-N.txt``: one header line (JSON: rank, host, pid, step, phase, seconds in it)
   then every thread's Python stack (``faulthandler``), the stacks of the rank's data workers (each
   registered a ``faulthandler`` dump on SIGUSR2 when it started) and, where ``py-spy`` is installed,
   its dump with native frames;
2. waits a little for the other ranks' reports (their watchdogs fire at about the same time: every
   rank waits for the stuck one) and names the ranks *behind*: the earliest (step, phase) among the
   reports, or the ranks that wrote none (dead, or stuck holding the GIL);
3. prints one line, kills its data workers and ends the process with :data:`EXIT_HUNG` (``os._exit``:
   the main thread is stuck in a collective or a queue and cannot unwind). The launcher then stops the other ranks and
   ``slurm/train.sbatch`` requeues the job, which resumes from the newest checkpoint.

Limits: ``train.hang_timeout_s`` seconds after the last completed step; ``null`` sizes it from this
process's first steps (:data:`AUTO_FACTOR` x the median step time, at least :data:`AUTO_MIN_S`); 0 turns
the watchdog off. Phases that are not a training step (start-up until the first step completes, which
on GPU includes compiling; validation, checkpoint, export) get ``train.hang_slow_phase_s`` instead.

A collective that times out (``train.collective_timeout_s``, given to the process group) ends the same
way, through :meth:`Watchdog.collective_failed`.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ..core import phases

EXIT_HUNG = 75  # EX_TEMPFAIL: "try again"; slurm/train.sbatch requeues on it
AUTO_FACTOR = 10.0  # automatic limit: this many median steps ...
AUTO_MIN_S = 300.0  # ... but never less (a checkpoint-free stall of 5 minutes is a hang at any scale)
CALIBRATION_STEPS = 10  # steps (after the first, which compiles) that size the automatic limit
SLOW_PHASES = frozenset({"start", "validation", "checkpoint", "export"})
#: A step's phases in the order a rank goes through them: the rank furthest behind is the stuck one.
PHASE_ORDER = ("start", "data", "prefix", "coprocessor", "trace", "backward", "optimizer", "sync", "log")
PEER_WAIT_S = 20.0  # at most this long for the other ranks' reports
LINGER_S = 2.0  # after the line: time for the other ranks to print theirs before the launcher kills them
WORKER_SIGNAL = signal.SIGUSR2  # asks a data worker for its stacks


class WorkerStacks:
    """``worker_init_fn`` of the training DataLoader: each worker dumps its stacks to a file of
    ``directory`` on :data:`WORKER_SIGNAL` (picklable: it travels to the worker)."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, worker_id: int) -> None:
        f = open(os.path.join(self.directory, f"worker-{os.getpid()}.txt"), "w")  # noqa: SIM115 - kept open
        faulthandler.register(WORKER_SIGNAL, file=f, all_threads=True)


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out or lost a peer (gloo raises plain RuntimeErrors)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Timed out waiting", "Connection closed by peer", "NCCL", "timed out")
    )


class Watchdog:
    """One rank's hang watchdog (see the module docstring). ``start()`` it once the loop begins."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        *,
        timeout_s: float | None,
        slow_phase_s: float,
        step: int = 0,
        clock: Callable[[], float] = time.monotonic,
        end: Callable[[int], None] = os._exit,
    ):
        self.dir = Path(run_dir) / "hang"
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.slow_phase_s = timeout_s, slow_phase_s
        self.clock, self.end = clock, end
        self.step = step  # the last completed step
        self.phase, self.phase_since = "start", clock()
        self.mark = self.phase_since  # the last progress: a completed step, or entering/leaving a slow phase
        self.step_times: list[float] = []
        self.worker_dir = tempfile.mkdtemp(prefix=f"cacheaug-stacks-rank{rank}-")
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._unlisten: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s is None or self.timeout_s > 0

    def worker_init(self) -> WorkerStacks:
        return WorkerStacks(self.worker_dir)

    # ---- what the loop tells it ----------------------------------------------------------------
    def start(self) -> Watchdog:
        self._unlisten = phases.listen(self.enter)
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="cacheaug-watchdog", daemon=True)
            self._thread.start()
        return self

    def enter(self, phase: str) -> None:
        now = self.clock()
        if (phase in SLOW_PHASES) != (self.phase in SLOW_PHASES):
            self.mark = now
        self.phase, self.phase_since = phase, now

    def step_done(self, step: int, seconds: float) -> None:
        self.step, self.mark = step, self.clock()
        if len(self.step_times) <= CALIBRATION_STEPS:
            self.step_times.append(seconds)

    def limit(self) -> float:
        """Seconds without progress allowed now."""
        if self.phase in SLOW_PHASES or not self.step_times:
            return self.slow_phase_s
        if self.timeout_s is not None:
            return self.timeout_s
        if len(self.step_times) <= CALIBRATION_STEPS:
            return self.slow_phase_s
        return max(AUTO_MIN_S, AUTO_FACTOR * statistics.median(self.step_times[1:]))

    def close(self) -> None:
        self._stop.set()
        if self._unlisten is not None:
            self._unlisten()
        if self._thread is not None:
            self._thread.join(timeout=5)
        shutil.rmtree(self.worker_dir, ignore_errors=True)

    # ---- firing ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.1, self.limit() / 20))):
            quiet = self.clock() - self.mark
            if quiet > self.limit():
                self.fire(f"no progress for {quiet:.0f} s (limit {self.limit():.0f} s)")
                return

    def collective_failed(self, error: BaseException) -> None:
        """The main thread's collective raised (timeout, lost peer): the same report, line and exit.
        If this rank's watchdog already fired, wait for it to end the process instead."""
        if self.fired.is_set():
            time.sleep(PEER_WAIT_S + LINGER_S + 5)
        self.fire(f"a collective failed: {str(error).splitlines()[0][:200]}")

    def fire(self, reason: str) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        fired_at = time.time()
        try:
            self.write_report(reason)
            behind = self.ranks_behind(self.wait_for_peers(fired_at))
        except Exception as e:  # the exit below matters more than the report
            behind = f"(report failed: {e})"
        line = (
            f"[cacheaug] hang: rank {self.rank} on {socket.gethostname()}: {reason} in step {self.step + 1}, "
            f"phase {self.phase}; {behind}; stacks: {self.dir}/rank-*.txt; exiting with {EXIT_HUNG} so the "
            "job stops and requeues from the newest checkpoint"
        )
        sys.stderr.write(line + "\n")  # one write: ranks sharing a terminal do not interleave
        sys.stderr.flush()
        time.sleep(LINGER_S)
        for child in multiprocessing.active_children():  # a stuck data worker outlives os._exit otherwise
            child.kill()
        self.end(EXIT_HUNG)

    def header(self, reason: str) -> dict:
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self.step + 1,
            "phase": self.phase,
            "phase_seconds": round(self.clock() - self.phase_since, 1),
            "reason": reason,
            "time": time.time(),
        }

    def write_report(self, reason: str) -> Path:
        """``hang/rank-N.txt``: the header, this process's threads, its data workers, py-spy's view."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank-{self.rank}.txt"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(self.header(reason)) + "\n\n")
            f.write(f"# Python stacks of rank {self.rank} (pid {os.getpid()}), most recent call first\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
            f.write(self.worker_stacks())
            f.write(py_spy_dump(os.getpid()))
        os.replace(tmp, path)  # a peer never reads half a report
        return path

    def worker_stacks(self) -> str:
        workers = multiprocessing.active_children()
        for w in workers:
            try:
                os.kill(w.pid, WORKER_SIGNAL)
            except OSError:
                pass
        time.sleep(1.0 if workers else 0)  # faulthandler writes from a signal handler: promptly
        parts = []
        for w in workers:
            f = Path(self.worker_dir) / f"worker-{w.pid}.txt"
            text = f.read_text() if f.is_file() else "(no stack: not a data worker, or it did not answer)\n"
            parts.append(f"\n# data worker pid {w.pid} ({w.name})\n{text}")
        return "".join(parts)

    def wait_for_peers(self, fired_at: float) -> dict[int, dict]:
        """Headers of this incident's reports (written since ``fired_at`` minus the limit), once all ranks
        have written one or :data:`PEER_WAIT_S` has passed."""
        oldest = fired_at - self.limit() - PEER_WAIT_S
        deadline = time.monotonic() + PEER_WAIT_S
        while True:
            found = {}
            for r in range(self.world_size):
                head = read_header(self.dir / f"rank-{r}.txt")
                if head is not None and head.get("time", 0) >= oldest:
                    found[r] = head
            if len(found) == self.world_size or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def ranks_behind(self, reports: dict[int, dict]) -> str:
        """Who the others wait for, in words."""
        if self.world_size == 1:
            return "the only rank: its stack says where"
        missing = [r for r in range(self.world_size) if r not in reports]
        if missing:
            return (
                f"no report from rank(s) {_ranks(missing)} within {PEER_WAIT_S:.0f} s: dead, or stuck "
                "where Python cannot run (look at their logs)"
            )

        def progress(h: dict) -> tuple[int, int]:
            phase = h["phase"]
            return h["step"], PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER)

        earliest = min(progress(h) for h in reports.values())
        late = sorted(r for r, h in reports.items() if progress(h) == earliest)
        if len(late) == len(reports):
            return f"every rank is in step {earliest[0]}, phase {reports[0]['phase']}: a collective that never completed"
        step, phase = reports[late[0]]["step"], reports[late[0]]["phase"]
        return f"behind: rank(s) {_ranks(late)} (step {step}, phase {phase}); the others wait for them"


def read_header(path: Path) -> dict | None:
    try:
        with path.open() as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def py_spy_dump(pid: int) -> str:
    """``py-spy dump`` of ``pid`` and its children, with native frames, where py-spy is installed."""
    exe = shutil.which("py-spy")
    if exe is None:
        return ""
    try:
        out = subprocess.run(
            [exe, "dump", "--pid", str(pid), "--subprocesses", "--native"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return f"\n# py-spy dump --native (exit {out.returncode})\n{out.stdout}{out.stderr}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"\n# py-spy dump failed: {e}\n"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
