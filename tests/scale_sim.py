"""Helpers for simulating placements at the mission's shapes and world sizes in one process.

torch's ``fake`` process-group backend answers every collective at once without moving data, so
one process can stand in for any rank of any world size while the model lives on the meta device.
One process holds one group at a time: :func:`fake_group` starts the group of one rank and tears it
down again. Layouts of the ranks not built for real are enumerated from the engines' own rules
and checked with the checkpoint's own coverage check.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from mezo_dist import plan
from mezo_dist.distributed import DistState

# The mission's world sizes, and HSDP meshes of 8-GPU nodes (2 and 4 nodes: the recipe's).
WORLDS = (8, 64, 512)


def opt_config(size: str):
    """The Hugging Face config of an OPT size from the planner's table (the hub's config.json values)."""
    from transformers import OPTConfig

    h, n, ffn, vocab, heads = plan.OPT[size]
    return OPTConfig(hidden_size=h, num_hidden_layers=n, ffn_dim=ffn, vocab_size=vocab, num_attention_heads=heads,
                     max_position_embeddings=2048, word_embed_proj_dim=h, torch_dtype="float16")


def meta_opt(size: str, folder: Path) -> torch.nn.Module:
    """OPT of ``size`` with parameters on meta, built the project's way (``models.empty_model``)."""
    from mezo_dist.models import empty_model

    opt_config(size).save_pretrained(folder)
    return empty_model(str(folder), dtype=torch.float16)


def sample_ranks(world: int) -> list[int]:
    """Ranks built for real (each build of OPT-66B's FSDP2 placement costs about a second): the
    first, one past the middle (another replica group under HSDP), the last (short or empty shards)."""
    return sorted({0, world // 2 + 1, world - 1})


def state_of(rank: int, world: int, replicas: int = 1) -> DistState:
    return DistState(rank=rank, world_size=world, local_rank=rank % 8, device=torch.device("cpu"), backend="fake",
                     hsdp_replicas=replicas)


@contextlib.contextmanager
def fake_group(rank: int, world: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world`` under the fake backend."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DTensor caches sharding decisions by mesh, and the meshes of two ranks compare equal: left
        # in place, the next rank's parameters would carry this rank's mesh and coordinate.
        _clear_sharding_prop_cache()


Chunk = tuple[int, int, int]  # (rank, offset, count)


def coverage_index(params: dict[str, int], layouts: dict[str, list[Chunk]], world: int,
                   owns: Callable[[int, bool], bool], replicated: Iterable[str] = ()) -> dict:
    """A checkpoint index (``mezo_dist.checkpoint``'s format) of the chunks each rank would write.

    ``layouts[name]`` lists every rank's (rank, offset, count) of a sharded parameter; a name in
    ``replicated`` is held whole by every rank. ``owns(rank, shard)`` is the checkpoint's rule of
    which rank writes a piece."""
    replicated = set(replicated)
    files = [f"rank-{r:05d}.safetensors" for r in range(world)]
    writers = [r for r in range(world) if owns(r, False)]
    built: dict[int, list] = {}  # parameters of one shape share one layout list: build its rows once
    chunks: dict[str, list] = {}
    for name, numel in params.items():
        if name in replicated:
            chunks[name] = [[files[r], name, 0, numel] for r in writers]
            continue
        layout = layouts[name]
        if id(layout) not in built:
            built[id(layout)] = [[files[r], "", off, count] for r, off, count in layout if count and owns(r, True)]
        chunks[name] = built[id(layout)]
    return {"params": dict(params), "chunks": chunks}


def owner_rule(world: int, replicas: int = 1) -> Callable[[int, bool], bool]:
    """``mezo_dist.checkpoint.owns_piece`` for every rank of a world (it reads only rank, world, replicas)."""
    from mezo_dist.checkpoint import owns_piece
    from mezo_dist.placement.base import Piece

    empty = torch.empty(0, device="meta")
    memo = {(r, s): owns_piece(Piece("p", empty, 0, 1, False, shard=s), state_of(r, world, replicas))
            for r in range(world) for s in (True, False)}
    return lambda rank, shard: memo[(rank, shard)]


@functools.cache
def zero3_layout(numel: int, world: int) -> list[Chunk]:
    """DeepSpeed's partition of a flattened parameter: ``ceil(numel / world)`` elements per rank,
    rank r from ``r * chunk``; the last ranks' tails are padding (no valid elements). Cached, so
    parameters of one size share one list: read it, do not change it."""
    chunk = math.ceil(numel / world)
    return [(r, r * chunk, max(0, min(chunk, numel - r * chunk))) for r in range(world)]
