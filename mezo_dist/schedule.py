"""Learning-rate schedules as pure functions of the step index (so resume needs no state)."""

from __future__ import annotations

from typing import Callable


def lr_schedule(kind: str, base_lr: float, max_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """``constant`` or ``linear`` (decay to 0 at ``max_steps``), each after a linear warmup."""

    def lr(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        if kind == "constant":
            return base_lr
        if kind == "linear":
            span = max(1, max_steps - warmup_steps)
            return base_lr * max(0.0, (max_steps - step) / span)
        raise ValueError(f"unknown lr_scheduler_type {kind!r}")

    return lr
