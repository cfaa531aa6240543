"""e^x in float32, written so that a loop of it vectorises: `exp32(x)`, for compiled code.

Numba compiles `np.exp` in a loop to one call of the C library's `expf` per element (its vector exp needs
Intel's SVML, which does not come with it): about 6.5 ns each on AMD EPYC (Zen 3), where the rest of a
softmax or SwiGLU loop costs a small part of that. `exp32` is plain arithmetic, which LLVM inlines and
vectorises together with the loop around it:

    k   = round(x / ln 2)                 e^x = 2^k e^r
    r   = x - k ln2_hi - k ln2_lo         |r| <= ln 2 / 2. ln 2 in two parts (Cody and Waite): ln2_hi has
                                          9 significant bits, so k ln2_hi is exact and r keeps its low bits
    e^r = 1 + r + r^2 p(r)                p of degree 5, Cephes's minimax coefficients for expf
    2^k = 2^(k // 2) 2^(k - k // 2)       each factor a float32 made from its exponent bits; two factors, so
                                          that a subnormal result (x below -87.3) is rounded only once

Accuracy: within 2 units in the last place of e^x wherever e^x is a normal float32, within one subnormal step
below that; inf above 88.72, 0 below -103.98, nan for nan, as `np.exp` (tests/test_expf.py, against float64).

Not compiled with fastmath: reassociation would let LLVM fold k ln2_hi + k ln2_lo into k ln 2, and r
would lose its low bits. The callers may be fastmath: LLVM keeps each instruction's own flags when it
inlines this function into them.

Editing this file: the kernels that call `exp32` (fast.py) are cached on their own file; touch it after a
change here.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .widening import f32_from_bits

LOG2E = np.float32(1.44269504088896341)  # 1 / ln 2
LN2_HI = np.float32(0.693359375)  # ln 2 rounded to 9 significant bits: k ln2_hi is exact for |k| < 2^15
LN2_LO = np.float32(-2.12194440e-4)  # ln 2 - LN2_HI
P = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
     np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))  # r^5 .. r^0
HIGHEST = np.float32(89.0)  # e^89 overflows float32: inf
LOWEST = np.float32(-104.0)  # e^-104 rounds to 0


@njit(inline="always")
def _power_of_two(k):
    """2^k as a float32, for an int32 k in -126 .. 127: k + 127 in the exponent bits, the rest 0."""
    return f32_from_bits(np.int32((k + 127) << 23))


@njit(cache=True)
def exp32(x):
    """e^x for a float32 x, as a float32 (see the module docstring)."""
    if x != x:  # nan
        return x
    x = min(max(x, LOWEST), HIGHEST)
    k = np.floor(x * LOG2E + np.float32(0.5))  # (float32) nearest integer to x / ln 2
    r = (x - k * LN2_HI) - k * LN2_LO
    p = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5]
    er = p * (r * r) + r + np.float32(1.0)  # e^r
    ki = np.int32(k)
    half = ki >> 1  # floor(k / 2): both factors stay in -76 .. 64
    return er * _power_of_two(half) * _power_of_two(ki - half)
