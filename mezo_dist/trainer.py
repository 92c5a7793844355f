"""The trainer protocol: what the loop in ``train.py`` asks of MeZO, of every ``--zo_optimizer``
and of the backpropagation baseline, so that it never asks which one it runs.

A trainer takes one step's micro-batches (``objectives.MicroBatch``: this rank's share of the
global batch) and returns one :class:`StepRecord`: the trajectory row, the scalars to log, and
whether the update was skipped. What a resume needs beyond the parameters is its
:meth:`Trainer.state_dict`; what ``train_results.json`` adds about it is :meth:`Trainer.summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mezo_dist.objectives import MicroBatch


@dataclass(frozen=True)
class StepRecord:
    """One step as the loop logs it."""

    step: int
    loss: float
    row: dict[str, Any]  # the trajectory row (``trajectory.zo_row`` or ``trajectory.backprop_row``)
    scalars: dict[str, float]  # ``train/...`` metrics of the step
    progress: dict[str, float] = field(default_factory=dict)  # what the progress bar shows
    skipped: bool = False  # a loss was not finite and no update was applied
    why_skipped: str = ""  # said in the log line of a skipped step


class Trainer(Protocol):
    step_index: int  # the next step; set by a resume

    def train_step(self, micro: list[MicroBatch]) -> StepRecord:
        """Take step ``step_index`` on this rank's micro-batches (collective)."""
        ...

    def state_dict(self) -> dict[str, Any] | None:
        """What a resume needs besides the parameters and the step (None: nothing)."""
        ...

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        ...

    def summary(self) -> dict[str, Any]:
        """What ``train_results.json`` says about this trainer beyond the run's own fields."""
        ...
