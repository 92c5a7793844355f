"""OPT-66B and OPT-175B under FSDP2 at 8, 64 and 512 ranks, and on HSDP meshes of 8-GPU nodes, simulated.

The project's own path builds the placement (``models.empty_model`` on meta, then
``placement.fsdp.apply_fully_shard`` on ``make_mesh``'s mesh, then ``FSDPPlacement.pieces()``) under
torch's fake process group, as a few real ranks of each world. At those ranks every piece (its
length, its offset in the flattened parameter, FSDP2's local tensor) equals what DTensor's layout
function computes for the rank's mesh coordinate, and FSDP2's padded shard storage equals the
planner's per-rank parameter figure. Every rank's layout is then enumerated with DTensor's function
and written into a checkpoint index by the checkpoint's ownership rule: the checkpoint's own
coverage check proves every element of every parameter is written exactly once, and each HSDP
replica group on its own holds every element exactly once.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from mezo_dist import plan
from mezo_dist.checkpoint import check_coverage
from mezo_dist.errors import ConfigError
from mezo_dist.placement.fsdp import FSDPPlacement, _flat_offset, apply_fully_shard, make_mesh
from tests.scale_sim import WORLDS, coverage_index, fake_group, meta_opt, owner_rule, sample_ranks, state_of

# (size, world, HSDP replica groups): the mission's world sizes, the recipe's 2 and 4 nodes of 8
# GPUs with HSDP, and 64 nodes of 8.
CASES = ([("66b", w, 1) for w in WORLDS] + [("66b", 16, 2), ("66b", 32, 4)]
         + [("175b", w, 1) for w in WORLDS] + [("175b", 512, 64)])


@pytest.fixture(scope="module")
def meta_models(tmp_path_factory):
    cache: dict[str, torch.nn.Module] = {}

    def get(size: str) -> torch.nn.Module:
        if size not in cache:
            cache[size] = meta_opt(size, tmp_path_factory.mktemp(f"opt-{size}"))
        return cache[size]

    return get


def dtensor_layouts(shapes: dict[str, tuple[int, ...]], mesh_shape: tuple[int, ...], placements) -> dict[str, list]:
    """Every rank's (rank, flat offset, count) of every parameter, from DTensor's own layout
    function for each mesh coordinate (ranks in the mesh's row-major order)."""
    by_shape: dict[tuple[int, ...], list] = {}
    for shape in set(shapes.values()):
        row = math.prod(shape[1:])
        rows = []
        for rank, coord in enumerate(itertools.product(*(range(d) for d in mesh_shape))):
            local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
            rows.append((rank, offset[0] * row, math.prod(local)))
        by_shape[shape] = rows
    return {name: by_shape[shape] for name, shape in shapes.items()}


def stored_numel(model: torch.nn.Module) -> int:
    """Elements of FSDP2's sharded parameter storage on this rank (padded shards: the real allocation)."""
    total = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            total += sum(fp._sharded_param_data.numel() for fp in (group.fsdp_params if group else []))
    return total


@pytest.mark.parametrize("size,world,replicas", CASES, ids=[f"opt-{s}-{w}{f'-hsdp{r}' if r > 1 else ''}"
                                                            for s, w, r in CASES])
def test_fsdp2_pieces_cover_every_element_once(size, world, replicas, meta_models):
    base = meta_models(size)
    shape = plan.opt_shape(size)
    group = world // replicas
    mesh_shape = (replicas, group) if replicas > 1 else (world,)
    placements = (Replicate(), Shard(0)) if replicas > 1 else (Shard(0),)
    shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    numels = {name: math.prod(s) for name, s in shapes.items()}
    # The planner's tensor table is the model transformers builds.
    assert Counter(shapes.values()) == Counter(dict(shape.tensors)) and sum(numels.values()) == shape.params
    layouts = dtensor_layouts(shapes, mesh_shape, placements)
    setting = plan.Setting(gpus=world, seq_len=400, batch_size=1, dtype="fp16", hsdp_replicas=replicas)
    planned = plan.local_numel(shape, "fsdp", group)
    assert plan.estimate(shape, "mezo", "fsdp", setting).parameters == 2 * planned

    for rank in sample_ranks(world):
        with fake_group(rank, world):
            state = state_of(rank, world, replicas)
            model = copy.deepcopy(base)
            mesh = make_mesh(state)
            apply_fully_shard(model, mesh)
            pieces = FSDPPlacement(model, state).pieces()
            coord = mesh.get_coordinate()
            assert tuple(coord) == ((rank // group, rank % group) if replicas > 1 else (rank,))
            params = dict(model.named_parameters())
            assert [p.name for p in pieces] == list(shapes)
            for piece in pieces:
                p = params[piece.name]
                assert isinstance(p, DTensor) and tuple(p.placements) == placements and p.device_mesh is mesh
                local, offset = _compute_local_shape_and_global_offset(shapes[piece.name], mesh_shape, coord, placements)
                assert tuple(p.to_local().shape) == local and piece.local.numel() == math.prod(local)
                assert piece.offset == _flat_offset(p) == offset[0] * math.prod(shapes[piece.name][1:])
                assert (rank, piece.offset, piece.local.numel()) == layouts[piece.name][rank]
                assert piece.shard and piece.full_numel == numels[piece.name]
            # The rank's real parameter storage is the planner's figure (same on every rank:
            # FSDP2 pads the short shards); rank 0's pieces fill all of it.
            assert stored_numel(model) == planned
            if rank == 0:
                assert sum(p.local.numel() for p in pieces) == planned

    # Exactly once: in each replica group on its own, and under the checkpoint's rule overall.
    for g in range(replicas):
        check_coverage(coverage_index(numels, layouts, world, lambda r, s: r // group == g), where=f"group {g}")
    check_coverage(coverage_index(numels, layouts, world, owner_rule(world, replicas)), where="checkpoint")
    # Offsets stay inside their own parameter: no index over the whole model is ever formed.
    assert all(off + n <= numels[name] for name, rows in layouts.items() for _, off, n in rows if n)


def test_coverage_check_finds_a_missing_rank(meta_models):
    """The check above can fail: OPT-66B at 512 ranks without one rank's rows of the embedding."""
    base = meta_models("66b")
    shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    numels = {name: math.prod(s) for name, s in shapes.items()}
    layouts = dtensor_layouts(shapes, (512,), (Shard(0),))
    name = "model.decoder.embed_tokens.weight"
    layouts[name] = [c for c in layouts[name] if c[0] != 300]
    with pytest.raises(ConfigError, match=rf"does not cover parameter {name} at element {300 * 99 * 9216}"):
        check_coverage(coverage_index(numels, layouts, 512, owner_rule(512)), where="checkpoint")
