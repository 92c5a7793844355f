"""Explicit distributed state: built once from the launcher's environment, passed everywhere.

``torchrun``, ``deepspeed`` and ``accelerate launch`` all export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, so reading the environment is what makes one entry point work under
each of them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistState:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" on CUDA, "gloo" on CPU; "" when no process group is used
    hsdp_replicas: int = 1  # FSDP2's mesh: (replicas, world / replicas); 1 is plain sharding

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the collectives of the code outside the engines: through the state they were given,
    # never the global group looked up (a state of one rank issues none).

    @property
    def grouped(self) -> bool:
        """Whether a collective reaches other ranks: several ranks under a started process group."""
        return self.world_size > 1 and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks in place."""
        if self.grouped:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of ``t`` over all ranks, in place."""
        if self.grouped:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.grouped:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier()



def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher exported them; (0, 1, 0) without one."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(
    *, use_deepspeed: bool = False, need_group: bool = False, timeout_s: int = 1800, hsdp_replicas: int = 1
) -> DistState:
    """Start the process group when the launcher asked for more than one process.

    With ``use_deepspeed`` the group is then wrapped by ``deepspeed.init_distributed`` (ZeRO-3
    needs that even with one process); ``need_group`` starts one for a single process too
    (FSDP2's device mesh needs one).
    """
    rank, world, local = env_world()
    if hsdp_replicas > 1 and world % hsdp_replicas:
        # Checked here, where the world size is known, before any rank waits in a rendezvous.
        from mezo_dist.errors import ConfigError

        raise ConfigError(f"--hsdp_replicas {hsdp_replicas} does not divide the world size {world}")
    device = default_device(local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if (use_deepspeed or need_group) and world == 1:
        # A launcher-less single process: give it the rendezvous a launcher would have.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if (world > 1 or need_group or use_deepspeed) and not dist.is_initialized():
        _start_group(backend, rank, world, timedelta(seconds=timeout_s))
    if use_deepspeed:
        import deepspeed

        # Wraps the group started above in DeepSpeed's communication layer.
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
        _unlink_deepspeed_shm(rank, world)
    if not dist.is_initialized():
        backend = ""
    return DistState(rank=rank, world_size=world, local_rank=local, device=device, backend=backend,
                     hsdp_replicas=hsdp_replicas)


def _unlink_deepspeed_shm(rank: int, world: int) -> None:
    """Unlink the shared-memory segment DeepSpeed's CPU communication op created for this rank.

    On the CPU accelerator, when every rank is on one host (the ``deepspeed`` launcher sets
    ``LOCAL_SIZE``), ``init_distributed`` maps one 69 MB ``/dev/shm`` segment per rank for its
    low-latency all-reduce and never unlinks it, so every run leaves them behind until the host
    runs out of shared memory. Once all ranks have mapped their peers' segments (the barrier),
    the names are no longer needed: the mappings stay valid and the memory is freed when the last
    rank exits. On CUDA there are no such segments and this finds nothing.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if not (shm / name).exists():
        return
    if world > 1 and dist.is_initialized():
        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        (shm / name).unlink()


def _start_group(backend: str, rank: int, world: int, timeout: timedelta) -> None:
    """``init_process_group`` over the launcher's env:// rendezvous, with keys of their own per
    restart: after ``torchrun --max-restarts`` the store can still hold the dead attempt's gloo
    addresses, and the new ranks would try to connect to them."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"mezo_dist/attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    from mezo_dist import interrupt

    interrupt.attach(prefixed, rank, world)  # one rank speaks for an interrupted job


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown(*, clean: bool = True) -> None:
    """Barrier then destroy: without it gloo sometimes aborts at interpreter exit.

    After an unexpected error (``clean=False``) there is no barrier: the other ranks may be
    waiting in a collective this rank will never join, and would wait with it until the timeout.
    Exiting lets the launcher see the failure and stop them.
    """
    if dist.is_available() and dist.is_initialized():
        if clean:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


def current_state() -> DistState:
    """The state of an already started process group (for users who started their own)."""
    rank, world, local = env_world()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
    else:
        backend = ""
    device = default_device(local)
    if backend == "gloo":
        device = torch.device("cpu")
    return DistState(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)
