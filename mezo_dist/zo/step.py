"""The MeZO step: zeroth-order SGD with the SPSA estimate, done in place.

Per step, with z drawn from the step's seed (never stored whole):
    theta += eps z        -> L+      (pass 1 over the parameters)
    theta -= 2 eps z      -> L-      (pass 2)
    g = (L+ - L-) / (2 eps)          (one all-reduce of [sum L+, sum L-, weight])
    theta = (theta + eps z)(1 - lr wd) - lr g z   (pass 3: restore and update fused)
Weight decay skips 1-D parameters (biases, norm weights), as in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from mezo_dist.placement.base import Piece, Placement
from mezo_dist.zo import noise

LossOut = Union[torch.Tensor, float, tuple]
Closure = Callable[[], LossOut]


@dataclass(frozen=True)
class StepResult:
    step: int
    seed: int
    projected_grad: float
    loss: float  # mean of L+ and L-: the estimate of the loss at theta
    loss_plus: float
    loss_minus: float
    lr: float
    skipped: bool  # True when a loss was not finite and the update was not applied


def _split(out: LossOut) -> tuple[torch.Tensor, torch.Tensor]:
    """A closure returns a mean loss, or (sum of losses, weight) for exact weighted averaging."""
    if isinstance(out, tuple):
        total, weight = out
    else:
        total, weight = out, 1.0
    total = torch.as_tensor(total).detach().reshape(()).to(torch.float64)
    weight = torch.as_tensor(weight).detach().reshape(()).to(torch.float64)
    return total, weight


class MeZO:
    """One object per run; call :meth:`step` once per optimisation step.

    Args:
        placement: where the model lives; see :func:`mezo_dist.placement.wrap` to make one from a
            plain module, an FSDP2-sharded module or a DeepSpeed engine.
        lr: learning rate, or a function of the step index returning it.
        eps: perturbation scale.
        weight_decay: decoupled into the update as ``lr * wd * theta`` (matrices only).
        seed: the run seed; step ``t`` uses ``noise.step_seed(seed, t)``.
    """

    def __init__(
        self,
        placement: Placement,
        *,
        lr: float | Callable[[int], float],
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.placement = placement
        self.lr = lr if callable(lr) else (lambda _step, _lr=float(lr): _lr)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.step_index = 0
        self._buffers: dict[torch.device, torch.Tensor] = {}

    # -- passes over the parameters ----------------------------------------------------------

    def _buffer(self, device: torch.device, numel: int) -> torch.Tensor:
        need = min(noise.BLOCK, numel)
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < need:
            buf = torch.empty(max(need, 1), dtype=torch.float32, device=device)
            self._buffers[device] = buf
        return buf

    @torch.no_grad()
    def _pass(self, seed: int, fn: Callable[[torch.Tensor, torch.Tensor, Piece], None]) -> None:
        for piece in self.placement.pieces():
            if piece.local.numel() == 0:
                continue
            key = noise.param_key(seed, piece.name)
            device = piece.local.device
            buf = self._buffer(device, piece.full_numel)
            blocks = noise.iter_blocks(key, piece.offset, piece.local.numel(), piece.full_numel, device=device, buffer=buf)
            for start, z in blocks:
                fn(piece.local[start : start + z.numel()], z, piece)
        self.placement.after_edit()

    def perturb(self, seed: int, scale: float) -> None:
        """theta += scale * z(seed) on every trainable element this rank holds."""
        self._pass(seed, lambda x, z, _p: x.add_(z, alpha=scale))

    def _restore_and_update(self, seed: int, lr: float, g: float) -> None:
        eps, decay = self.eps, 1.0 - lr * self.weight_decay

        def fn(x: torch.Tensor, z: torch.Tensor, piece: Piece) -> None:
            x.add_(z, alpha=eps)
            if piece.decay and decay != 1.0:
                x.mul_(decay)
            if g != 0.0 and lr != 0.0:
                x.add_(z, alpha=-lr * g)

        self._pass(seed, fn)

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure) -> StepResult:
        """Run one MeZO step; ``closure`` runs the forward on this rank's micro-batch.

        The closure returns a scalar loss (ranks weighted equally) or ``(loss_sum, weight)``
        (the global loss is ``sum(loss_sum) / sum(weight)`` over ranks).
        """
        step = self.step_index
        seed = noise.step_seed(self.seed, step)
        lr = float(self.lr(step))
        self.placement.eval()

        self.perturb(seed, self.eps)
        plus, weight = _split(closure())
        self.perturb(seed, -2.0 * self.eps)
        minus, _ = _split(closure())

        # The only collective of the step outside the engine's gathers.
        stats = torch.stack([plus, minus, weight]).to(self._reduce_device())
        stats = self.placement.all_reduce_sum(stats).cpu()
        loss_plus = float(stats[0] / stats[2])
        loss_minus = float(stats[1] / stats[2])
        g = (loss_plus - loss_minus) / (2.0 * self.eps)

        skipped = not (math.isfinite(loss_plus) and math.isfinite(loss_minus) and math.isfinite(g))
        if skipped:
            self.perturb(seed, self.eps)  # back to theta; no update
        else:
            self._restore_and_update(seed, lr, g)
        self.step_index += 1
        return StepResult(
            step=step,
            seed=seed,
            projected_grad=g if not skipped else float("nan"),
            loss=(loss_plus + loss_minus) / 2.0,
            loss_plus=loss_plus,
            loss_minus=loss_minus,
            lr=lr,
            skipped=skipped,
        )

    @torch.no_grad()
    def replay(self, seed: int, projected_grad: float, lr: float, *, skipped: bool = False) -> None:
        """Apply a logged step without its forwards: the same passes in the same order as
        :meth:`step`, so the parameters come out bit for bit as training left them."""
        self.perturb(seed, self.eps)
        self.perturb(seed, -2.0 * self.eps)
        if skipped:
            self.perturb(seed, self.eps)
        else:
            self._restore_and_update(seed, lr, projected_grad)
        self.step_index += 1

    def _reduce_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        return self.placement.state.device

