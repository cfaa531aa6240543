"""Compiled kernels for GGML's K-quants (phinano/formats/kquants.py draws their bytes): Q4_K, Q5_K, Q6_K.

Two kernels per type, as for Q8_0 in quantized.py, added to its `KERNELS` when this module is imported
(fast.py imports it):
- `matmul(x, data, y)`: y = x @ w.T straight from the packed bytes, for few tokens (decode). Parallel over
  blocks of rows; per token each packed byte is read once and unpacked in registers, and every x load is
  shared by the rows of the block. Activations stay float32; sums are float32.
- `widen_rows(data, out)`: packed rows -> float32 rows, serial and without the GIL, for the BLAS tiles of
  long prefills and for `embed`. Bit for bit what `formats.kquants` gives (every product is exact).

Unpacking 4-, 5- and 6-bit numbers takes more instructions than reading Q8_0's bytes, so these products
are limited by arithmetic, not by memory. What keeps the instruction count down (measured on the 2-core
AMD EPYC (Zen 3, AVX2) machine, each kernel against the Q8_0 kernel in the same run):
- `_bits` does the shifts and masks in 32-bit lanes (an LLVM intrinsic). Numba's own integer arithmetic
  widens bytes to 64 bits, and the Q4_K loop ran 1.2 to 1.5 times slower with it.
- Q4_K, Q5_K: the fused product is written as explicit 8-lane vector code (vector.py,
  `k_quant_tile_dot`): per row and sub-block of 32, x * q summed in 8 lanes of 4, scaled by d * sc into
  one accumulator; the minimums add -dmin * m[j] * (sum of x over sub-block j) to lane j, and those sums
  of x are the same for every row: `_sums_of_32` makes them once per call. The 16 six-bit scales and
  minimums come out of three 32-bit words with four masks (`_scales_and_mins` here for the row unpacking,
  `_six_bit_scales` there; on AVX-512 two byte shuffles, `_six_bit_scales_by_shuffle`); unpacked one by
  one into a scratch array they took 30 % of the time. The
  plain Numba loop this replaced ran 1.5-1.7x slower (docs/kernels.md, "Explicit vector loops").
- Q6_K: explicit vector code too (`q6_k_tile_dot`): per quarter of 32 weights, x . (q - 32) in 8 lanes
  of 4, scaled by d * sc of its two sub-blocks into the row's one accumulator, one row per work item. The
  plain loop before it made the weight d * sc * (q - 32) in a register and multiplied it with x; the first
  vector loop ran 1.4-1.5x faster.
- On AVX-512, Q4_K runs 16 lanes with its weights looked up in a per-sub-block table, and Q4_K and Q6_K
  run tiles of 4 tokens (`vector.q4_k_tile_dot`, `vector.q6_k_wide_tile_dot`): each super-block unpacked
  once for all of them, each token summed as it is alone (strict IR), for batched decode and short prompts.
- Q5_K and Q6_K read their packed bytes 32 at a time and take byte p of every 4-byte lane as one vector,
  so x comes permuted to match (`_in_byte_lane_order`, once per call): 1.2-1.5x over widening 8 bytes at
  a time (docs/kernels.md). On AVX-512, Q6_K runs in 16 lanes in x's own order instead
  (`vector.q6_k_wide_tile_dot`: 64 bytes of numbers q - 32 at a time, 1.2-1.35x; with AVX-512 VBMI each
  sub-block's 16 numbers by one byte permute, `vector._top_bytes`, 1.18x more).
Unpacking each super-block once into a buffer of small integers and then multiplying (amortised over
tokens) was also tried: slower for Q4_K and Q5_K at one token, faster only for Q6_K.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import vector
from .quantized import KERNELS, MatrixKernels, _f16_at, _i8, _sums_of_32, _u32_at
from .runtime import FASTMATH


@intrinsic
def _bits(typingctx, low, low_shift, high, high_shift, high_mask, offset):
    """float32((((low >> low_shift) & 15) | (((high >> high_shift) & high_mask) << 4)) - offset).

    Four low bits of a quantized weight from one byte, its high bits (if any) from another, in 32-bit
    integer arithmetic (Numba's own would widen to 64 bits; vectorised, that is twice the work). All
    arguments are integers; a mask of 0 means no high bits.
    """

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def word(value):
            width = value.type.width
            return value if width == 32 else builder.zext(value, i32) if width < 32 else builder.trunc(value, i32)

        lo, lo_shift, hi, hi_shift, hi_mask, minus = (word(a) for a in args)
        q = builder.and_(builder.lshr(lo, lo_shift), ir.Constant(i32, 15))
        q = builder.or_(q, builder.shl(builder.and_(builder.lshr(hi, hi_shift), hi_mask), ir.Constant(i32, 4)))
        return builder.sitofp(builder.sub(q, minus), ir.FloatType())

    if all(isinstance(a, types.Integer) for a in (low, low_shift, high, high_shift, high_mask, offset)):
        return types.float32(low, low_shift, high, high_shift, high_mask, offset), codegen
    return None


@njit(inline="always")
def _scales_and_mins(row, o):
    """The 6-bit sc[0..7] and m[0..7] of the Q4_K/Q5_K super-block at byte o: byte j of each returned word.

    Bytes 0-3 of the scale bytes (word a) hold sc[0..3] in their low six bits and bits 4-5 of sc[4..7]
    on top; bytes 4-7 (word b) the same for m; bytes 8-11 (word c) the low nibbles of sc[4..7] and m[4..7].
    """
    a, b, c = _u32_at(row, o + 4), _u32_at(row, o + 8), _u32_at(row, o + 12)
    sc = (a & 0x3F3F3F3F) | ((c & 0x0F0F0F0F) | (a >> 2 & 0x30303030)) << 32
    m = (b & 0x3F3F3F3F) | ((c >> 4 & 0x0F0F0F0F) | (b >> 2 & 0x30303030)) << 32
    return sc, m


@njit(inline="always")
def _byte(word, j):
    """Byte j of an integer word, as float32."""
    return np.float32(word >> 8 * j & 0xFF)


# ---------------------------------------------------------------------------------------------------------
# Q4_K and Q5_K: super-blocks of 256 = 8 sub-blocks of 32, weight = d * sc[j] * q - dmin * m[j]
# ---------------------------------------------------------------------------------------------------------


@njit(inline="always")
def _low_and_high(row, o, g, i, five):
    """q of weights 64g + i (low nibble: sub-block 2g) and 64g + 32 + i (high nibble: 2g + 1) of the Q4_K
    (five=False) or Q5_K (five=True) super-block at byte o. Q5_K adds bit j of qh[i] as q's 16s bit."""
    if five:
        byte, qh = row[o + 48 + 32 * g + i], row[o + 16 + i]
        return _bits(byte, 0, qh, 2 * g, 1, 0), _bits(byte, 4, qh, 2 * g + 1, 1, 0)
    byte = row[o + 16 + 32 * g + i]
    return _bits(byte, 0, byte, 0, 0, 0), _bits(byte, 4, byte, 0, 0, 0)


@njit(cache=True)
def _in_byte_lane_order(x):
    """x (T, K) in the order in which the Q5_K and Q6_K loops of vector.py unpack a row: they read 32 bytes
    as 8 lanes of 4 and take byte p of every lane, weights 4l + p, l = 0..7. So in every run of 32, x[4l + p]
    moves to 8p + l (each run read as an 8 x 4 matrix and transposed)."""
    T, K = x.shape
    out = np.empty_like(x)
    for t in range(T):
        for run in range(0, K, 32):
            for lane in range(8):
                for p in range(4):
                    out[t, run + 8 * p + lane] = x[t, run + 4 * lane + p]
    return out


def _q4_k_or_q5_k(five: bool) -> MatrixKernels:
    """The kernels of Q4_K (five=False) or Q5_K (five=True). Their loops are the same; only the block
    size and `_low_and_high` differ. `five` is a constant of the compiled code (Numba folds the values a
    closure holds), so the Q4_K kernels contain no Q5_K work; the cache keys on it too."""
    block_bytes = 176 if five else 144

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def matmul(x, data, y):
        """y[t, r] = sum over super-blocks of d * sum_j sc[j] * (x . q over sub-block j)
                                           - dmin * sum_j m[j] * (sum of x over sub-block j).

        One work item = two rows r0, r0 + 1. Tiles of tokens walk both rows' super-blocks side by side
        (vector.py draws the loops): each packed byte read once and unpacked once for the tile's tokens,
        each x load shared by the two rows; a token past the end repeats the last one, and a single token
        (decode) takes a tile of one. Q4_K on AVX-512 runs 16 lanes with its weights by table
        (`vector.q4_k_tile_dot`, Q4_K_TOKENS tokens a tile); otherwise 8 lanes (`vector.k_quant_tile_dot`,
        K_TOKENS tokens: 4 on AVX-512, 1 elsewhere). Every token is summed by the same instructions whatever
        the tile: bit for bit what it gives alone. The first tile also prefetches the bytes ahead.
        """
        sums = _sums_of_32(x)  # (T, K // 32): the sum of x over each sub-block, shared by all rows
        T = x.shape[0]
        if not five and vector.Q4_K_TOKENS > 0:  # Q4_K on AVX-512: 16 lanes, tiles of tokens
            for item in prange((data.shape[0] + 1) // 2):
                r0, t = 2 * item, 0
                while T - t >= 2:  # tiles; the last may repeat the last token
                    vector.q4_k_tile(t == 0, True, x, sums, data, y, r0, t)
                    t += vector.Q4_K_TOKENS
                while t < T:
                    vector.q4_k_tile(t == 0, False, x, sums, data, y, r0, t)
                    t += 1
        else:
            x_in = _in_byte_lane_order(x) if five else x  # the order the Q5_K loop unpacks in (vector.py)
            for item in prange((data.shape[0] + 1) // 2):
                r0, t = 2 * item, 0
                while vector.K_TOKENS > 1 and T - t >= 2:
                    vector.k_quant_tile(five, t == 0, True, x_in, sums, data, y, r0, t)
                    t += vector.K_TOKENS
                while t < T:
                    vector.k_quant_tile(five, t == 0, False, x_in, sums, data, y, r0, t)
                    t += 1

    @njit(cache=True, nogil=True)
    def widen_rows(data, out):
        """out[r, 256 b + 32 j + i] = (d * sc[j]) * q - dmin * m[j]: the products are exact, so this is
        the one float32 rounding GGML's own arithmetic makes."""
        for r in range(data.shape[0]):
            row = data[r]
            for b in range(out.shape[1] // 256):
                o = block_bytes * b
                d, dmin = _f16_at(row, o), _f16_at(row, o + 2)
                sc, m = _scales_and_mins(row, o)
                for g in range(4):
                    c = 256 * b + 64 * g
                    d_low, d_high = d * _byte(sc, 2 * g), d * _byte(sc, 2 * g + 1)
                    m_low, m_high = dmin * _byte(m, 2 * g), dmin * _byte(m, 2 * g + 1)
                    for i in range(32):
                        q_low, q_high = _low_and_high(row, o, g, i, five)
                        out[r, c + i] = d_low * q_low - m_low
                        out[r, c + 32 + i] = d_high * q_high - m_high

    # The fused kernel unpacks every byte again for each token, a tile only once. Q4_K with the explicit
    # vector loop and tiles that grow with the tokens (`fast.TILE_ROWS_PER_TOKEN`), 8192 x 3072 (3 matrices
    # in turn), 2 threads, ms fused / tiles + BLAS, medians of 5-7 (AMD EPYC Zen 3, 2026-11-30): 12 tokens
    # 15.5 / 16.1, 14 tokens 19.5 / 17.4, 16 tokens 20.7 / 16.8 and 19.7 / 19.4, 20 tokens 26.0 / 18.3 (with
    # 16 MB tiles the switch lay at 20). Q5_K's switch (8) was measured with the plain loop before it
    # (`scripts/kernel_bench.py --prefill`: tiles 4.8 against 3.5 GFLOP/s at 8 tokens). Q4_K's tiles of
    # tokens on AVX-512 move its switch: Intel Xeon (Emerald Rapids), 2026-12-01, same shape, ms fused /
    # BLAS: 16 tokens 7.2 / 11.9, 32 14.7 / 15.7, 48 24.3 / 18.9. Q5_K's there: 16 tokens 8.9 / 13.2,
    # 24 13.8 / 15.1, 32 18.5 / 17.7.
    if five:
        return MatrixKernels(matmul, widen_rows, blas_min_tokens=28 if vector.K_TOKENS > 1 else 8)
    return MatrixKernels(matmul, widen_rows, blas_min_tokens=40 if vector.Q4_K_TOKENS else 16)


# ---------------------------------------------------------------------------------------------------------
# Q6_K: super-blocks of 256 = 16 sub-blocks of 16, weight = d * sc[j] * (q - 32), q = 6 bits
# ---------------------------------------------------------------------------------------------------------


@njit(inline="always")
def _q6_k_quarters(row, o, h, i):
    """q - 32 of the four weights 128h + i, + 32, + 64, + 96 of the Q6_K super-block at byte o (i < 32):
    their low nibbles are in ql bytes 64h + i and 64h + 32 + i, their high bit pairs in qh byte 32h + i."""
    first, second, high = row[o + 64 * h + i], row[o + 64 * h + 32 + i], row[o + 128 + 32 * h + i]
    return (
        _bits(first, 0, high, 0, 3, 32),
        _bits(second, 0, high, 2, 3, 32),
        _bits(first, 4, high, 4, 3, 32),
        _bits(second, 4, high, 6, 3, 32),
    )


@njit(inline="always")
def _q6_k_scales(row, o, h, k):
    """d * sc of the four sub-blocks that `_q6_k_quarters` reads for i in 16k .. 16k + 15 (exact)."""
    d = _f16_at(row, o + 208)
    j = o + 192 + 8 * h + k  # scales of quarters 0..3 are 2 apart
    return d * _i8(row[j]), d * _i8(row[j + 2]), d * _i8(row[j + 4]), d * _i8(row[j + 6])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _q6_k_matmul(x, data, y):
    """y[t, r] = sum over sub-blocks j of (d * sc[j]) * (x . (q - 32) over sub-block j).

    One work item = one row. On AVX-512 `vector.q6_k_wide_tile_dot` walks the row's super-blocks in 16
    lanes (64 bytes of numbers q - 32 at a time, in x's own order, times d * sc: the weights, into four
    accumulators per token), for tiles of Q6_K_TOKENS tokens, each half super-block unpacked once for all
    of them. Elsewhere `vector.q6_k_tile_dot` runs 8 lanes one token a pass (per quarter of 32 weights,
    q - 32 from one 32-byte load each of ql and qh, byte p of every 4-byte lane times x in byte-lane
    order, scaled by d * sc). The first tile prefetches the bytes ahead.
    """
    x_bl = x if vector.Q6_K_WIDE else _in_byte_lane_order(x)  # (T, K), made once: the same for every row
    T = x.shape[0]
    for r in prange(data.shape[0]):
        t = 0
        while vector.Q6_K_TOKENS > 1 and T - t >= 2:  # tiles; the last may repeat the last token
            vector.q6_k_tile(t == 0, True, x_bl, data, y, r, t)
            t += vector.Q6_K_TOKENS
        while t < T:
            vector.q6_k_tile(t == 0, False, x_bl, data, y, r, t)
            t += 1


@njit(cache=True, nogil=True)
def _q6_k_dequantize_rows(data, out):
    """out[r, 256 b + 16 j + i] = (d * sc[j]) * (q - 32) (exact in float32)."""
    for r in range(data.shape[0]):
        row = data[r]
        for b in range(out.shape[1] // 256):
            o = 210 * b
            for h in range(2):
                for k in range(2):
                    d0, d1, d2, d3 = _q6_k_scales(row, o, h, k)
                    c = 256 * b + 128 * h
                    for i in range(16 * k, 16 * k + 16):
                        q0, q1, q2, q3 = _q6_k_quarters(row, o, h, i)
                        out[r, c + i], out[r, c + 32 + i] = d0 * q0, d1 * q1
                        out[r, c + 64 + i], out[r, c + 96 + i] = d2 * q2, d3 * q3


KERNELS.update(
    {
        "Q4_K": _q4_k_or_q5_k(five=False),
        "Q5_K": _q4_k_or_q5_k(five=True),
        # BLAS from 8 tokens: even at 4, 4.6 vs 3.7 GFLOP/s at 8 (`scripts/kernel_bench.py --prefill`). With
        # tiles of tokens (AVX-512), from 24: Intel Xeon (Emerald Rapids), 2026-12-01, 8192 x 3072, 2 threads,
        # ms fused / BLAS: 16 tokens 9.7 / 13.4, 24 14.6 / 14.4, 32 19.1 / 16.8.
        "Q6_K": MatrixKernels(_q6_k_matmul, _q6_k_dequantize_rows, blas_min_tokens=24 if vector.Q6_K_TOKENS else 8),
    }
)
