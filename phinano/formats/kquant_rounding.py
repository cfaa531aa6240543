"""llama.cpp's K-quant rounding in NumPy: Q4_K, Q5_K and Q6_K blocks, byte for byte what `llama-quantize` writes.

The `gguf` package reads K-quants but cannot write them, so this is a port of ggml-quants.c's reference
quantizers: `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`, `quantize_row_q6_K_ref` and their helpers
`make_qkx2_quants`, `make_qx_quants` and `nearest_int`. Without an importance matrix, llama.cpp's quantizer
(`llama_model_quantize` -> `ggml_quantize_chunk` -> `quantize_q4_K`, ...) calls exactly these, so that is the
path matched here; the importance-matrix path (`quantize_row_q4_K_impl`, ...) is not ported.

A super-block is 256 values. Q4_K and Q5_K cut it into 8 blocks of 32, each with its own scale and minimum
(x ~ d*sc*q - dmin*m, q of 4 or 5 bits); Q6_K into 16 blocks of 16, each with a signed scale (x ~ d*sc*(q - 32),
q of 6 bits). In both, the block scales are themselves quantized (6 or 8 bits) against one float16 per super-block.

Exactness: the C code computes in float32, one operation at a time, summing left to right. This port does the
same, vectorised over blocks: every constant is a float32, products are written in C's left-to-right order, and
sums over a block are running sums (`running_sum`), because np.sum adds pairwise and rounds differently.

Speed: the two searches for a block's scale (`make_qkx2_quants`: 22 tries, `make_qx_quants`: 19) are most of
the work. In NumPy every try is several passes over whole arrays, and a Q4_K_M Phi-3-mini took about 40 minutes
on two shared cores. `quantize` therefore runs their compiled twins (`make_qkx2_quants_compiled`: the NumPy
loops fused, vectorised over blocks; `make_qx_quants_compiled`: the C loop, one block at a time), byte for
byte the NumPy versions (tests/test_kquant_rounding.py checks both ways); the NumPy code stays the one to read.
The twins are compiled without fastmath: no reassociation and no fused multiply-add, so every float32
operation rounds as the C code's and the NumPy port's do.

Shapes: B super-blocks; S blocks (B*8 of 32 values for Q4_K/Q5_K, B*16 of 16 for Q6_K); n values per block.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..errors import PhinanoError

QK_K = 256  # values per super-block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # ggml-common.h block_q4_K, block_q5_K, block_q6_K
GROUP_MAX_EPS = np.float32(1e-15)  # below this a block counts as all zero (make_qx_quants, Q6_K)

f32 = np.float32


# ------------------------------------------------------------------ helpers shared by the three types
def nearest_int(v: np.ndarray) -> np.ndarray:
    """float32 -> int32, rounding halves to even, as ggml's `nearest_int`: adding 1.5 * 2**23 leaves the rounded
    integer in the low mantissa bits. Kept as the same bit trick, so that even out-of-range values (which
    llama.cpp's release builds do not assert on) round as they do there."""
    bits = (np.asarray(v, dtype=f32) + f32(12582912.0)).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def running_sum(v: np.ndarray) -> np.ndarray:
    """(n, S) -> (S,): v[0] + v[1] + ... left to right in float32, as C's `for (i...) sum += v[i]`
    (np.sum adds pairwise, which rounds differently)."""
    total = v[0].copy()
    for row in v[1:]:
        total += row
    return total


def running_max(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest value, its index) over the last axis as C's `if (v[j] > best) best = v[j]` from best = +0:
    the first of equal values wins, and all values <= 0 give +0 (and index -1)."""
    best = np.zeros(v.shape[:-1], dtype=f32)
    where = np.full(v.shape[:-1], -1)
    for j in range(v.shape[-1]):
        larger = v[..., j] > best
        best = np.where(larger, v[..., j], best)
        where = np.where(larger, j, where)
    return best, where


def to_fp16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 rounding to nearest even (GGML_FP32_TO_FP16); too large becomes inf."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=f32).astype(np.float16)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's `make_qkx2_quants` (use_mad=false) for S blocks of n values at once: x ~ scale*L - the_min,
    L in [0, nmax].

    Start from the scale that maps [min(x, 0), max(x)] onto [0, nmax]; then try nstep+1 slightly different
    scales, fit scale and min to each rounding by weighted least squares, and keep a fit when its weighted squared
    error is the smallest yet. As in C, a kept fit's min is the offset the later tries round against.
    x, weights: (n, S), a block's values down a column. Returns scale (S,), the_min (S,) (>= 0), L (n, S) uint8."""
    x_min = np.minimum(x.min(axis=0), f32(0))  # (S,)
    x_max = x.max(axis=0)  # (S,)
    flat = x_max == x_min  # (S,) nothing to fit: L = 0, scale 0
    sum_w = running_sum(weights)  # (S,)
    sum_x = running_sum(weights * x)  # (S,)

    def rounded(iscale, offset):  # (S,), (S,) -> L (n, S) as float32
        return np.clip(nearest_int(iscale * (x - offset)), 0, nmax).astype(f32)

    def error(scale, offset, L):  # weighted squared error of x ~ scale*L + offset, (S,)
        diff = scale * L + offset - x
        return running_sum(weights * (diff * diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / (x_max - x_min)  # (S,)
        scale, offset = f32(1) / iscale, x_min  # offset: C's `min`, <= 0
        L = rounded(iscale, offset)  # (n, S)
        best_error = error(scale, offset, L)

        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (x_max - offset)
            l = rounded(iscale, offset)  # (n, S)
            wl = weights * l  # C's w*l*l is (w*l)*l, and w*l*x[i] is (w*l)*x
            sum_l, sum_l2, sum_xl = running_sum(wl), running_sum(wl * l), running_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive_min = this_min > 0  # an offset above zero is not allowed: fit the scale alone
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive_min, f32(0), this_min)
            cur_error = error(this_scale, this_min, l)
            better = (D > 0) & (cur_error < best_error)  # (S,)
            L = np.where(better, l, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            offset = np.where(better, this_min, offset)

    scale = np.where(flat, f32(0), scale)
    offset = np.where(flat, x_min, offset)
    L = np.where(flat, f32(0), L)
    return scale, -offset, L.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int):
    """ggml's `make_qx_quants` with rmse_type=1 and no importance weights, for S blocks of n values at once:
    x ~ scale*(L - nmax), L in [0, 2*nmax). The scale is signed: the value of largest magnitude maps to -nmax.
    Then 18 nearby scales are tried, and the one whose rounding fits best (least squares weighted by x**2) kept.
    x: (n, S), a block's values down a column. Returns scale (S,) and L (n, S) int32."""
    biggest = np.argmax(np.abs(x), axis=0)  # (S,) the first of equal magnitudes, as the C loop
    x_max = np.take_along_axis(x, biggest[None], axis=0)[0]  # (S,) signed
    zero = np.abs(x_max) < GROUP_MAX_EPS  # (S,)
    w = x * x  # (n, S) the weights
    wx = w * x  # C's w*x[i]*l is (w*x)*l, and w*l*l is (w*l)*l

    def fit(iscale):  # (S,) -> L (n, S) in [-nmax, nmax), sumlx (S,), suml2 (S,)
        l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(f32)
        return l, running_sum(wx * lf), running_sum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L, sumlx, suml2 = fit(f32(-nmax) / x_max)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in (-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9):
            l, sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / x_max)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)  # (S,)
            L = np.where(better, l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)

    scale = np.where(zero, f32(0), scale)
    L = np.where(zero, 0, L + nmax)
    return scale, L


