"""Prefill products on AMX tiles (Intel Xeon from Sapphire Rapids on): bf16 weights, float32-exact activations.

A prefill multiplies every weight by many tokens, so unlike decode it is bound by arithmetic. Intel's AMX
unit multiplies tiles of bf16 pairs into float32 sums: one `tdpbf16ps` takes a tile A of 16 rows x 32 bf16,
a tile B of 16 rows x 16 pairs and adds the 16 x 16 products into a float32 tile C, 8192 multiply-adds, about
16 times what one AVX-512 float32 instruction stream does per cycle. The weights of a bf16 checkpoint are
bf16 already. The activations are float32, and rounding them to bf16 would cost 8 of their 24 bits. So each
activation is split into three bf16 parts that add up to it exactly (`split_parts`):

    hi  = x with its low 16 bits cleared          (bf16: sign, exponent, top 8 significant bits)
    mid = (x - hi) with its low 16 bits cleared   (x - hi is exact in float32; mid keeps its top 8 bits)
    lo  = x - hi - mid                            (the last 8 bits or fewer: exactly a bf16)

and w x = w hi + w mid + w lo, each product of two bf16 exact in float32. Only the float32 sums round, as in a
float32 BLAS: results are float32-exact products summed in another order (tests/test_amx.py bounds them). Three
products instead of one cost about twice one here (loading the tiles, not the products, limits the unit;
docs/kernels.md), and still run 2-4x the float32 BLAS path. Fewer parts are an option (`set_parts`):
2 keeps about 16 bits of each activation, 1 is plain bf16 activations (rounded to nearest), faster and less
exact; docs/kernels.md shows what each costs. Edges: a part below float32's normal range (bf16 has the same
exponents; it happens for |x| < 2^-110 or so) is flushed to zero by the unit; an infinite or nan activation
keeps only its `hi` part, so it spreads as it does in float32.

How a product y = x @ w.T runs (`matmul`, x (T, K), w (N, K) bf16 bits):
    xp = split_parts(x)            (Mb, P, K / 2, 16, 2) uint16: for each block of 16 tokens and part p, the
                                   pairs (x[m, 2k], x[m, 2k + 1]) as AMX's B operand wants them (row k,
                                   column m); tokens padded with zeros to a multiple of 32
    _matmul_tiles(w, xp, y)        per block of ROW_BLOCK weight rows (one work item, in parallel):
        per pass over the columns (rows wider than WIDE_ROWS: K_BLOCK at a time), per pair of 16-token
        blocks, per 32 weight rows:
            C0..C3 (2 x 2 tiles of 16 rows x 16 tokens, float32) = the sums so far (0 at first)
            per 32 columns: A4, A5 = 2 x 16 weight rows, straight from w (row stride 2K bytes)
                            per part: B6, B7 = the 2 token blocks' pairs; C0 += A4 B6, C1 += A4 B7,
                                      C2 += A5 B6, C3 += A5 B7
            the sums stored back (a float32 buffer of the block's rows x all tokens, in L2)
        the block's sums written into y (T, N)
The weights of a block (ROW_BLOCK x K_BLOCK bf16) and a token pair's parts (32 x K_BLOCK x P) stay in L2 while
they are used again; each weight byte comes from memory once per call. Rows past the last multiple of 32 are
left to the caller (`fast.linear` sends them through its BLAS path).

The tile instructions are emitted as LLVM intrinsics through Numba's `intrinsic` (as widening.py does for
bf16): `ldtilecfg`, `tileloadd64`, `tilestored64`, `tilezero`, `tdpbf16ps`, `tilerelease`. Tile numbers are
part of each instruction, so each (op, tile) is its own intrinsic. Linux hands AMX's 8 KB of tile state to a
process only when it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); `available()` asks once.
The kernels compile only when first called, so a CPU without AMX never compiles them.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import PhinanoError
from .runtime import threads
from .widening import f32_bits, f32_from_bits

# Blocking, measured on the 2-core Intel Xeon (Emerald Rapids) kind, 2026-11-30 (the only kind with AMX here):
# 8192 x 3072 and 3072 x 8192 bf16, 3 parts, GFLOP/s counted as one float32 product per weight and token.
# - ROW_BLOCK: weight rows a work item owns. 32, 64, 128 and 256 ran within 10 % of each other; 128 keeps
#   K_BLOCK columns of them (512 KB) in L2 and still makes 24 work items of a 3072-row matrix.
# - K_BLOCK: rows wider than WIDE_ROWS are taken in passes of K_BLOCK columns; the block's sums go to a
#   float32 buffer between passes. A pass's parts of x (32 tokens x 2048 columns x 3 parts x 2 bytes, 384
#   KB) then stay in L2 while the block's rows stream past them. 8 matrices of 3072 x 8192 in turn (from
#   memory), whole rows against passes of 2048 / 1024 / 512: 1.12 / 1.18 / 1.11x faster at 16 tokens, 1.18 /
#   1.21 / 1.20x at 64, 1.14 / 1.16 / 1.17x at 256, 0.95 / 1.03 / 1.04x at 512. For 8192 x 3072 whole rows
#   were as fast or faster (passes of 2048: 0.94x at 16 tokens, 0.98-1.03x from 64 on).
# - TOKEN_CHUNK: tokens per kernel call (the sums buffer holds a block's rows x all its tokens).
ROW_BLOCK = 128
K_BLOCK = 2048
WIDE_ROWS = 4096
TOKEN_CHUNK = 512
PARTS = 3  # bf16 parts per activation (3: float32-exact; 2: ~16 bits; 1: plain bf16); see `set_parts`
_TILE_ROWS, _TILE_BYTES = 16, 64  # every tile here: 16 rows of 64 bytes (32 bf16, or 16 float32)

_I8, _I64 = ir.IntType(8), ir.IntType(64)
_VOID, _PTR = ir.VoidType(), ir.IntType(8).as_pointer()


# ------------------------------------------------------------------------------- availability and settings

_available: bool | None = None


def _request_tile_state() -> bool:
    """Ask Linux for AMX's tile state for this process: arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023,
    XFEATURE_XTILEDATA = 18) through syscall 158. True when granted."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0
    except (OSError, AttributeError):
        return False


