"""Safetensors by byte ranges (mezo_dist/safetensors_io.py): the writer's files are byte for byte
what ``safetensors.torch.save_file`` writes, whatever order the tensors arrive in, and a range read
returns exactly those elements, converted where the destination's dtype differs."""

from __future__ import annotations

import pytest
import torch

from mezo_dist.safetensors_io import Reader, Writer


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.half": torch.randn(3, generator=g).half(), "a.matrix": torch.randn(5, 7, generator=g),
            "c.bf16": torch.randn(5, generator=g).bfloat16(), "d.int": torch.arange(3),
            "e.bool": torch.tensor([True, False]), "f.empty": torch.zeros(0, 4), "g.scalar": torch.tensor(2.5)}


def test_writer_matches_save_file_byte_for_byte(tmp_path):
    from safetensors.torch import save_file

    tensors = sample()
    save_file(tensors, str(tmp_path / "want.safetensors"), metadata={"format": "pt"})
    writer = Writer(tmp_path / "got.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                    metadata={"format": "pt"})
    for key in reversed(list(tensors)):  # arrival order does not matter
        writer.write(key, tensors[key])
    writer.close()
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()


def test_writer_refuses_a_wrong_tensor_and_an_unwritten_one(tmp_path):
    writer = Writer(tmp_path / "x.safetensors", {"a": ((2, 3), torch.float32), "b": ((4,), torch.float16)})
    with pytest.raises(ValueError, match="the header says"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_range_reads_return_those_elements(tmp_path):
    from safetensors.torch import save_file

    tensors = sample()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    reader = Reader(tmp_path / "m.safetensors")
    assert sorted(reader.keys()) == sorted(tensors) and reader.shape("a.matrix") == (5, 7)
    flat = tensors["a.matrix"].reshape(-1)
    for start, n in [(0, 35), (13, 9), (34, 1), (7, 0)]:
        out = torch.full((n,), -1.0)
        reader.read_into("a.matrix", start, out)  # straight into out: same dtype, on the host
        assert torch.equal(out, flat[start:start + n])
    out = torch.empty(3, dtype=torch.float64)
    reader.read_into("c.bf16", 1, out)  # converted from the file's dtype
    assert torch.equal(out, tensors["c.bf16"].double()[1:4])
    out = torch.empty(1)
    reader.read_into("g.scalar", 0, out)
    assert out.item() == 2.5
    with pytest.raises(ValueError, match="outside"):
        reader.read_into("a.matrix", 30, torch.empty(6))
