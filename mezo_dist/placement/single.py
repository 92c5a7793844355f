"""One process, or N ranks that each hold the whole model (data parallel without a wrapper).

No DDP wrapper is needed: MeZO has no gradients to average. Every rank draws the same z, runs
its own micro-batch, and the all-reduced losses give every rank the same update, so the replicas
stay identical without ever exchanging parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Piece, Placement, decays
from mezo_dist.placement.masters import Masters


class SinglePlacement(Placement):
    name = "single"
    replicated = True

    def __init__(self, model: nn.Module, state: DistState, *, masters: Masters | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        """Args:
            autocast_dtype: with ``--precision`` over fp32 parameters, the dtype forwards run in
                (``torch.autocast``); None runs them in the parameters' dtype.
        """
        super().__init__(model, state, masters=masters)
        self.autocast_dtype = autocast_dtype

    def storage_pieces(self) -> list[Piece]:
        out = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            out.append(
                Piece(
                    name=name,
                    local=p.data.view(-1),
                    offset=0,
                    full_numel=p.numel(),
                    decay=decays(p.shape),
                    shard=False,
                )
            )
        return out

    def forward(self, **batch: Any) -> Any:
        if self.autocast_dtype is not None:
            with torch.autocast(self.state.device.type, dtype=self.autocast_dtype):
                return super().forward(**batch)
        return super().forward(**batch)

    def training(self, args, *, lr: float, weight_decay: float):
        from mezo_dist.placement.training import DDPTraining, TorchTraining

        # Replicas on several ranks need their gradients averaged; one process does not.
        kind = DDPTraining if self.state.world_size > 1 else TorchTraining
        return kind(self, args, lr=lr, weight_decay=weight_decay)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.state.is_main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def build_single(
    name_or_path: str, state, *, dtype: torch.dtype, trust_remote_code: bool = False, lora=None,
    compute_dtype: torch.dtype | None = None,
) -> SinglePlacement:
    """Every rank loads the whole model onto its device (with LoRA adapters if ``lora.lora``).

    ``compute_dtype`` (bf16/fp16 with fp32 ``dtype``): forwards run under ``torch.autocast``,
    while the parameters MeZO edits stay fp32.
    """
    from mezo_dist.models import apply_lora, load_pretrained

    model = load_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    model = apply_lora(model, lora).to(state.device)
    if compute_dtype is None:
        return SinglePlacement(model, state)
    return SinglePlacement(model, state, masters=Masters(), autocast_dtype=compute_dtype)