def available() -> bool:
    """True when AMX products can run here: the CPU has AMX tiles with bf16 (as LLVM sees the host), the
    kernel granted the tile state, and PHINANO_AMX is not "0" ("1", the default, or unset: use them where
    they are). Decided once per process."""
    global _available
    if _available is None:
        switch = os.environ.get("PHINANO_AMX", "1")
        if switch not in ("0", "1"):
            raise PhinanoError(f"PHINANO_AMX must be 0 (off) or 1 (on where the CPU has AMX), not {switch!r}")
        from llvmlite import binding

        features = binding.get_host_cpu_features()
        has_amx = bool(features.get("amx-tile")) and bool(features.get("amx-bf16"))
        _available = switch == "1" and has_amx and _request_tile_state()
    return _available


def set_parts(parts: int) -> int:
    """Use `parts` bf16 parts per activation in AMX products (3, the default: float32-exact; 2; 1: plain
    bf16 activations). The environment variable PHINANO_AMX_PARTS sets it at import. Returns the value."""
    global PARTS
    if parts not in (1, 2, 3):
        raise PhinanoError(f"AMX activation parts must be 1, 2 or 3, not {parts!r}")
    PARTS = parts
    return PARTS


def _parts_from_environment() -> None:
    value = os.environ.get("PHINANO_AMX_PARTS")
    if value is not None:
        if value.strip() not in ("1", "2", "3"):
            raise PhinanoError(f"PHINANO_AMX_PARTS must be 1, 2 or 3, not {value!r}")
        set_parts(int(value))


_parts_from_environment()


# ------------------------------------------------------------------------------------- the tile intrinsics


def _call(builder, name, arg_types, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VOID, arg_types), name)
    builder.call(fn, args)


