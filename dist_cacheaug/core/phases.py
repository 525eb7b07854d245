"""Named phases of a training step, announced to whoever listens.

The model code says where it is (``enter("prefix")`` before the frozen decoder's pass over the
sequence, ``"coprocessor"``, ``"trace"``); the training loop adds its own (data, backward, optimizer,
checkpoint, ...). The hang watchdog (``train/watchdog.py``) listens, so that a rank stuck for minutes
can say which part of the step it was in. Nothing here knows who listens: with no listener an
announcement is one empty loop.
"""

from __future__ import annotations

from collections.abc import Callable

_listeners: list[Callable[[str], None]] = []


def enter(name: str) -> None:
    """Announce that this process now runs phase ``name``."""
    for listener in _listeners:
        listener(name)


def listen(listener: Callable[[str], None]) -> Callable[[], None]:
    """Call ``listener(name)`` at every announcement from now on; returns the function that stops it."""
    _listeners.append(listener)

    def stop() -> None:
        if listener in _listeners:
            _listeners.remove(listener)

    return stop
