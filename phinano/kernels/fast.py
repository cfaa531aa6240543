"""The hot ops compiled with Numba: the twins of `reference.py`, same names, signatures and results.

Every public function here takes and returns what its namesake in `reference.py` does (float32 out, the
same shapes); tests/test_kernels.py checks each against it. They are thin Python wrappers that check and
prepare arguments (float32, C-contiguous activations; weights untouched) and call one compiled kernel.

What makes them fast, in one place (docs/kernels.md has the measurements):
- Weights stay as stored (bf16 as uint16 bits, float16, float32) and are widened *in a register* as they
  are read (`widening.to_f32`; bf16 two at a time from a uint32 view, in explicit vectors that serve
  several tokens at once, `vector.bf16_tile`), so no float32 copy of a weight matrix is ever made on the
  decode path.
- A matrix-vector product is limited by memory bandwidth, not arithmetic: each loop iteration reads four
  weight rows and shares every x[c] load between them, which gives four independent accumulators, and the
  four rows come from four long streams through the matrix (`_row_groups`), which the hardware prefetcher
  follows at the machine's read rate.
- Reductions use `fastmath={"reassoc", "contract"}` so LLVM may reorder and vectorise float32 sums, except
  the decode products (vector.py's explicit loops, which fix their own order so that a token sums alike in
  any batch) and the attention merge; the order of float32 additions is the only reason results differ
  from the reference at all. No kernel assumes "no inf / no nan".
- Kernels are `parallel=True` over independent rows, heads or queries (small inputs run on the calling
  thread alone: waking the other threads can cost more than the work, see `runtime.run`), and
  `cache=True`, so a second process loads the compiled code from __pycache__ instead of compiling again.
- Long prefills (many tokens) are compute-bound: there `linear` widens weight tiles to float32 (about 2
  rows a token, so a short prompt's tile stays in cache) and lets BLAS (NumPy's OpenBLAS) do the product,
  and `attention` uses BLAS products per KV head and chunk of 128 queries; the BLAS work is split between
  threads by `runtime.in_parts`.
- Exponentials (softmax, SwiGLU, GEGELU, quick-GELU) go through `expf.exp32`, plain arithmetic that LLVM
  vectorises, instead of one C library call per element.

Shape letters as in reference.py: T tokens, S cached positions, H query heads, KVH key/value heads,
HD head dim, R rotary dims, N output rows, K input width, D model width, F MLP width, V vocab.
"""

from __future__ import annotations

import math
import sys

import numpy as np

try:
    import numba  # imported here first, for this clear message; runtime and widening need it too
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the 'numba' kernel backend needs the numba package (pip install numba); "
        "or choose the NumPy reference backend with phinano.kernels.backend('numpy')"
    ) from e
from numba import njit, prange

from ..formats.quantized import QuantizedTensor
from .quantized import KERNELS, MatrixKernels
from . import amx, kquants  # kquants adds the K-quant kernels (Q4_K, Q5_K, Q6_K) to KERNELS
from .runtime import FASTMATH, in_parts, run, set_threads, threads
from .expf import exp32
from .lanes import row_dot, weighted_rows_into
from .vector import BF16_TOKENS, bf16_tile
from .widening import activation, stored, to_f32

__all__ = ["set_threads", "widen", "embed", "linear", "linear_rows", "rmsnorm", "layernorm", "rope", "softmax", "swiglu",
           "attention", "attention_weights", "gegelu", "blocksparse_visible", "blocksparse_attention_weights",
           "blocksparse_attention", "quick_gelu", "gelu", "encoder_attention"]

