"""Drift checks for data-parallel replicas (the single backend on several ranks).

Replicas stay identical because every rank applies the same update to the same values; a
hardware fault or a non-deterministic kernel would break that silently. A checksum of the raw
bits of every trainable parameter, compared across ranks, turns it into an error.
"""

from __future__ import annotations

import torch

from mezo_dist.errors import TrainingError
from mezo_dist.placement.base import Placement


@torch.no_grad()
def checksum(placement: Placement) -> int:
    """An exact integer checksum of the trainable parameters' bits (position-weighted)."""
    total = 0
    for i, piece in enumerate(placement.pieces(), start=1):
        x = piece.local
        bits = x.view(torch.int32) if x.element_size() == 4 else x.view(torch.int16)
        total += i * int(bits.to(torch.int64).sum().item())
    return total


def check_replicas(placement: Placement, *, step: int) -> None:
    """Collective: raise :class:`TrainingError` on every rank if any replica differs."""
    state = placement.state
    if not state.grouped:
        return
    sums = state.all_gather_object(checksum(placement))
    if len(set(sums)) > 1:
        raise TrainingError(f"data-parallel replicas drifted apart by step {step}: parameter checksums {sums}")
