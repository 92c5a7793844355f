"""The fused CUDA pass: x <- (x + a z) c + b z with z drawn in registers, no z buffer.

z of the element at global index i of a parameter is ``tl.randn(key, i)`` (Gaussian) or the low
bit of ``tl.randint(key, i)`` mapped to +-1 (Rademacher): Triton's Philox keyed by the
parameter's 63-bit key, counting by the element's index in the full flattened parameter. Every
shard of every layout therefore computes the same z for an element, on any CUDA device, and a
shard touches only its own elements. Indices are 32-bit for parameters below 2^31 elements and
64-bit above (Philox-4x64), a choice that depends on the parameter's size only.

Imported only when ``triton`` is importable and a piece lives on CUDA (see ``passes.py``); the
CPU path is the blocks stream of ``noise.py``. Under Triton's interpreter (``TRITON_INTERPRET=1``
before this module is imported) the kernel runs on CPU tensors too: the tests use that to check
slice invariance, the affine arithmetic and 2-rank equivalence on machines without a GPU, and run
the compiled kernel on CUDA where there is one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_BLOCK = 1024
_INT32_LIMIT = 2**31 - 1


@triton.jit
def _affine_kernel(x_ptr, n, offset, seed, a, c, b,
                   RADEMACHER: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < n
    if WIDE:
        idx = local + offset
    else:
        # Every global index of this parameter fits in 31 bits (checked on the host).
        idx = (local + offset).to(tl.int32)
    if RADEMACHER:
        bits = tl.randint(seed, idx)
        z = tl.where((bits & 1) == 1, 1.0, -1.0)
    else:
        z = tl.randn(seed, idx)
    x = tl.load(x_ptr + local, mask=mask, other=0.0).to(tl.float32)
    y = (x + a * z) * c + b * z
    tl.store(x_ptr + local, y.to(x_ptr.dtype.element_ty), mask=mask)


def affine_(x: torch.Tensor, key: int, offset: int, full_numel: int, a: float, c: float, b: float, *, kind: str) -> None:
    """In place on the contiguous 1-D CUDA tensor ``x`` holding global elements
    ``[offset, offset + x.numel())`` of a parameter of ``full_numel`` elements."""
    n = x.numel()
    if n == 0:
        return
    if not ((x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1") and x.dim() == 1 and x.is_contiguous()):
        raise ValueError("the fused pass needs a contiguous 1-D CUDA tensor (any device under TRITON_INTERPRET=1)")
    if offset < 0 or offset + n > full_numel:
        raise ValueError(f"slice [{offset}, {offset + n}) outside a parameter of {full_numel} elements")
    grid = (triton.cdiv(n, _BLOCK),)
    _affine_kernel[grid](
        x, n, offset, key, float(a), float(c), float(b),
        RADEMACHER=kind == "rademacher", WIDE=full_numel > _INT32_LIMIT, BLOCK=_BLOCK,
    )
