"""OPT-66B and OPT-175B under DeepSpeed ZeRO-3 at 8, 64 and 512 ranks, simulated.

DeepSpeed's own partitioning runs for real under torch's fake process group: a module holding one
parameter of each distinct OPT-66B / OPT-175B tensor shape is built under ``deepspeed.zero.Init``
with the shipped ``ds_configs/zero3.json`` (its ``"auto"`` fields filled by
``placement.deepspeed_config.fill_ds_config``) and wrapped in a forward-only engine, as a few real ranks of
each world. ZeRO-3 partitions each parameter on its own, so the module around the parameters does
not change a partition (and building the whole OPT under ``zero.Init`` would initialise 66 billion
real weights). At those ranks DeepSpeed's partition size, the project's ``_partition_geometry``
and ``Zero3Placement.pieces()`` agree with the rule: rank r holds the flat range
``[r * chunk, (r + 1) * chunk)`` with ``chunk = ceil(numel / world)``, the last ranks padded; and
DeepSpeed marks persistent exactly the parameters the planner counts as persistent. The rule then
lays out every rank of the whole model, and the checkpoint's coverage check proves every element
written exactly once: before the first forward (persistent parameters still partitioned, the state
these pieces are read in) and after it (persistent parameters whole on every rank, written by
rank 0; the 2-rank gloo tests run that state for real).

No forward runs here: under the fake group DeepSpeed's cross-rank consistency checks of its
prefetch trace read collectives that never ran.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
import torch
from torch import nn

from mezo_dist import plan
from mezo_dist.checkpoint import check_coverage
from mezo_dist.placement.deepspeed_config import fill_ds_config
from mezo_dist.placement.zero3 import Zero3Placement, _partition_geometry
from tests.helpers import ROOT
from tests.scale_sim import (WORLDS, coverage_index, fake_group, opt_config, owner_rule, sample_ranks, state_of,
                             zero3_layout)

CASES = [(size, world) for size in ("66b", "175b") for world in WORLDS]


class _Holder(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        # Allocated in the run's dtype: zero.Init would otherwise convert (touch) the whole tensor;
        # as it is, only this rank's partition is ever copied.
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.bfloat16))


@pytest.fixture
def deepspeed_rank(monkeypatch):
    """Start DeepSpeed's communication layer over the fake group of one rank."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.comm as ds_comm

    # DeepSpeed's CPU shared-memory all-reduce is compiled (minutes on a fresh machine) and mapped
    # per rank; a fake group has no peers to share memory with.
    monkeypatch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)

    @contextlib.contextmanager
    def rank_of(rank: int, world: int):
        with fake_group(rank, world):
            # What a launcher exports (zero.Init reads LOCAL_RANK for its device).
            for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank % 8)):
                monkeypatch.setenv(key, str(value))
            monkeypatch.setattr(ds_comm, "cdb", None)  # a fresh backend over this rank's group
            deepspeed.init_distributed(dist_backend="fake")
            yield deepspeed

    return rank_of


def opt_numels(size: str) -> dict[str, int]:
    """Every parameter of an OPT size (tied ones once) and its element count, from a meta model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(opt_config(size))
    model.tie_weights()
    return {name: p.numel() for name, p in model.named_parameters()}


@pytest.mark.parametrize("size,world", CASES, ids=[f"opt-{s}-{w}" for s, w in CASES])
def test_zero3_partitions_cover_every_element_once(size, world, deepspeed_rank):
    shape = plan.opt_shape(size)
    cfg = fill_ds_config(json.loads((ROOT / "ds_configs" / "zero3.json").read_text()), micro_batch=1,
                         world_size=world, dtype=torch.bfloat16, hidden_size=shape.hidden)
    threshold = cfg["zero_optimization"]["stage3_param_persistence_threshold"]
    assert threshold == plan.persistence_threshold(shape)
    counts = dict(shape.tensors)

    for rank in sample_ranks(world):
        with deepspeed_rank(rank, world) as deepspeed:
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                module = nn.ModuleList(_Holder(s) for s in counts)
            engine, *_ = deepspeed.initialize(model=module, config=cfg)
            pieces = {p.name: p for p in Zero3Placement(engine, state_of(rank, world)).pieces()}
            stored = 0
            for (name, p), tensor_shape in zip(module.named_parameters(), counts):
                numel = math.prod(tensor_shape)
                _, offset, count = zero3_layout(numel, world)[rank]
                assert tuple(p.ds_shape) == tensor_shape and p.ds_tensor.ds_numel == -(-numel // world)
                assert _partition_geometry(p) == (offset, count)
                piece = pieces[name]
                assert p.ds_persist == (numel <= threshold), name
                if p.ds_persist:
                    # The placement gathers persistent parameters before it hands out pieces, so
                    # their piece keeps one geometry (the whole tensor) through every pass.
                    assert not piece.shard and (piece.offset, piece.local.numel(), piece.full_numel) == (0, numel, numel)
                else:
                    assert piece.shard and (piece.offset, piece.local.numel(), piece.full_numel) == (offset, count, numel)
                stored += p.ds_tensor.ds_numel * counts[tensor_shape]
            # DeepSpeed's partitions of the whole model are the planner's per-rank figure.
            assert stored == plan.local_numel(shape, "zero3", world)
            del engine, module

    numels = opt_numels(size)
    assert sum(numels.values()) == shape.params
    layouts = {n: zero3_layout(k, world) for n, k in numels.items()}
    persistent = [n for n, k in numels.items() if k <= threshold]
    owns = owner_rule(world)
    check_coverage(coverage_index(numels, layouts, world, owns), where="before the first forward")
    check_coverage(coverage_index(numels, layouts, world, owns, replicated=persistent), where="after it")
    # Every rank stores the same padded partitions, plus the persistent parameters whole once
    # they are gathered: the planner's parameter bytes (bf16, 2 bytes).
    per_rank = sum(-(-k // world) for k in numels.values()) + sum(numels[n] for n in persistent)
    setting = plan.Setting(gpus=world, seq_len=400, batch_size=1, dtype="bf16")
    assert plan.estimate(shape, "mezo", "zero3", setting).parameters == 2 * per_rank
