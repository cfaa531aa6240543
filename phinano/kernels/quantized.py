"""Compiled kernels for packed weights (phinano/formats/quantized.py), one `MatrixKernels` per type.

`fast.linear`, `fast.embed` and `fast.widen` look a QuantizedTensor's type up in `KERNELS` and call:
- `matmul(x, data, y)`: y = x @ w.T straight from the packed bytes, for few tokens (decode). Parallel over
  blocks of four rows: each packed byte is read once per token, unpacked in registers, and every x load is
  shared by the four rows. The loop over a row's blocks is written as explicit vector code in vector.py
  (`_vector_matmul` calls it), because these products are bound by arithmetic.
- `widen_rows(data, out)`: packed rows -> float32 rows, serial and without the GIL, for the float32
  tiles that BLAS multiplies in long prefills (several run at once, one per thread) and for `embed`.

Adding a type is adding its two kernels and one entry to `KERNELS`, here or in a module of its own as
kquants.py does (and its layout in formats).
Activations stay float32 throughout (no int8 rounding of x, unlike llama.cpp's own dot products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import vector
from .runtime import FASTMATH
from .widening import to_f32


@dataclass(frozen=True)
class MatrixKernels:
    """The compiled kernels that read one kind of stored weight matrix (N, K) row by row. `fast.linear`
    uses one for plain arrays (bf16, float16, float32) and one per quantization type from `KERNELS`."""

    matmul: Callable  # (x (T, K) float32, rows (N, ...), y (T, N) float32 out): y = x @ w.T, parallel
    widen_rows: Callable  # (rows (n, ...), out (n, K) float32 out): unpacked rows; serial, nogil
    blas_min_tokens: int  # from this many tokens on, linear() multiplies widened tiles with BLAS instead
    # For `linear_rows` (a batch of decode rows, one per sequence): a kernel with matmul's signature that reads
    # each weight block once and sums every row exactly as `matmul` sums a single token, so each row is bit
    # for bit what it would be alone. None: `matmul` itself does so (it sums each token with the same code,
    # whatever T), which holds for every kernel in this file and kquants.py.
    matmul_rows: Callable | None = None


@njit(inline="always")
def _f16_at(row, i):
    """The little-endian float16 at bytes i, i + 1 of a uint8 row, as float32 (exact)."""
    return to_f32(np.int16(np.uint16(row[i]) | (np.uint16(row[i + 1]) << 8)))


@njit(inline="always")
def _i8(byte):
    """A uint8 read as the int8 it stores (two's complement), as float32."""
    return np.float32(np.int8(byte))


@njit(fastmath=FASTMATH, cache=True)
def _sums_of_32(x):
    """(T, K) float32 -> (T, K // 32): the sum of each block of 32 values of each row. A block's zero point or
    minimum m multiplies the sum of x over the block, the same for every row: made once per call."""
    T, K = x.shape
    sums = np.empty((T, K // 32), np.float32)
    for t in range(T):
        for j in range(K // 32):
            s = np.float32(0.0)
            for i in range(32):
                s += x[t, 32 * j + i]
            sums[t, j] = s
    return sums


# ---------------------------------------------------------------------------------------------------------
# The fused decode product of every block type of 32 weights (Q8_0 and the legacy types)
# ---------------------------------------------------------------------------------------------------------


assert vector.ROWS == 4  # a work item of the kernel below is 4 rows, r0 = 4 item


def _vector_matmul(qtype: str):
    """The fused decode kernel of a block type that vector.py writes out: y = x @ w.T from the packed bytes."""
    kind = vector.TYPES.index(qtype)  # a number, so that Numba's cache can key this closure on it

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def matmul(x, data, y):
        """y[t, r] = sum_c x[t, c] w[r, c] for x (T, K), packed rows data (N, L), y (T, N).

        One work item = four rows r0 .. r0 + 3. `vector.dot` walks their blocks side by side for
        vector.BLOCK_TOKENS tokens at once (4 on AVX-512): each block's integers and scale are unpacked once
        and serve all of them, each x load serves the four rows, and each (token, row) keeps one accumulator
        of WIDTH lanes. A single token (decode) takes a tile of one. The first call also prefetches the
        bytes ahead (the later tokens find them in cache). Every token is summed by the same instructions,
        whatever T and wherever it falls in a tile: bit for bit what it gives alone (`linear_rows`).
        """
        sums = _sums_of_32(x)  # (T, K // 32): the sum of x over each block, the same for every row
        T = x.shape[0]
        for item in prange((data.shape[0] + 3) // 4):
            r0, t = 4 * item, 0
            while vector.BLOCK_TOKENS > 1 and T - t >= 2:  # tiles; the last may repeat the last token
                vector.dot(kind, t == 0, True, x, sums, data, y, r0, t)
                t += vector.BLOCK_TOKENS
            while t < T:
                vector.dot(kind, t == 0, False, x, sums, data, y, r0, t)
                t += 1

    return matmul


# ---------------------------------------------------------------------------------------------------------
# Q8_0: blocks of 32 weights = float16 d (2 bytes) + 32 int8 q; weight = d * q
# ---------------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _q8_0_dequantize_rows(data, out):
    """out[r, 32 b + j] = d[r, b] * q[r, b, j] (exact in float32).

    The j loop runs to `block`, 32 read at run time, as in the legacy types' `widen_rows`: with a count it can
    see, LLVM unrolls the 32 steps into scalar code instead of vectorising them (measured 1.7 against 6 G
    weights/s per thread, AMD EPYC Zen 3)."""
    block = min(32, out.shape[1])
    for r in range(data.shape[0]):
        row = data[r]
        for b in range(out.shape[1] // 32):
            d = _f16_at(row, 34 * b)
            for j in range(block):
                out[r, 32 * b + j] = d * _i8(row[34 * b + 2 + j])


# ---------------------------------------------------------------------------------------------------------
# Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 weights = float16 d, [float16 m], [4 bytes qh], 16 bytes of nibbles
# (byte layouts in phinano/formats/quantized.py). Every weight is d * q + m with q in 0..31 (a nibble, plus
# 16 where qh's bit is set), m the stored min (Q4_1, Q5_1) or -8 d (Q4_0), -16 d (Q5_0). One row unpacking
# serves all four: `_legacy_kernels` compiles it per type, with the block's offsets as constants.
# ---------------------------------------------------------------------------------------------------------


@njit(inline="always")
def _u32_at(row, i):
    """The little-endian uint32 at bytes i .. i + 3 of a uint8 row (the fifth bits qh of a Q5 block)."""
    return np.uint32(row[i] | np.uint32(row[i + 1]) << 8 | np.uint32(row[i + 2]) << 16 | np.uint32(row[i + 3]) << 24)


@intrinsic
def _shift_right_u32(typingctx, value, shift):
    """value >> shift for a uint32 value, computed in 32 bits (one `lshr i32`; Numba's own >> works in 64
    bits, which halves the lanes of the vector instructions around it). shift must be below 32."""
    if value != types.uint32 or not isinstance(shift, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.lshr(args[0], builder.trunc(args[1], ir.IntType(32)))

    return types.uint32(value, shift), codegen


@njit(inline="always")
def _quant_pair(row, qs, qh, i, has_qh):
    """(q[i], q[i + 16]) of a block whose nibble bytes start at row[qs], as float32 (exact).

    Byte i splits into its high nibble floor(byte / 16) (q[i + 16]) and low nibble byte - 16 * high (q[i]),
    in float arithmetic: fewer vector instructions than masks and shifts on Numba's 64-bit integers. With
    has_qh, bit i of the uint32 qh adds 16 to q[i] and bit i + 16 adds 16 to q[i + 16].
    """
    byte = np.float32(row[qs + i])
    hi = np.floor(byte * np.float32(1 / 16))
    lo = byte - np.float32(16) * hi
    if has_qh:
        lo += np.float32(_shift_right_u32(np.uint32(qh << 4), i) & 16)  # bit i, moved to the 16s place
        hi += np.float32(_shift_right_u32(qh, i + 12) & 16)  # bit i + 16, moved to the 16s place
    return lo, hi


def _legacy_kernels(qtype: str, has_min: bool, has_qh: bool, blas_min_tokens: int) -> MatrixKernels:
    """The kernels of one legacy type: Q4_0 (no m, no qh), Q4_1 (m), Q5_0 (qh), Q5_1 (m and qh). The fused
    product is `_vector_matmul`'s; the row unpacking is below.

    The kernel below sees only numbers from here (Numba compiles them as constants, and its cache tells the
    four types apart by them); a compiled function captured here would miss the cache in every new process.
    """
    qh_at = 4 if has_min else 2  # offsets in a block: d at 0, m at 2, then qh, then the 16 nibble bytes
    qs_at = qh_at + 4 if has_qh else qh_at
    size = qs_at + 16  # bytes per block
    zero = np.float32(0 if has_min else 16 if has_qh else 8)  # without m, weight = d * (q - zero)

    @njit(cache=True, nogil=True)
    def widen_rows(data, out):
        """out[r, 32 b + j] = d * (q[j] - zero) + m, the float32 operations of the NumPy layout (exact products,
        then one rounding where m is added; m = 0.0 is not added, which keeps the sign of -0.0 as NumPy does).

        The i loop runs to `half`, 16 read at run time: with a count it can see, LLVM unrolls the 16 steps
        into scalar code before it would vectorise them (measured 4x slower for the 4-bit types).
        """
        half = min(16, out.shape[1])
        for r in range(data.shape[0]):
            row = data[r]
            for b in range(out.shape[1] // 32):
                o = size * b
                d = _f16_at(row, o)
                qh = _u32_at(row, o + qh_at) if has_qh else np.uint32(0)
                for i in range(half):
                    lo, hi = _quant_pair(row, o + qs_at, qh, i, has_qh)
                    wl, wh = d * (lo - zero), d * (hi - zero)
                    if has_min:
                        wl, wh = wl + _f16_at(row, o + 2), wh + _f16_at(row, o + 2)
                    out[r, 32 * b + i], out[r, 32 * b + 16 + i] = wl, wh

    return MatrixKernels(_vector_matmul(qtype), widen_rows, blas_min_tokens)


def _tiled(with_tiles: int, without: int) -> int:
    """A type's BLAS switch: `with_tiles` where the fused kernel runs tiles of several tokens
    (vector.BLOCK_TOKENS > 1), else `without`."""
    return with_tiles if vector.BLOCK_TOKENS > 1 else without


KERNELS: dict[str, MatrixKernels] = {
    # BLAS from 16 tokens: the fused kernel unpacks the bytes again for every token, a tile only once. Since
    # tiles grow with the tokens (`fast.TILE_ROWS_PER_TOKEN`), a short prompt's tiles stay in cache: Q8_0 and
    # Q4_0, 8192 x 3072 (3 matrices in turn), 2 threads, ms fused / tiles + BLAS, medians of 5-7 (AMD EPYC
    # Zen 3, 2026-11-30): Q8_0 12 tokens 12.1 / 14.5, 14 tokens 19.8 / 19.9, 16 tokens 20.6 / 17.3 and
    # 17.6 / 15.5, 24 tokens 30.3 / 20.8; Q4_0 12 tokens 12.7 / 14.1, 14 tokens 19.7 / 19.7, 16 tokens
    # 16.9 / 16.3 and 24.4 / 20.3, 24 tokens 25.3 / 19.0. (With 16 MB tiles the switches lay at 40 and 24.)
    # Where the fused kernel unpacks once for several tokens (vector.BLOCK_TOKENS > 1: AVX-512), BLAS pays
    # off later. Intel Xeon (Emerald Rapids), 2026-12-01, 8192 x 3072, 2 threads, matrices in turn, ms fused /
    # tiles + BLAS: Q8_0 32 tokens 12.3 / 17.3, 48 tokens 19.6 / 21.8; Q4_0 32 12.3 / 16.7, 48 19.6 / 19.0;
    # Q4_1 32 14.1 / 16.9, 48 21.1 / 18.4; Q5_0 32 14.9 / 17.7, 48 23.2 / 19.1; Q5_1 32 17.0 / 17.1.
    # Q4_0 and Q4_1 moved on with their tables of weights (`vector.nibble_table_dot`, tiles 1.2-1.4x faster):
    # the same Intel, later that day, medians of 7 paired turns, ms fused / tiles + BLAS: Q4_0 56 tokens
    # 20.0 / 25.3, 64 24.8 / 30.4, 72 24.0 / 26.1 (even), 88 37.6 / 38.2; Q4_1 56 25.5 / 29.0, 64 29.8 / 31.5,
    # 72 31.9 / 31.0; Q8_0 48 26.1 / 26.5 (even). Q5_0 40 25.5 / 24.3 and Q5_1 40 30.2 / 26.1 keep theirs.
    "Q8_0": MatrixKernels(_vector_matmul("Q8_0"), _q8_0_dequantize_rows, blas_min_tokens=_tiled(48, 16)),
    # Without tiles Q4_1 unpacks at about Q4_0's rate (docs/quantization.md) and takes the same switch. The
    # 5-bit types' switch there was measured with the plain loops they had before (between 4 and 8 tokens,
    # AMD EPYC guest, load average 4-5 from other jobs; `scripts/kernel_bench.py --prefill`).
    "Q4_0": _legacy_kernels("Q4_0", has_min=False, has_qh=False, blas_min_tokens=_tiled(72, 16)),
    "Q4_1": _legacy_kernels("Q4_1", has_min=True, has_qh=False, blas_min_tokens=_tiled(64, 16)),
    "Q5_0": _legacy_kernels("Q5_0", has_min=False, has_qh=True, blas_min_tokens=_tiled(40, 8)),
    "Q5_1": _legacy_kernels("Q5_1", has_min=True, has_qh=True, blas_min_tokens=_tiled(32, 8)),
}