def _address(context, builder, array_type, array, byte_offset):
    """An i8 pointer to byte `byte_offset` (i64) of an array's data."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(builder.bitcast(data, _PTR), [byte_offset])


@intrinsic
def _configure(typingctx, config):
    """ldtilecfg: load the 64-byte tile configuration (palette 1, each tile's rows and bytes a row)."""

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.ldtilecfg", [_PTR], [_address(context, builder, signature.args[0], args[0],
                                                               ir.Constant(_I64, 0))])
        return context.get_dummy_value()

    return types.void(config), codegen


@intrinsic
def _release(typingctx):
    """tilerelease: give the tile state back (the thread's tiles return to their initial state)."""

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.void(), codegen


def _tile_memory(name: str, tile: int):
    """tileloadd64 / tilestored64 of one tile: (array, byte offset, row stride in bytes)."""

    @intrinsic
    def op(typingctx, array, offset, stride):
        def codegen(context, builder, signature, args):
            at = _address(context, builder, signature.args[0], args[0], args[1])
            _call(builder, name, [_I8, _PTR, _I64], [ir.Constant(_I8, tile), at, args[2]])
            return context.get_dummy_value()

        return types.void(array, types.int64, types.int64), codegen

    return op


def _tile_zero(tile: int):
    @intrinsic
    def op(typingctx):
        def codegen(context, builder, signature, args):
            _call(builder, "llvm.x86.tilezero", [_I8], [ir.Constant(_I8, tile)])
            return context.get_dummy_value()

        return types.void(), codegen

    return op


def _tile_dot(c: int, a: int, b: int):
    """tdpbf16ps: tile c (16 x 16 float32) += tile a (16 x 32 bf16) times tile b (16 x 16 bf16 pairs)."""

    @intrinsic
    def op(typingctx):
        def codegen(context, builder, signature, args):
            _call(builder, "llvm.x86.tdpbf16ps", [_I8] * 3, [ir.Constant(_I8, t) for t in (c, a, b)])
            return context.get_dummy_value()

        return types.void(), codegen

    return op


# tiles 0-3: the sums C0..C3; 4, 5: weight rows A4, A5; 6, 7: token pairs B6, B7
_load_c0, _load_c1, _load_c2, _load_c3, _load_a4, _load_a5, _load_b6, _load_b7 = (
    _tile_memory("llvm.x86.tileloadd64", t) for t in range(8))
_store_c0, _store_c1, _store_c2, _store_c3 = (_tile_memory("llvm.x86.tilestored64", t) for t in range(4))
_zero_c0, _zero_c1, _zero_c2, _zero_c3 = (_tile_zero(t) for t in range(4))
_dot_c0, _dot_c1, _dot_c2, _dot_c3 = _tile_dot(0, 4, 6), _tile_dot(1, 4, 7), _tile_dot(2, 5, 6), _tile_dot(3, 5, 7)


