"""The baseline: fine-tuning by backpropagation on the same placements (``--trainer regular``).

Every MeZO claim is a comparison with this: the same model, placement, data order, objective and
metrics, but gradients from a backward pass and AdamW (or SGD). Each engine keeps its own way of
training (DDP over replicas, a torch optimizer over FSDP2's shards, DeepSpeed's engine and the
optimizer of the ds_config): :meth:`Placement.training` hands it over behind one interface
(``placement/training.py``), so this module never asks which placement it has.

Normalisation: a step's loss is the mean over the *global* batch (tokens or examples), however it
is split over ranks and micro-batches. The weight of every micro-batch is known before its
forward, so one all-reduce gives the global weight first, and each micro-batch backpropagates
``sum / global_weight``, scaled back up by whatever averaging the engine applies. Gradients then
equal those of one process with the whole batch, up to the order of floating-point sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from mezo_dist import trajectory
from mezo_dist.config import BackpropArguments
from mezo_dist.objectives import MicroBatch
from mezo_dist.placement.base import Placement
from mezo_dist.trainer import StepRecord


@dataclass(frozen=True)
class BackpropResult:
    step: int
    loss: float  # the global mean loss of the step, before the update
    lr: float
    grad_norm: float  # before clipping; nan when the engine does not report it
    skipped: bool = False


class Backprop:
    """One object per run; call :meth:`step` once per optimisation step with its micro-batches.

    A :class:`mezo_dist.trainer.Trainer`: :meth:`train_step` is the loop's step."""

    def __init__(
        self,
        placement: Placement,
        args: BackpropArguments,
        *,
        lr: Callable[[int], float],
        weight_decay: float = 0.0,
    ) -> None:
        self.placement, self.args, self.lr = placement, args, lr
        self.step_index = 0
        self.training = placement.training(args, lr=lr(0), weight_decay=weight_decay)

    def describe(self) -> str:
        """The optimizer that steps and where its states live, e.g. ``DeepSpeedCPUAdam (states on cpu)``."""
        return self.training.describe()

    def step(self, micro: list[MicroBatch]) -> BackpropResult:
        step, lr = self.step_index, float(self.lr(self.step_index))
        p = self.placement
        p.train()
        self.training.set_lr(lr)
        device = p.state.device
        weight = p.all_reduce_sum(torch.tensor([sum(mb.weight for mb in micro)], dtype=torch.float64, device=device))
        global_weight = float(weight[0])
        if global_weight <= 0:
            raise ValueError(f"step {step} has no loss terms (global weight {global_weight})")
        total = torch.zeros((), dtype=torch.float64)
        for k, mb in enumerate(micro):
            loss_sum, _ = mb.loss()
            total += loss_sum.detach().double().cpu()
            # The engine averages over ranks (and DeepSpeed over micro-steps): undo it, so the
            # gradient is that of the global mean.
            scaled = loss_sum.float() * (self.training.loss_scale / global_weight)
            self.training.backward(scaled, last=k == len(micro) - 1)
        loss = float(p.all_reduce_sum(total.to(device)).cpu()) / global_weight
        grad_norm = self.training.clip()
        self.training.step()
        self.step_index += 1
        return BackpropResult(step=step, loss=loss, lr=lr, grad_norm=grad_norm)

    # -- the Trainer protocol ----------------------------------------------------------------

    def train_step(self, micro: list[MicroBatch]) -> StepRecord:
        res = self.step(micro)
        return StepRecord(step=res.step, loss=res.loss, row=trajectory.backprop_row(res),
                          scalars={"train/loss": res.loss, "train/grad_norm": res.grad_norm, "train/lr": res.lr},
                          progress={"loss": res.loss}, skipped=res.skipped)

    def state_dict(self) -> dict[str, Any] | None:
        return None  # the optimizer state is not checkpointed: regular runs do not resume

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            raise ValueError("a backprop run does not resume an optimizer state")

    def summary(self) -> dict[str, Any]:
        return {"optimizer": self.describe()}
