"""Layout-invariant perturbation noise.

The direction z of a MeZO step must be the same vector whether a parameter lives whole in one
process, in FSDP2 row shards, or in flat ZeRO-3 partitions. So z is defined per *element of the
full flattened parameter*: the value at global index i depends only on (step seed, parameter
name, i). A rank that holds elements [offset, offset + n) asks for exactly that slice.

How: the flattened parameter is cut into fixed blocks of ``BLOCK`` elements (the last block is
shorter). Block b is drawn with ``normal_`` from a generator seeded by a 64-bit mix of the
parameter key and b. The block boundaries depend on the full size only, never on the shard
boundaries, so any slice equals the same range of the full draw. A shard draws at most two
partial blocks it does not need, and the working buffer is one block, not a copy of the model.

Two kinds of z share that layout. ``gaussian`` (the default, the paper's) is the stream above,
unchanged since the first release. ``rademacher`` (z = +-1, added with the fast-perturbation
work) draws ``ceil(len / 32)`` 32-bit words per block from the same per-block generator and maps
bit ``j % 8`` of byte ``j // 8`` of the words' little-endian low four bytes to element ``j``
(set: +1, clear: -1); drawing bits costs about a twentieth of drawing normals.

Blocks are independent generators, so :mod:`mezo_dist.zo.passes` may draw several at once on
CPU threads without changing a single value. This is the ``blocks`` stream (``--zo_kernel
blocks``); the default is now the ``hash`` stream (``hashz.py``, drawn by ``compiled.py``), and
``triton_pass.py`` draws a third (Philox). The keys above (:func:`step_seed`, :func:`param_key`)
serve all three.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch

# 2**20 elements (4 MiB of fp32): large enough that reseeding costs nothing next to drawing,
# small enough to bound the extra memory of a step and the waste at shard edges.
BLOCK = 1 << 20

_MASK64 = (1 << 64) - 1

KINDS = ("gaussian", "rademacher")


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap bijective mixer of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _digest63(*parts: object) -> int:
    # Python's hash() of a str is salted per process; ranks must agree, so use blake2b.
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step ``step`` of a run: a pure function, so resume and replay find it again."""
    return _digest63("mezo-step", run_seed, step)


def direction_seed(first: int, k: int) -> int:
    """The seed of direction ``k`` >= 1 of a step whose first direction has seed ``first``."""
    return _digest63("mezo-direction", first, k)


def param_key(seed: int, name: str) -> int:
    """The key of one parameter's noise stream within a step."""
    return _digest63("mezo-param", seed, name)


def _block_seed(key: int, block: int) -> int:
    # torch generators take seeds below 2**63 on every device.
    return _splitmix64(key ^ _splitmix64(block)) >> 1


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """(256, 8) fp32: row v holds +-1 for the bits 0..7 of the byte v."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (bits.to(torch.float32) * 2 - 1).to(device)
    return table


def fill_block(z: torch.Tensor, key: int, block: int, *, kind: str = "gaussian", lo: int = 0, hi: int | None = None) -> None:
    """Write elements ``[lo, hi)`` of block ``block`` of the key's stream into ``z[lo:hi]``.

    ``z`` is an fp32 buffer as long as the block. Gaussian blocks are drawn whole (``normal_``
    cannot skip ahead); Rademacher blocks draw all their bits but expand only the bytes that
    cover ``[lo, hi)``.
    """
    gen = torch.Generator(device=z.device)
    gen.manual_seed(_block_seed(key, block))
    if kind == "gaussian":
        z.normal_(generator=gen)
        return
    if kind != "rademacher":
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {', '.join(KINDS)}")
    n = z.numel()
    hi = n if hi is None else hi
    words = torch.empty(-(-n // 32), dtype=torch.int64, device=z.device).random_(0, 1 << 32, generator=gen)
    # The low four bytes of each word (little-endian), in order: 32 bits per word.
    data = words.view(torch.uint8).view(-1, 8)[:, :4].reshape(-1)
    b_lo, b_hi = lo // 8, -(-hi // 8)
    signs = torch.index_select(_sign_table(z.device), 0, data[b_lo:b_hi].to(torch.int32)).view(-1)
    z[lo:hi].copy_(signs[lo - 8 * b_lo : hi - 8 * b_lo])


def iter_blocks(
    key: int, offset: int, count: int, full_numel: int, *, device: torch.device, buffer: torch.Tensor | None = None,
    kind: str = "gaussian",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(local_start, z_piece)`` covering global elements ``[offset, offset + count)``.

    ``local_start`` is the position of ``z_piece[0]`` relative to ``offset``. The pieces are views
    into one reused buffer: consume each before asking for the next.

    Args:
        key: the parameter's key from :func:`param_key`.
        offset: first global (flattened) index wanted.
        count: number of elements wanted.
        full_numel: number of elements of the whole parameter (fixes the last block's length).
        device: where to draw; the same device kind must be used for results to agree.
        buffer: optional fp32 scratch of at least ``min(BLOCK, full_numel)`` elements on ``device``.
        kind: ``gaussian`` or ``rademacher`` (see the module docstring).
    """
    if count <= 0:
        return
    if offset < 0 or offset + count > full_numel:
        raise ValueError(f"slice [{offset}, {offset + count}) outside a parameter of {full_numel} elements")
    if buffer is None:
        buffer = torch.empty(min(BLOCK, full_numel), dtype=torch.float32, device=device)
    for block, b_start, b_len, lo, hi in block_plan(offset, count, full_numel):
        z = buffer[:b_len]
        fill_block(z, key, block, kind=kind, lo=lo - b_start, hi=hi - b_start)
        yield lo - offset, z[lo - b_start : hi - b_start]


def block_plan(offset: int, count: int, full_numel: int) -> list[tuple[int, int, int, int, int]]:
    """``(block, block start, block length, lo, hi)`` for every block that global elements
    ``[offset, offset + count)`` touch; ``[lo, hi)`` is the wanted part, in global indices."""
    end = offset + count
    out = []
    for block in range(offset // BLOCK, (end - 1) // BLOCK + 1):
        b_start = block * BLOCK
        b_len = min(BLOCK, full_numel - b_start)
        out.append((block, b_start, b_len, max(offset, b_start), min(end, b_start + b_len)))
    return out


def draw(
    key: int, offset: int, count: int, full_numel: int, *, device: torch.device | str = "cpu", kind: str = "gaussian"
) -> torch.Tensor:
    """Return ``z[offset:offset + count]`` of the parameter's full noise vector (fp32).

    Materialises the slice; the step itself streams blocks with :func:`iter_blocks` instead.
    """
    device = torch.device(device)
    out = torch.empty(count, dtype=torch.float32, device=device)
    for start, z in iter_blocks(key, offset, count, full_numel, device=device, kind=kind):
        out[start : start + z.numel()].copy_(z)
    return out