def _tile_config() -> np.ndarray:
    """The 64-byte ldtilecfg block: palette 1; tiles 0-7 each 16 rows of 64 bytes."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    config[16:32] = np.frombuffer(np.full(8, _TILE_BYTES, "<u2").tobytes(), np.uint8)
    config[48:56] = _TILE_ROWS
    return config


_CONFIG = _tile_config()


# -------------------------------------------------------------------------------------------- the kernels


@njit(inline="always")
def _part(left, last):
    """(bf16 bits of the next part, what is left after it) for a float32 `left`: its top 16 bits, rounded to
    nearest even when `last`; an inf or nan leaves 0 (so it does not turn into nan in the later parts)."""
    bits = f32_bits(left)
    if last and left == left:
        bits = np.uint32(bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    top = np.uint32(bits & np.uint32(0xFFFF0000))
    kept = f32_from_bits(top)
    rest = left - kept if np.isfinite(kept) else np.float32(0.0)
    return np.uint16(top >> np.uint32(16)), rest


@njit(inline="always")
def _row_part(left, out, last):
    """One part of a row: out (K,) uint16 the bf16 bits, left (K,) float32 what remains (in place)."""
    for k in range(left.shape[0]):
        out[k], left[k] = _part(left[k], last)


@njit(parallel=True, cache=True)
def _split_parts(x, parts, pairs):
    """x (T, K) float32 -> pairs (Mb, P, K / 2, 16) uint32: the P bf16 parts of each activation, two columns
    to a uint32 (column 2c in the low half), laid out as AMX's B tiles (block of 16 tokens, part, column
    pair, token in block); tokens T .. 16 Mb are zeros. Every part but the last keeps the top 16 bits of
    what is left (truncation: the rest is then exact); the last rounds to nearest even (for P = 3 it is
    exact already). Each block of 16 tokens is one work item: its rows' parts first, row by row (loops
    that vectorise), then turned into the tile layout, 64 bytes at a time."""
    T, K = x.shape
    Mb = pairs.shape[0]
    for b in prange(Mb):
        rows = np.zeros((parts, 16, K), np.uint16)  # (P, token in block, column)
        left = np.empty(K, np.float32)  # (K,) what the parts so far leave of a token's x
        for i in range(min(16, T - 16 * b)):
            left[:] = x[16 * b + i]
            for p in range(parts - 1):
                _row_part(left, rows[p, i], False)
            _row_part(left, rows[parts - 1, i], True)
        row_pairs = rows.reshape(parts * 16 * K).view(np.uint32).reshape((parts, 16, K // 2))
        for p in range(parts):
            for c in range(K // 2):
                for i in range(16):
                    pairs[b, p, c, i] = row_pairs[p, i, c]


@njit(inline="always")
def _weights_at(row, c, K):
    """Byte offset of w[row, c] in w (N, K) bf16: an A tile is 16 such rows of 32 columns, 2K bytes apart."""
    return (row * K + c) * 2


@njit(inline="always")
def _parts_at(b, p, c, parts, half):
    """Byte offset of the B tile of token block b, part p, columns c .. c + 31 in xp (Mb, P, K / 2, 16, 2):
    16 column pairs x 16 tokens x 4 bytes, one contiguous KB (rows 64 bytes apart)."""
    return ((b * parts + p) * half + c // 2) * 64


@njit(inline="always")
def _sums_at(t, b, Mb):
    """Byte offset of the 16 x 16 float32 tile sums[t, b] in sums (row tiles, Mb, 16, 16): 1 KB each."""
    return (t * Mb + b) * 1024


@njit(parallel=True, cache=True)
def _matmul_tiles(w, xp, parts, config, row_block, k_block, y):
    """y[:, :N32] = x @ w[:N32].T from x's parts xp (see `_split_parts`), N32 = N // 32 * 32.
    w (N, K) uint16 bf16 bits, C-contiguous, K % 32 == 0; xp (Mb, P, K / 2, 16, 2) uint16, Mb even;
    y (T, N) float32 out (columns N32 .. N untouched)."""
    N, K = w.shape
    T = y.shape[0]
    Mb = xp.shape[0]
    half = K // 2
    n32 = N // 32 * 32
    blocks = (n32 + row_block - 1) // row_block
    for blk in prange(blocks):
        _configure(config)
        n0 = blk * row_block
        rows = min(row_block, n32 - n0)
        sums = np.empty((rows // 16, Mb, 16, 16), np.float32)  # (row tile, token block, row, token)
        for k0 in range(0, K, k_block):
            k1 = min(K, k0 + k_block)
            for mp in range(0, Mb, 2):
                for r in range(0, rows, 32):  # weight rows n0 + r .. n0 + r + 31
                    t = r // 16  # their two row tiles in sums: t, t + 1
                    if k0 == 0:
                        _zero_c0()
                        _zero_c1()
                        _zero_c2()
                        _zero_c3()
                    else:
                        _load_c0(sums, _sums_at(t, mp, Mb), 64)
                        _load_c1(sums, _sums_at(t, mp + 1, Mb), 64)
                        _load_c2(sums, _sums_at(t + 1, mp, Mb), 64)
                        _load_c3(sums, _sums_at(t + 1, mp + 1, Mb), 64)
                    for c in range(k0, k1, 32):
                        _load_a4(w, _weights_at(n0 + r, c, K), K * 2)  # rows n0 + r .. + 15, columns c .. c + 31
                        _load_a5(w, _weights_at(n0 + r + 16, c, K), K * 2)  # the next 16 rows
                        for p in range(parts):
                            _load_b6(xp, _parts_at(mp, p, c, parts, half), 64)  # tokens of block mp, part p
                            _load_b7(xp, _parts_at(mp + 1, p, c, parts, half), 64)  # block mp + 1
                            _dot_c0()
                            _dot_c1()
                            _dot_c2()
                            _dot_c3()
                    _store_c0(sums, _sums_at(t, mp, Mb), 64)
                    _store_c1(sums, _sums_at(t, mp + 1, Mb), 64)
                    _store_c2(sums, _sums_at(t + 1, mp, Mb), 64)
                    _store_c3(sums, _sums_at(t + 1, mp + 1, Mb), 64)
        _release()
        for m in range(T):  # sums[row tile, token block, row, token] -> y[token, row]
            b, j = m // 16, m % 16
            for t in range(rows // 16):
                for i in range(16):
                    y[m, n0 + 16 * t + i] = sums[t, b, i, j]


# ------------------------------------------------------------------------------------------- the wrappers


def split_parts(x: np.ndarray, parts: int | None = None) -> np.ndarray:
    """x (T, K) float32 -> (Mb, P, K / 2, 16, 2) uint16, its P bf16 parts as AMX's B tiles (tokens padded to a
    multiple of 32, K even). In NumPy terms, for P = 3 and token m < T, column k:
        hi = x & 0xFFFF0000, mid = (x - hi) & 0xFFFF0000, lo = x - hi - mid, and hi + mid + lo == x exactly."""
    parts = PARTS if parts is None else parts
    T, K = x.shape
    Mb = 2 * -(-T // 32)
    xp = np.empty((Mb, parts, K // 2, 16, 2), np.uint16)
    _split_parts(x, parts, xp.view(np.uint32).reshape(Mb, parts, K // 2, 16))
    return xp


def matmul(x: np.ndarray, w: np.ndarray, parts: int | None = None) -> np.ndarray:
    """y = x @ float32(w).T on AMX tiles, for the first N // 32 * 32 rows of w. x (T, K) float32
    C-contiguous, w (N, K) uint16 bf16 bits with K % 32 == 0 -> y (T, N) float32 (columns past N // 32 * 32
    left unset: the caller fills them). Raises RuntimeError where `available()` is False (a tile instruction
    without the tile state granted would kill the process with SIGILL)."""
    if not available():
        raise RuntimeError("AMX bf16 tiles are not available on this CPU (or PHINANO_AMX=0)")
    T, K = x.shape
    N = w.shape[0]
    if K % 32 or w.dtype != np.uint16 or w.shape[1] != K:
        raise ValueError(f"AMX products need bf16 weights (N, K) with K a multiple of 32; got {w.dtype} {w.shape}")
    w = np.ascontiguousarray(w)  # row slices of a C array are already; a memmap becomes a plain view
    y = np.empty((T, N), np.float32)
    row_block = ROW_BLOCK
    while row_block > 32 and (N // 32 * 32) // row_block < 2 * threads():  # at least two blocks a thread
        row_block //= 2
    for t0 in range(0, T, TOKEN_CHUNK):
        x_chunk = x[t0 : t0 + TOKEN_CHUNK]  # (t, K)
        xp = split_parts(x_chunk, parts)  # (Mb, P, K / 2, 16, 2)
        k_block = K_BLOCK if K > WIDE_ROWS else K
        _matmul_tiles(w, xp, xp.shape[1], _CONFIG, row_block, k_block, y[t0 : t0 + TOKEN_CHUNK])
    return y
