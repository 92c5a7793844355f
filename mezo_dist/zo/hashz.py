"""The ``hash`` noise stream: z of an element is a pure function of (key, global index).

This module defines the function; ``compiled.py`` evaluates it with ``torch.compile``. The same
source also runs on numpy arrays (:data:`NUMPY`), which is how the tests check the compiled
kernel value for value at any index, including past 2^32, without compiling anything large.

Layout. Global elements are grouped in blocks of ``2 * HALF``; element ``t`` of the first half
and element ``t`` of the second half of a block form a *pair*, numbered
``p = block * HALF + t``. One hash of ``p`` gives two uniforms and, by Box-Muller, two normals:
the first half takes ``X = r cos(theta)``, the second ``Y = r sin(theta)``. Pairs are halves of a
block rather than neighbours so that a kernel over whole blocks reads and writes two contiguous
runs (vector loads); elements at the edges of a slice are drawn one at a time by the same
function (both normals, one kept). Rademacher z takes one bit of the same hash per element.

The hash. Two keyed 32-bit mixers (multiply-xorshift rounds, the constants of the well-known
"lowbias32" and MurmurHash3 finalisers, each with a key word xored in between its rounds) map
the pair number to two 32-bit words. Everything is int64 arithmetic on values below 2^32, and
every product is a 32-bit value times a multiplier of magnitude below 2^31 (multipliers above
2^31 are used as ``m - 2^32``, which leaves the low 32 bits unchanged), so no product reaches
2^63: no signed overflow, which is undefined behaviour in the C++ that inductor generates. Only
non-negative values are shifted right. Pair numbers are taken modulo 2^32 inside the kernel;
the high part (only parameters of more than 2^33 elements have one) is folded into the key
words on the host (:func:`key_words`), and a call never spans two such segments.

The transform. u1 = (m + 1) 2^-24 from 24 bits of the first word (never 0, at most 1), a
signed s in [-1, 1) from 24 bits of the second; theta = pi s. -log2(u1) is the exponent of
the float u1 plus a degree-8 polynomial of its mantissa, cos and sin come from the half angle
(polynomials of degree 5 in s^2 for both), r = sqrt(2 ln 2 (-log2 u1)). Only +, -, *, a correctly
rounded sqrt and exact conversions are used, all in fp32 with every constant an exact fp32
value, so the value is fixed by IEEE 754 alone: no libm, no vector math library, no
rounding that depends on a vector width, a tail loop or an instruction set, provided the
compiler does not contract a*b+c into a fused multiply-add (``compiled.py`` turns contraction
off; inductor's CPU default is off already). |z| <= sqrt(48 ln 2) = 5.77; the polynomials are
accurate to about 4e-7 (log2) and 2e-7 (cos, sin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

# A block is 2 * HALF elements; pairs are (block * 2 HALF + t, block * 2 HALF + HALF + t).
HALF_BITS = 11
HALF = 1 << HALF_BITS
BLOCK = 2 * HALF
# Pair numbers are hashed modulo 2^32; this many elements share one set of key words.
SEGMENT = 1 << 33

_M32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _signed(m: int) -> int:
    # m and m - 2^32 agree modulo 2^32, and |m - 2^32| < 2^31 keeps a 32-bit product below 2^63.
    return m - (1 << 32) if m >= (1 << 31) else m


# (multiplier, multiplier, shifts) of the two mixers: lowbias32 and MurmurHash3's fmix32.
_MIX1 = (_signed(0x21F0AAAD), _signed(0xD35A2D97), (16, 15, 15))
_MIX2 = (_signed(0x85EBCA6B), _signed(0xC2B2AE35), (16, 13, 16))

# Polynomials fitted (near-minimax, then rounded to fp32) to log2(1 + t) / t on [0, 1),
# cos(pi s / 2) and sin(pi s / 2) / s as functions of q = s^2 on [0, 1].
_LOG2 = (1.442694902420044, -0.7213162779808044, 0.4801529049873352, -0.35390543937683105,
         0.2574290335178375, -0.15739619731903076, 0.06507571041584015, -0.012734849005937576)
_COS = (1.0, -1.2337005138397217, 0.2536693215370178, -0.02086268924176693, 0.0009177248575724661,
        -2.3824917661841027e-05)
_SIN = (1.5707963705062866, -0.6459637880325317, 0.07968992739915848, -0.004674157593399286,
        0.00015167852689046413)
_TWO_LN2 = 1.3862943649291992  # fp32 nearest to 2 ln 2


@dataclass(frozen=True)
class Ops:
    """The few operations whose spelling differs between torch and numpy."""

    int32: Any
    float32: Any
    cast: Callable[[Any, Any], Any]
    bitcast: Callable[[Any, Any], Any]
    sqrt: Callable[[Any], Any]
    clamp0: Callable[[Any], Any]
    where: Callable[[Any, Any, Any], Any]


TORCH = Ops(torch.int32, torch.float32, lambda x, d: x.to(d), lambda x, d: x.view(d), torch.sqrt,
            lambda x: torch.clamp_min(x, 0.0), torch.where)
NUMPY = Ops(np.int32, np.float32, lambda x, d: x.astype(d), lambda x, d: x.view(d), np.sqrt,
            lambda x: np.maximum(x, np.float32(0.0)), np.where)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_words(key: int, segment: int) -> list[int]:
    """Four 32-bit key words for elements ``[segment * SEGMENT, (segment + 1) * SEGMENT)`` of
    the parameter whose key is ``key`` (from ``noise.param_key``)."""
    a = _splitmix64(key ^ _splitmix64(segment))
    b = _splitmix64(a ^ 0x6A09E667F3BCC909)
    return [a & _M32, a >> 32, b & _M32, b >> 32]


def _mix(h: Any, k: Any, spec: tuple) -> Any:
    m1, m2, (s1, s2, s3) = spec
    h = h ^ (h >> s1)
    h = (h * m1) & _M32
    h = h ^ k
    h = h ^ (h >> s2)
    h = (h * m2) & _M32
    return h ^ (h >> s3)


def _horner(x: Any, coeffs: tuple) -> Any:
    acc = x * coeffs[-1] + coeffs[-2]
    for c in coeffs[-3::-1]:
        acc = acc * x + c
    return acc


def words(pair: Any, keys: Any) -> tuple[Any, Any]:
    """The two 32-bit words (int64 values) of pair numbers ``pair`` (< 2^32) under ``keys``."""
    return _mix(pair ^ keys[0], keys[1], _MIX1), _mix(pair ^ keys[2], keys[3], _MIX2)


def gaussian_pair(pair: Any, keys: Any, ops: Ops = TORCH) -> tuple[Any, Any]:
    """(X, Y): the normals of the first-half and second-half elements of ``pair`` (fp32)."""
    w1, w2 = words(pair, keys)
    # -log2(u1), u1 = (m + 1) 2^-24 = 2^(e - 151) f with f in [1, 2): 151 - e - log2(f).
    v = ops.cast(w1 >> 8, ops.float32) + 1.0
    bits = ops.bitcast(v, ops.int32)
    f = ops.bitcast((bits & 0x7FFFFF) | 0x3F800000, ops.float32)
    t = f - 1.0
    nlog2 = ops.cast(151 - (bits >> 23), ops.float32) - t * _horner(t, _LOG2)
    r = ops.sqrt(ops.clamp0(nlog2) * _TWO_LN2)
    # theta = pi s; cos and sin of the half angle pi s / 2 give those of theta.
    s = ops.cast(w2 >> 8, ops.float32) * (2.0 ** -23) - 1.0
    q = s * s
    sh = s * _horner(q, _SIN)
    ch = _horner(q, _COS)
    return r * (1.0 - 2.0 * (sh * sh)), r * (2.0 * (sh * ch))


def rademacher_pair(pair: Any, keys: Any, ops: Ops = TORCH) -> tuple[Any, Any]:
    """(X, Y) in {-1, +1}: bits 31 and 30 of the pair's first word."""
    w1 = _mix(pair ^ keys[0], keys[1], _MIX1)
    return (1.0 - 2.0 * ops.cast(w1 >> 31, ops.float32),
            1.0 - 2.0 * ops.cast((w1 >> 30) & 1, ops.float32))