# ------------------------------------------------------------------ the same two searches, compiled
@intrinsic
def _f32_bits(typingctx, value):
    """The bits of a float32 as an int32 (C's memcpy from float to int)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(value), codegen


@njit(inline="always")
def _nearest_int(v):
    """`nearest_int` of one float32, the same bit trick."""
    return np.int32((_f32_bits(v + np.float32(12582912.0)) & 0x007FFFFF) - 0x00400000)


@njit(cache=True, nogil=True, error_model="numpy")  # x / 0 is inf or nan, as in NumPy and C, not an exception
def _qkx2_lanes(x, weights, nmax, rmin, rdelta, nstep, scale, the_min, L):
    """`make_qkx2_quants` of S blocks at once, laid out as the NumPy version (x, weights: (n, S)), its array
    operations fused into loops: for each value i in order, an inner loop over the blocks s. Each block's sums
    still run left to right (over i), so the bytes are the NumPy version's; the inner loop has no dependence
    from one s to the next, so it vectorises without reassociating anything (eight blocks per AVX2 register),
    and the temporaries stay in cache. Writes scale (S,), the_min (S,) and L (n, S) uint8.
    Every constant and integer is made float32 before it meets a float32 (Numba would compute in float64)."""
    n, S = x.shape
    fmax, zero = np.float32(nmax), np.float32(0.0)
    x_min, x_max = x[0].copy(), x[0].copy()  # (S,)
    sum_w = weights[0].copy()
    sum_x = weights[0] * x[0]
    for i in range(1, n):
        for s in range(S):
            x_min[s] = min(x_min[s], x[i, s])
            x_max[s] = max(x_max[s], x[i, s])
            sum_w[s] += weights[i, s]
            sum_x[s] += weights[i, s] * x[i, s]
    offset = np.minimum(x_min, zero)  # C's `min`, <= 0; a kept fit's min replaces it
    best_error = np.zeros(S, np.float32)
    iscale = np.empty(S, np.float32)
    for s in range(S):
        iscale[s] = fmax / (x_max[s] - offset[s])
        scale[s] = np.float32(1.0) / iscale[s]
    for i in range(n):
        for s in range(S):
            l = np.float32(min(max(_nearest_int(iscale[s] * (x[i, s] - offset[s])), 0), nmax))
            L[i, s] = np.uint8(l)
            diff = scale[s] * l + offset[s] - x[i, s]
            best_error[s] += weights[i, s] * (diff * diff)
    laux = np.empty((n, S), np.float32)
    sum_l, sum_l2, sum_xl = np.empty(S, np.float32), np.empty(S, np.float32), np.empty(S, np.float32)
    this_scale, this_min, cur_error = np.empty(S, np.float32), np.empty(S, np.float32), np.empty(S, np.float32)
    for step in range(nstep + 1):
        for s in range(S):
            iscale[s] = (rmin + rdelta * np.float32(step) + fmax) / (x_max[s] - offset[s])
            sum_l[s] = sum_l2[s] = sum_xl[s] = cur_error[s] = zero
        for i in range(n):
            for s in range(S):
                l = np.float32(min(max(_nearest_int(iscale[s] * (x[i, s] - offset[s])), 0), nmax))
                laux[i, s] = l
                wl = weights[i, s] * l  # C's w*l*l is (w*l)*l, and w*l*x[i] is (w*l)*x
                sum_l[s] += wl
                sum_l2[s] += wl * l
                sum_xl[s] += wl * x[i, s]
        for s in range(S):
            D = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s]
            a = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / D
            b = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / D
            positive_min = b > zero  # an offset above zero is not allowed: fit the scale alone
            this_scale[s] = sum_xl[s] / sum_l2[s] if positive_min else a
            this_min[s] = zero if positive_min else b
        for i in range(n):
            for s in range(S):
                diff = this_scale[s] * laux[i, s] + this_min[s] - x[i, s]
                cur_error[s] += weights[i, s] * (diff * diff)
        for s in range(S):
            D = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s]
            better = D > zero and cur_error[s] < best_error[s]
            if better:
                best_error[s], scale[s], offset[s] = cur_error[s], this_scale[s], this_min[s]
                for i in range(n):
                    L[i, s] = np.uint8(laux[i, s])
    for s in range(S):
        if x_max[s] == min(x_min[s], zero):  # nothing to fit: L = 0, scale 0
            scale[s], offset[s] = zero, min(x_min[s], zero)
            for i in range(n):
                L[i, s] = 0
        the_min[s] = -offset[s]


def make_qkx2_quants_compiled(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """`make_qkx2_quants` compiled: the same arguments and results, the same bytes."""
    S = x.shape[1]
    scale, the_min, L = np.empty(S, f32), np.empty(S, f32), np.empty(x.shape, np.uint8)
    _qkx2_lanes(np.ascontiguousarray(x, f32), np.ascontiguousarray(weights, f32), nmax, f32(rmin), f32(rdelta),
                nstep, scale, the_min, L)
    return scale, the_min, L


@njit(cache=True, nogil=True)
def _qx_blocks(x, nmax, scale_out, L_out):
    """`make_qx_quants` (rmse_type=1, no importance weights) of each row of x (S, n), one block at a time.
    Writes scale_out (S,) and L_out (S, n) int32 in [0, 2*nmax)."""
    zero = np.float32(0.0)
    fmax = np.float32(nmax)
    n = x.shape[1]
    for s in range(x.shape[0]):
        xs = x[s]
        biggest = amax = zero
        for i in range(n):  # the first of equal magnitudes, as the C loop
            if abs(xs[i]) > amax:
                amax, biggest = abs(xs[i]), xs[i]
        if amax < GROUP_MAX_EPS:
            for i in range(n):
                L_out[s, i] = 0
            scale_out[s] = zero
            continue
        best = zero
        scale = zero
        for k in range(19):  # C's first fit (step 0, always kept), then steps -9 .. -1, 1 .. 9
            step = 0 if k == 0 else k - 10 if k <= 9 else k - 9
            iscale = -(fmax + np.float32(0.1) * np.float32(step)) / biggest if step else -fmax / biggest
            sumlx = suml2 = zero
            for i in range(n):
                l = np.float32(min(max(_nearest_int(iscale * xs[i]), -nmax), nmax - 1))
                w = xs[i] * xs[i]
                sumlx += w * xs[i] * l  # (w*x)*l, as C
                suml2 += w * l * l  # (w*l)*l
            if step == 0:
                scale = sumlx / suml2 if suml2 != zero else zero
            elif not (suml2 > zero and sumlx * sumlx > best * suml2):
                continue
            else:
                scale = sumlx / suml2
            best = scale * sumlx
            for i in range(n):
                L_out[s, i] = min(max(_nearest_int(iscale * xs[i]), -nmax), nmax - 1) + nmax
        scale_out[s] = scale


def make_qx_quants_compiled(x: np.ndarray, nmax: int):
    """`make_qx_quants` compiled: the same arguments and results, the same bytes."""
    S = x.shape[1]
    scale, L = np.empty(S, f32), np.empty((S, x.shape[0]), np.int32)
    _qx_blocks(np.ascontiguousarray(x.T), nmax, scale, L)
    return scale, np.ascontiguousarray(L.T)


# ------------------------------------------------------------------ Q4_K and Q5_K: 8 blocks of 32, scale and min
def _scales_and_mins(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, compiled: bool):
    """The shared first half of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` for B super-blocks (B, 256).

    Each block of 32 gets a scale and min from make_qkx2_quants (weights: the block's RMS plus |x|); these are
    quantized to 6 bits against the super-block's largest (d = max_scale/63, dmin = max_min/63, as float16);
    then every value is rounded again against its block's quantized scale and min.
    Returns d (B,) float16, dmin (B,) float16, ls (B, 8), lm (B, 8) uint8 (6-bit) and L (B, 8, 32) uint8.
    compiled: search with `make_qkx2_quants_compiled` (same bytes, much faster)."""
    B = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(B * 8, 32).T)  # (32, S) with S = B*8 blocks of 32
    sum_x2 = running_sum(x * x)  # (S,)
    av_x = np.sqrt(sum_x2 / f32(32))
    weights = av_x + np.abs(x)  # (32, S)
    fit = make_qkx2_quants_compiled if compiled else make_qkx2_quants
    scales, mins, L = fit(x, weights, nmax, rmin, rdelta, nstep)  # (S,), (S,), (32, S)

    max_scale, _ = running_max(scales.reshape(B, 8))  # (B,)
    max_min, _ = running_max(mins.reshape(B, 8))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))[:, None]  # (B, 1)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))[:, None]
    # C keeps nearest_int(...) in a uint8_t before MIN(63, .): a (tiny) negative wraps to 255, then becomes 63
    ls = np.minimum(nearest_int(inv_scale * scales.reshape(B, 8)).astype(np.uint8), 63)  # (B, 8)
    lm = np.minimum(nearest_int(inv_min * mins.reshape(B, 8)).astype(np.uint8), 63)
    d = to_fp16(max_scale / f32(63))  # (B,)
    dmin = to_fp16(max_min / f32(63))

    block_d = (d.astype(f32)[:, None] * ls).reshape(B * 8)  # (S,) each block's scale as the file stores it
    block_m = (dmin.astype(f32)[:, None] * lm).reshape(B * 8)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int((x + block_m) / block_d), 0, nmax)  # (32, S)
    L = np.where(block_d != 0, again, L).astype(np.uint8)  # a zero scale keeps make_qkx2's L
    return d, dmin, ls, lm, L.T.reshape(B, 8, 32)


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins (B, 8) into 12 bytes (B, 12), the inverse of `get_scale_min_k4`:
    bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; blocks 4-7 put their low 4 bits in
    bytes 8-11 (scale low, min high nibble) and their top 2 bits in the top 2 bits of bytes 0-3 (scale) and 4-7
    (min)."""
    low, high = slice(0, 4), slice(4, 8)
    return np.concatenate([ls[:, low] | ((ls[:, high] >> 4) << 6),
                           lm[:, low] | ((lm[:, high] >> 4) << 6),
                           (ls[:, high] & 0xF) | ((lm[:, high] & 0xF) << 4)], axis=-1).astype(np.uint8)


def low_nibbles(L: np.ndarray) -> np.ndarray:
    """(B, 8, 32) quants -> (B, 128) bytes: blocks 2k and 2k+1 share 32 bytes, 2k in the low nibble."""
    pairs = (L & 0xF).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)


def quantize_q4_k(blocks: np.ndarray, compiled: bool = True) -> np.ndarray:
    """`quantize_row_q4_K_ref`: (B, 256) float32 -> (B, 144) bytes: d, dmin (float16), 12 scale bytes, 128 bytes
    of 4-bit quants."""
    d, dmin, ls, lm, L = _scales_and_mins(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20, compiled=compiled)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), pack_scales_k4(ls, lm),
                           low_nibbles(L)], axis=-1)


def quantize_q5_k(blocks: np.ndarray, compiled: bool = True) -> np.ndarray:
    """`quantize_row_q5_K_ref`: (B, 256) float32 -> (B, 176) bytes: d, dmin (float16), 12 scale bytes, 32 bytes of
    high bits (bit k of byte j: value j of block k), 128 bytes of low 4 bits (as Q4_K)."""
    d, dmin, ls, lm, L = _scales_and_mins(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15, compiled=compiled)
    high = L >> 4  # (B, 8, 32)
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)  # (B, 32)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), pack_scales_k4(ls, lm),
                           qh.astype(np.uint8), low_nibbles(L)], axis=-1)


# ------------------------------------------------------------------ Q6_K: 16 blocks of 16, signed scales
def quantize_q6_k(blocks: np.ndarray, compiled: bool = True) -> np.ndarray:
    """`quantize_row_q6_K_ref`: (B, 256) float32 -> (B, 210) bytes: 128 bytes of low 4 bits, 64 of high 2 bits,
    16 signed 8-bit block scales, d (float16). A super-block whose scales are all ~0 is all zero bytes."""
    B = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(B * 16, 16).T)  # (16, S) with S = B*16 blocks of 16
    scales, L = (make_qx_quants_compiled if compiled else make_qx_quants)(x, nmax=32)  # (S,), (16, S)
    scales = scales.reshape(B, 16)

    max_abs_scale, which = running_max(np.abs(scales))  # (B,) the first block of largest |scale|
    max_scale = np.take_along_axis(scales, np.maximum(which, 0)[:, None], axis=-1)[:, 0]  # (B,) signed
    zero = max_abs_scale < GROUP_MAX_EPS  # (B,)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(-128) / max_scale  # (B,) the largest block scale becomes -128
        d = to_fp16(f32(1) / iscale)  # (B,)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)  # (B, 16)
        block_d = (d.astype(f32)[:, None] * sc).reshape(B * 16)  # (S,)
        again = np.clip(nearest_int(x / block_d), -32, 31) + 32  # (16, S)
    L = np.where(block_d != 0, again, L).astype(np.uint8)  # a zero scale keeps make_qx_quants' L
    L = L.T.reshape(B, 2, 4, 32)  # two halves of 128 values, four quarters of 32 each

    # each half: ql bytes 0-31 = quarters 0|2, bytes 32-63 = quarters 1|3 (low nibbles);
    # qh byte l = the top 2 bits of value l of quarters 0, 1, 2, 3 at bits 0, 2, 4, 6
    low = L & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = np.bitwise_or.reduce((L >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None], axis=2)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), sc.view(np.uint8), d[:, None].view(np.uint8)],
                         axis=-1).astype(np.uint8)
    out[zero] = 0
    return out


# ------------------------------------------------------------------ whole tensors
QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
SCALE_BYTES = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(208, 210)}  # the float16 d (and dmin)
CHUNK = 1024  # super-blocks rounded at a time: 256K values, so that each temporary (1 MB) stays in cache


def quantize(values: np.ndarray, qtype: str, threads: int | None = None, compiled: bool = True) -> np.ndarray:
    """A (..., K) float32 array as K-quant blocks: (..., K/256 * block bytes) uint8, laid out as
    gguf.quants.quantize lays out the other block types. K must be a multiple of 256.

    Chunks of super-blocks are rounded on `threads` threads (default: all cores; NumPy and the compiled
    searches release the GIL). compiled=False rounds with the NumPy searches only (same bytes, slower).
    Values that are not finite, or so large that a super-block's float16 scale overflows (|x| beyond ~1e5),
    are an error: llama.cpp refuses to write such blocks too (`ggml_validate_row_data`)."""
    values = np.ascontiguousarray(values, dtype=f32)
    if values.shape[-1] % QK_K:
        raise PhinanoError(f"rows of {values.shape[-1]} values cannot be cut into {qtype} super-blocks of {QK_K}")
    if not np.isfinite(values).all():
        raise PhinanoError(f"cannot round values that are not finite (nan or inf) into {qtype} blocks")
    blocks = values.reshape(-1, QK_K)  # (B, 256)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=np.uint8)  # (B, block bytes)

    def round_chunk(start: int) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # huge values overflow x*x; caught below, as in C
            out[start:start + CHUNK] = QUANTIZERS[qtype](blocks[start:start + CHUNK], compiled)

    starts = range(0, blocks.shape[0], CHUNK)
    with ThreadPoolExecutor(max_workers=max(1, min(threads or os.cpu_count() or 1, len(starts)))) as pool:
        list(pool.map(round_chunk, starts))
    if not np.isfinite(out[:, SCALE_BYTES[qtype]].copy().view(np.float16)).all():
        raise PhinanoError(f"values too large for {qtype}'s float16 scales (largest |x| = {np.abs(values).max():g})")
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * BLOCK_BYTES[qtype])
