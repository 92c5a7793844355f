"""How each engine trains by backpropagation (the ``--trainer regular`` baseline), behind one
interface, so that ``backprop.py`` never asks which placement it has.

A :class:`Training` backpropagates a micro-batch's loss, clips and reports the gradient norm, and
applies the optimizer step. :meth:`Placement.training` picks one:

* :class:`TorchTraining`: a torch optimizer over the placement's parameters; FSDP2 averages the
  gradients over ranks inside its backward (the optimizer state is sharded too), one process
  needs no averaging. :class:`DDPTraining` adds ``DistributedDataParallel`` for the ``single``
  backend on several ranks (MeZO needs no such wrapper, the baseline does);
* :class:`DeepSpeedTraining`: DeepSpeed's engine and the optimizer it built from the ds_config.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mezo_dist.placement.base import Placement, decays


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm weights are exempt, as in the reference."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Under ZeRO-3 a partitioned parameter's .shape is empty; ds_shape is the real one.
            (decay if decays(getattr(p, "ds_shape", p.shape)) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], args: Any, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups`` from the baseline's settings (``config.BackpropArguments``)."""
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


class Training:
    """What the baseline needs of an engine; ``loss_scale`` is what the engine divides a
    micro-batch's loss by (its averaging over ranks and micro-steps), for the step to undo."""

    optimizer: Any
    loss_scale: float = 1.0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def describe(self) -> str:
        """The optimizer that steps, e.g. ``AdamW``."""
        return type(self.optimizer).__name__

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backpropagate one micro-batch's loss (``last``: the step's last micro-batch)."""
        raise NotImplementedError

    def clip(self) -> float:
        """Clip the gradients as configured; their norm before clipping (nan when unknown)."""
        raise NotImplementedError

    def step(self) -> None:
        """Apply the optimizer step once the step's micro-batches are backpropagated."""
        raise NotImplementedError


class TorchTraining(Training):
    """A torch optimizer over the placement's trainable parameters."""

    def __init__(self, placement: Placement, args: Any, *, lr: float, weight_decay: float) -> None:
        self.placement, self.args = placement, args
        self.optimizer = make_optimizer(param_groups(placement.module, weight_decay), args, lr)
        # What the engine divides a loss by: DDP and FSDP2 average gradients over ranks.
        self.loss_scale = float(placement.state.world_size)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def clip(self) -> float:
        # --max_grad_norm 0: no clipping, the norm is still reported.
        params = [p for p in self.placement.module.parameters() if p.grad is not None]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DDPTraining(TorchTraining):
    """Replicas on several ranks: ``DistributedDataParallel`` averages their gradients."""

    def __init__(self, placement: Placement, args: Any, *, lr: float, weight_decay: float) -> None:
        super().__init__(placement, args, lr=lr, weight_decay=weight_decay)
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(placement.model)
        placement.runner = self.ddp

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if not last:
            with self.ddp.no_sync():  # the gradients are reduced once, with the last micro-batch
                loss.backward()
            return
        loss.backward()


class DeepSpeedTraining(Training):
    """DeepSpeed's engine and the optimizer it built from the ds_config."""

    def __init__(self, placement: Placement) -> None:
        self.engine = placement.model
        self.optimizer = self.engine.optimizer
        # DeepSpeed divides each micro-batch's loss by the accumulation steps and averages
        # gradients over ranks.
        self.loss_scale = float(placement.state.world_size * self.engine.gradient_accumulation_steps())

    def describe(self) -> str:
        """The optimizer that steps and where its states live, e.g. ``DeepSpeedCPUAdam (states on cpu)``."""
        # The engine wraps the basic optimizer (the one the ds_config named) in its ZeRO-3 optimizer.
        name = type(getattr(self.engine, "basic_optimizer", None) or self.optimizer).__name__
        offload = self.engine.zero_offload_optimizer()
        device = getattr(offload, "device", None) if offload else None
        device = getattr(device, "value", device)
        return f"{name} (states on {device})" if device and device != "none" else name

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)
        self.engine.step()  # only steps at the accumulation boundary; counts micro-steps

    def clip(self) -> float:
        # The engine clips itself (gradient_clipping of the ds_config) and reports the norm.
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self) -> None:
        pass  # backward() of the last micro-batch has stepped the engine
