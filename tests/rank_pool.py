"""In-process multi-rank tests: N worker processes joined in one gloo group, kept for the session.

A test that launches ``torchrun`` pays, per rank, a Python start, the imports of torch,
transformers and DeepSpeed (~10 s on 2 cores) and the process-group set-up. Tests of placements,
steps and checkpoints only need ranks that share a group, so :class:`RankPool` starts the ranks
once and then runs many test functions on them: ``pool.run(fn, *args)`` calls ``fn(state, *args)``
on every rank (``state`` is the rank's :class:`mezo_dist.distributed.DistState`) and returns the
per-rank results. Only tests of the launchers themselves still go through real launchers.

``fn`` must be a module-level function (the workers import it by name) and must issue the same
collectives on every rank. A rank that fails (or a run past its timeout) ends the pool: the other
ranks may be waiting in a collective forever, so every worker is killed and the next
:meth:`RankPool.run` starts fresh ones.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# A collective that never completes fails the test after this long (the default is 30 minutes).
GROUP_TIMEOUT_S = 300


class RankFailed(AssertionError):
    """A rank raised, or did not answer in time; the message holds its traceback."""


def _worker(rank: int, world: int, port: int, env: dict[str, str], conn) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)  # as the launchers run: relative paths (ds_configs/...) resolve from the checkout
    try:
        import torch

        torch.set_num_threads(1)
        from mezo_dist.distributed import init_distributed

        if world > 1:
            # The group is wrapped by DeepSpeed's comm layer once, so ZeRO-3 and FSDP2 tests share it.
            state = init_distributed(use_deepspeed=True, timeout_s=GROUP_TIMEOUT_S)
        else:
            # One rank starts no group, as `python launch/train.py` starts none: each run that
            # needs one (FSDP2's mesh, DeepSpeed) starts and destroys its own.
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(k, None)
            state = init_distributed()
        conn.send(("ready", None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        module, name, args = msg
        try:
            fn = getattr(importlib.import_module(module), name)
            conn.send(("ok", fn(state, *args)))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
        finally:
            _forget_run_state()
    from mezo_dist.distributed import teardown

    teardown()


# The entry points a pooled "launch" runs (each ``main(argv) -> exit code``); the scripts in
# launch/ are these calls plus an ``os._exit``, which would end the worker.
ENTRY_POINTS = {"launch/train.py": ("mezo_dist.cli", "main"), "launch/replay.py": ("mezo_dist.replay", "main")}


def run_entry_point(state, script: str, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """One rank's share of ``script argv`` as a launcher would run it, with ``env`` added for the
    run: (exit code, stdout, stderr). The entry point finds the pool's group started and leaves
    it standing (``cli.run_on_ranks`` tears down only a group it started)."""
    module, name = ENTRY_POINTS[script]
    main = getattr(importlib.import_module(module), name)
    # The whole environment comes back after the run: ``env``, and what a run sets itself (the
    # rendezvous a launcher-less single process gives itself), must not reach the next one.
    saved = dict(os.environ)
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def _forget_run_state() -> None:
    """What one test leaves in a worker that would change the next: transformers' global
    DeepSpeed config (models would load partitioned) and unreferenced engines."""
    import gc

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    gc.collect()


class RankPool:
    """``world`` ranks over gloo on this host, started on first use."""

    def __init__(self, world: int = 2, env: dict[str, str] | None = None) -> None:
        self.world = world
        self.env = dict(env or {})
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._port: int | None = None

    def _start(self) -> None:
        from tests.helpers import free_port, launch_env

        env = {k: v for k, v in launch_env().items() if k in ("OMP_NUM_THREADS", "DS_ACCELERATOR", "PYTHONPATH",
                                                              "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR")}
        env.update(self.env)
        ctx = mp.get_context("spawn")  # a fork would inherit the parent's OpenMP and gloo threads
        port = self._port = free_port()
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self.world, port, env, child), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)
        self._collect(timeout=GROUP_TIMEOUT_S, what="start-up")

    def _poll(self, rank: int, what: str) -> tuple[bool, Any] | None:
        """(True, the rank's answer), (False, why it failed), or None while it is still at work."""
        conn, proc = self._conns[rank], self._procs[rank]
        if conn.poll(0.05):
            kind, value = conn.recv()
            return (True, value) if kind != "error" else (False, f"rank {rank} failed in {what}:\n{value}")
        if not proc.is_alive():
            return False, f"rank {rank} died in {what} (exit code {proc.exitcode})"
        return None

    def _collect(self, *, timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        results: list[Any] = [None] * self.world
        pending = set(range(self.world))
        while pending:
            for rank in sorted(pending):
                got = self._poll(rank, what)
                if got is None:
                    continue
                pending.discard(rank)
                ok, value = got
                if not ok:
                    self._fail(value, pending, what, returned=_returned(results, self.world, pending | {rank}))
                results[rank] = value
            if pending and time.monotonic() > deadline:
                self.close(kill=True)
                raise RankFailed("\n".join([f"ranks {sorted(pending)} did not finish {what} within {timeout:.0f} s",
                                             *_returned(results, self.world, pending)]))
        return results

    def _fail(self, first: str, others: set[int], what: str, *, returned: list[str], wait_s: float = 10.0) -> None:
        """End the pool and raise with every rank's failure: the first one seen is often a peer's
        "connection closed", while the cause is in the traceback of the rank that failed first, or
        in what a rank that had already returned said (an exit code and its stderr, when it left
        the collectives early)."""
        reports = [first, *returned]
        deadline = time.monotonic() + wait_s
        others = set(others)
        while others and time.monotonic() < deadline:
            for rank in sorted(others):
                got = self._poll(rank, what)
                if got is not None:
                    others.discard(rank)
                    if not got[0]:
                        reports.append(got[1])
        self.close(kill=True)
        raise RankFailed("\n".join(reports))

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> list[Any]:
        """``fn(state, *args)`` on every rank; the per-rank return values (picklable), rank order."""
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((fn.__module__, fn.__qualname__, args))
        return self._collect(timeout=timeout, what=f"{fn.__module__}.{fn.__qualname__}")

    def close(self, *, kill: bool = False) -> None:
        for conn, proc in zip(self._conns, self._procs):
            if not kill and proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc in self._procs:
            proc.join(timeout=0 if kill else 30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs, self._conns = [], []
        if self._port is not None:
            _remove_shm_segments(self._port)


def _returned(results: list[Any], world: int, unfinished: set[int]) -> list[str]:
    """What the ranks that had already answered said (for a training run: its exit code and
    output), the clue when one of them left the collectives early."""
    return [f"rank {r} had returned: {str(results[r])[-2000:]}" for r in range(world) if r not in unfinished]


def _remove_shm_segments(port: int) -> None:
    # DeepSpeed's CPU all-reduce segments of this pool; mezo_dist unlinks its own once every rank
    # has mapped them, this catches those of workers killed before they got there.
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink(missing_ok=True)


_SHARED: dict[int, RankPool] = {}


def shared_pool(world: int = 2) -> RankPool:
    """The session's pool of ``world`` ranks (the ``rank_pool`` fixture and pooled launches share
    the 2-rank one)."""
    if world not in _SHARED:
        _SHARED[world] = RankPool(world=world)
        atexit.register(_SHARED[world].close)
    return _SHARED[world]
