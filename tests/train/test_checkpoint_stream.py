"""Checkpoint writes at scale: the consolidated fp32 file is streamed (byte-identical to save_file of the
whole dict), and a save that runs out of disk leaves the previous checkpoint as it was."""

from __future__ import annotations

import errno
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_cacheaug.train import checkpoint, tensor_stream


class FakeEngine:
    """The engine's checkpoint surface (``save``, ``fp32_specs``, ``fp32_to_main``) on one process."""

    def __init__(self, weights: dict[str, torch.Tensor], ds_bytes: int = 1000):
        self.weights, self.ds_bytes, self.fetched = weights, ds_bytes, []

    def save(self, directory: str) -> None:
        d = Path(directory) / "deepspeed"
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * self.ds_bytes)

    def fp32_specs(self):
        return {n: (torch.float32, tuple(t.shape)) for n, t in self.weights.items()}

    def fp32_to_main(self, names):
        for n in names:
            self.fetched.append(n)
            yield n, self.weights[n].float()


def _weights(scale: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(scale)
    return {
        "coprocessor.layers.1.w": torch.randn(8 * scale, 16, generator=g),
        "coprocessor.layers.0.w": torch.randn(8 * scale, 16, generator=g),
        "soft_tokens": torch.randn(4, 16, generator=g),
    }


def _state() -> tuple[dict, dict]:
    return {"rng": torch.get_rng_state()}, {"step": 1, "fingerprint": {"trainable": {}}, "scheduler": {}}


def test_consolidated_weights_are_streamed_and_equal_save_file_of_the_whole_dict(tmp_path):
    w = _weights()
    engine = FakeEngine(w)
    local, glob = _state()
    path = checkpoint.save(tmp_path, 1, engine, local, glob, keep=2, is_main=True)
    save_file(w, str(tmp_path / "ref.safetensors"))
    assert (path / checkpoint.WEIGHTS).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert engine.fetched == tensor_stream.tensor_order(engine.fp32_specs())  # one at a time, file order
    assert checkpoint.saved_bytes(path) == sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "meta.json"
    )
    model = torch.nn.Module()
    model.register_parameter("soft_tokens", torch.nn.Parameter(torch.zeros(4, 16)))
    checkpoint.copy_weights_into(model, path / checkpoint.WEIGHTS)  # the elastic read, tensor by tensor
    assert torch.equal(model.soft_tokens, w["soft_tokens"])


def test_a_non_main_rank_walks_every_parameter_but_writes_nothing(tmp_path):
    engine = FakeEngine(_weights())
    assert checkpoint.write_consolidated(engine, tmp_path / "w.safetensors", is_main=False) is None
    assert len(engine.fetched) == 3 and not (tmp_path / "w.safetensors").exists()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 256 KiB tmpfs when this process may mount one (root, as in CI); else a directory whose
    consolidated-weights writes fail with ENOSPC past 256 KiB (the same failure, simulated)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        real_write = tensor_stream.SafetensorsWriter.write

        def write(self, name, tensor):
            if self.bytes > 256 * 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(self, name, tensor)

        monkeypatch.setattr(tensor_stream.SafetensorsWriter, "write", write)
    yield mnt
    if mounted.returncode == 0:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_intact(small_disk):
    root = small_disk / "checkpoints"
    local, glob = _state()
    first = checkpoint.save(root, 1, FakeEngine(_weights()), local, glob, keep=1, is_main=True)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    big = FakeEngine(_weights(scale=300))  # ~300 KiB of weights: more than the disk holds
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save(root, 2, big, local, {**glob, "step": 2}, keep=1, is_main=True)
    msg = str(e.value)
    assert "checkpoint of step 2 could not be written" in msg and "No space left on device" in msg
    assert f"the previous checkpoint {first} is intact" in msg and "\n" not in msg
    assert len(big.fetched) == 3  # it walked every parameter (other ranks would be waiting in the gathers)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # step 1, latest: byte for byte; the partial step 2 is gone
    assert checkpoint.latest(root) == first


def test_checkpoint_estimate_counts_the_built_coprocessor(tmp_path):
    from train_helpers import tiny_run_config

    from dist_cacheaug import load_config
    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.train.estimate import checkpoint_estimate, param_counts
    from dist_cacheaug.variants import build_trainable

    for stage in (2, 3):
        cfg = load_config(tiny_run_config(tmp_path, tmp_path / "no-shards"), [f"zero.stage={stage}"])
        model = build_trainable(cfg, build_decoder(cfg.model, device=torch.device("cpu"), seed=0))
        trainable = [p for p in model.parameters() if p.requires_grad]
        est = checkpoint_estimate(cfg, world_size=4)
        assert param_counts(cfg).coprocessor == sum(p.numel() for p in trainable)
        assert est["save_peak_rank0"] == 4 * max(p.numel() for p in trainable)
        assert est["consolidated_bytes"] == est["whole_copy"] == 4 * sum(p.numel() for p in trainable)
        assert est["save_peak_other_ranks"] == (0 if stage == 3 else est["save_peak_rank0"])
