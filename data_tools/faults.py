"""Fault injection for tests: one debug switch, the ``CACHEAUG_FAULTS`` environment variable.

Production loops read nothing else for testing. The switch is a JSON object; each key is a fault that the
loop which owns it applies (read once at start, on every rank, so that launchers and SLURM pass it on
like any variable):

- ``"nan_steps": [3, 4]``: rank 0's training loss is NaN at these 1-based steps (``train/trainer.py``);
- ``"data_trace": true``: every rank appends a hash of each training sample it consumes to
  ``RUN_DIR/data_trace/rank<r>.jsonl`` (the data-order tests compare them);
- ``"sleep": {"rank": 1, "step": 3, "phase": "trace", "seconds": 600}``: that rank sleeps on entering
  that phase (a ``train/watchdog.py`` phase name, or ``"worker"``: inside a data worker) of that step,
  once per run directory; ``"step": "all"``: at every step (a straggler);
- ``"make_kill_at": "shard:2"``: make-shards SIGKILLs itself at the 2nd ``shard`` event
  (``data_tools/make.py``'s event names).

It lives in ``data_tools`` because both packages read it and ``data_tools`` depends on nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from .errors import UserError

ENV = "CACHEAUG_FAULTS"
KEYS = ("nan_steps", "data_trace", "sleep", "make_kill_at")


class FaultSpecError(UserError, ValueError):
    """``CACHEAUG_FAULTS`` is not a JSON object of known faults."""


def read_faults(environ: Mapping[str, str] = os.environ) -> dict:
    """The faults the switch asks for ({} when it is unset or empty)."""
    text = environ.get(ENV, "").strip()
    if not text:
        return {}
    try:
        faults = json.loads(text)
    except json.JSONDecodeError as e:
        raise FaultSpecError(f"{ENV} is not JSON ({e}): unset it, or see data_tools/faults.py") from None
    if not isinstance(faults, dict):
        raise FaultSpecError(f"{ENV} must be a JSON object, got {text[:80]!r}")
    _check_keys(faults, f"{ENV}: ")
    return faults


def faults_env(**faults) -> dict[str, str]:
    """The environment entry that asks for ``faults`` (for tests and scripts that launch a run)."""
    _check_keys(faults, "")
    return {ENV: json.dumps(faults)}


def _check_keys(faults: dict, where: str) -> None:
    unknown = sorted(set(faults) - set(KEYS))
    if unknown:
        raise FaultSpecError(f"{where}unknown fault(s) {unknown}; known: {list(KEYS)}")
