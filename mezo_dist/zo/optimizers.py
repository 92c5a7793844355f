"""The zeroth-order optimizers by name (``--zo_optimizer``), and what each writes to a trajectory row.

Every optimizer has MeZO's public shape: ``step(closure) -> StepResult``, ``replay(...)`` and
``replay_row(row)`` of a logged step, ``step_index``, ``noise_stream``. Beyond MeZO's row, a row
of another optimizer holds its name, its hyper-parameters (:meth:`hyper`) and its per-step
scalars (:meth:`row_fields`): exactly what :meth:`replay_row` needs to rebuild the parameters bit
for bit from the file alone. The row itself, and what an absent key means, is
``mezo_dist/trajectory.py``.

| name | module | forwards / step | passes / step | memory over inference |
|---|---|---|---|---|
| mezo | step.py | 2n | 4n - 1 | none |
| fzoo | fzoo.py | N + 1 | 3N - 1 | none |
| sparse | sparse.py | 2n | 4n - 1 (+ mask, threshold counts) | 1 bit / element / world |
| adamezo | adaptive.py | 2 | 3, the last drawing h z | none (h seeds, 2 block buffers) |
"""

from __future__ import annotations

from typing import Any

from mezo_dist import trajectory
from mezo_dist.trajectory import HYPER_FLAGS
from mezo_dist.zo.adaptive import AdaMeZO
from mezo_dist.zo.fzoo import FZOO
from mezo_dist.zo.sparse import SparseMeZO
from mezo_dist.zo.step import MeZO

OPTIMIZERS: dict[str, type[MeZO]] = {"mezo": MeZO, "fzoo": FZOO, "sparse": SparseMeZO, "adamezo": AdaMeZO}
NAMES = tuple(OPTIMIZERS)


def hyper_from_args(name: str, zo_args: Any) -> dict[str, Any]:
    """The optimizer's hyper-parameters from the run's ZOArguments, under their row names."""
    return {key: getattr(zo_args, flag) for key, flag in HYPER_FLAGS[name].items()}


def build(name: str, placement, **kw: Any) -> MeZO:
    """The optimizer ``name`` on ``placement``; ``kw`` are MeZO's arguments plus its hyper-parameters."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown zeroth-order optimizer {name!r}; choose one of {', '.join(NAMES)}")
    return OPTIMIZERS[name](placement, **kw)


def state_dict(zo: MeZO) -> dict[str, Any] | None:
    """What a resume needs besides the parameters and the step (None: nothing)."""
    return zo.state_dict()


def load_state_dict(zo: MeZO, state: dict[str, Any] | None) -> None:
    """Give ``zo`` the state a checkpoint saved (None: the checkpoint holds none)."""
    if state is not None:
        zo.load_state_dict(state)


def for_replay(placement, row: dict[str, Any], *, kernel: str) -> MeZO:
    """The optimizer that wrote ``row``, set up to replay the run (lr comes from each row)."""
    name = trajectory.value(row, "optimizer")
    hyper = {key: row[key] for key in HYPER_FLAGS[name]}
    extra = {"num_directions": len(row["directions"])} if name == "fzoo" else {}
    return build(name, placement, lr=0.0, eps=row["eps"], kernel=kernel, **extra, **hyper)
