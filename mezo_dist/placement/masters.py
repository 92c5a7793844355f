"""fp32 masters for ``--precision`` bf16/fp16: the values MeZO edits, kept apart from the model.

Editing the model's own storage in place cannot be exact: +eps z, -2 eps z, +eps z rounds at
every step (in fp32 already, and at 8 significant bits in bf16), and an update of 1e-7 vanishes
against a bf16 weight. So a mixed-precision placement keeps an fp32 *master* of every element
this rank edits and hands it out as ``Piece.local``, with the model's storage as
``Piece.compute``. A MeZO pass changes a master only by the update; the perturbation lives in
``compute = master + (current scale) z`` (cast to the storage's dtype), written by the same
pass. The masters therefore come back bit for bit after every perturb/restore cycle.

One implementation serves every backend. A placement hands its own storage to
:meth:`Masters.attach` before every pass; a piece whose form changed since the last pass (on
ZeRO-3, a parameter gathered whole on every rank or released back to its partition) gets its
master through the placement's ``reform`` hook, which moves the values exactly.

Cost: 4 bytes per edited element (per parameter on ``single``, per parameter / world size on
``fsdp`` and ``zero3``).
"""

from __future__ import annotations

from typing import Callable

import torch

from mezo_dist.placement.base import Piece

# (the piece as the placement holds it now, the master in its previous form) -> the master in
# the piece's current form. Collective where the move needs other ranks' values.
Reform = Callable[[Piece, torch.Tensor], torch.Tensor]


def fresh_master(piece: Piece, _held: torch.Tensor | None = None) -> torch.Tensor:
    """A master made from the model's values of ``piece`` (the default ``reform``)."""
    return piece.local.to(torch.float32, copy=True)


class Masters:
    """fp32 copies of the pieces a placement edits, made from the model's values the first time a
    piece is seen and kept across passes while the piece keeps its form."""

    def __init__(self) -> None:
        # name -> (master, shard): ``shard`` is the form the master was last handed out in.
        self._held: dict[str, tuple[torch.Tensor, bool]] = {}
        self._attached: list[Piece] = []

    @torch.no_grad()
    def attach(self, pieces: list[Piece], *, reform: Reform = fresh_master) -> list[Piece]:
        """The pieces MeZO edits: each master as ``local``, the placement's storage as ``compute``.

        Args:
            pieces: the placement's own storage, as it holds it now.
            reform: called for a piece whose form (``shard``, or length) changed since the last
                pass, with its previous master; every rank calls it for the same pieces in the
                same order, since every rank sees the same parameter states.
        """
        out = []
        for p in pieces:
            held = self._held.get(p.name)
            if held is None:
                master = fresh_master(p)
            elif held[1] == p.shard and held[0].numel() == p.local.numel():
                master = held[0]
            else:
                master = reform(p, held[0])
            self._held[p.name] = (master, p.shard)
            out.append(Piece(p.name, master, p.offset, p.full_numel, p.decay, p.shard, compute=p.local))
        self._attached = out
        return out

    def held(self, name: str) -> tuple[torch.Tensor, bool] | None:
        """The master of parameter ``name`` and whether it is a shard (None if never attached)."""
        return self._held.get(name)

    def names(self) -> list[str]:
        """The parameters with a master, in the order they were first attached."""
        return list(self._held)

    @torch.no_grad()
    def sync(self) -> None:
        """compute <- master (no perturbation) for the pieces last attached: after a checkpoint
        load or a pass that did not write the compute storage itself."""
        for p in self._attached:
            if p.compute is not None:
                p.compute.copy_(p.local)
