"""The baseline: fine-tuning by backpropagation on the same placements (``--trainer regular``).

Every MeZO claim is a comparison with this: the same model, placement, data order, objective and
metrics, but gradients from a backward pass and AdamW (or SGD). Each engine keeps its own way of
training:

* ``single``: a torch optimizer; with several ranks, ``DistributedDataParallel`` averages the
  gradients (MeZO needs no such wrapper, the baseline does);
* ``fsdp``: a torch optimizer over FSDP2's sharded parameters (the optimizer state is sharded too);
* ``zero3``: DeepSpeed's engine and optimizer from the ``optimizer`` section of the ds_config.

Normalisation: a step's loss is the mean over the *global* batch (tokens or examples), however it
is split over ranks and micro-batches. The weight of every micro-batch is known before its
forward, so one all-reduce gives the global weight first, and each micro-batch backpropagates
``sum / global_weight``, scaled back up by whatever averaging the engine applies. Gradients then
equal those of one process with the whole batch, up to the order of floating-point sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mezo_dist.config import BackpropArguments
from mezo_dist.objectives import MicroBatch
from mezo_dist.placement.base import Placement, decays


@dataclass(frozen=True)
class BackpropResult:
    step: int
    loss: float  # the global mean loss of the step, before the update
    lr: float
    grad_norm: float  # before clipping; nan when the engine does not report it
    skipped: bool = False


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm weights are exempt, as in the reference."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Under ZeRO-3 a partitioned parameter's .shape is empty; ds_shape is the real one.
            (decay if decays(getattr(p, "ds_shape", p.shape)) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], args: BackpropArguments, lr: float) -> torch.optim.Optimizer:
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


class Backprop:
    """One object per run; call :meth:`step` once per optimisation step with its micro-batches."""

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
        world = placement.state.world_size
        if placement.name == "zero3":
            # DeepSpeed built the optimizer from the ds_config; it divides each micro-batch's
            # loss by the accumulation steps and averages gradients over ranks.
            self.engine = placement.model
            self.optimizer = self.engine.optimizer
            self._engine_scale = float(world * self.engine.gradient_accumulation_steps())
            self.ddp = None
        else:
            self.engine = None
            self.optimizer = make_optimizer(param_groups(placement.module, weight_decay), args, lr(0))
            # DDP and FSDP2 average gradients over ranks.
            self._engine_scale = float(world)
            self.ddp = None
            if placement.name == "single" and world > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.ddp = DistributedDataParallel(placement.model)
                placement.runner = self.ddp

    def describe(self) -> str:
        """The optimizer that steps and where its states live, e.g. ``DeepSpeedCPUAdam (states on cpu)``."""
        if self.engine is None:
            return type(self.optimizer).__name__
        # The engine wraps the basic optimizer (the one the ds_config named) in its ZeRO-3 optimizer.
        name = type(getattr(self.engine, "basic_optimizer", None) or self.optimizer).__name__
        offload = self.engine.zero_offload_optimizer()
        device = getattr(offload, "device", None) if offload else None
        device = getattr(device, "value", device)
        return f"{name} (states on {device})" if device and device != "none" else name

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # only steps at the accumulation boundary; counts micro-steps
            return
        if self.ddp is not None and not last:
            with self.ddp.no_sync():  # the gradients are reduced once, with the last micro-batch
                loss.backward()
            return
        loss.backward()

    def _clip(self) -> float:
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for p in self.placement.module.parameters() if p.grad is not None]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
            norm = norm.full_tensor()
        return float(norm)

    def step(self, micro: list[MicroBatch]) -> BackpropResult:
        step, lr = self.step_index, float(self.lr(self.step_index))
        p = self.placement
        p.train()
        self._set_lr(lr)
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
            scaled = loss_sum.float() * (self._engine_scale / global_weight)
            self._backward(scaled, last=k == len(micro) - 1)
        loss = float(p.all_reduce_sum(total.to(device)).cpu()) / global_weight
        grad_norm = self._clip()
        if self.engine is None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return BackpropResult(step=step, loss=loss, lr=lr, grad_norm=grad_norm)
