"""Offsets and block plans stay exact far beyond 32-bit indices.

The project addresses an element by its offset in its own flattened parameter, never by an index
over the whole model: OPT-175B's 175 billion elements never form one index, and its largest tensor
(the 617.7M-element embedding) stays below 2^31 elements, though not below 2^31 bytes once in
fp32. Those offsets are Python integers all the way to the noise stream's block plan and the
checkpoint's index. These tests drive both with a parameter of more than 2^33 elements (what a
fused or flattened parameter of a model a few times OPT-175B's width would be), on the blocks
stream (the hash stream's own tests, tests/unit/test_hash_noise.py, draw its elements past 2^32 and
2^33); a block plan touches no tensor, and the draws below generate two blocks.
"""

from __future__ import annotations

import json

import pytest
import torch

from mezo_dist import plan
from mezo_dist.checkpoint import check_coverage
from mezo_dist.errors import ConfigError
from mezo_dist.zo import noise
from tests.scale_sim import coverage_index, owner_rule, zero3_layout

HUGE = 2**33 + 2**20 * 5 + 12345  # elements of one flattened parameter; its last block is short
KEY = noise.param_key(noise.step_seed(7, 3), "fused.weight")


def test_opt_175b_offsets_are_per_parameter():
    shape = plan.opt_shape("175b")
    assert shape.params > 2**37 and shape.largest_param < 2**31 < 4 * shape.largest_param


@pytest.mark.parametrize("offset,count", [(2**31 - 7, 14), (2**32 - 3, 2**20 + 6), (HUGE - 2**20 - 20, 2**20 + 20),
                                          (0, HUGE)])
def test_block_plan_is_exact_beyond_32_bits(offset, count):
    rows = noise.block_plan(offset, count, HUGE)
    assert rows[0][3] == offset and rows[-1][4] == offset + count
    for (block, start, length, lo, hi), nxt in zip(rows, rows[1:] + [None]):
        assert start == block * noise.BLOCK and start <= lo < hi <= start + length
        assert length == min(noise.BLOCK, HUGE - start)
        if nxt is not None:
            assert hi == nxt[3] and nxt[0] == block + 1
    assert sum(hi - lo for *_, lo, hi in rows) == count
    if offset + count == HUGE:
        assert rows[-1][2] == HUGE % noise.BLOCK and rows[-1][0] == HUGE // noise.BLOCK


@pytest.mark.parametrize("kind", noise.KINDS)
def test_a_slice_past_2_to_the_32_is_the_same_range_of_its_blocks(kind):
    """z across the block boundary at 2^32 (block 4096): the slice equals its two blocks' draw,
    and drawing it in two parts gives the same values."""
    lo = 2**32 - 5
    z = noise.draw(KEY, lo, 10, HUGE, kind=kind)
    left, right = torch.empty(noise.BLOCK), torch.empty(noise.BLOCK)
    noise.fill_block(left, KEY, 2**32 // noise.BLOCK - 1, kind=kind)
    noise.fill_block(right, KEY, 2**32 // noise.BLOCK, kind=kind)
    assert torch.equal(z, torch.cat([left[-5:], right[:5]]))
    assert torch.equal(z, torch.cat([noise.draw(KEY, lo, 5, HUGE, kind=kind), noise.draw(KEY, 2**32, 5, HUGE, kind=kind)]))
    assert not torch.equal(left[-5:], right[:5])


def test_checkpoint_index_beyond_2_to_the_32():
    """512 ranks' ZeRO-3 chunks of the huge parameter, through index.json's JSON and the
    checkpoint's coverage check; a missing chunk past 2^32 is found at its exact element."""
    params = {"fused.weight": HUGE}
    layouts = {"fused.weight": zero3_layout(HUGE, 512)}
    index = json.loads(json.dumps(coverage_index(params, layouts, 512, owner_rule(512))))
    check_coverage(index, where="huge")
    chunks = index["chunks"]["fused.weight"]
    assert max(c[2] for c in chunks) > 2**32 + 2**31
    del chunks[-2]
    with pytest.raises(ConfigError, match=rf"at element {510 * -(-HUGE // 512)}$"):
        check_coverage(index, where="huge")