# linear(): from this many tokens on, a bf16/f16 product widens weight tiles and uses BLAS; below it the
# fused kernel wins. `python scripts/kernel_bench.py --prefill` prints the crossover (2 threads):
# - 2026-11-22, the 2-core Intel Xeon kind (docs/benchmarks.md), bf16 still read one by one: fused ~55
#   GFLOP/s up to 64 tokens, tiles + BLAS ~70 at 128 and ~100 at 512, so the crossover lay between 64 and 128;
# - 2026-11-30, AMD EPYC (Zen 3), 16384 x 3072, bf16 read in pairs (`_bf16_matmul`): fused / tiles 117 / 81
#   GFLOP/s at 64 tokens, 112 / 93 at 96, 119 / 105 at 128, 119 / 121 at 192, 125 / 135 at 256: the crossover
#   lies near 160-192 (read one by one it lay near 48-64).
# 128 is the highest value that stays at or below the Intel kind's crossover; the pairs kernel has not been
# measured there yet (it should move that crossover up too). On the AMD, prompts of 128-191 tokens ran a few
# percent below the fused kernel's rate. Since tiles grow with the tokens (TILE_ROWS_PER_TOKEN below), the
# AMD's crossover lies near 96-128 (8192 x 3072, ms fused / tiles: 31.4 / 34.1 at 64 tokens, 54.2 / 51.0
# and 45.0 / 47.4 at 96, 53.9 / 59.0 at 112, 70.9 / 64.6 at 128), so 128 stays.
BLAS_MIN_TOKENS = 128
# A float32 weight tile widened per BLAS call holds at most _TILE_ELEMENTS (16 MB: large enough for BLAS to
# run at full speed, small enough not to matter next to the model) and about TILE_ROWS_PER_TOKEN rows per
# token of x (at least 64). Widening writes 4 bytes a weight whatever T is, while BLAS does 2T operations a
# weight, so for short prompts the widening's share grows; a tile small enough to stay in cache widens about
# twice as fast (bf16, 64-256 rows of 3072: 4.1-4.8 G weights/s, 16 MB: 2.1).
# BLAS calls on fewer rows cost more each, so the tile grows with T. 8192 x 3072 bf16, 2 threads, AMD EPYC
# Zen 3, 2026-11-30, GFLOP/s for tiles of 128 / 256 / 1365 rows: 110 / 105 / 97 at 128 tokens, all 116
# at 256, 113 / 122 / 129 at 512.
_TILE_ELEMENTS = 4 << 20
TILE_ROWS_PER_TOKEN = 2
# linear(): from this many tokens on, a bf16 product runs on AMX tiles where the CPU has them (amx.py: Intel
# Xeon from Sapphire Rapids on; float32-exact by default). Measured on the 2-core Intel Xeon (Emerald Rapids)
# kind, 2026-11-30, 2 threads, 8 matrices in turn (from memory), the two taking turns, ms for the fused
# kernel / AMX with 3 parts: 8192 x 3072 at 4 tokens 3.1 / 3.7, at 8 4.6 / 3.2, at 16 7.4 / 4.1; 3072 x 3072
# 1.1 / 1.4, 1.7 / 1.2, 3.2 / 2.9; 3072 x 8192 4.0 / 8.8, 6.1 / 8.4, 11.1 / 9.2 (AMX pads the tokens to 32;
# that shape has since gained 1.12x from passes over its columns). 16 is where AMX wins on all three.
# Again after the bf16 kernel's tiles of 4 tokens (vector.py), 2026-12-01, same machine, ms kernel / AMX:
# 8192 x 3072 at 8 / 12 / 16 tokens 2.9 / 2.1, 3.3 / 2.6, 4.0 / 2.5; 3072 x 3072 1.2 / 1.7, 1.3 / 0.9,
# 1.6 / 1.0; 3072 x 8192 3.3 / 5.3, 3.6 / 3.3, 4.1 / 3.1. Still 16.
AMX_MIN_TOKENS = 16
# attention(): from this many query rows per KV head on (queries x query heads per KV head, the rows of each
# BLAS product), BLAS products per KV head; below, the compiled kernel (`_attention_parts`). Measured
# 2026-11-30 on AMD EPYC (Zen 3), 2 threads, 1024 and 4096 cached keys: the compiled kernel is faster up to
# 8-9 rows, BLAS from 10-12 (Phi-3-mini, 1 head per KV head: 22 vs 25 ms at 8 queries x 4096 keys, 36 vs 30
# at 12; Phi-4-mini, 3: 6.5 vs 7.7 ms at 3 queries, 11.6 vs 10.9 at 4; Phi-3-medium, 4: 9.1 vs 9.6 ms at 2
# queries, 12.7 vs 10.5 at 3). So a speculative draft being checked (a few queries) stays compiled for a
# model without grouped heads.
ATTENTION_BLAS_MIN_ROWS = 10
# attention(), the compiled kernel: keys per block. The blocks sit at fixed positions (0 .. B - 1, B .. 2B - 1,
# ...), so a query's sums are the same whichever other queries share its call (a speculative step's rows are
# bit for bit single steps'), and the threads take contiguous runs of blocks.
ATTENTION_KEY_BLOCK = 256
# _attention_parts: threads take runs of KV heads instead of runs of blocks when the blocks would leave the
# busiest thread more than this many times its even share of the keys (a short cache: up to 256 keys are
# one block). Cut by heads, each thread reads part of every cache row, slower per byte than whole rows:
# 0.92-0.95x of the split by keys when both share out evenly (Intel Xeon, Emerald Rapids, 2 threads,
# 2026-12-01, Phi-3-mini's heads at 1000-4000 keys), 0.81x for a plain sum (AMD EPYC Zen 3, docs/kernels.md).
# Decode attention with this rule on the same Intel, Phi-3-mini's heads, caches from memory, paired turns: 64 /
# 100 / 200 / 300 / 600 / 800 / 1100 keys 1.28 / 1.32 / 1.42 / 1.27 / 1.26 / 1.08 / 1.28x faster; at 500,
# 1000, 2047 and 4000 keys, where the blocks share out evenly, it cuts by keys as before (0.99-1.02x).
# A constant of the compiled kernel (Numba reads it when it compiles; after a change, clear the cache).
HEAD_RUNS_ABOVE = 1.2
# _attend_keys (decode attention): keys per chunk. Both passes over a block's keys go chunk by chunk, and
# within a chunk head by head, so each head's slice of the chunk's rows is one short stream: a core has a
# chunk's worth of streams to read at once instead of one. Chunks of 16 keys (Intel Xeon, Emerald Rapids,
# 2 threads, 2026-12-01, Phi-3-mini's heads at 2048 keys, caches from memory): the score pass by whole rows
# took half the kernel's time and read slower than a plain reader, the value pass read faster; scores by
# chunks of 1 / 16 / 32 / 64 keys 11-13 / 14-16 / 14-16 / 12-15 GB/s. Values by chunks were 8-11 % faster
# at 4096 keys on AMD EPYC (Zen 3, 2026-11-30). Any chunk gives the same bits: each score and each value
# sum is the same operations in the same order.
_KEY_CHUNK = 16
# attention(): bytes of one score block (G heads x a chunk of queries x S keys) in the BLAS path, and at
# most this many queries a chunk. A chunk's products stop at its last query's key, so smaller chunks skip
# more of the causal mask's empty triangle: a 512-token prompt of Phi-3-mini's heads took 32 ms a layer in
# chunks of 128 queries, 33 in chunks of 64 or 256, 42 in one chunk (AMD EPYC Zen 3, 2 threads, 2026-11-30).
_ATTENTION_CHUNK_BYTES = 8 << 20
ATTENTION_QUERY_CHUNK = 128


# ---------------------------------------------------------------------------------------------------------
# linear: y = x @ w.T (+ b), and how each kind of stored weight matrix is read
# ---------------------------------------------------------------------------------------------------------


# Which rows are read together. The N rows are cut into parts of PART_ROWS rows or a few more (the last
# N % PART_ROWS spread over them), Numba hands each thread a contiguous run of them, and a part [a, b) is
# read as four streams, its quarters front to back: rows a + j, a + q + j, a + 2q + j and a + 3q + j side
# by side for j = 0 .. q - 1 (q = (b - a) // 4). Every x load is still shared by four rows, and each stream
# runs on from one row into the next. Reading four *neighbouring* rows instead starts four new streams
# every four rows, and a bf16 row of 3072 is only 6 KB: the hardware prefetcher spent part of every row
# finding its stream again. Measured on AMD EPYC (Zen 3), 1 GiB of Phi-3-mini-shaped bf16 matrices in turn,
# G bytes/s, neighbouring rows / four streams (medians of 6): 3072 x 3072 10.7 / 14.0 on 1 thread and
# 18.2 / 22.2 on 2; 8192 x 3072 10.4 / 13.6 and 18.9 / 21.8; 3072 x 8192 12.0 / 13.2 and 21.1 / 21.3.
# Parts of 64, 128 or 256 rows read as fast as one part per thread (docs/kernels.md). On the Intel Xeon
# (Emerald Rapids) kind, 2026-11-30, 2 threads, the three shapes above, 64 / 256 rows / one part per thread
# in alternating processes were all within the noise (9-12 GB/s in a slow phase of that machine), and
# whole-model bf16 decode with 64 read 91-98 % of the best streaming reader at the same moment. The rows left
# over in a part ((b - a) % 4) go through the same four-row loop (`_row_groups`), so every row is summed by
# the same code wherever it falls.
PART_ROWS = 64


