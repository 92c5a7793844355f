"""A pass that needs, for every element, the z of several seeds at once.

:func:`passes.run_pass` draws one seed's stream per pass, which is all an update linear in z
needs. The moment-free Adam-style update (``adaptive.py``) is not linear: its first and second
moments of an element combine the z of the last h steps (m = sum a_k z_k, v = sum b_k z_k^2,
x -= lr m / (sqrt(v) + delta)), so they must be drawn side by side. This pass walks the same
slices as a pass of ``passes.py`` (one noise block of one piece on the ``blocks`` path, chunks of
one block on ``compiled`` and ``triton``), draws the seeds' z of a slice one after the other into one worker
buffer, and hands them to the op as an iterator. Nothing larger than a block is held at any time
besides the op's own block-sized accumulators: no per-parameter state.

The pieces may hold a perturbation ``held * z(seeds[0])`` (the step's own -eps z): on a plain
piece the pass takes it out first (``x -= held z_0``, the in-place add of every pass), a piece
with fp32 masters never had it in the master; after the op the compute storage is set to the
master. The pass therefore leaves no perturbation applied.

CPU slices run on the worker threads of ``passes.py`` (one intra-op thread each); every element
sees the same arithmetic whichever thread or shard handles it.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

import torch

from mezo_dist.placement.base import Piece
from mezo_dist.zo import noise, passes

# op(x, zs, piece): edit the slice x in place; zs yields z(seeds[k]) of the same slice, in order,
# each valid until the next is asked for.
MultiOp = Callable[[torch.Tensor, Iterator[torch.Tensor], Piece], None]

_LOCAL = threading.local()


def _buffers(device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two z buffers of one block, kept for the thread's life: z_0 (kept for the restore and the
    op) and the one the other seeds take turns in."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    pair = bufs.get(device)
    if pair is None or pair[0].numel() < numel:
        pair = bufs[device] = tuple(torch.empty(max(numel, 1), dtype=torch.float32, device=device) for _ in range(2))
    return pair


def _slices(piece: Piece, path: str) -> list[tuple[int, int, int, int]]:
    """(local start, count, block, block start) of the piece's slices: whole noise blocks' shares
    on ``blocks`` (a Gaussian block is drawn whole anyway), chunks of one block on the counter-based
    paths (``compiled``, ``triton``)."""
    n = piece.local.numel()
    if path != "blocks":
        return [(s, min(noise.BLOCK, n - s), -1, -1) for s in range(0, n, noise.BLOCK)]
    return [(lo - piece.offset, hi - lo, block, b_start)
            for block, b_start, _b_len, lo, hi in noise.block_plan(piece.offset, n, piece.full_numel)]


def _draw(buf: torch.Tensor, piece: Piece, key: int, start: int, count: int, block: int, b_start: int, *,
          kind: str, path: str) -> torch.Tensor:
    """z of the piece's local elements [start, start + count) in the stream of ``key``."""
    if path != "blocks":  # compiled (hash stream) or triton (philox): any slice is drawn directly
        return passes.draw(path, key, piece.offset + start, count, piece.full_numel, kind=kind,
                           device=buf.device, out=buf[:count])
    b_len = min(noise.BLOCK, piece.full_numel - b_start)
    lo = piece.offset + start - b_start
    noise.fill_block(buf[:b_len], key, block, kind=kind, lo=lo, hi=lo + count)
    return buf[lo : lo + count]


@torch.no_grad()
def run_multi_pass(pieces: list[Piece], seeds: list[int], op: MultiOp, *, kind: str, kernel: str,
                   held: float = 0.0) -> bool:
    """Apply ``op`` to every slice of every piece with the z of all ``seeds`` (see the module
    docstring); ``held`` is the scale of ``seeds[0]``'s perturbation the pieces hold. Returns
    whether any piece had a ``compute`` storage (which the pass then wrote)."""
    pieces = [p for p in pieces if p.local.numel() > 0]
    if not pieces or not seeds:
        return False
    device = pieces[0].local.device
    path = passes.resolve_kernel(kernel, device)
    keys = {p.name: [noise.param_key(s, p.name) for s in seeds] for p in pieces}
    tasks = [(p, *sl) for p in pieces for sl in _slices(p, path)]
    width = min(noise.BLOCK, max(p.full_numel for p in pieces))

    def work(task: tuple) -> None:
        piece, start, count, block, b_start = task
        z0_buf, zk_buf = _buffers(device, width)
        draw = lambda buf, key: _draw(buf, piece, key, start, count, block, b_start, kind=kind, path=path)  # noqa: E731
        x = piece.local[start : start + count]
        k0, *rest = keys[piece.name]
        z0 = draw(z0_buf, k0)
        if held != 0.0 and piece.compute is None:
            x.add_(z0, alpha=-held)

        def zs() -> Iterator[torch.Tensor]:
            yield z0
            for key in rest:
                yield draw(zk_buf, key)

        op(x, zs(), piece)
        if piece.compute is not None:
            piece.compute[start : start + count].copy_(x)

    workers = passes._workers(device) if path == "blocks" and len(tasks) > 1 else 1
    if workers == 1:
        for task in tasks:
            work(task)
    else:
        for f in [passes._pool(workers).submit(work, task) for task in tasks]:
            f.result()
    return any(p.compute is not None for p in pieces)
