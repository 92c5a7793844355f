import subprocess
import sys

import pytest
import torch

from mezo_dist.zo import noise


@pytest.fixture
def small_blocks(monkeypatch):
    # Small blocks make every slice cross block boundaries at test sizes.
    monkeypatch.setattr(noise, "BLOCK", 1000)


@pytest.mark.parametrize("offset,count", [(0, 4567), (1, 999), (999, 2), (1000, 1000), (2345, 2222), (4566, 1)])
def test_any_slice_equals_the_same_range_of_the_full_draw(small_blocks, offset, count):
    key, n = noise.param_key(11, "layer.weight"), 4567
    full = noise.draw(key, 0, n, n)
    assert torch.equal(noise.draw(key, offset, count, n), full[offset : offset + count])


def test_shards_of_any_world_size_tile_the_full_draw(small_blocks):
    key, n = noise.param_key(3, "w"), 3001
    full = noise.draw(key, 0, n, n)
    for world in (2, 3, 7):
        chunk = -(-n // world)  # ZeRO-3 style flat partitions with a short last rank
        parts = [noise.draw(key, r * chunk, max(0, min(chunk, n - r * chunk)), n) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)


def test_keys_separate_steps_and_parameters():
    n = 512
    base = noise.draw(noise.param_key(noise.step_seed(0, 0), "a"), 0, n, n)
    for other in (noise.param_key(noise.step_seed(0, 1), "a"), noise.param_key(noise.step_seed(1, 0), "a"),
                  noise.param_key(noise.step_seed(0, 0), "b")):
        assert not torch.allclose(base, noise.draw(other, 0, n, n))


def test_standard_normal_statistics():
    n = 2_000_000  # spans two default blocks
    z = noise.draw(noise.param_key(5, "big"), 0, n, n)
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3


def test_keys_do_not_depend_on_the_process():
    code = "from mezo_dist.zo import noise; print(noise.param_key(noise.step_seed(42, 7), 'model.layers.0.w'))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout
        for s in (1, 2)
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(noise.param_key(noise.step_seed(42, 7), "model.layers.0.w"))


def test_out_of_range_slice_is_refused():
    with pytest.raises(ValueError, match="outside"):
        noise.draw(1, 10, 5, 12)
