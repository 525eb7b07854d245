"""Which rank is slow, per log interval, against the median rank.

In synchronous data parallelism every rank's *step* time is the same: each waits for the slowest at
every collective. So each rank measures what it does alone:

* ``data_wait``: host seconds blocked on the training loader (a slow disk, network or data worker);
* ``compute``: seconds in the frozen decoder's two passes (``prefix`` and ``trace`` phases of
  ``core.phases``), which contain no collective unless ``zero.shard_decoder`` (then its layer gathers
  count too). On GPU these are device seconds from CUDA events (the host only queues kernels); on CPU,
  host seconds.

Once per log interval the per-rank means are summed into one small [world, 2] tensor on the training
device (one all-reduce), and the report gives the slowest rank against the median. A rank whose
``data_wait + compute`` is above :data:`SLOW_RATIO` x the median's, by at least :data:`MIN_COST` of the
step time (below that the whole job loses little, and tiny CPU runs would warn on noise), for
:data:`PERSISTENT` log intervals in a row gets a warning line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import distributed

SLOW_RATIO = 1.5
MIN_COST = 0.2  # of the step time: what the slow rank costs every rank, at least
PERSISTENT = 3  # consecutive log intervals
COMPUTE_PHASES = frozenset({"prefix", "trace"})


@dataclass
class PhaseClock:
    """This rank's seconds in the data phase and the compute phases, since the last :meth:`take`.
    Listens to ``core.phases`` (the trainer connects :meth:`enter`)."""

    device: torch.device
    data_wait: float = 0.0
    compute: float = 0.0
    steps: int = 0
    _open: tuple[str, float, object] | None = None  # (phase, host time, device event) being timed
    _events: list = field(default_factory=list)  # (start event, end event) of compute phases on GPU

    def _event(self):
        if self.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self._open is not None:
            name, since, event = self._open
            if name == "data":
                self.data_wait += now - since
            elif name in COMPUTE_PHASES:
                if event is None:
                    self.compute += now - since
                else:
                    self._events.append((event, self._event()))
        if phase == "data" or phase in COMPUTE_PHASES:
            self._open = (phase, now, self._event() if phase in COMPUTE_PHASES else None)
        else:
            self._open = None

    def step_done(self) -> None:
        """At the end of a step (after the step's device->host sync: its events have completed)."""
        self.enter("step end")
        for a, b in self._events:
            self.compute += a.elapsed_time(b) / 1000.0
        self._events.clear()
        self.steps += 1

    def take(self) -> tuple[float, float]:
        """Mean (data_wait, compute) seconds per step since the last take; resets."""
        n = max(1, self.steps)
        out = (self.data_wait / n, self.compute / n)
        self.data_wait = self.compute = 0.0
        self.steps = 0
        return out


@dataclass
class StragglerReport:
    """Gathers every rank's :class:`PhaseClock` means (a collective: every rank calls :meth:`metrics`
    at the same steps) and says who is slow."""

    rank: int
    world_size: int
    device: torch.device
    streak_rank: int | None = None
    streak: int = 0

    def metrics(self, clock: PhaseClock, step_time: float) -> tuple[dict, str | None]:
        """(metrics of this interval, a warning line or None); ``step_time``: the last step's seconds."""
        data_wait, compute = clock.take()
        if self.world_size == 1:
            return {"data_wait": data_wait, "compute_time": compute}, None
        table = torch.zeros(self.world_size, 2, dtype=torch.float64, device=self.device)
        table[self.rank, 0], table[self.rank, 1] = data_wait, compute
        rows = distributed.all_reduce_(table).cpu()
        own = rows.sum(1)
        median = float(own.median())
        slowest = int(own.argmax())
        ratio = float(own[slowest]) / median if median > 0 else 1.0
        values = {
            "data_wait": data_wait,  # this (the logging) rank's
            "compute_time": compute,
            "straggler_rank": slowest,
            "straggler_ratio": ratio,
            "straggler_data_wait_max": float(rows[:, 0].max()),
            "straggler_data_wait_median": float(rows[:, 0].median()),
            "straggler_compute_max": float(rows[:, 1].max()),
            "straggler_compute_median": float(rows[:, 1].median()),
        }
        costly = float(own[slowest]) - median >= MIN_COST * step_time
        return values, self._warning(slowest, ratio if costly else 1.0, rows)

    def _warning(self, slowest: int, ratio: float, rows: torch.Tensor) -> str | None:
        if ratio <= SLOW_RATIO:
            self.streak_rank, self.streak = None, 0
            return None
        self.streak = self.streak + 1 if slowest == self.streak_rank else 1
        self.streak_rank = slowest
        if self.streak % PERSISTENT:
            return None
        data_wait, compute = float(rows[slowest, 0]), float(rows[slowest, 1])
        return (
            f"straggler: rank {slowest} has been {ratio:.1f}x the median rank for {self.streak} log intervals "
            f"(data wait {data_wait:.3f} s, compute {compute:.3f} s per step; median data wait "
            f"{float(rows[:, 0].median()):.3f} s, compute {float(rows[:, 1].median()):.3f} s): every rank runs "
            "at its pace. Look at that rank's node (GPU clocks, data source, other jobs)"
        )
