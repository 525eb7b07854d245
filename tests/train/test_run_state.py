"""The run state as components: one mapping saves and restores it; format-1 checkpoints still load; other
versions are refused with one line naming the version."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dist_cacheaug.train import checkpoint
from dist_cacheaug.train.run_state import GeneratorState, ProcessRngs, load_state_dicts, state_dicts
from dist_cacheaug.train.trainer import TrainState


def test_components_restore_every_generator_and_counter():
    gen = torch.Generator().manual_seed(5)
    train = TrainState(step=7, nonfinite_total=2, nonfinite_run=1)
    comps = {"train": train, "positions": GeneratorState(gen), "rngs": ProcessRngs()}
    saved = state_dicts(comps)
    draws = (torch.rand(3, generator=gen), torch.rand(3), random.random(), np.random.rand())
    train.step = 99
    load_state_dicts(comps, saved, "ckpt")
    again = (torch.rand(3, generator=gen), torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and torch.equal(draws[1], again[1]) and draws[2:] == again[2:]
    assert train == TrainState(step=7, nonfinite_total=2, nonfinite_run=1)
    with pytest.raises(KeyError, match="ckpt has no state for positions"):
        load_state_dicts(comps, {"train": saved["train"], "rngs": saved["rngs"]}, "ckpt")


def _v1_state() -> dict:
    """train_state.pt as format 1 wrote it (flat dicts)."""
    rank = {
        "loader": {"epoch": 0},
        "positions_rng": torch.Generator().manual_seed(1).get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": None,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "decoder_digest": "abc",
    }
    return {
        "step": 4,
        "scheduler": {"last_epoch": 4},
        "nonfinite_total": 1,
        "nonfinite_run": 0,
        "fingerprint": {"trainable": {}},
        "config": {},
        "format_version": 1,
        "ranks": [rank],
    }


def _write(tmp_path, state: dict):
    ckpt = tmp_path / "step_000004"
    ckpt.mkdir()
    torch.save(state, ckpt / checkpoint.STATE)
    files = {checkpoint.STATE: (ckpt / checkpoint.STATE).stat().st_size}
    meta = {"step": 4, "world_size": 1, "fingerprint": {"trainable": {}}, "files": files}
    (ckpt / checkpoint.META).write_text(json.dumps(meta))
    return ckpt


def test_a_format_1_checkpoint_loads_into_the_components(tmp_path):
    loaded = checkpoint.read(_write(tmp_path, _v1_state()), {"trainable": {}}, world_size=1)
    s = loaded.state
    assert s["format_version"] == checkpoint.FORMAT_VERSION
    assert s["train"] == {"step": 4, "nonfinite_total": 1, "nonfinite_run": 0}
    assert s["scheduler"] == {"last_epoch": 4} and s["ranks"][0]["decoder_digest"] == "abc"
    train, gen = TrainState(), torch.Generator()
    load_state_dicts(
        {"train": train, "positions": GeneratorState(gen), "rngs": ProcessRngs()}, s["ranks"][0] | s, "x"
    )
    assert train.step == 4 and torch.equal(gen.get_state(), torch.Generator().manual_seed(1).get_state())


def test_another_format_version_is_refused_naming_it(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read(
            _write(tmp_path, {**_v1_state(), "format_version": 9}), {"trainable": {}}, world_size=1
        )
    assert "has format version 9; this version of dist_cacheaug reads versions 1, 2" in str(e.value)
    assert "\n" not in str(e.value)
