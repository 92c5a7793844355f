"""One process, or N ranks that each hold the whole model (data parallel without a wrapper).

No DDP wrapper is needed: MeZO has no gradients to average. Every rank draws the same z, runs
its own micro-batch, and the all-reduced losses give every rank the same update, so the replicas
stay identical without ever exchanging parameters.
"""

from __future__ import annotations

import torch

from mezo_dist.placement.base import Piece, Placement, decays
from mezo_dist.placement.masters import Masters


class SinglePlacement(Placement):
    name = "single"
    replicated = True

    def pieces(self) -> list[Piece]:
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
        if self.masters is not None:  # --precision over fp32 values: MeZO edits fp32 masters
            out = self._attached = self.masters.attach(out)
        return out

    def after_edit(self) -> None:
        if self.masters is not None and not self.compute_synced:
            Masters.sync(self._attached)
        self.compute_synced = False

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
    placement = SinglePlacement(model, state)
    if compute_dtype is not None:
        placement.autocast_dtype, placement.masters = compute_dtype, Masters()
    return placement
