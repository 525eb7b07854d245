"""A run's resumable state as components with ``state_dict()`` / ``load_state_dict()`` (the protocol of
``torch.distributed.checkpoint.stateful.Stateful``).

A checkpoint saves ``{name: component.state_dict()}`` and an exact resume loads each entry back into the
component of that name, so a new piece of state is one new entry in ``trainer.py``'s
``shared_state`` or ``rank_state``, never three hand-written dicts that must mirror each other
(``trainer.TrainState`` is one such component). Shared components are the same on every rank and saved once; rank components are saved per rank.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GeneratorState:
    """A ``torch.Generator`` (the augmentation positions' draws) as a component."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


class ProcessRngs:
    """This process's global generators: torch (CPU and CUDA), Python's ``random``, NumPy's."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])


def state_dicts(components: dict[str, Stateful]) -> dict[str, Any]:
    return {name: c.state_dict() for name, c in components.items()}


def load_state_dicts(components: dict[str, Stateful], saved: dict[str, Any], where: str) -> None:
    """Every component's entry back into it; a component the checkpoint lacks is an error naming both."""
    missing = [name for name in components if name not in saved]
    if missing:
        raise KeyError(f"{where} has no state for {', '.join(missing)}")
    for name, c in components.items():
        c.load_state_dict(saved[name])
