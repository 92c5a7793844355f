"""Zeroth-order optimizers by name, and the optimizer object a Trainer's loop holds.

``build`` makes the named optimizer on a placement. The registry is ``mezo_dist.zo.optimizers``
where that module exists (MeZO beside FZOO, Sparse MeZO and others, each with MeZO's shape:
``step(closure) -> StepResult``, ``step_index``, optional ``state_dict`` / ``load_state_dict``);
without it only ``mezo`` is known. Arguments left ``None`` take the optimizer's own default (FZOO's
directions and perturbation differ from MeZO's).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mezo_dist.placement.base import Placement
from mezo_dist.zo.step import MeZO


def registry() -> dict[str, Callable[..., Any]]:
    """Name -> optimizer class, from ``mezo_dist.zo.optimizers`` when present."""
    try:
        from mezo_dist.zo.optimizers import OPTIMIZERS  # the optimizers beside MeZO, once merged
    except ImportError:
        return {"mezo": MeZO}
    return dict(OPTIMIZERS)


def build(name: str, placement: Placement, *, lr: float | Callable[[int], float], eps: float, weight_decay: float,
          seed: int, num_directions: int | None = None, perturbation: str | None = None, kernel: str = "auto",
          **hyper: Any) -> Any:
    """The zeroth-order optimizer ``name`` on ``placement``.

    Args:
        name: a key of :func:`registry` (``mezo`` always).
        lr: the learning rate, or a function of the step index returning it.
        eps, weight_decay, seed, kernel: as :class:`mezo_dist.MeZO` takes them.
        num_directions, perturbation: ``None`` keeps the optimizer's default.
        hyper: the optimizer's own hyper-parameters under its constructor's names.
    """
    known = registry()
    if name not in known:
        raise ValueError(f"unknown zo_optimizer {name!r}; this install has {', '.join(sorted(known))}")
    kw: dict[str, Any] = dict(lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, kernel=kernel, **hyper)
    if num_directions is not None:
        kw["num_directions"] = num_directions
    if perturbation is not None:
        kw["perturbation"] = perturbation
    return known[name](placement, **kw)


def optimizer_state(zo: Any) -> dict[str, Any] | None:
    """What a resume needs beyond the parameters and the step (a sparsity threshold, a seed
    history); ``None`` for MeZO, which needs nothing."""
    fn = getattr(zo, "state_dict", None)
    return fn() if callable(fn) else None


def load_optimizer_state(zo: Any, state: dict[str, Any] | None) -> None:
    fn = getattr(zo, "load_state_dict", None)
    if state is not None and callable(fn):
        fn(state)


class ScheduledRate(torch.optim.Optimizer):
    """The optimizer a ``transformers.Trainer`` loop sees: one parameter group whose learning
    rate Trainer's scheduler sets each step, and which the zeroth-order step reads.

    It holds references to the trainable parameters (Trainer and accelerate expect an optimizer
    over them) and no state at all. Its :meth:`step` does nothing: the zeroth-order step needs the
    step's batch, which only ``training_step`` sees, so the update has been applied by the time
    Trainer's loop calls ``optimizer.step()``.
    """

    def __init__(self, params, *, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def step(self, closure=None):  # noqa: D401 - see the class docstring
        return None
