"""The path rule, atomic publishing, the checkpoint writer's format and checksums, old checkpoints."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from mezo_dist.checkpoint import write_safetensors
from mezo_dist.cli import main
from mezo_dist.errors import ConfigError
from mezo_dist.io import inside, publish_folder


def test_inside_keeps_names_in_their_folder(tmp_path):
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    assert inside(tmp_path / "ckpt", "sub/a.safetensors", what="index") == tmp_path / "ckpt" / "sub" / "a.safetensors"
    for name in ("../elsewhere.safetensors", "sub/../../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors"),
                 "", ".", "sub/..", 7, None, "a\x00b"):
        with pytest.raises(ConfigError):
            inside(tmp_path / "ckpt", name, what="index")
    # A link inside the folder that points out of it is outside too.
    os.symlink(tmp_path / "elsewhere.safetensors", tmp_path / "ckpt" / "link.safetensors")
    with pytest.raises(ConfigError, match="outside"):
        inside(tmp_path / "ckpt", "link.safetensors", what="index")


def test_publish_replaces_a_folder_but_never_a_file(tmp_path):
    final = tmp_path / "final"
    for content in ("one", "two"):
        tmp = tmp_path / f".tmp-{content}"
        tmp.mkdir()
        (tmp / "f").write_text(content)
        assert publish_folder(tmp, final)
    assert (final / "f").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    (tmp_path / "file").write_text("mine")
    tmp = tmp_path / ".tmp-three"
    tmp.mkdir()
    with pytest.raises(ConfigError, match="is a file"):
        publish_folder(tmp, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine" and not tmp.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_safetensors_read_back_by_the_library_with_their_digest(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g).to(dtype)
    # Views of one storage, as a ZeRO-3 flat partition's pieces are, plus an empty one.
    tensors = {"a|0": base[:300], "b.weight|12": base[300:997], "c|0": base[997:], "d|5": base[:0]}
    digest = write_safetensors(tmp_path / "r.safetensors", tensors, {"format": "x"})
    data = (tmp_path / "r.safetensors").read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    loaded = load_file(str(tmp_path / "r.safetensors"))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], t) for k, t in tensors.items())
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "x"}
        assert torch.equal(f.get_slice("b.weight|12")[5:9], tensors["b.weight|12"][5:9])


def test_a_checkpoint_without_checksums_still_resumes(tiny_models, text_file, tmp_path, capsys):
    """Checkpoints written before the sha256 field existed (same format, no digests) load."""
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_models["opt"]), "--train_file", str(text_file), "--output_dir", str(out),
            "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "16",
            "--disable_tqdm", "--report_to", "none"]
    assert main(argv) == 0
    index = json.loads((out / "checkpoint-1" / "index.json").read_text())
    assert set(index["sha256"]) == {"rank-00000.safetensors", "trainer_state.json"}
    del index["sha256"]
    (out / "checkpoint-1" / "index.json").write_text(json.dumps(index))
    for c in ("checkpoint-2", "final"):
        import shutil

        shutil.rmtree(out / c)
    capsys.readouterr()
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out and (out / "final").is_dir()
