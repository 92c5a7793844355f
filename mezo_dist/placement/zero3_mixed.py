"""ZeRO-3 in bf16/fp16 compute with fp32 values for MeZO to edit (``--precision`` with fp32 values).

DeepSpeed holds the model in the compute dtype (its partitions and gathered parameters are
bf16/fp16). Perturbing and updating those directly would round every +eps z, -2 eps z, +eps z
and every small update to 8 (bf16) or 11 (fp16) significant bits. So this placement keeps an fp32
copy of what each rank edits, a *master*: the rank's partition of every parameter (4 bytes per
parameter / world size), or the whole parameter while DeepSpeed keeps it gathered on every rank
(persistent parameters, small by definition). :meth:`pieces` hands out the masters as
``Piece.local`` and DeepSpeed's storage (``ds_tensor``, or ``param.data`` when gathered) as
``Piece.compute``, which a MeZO pass fills with ``master + (current scale) z``; see
``masters.py``.

A master changes form with its parameter: when a parameter becomes gathered, the fp32
partitions are all-gathered into a whole master (a collective, taken by every rank in the same
order, since every rank sees the same parameter states); when it is released again, the master
is cut back to the partition. Both moves are exact.

The masters start from the model as DeepSpeed built it, i.e. from the checkpoint rounded to the
compute dtype (``zero.Init`` builds the partitions in that dtype), unlike ``single`` and
``fsdp``, whose fp32 values are the checkpoint's own. Checkpoints and exports carry the fp32
masters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Piece, decays
from mezo_dist.placement.masters import Masters
from mezo_dist.placement.zero3 import Zero3Placement, _partition_geometry, _status


class Zero3MixedPlacement(Zero3Placement):
    """A forward-only bf16/fp16 ZeRO-3 engine plus fp32 masters of what this rank edits."""

    def __init__(self, engine: Any, state: DistState) -> None:
        super().__init__(engine, state)
        # name -> (parameter, master, whole): whole masters are the full flat parameter,
        # others the rank's partition padded to the partition size.
        self._masters: dict[str, tuple[nn.Parameter, torch.Tensor, bool]] = {}
        self._attached: list[Piece] = []

    @torch.no_grad()
    def _master(self, name: str, p: nn.Parameter, whole: bool) -> torch.Tensor:
        held = self._masters.get(name)
        offset, valid = _partition_geometry(p)
        chunk = p.ds_tensor.ds_numel
        if held is None:
            src = p.data.view(-1) if whole else p.ds_tensor.data.view(-1)
            master = src.to(torch.float32, copy=True)
        elif held[2] == whole:
            return held[1]
        elif whole:  # gathered since the last pass: all-gather the fp32 partitions
            master = _all_gather_flat(held[1], p)[: p.ds_numel]
        else:  # released since the last pass: keep this rank's partition
            master = torch.zeros(chunk, dtype=torch.float32, device=held[1].device)
            master[:valid].copy_(held[1][offset : offset + valid])
        self._masters[name] = (p, master, whole)
        return master

    def pieces(self) -> list[Piece]:
        status = _status()
        out: list[Piece] = []
        self._mirrors = []
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ds_status == status.INFLIGHT:
                raise RuntimeError(f"parameter {name} is still being gathered; cannot edit it")
            whole = p.ds_status == status.AVAILABLE
            master = self._master(name, p, whole)
            shape = tuple(p.ds_shape)
            offset, valid = _partition_geometry(p)
            if whole:
                out.append(Piece(name, master, 0, p.ds_numel, decays(shape), shard=False, compute=p.data.view(-1)))
                if valid > 0:
                    self._mirrors.append((p, offset, valid))
            else:
                compute = p.ds_tensor.data.view(-1)[:valid]
                out.append(Piece(name, master[:valid], offset, p.ds_numel, decays(shape), shard=True, compute=compute))
        self._attached = out
        return out

    @torch.no_grad()
    def after_edit(self) -> None:
        if not self.compute_synced:
            Masters.sync(self._attached)
        self.compute_synced = False
        super().after_edit()  # a gathered parameter's slice back into its ds_tensor

    @torch.no_grad()
    def gather_tensor(self, slot: tuple[nn.Module, str]) -> torch.Tensor:
        module, attr = slot
        p = module._parameters.get(attr)
        if p is not None and p.requires_grad:
            self.pieces()  # masters for every trainable parameter, in their current form
            held = next(((m, whole) for q, m, whole in self._masters.values() if q is p), None)
            if held is not None:
                master, whole = held
                full = master if whole else _all_gather_flat(master, p)[: p.ds_numel]
                return full.view(tuple(p.ds_shape))
        return super().gather_tensor(slot)

    def gathered_dtype(self, slot: tuple[nn.Module, str]) -> torch.dtype:
        # What MeZO edits, and gather_tensor returns, of a trainable parameter: its fp32 master.
        p = slot[0]._parameters.get(slot[1])
        return torch.float32 if p is not None and p.requires_grad else super().gathered_dtype(slot)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        sd = super().full_state_dict()  # buffers, and every parameter in the compute dtype
        self.pieces()  # masters for every trainable parameter, in their current form
        for name, (p, master, whole) in self._masters.items():
            full = master if whole else _all_gather_flat(master, p)[: p.ds_numel]
            if sd is not None and name in sd:
                sd[name] = full.view(tuple(p.ds_shape)).to("cpu", copy=True)
        return sd


def with_fp32_masters(placement: Zero3Placement) -> Zero3MixedPlacement:
    """The forward-only bf16/fp16 engine of ``placement`` with fp32 masters for MeZO to edit."""
    mixed = Zero3MixedPlacement(placement.model, placement.state)
    # transformers' global DeepSpeed config must live as long as the engine it built.
    mixed._hf_ds_config = placement._hf_ds_config
    return mixed


def _all_gather_flat(part: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """The partitions of every rank of ``p``'s group, concatenated (padding included)."""
    group = getattr(p, "ds_process_group", None)
    if not dist.is_initialized():
        return part.clone()
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat(parts)
