"""fp32 masters for ``--precision`` bf16/fp16: the values MeZO edits, kept apart from the model.

Editing the model's own storage in place cannot be exact: +eps z, -2 eps z, +eps z rounds at
every step (in fp32 already, and at 8 significant bits in bf16), and an update of 1e-7 vanishes
against a bf16 weight. So a mixed-precision placement keeps an fp32 *master* of every element
this rank edits and hands it out as ``Piece.local``, with the model's storage as
``Piece.compute``. A MeZO pass changes a master only by the update; the perturbation lives in
``compute = master + (current scale) z`` (cast to the storage's dtype), written by the same
pass. The masters therefore come back bit for bit after every perturb/restore cycle.

Cost: 4 bytes per edited element (per parameter on ``single``, per parameter / world size on
``fsdp`` and ``zero3``).
"""

from __future__ import annotations

import torch

from mezo_dist.placement.base import Piece


class Masters:
    """fp32 copies of pieces, made from the model's values the first time a piece is seen."""

    def __init__(self) -> None:
        self._by_name: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def attach(self, pieces: list[Piece]) -> list[Piece]:
        out = []
        for p in pieces:
            master = self._by_name.get(p.name)
            if master is None or master.numel() != p.local.numel():
                master = self._by_name[p.name] = p.local.to(torch.float32, copy=True)
            out.append(Piece(p.name, master, p.offset, p.full_numel, p.decay, p.shard, compute=p.local))
        return out

    @staticmethod
    @torch.no_grad()
    def sync(pieces: list[Piece]) -> None:
        """compute <- master (no perturbation): after a checkpoint load or another direct edit."""
        for p in pieces:
            if p.compute is not None:
                p.compute.copy_(p.local)
