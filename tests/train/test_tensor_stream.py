"""The streamed safetensors writer produces save_file's bytes, one tensor at a time."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_cacheaug.train.tensor_stream import SafetensorsWriter, read_tensors, write_tensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.w": torch.randn(3, 5, generator=g),
        "a_bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "half": torch.randn(2, 3, generator=g).to(torch.float16),
        "steps": torch.arange(7),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "z.last": torch.randn(1, generator=g),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_streamed_file_is_byte_identical_to_save_file(tmp_path, metadata):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    write_tensors(tmp_path / "ours.safetensors", tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_refuses_out_of_order_wrong_shape_and_missing_tensors(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    with pytest.raises(ValueError, match="'b' written out of order \\(expected 'a'\\)"):
        with SafetensorsWriter(tmp_path / "x", specs) as w:
            w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="'a' is torch.float32 \\(3,\\), declared torch.float32 \\(2,\\)"):
        with SafetensorsWriter(tmp_path / "x", specs) as w:
            w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="1 tensors never written, first 'b'"):
        with SafetensorsWriter(tmp_path / "x", specs) as w:
            w.write("a", torch.zeros(2))


def test_reader_returns_save_file_tensors_one_at_a_time(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    back = dict(read_tensors(tmp_path / "ref.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
    assert [n for n, _ in read_tensors(tmp_path / "ref.safetensors", ["steps", "half"])] == ["steps", "half"]
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        list(read_tensors(tmp_path / "ref.safetensors", ["nope"]))
    data = (tmp_path / "ref.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="is truncated"):
        list(read_tensors(tmp_path / "cut.safetensors"))


def test_reader_with_one_buffer_yields_each_tensor_until_the_next(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    for name, t in read_tensors(tmp_path / "ref.safetensors", reuse=True):
        assert torch.equal(t, tensors[name]), name  # checked before the next read overwrites it
