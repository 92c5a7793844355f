"""One pass of a MeZO step over this rank's pieces: x <- (x + a z) c + b z, z never stored whole.

Every pass of a step is of that form: +eps z (a = eps), -2 eps z, and the fused restore and
update (a = eps, c = 1 - lr wd on decaying pieces, b = -lr g). Three paths compute it, each
drawing its own stream of z; the path is chosen per run (``--zo_kernel``), never by the size or
position of a piece, so every layout takes the same path and sees the same z, and a run is
replayed on the path that drew it (the trajectory names the stream, :func:`stream_name`):

* ``compiled`` (the default, ``auto``, on every device; stream ``hash``): z of an element is a
  hash of (key, global index) turned into a normal by Box-Muller (``hashz.py``), evaluated
  and applied in place by one ``torch.compile`` kernel (``compiled.py``): C++ on CPU, Triton on
  CUDA, no z buffer, no generator. It is the same fp32 function on every device by design.
* ``blocks`` (stream ``blocks``, the first release's): z comes from :mod:`mezo_dist.zo.noise`
  one block (2^20 elements) at a time. Blocks are independent generators, so on CPU with N
  intra-op threads, N worker threads (one intra-op thread each) draw and apply blocks side by
  side; the values are the ones a serial draw gives, bit for bit. Needs no compiler.
* ``triton`` (stream ``philox``; CUDA with ``triton`` importable): one fused Triton kernel per
  piece draws z in registers with Philox (``tl.randn`` / ``tl.randint`` at the elements' global
  indices) and edits x in place. Under Triton's interpreter (``TRITON_INTERPRET=1``) the same
  kernel runs on CPU tensors, slowly but value for value: that is how the suite tests this path
  on machines without a GPU (``kernel="triton"`` must then be asked for).

An op may also be a plain callable ``fn(x, z, piece)`` that edits ``x`` given a materialised
slice of z; on the ``compiled`` and ``triton`` paths z is then drawn into a buffer by the same
kernel, so both kinds of op see the same z.

A pass may take a ``mask``: ``mask(piece, start, count)`` gives the elementwise factor (0/1) of
the piece's local elements ``[start, start + count)``, and the op sees ``mask * z`` instead of z
(Sparse MeZO, ``sparse.py``). It is a per-piece elementwise hook on z only, so every path and op
takes it the same way; on ``compiled`` and ``triton`` a masked pass materialises z first.

Pieces with a ``compute`` storage (``--precision`` over fp32 masters, see
``placement/masters.py``) are edited differently: the master takes only the update
(``x <- x c + b z``), and the storage receives ``master + o z``, where ``o`` is the perturbation
scale after the pass (the caller passes the scale before it). The masters never hold a
perturbation, so they come back bit for bit. The ``compiled`` path does both in its kernel.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Union

import torch

from mezo_dist.placement.base import Piece
from mezo_dist.zo import noise

KERNELS = ("auto", "compiled", "blocks", "triton")
# The stream each path draws, as trajectories name it; rows without a name are ``blocks``.
STREAMS = {"compiled": "hash", "blocks": "blocks", "triton": "philox"}
# Each worker keeps one 4 MiB block buffer; more workers than this would not pay on a CPU pass.
MAX_WORKERS = 8


@dataclass(frozen=True)
class Affine:
    """x <- (x + a z) c + b z; ``c`` (weight decay) applies only to pieces with ``decay``."""

    a: float
    c: float = 1.0
    b: float = 0.0

    def apply(self, x: torch.Tensor, z: torch.Tensor, piece: Piece) -> None:
        # The order of the in-place ops is the rounding the step has always had.
        if self.a != 0.0:
            x.add_(z, alpha=self.a)
        if piece.decay and self.c != 1.0:
            x.mul_(self.c)
        if self.b != 0.0:
            x.add_(z, alpha=self.b)


Op = Union[Affine, Callable[[torch.Tensor, torch.Tensor, Piece], None]]
# mask(piece, start, count) -> 0/1 factors of the piece's local elements [start, start + count).
Mask = Callable[[Piece, int, int], torch.Tensor]


def triton_available() -> bool:
    """Whether the fused pass can run compiled: a CUDA device present and triton importable."""
    if not torch.cuda.is_available():
        # Not even imported: importing triton fixes, for the process, whether its kernels compile
        # or run under the interpreter, and that is for the first real use to decide.
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on any tensor."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and importlib.util.find_spec("triton") is not None


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The path a pass takes on ``device``: ``compiled``, ``blocks`` or ``triton``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if kernel == "auto":
        # One stream for every device: a GPU run replays (and can be checked) on CPU.
        return "compiled"
    if kernel == "triton" and not ((device.type == "cuda" and triton_available()) or triton_interpreted()):
        raise ValueError(f"kernel 'triton' needs a CUDA device and the triton package (or Triton's interpreter, "
                         f"TRITON_INTERPRET=1); this rank has {device.type}")
    return kernel


def stream_name(kernel: str, kind: str) -> str:
    """How a run's z were drawn, as the trajectory records it: ``hash``, ``blocks`` or ``philox``."""
    return STREAMS[kernel]