PAIRS = {"gaussian": gaussian_pair, "rademacher": rademacher_pair}


def pair_of(index: Any) -> tuple[Any, Any]:
    """(pair number, second half?) of element indices (int64, relative to their segment)."""
    pair = ((index >> (HALF_BITS + 1)) << HALF_BITS) | (index & (HALF - 1))
    return pair, ((index >> HALF_BITS) & 1) == 1


def element_z(index: Any, keys: Any, kind: str, ops: Ops = TORCH) -> Any:
    """z of element indices ``index`` (relative to their segment), one at a time."""
    pair, second = pair_of(index)
    x, y = PAIRS[kind](pair, keys, ops)
    return ops.where(second, y, x)


def reference(key: int, offset: int, count: int, kind: str = "gaussian") -> np.ndarray:
    """z of global elements ``[offset, offset + count)`` evaluated by numpy (fp32): the
    specification the compiled kernels are tested against."""
    out = np.empty(count, dtype=np.float32)
    start = 0
    while start < count:
        seg, rel = divmod(offset + start, SEGMENT)
        n = min(count - start, SEGMENT - rel)
        keys = np.array(key_words(key, seg), dtype=np.int64)
        out[start : start + n] = element_z(np.arange(rel, rel + n, dtype=np.int64), keys, kind, NUMPY)
        start += n
    return out
