"""The trajectory (``trajectory.jsonl``): one JSON object per step, written by training, kept up to
the checkpoint's step by a resumed run (:func:`lines_before`) and read back by replay, which
rebuilds the weights from the file alone.

The row of a zeroth-order step (MeZO and every ``--zo_optimizer``):

| key | what it holds | when absent (older rows, or nothing to say) |
|---|---|---|
| step | the step index: 0, 1, 2, ... | required |
| seed | the **step seed**: z of the step's first direction is drawn from it | required |
| projected_grad | the projected gradient (mean over the step's directions) | required |
| loss | the loss estimate at theta (not read by replay) | |
| lr, eps, wd | the step's learning rate, perturbation scale and weight decay | required |
| perturbation | the distribution of z: gaussian or rademacher | gaussian |
| noise | the stream z was drawn from: hash, blocks or philox | blocks |
| precision | bf16 or fp16: fp32 values under low-precision forwards | fp32 compute |
| directions | [[seed, projected_grad], ...] of a step with several directions | one direction |
| skipped | true: a loss was not finite and no update was applied | false |
| optimizer | fzoo, sparse or adamezo, then its hyper-parameters (:data:`HYPER_FLAGS`) and per-step scalars (:data:`ROW_FIELDS`) | mezo |

The step seed is ``noise.step_seed(run seed, step)``; the run seed (``--seed``) is what
``trainer_state.json`` holds as ``run.seed``. The row keeps the step seed under ``"seed"``, its
name since the first release, so that every trajectory written so far still replays; code calls
it ``step_seed``.

A backpropagation step (``--trainer regular``) writes step, loss, lr, grad_norm and
``"trainer": "regular"``: a log, not something replay can rebuild from.

Nothing here imports torch: a trajectory is checked before any process group or model exists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mezo_dist.errors import ConfigError
from mezo_dist.io import json_lines

STEP_SEED = "seed"  # the on-disk key of the step seed (see the module docstring)
REQUIRED = ("step", STEP_SEED, "projected_grad", "lr", "eps", "wd")

# What a row without the key means: the one place these defaults are written down.
DEFAULTS: dict[str, Any] = {"perturbation": "gaussian", "noise": "blocks", "optimizer": "mezo",
                            "precision": None, "skipped": False, "directions": None}

PERTURBATIONS = ("gaussian", "rademacher")
STREAMS = ("hash", "blocks", "philox")  # the names of ``passes.STREAMS``, without importing torch

# Row / constructor name of each optimizer's hyper-parameters -> its flag in ZOArguments.
HYPER_FLAGS: dict[str, dict[str, str]] = {
    "mezo": {},
    "fzoo": {},
    "sparse": {"sparsity": "zo_sparsity", "sparse_refresh": "zo_sparse_refresh"},
    "adamezo": {"beta1": "zo_beta1", "beta2": "zo_beta2", "history": "zo_history", "adam_eps": "zo_adam_eps"},
}
OPTIMIZERS = tuple(HYPER_FLAGS)  # ``zo.optimizers.NAMES``, without importing torch

# What a row of each optimizer must hold beyond MeZO's fields.
ROW_FIELDS: dict[str, tuple[str, ...]] = {
    "mezo": (), "fzoo": ("directions", "sigma"), "sparse": tuple(HYPER_FLAGS["sparse"]),
    "adamezo": tuple(HYPER_FLAGS["adamezo"]),
}


def value(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, or what a row without it means (:data:`DEFAULTS`)."""
    return row.get(key, DEFAULTS[key])


def zo_row(res: Any, zo: Any, precision: str | None = None) -> dict[str, Any]:
    """The row of one zeroth-order step.

    Args:
        res: the step's ``StepResult`` (or an optimizer's subclass of it).
        zo: the optimizer that took it (MeZO or one of ``zo.optimizers``).
        precision: bf16/fp16 when fp32 values ran low-precision forwards (a zero3 replay rebuilds
            the same rounding), else None.
    """
    # eps and wd ride along so that the file alone can replay the run.
    row = {"step": res.step, STEP_SEED: res.step_seed, "projected_grad": res.projected_grad, "loss": res.loss,
           "lr": res.lr, "eps": zo.eps, "wd": zo.weight_decay}
    # How z was drawn rides along too: replay refuses a stream it cannot draw.
    row["perturbation"] = zo.perturbation
    if zo.noise_stream != DEFAULTS["noise"]:
        row["noise"] = zo.noise_stream
    if precision is not None:
        row["precision"] = precision
    if len(res.directions) > 1:
        row["directions"] = [[seed, g] for seed, g in res.directions]
    if res.skipped:
        row["skipped"] = True
    name = getattr(zo, "name", DEFAULTS["optimizer"])
    if name != DEFAULTS["optimizer"]:  # mezo's rows stay as the first release wrote them
        row.update(optimizer=name, **zo.hyper(), **zo.row_fields(res))
    return row