def kernel_for_stream(stream: str) -> str:
    """The path that draws ``stream`` (the inverse of :func:`stream_name`)."""
    for kernel, name in STREAMS.items():
        if name == stream:
            return kernel
    raise ValueError(f"unknown noise stream {stream!r}; choose one of {', '.join(STREAMS.values())}")


def draw(kernel: str, key: int, offset: int, count: int, full_numel: int, *, kind: str = "gaussian",
         device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """``z[offset:offset + count]`` of a parameter's full noise vector on path ``kernel`` (fp32).

    Args:
        kernel: ``compiled``, ``blocks`` or ``triton`` (a resolved path, see :func:`resolve_kernel`).
        key: the parameter's key from ``noise.param_key``.
        offset, count: the global slice wanted.
        full_numel: the parameter's number of elements (the blocks stream's last block depends on it).
        kind: ``gaussian`` or ``rademacher``.
        device: where to draw (the fp32 result lives there).
        out: optional fp32 buffer of ``count`` elements to draw into.
    """
    if offset < 0 or offset + count > full_numel:
        raise ValueError(f"slice [{offset}, {offset + count}) outside a parameter of {full_numel} elements")
    if kernel == "blocks":
        z = noise.draw(key, offset, count, full_numel, device=device, kind=kind)
        return z if out is None else out.copy_(z)
    z = torch.zeros(count, dtype=torch.float32, device=device) if out is None else out.zero_()
    if kernel == "compiled":
        from mezo_dist.zo import compiled

        compiled.apply_(z, key, offset, 1.0, 1.0, 0.0, kind=kind)
    elif kernel == "triton":
        from mezo_dist.zo import triton_pass

        triton_pass.affine_(z, key, offset, full_numel, 1.0, 1.0, 0.0, kind=kind)
    else:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(STREAMS)}")
    return z


def _workers(device: torch.device) -> int:
    if device.type != "cpu":
        return 1  # CUDA draws are asynchronous already
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1


_LOCAL = threading.local()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_PID
    # A forked child must not reuse the parent's threads (they do not exist there).
    if _POOL is None or _POOL_PID != os.getpid() or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mezo-z",
                                   initializer=torch.set_num_threads, initargs=(1,))
        _POOL_PID = os.getpid()
    return _POOL


def _thread_buffer(device: torch.device, numel: int) -> torch.Tensor:
    """A worker's own z buffer (one block), kept for the thread's life."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get(device)
    if buf is None or buf.numel() < numel:
        buf = bufs[device] = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
    return buf


class Scratch:
    """The z buffer of a run's serial passes, kept between passes (workers keep their own)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.device, list[torch.Tensor]] = {}

    def get(self, device: torch.device, count: int, numel: int) -> list[torch.Tensor]:
        bufs = self._bufs.get(device, [])
        if len(bufs) < count or bufs[0].numel() < numel:
            size = max(numel, bufs[0].numel() if bufs else 1)
            bufs = [torch.empty(size, dtype=torch.float32, device=device) for _ in range(max(count, len(bufs)))]
            self._bufs[device] = bufs
        return bufs


def run_pass(
    pieces: list[Piece], seed: int, op: Op, *, kind: str, kernel: str, scratch: Scratch, offset: float = 0.0,
    mask: Mask | None = None,
) -> bool:
    """Apply ``op`` with the z of step seed ``seed`` to every piece (in place, under no_grad).

    ``offset`` is the perturbation scale the pieces' ``compute`` storage holds before the pass.
    ``mask`` (optional) multiplies z elementwise (see the module docstring).
    Returns whether any piece had a ``compute`` storage (which the pass then wrote).
    """
    pieces = [p for p in pieces if p.local.numel() > 0]
    if not pieces:
        return False
    path = resolve_kernel(kernel, pieces[0].local.device)
    if path == "blocks":
        _blocks_pass(pieces, seed, op, kind, scratch, offset, mask)
    else:
        _fused_pass(path, pieces, seed, op, kind, scratch, offset, mask)
    return any(p.compute is not None for p in pieces)


