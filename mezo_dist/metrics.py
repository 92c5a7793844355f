"""What a run reports: the trajectory (one JSON line per step), trackers, a progress bar.

Trackers are accelerate's (``accelerate.tracking``): ``tensorboard`` (the default, under
``<output_dir>/tensorboard/``), ``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``,
``swanlab``, ``trackio``, each where its package is installed.

Everything here writes on rank 0 only; other ranks hold a logger that does nothing but take part
in the collective that gathers per-rank peak memory.
"""

from __future__ import annotations

import ctypes
import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from mezo_dist.distributed import DistState
from mezo_dist import trajectory
from mezo_dist.errors import ConfigError
from mezo_dist.io import atomic_write_text  # noqa: F401  (also imported from here by the benchmarks)

# The project name of trackers that log to a service (wandb, comet_ml, ...) rather than a folder.
PROJECT = "mezo_dist"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank since the last :func:`reset_peak_memory`: the allocator's peak on
    CUDA, the resident set's high-water mark (VmHWM) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (on CPU: hand freed memory back, then reset VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def gather_peak_memory(state: DistState) -> list[int]:
    mine = peak_memory_bytes(state.device)
    return [int(x) for x in state.all_gather_object(mine)]


def tracker_names(report_to: str) -> list[str]:
    """``--report_to`` as tracker names: ``none``, ``all`` (every installed tracker) or names of
    accelerate's trackers, comma-separated. An unknown or uninstalled one is a ConfigError."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    names = list(dict.fromkeys(n.strip() for n in str(report_to).split(",") if n.strip()))
    if names == ["none"]:
        return []
    # Trackers registered with accelerate.tracking.register_tracker_class count as installed.
    installed = [str(t) for t in get_available_trackers()]
    installed += [n for n in LOGGER_TYPE_TO_CLASS if n not in LoggerType.list()]
    if names == ["all"]:
        return installed
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"unknown --report_to {name!r}; choose none, all or any of "
                              f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
        if name not in installed:
            raise ConfigError(f"--report_to {name}: the {name} package is not installed")
    return names


def open_trackers(names: list[str], output_dir: Path) -> list[Any]:
    """Start accelerate's trackers ``names``: those that write files under ``<output_dir>/<name>/``,
    the others under the project name ``mezo_dist``. Called on rank 0 only."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    out = []
    if names:
        from accelerate import PartialState

        # accelerate's trackers log through its process-aware logger, which needs its state; the
        # process group is already up, so this only reads it.
        PartialState()
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        tracker = cls(name, str(output_dir)) if cls.requires_logging_directory else cls(PROJECT)
        # Only rank 0 holds trackers, so the rank test of accelerate's decorator (which would
        # start accelerate's own process state) is not needed.
        tracker.main_process_only = False
        tracker.start()
        out.append(tracker)
    return out


class RunLogger:
    def __init__(
        self, state: DistState, output_dir: str, *, max_steps: int, report_to: str = "tensorboard", progress: bool,
        start_step: int = 0,
    ) -> None:
        self.state = state
        self.main = state.is_main
        self.out = Path(output_dir)
        self._traj = None
        self._trackers: list[Any] = []
        self._bar = None
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._traj = self._open_trajectory(start_step)
        self._trackers = open_trackers(tracker_names(report_to), self.out)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="mezo", dynamic_ncols=True, file=sys.stderr)

    def _open_trajectory(self, start_step: int):
        """A fresh file, or on resume the lines of the steps before ``start_step`` (lines written
        after the checkpoint by the interrupted run are dropped: those steps run again)."""
        path = self.out / "trajectory.jsonl"
        atomic_write_text(path, "".join(trajectory.lines_before(path, start_step)))
        return open(path, "a", encoding="utf-8")

    def trajectory(self, row: dict[str, Any]) -> None:
        if self._traj is not None:
            self._traj.write(json.dumps(row) + "\n")
            self._traj.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self._trackers:
            tracker.log(values, step=step)

    def progress(self, postfix: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def memory(self, step: int) -> list[int]:
        """Peak memory per rank since the previous call. Collective: every rank calls it."""
        peaks = gather_peak_memory(self.state)
        reset_peak_memory(self.state.device)
        for r, b in enumerate(peaks):
            self.scalars(step, {f"memory/peak_gib_rank{r}": b / 2**30})
        return peaks

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            atomic_write_text(self.out / name, json.dumps(obj, indent=2) + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []
        if self._traj is not None:
            self._traj.close()
