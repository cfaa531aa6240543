"""Compiled kernels for packed weights (phinano/formats/quantized.py), one `MatrixKernels` per type.

`fast.linear`, `fast.embed` and `fast.widen` look a QuantizedTensor's type up in `KERNELS` and call:
- `matmul(x, data, y)`: y = x @ w.T straight from the packed bytes, for few tokens (decode). Parallel over
  blocks of four weight rows like the bf16 kernel: each packed byte is read once per token, unpacked in
  registers, and every x[c] load is shared by four rows (four independent accumulators).
- `widen_rows(data, out)`: packed rows -> float32 rows, serial and without the GIL, for the float32
  tiles that BLAS multiplies in long prefills (several run at once, one per thread) and for `embed`.

Adding a type is adding its two kernels here and one line to `KERNELS` (and its layout in formats).
Activations stay float32 throughout (no int8 rounding of x, unlike llama.cpp's own dot products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange

from .runtime import FASTMATH
from .widening import to_f32


@dataclass(frozen=True)
class MatrixKernels:
    """The compiled kernels that read one kind of stored weight matrix (N, K) row by row. `fast.linear`
    uses one for plain arrays (bf16, float16, float32) and one per quantization type from `KERNELS`."""

    matmul: Callable  # (x (T, K) float32, rows (N, ...), y (T, N) float32 out): y = x @ w.T, parallel
    widen_rows: Callable  # (rows (n, ...), out (n, K) float32 out): unpacked rows; serial, nogil
    blas_min_tokens: int  # from this many tokens on, linear() multiplies widened tiles with BLAS instead


@njit(inline="always")
def _f16_at(row, i):
    """The little-endian float16 at bytes i, i + 1 of a uint8 row, as float32 (exact)."""
    return to_f32(np.int16(np.uint16(row[i]) | (np.uint16(row[i + 1]) << 8)))


@njit(inline="always")
def _i8(byte):
    """A uint8 read as the int8 it stores (two's complement), as float32."""
    return np.float32(np.int8(byte))


# ---------------------------------------------------------------------------------------------------------
# Q8_0: blocks of 32 weights = float16 d (2 bytes) + 32 int8 q; weight = d * q
# ---------------------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _q8_0_matmul(x, data, y):
    """y[t, r] = sum over blocks b of d[r, b] * sum_j x[t, 32 b + j] * q[r, b, j], for x (T, K), y (T, N).

    One work item = four rows r0..r3 (the last item repeats row N - 1 where N is not a multiple of 4: it
    computes that row more than once and writes the same value). Per token and block, four partial sums
    over the 32 int8 values (the j loop vectorises: int8 -> float32 conversions and fused multiply-adds),
    each scaled by its block's d once.
    """
    T, K = x.shape
    N = data.shape[0]
    for item in prange((N + 3) // 4):
        r0 = 4 * item
        r1, r2, r3 = min(r0 + 1, N - 1), min(r0 + 2, N - 1), min(r0 + 3, N - 1)
        w0, w1, w2, w3 = data[r0], data[r1], data[r2], data[r3]
        for t in range(T):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for b in range(K // 32):
                o = 34 * b
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for j in range(32):
                    xc = x[t, 32 * b + j]
                    s0 += xc * _i8(w0[o + 2 + j])
                    s1 += xc * _i8(w1[o + 2 + j])
                    s2 += xc * _i8(w2[o + 2 + j])
                    s3 += xc * _i8(w3[o + 2 + j])
                a0 += _f16_at(w0, o) * s0
                a1 += _f16_at(w1, o) * s1
                a2 += _f16_at(w2, o) * s2
                a3 += _f16_at(w3, o) * s3
            y[t, r0], y[t, r1], y[t, r2], y[t, r3] = a0, a1, a2, a3


@njit(cache=True, nogil=True)
def _q8_0_dequantize_rows(data, out):
    """out[r, 32 b + j] = d[r, b] * q[r, b, j] (exact in float32)."""
    for r in range(data.shape[0]):
        row = data[r]
        for b in range(out.shape[1] // 32):
            d = _f16_at(row, 34 * b)
            for j in range(32):
                out[r, 32 * b + j] = d * _i8(row[34 * b + 2 + j])


KERNELS: dict[str, MatrixKernels] = {
    # BLAS from 32 tokens: the fused kernel stops gaining from about 8 tokens on (each token unpacks the
    # bytes again) and tiles + BLAS pass it between 16 and 32 tokens (`scripts/kernel_bench.py --prefill`,
    # docs/kernels.md).
    "Q8_0": MatrixKernels(_q8_0_matmul, _q8_0_dequantize_rows, blas_min_tokens=32),
}