def backprop_row(res: Any) -> dict[str, Any]:
    """The row of one backpropagation step (``res``: a ``backprop.BackpropResult``)."""
    return {"step": res.step, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm, "trainer": "regular"}


def replay_args(row: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``MeZO.replay`` that a checked row gives."""
    return {"step_seed": int(row[STEP_SEED]), "projected_grad": float(row["projected_grad"]),
            "lr": float(row["lr"]), "skipped": bool(value(row, "skipped")), "directions": value(row, "directions")}


def read_trajectory(path: str | Path) -> list[dict[str, Any]]:
    """The steps of a run, checked to run 0, 1, 2, ... with everything replay needs (ConfigError
    naming the line otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trajectory {path} does not exist")
    rows: list[dict[str, Any]] = []
    for n, row in json_lines(p, what="trajectory"):
        where = f"trajectory {path} line {n}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not a JSON object")
        missing = set(REQUIRED) - set(row)
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(sorted(missing))}")
        _check_types(row, where)
        if row["step"] != len(rows):
            raise ConfigError(f"{where} is step {row['step']}, expected {len(rows)}")
        if not value(row, "skipped") and not math.isfinite(row["projected_grad"]):
            raise ConfigError(f"{where} has a non-finite projected gradient")
        if value(row, "perturbation") not in PERTURBATIONS:
            raise ConfigError(f"{where} has unknown perturbation {row['perturbation']!r}")
        if value(row, "noise") not in STREAMS:
            raise ConfigError(f"{where} has unknown noise stream {row['noise']!r}")
        if rows and value(row, "precision") != value(rows[0], "precision"):
            raise ConfigError(f"{where} changes precision mid-run")
        _check_optimizer(row, rows[0] if rows else row, where)
        rows.append(row)
    if not rows:
        raise ConfigError(f"trajectory {path} is empty")
    return rows


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_types(row: dict[str, Any], where: str) -> None:
    """Each field of a row as training writes it (a string or a list where a number belongs is
    refused here, not met as a TypeError in the middle of the replay)."""
    for key in ("step", STEP_SEED):
        if not isinstance(row[key], int) or isinstance(row[key], bool) or row[key] < 0:
            raise ConfigError(f"{where}: {key} is {row[key]!r}, not a non-negative integer")
    for key in ("projected_grad", "lr", "eps", "wd"):
        if not _number(row[key]):
            raise ConfigError(f"{where}: {key} is {row[key]!r}, not a number")
    if not (math.isfinite(row["lr"]) and math.isfinite(row["wd"]) and math.isfinite(row["eps"]) and row["eps"] > 0):
        raise ConfigError(f"{where}: lr, eps and wd must be finite and eps > 0")
    if not isinstance(value(row, "skipped"), bool):
        raise ConfigError(f"{where}: skipped is {row['skipped']!r}, not true or false")
    directions = value(row, "directions")
    if directions is not None and not (isinstance(directions, list) and directions and all(
            isinstance(d, list) and len(d) == 2 and isinstance(d[0], int) and not isinstance(d[0], bool) and _number(d[1])
            for d in directions)):
        raise ConfigError(f"{where}: directions must be a list of [seed, projected_grad] pairs")


def _check_optimizer(row: dict[str, Any], first: dict[str, Any], where: str) -> None:
    """The zeroth-order optimizer of a row is known, holds what its replay needs and is the run's
    from its first row, hyper-parameters included."""
    name = value(row, "optimizer")
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where} has unknown optimizer {name!r}")
    if name != value(first, "optimizer"):
        raise ConfigError(f"{where} changes optimizer mid-run")
    missing = [k for k in ROW_FIELDS[name] if k not in row and not (k == "sigma" and value(row, "skipped"))]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)} ({name})")
    changed = [k for k in HYPER_FLAGS[name] if row[k] != first[k]]
    if changed:
        raise ConfigError(f"{where} changes {changed[0]} mid-run")


def lines_before(path: Path, start_step: int) -> list[str]:
    """The lines of ``path`` for the steps before ``start_step``, checked: JSON objects with an
    integer ``step`` counting from 0. A last line cut short by a crash is dropped; anything else
    that does not fit is a ConfigError (checked before a resumed run starts, by every rank). What a
    resumed run keeps of its trajectory: rows are copied as written."""
    if start_step <= 0 or not path.exists():
        return []
    kept: list[str] = []
    for n, row in json_lines(path, what="trajectory", cut_last=True):
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ConfigError(f"trajectory {path} line {n} has no integer step (got {step!r})")
        if step >= start_step:
            break
        if step != len(kept):
            raise ConfigError(f"trajectory {path} line {n} is step {step}, expected {len(kept)}")
        kept.append(json.dumps(row) + "\n")
    return kept
