"""Test-only fault injection, switched on by environment variables that no user sets.

The fault-tolerance tests need a rank to die at a chosen moment, or a loss to turn NaN, inside a
real launcher run. Each hook is one environment lookup when unset.

* ``MEZO_DIST_TEST_KILL=<rank>:<step>[:<marker>]``: that rank SIGKILLs itself as step ``<step>``
  starts; with a marker file, only while the marker does not exist (it is created first), so a
  restarted run goes through.
* ``MEZO_DIST_TEST_DIE_IN_SAVE=<rank>``: that rank SIGKILLs itself mid-checkpoint.
* ``MEZO_DIST_TEST_NAN_STEPS=<step>,<step>``: the minus-side loss of those steps is NaN.
* ``MEZO_DIST_TEST_DRIFT=<rank>:<step>``: that rank's replica is nudged after that step.
* ``MEZO_DIST_TEST_STALL=<rank>:<step>:<marker>``: that rank creates the marker and sleeps for a
  minute as step ``<step>`` starts, so the other ranks wait for it inside a collective.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def maybe_kill(rank: int, step: int) -> None:
    spec = os.environ.get("MEZO_DIST_TEST_KILL")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != rank or int(parts[1]) != step:
        return
    if len(parts) > 2:
        marker = Path(parts[2])
        if marker.exists():
            return
        marker.write_text("killed\n")
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall(rank: int, step: int) -> None:
    spec = os.environ.get("MEZO_DIST_TEST_STALL")
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if (int(r), int(s)) == (rank, step):
        import time

        Path(marker).write_text("stalled\n")
        time.sleep(60)


def nan_steps() -> set[int]:
    spec = os.environ.get("MEZO_DIST_TEST_NAN_STEPS", "")
    return {int(s) for s in spec.split(",") if s.strip()}


def maybe_die_in_save(rank: int) -> None:
    target = os.environ.get("MEZO_DIST_TEST_DIE_IN_SAVE")
    if target is not None and int(target) == rank:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_drift(rank: int, step: int, placement) -> None:
    """``MEZO_DIST_TEST_DRIFT=<rank>:<step>``: nudge that rank's first parameter after the step."""
    spec = os.environ.get("MEZO_DIST_TEST_DRIFT")
    if not spec:
        return
    r, s = (int(x) for x in spec.split(":"))
    if (r, s) == (rank, step):
        import torch

        with torch.no_grad():
            placement.pieces()[0].local.add_(1e-3)
