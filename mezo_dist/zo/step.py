"""The MeZO step: zeroth-order SGD with the SPSA estimate, done in place.

Per step, with z drawn from the step's seed (never stored whole):
    theta += eps z        -> L+      (pass 1 over the parameters)
    theta -= 2 eps z      -> L-      (pass 2)
    g = (L+ - L-) / (2 eps)          (one all-reduce of [sum L+, sum L-, weight])
    theta = (theta + eps z)(1 - lr wd) - lr g z   (pass 3: restore and update fused)
Weight decay skips 1-D parameters (biases, norm weights), as in the reference.

With ``num_directions`` n > 1 the estimate is averaged over n directions measured at the same
theta: each direction is perturbed, measured and restored in turn, the losses of all of them
are reduced in one all-reduce, and the update applies (1/n) sum_k g_k z_k (the last direction's
restore stays fused with its update; the others cost one more pass each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from mezo_dist import trajectory
from mezo_dist.objectives import MicroBatch, summed
from mezo_dist.placement.base import Placement
from mezo_dist.trainer import StepRecord
from mezo_dist.zo import noise, passes

LossOut = Union[torch.Tensor, float, tuple]
Closure = Callable[[], LossOut]


@dataclass(frozen=True)
class StepResult:
    step: int
    step_seed: int  # the seed of the first direction's z (not the run seed)
    projected_grad: float
    loss: float  # mean of L+ and L-: the estimate of the loss at theta
    loss_plus: float
    loss_minus: float
    lr: float
    skipped: bool  # True when a loss was not finite and the update was not applied
    # (seed, projected gradient) of every direction; one entry unless num_directions > 1.
    directions: tuple[tuple[int, float], ...] = ()


def split_loss(out: LossOut) -> tuple[torch.Tensor, torch.Tensor]:
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
        num_directions: perturbations averaged per step (n-SPSA); each costs two forwards.
        perturbation: ``gaussian`` (the paper's z) or ``rademacher`` (z = +-1, cheaper to draw).
        kernel: how z is drawn and applied: ``auto`` (= ``compiled``: the hash stream by one
            torch.compile kernel, on every device), ``compiled``, ``blocks`` or ``triton``; see
            ``zo/passes.py``.
        precision: ``bf16``/``fp16`` when the placement runs low-precision forwards over fp32
            values, written to every trajectory row (a replay rebuilds the same rounding).

    A :class:`mezo_dist.trainer.Trainer`: :meth:`train_step` is the training loop's step.
    """

    def __init__(
        self,
        placement: Placement,
        *,
        lr: float | Callable[[int], float],
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        num_directions: int = 1,
        perturbation: str = "gaussian",
        kernel: str = "auto",
        precision: str | None = None,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if perturbation not in noise.KINDS:
            raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {', '.join(noise.KINDS)}")
        self.perturbation = perturbation
        self.kernel = passes.resolve_kernel(kernel, placement.state.device)
        if num_directions < 1:
            raise ValueError(f"num_directions must be >= 1, got {num_directions}")
        self.num_directions = int(num_directions)
        self.placement = placement
        self.lr = lr if callable(lr) else (lambda _step, _lr=float(lr): _lr)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.run_seed = int(seed)
        self.precision = precision
        self.step_index = 0
        self._scratch = passes.Scratch()
        # The perturbation the model holds now, as (seed, scale): pieces with fp32 masters keep
        # it out of the masters, in their compute storage (see zo/passes.py).
        self._perturbed: tuple[int, float] = (0, 0.0)
        # An elementwise factor on z in every pass (Sparse MeZO sets it, see zo/sparse.py).
        self.mask: passes.Mask | None = None

    @property
    def noise_stream(self) -> str:
        """``hash``, ``blocks`` or ``philox``: which stream this run's z come from (replay needs the same)."""
        return passes.stream_name(self.kernel, self.perturbation)

    # -- passes over the parameters ----------------------------------------------------------

    @torch.no_grad()
    def _pass(self, seed: int, fn: passes.Op) -> None:
        """One pass over this rank's pieces; ``fn`` is an :class:`passes.Affine` (fused on the
        compiled and triton paths) or a callable ``fn(x, z, piece)`` given materialised slices of z."""
        held_seed, offset = self._perturbed
        if offset != 0.0 and held_seed != seed:
            raise RuntimeError(f"a pass with seed {seed} while the perturbation of seed {held_seed} is applied")
        wrote = passes.run_pass(self.placement.pieces(), seed, fn, kind=self.perturbation, kernel=self.kernel,
                                scratch=self._scratch, offset=offset, mask=self.mask)
        if isinstance(fn, passes.Affine):
            self._perturbed = (seed, offset + fn.a)
        self.placement.after_edit(compute_written=wrote)

    def perturb(self, seed: int, scale: float) -> None:
        """theta += scale * z(seed) on every trainable element this rank holds."""
        self._pass(seed, passes.Affine(scale))

    def _update(self, seed: int, step_size: float) -> None:
        """theta -= step_size * z(seed): the update of a direction that was already restored."""
        self._pass(seed, lambda x, z, _p: x.add_(z, alpha=-step_size))

    def _restore_and_update(self, seed: int, lr: float, g: float) -> None:
        # (theta + eps z)(1 - lr wd) - lr g z, decay on matrices only: one pass.
        step = -lr * g if (g != 0.0 and lr != 0.0) else 0.0
        self._pass(seed, passes.Affine(self.eps, 1.0 - lr * self.weight_decay, step))

    # -- the step ------------------------------------------------------------------------------

    def direction_seeds(self, step: int) -> list[int]:
        """The seeds of a step's directions; the first is ``noise.step_seed(seed, step)``."""
        first = noise.step_seed(self.run_seed, step)
        return [first] + [noise.direction_seed(first, k) for k in range(1, self.num_directions)]

    @torch.no_grad()
    def step(self, closure: Closure) -> StepResult:
        """Run one MeZO step; ``closure`` runs the forward on this rank's micro-batch.

        The closure returns a scalar loss (ranks weighted equally) or ``(loss_sum, weight)``
        (the global loss is ``sum(loss_sum) / sum(weight)`` over ranks).
        """
        step = self.step_index
        seeds = self.direction_seeds(step)
        lr = float(self.lr(step))
        self.placement.eval()

        measured: list[torch.Tensor] = []
        weight = torch.zeros((), dtype=torch.float64)
        for k, seed in enumerate(seeds):
            self.perturb(seed, self.eps)
            plus, weight = split_loss(closure())
            self.perturb(seed, -2.0 * self.eps)
            minus, _ = split_loss(closure())
            measured += [plus, minus]
            if k < len(seeds) - 1:
                self.perturb(seed, self.eps)  # back to theta for the next direction

        # The only collective of the step outside the engine's gathers.
        stats = torch.stack([*measured, weight]).to(self._reduce_device())
        stats = self.placement.all_reduce_sum(stats).cpu()
        losses = [float(v / stats[-1]) for v in stats[:-1]]
        grads = [(losses[2 * k] - losses[2 * k + 1]) / (2.0 * self.eps) for k in range(len(seeds))]

        skipped = not all(math.isfinite(v) for v in losses + grads)
        if skipped:
            self.perturb(seeds[-1], self.eps)  # back to theta; no update
        else:
            self._apply(seeds, grads, lr)
        self.step_index += 1
        loss_plus = sum(losses[0::2]) / len(seeds)
        loss_minus = sum(losses[1::2]) / len(seeds)
        g_mean = sum(grads) / len(grads)
        return StepResult(
            step=step,
            step_seed=seeds[0],
            projected_grad=g_mean if not skipped else float("nan"),
            loss=(loss_plus + loss_minus) / 2.0,
            loss_plus=loss_plus,
            loss_minus=loss_minus,
            lr=lr,
            skipped=skipped,
            directions=tuple(zip(seeds, grads)),
        )

    def _apply(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Restore the last direction and apply the averaged update (weight decay once)."""
        n = len(seeds)
        self._restore_and_update(seeds[-1], lr, grads[-1] / n)
        for seed, g in zip(seeds[:-1], grads[:-1]):
            if g != 0.0 and lr != 0.0:
                self._update(seed, lr * g / n)

    @torch.no_grad()
    def replay(self, step_seed: int, projected_grad: float, lr: float, *, skipped: bool = False,
               directions: list[tuple[int, float]] | None = None) -> None:
        """Apply a logged step without its forwards: the same passes in the same order as
        :meth:`step`, so the parameters come out bit for bit as training left them.

        ``directions`` holds every (seed, projected gradient) of a step with several directions.
        """
        pairs = [(int(s), float(g)) for s, g in directions] if directions else [(step_seed, projected_grad)]
        for k, (s, _g) in enumerate(pairs):
            self.perturb(s, self.eps)
            self.perturb(s, -2.0 * self.eps)
            if k < len(pairs) - 1:
                self.perturb(s, self.eps)
        if skipped:
            self.perturb(pairs[-1][0], self.eps)
        else:
            self._apply([s for s, _ in pairs], [g for _, g in pairs], lr)
        self.step_index += 1

    def replay_row(self, row: dict[str, Any]) -> None:
        """:meth:`replay` of one checked trajectory row (its eps, wd and perturbation set by the caller)."""
        self.replay(**trajectory.replay_args(row))

    # -- the Trainer protocol ----------------------------------------------------------------

    def train_step(self, micro: list[MicroBatch]) -> StepRecord:
        """:meth:`step` on one closure over this rank's micro-batches (one perturbation, many
        forwards), as the training loop logs it."""
        res = self.step(summed(micro))
        return StepRecord(
            step=res.step, loss=res.loss, row=trajectory.zo_row(res, self, self.precision),
            scalars={"train/loss": res.loss, "train/projected_grad": res.projected_grad, "train/lr": res.lr},
            progress={"loss": res.loss, "g": res.projected_grad}, skipped=res.skipped,
            why_skipped=f"non-finite loss ({res.loss_plus}, {res.loss_minus})",
        )

    def state_dict(self) -> dict[str, Any] | None:
        """What a resume needs besides the parameters and the step: nothing for MeZO itself
        (Sparse MeZO's thresholds, AdaMeZO's history)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # MeZO's own state is the parameters and the step

    def summary(self) -> dict[str, Any]:
        return {}

    def _reduce_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        return self.placement.state.device