@njit(cache=True)
def _row_groups(N):
    """(G, 4) int64: the four rows each step reads side by side, part after part (see above). In a part
    [a, b) of q = (b - a) // 4 rows a stream, step j reads rows a + j, a + q + j, a + 2q + j, a + 3q + j;
    then one more step takes the rows left over, a + 4q .. b - 1, the last of them repeated (computed again,
    the same value written again). Every step goes through the same call in the kernels: when the leftover
    rows had a call of their own with four rows the compiler could see were equal, LLVM folded the four
    sums into one, vectorised it differently, and the row came out rounded differently."""
    parts = max(1, N // PART_ROWS)
    G = 0
    for p in range(parts):
        G += (N * (p + 1) // parts - N * p // parts + 3) // 4
    groups = np.empty((G, 4), np.int64)
    g = 0
    for p in range(parts):
        a, b = N * p // parts, N * (p + 1) // parts
        q = (b - a) // 4
        for j in range(q):
            groups[g, 0], groups[g, 1], groups[g, 2], groups[g, 3] = a + j, a + q + j, a + 2 * q + j, a + 3 * q + j
            g += 1
        if (b - a) % 4:
            c = a + 4 * q
            groups[g, 0], groups[g, 1], groups[g, 2], groups[g, 3] = c, min(c + 1, b - 1), min(c + 2, b - 1), b - 1
            g += 1
    return groups


@njit(inline="always")
def _fused_tile(x, w, y, t0, t1, t2, t3, r0, r1, r2, r3):
    """y[t, r] for tokens t0..t3 x rows r0..r3: 16 accumulators, each w and x load used four times."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for c in range(x.shape[1]):
        w0 = to_f32(w[r0, c])
        w1 = to_f32(w[r1, c])
        w2 = to_f32(w[r2, c])
        w3 = to_f32(w[r3, c])
        x0 = x[t0, c]
        x1 = x[t1, c]
        x2 = x[t2, c]
        x3 = x[t3, c]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
        a20 += x2 * w0
        a21 += x2 * w1
        a22 += x2 * w2
        a23 += x2 * w3
        a30 += x3 * w0
        a31 += x3 * w1
        a32 += x3 * w2
        a33 += x3 * w3
    y[t0, r0], y[t0, r1], y[t0, r2], y[t0, r3] = a00, a01, a02, a03
    y[t1, r0], y[t1, r1], y[t1, r2], y[t1, r3] = a10, a11, a12, a13
    y[t2, r0], y[t2, r1], y[t2, r2], y[t2, r3] = a20, a21, a22, a23
    y[t3, r0], y[t3, r1], y[t3, r2], y[t3, r3] = a30, a31, a32, a33


@njit(inline="always")
def _fused_one_token(x, w, y, t, r0, r1, r2, r3):
    """y[t, r0..r3]: the x[t, c] load shared by four rows, four independent accumulators. Every decode row
    goes through this loop, in `_matmul_fused` and `_matmul_rows` alike."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for c in range(x.shape[1]):
        xc = x[t, c]
        a0 += xc * to_f32(w[r0, c])
        a1 += xc * to_f32(w[r1, c])
        a2 += xc * to_f32(w[r2, c])
        a3 += xc * to_f32(w[r3, c])
    y[t, r0], y[t, r1], y[t, r2], y[t, r3] = a0, a1, a2, a3


@njit(inline="always")
def _fused_rows(x, w, y, r0, r1, r2, r3):
    """Every token of x times rows r0..r3: tiles of 4 tokens while 3 or more are left (a tile for 3 computes
    its last token twice, and the repeat writes the same value again), then one token at a time."""
    T = x.shape[0]
    t = 0
    while T - t >= 3:
        _fused_tile(x, w, y, t, t + 1, t + 2, min(t + 3, T - 1), r0, r1, r2, r3)
        t += 4
    while t < T:
        _fused_one_token(x, w, y, t, r0, r1, r2, r3)
        t += 1


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matmul_fused(x, w, y):
    """y[t, r] = sum_c x[t, c] * float32(w[r, c]) for x (T, K), w (N, K), y (T, N).

    Parallel over the groups of 4 rows of `_row_groups` (parts of about PART_ROWS rows, each read as four
    streams; Numba hands each thread a contiguous run of groups). Each group of 4 rows is read from memory
    once and, while it sits in cache, multiplied with every token: 4 tokens x 4 rows at a time (16
    accumulators, each w and x load used four times), then one token at a time (`_fused_rows`).
    Three tokens left also make a tile: one pass over the rows instead of three one-token passes, which
    widen them again each time (3 tokens, as a draft of 2 being checked: 1.5x the time of one token before,
    1.3x with the tile; with 2 tokens left a tile was no faster than two passes; AMD EPYC Zen 3, 8192 x
    3072, measured on bf16 before bf16 moved to `_bf16_matmul`; this kernel now serves float16, float32 and
    odd-K bf16). Widening in-register keeps the loops vectorised.
    """
    groups = _row_groups(w.shape[0])  # (G, 4) rows read side by side
    for g in prange(groups.shape[0]):
        _fused_rows(x, w, y, groups[g, 0], groups[g, 1], groups[g, 2], groups[g, 3])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matmul_rows(x, w, y):
    """y = x @ w.T like `_matmul_fused`, for a batch of decode rows (one per sequence): every row t is summed
    by the very loop `_matmul_fused` runs for a single token (`_fused_one_token`), so each row of y is bit for
    bit what that row alone gives. The 4 x 4 tiles of `_matmul_fused` would round differently. Each group of
    four weight rows is still read from memory once: the other rows of x find it in cache (4 rows x K, 24 KB
    for bf16 at K = 3072)."""
    groups = _row_groups(w.shape[0])  # (G, 4) rows read side by side
    for g in prange(groups.shape[0]):
        for t in range(x.shape[0]):
            _fused_one_token(x, w, y, t, groups[g, 0], groups[g, 1], groups[g, 2], groups[g, 3])


@njit(cache=True, nogil=True)
def _widen_rows(w, out):
    """out[r, c] = float32(w[r, c]) on one thread, without the GIL (it runs inside `in_parts`)."""
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            out[r, c] = to_f32(w[r, c])


_ARRAY_KERNELS = MatrixKernels(_matmul_fused, _widen_rows, BLAS_MIN_TOKENS, _matmul_rows)  # f16, f32 (and odd-K bf16)


# bf16 rows read two weights at a time, as explicit vectors (vector.py, "bf16 pairs"). Viewed as uint32, a
# bf16 row (N, K) becomes (N, K / 2) pairs: the low half of pair c is weight 2c, the high half weight 2c + 1
# (little-endian); a shift and an AND make them float32, where widening each uint16 on its own (`to_f32`)
# takes a shuffle and a shift per weight. x is split once per call into its even and odd columns, so each
# half of a pair meets a contiguous run of x. Tiles of up to vector.BF16_TOKENS tokens x 4 rows share each
# widened vector between the tokens, and every (token, row) sum runs the same instructions in every tile.


@njit(cache=True)
def _even_odd(x):
    """x (T, K), K even -> (xe, xo), each (T, K / 2): the even and the odd columns of x."""
    T, K = x.shape
    xe = np.empty((T, K // 2), np.float32)
    xo = np.empty((T, K // 2), np.float32)
    for t in range(T):
        for c in range(K // 2):
            xe[t, c] = x[t, 2 * c]
            xo[t, c] = x[t, 2 * c + 1]
    return xe, xo


@njit(parallel=True, cache=True)
def _bf16_matmul(x, w, y):
    """y = x @ float32(w).T for x (T, K), w (N, K / 2) uint32 bf16 pairs, y (T, N); decode and few tokens.

    Parallel over the groups of 4 rows of `_row_groups` (parts of about PART_ROWS rows, each read as four
    streams); each group of 4 rows is read from memory once and, while it sits in cache, multiplied with
    the tokens, BF16_TOKENS at a time (`vector.bf16_tile`). Row t of y is bit for bit what x[t] alone
    gives, whatever T: a batch of decode rows (one per sequence, `linear_rows`) runs this same kernel, and
    so do the positions of a speculative step.
    """
    xe, xo = _even_odd(x)  # (T, K / 2) each
    groups = _row_groups(w.shape[0])  # (G, 4) rows read side by side
    for g in prange(groups.shape[0]):
        for t in range(0, x.shape[0], BF16_TOKENS):
            bf16_tile(xe, xo, w, y, t, groups[g, 0], groups[g, 1], groups[g, 2], groups[g, 3])


def _bf16_widen_pairs(w, out):
    """Pairs (n, K / 2) uint32 -> out (n, K) float32, for the BLAS tiles and `embed`: the same bytes viewed as
    uint16 and widened one by one (`_widen_rows`; writing the two halves of each pair apart ran 12 % slower)."""
    _widen_rows(w.view(np.uint16), out)


_LITTLE_ENDIAN = sys.byteorder == "little"  # the pair layout above; elsewhere bf16 rows are read one by one
_BF16_KERNELS = MatrixKernels(_bf16_matmul, _bf16_widen_pairs, BLAS_MIN_TOKENS)


def _reader(w: np.ndarray | QuantizedTensor) -> tuple[np.ndarray, MatrixKernels]:
    """(rows, kernels) for a weight matrix (N, K): rows is what the kernels index by row (the stored
    array as `stored` gives it, or a QuantizedTensor's packed bytes), kernels the compiled code reading it."""
    if isinstance(w, QuantizedTensor):
        return w.data, KERNELS[w.qtype]
    if w.dtype == np.uint16 and w.ndim == 2 and w.shape[1] % 2 == 0 and w.strides[1] == 2 and _LITTLE_ENDIAN:
        # (N, K / 2) pairs of bf16, no copy; asarray first, because a view of a np.memmap runs the memmap's
        # Python __array_finalize__ on every call
        return np.asarray(w).view(np.uint32), _BF16_KERNELS
    return stored(w), _ARRAY_KERNELS


def _matmul_blas(x: np.ndarray, rows: np.ndarray, widen_rows) -> np.ndarray:
    """x @ float32(w).T for x (T, K) and many tokens. The N weight rows are split into one contiguous range
    per thread; each thread widens a tile of its rows at a time (TILE_ROWS_PER_TOKEN x T rows, at least 64,
    at most _TILE_ELEMENTS) into its own float32 buffer (tile_rows, K) and multiplies it with one
    single-threaded BLAS call (float32 weights: no widening)."""
    T, K = x.shape
    N = rows.shape[0]
    y = np.empty((T, N), np.float32)
    tile_rows = max(64, min(_TILE_ELEMENTS // max(K, 1), TILE_ROWS_PER_TOKEN * T))

    def part(i: int, parts: int) -> None:
        a, b = N * i // parts, N * (i + 1) // parts
        if rows.dtype == np.float32:
            y[:, a:b] = x @ rows[a:b].T
            return
        tile = np.empty((min(tile_rows, max(b - a, 1)), K), np.float32)
        for r0 in range(a, b, tile_rows):
            r1 = min(b, r0 + tile_rows)
            buf = tile[: r1 - r0]
            widen_rows(rows[r0:r1], buf)
            y[:, r0:r1] = x @ buf.T

    in_parts(part, max(1, min(N // 64, threads())))
    return y


def _matmul_amx(x: np.ndarray, w: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """x @ float32(w).T for bf16 w (N, K) on AMX tiles (`amx.matmul`, rows in blocks of 32); the last N % 32
    rows, if any, through the BLAS tiles (pairs: w's rows as uint32 pairs)."""
    y = amx.matmul(x, w)  # (T, N)
    n32 = w.shape[0] // 32 * 32
    if n32 < w.shape[0]:
        y[:, n32:] = _matmul_blas(x, pairs[n32:], _BF16_KERNELS.widen_rows)
    return y


def linear(x: np.ndarray, w: np.ndarray | QuantizedTensor, b: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T (+ b). x (T, K) float32, w (N, K) as stored, b (N,) -> (T, N) float32.

    Decode (few tokens): one fused kernel streams the stored weights once at the memory-bandwidth limit,
    widening bf16/f16 or unpacking quantized blocks in registers (`_bf16_matmul`, `_matmul_fused`,
    `quantized.KERNELS`; no float32 copy of w). Prefill (from `blas_min_tokens` tokens on, BLAS_MIN_TOKENS
    for arrays; the compute-bound case): float32 tiles of w and BLAS; bf16 w from AMX_MIN_TOKENS on goes to
    AMX tiles instead where the CPU has them (`amx.matmul`, float32-exact activations by default). x may also
    be 1-D (K,) or have more leading axes, like `x @ w.T`. w is only read: read-only, unaligned and
    memory-mapped arrays are fine.
    """
    x = np.asarray(x)
    lead = x.shape[:-1]
    K = x.shape[-1]
    if w.ndim != 2 or w.shape[1] != K:
        raise ValueError(f"linear: x has {K} features but w has shape {w.shape}")
    x2 = activation(x.reshape(-1, K))  # (T, K)
    T, N = x2.shape[0], w.shape[0]
    rows, kernels = _reader(w)  # rows (N, ...) as stored
    if kernels is _BF16_KERNELS and T >= AMX_MIN_TOKENS and K % 32 == 0 and amx.available():
        y = _matmul_amx(x2, np.asarray(w), rows)  # (T, N)
    elif T >= kernels.blas_min_tokens:
        y = _matmul_blas(x2, rows, kernels.widen_rows)  # (T, N)
    else:
        y = np.empty((T, N), np.float32)
        run(kernels.matmul, T * N * K, x2, rows, y)
    if b is not None:
        y += widen(b)  # (N,) broadcast over the T rows
    return y.reshape(lead + (N,))


def linear_rows(x: np.ndarray, w: np.ndarray | QuantizedTensor, b: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T (+ b) for B independent rows (batched decode: one new token of each of B sequences).
    x (B, K) float32, w (N, K) as stored, b (N,) -> (B, N) float32.

    Row t of the result is bit for bit `linear(x[t : t + 1], w, b)[0]`, whatever B: the decode kernel's
    per-row sums (`MatrixKernels.matmul_rows`), never the tiles or BLAS that `linear` uses for
    several tokens of one sequence. Each weight block is still read from memory once for all B rows, which
    is the whole gain: a decode step is limited by reading the weights.
    """
    x = np.asarray(x)
    K = x.shape[-1]
    if x.ndim != 2 or w.ndim != 2 or w.shape[1] != K:
        raise ValueError(f"linear_rows: x {x.shape} must be (B, K) and w (N, K); w has shape {w.shape}")
    x2 = activation(x)  # (B, K)
    B, N = x2.shape[0], w.shape[0]
    rows, kernels = _reader(w)
    y = np.empty((B, N), np.float32)
    run(kernels.matmul_rows or kernels.matmul, B * N * K, x2, rows, y)
    if b is not None:
        y += widen(b)
    return y


# ---------------------------------------------------------------------------------------------------------
# widen, embed
# ---------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _widen_flat(w, out):
    """out[i] = float32(w[i]) over flat arrays, in parallel chunks."""
    for i in prange(w.shape[0]):
        out[i] = to_f32(w[i])


def widen(w: np.ndarray | QuantizedTensor) -> np.ndarray:
    """Any stored weight -> float32 (bf16 exactly, via the high half of a 32-bit word; packed blocks
    unpacked). Fast because the widening runs compiled and in parallel; float32 input is returned as it is.
    Meant for small tensors (norm weights, biases): the matrix kernels never call it on a whole matrix.
    """
    if isinstance(w, QuantizedTensor):
        rows, kernels = _reader(w)
        out = np.empty(w.shape, np.float32)
        kernels.widen_rows(rows, out)
        return out
    w = np.asarray(w)
    if w.dtype == np.float32:
        return w
    if w.dtype not in (np.uint16, np.float16):
        return w.astype(np.float32)
    flat = np.ascontiguousarray(stored(w)).reshape(-1)
    out = np.empty(flat.shape[0], np.float32)
    run(_widen_flat, flat.shape[0], flat, out)
    return out.reshape(w.shape)


def embed(table: np.ndarray | QuantizedTensor, ids: np.ndarray) -> np.ndarray:
    """Rows of the (V, D) embedding table for the (T,) token ids -> (T, D) float32.

    Fast because only the T requested rows are read and widened (the table stays on disk/in the page
    cache as stored, packed tables too). Ids may be negative like NumPy indices; out-of-range ids raise
    IndexError.
    """
    ids = np.asarray(ids)
    V, D = table.shape
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -V or flat.max() >= V):
        bad = flat[(flat < -V) | (flat >= V)][0]
        raise IndexError(f"token id {bad} is out of range for an embedding table of {V} rows")
    rows, kernels = _reader(table)
    out = np.empty((flat.shape[0], D), np.float32)
    kernels.widen_rows(rows[flat], out)  # (T, D): NumPy gathers the T stored rows, one compiled pass widens them
    return out.reshape(ids.shape + (D,))


# ---------------------------------------------------------------------------------------------------------
# rmsnorm, layernorm
# ---------------------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _rmsnorm_rows(x, w, eps, out):
    """Per row: mean of squares (float64 sum of float32 squares), then x / sqrt(var + eps) * w."""
    T, D = x.shape
    for t in prange(T):
        total = 0.0
        for i in range(D):
            v = x[t, i]
            total += np.float64(v * v)
        scale = np.sqrt(np.float32(total / D) + eps)
        for i in range(D):
            out[t, i] = x[t, i] / scale * to_f32(w[i])


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w, per row. x (T, D) float32, w (D,) -> (T, D).

    Fast because each row is one pass for the statistic and one for the output, rows in parallel; the
    weight is widened in-register.
    """
    x = np.asarray(x)
    x2 = activation(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    run(_rmsnorm_rows, x2.size, x2, stored(w), np.float32(eps), out)
    return out.reshape(x.shape)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _layernorm_rows(x, w, b, eps, out):
    """Per row: mean, then the biased variance of (x - mean), then (x - mean) / sqrt(var + eps) * w + b."""
    T, D = x.shape
    for t in prange(T):
        total = 0.0
        for i in range(D):
            total += np.float64(x[t, i])
        mean = np.float32(total / D)
        total = 0.0
        for i in range(D):
            c = x[t, i] - mean
            total += np.float64(c * c)
        scale = np.sqrt(np.float32(total / D) + eps)
        for i in range(D):
            out[t, i] = (x[t, i] - mean) / scale * to_f32(w[i]) + to_f32(b[i])


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b, per row (biased variance). x (T, D), w and b (D,) -> (T, D).

    Fast because rows run in parallel with three short passes each, weights widened in-register.
    """
    x = np.asarray(x)
    x2 = activation(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    run(_layernorm_rows, x2.size, x2, stored(w), stored(b), np.float32(eps), out)
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------
# rope, softmax, swiglu
# ---------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _rope_rows(x, cos, sin, out):
    """Rotate-half pairs (i, i + R/2) of every head; dims R.. copied. Same float32 operations, in the same
    order, as the reference, so the result is bit-identical."""
    T, NH, HD = x.shape
    R = cos.shape[1]
    half = R // 2
    for t in prange(T):
        for h in range(NH):
            for i in range(half):
                a = x[t, h, i]
                b = x[t, h, i + half]
                out[t, h, i] = a * cos[t, i] + (-b) * sin[t, i]
                out[t, h, i + half] = b * cos[t, i + half] + a * sin[t, i + half]
            for i in range(R, HD):
                out[t, h, i] = x[t, h, i]


def _rope_table(table, T: int) -> np.ndarray:
    """cos or sin as the kernel reads them: (T, R) float32, C-contiguous (a (1, R) row repeated). Most calls
    (a layer's q and k, every layer of a step) pass the step's own tables, already so: taken as they are."""
    if isinstance(table, np.ndarray) and table.dtype == np.float32 and table.ndim == 2 and table.shape[0] == T \
            and table.flags.c_contiguous:
        return table
    return np.ascontiguousarray(np.broadcast_to(np.asarray(table, np.float32), (T, np.shape(table)[-1])))


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, "rotate-half" (NeoX) pairing, on the first R dims of every head.

    x (T, NH, HD); cos, sin (T, R) float32 with the R/2 angles repeated twice (a (1, R) row broadcasts).
    Dim i < R/2 pairs with i + R/2; dims R..HD pass through. Fast because it is one pass, no temporaries,
    tokens in parallel. Pass float32 cos/sin: float64 ones are rounded to float32 first (the reference
    would compute in float64 and round the result).
    """
    x3 = activation(x)
    T = x3.shape[0]
    cos, sin = _rope_table(cos, T), _rope_table(sin, T)
    if cos.shape[1] > x3.shape[2] or cos.shape[1] % 2:
        raise ValueError(f"rope: rotary dims {cos.shape[1]} must be even and at most the head dim {x3.shape[2]}")
    out = np.empty_like(x3)
    run(_rope_rows, x3.size, x3, cos, sin, out)
    return out


@njit(fastmath=FASTMATH, inline="always")
def _exp_below_max(row):
    """row = exp(row - max(row)) in place, for one row (1-D, n >= 1). Returns (max(row), the float64 sum of
    the exponentials): the softmax before its division, which the decode attention kernel merges across parts.

    In place on purpose: given a separate output that is the same array, LLVM's vectorised loop sees the
    two overlap and falls back to its scalar copy (a causal softmax of 512 x 512 took 4.5x as long)."""
    m = row[0]
    for i in range(1, row.shape[0]):
        m = max(m, row[i])
    for i in range(row.shape[0]):
        row[i] = exp32(row[i] - m)
    total = 0.0
    for i in range(row.shape[0]):  # a loop of its own: summed in the exponentials' loop, neither is vectorised
        total += np.float64(row[i])
    return m, total


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _softmax_in_place(row):
    """row = softmax(row) for one row (1-D, n >= 1): max, exp(row - max), a float64 sum, divide. The one
    softmax of the compiled kernels: rows, the blocksparse and the BLAS attention paths call it, and the
    decode attention kernel its first half (`_exp_below_max`)."""
    _, total = _exp_below_max(row)
    s = np.float32(total)
    for i in range(row.shape[0]):
        row[i] = row[i] / s


@njit(parallel=True, cache=True)
def _softmax_rows(x, out):
    """out[t] = softmax(x[t]) for every row, rows in parallel."""
    for t in prange(x.shape[0]):
        out[t] = x[t]
        _softmax_in_place(out[t])


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32; rows that are all -inf are not expected.

    Fast because each row is three passes over memory with no temporaries, rows in parallel.
    """
    x = np.asarray(x)
    x2 = activation(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    if x2.shape[1]:
        run(_softmax_rows, x2.size, x2, out)
    return out.reshape(x.shape)


@njit(parallel=True, cache=True)
def _swiglu_flat(gate, up, out):
    """out = up * (gate / (1 + exp(-gate))), elementwise in float32 (exp overflow -> inf -> 0, as NumPy);
    `exp32`, so that the loop vectorises."""
    one = np.float32(1.0)
    for i in prange(gate.shape[0]):
        g = gate[i]
        out[i] = up[i] * (g / (one + exp32(-g)))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """up * silu(gate), silu(g) = g * sigmoid(g). gate, up (T, F) -> (T, F).

    Fast because it is one fused pass (the reference makes three temporaries), in parallel chunks.
    """
    gate = activation(gate)
    up = activation(up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} differ")
    out = np.empty_like(gate)
    run(_swiglu_flat, gate.size, gate.reshape(-1), up.reshape(-1), out.reshape(-1))
    return out


# ---------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------


@njit(inline="always")
def _attend_keys(q, k, v, lo, hi, a, b, kv0, kv1, top, total, acc):
    """Every query's attention over the keys a .. b - 1 only, unnormalised, for the KV heads kv0 .. kv1 - 1
    (and their query heads) only. Query t sees keys lo[t] .. hi[t] - 1; for each query t and head h:
    top[t, h] = its largest visible score (-inf if it sees none of these keys), total[t, h] = sum_j
    exp(score_j - top) and acc[t, h] = sum_j exp(score_j - top) * v[j].
    q (T, H, HD); k, v (S, KVH, HD); top, total (T, H); acc (T, H, HD).

    Keys and values are read in chunks of _KEY_CHUNK keys, head by head within a chunk (each head's slices
    of the chunk's rows are so many short streams read at once, while the chunk stays in cache for every
    query and query head that reads it: grouped-query attention). The two inner loops are explicit 16-lane
    vector loops (lanes.py): a score is `row_dot`, a head's share of a chunk of values `weighted_rows_into`,
    which keeps the accumulator row in registers over the chunk's keys."""
    T, H, HD = q.shape
    KVH = k.shape[1]
    G = H // KVH
    scale = np.float32(HD**-0.5)
    scores = np.empty((T, H, b - a), np.float32)  # (T, H, n); keys a query does not see stay unused
    for j0 in range(a, b, _KEY_CHUNK):
        for t in range(T):
            j1, j2 = max(j0, lo[t]), min(j0 + _KEY_CHUNK, b, hi[t])  # the chunk's keys query t sees
            for h in range(kv0 * G, kv1 * G):
                for j in range(j1, j2):
                    scores[t, h, j - a] = row_dot(q, t, h, k, j, h // G) * scale
    for t in range(T):
        a_t, b_t = max(a, lo[t]), min(b, hi[t])  # the keys of a .. b - 1 query t sees
        for h in range(kv0 * G, kv1 * G):
            for d in range(HD):
                acc[t, h, d] = 0.0
            if b_t <= a_t:
                top[t, h], total[t, h] = -np.inf, 0.0
                continue
            row = scores[t, h, a_t - a : b_t - a]
            m, sum_e = _exp_below_max(row)  # exp(score - top) in place, and its sum
            top[t, h], total[t, h] = m, np.float32(sum_e)
    for j0 in range(a, b, _KEY_CHUNK):
        for kvh in range(kv0, kv1):
            for t in range(T):
                j1, j2 = max(j0, lo[t]), min(j0 + _KEY_CHUNK, b, hi[t])  # the chunk's keys query t sees
                for g in range(G):
                    h = kvh * G + g
                    weighted_rows_into(acc, t, h, scores, a, v, j1, j2, kvh)  # acc[t, h] += sum_j p_j v[j, kvh]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _attention_parts(q, k, v, start, window, block, threads, out):
    """Decode attention (a few queries), split over the keys: the keys any query sees are cut into blocks
    at fixed positions (keys block * p .. block * (p + 1) - 1), one work item each (`_attend_keys`: every
    query over that block). Query t at position i = start + t sees keys j <= i, and i - j < window when
    window > 0. The blocks then merge in order as one softmax would: with m the largest top,
    out = sum_p exp(top_p - m) acc_p / sum_p exp(top_p - m) total_p.

    Split this way, each thread streams whole contiguous cache rows (every KV head of a key, the layout
    being (S, KVH, HD)), which read faster than each thread taking its share of the heads from every row,
    and the queries of one call (a speculative draft being checked) share each row they read. Because the
    blocks sit at fixed positions, a query's sums do not depend on the other queries of its call: each row
    of out is bit for bit what that query gives alone (blocks it does not see add exact zeros).
    A query that sees no key gets nan, as the reference's softmax of all -inf does.

    Few blocks do not share out evenly between `threads` threads: a cache of up to `block` keys is one
    block, all on one thread, and blocks of 256 and 44 keys keep one thread 6 times as long as the other.
    When the busiest thread would get more than HEAD_RUNS_ABOVE times its even share of the keys, the KV
    heads are cut into `threads` runs instead, and thread r takes run r of every block: every thread
    equally busy, each reading its part of every row. A head's sums are the same either way.
    """
    T, H, HD = q.shape
    S = k.shape[0]
    lo = np.empty(T, np.int64)  # (T,): query t sees keys lo[t] .. hi[t] - 1
    hi = np.empty(T, np.int64)
    first, last = S, 0  # every key some query sees: first .. last - 1
    for t in range(T):  # plain loops outside prange: an array expression would start threads of its own
        i = start + t
        lo[t] = max(0, i - window + 1) if window > 0 else 0
        hi[t] = max(lo[t], min(i, S - 1) + 1)
        first, last = min(first, lo[t]), max(last, hi[t])
    last = min(last, S)  # a windowed query past the cache's end has lo = hi > S: it sees nothing
    first = min(first, last)
    b0 = first // block  # the first block any query sees
    parts = max(1, -(-last // block) - b0)  # blocks b0 .. b0 + parts - 1 (one, maybe empty, if none)
    top = np.empty((parts, T, H), np.float32)  # (P, T, H): each block's largest score
    total = np.empty((parts, T, H), np.float32)  # (P, T, H): each block's sum of exp(score - top)
    acc = np.empty((parts, T, H, HD), np.float32)  # (P, T, H, HD): each block's sum of exp(score - top) * v
    KVH = k.shape[1]
    busiest = min(last - first, -(-parts // threads) * block)  # keys of the busiest thread, split by keys
    runs = min(threads, KVH) if threads * busiest > HEAD_RUNS_ABOVE * (last - first) else 1  # runs of KV heads
    for item in prange(runs * parts):  # thread r (of runs > 1) takes items r parts .. (r + 1) parts - 1
        r, p = item // parts, item % parts
        a, b = max(first, (b0 + p) * block), min(last, (b0 + p + 1) * block)  # block p's keys
        kv0, kv1 = r * KVH // runs, (r + 1) * KVH // runs  # run r's KV heads
        _attend_keys(q, k, v, lo, hi, a, max(a, b), kv0, kv1, top[p], total[p], acc[p])
    for t in range(T):  # the merge
        for h in range(H):
            _merge_blocks(top[:, t, h], total[:, t, h], acc[:, t, h], out[t, h])


@njit(cache=True)
def _merge_blocks(top, total, acc, out):
    """out (HD,) = sum_p exp(top_p - m) acc_p / sum_p exp(top_p - m) total_p over the blocks p in order, m the
    largest top; nan if every top is -inf (the query sees no key). Compiled without fast-math, so that the
    sums over blocks are not regrouped into vector lanes, which would group them by the count of blocks: a
    query then gets the same sums whether or not its call also has blocks only later queries see."""
    m = top[0]
    for p in range(1, top.shape[0]):
        m = max(m, top[p])
    if m == -np.inf:
        out[:] = np.nan
        return
    s = np.float32(0.0)
    for p in range(top.shape[0]):
        s += np.exp(top[p] - m) * total[p]
    out[:] = 0.0
    for p in range(top.shape[0]):
        f = np.exp(top[p] - m) / s
        for d in range(out.shape[0]):
            out[d] += f * acc[p, d]


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _causal_softmax(scores, first, lo, window):
    """In place, for the BLAS path: scores (G, Tc, n) of queries at positions first .. first+Tc-1 over keys
    lo .. lo+n-1. Each row becomes the softmax over its visible keys (j <= i, and i - j < window when
    window > 0) and 0 elsewhere, which is what the reference's -inf mask gives; a row that sees no key
    becomes nan, as in the reference. Serial and without the GIL: it runs inside `in_parts`."""
    G, Tc, n = scores.shape
    for t in range(Tc):
        i = first + t
        a = 0 if window <= 0 else max(0, i - window + 1 - lo)  # first visible key, relative to lo
        b = min(i - lo + 1, n)  # one past the last
        for g in range(G):
            row = scores[g, t]
            if b <= a:
                row[:] = np.nan
                continue
            _softmax_in_place(row[a:b])
            row[:a] = 0.0
            row[b:] = 0.0


def _attention_blas(q, k, v, start: int, window: int) -> np.ndarray:
    """Many queries (prefill): per KV head and chunk of queries, scores = Q K^T and P V as BLAS products
    and the masked softmax compiled (`_causal_softmax`). The same operations as the reference, but only
    over each chunk's visible key range, without materialising (H, T, S), and with the KV heads split
    between threads (single-threaded BLAS in each). window <= 0 means no window."""
    T, H, HD = q.shape
    S, KVH, _ = k.shape
    G = H // KVH
    out = np.empty((T, H, HD), np.float32)
    scale = np.float32(HD**-0.5)
    chunk = max(1, min(T, ATTENTION_QUERY_CHUNK, _ATTENTION_CHUNK_BYTES // (4 * G * max(S, 1))))

    def part(p: int, parts: int) -> None:
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            Tc = t1 - t0
            lo = 0 if window <= 0 else max(0, start + t0 - window + 1)  # first key any query here sees
            hi = min(start + t1 - 1, S - 1) + 1  # one past the last
            for kvh in range(KVH * p // parts, KVH * (p + 1) // parts):
                heads = slice(kvh * G, (kvh + 1) * G)
                if hi <= lo:  # no query of this chunk sees a key: nan, as in the reference
                    out[t0:t1, heads] = np.nan
                    continue
                qg = q[t0:t1, heads].transpose(1, 0, 2).reshape(G * Tc, HD)  # (G*Tc, HD)
                scores = qg @ k[lo:hi, kvh].T  # (G*Tc, n)
                scores *= scale
                _causal_softmax(scores.reshape(G, Tc, hi - lo), start + t0, lo, window)
                o = scores @ v[lo:hi, kvh]  # (G*Tc, HD)
                out[t0:t1, heads] = o.reshape(G, Tc, HD).transpose(1, 0, 2)

    in_parts(part, KVH)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """Causal (optionally sliding-window) attention of T new queries over S cached keys.

    q (T, H, HD): queries at absolute positions start .. start+T-1
    k, v (S, KVH, HD): keys/values at positions 0 .. S-1 (S = start + T, the new ones included)
    Query at position i sees key j iff j <= i and i - j < window (window W = W keys, the query's own
    included). Query head h reads KV head h // (H // KVH) (grouped-query attention).
    Returns (T, H, HD).

    Decode (fewer than ATTENTION_BLAS_MIN_ROWS query rows per KV head): `_attention_parts`, which touches
    only the visible keys, reads each cache row once for all the queries and query heads that use it, and
    splits the keys between threads in blocks at fixed positions (the cache is streamed, memory-bound; each
    query's row of the result is bit for bit what it gives alone). Prefill: `_attention_blas`,
    BLAS products per KV head and chunk of queries (compute-bound; about 5x faster per thread than the
    compiled loops, measured).
    k and v may be views of a larger preallocated cache (k_cache[:S]): used in place when float32 and
    C-contiguous.
    """
    q = activation(q)
    k = activation(k)
    v = activation(v)
    T, H, HD = q.shape
    S, KVH, _ = k.shape
    if H % KVH or k.shape[2] != HD or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit (H must be a multiple of KVH)")
    w = 0 if window is None else int(window)
    if window is not None and w <= 0:  # no key is visible: the reference returns nan everywhere
        return np.full(q.shape, np.nan, np.float32)
    if T * (H // KVH) >= ATTENTION_BLAS_MIN_ROWS:
        return _attention_blas(q, k, v, int(start), w)
    out = np.empty_like(q)
    if T:  # blocks of keys at fixed positions, the threads taking runs of them
        run(_attention_parts, 2 * T * S * KVH * HD, q, k, v, int(start), w, ATTENTION_KEY_BLOCK, threads(), out)
    return out


# The attention probabilities are for watching a model (the observer hook), never on the hot path: the
# reference's (H, T, S) computation is the implementation on both backends. So is the blocksparse mask.
from .reference import attention_weights, blocksparse_attention_weights, blocksparse_visible  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------------------
# Phi-3-small: GEGELU and blocksparse attention
# ---------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _gegelu_rows(x, limit, clamp, out):
    """out[t, c] = quick_gelu(a) * (b + 1) with a = x[t, 2c], b = x[t, 2c + 1], clamped as in the reference."""
    one = np.float32(1.0)
    k = np.float32(-1.702)
    for t in prange(x.shape[0]):
        for c in range(out.shape[1]):
            a = x[t, 2 * c]
            b = x[t, 2 * c + 1]
            if clamp:
                if not np.isinf(a):
                    a = min(a, limit)
                if not np.isinf(b):
                    b = min(max(b, -limit), limit)
            out[t, c] = a / (one + exp32(k * a)) * (b + one)


def gegelu(x: np.ndarray, limit: float | None) -> np.ndarray:
    """Phi-3-small's GEGELU, x (T, 2F) interleaved (even columns gelu branch, odd linear) -> (T, F); one fused
    pass instead of the reference's temporaries."""
    x = activation(x)
    if x.ndim != 2 or x.shape[1] % 2:
        raise ValueError(f"gegelu: expects (T, 2F), got {x.shape}")
    out = np.empty((x.shape[0], x.shape[1] // 2), np.float32)
    lim = np.float32(0.0 if limit is None else limit)
    run(_gegelu_rows, x.size, x, lim, limit is not None, out)
    return out


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _blocksparse_rows(q, k, v, start, block, local_blocks, vert_stride, head_step, heads_per_block, out):
    """One work item = (query t, a block of KV heads with their query heads). Only visible keys are read:
    - the local band (the last `local_blocks` blocks, up to the query itself) is the same for every head: the
      key loop is outermost there, so each cache row k[j, block] is streamed once and used for all its query
      heads (the dense kernel, `_attend_keys`, loads each row once for all heads the same way);
    - the vertical blocks before the band (kb0, kb0 + vert_stride, ...; whole blocks) differ per head, so
      each head reads its own.
    A decode step so costs O(visible blocks), not O(S). Each head's scores are laid out [verticals | band]."""
    T, H, HD = q.shape
    KVH = k.shape[1]
    G = H // KVH
    blocks = (KVH + heads_per_block - 1) // heads_per_block
    scale = np.float32(HD**-0.5)
    for item in prange(blocks * T):
        kv0 = (item // T) * heads_per_block
        kv1 = min(KVH, kv0 + heads_per_block)
        t = item % T
        i = start + t
        h0 = kv0 * G
        nh = (kv1 - kv0) * G
        band = max(0, i // block - local_blocks + 1) * block  # first key position of the local band
        n_band = i - band + 1
        first_block = np.empty(nh, np.int64)  # each head's first vertical block, and how many it sees
        n_vertical = np.empty(nh, np.int64)
        for hh in range(nh):
            kb0 = (vert_stride - 1 - ((h0 + hh) * head_step) % vert_stride) % vert_stride
            first_block[hh] = kb0
            n_vertical[hh] = 0 if kb0 * block >= band else (band // block - kb0 + vert_stride - 1) // vert_stride
        scores = np.empty((nh, n_vertical.max() * block + n_band), np.float32)
        for j in range(band, i + 1):  # the band: one read of each cache row for all heads
            for kvh in range(kv0, kv1):
                for g in range(G):
                    hh = (kvh - kv0) * G + g
                    s = np.float32(0.0)
                    for d in range(HD):
                        s += q[t, h0 + hh, d] * k[j, kvh, d]
                    scores[hh, n_vertical[hh] * block + j - band] = s * scale
        for hh in range(nh):  # each head's vertical blocks
            kvh = (h0 + hh) // G
            for b in range(n_vertical[hh]):
                first = (first_block[hh] + b * vert_stride) * block
                for j in range(first, first + block):
                    s = np.float32(0.0)
                    for d in range(HD):
                        s += q[t, h0 + hh, d] * k[j, kvh, d]
                    scores[hh, b * block + j - first] = s * scale
            n = n_vertical[hh] * block + n_band
            _softmax_in_place(scores[hh, :n])
        acc = np.zeros((nh, HD), np.float32)
        for j in range(band, i + 1):
            for kvh in range(kv0, kv1):
                for g in range(G):
                    hh = (kvh - kv0) * G + g
                    p = scores[hh, n_vertical[hh] * block + j - band]
                    for d in range(HD):
                        acc[hh, d] += p * v[j, kvh, d]
        for hh in range(nh):
            kvh = (h0 + hh) // G
            for b in range(n_vertical[hh]):
                first = (first_block[hh] + b * vert_stride) * block
                for j in range(first, first + block):
                    p = scores[hh, b * block + j - first]
                    for d in range(HD):
                        acc[hh, d] += p * v[j, kvh, d]
            for d in range(HD):
                out[t, h0 + hh, d] = acc[hh, d]


def blocksparse_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, block: int, local_blocks: int,
                          vert_stride: int, head_step: int) -> np.ndarray:
    """Phi-3-small's blocksparse causal attention (the pattern of reference.blocksparse_visible), touching only
    the visible key blocks. q (T, H, HD); k, v (S, KVH, HD) at positions 0 .. S-1. Returns (T, H, HD)."""
    q = activation(q)
    k = activation(k)
    v = activation(v)
    T, H, HD = q.shape
    S, KVH, _ = k.shape
    if H % KVH or k.shape[2] != HD or v.shape != k.shape or start + T > S:
        raise ValueError(f"blocksparse_attention: q {q.shape}, k {k.shape}, v {v.shape}, start {start} do not fit")
    out = np.empty_like(q)
    if T:
        work = 2 * T * H * HD * min(S, (local_blocks + S // (block * vert_stride) + 1) * block)
        per = -(-KVH // threads())  # one block of KV heads per thread
        run(_blocksparse_rows, work, q, k, v, int(start), int(block), int(local_blocks), int(vert_stride),
            int(head_step), per, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# the image tower's ops (phinano/vision/): activations and attention without a mask
# ---------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _quick_gelu_flat(x, out):
    """out = x / (1 + exp(-1.702 x)), elementwise in float32."""
    one, k = np.float32(1.0), np.float32(-1.702)
    for i in prange(x.shape[0]):
        out[i] = x[i] / (one + exp32(k * x[i]))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(1.702 x), CLIP's activation, elementwise. x (T, F) -> (T, F).

    Fast because it is one pass without temporaries, in parallel chunks.
    """
    x = activation(x)
    out = np.empty_like(x)
    run(_quick_gelu_flat, x.size, x.reshape(-1), out.reshape(-1))
    return out


@njit(parallel=True, cache=True)
def _gelu_flat(x, out):
    """out = x / 2 * (1 + erf(x / sqrt(2))), in float64 like the reference, rounded to float32."""
    r = 1.0 / math.sqrt(2.0)
    for i in prange(x.shape[0]):
        v = np.float64(x[i])
        out[i] = np.float32(0.5 * v * (1.0 + math.erf(v * r)))


def gelu(x: np.ndarray) -> np.ndarray:
    """x / 2 * (1 + erf(x / sqrt(2))), the exact GELU (not the tanh approximation), elementwise.
    x (T, F) -> (T, F). Fast because erf is compiled (the reference calls math.erf once per element)."""
    x = activation(x)
    out = np.empty_like(x)
    run(_gelu_flat, x.size, x.reshape(-1), out.reshape(-1))
    return out


def encoder_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Attention without a mask: every query sees every key (an image encoder's tokens have no order).
    q, k, v (T, H, HD) -> (T, H, HD).

    Fast because the two products of each head are BLAS calls (heads split between threads) and the softmax
    is the compiled row kernel, in place.
    """
    q, k, v = activation(q), activation(k), activation(v)
    T, H, HD = q.shape
    out = np.empty_like(q)
    scale = np.float32(HD**-0.5)

    def part(p: int, parts: int) -> None:
        for h in range(p * H // parts, (p + 1) * H // parts):
            scores = (q[:, h, :] * scale) @ k[:, h, :].T  # (T, T)
            _softmax_rows_serial(scores)
            out[:, h, :] = scores @ v[:, h, :]  # (T, HD)

    in_parts(part, H)
    return out


@njit(cache=True, nogil=True)
def _softmax_rows_serial(x):
    """x[t] = softmax(x[t]) in place for every row, on the calling thread (in_parts gives each its heads)."""
    for t in range(x.shape[0]):
        _softmax_in_place(x[t])