def _apply(op: Op, x: torch.Tensor, z: torch.Tensor, piece: Piece, compute: torch.Tensor | None, offset: float) -> None:
    if compute is not None:
        return _apply_master(op, x, z, piece, compute, offset)
    if isinstance(op, Affine):
        op.apply(x, z, piece)
    else:
        op(x, z, piece)


def _apply_master(op: Op, master: torch.Tensor, z: torch.Tensor, piece: Piece, compute: torch.Tensor,
                  offset: float) -> None:
    # The virtual value is master + offset z; an Affine op maps it to
    # master c + b z + (offset + a) c z: the master takes c and b, the storage the rest.
    if isinstance(op, Affine):
        c = op.c if piece.decay else 1.0
        if c != 1.0:
            master.mul_(c)
        if op.b != 0.0:
            master.add_(z, alpha=op.b)
        scale = (offset + op.a) * c
    else:
        op(master, z, piece)
        scale = offset
    if scale == 0.0:
        compute.copy_(master)
    else:
        compute.copy_(torch.add(master, z, alpha=scale))


def _blocks_pass(pieces: list[Piece], seed: int, op: Op, kind: str, scratch: Scratch, offset: float,
                 mask: Mask | None = None) -> None:
    # (piece, key, block, block start, block length, lo, hi) for every block of every piece.
    tasks = []
    for piece in pieces:
        key = noise.param_key(seed, piece.name)
        for block, b_start, b_len, lo, hi in noise.block_plan(piece.offset, piece.local.numel(), piece.full_numel):
            tasks.append((piece, key, block, b_start, b_len, lo, hi))
    device = pieces[0].local.device
    longest = max(t[4] for t in tasks)
    workers = _workers(device) if len(tasks) > 1 else 1
    bufs = scratch.get(device, 1, longest) if workers == 1 else []

    def fill(i: int, buf: torch.Tensor) -> torch.Tensor:
        _, key, block, b_start, b_len, lo, hi = tasks[i]
        z = buf[:b_len]
        noise.fill_block(z, key, block, kind=kind, lo=lo - b_start, hi=hi - b_start)
        return z

    def consume(i: int, z: torch.Tensor) -> None:
        piece, _, _, b_start, _, lo, hi = tasks[i]
        start = lo - piece.offset
        compute = None if piece.compute is None else piece.compute[start : start + hi - lo]
        zs = z[lo - b_start : hi - b_start]
        if mask is not None:
            zs.mul_(mask(piece, start, hi - lo))
        _apply(op, piece.local[start : start + hi - lo], zs, piece, compute, offset)

    if workers == 1:
        for i in range(len(tasks)):
            consume(i, fill(i, bufs[0]))
        return
    # Each worker draws a block into its own buffer and applies it to its (disjoint) slice.
    # Workers run their ops on one intra-op thread each, so the pass never oversubscribes.
    futures = [_pool(workers).submit(lambda i=i: consume(i, fill(i, _thread_buffer(device, longest))))
               for i in range(len(tasks))]
    for f in futures:
        f.result()


def _fused_pass(path: str, pieces: list[Piece], seed: int, op: Op, kind: str, scratch: Scratch,
                offset: float, mask: Mask | None = None) -> None:
    """The ``compiled`` and ``triton`` paths: an Affine op runs in their kernel (with masters too
    on ``compiled``); anything else, or a masked pass, gets z materialised by that kernel, a
    block at a time."""
    from mezo_dist.zo import compiled

    for piece in pieces:
        key = noise.param_key(seed, piece.name)
        if isinstance(op, Affine) and mask is None:
            c = op.c if piece.decay else 1.0
            contiguous = piece.local.is_contiguous() and (piece.compute is None or piece.compute.is_contiguous())
            if path == "compiled" and contiguous:
                update = c != 1.0 or op.b != 0.0
                compiled.apply_(piece.local, key, piece.offset, op.a, c, op.b, kind=kind, compute=piece.compute,
                                scale=(offset + op.a) * c, update=update)
                continue
            if path == "triton" and piece.compute is None:
                from mezo_dist.zo import triton_pass

                triton_pass.affine_(piece.local, key, piece.offset, piece.full_numel, op.a, c, op.b, kind=kind)
                continue
        n = piece.local.numel()
        buf = scratch.get(piece.local.device, 1, min(noise.BLOCK, n))[0]
        for start in range(0, n, noise.BLOCK):
            count = min(noise.BLOCK, n - start)
            z = draw(path, key, piece.offset + start, count, piece.full_numel, kind=kind, device=piece.local.device,
                     out=buf[:count])
            if mask is not None:
                z.mul_(mask(piece, start, count))
            compute = None if piece.compute is None else piece.compute[start : start + count]
            _apply(op, piece.local[start : start + count], z, piece, compute, offset)
