"""Placements of a model on ranks, behind one interface (see ``base.py``).

``build`` makes one from the run's config (the launch path); ``wrap`` adopts a model the user
already placed (the Python API): a plain module, an FSDP2-sharded module or a DeepSpeed engine.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Piece, Placement
from mezo_dist.placement.fsdp import FSDPPlacement
from mezo_dist.placement.single import SinglePlacement
from mezo_dist.placement.zero3 import Zero3Placement

BACKENDS = ("single", "fsdp", "zero3")

__all__ = ["BACKENDS", "Piece", "Placement", "SinglePlacement", "FSDPPlacement", "Zero3Placement", "wrap"]


def wrap(model: Any, state: DistState | None = None) -> Placement:
    """Adopt an already placed model: a DeepSpeed engine, an FSDP2 module, or a plain module."""
    from torch.distributed.fsdp import FSDPModule

    if state is None:
        from mezo_dist.distributed import current_state

        state = current_state()
    if type(model).__name__ == "DeepSpeedEngine":
        return Zero3Placement(model, state)
    if isinstance(model, FSDPModule):
        return FSDPPlacement(model, state)
    if isinstance(model, nn.Module):
        return SinglePlacement(model, state)
    raise TypeError(f"cannot place a {type(model).__name__}: expected an nn.Module or a DeepSpeed engine")
