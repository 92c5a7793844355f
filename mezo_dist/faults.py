"""Test-only fault injection, switched on by environment variables that no user sets.

The fault-tolerance tests need a rank to die at a chosen moment, or a loss to turn NaN, inside a
real launcher run. Nothing in the loop, the objectives or the checkpoint writer knows of them:
:func:`install` reads the variables once and attaches a callback to the hooks the run exposes
(``train.RunHooks``) for each one that is set; with none set it attaches nothing.

* ``MEZO_DIST_TEST_KILL=<rank>:<step>[:<marker>]``: that rank SIGKILLs itself as step ``<step>``
  starts; with a marker file, only while the marker does not exist (it is created first), so a
  restarted run goes through.
* ``MEZO_DIST_TEST_DIE_IN_SAVE=<rank>``: that rank SIGKILLs itself mid-checkpoint (its file
  written, the checkpoint not yet published).
* ``MEZO_DIST_TEST_NAN_STEPS=<step>,<step>``: the minus-side loss of those steps is NaN.
* ``MEZO_DIST_TEST_DRIFT=<rank>:<step>``: that rank's replica is nudged after that step.
* ``MEZO_DIST_TEST_STALL=<rank>:<step>:<marker>``: that rank creates the marker and sleeps for a
  minute as step ``<step>`` starts, so the other ranks wait for it inside a collective.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mezo_dist.objectives import MicroBatch
    from mezo_dist.train import RunHooks


def install(hooks: RunHooks, rank: int) -> RunHooks:
    """Attach the faults the environment asks for on this rank to ``hooks``; returns ``hooks``."""
    env = os.environ.get
    if env("MEZO_DIST_TEST_KILL"):
        hooks.before_step.append(_kill(env("MEZO_DIST_TEST_KILL"), rank))
    if env("MEZO_DIST_TEST_STALL"):
        hooks.before_step.append(_stall(env("MEZO_DIST_TEST_STALL"), rank))
    steps = {int(s) for s in env("MEZO_DIST_TEST_NAN_STEPS", "").split(",") if s.strip()}
    if steps:
        hooks.micro_batches.append(lambda step, micro: _poisoned(micro) if step in steps else micro)
    if env("MEZO_DIST_TEST_DRIFT"):
        hooks.after_step.append(_drift(env("MEZO_DIST_TEST_DRIFT"), rank))
    target = env("MEZO_DIST_TEST_DIE_IN_SAVE")
    if target is not None and int(target) == rank:
        hooks.checkpoint_written.append(_die)
    return hooks


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill(spec: str, rank: int) -> Callable[[int], None]:
    parts = spec.split(":")

    def at(step: int) -> None:
        if int(parts[0]) != rank or int(parts[1]) != step:
            return
        if len(parts) > 2:
            marker = Path(parts[2])
            if marker.exists():
                return
            marker.write_text("killed\n")
        _die()

    return at


def _stall(spec: str, rank: int) -> Callable[[int], None]:
    r, s, marker = spec.split(":", 2)

    def at(step: int) -> None:
        if (int(r), int(s)) == (rank, step):
            import time

            Path(marker).write_text("stalled\n")
            time.sleep(60)

    return at


def _poisoned(micro: list[MicroBatch]) -> list[MicroBatch]:
    """The step's micro-batches with their second forward (the minus side) NaN."""
    from mezo_dist.objectives import MicroBatch

    def second_nan(loss: Callable[[], Any]) -> Callable[[], Any]:
        calls = {"n": 0}

        def wrapped():
            total, weight = loss()
            calls["n"] += 1
            return (total * float("nan"), weight) if calls["n"] == 2 else (total, weight)

        return wrapped

    return [MicroBatch(loss=second_nan(mb.loss), weight=mb.weight) for mb in micro]


def _drift(spec: str, rank: int) -> Callable[[int, Any], None]:
    """Nudge this rank's first parameter after the step (a replica drifting apart)."""
    r, s = (int(x) for x in spec.split(":"))

    def after(step: int, placement: Any) -> None:
        if (r, s) == (rank, step):
            import torch

            with torch.no_grad():
                placement.pieces()[0].local.add_(1e-3)

    return after
