"""Block dot products of packed weights, written as explicit vector loops: the decode kernels of Q8_0
and GGML's legacy types (Q4_0, Q4_1, Q5_0, Q5_1) in quantized.py call `dot`, those of the
K-quants in kquants.py `k_quant_tile` (Q4_K, Q5_K), `q4_k_tile` (Q4_K on AVX-512) and
`q6_k_tile` (Q6_K), whose sections below say how they differ. Every loop takes a tile of tokens (one
token, or several that share each unpacked block) and writes y itself.
The legacy types' vectors have WIDTH float32 lanes: 16 (one AVX-512 register) where the CPU has AVX-512,
else 8 (AVX2); Q4_K's too (`q4_k_tile_dot`), Q5_K's have 8. On AVX-512 the 4-bit types turn nibbles
straight into their dequantized weights by a table lookup (`_lookup`: `nibble_table_dot` for Q4_0 and
Q4_1, Q4_K's loop), and Q6_K runs in 16 lanes (`q6_k_wide_tile_dot`). The bf16 decode loop lives
here too (section "bf16 pairs"), written out for a different reason: each token summed alike in every tile.

Why explicit vectors. These products are bound by arithmetic on an AVX2 CPU: each weight is unpacked to
float32 and multiplied, and the memory brings the bytes faster than the core unpacks them. So every
instruction in the loop costs time. Written as plain Numba loops, LLVM's vectoriser left a lot of them:
- Q8_0 summed each block's 32 products into a scalar: a horizontal sum of a vector register per block and
  row, as costly as the products themselves. Lane accumulators in plain Numba were not vectorised at all.
- The 4-bit loop kept its lane accumulators in a heap array and stored them back every block, reloaded
  the nibble mask, and could share each x load between two rows only: with four rows the accumulators
  spilled.
Here each kernel is the loop an AVX2 programmer would write with intrinsics, emitted as LLVM IR through
Numba's `intrinsic`: per block and row, four 8-lane vectors of the block's integers, four fused
multiply-adds with x, one multiply-add by the block's scale into one 8-lane accumulator, no stores. Four
rows share each x load. Measured on AMD EPYC (Zen 3, AVX2, 2026-11-30), the old and the new kernels taking
turns: docs/kernels.md, "Explicit vector loops". With AVX-512 the same loop runs in two 16-lane vectors a
block (half the instructions; 1.1-1.3x on the Intel Xeon kind, docs/kernels.md).

What `dot(kind, first, False, x, sums, data, y, r0, t)` computes, for block type TYPES[kind] and R = ROWS rows:
    x     (T, K) float32       the tokens' activations
    sums  (T, K // 32) float32 the sum of x over each block of 32 (made once per call, shared by all rows)
    data  (N, L) uint8         the packed matrix, L = K // 32 * block bytes, C-contiguous
    y     (T, N) float32       written: y[t, r] = sum over c of x[t, c] * w[r, c] for the R rows
    r0, t                      the rows r0 .. r0 + R - 1 (each clamped to N - 1), the token t
`dot(kind, first, True, ...)` does the same for BLOCK_TOKENS tokens t, t + 1, ... at once (4 on AVX-512,
each block's integers unpacked once for all of them; tokens past T - 1 repeat the last one). Their IR is
strict (`llvm.fma`, no fast-math flags): a token's sum is the same instructions in the same order in
either, so a token of a tile is bit for bit that token alone (what batched decode, `linear_rows`, relies on).

Per block b of 32 weights and per row (weight = d * (q - zero) or d * q + m), with n = WIDTH lanes:
    q0, q1, ... = the integers q[n k .. n k + n - 1], k < 32 / n, as float32 vectors   (per type, exact)
    s    = x[t, 32b : 32b + n] q0 + x[t, 32b + n : 32b + 2n] q1 + ... - (zero / n) sums[t, b]  (n lanes)
    acc += d s                                                                          (n lanes)
    a   += m sums[t, b]                                            (only types with a stored minimum m)
and y = (sum of acc's n lanes) + a (`block_dot`; Q4_0 and Q4_1 on AVX-512 differ: `nibble_table_dot`). The
zero point's share -(zero / n) sums[b] sits in every lane, so the n lanes together subtract zero * sums[b],
the block's d * zero * sum of x once scaled by d; zero / n is a
power of two (1 or 2 for 8 lanes, 0.5 or 1 for 16), an exact scaling. Results differ from the unpacked
reference only in the order of float32 additions and in the rounding of that share
(tests/test_quantized.py states the bound).

With `first` (the first tile of a call, when the bytes come from memory; a run-time flag of every
intrinsic) it also asks for the bytes PREFETCH_AHEAD beyond the blocks it reads (prefetch.py: one
`prefetcht1` per 64-byte line of the R rows' blocks). `kind` is a constant where the kernels call it, so
the other types' branches compile away.

Editing this file: Numba's on-disk cache keys each compiled kernel on the file that defines it
(quantized.py, kquants.py, fast.py), not on the files its helpers come from. After a change here, touch
those three files (or delete phinano/kernels/__pycache__), or the kernels keep running the old loops.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .prefetch import prefetch_lines

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the block types, in the order `kind` numbers them
ROWS = 4  # rows per call: four rows share each x load (more would not fit AVX2's 16 vector registers)
LANES = 8  # float32 lanes of an AVX2 register


def _host_width() -> int:
    """Float32 lanes of the widest vectors the legacy-type and Q4_K loops use here: 16 (one 512-bit
    register) where the CPU has AVX-512 (F and BW, as LLVM sees the host), else 8. PHINANO_VECTOR_LANES
    (8 or 16) overrides it, for tests of the other width."""
    import os

    from ..errors import PhinanoError

    asked = os.environ.get("PHINANO_VECTOR_LANES")
    if asked is not None:
        if asked not in ("8", "16"):
            raise PhinanoError(f"PHINANO_VECTOR_LANES must be 8 or 16, not {asked!r}")
        return int(asked)
    features = binding.get_host_cpu_features()
    return 16 if features.get("avx512f") and features.get("avx512bw") else 8


# LLVM turns an explicit 16-lane vector into one 512-bit instruction (its own loops stay at 256 bits on
# these CPUs: "prefer-vector-width"), so on AVX-512 a block of 32 weights is 2 vectors, not 4: half the
# instructions per weight in loops that are bound by instructions.
WIDTH = _host_width()


def _host_has(feature: str) -> bool:
    """Whether the code Numba compiles may use an instruction set (LLVM's name: "avx512f", "avx512vbmi"):
    the x86 intrinsics of 16-lane table lookups need AVX-512F (16 lanes alone do not: PHINANO_VECTOR_LANES=16
    on an AVX2 CPU runs them as pairs of 8-lane halves), Q6_K's byte permutes AVX-512 VBMI. Where Numba is
    told to compile for another CPU (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, e.g. for a cache shared between
    machines), only an explicit +feature counts."""
    from numba.core import config

    if config.CPU_FEATURES:
        return f"+{feature}" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME not in (None, "host"):
        return False
    return bool(binding.get_host_cpu_features().get(feature))


AVX512 = _host_has("avx512f")
VBMI = AVX512 and _host_has("avx512vbmi")  # byte permutes (vpermb): Intel from Ice Lake on, AMD from Zen 4 on
_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_BYTES8, _INTS8, _FLOATS8 = ir.VectorType(_I8, LANES), ir.VectorType(_I32, LANES), ir.VectorType(_F32, LANES)


# --------------------------------------------------------------------------------- small vector operations


def _vector(element, lanes):
    return ir.VectorType(element, lanes)


def _const(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def _splat(builder, scalar, vector_type=_FLOATS8):
    """scalar -> a vector of copies (as many as vector_type has lanes)."""
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(_I32, 0))
    mask = _const(_vector(_I32, vector_type.count), 0)
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), mask)


def _llvm_fma(builder, a, b, c):
    """a * b + c, rounded once (`llvm.fma`: one vfmadd on CPUs with FMA)."""
    name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(fma, [a, b, c])


def _ordered_lane_sum(builder, v):
    """The sum of a vector's lanes as a fixed tree (pairs of neighbours, then pairs of those, ...)."""
    parts = [builder.extract_element(v, ir.Constant(_I32, i)) for i in range(v.type.count)]
    while len(parts) > 1:
        parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def _load(builder, pointer, offset, element_type):
    """The value of element_type at byte `offset` (an i64) of an i8 pointer, unaligned."""
    at = builder.gep(pointer, [offset])
    return builder.load(builder.bitcast(at, element_type.as_pointer()), align=1)


def _ints(builder, pointer, offset, signed=False, lanes=LANES):
    """The `lanes` bytes at byte `offset` of an i8 pointer as int32 lanes, zero- (or sign-) extended."""
    raw = _load(builder, pointer, offset, _vector(_I8, lanes))
    return builder.sext(raw, _vector(_I32, lanes)) if signed else builder.zext(raw, _vector(_I32, lanes))


def _floats(builder, pointer, index, lanes=LANES):
    """The `lanes` float32 at element `index` (an i64) of a float pointer."""
    vector = _vector(_F32, lanes)
    return builder.load(builder.bitcast(builder.gep(pointer, [index]), vector.as_pointer()), align=4)


def _bit_to_16s(builder, ints, shift):
    """(ints >> shift & 1) << 4 lane by lane: one bit of each lane moved to the 16s place (shift: a vector)."""
    return builder.shl(builder.and_(builder.lshr(ints, shift), _const(ints.type, 1)), _const(ints.type, 4))


# Every float16 as float32, indexed by its 16 bits: the blocks' scales d (and mins m) are read through it.
# A load from this table, then a broadcast straight from memory, is work for the load ports alone, where the
# conversion instruction (`vcvtph2ps`) and a register broadcast took two vector instructions per block and
# row from the two vector ports that bind these loops on AVX-512: Q8_0 and Q4_0 ran 1.1-1.2x faster with it
# (Intel Xeon, Emerald Rapids, 2026-12-01; docs/kernels.md, "Scales from a table"). GGML keeps the same
# table for CPUs without F16C. The compiled loops find it by the symbol name F16_TABLE_SYMBOL (registered
# with LLVM below, as Numba registers its own C helpers), so it is not baked into every cached kernel.
F16_AS_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # (65536,) 256 KiB
F16_TABLE_SYMBOL = "phinano_f16_as_f32"
binding.add_symbol(F16_TABLE_SYMBOL, F16_AS_F32.ctypes.data)


def _f16(builder, pointer, offset):
    """The little-endian float16 at byte `offset`, as float32: F16_AS_F32[its bits] (exact)."""
    module = builder.module
    try:
        table = module.get_global(F16_TABLE_SYMBOL)
    except KeyError:
        table = ir.GlobalVariable(module, ir.ArrayType(_F32, 1 << 16), F16_TABLE_SYMBOL)
        table.linkage, table.global_constant = "external", True
    bits = builder.zext(_load(builder, pointer, offset, ir.IntType(16)), _I64)
    return builder.load(builder.gep(table, [ir.Constant(_I64, 0), bits]))


def _keep_in_memory(builder, pointer):
    """An empty inline-assembly statement that may have written any memory `pointer` leads to: LLVM must then
    load those values from memory again instead of keeping them in registers (so a scalar used in 16
    lanes becomes a broadcast load, work for the load ports, and not a shuffle). It emits no instruction."""
    barrier = ir.FunctionType(ir.VoidType(), [pointer.type])
    builder.asm(barrier, "", "r,~{memory}", [pointer], True)


def _lane_from_memory(builder, slot, j, vector_type):
    """Lane j of the float vector stored at `slot` (kept there by `_keep_in_memory`), in every lane of
    vector_type: LLVM makes it the broadcast operand of the instruction that uses it."""
    at = builder.gep(builder.bitcast(slot, _F32.as_pointer()), [ir.Constant(_I32, j)])
    return _splat(builder, builder.load(at), vector_type)


def _plus(builder, offset, n):
    return builder.add(offset, ir.Constant(_I64, n))


# ------------------------------------------------------------------- a block's 32 integers, per block type


def _q8_0_integers(builder, block, lanes):
    """Q8_0 (d at 0, 32 int8 q at 2): q[n k .. n k + n - 1] as float32 (n = lanes), sign-extended."""
    row, o = block
    return [builder.sitofp(_ints(builder, row, _plus(builder, o, 2 + lanes * k), True, lanes), _vector(_F32, lanes))
            for k in range(32 // lanes)]


def _nibble_integers(qs_at, qh_at):
    """The legacy types: 16 bytes of nibbles at qs_at (byte i: q[i] low, q[i + 16] high) and, if qh_at is not
    None, the uint32 of fifth bits at qh_at (bit j adds 16 to q[j])."""

    def integers(builder, block, lanes):
        row, o = block
        ints = _vector(_I32, lanes)
        fifteen, four = _const(ints, 15), _const(ints, 4)
        if lanes == 16:  # (Q4_0 and Q4_1 on AVX-512 take `nibble_table_dot` instead)
            qs = _ints(builder, row, _plus(builder, o, qs_at), lanes=16)  # bytes 0..15
            q = [builder.and_(qs, fifteen), builder.lshr(qs, four)]  # q[0..15], q[16..31]
        else:
            low8 = _ints(builder, row, _plus(builder, o, qs_at))  # bytes 0..7
            high8 = _ints(builder, row, _plus(builder, o, qs_at + 8))  # bytes 8..15
            q = [builder.and_(low8, fifteen), builder.and_(high8, fifteen),  # q[0..7], q[8..15]
                 builder.lshr(low8, four), builder.lshr(high8, four)]  # q[16..23], q[24..31]
        if qh_at is not None:
            qh = _splat(builder, _load(builder, row, _plus(builder, o, qh_at), _I32), ints)
            for k in range(len(q)):  # lane i of q[k] takes bit n k + i of qh (n = lanes), moved to the 16s place
                bit = ir.Constant(ints, [lanes * k + i for i in range(lanes)])
                q[k] = builder.or_(q[k], _bit_to_16s(builder, qh, bit))
        return [builder.sitofp(v, _vector(_F32, lanes)) for v in q]

    return integers


def _lookup(builder, table, ints):
    """table[ints & 15] lane by lane, for a 16-lane float32 table and 16 int32 lanes: one `vpermps`
    (AVX-512F), which reads only the low 4 bits of each index lane. So one instruction turns a lane holding
    a byte into a float32 chosen by its low nibble (after a shift, by its high one), where an AND and an
    int-to-float conversion took two of AVX-512's two vector ports (docs/kernels.md, "Nibbles by table on
    AVX-512"); with a table of the block's weights (`nibble_table_dot`, Q4_K's loop) it also applies the
    scale. AVX2's `vpermps` has 8 table lanes, too few for 16 nibble values."""
    permute = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(table.type, [table.type, ints.type]), "llvm.x86.avx512.permvar.sf.512")
    return builder.call(permute, [table, ints])


_NIBBLES = ir.Constant(_vector(_F32, 16), [float(i) for i in range(16)])  # 0.0 .. 15.0

# Inline assembly with instructions in it needs LLVM's assembly parser, which Numba does not set up.
binding.initialize_native_asmparser()


def _top_bytes(builder, v, first):
    """Bytes first .. first + 15 of a 64-byte vector, byte i as the top byte of int32 lane i, the other three
    bytes 0: (byte << 24) lane by lane, so a signed byte b becomes the int32 b * 2^24. One `vpermb` with a
    zeroing mask (AVX-512 VBMI), where taking a 128-bit part out and sign-extending it took two instructions,
    both on the one vector port that also does every shuffle. It is written as inline assembly: LLVM turns
    the same permute-and-select in IR into `vpermt2b`, which costs two of that port's cycles."""
    bytes64 = _vector(_I8, 64)
    picks = ir.Constant(bytes64, [first + k // 4 for k in range(64)])  # byte k of the result: byte first + k // 4
    tops = ir.Constant(ir.IntType(64), 0x8888888888888888)  # keep byte 3 of every 4, zero the rest
    permute = ir.FunctionType(bytes64, [bytes64, bytes64, ir.IntType(64)])
    out = builder.asm(permute, "vpermb $1, $2, $0 {$3} {z}", "=v,v,v,^Yk", [v, picks, tops], False)
    return builder.bitcast(out, _vector(_I32, 16))


# (bytes per block, its integers, where m is or None, zero point or 0) per type
_BLOCKS = {
    "Q8_0": (34, _q8_0_integers, None, 0),
    "Q4_0": (18, _nibble_integers(2, None), None, 8),
    "Q4_1": (20, _nibble_integers(4, None), 2, 0),
    "Q5_0": (22, _nibble_integers(6, 2), None, 16),
    "Q5_1": (24, _nibble_integers(8, 4), 2, 0),
}


# ------------------------------------------------------------------------------------------- the dot product


class _Packed(NamedTuple):
    """The packed matrix as the loops read it."""

    packed: object  # the packed matrix (N, L) as an i8 pointer
    starts: list  # (R,) i64 byte offsets of the tile's rows in packed (`_row_starts`)
    last_byte: object  # N * L - 1, where prefetches are clamped


class _Tile(NamedTuple):
    """What the tile intrinsics (`block_dot`, `nibble_table_dot`, `k_quant_tile_dot`, `q4_k_tile_dot`,
    `q6_k_tile_dot`, `q6_k_wide_tile_dot`) start from (`_tile_start`)."""

    K: object  # i64
    N: object  # i64
    blocks: object  # K // 32 (i64), or None without sums
    w: _Packed  # packed matrix, row starts and last byte, for the loops and `_prefetch_ahead`
    x_rows: list  # per token of the tile: the float pointer of its row of x
    sum_rows: list  # the same of sums, or None
    tokens: list  # per token of the tile: its index, clamped to T - 1 (i64)
    y: object  # the output array (T, N)
    r0: object  # the first row (i64)
    first: object  # i1: the first tile of a call, which asks for the bytes ahead (`_prefetch_ahead`)


def _tile_start(context, builder, signature, args, rows, tokens, with_sums) -> _Tile:
    """The arguments (x, [sums,] data, y, r0, t0, first) of a tile intrinsic unpacked for its loop."""
    arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:-3], args[:-3])]
    xs, data, y = arrays[0], arrays[-2], arrays[-1]
    sums = arrays[1] if with_sums else None
    r0, t0, first = args[-3:]
    T, K = cgutils.unpack_tuple(builder, xs.shape, 2)
    N, L = cgutils.unpack_tuple(builder, data.shape, 2)
    base = builder.bitcast(data.data, _I8.as_pointer())
    w = _Packed(packed=base, starts=_row_starts(builder, r0, rows, N, L),
                last_byte=builder.sub(builder.mul(N, L), ir.Constant(_I64, 1)))
    last_token = builder.sub(T, ir.Constant(_I64, 1))
    t = []
    for i in range(tokens):
        ti = _plus(builder, t0, i)
        t.append(builder.select(builder.icmp_signed("<", ti, T), ti, last_token))
    blocks = cgutils.unpack_tuple(builder, sums.shape, 2)[1] if with_sums else None
    return _Tile(K=K, N=N, blocks=blocks, w=w, x_rows=[builder.gep(xs.data, [builder.mul(ti, K)]) for ti in t],
                 sum_rows=[builder.gep(sums.data, [builder.mul(ti, blocks)]) for ti in t] if with_sums else None,
                 tokens=t, y=y, r0=r0, first=cgutils.as_bool_bit(builder, first))


def _tile_store(builder, tile, sums):
    """y[t, r] = sums[i][k] for token i and row k of the tile (row r0 + k clamped to N - 1)."""
    last_row = builder.sub(tile.N, ir.Constant(_I64, 1))
    for k in range(len(sums[0])):
        r = _plus(builder, tile.r0, k)
        r = builder.select(builder.icmp_signed("<", r, tile.N), r, last_row)
        for i, ti in enumerate(tile.tokens):
            builder.store(sums[i][k], builder.gep(tile.y.data, [builder.add(builder.mul(ti, tile.N), r)]))


def _tile_intrinsic(with_sums: bool, codegen):
    """The intrinsic (x, [sums,] data, y, r0, t0, first) -> None of a tile codegen: x, sums and y 2-D C
    float32, data 2-D C uint8, r0 and t0 integers (taken as int64), first a boolean."""

    def floats_c(a):
        return isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 and a.layout == "C"

    def ok(x, sums, data, y, r0, t0, first):
        packed = isinstance(data, types.Array) and data.ndim == 2 and data.layout == "C" and data.dtype == types.uint8
        return (floats_c(x) and (sums is None or floats_c(sums)) and floats_c(y) and packed
                and isinstance(r0, types.Integer) and isinstance(t0, types.Integer) and isinstance(first, types.Boolean))

    if with_sums:

        @intrinsic
        def tile(typingctx, x, sums, data, y, r0, t0, first):
            if ok(x, sums, data, y, r0, t0, first):
                return types.void(x, sums, data, y, types.int64, types.int64, first), codegen
            return None

        return tile

    @intrinsic
    def tile_without_sums(typingctx, x, data, y, r0, t0, first):
        if ok(x, None, data, y, r0, t0, first):
            return types.void(x, data, y, types.int64, types.int64, first), codegen
        return None

    return tile_without_sums


def block_dot(qtype: str, rows: int, lanes: int = WIDTH, tokens: int = 1):
    """The intrinsic (x, sums, data, y, r0, t0, first) of one block type (module docstring), in vectors of `lanes`
    float32 (8 or 16: 4 or 2 vectors a block), for `tokens` tokens at once: it writes y[t, r] for the rows
    r0 .. r0 + rows - 1 and tokens t0 .. t0 + tokens - 1, each clamped to N - 1 and T - 1 (a repeat computes
    the same value again). x (T, K), sums (T, K // 32) and y (T, N) are C-contiguous float32.

    Each block's integers and scale are unpacked once per row and serve every token of the tile. The IR
    carries no fast-math flags and every multiply-add is `llvm.fma`, so a token's sum is the same
    instructions in the same order whatever `tokens` is: a token of a tile is bit for bit that token alone."""
    size, integers, m_at, zero = _BLOCKS[qtype]
    floats, n = _vector(_F32, lanes), 32 // lanes

    def codegen(context, builder, signature, args):
        tile = _tile_start(context, builder, signature, args, rows, tokens, True)
        w, x_rows, sum_rows, base, blocks = tile.w, tile.x_rows, tile.sum_rows, tile.w.packed, tile.blocks
        acc = [[cgutils.alloca_once_value(builder, _const(floats, 0.0)) for _ in range(rows)] for _ in x_rows]
        mins = [[cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(rows)] for _ in x_rows]

        with cgutils.for_range(builder, blocks) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(_I64, size))  # the block's byte offset in a row
            c = builder.mul(b, ir.Constant(_I64, 32))  # the block's first column
            xv = [[_floats(builder, x_row, _plus(builder, c, lanes * j), lanes) for j in range(n)] for x_row in x_rows]
            block_sum = [builder.load(builder.gep(sum_row, [b])) for sum_row in sum_rows]
            _prefetch_ahead(builder, tile, o, size)
            share = None  # per token: zero * sums[b] spread over the lanes (zero / lanes: 0.5, 1 or 2, exact)
            if zero:
                share = [_splat(builder, builder.fmul(bs, ir.Constant(_F32, -zero / lanes)), floats) for bs in block_sum]
            for k in range(rows):
                row_o = builder.add(w.starts[k], o)
                q = integers(builder, (base, row_o), lanes)  # unpacked once for all the tokens
                d = _splat(builder, _f16(builder, base, row_o), floats)
                m = _f16(builder, base, _plus(builder, row_o, m_at)) if m_at is not None else None
                for i in range(tokens):
                    s = share[i] if share is not None else builder.fmul(xv[i][0], q[0])
                    for j in range(0 if share is not None else 1, n):
                        s = _llvm_fma(builder, xv[i][j], q[j], s)
                    builder.store(_llvm_fma(builder, d, s, builder.load(acc[i][k])), acc[i][k])
                    if m is not None:
                        builder.store(_llvm_fma(builder, m, block_sum[i], builder.load(mins[i][k])), mins[i][k])
        out = [[_ordered_lane_sum(builder, builder.load(a)) for a in row] for row in acc]
        if m_at is not None:
            out = [[builder.fadd(v, builder.load(m)) for v, m in zip(o, ms)] for o, ms in zip(out, mins)]
        _tile_store(builder, tile, out)
        return context.get_dummy_value()

    return _tile_intrinsic(True, codegen)


def nibble_table_dot(qtype: str, rows: int, tokens: int = 1):
    """Q4_0 or Q4_1 on AVX-512 (`NIBBLE_TABLES`): the intrinsic of `block_dot`, with the same arguments and
    result, written around the table of the 16 weights a nibble can stand for. Per block and row:
        table    = d * (0 .. 15 - zero) [+ m]         16 lanes (Q4_0: zero 8; Q4_1: zero 0 and its m)
        w0, w1   = table[q & 15], table[q >> 4]       of bytes 0 .. 15: the block's 32 weights (`_lookup`)
        acc[t]  = fma(x[t, 32b + 16 : + 16], w1, fma(x[t, 32b : + 16], w0, acc[t]))   per token t
    Each table entry is the float32 the reference unpacking makes (d (q - zero) is exact; + m rounds once,
    as there), so w0 and w1 are the dequantized weights exactly. The table, its two lookups, the zero
    extension and the shift (5 instructions) serve every token of the tile, and each token then costs 2
    multiply-adds per block and row, where `block_dot` spends 3. Strict IR, as there: a token of a tile is
    bit for bit that token alone."""
    size, _, m_at, zero = _BLOCKS[qtype]
    floats = _vector(_F32, 16)
    steps = ir.Constant(floats, [float(i - zero) for i in range(16)])
    four = _const(_vector(_I32, 16), 4)

    def codegen(context, builder, signature, args):
        tile = _tile_start(context, builder, signature, args, rows, tokens, True)
        w, x_rows, base, blocks = tile.w, tile.x_rows, tile.w.packed, tile.blocks
        acc = [[cgutils.alloca_once_value(builder, _const(floats, 0.0)) for _ in range(rows)] for _ in x_rows]

        with cgutils.for_range(builder, blocks) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(_I64, size))  # the block's byte offset in a row
            c = builder.mul(b, ir.Constant(_I64, 32))  # the block's first column
            xv = [[_floats(builder, x_row, _plus(builder, c, 16 * j), 16) for j in range(2)] for x_row in x_rows]
            _prefetch_ahead(builder, tile, o, size)
            for k in range(rows):
                row_o = builder.add(w.starts[k], o)
                d = _splat(builder, _f16(builder, base, row_o), floats)
                if m_at is None:
                    table = builder.fmul(d, steps)
                else:
                    table = _llvm_fma(builder, d, steps, _splat(builder, _f16(builder, base, _plus(builder, row_o, m_at)), floats))
                qs = _ints(builder, base, _plus(builder, row_o, size - 16), lanes=16)  # bytes 0 .. 15
                weights = [_lookup(builder, table, qs), _lookup(builder, table, builder.lshr(qs, four))]
                for i in range(tokens):
                    a = _llvm_fma(builder, xv[i][0], weights[0], builder.load(acc[i][k]))
                    builder.store(_llvm_fma(builder, xv[i][1], weights[1], a), acc[i][k])
        _tile_store(builder, tile, [[_ordered_lane_sum(builder, builder.load(a)) for a in row] for row in acc])
        return context.get_dummy_value()

    return _tile_intrinsic(True, codegen)


def _row_starts(builder, first, rows, N, L):
    """The byte offsets in a packed (N, L) matrix of rows first .. first + rows - 1, each at most N - 1."""
    first = builder.sext(first, _I64) if first.type.width < 64 else first
    last_row = builder.sub(N, ir.Constant(_I64, 1))
    starts = []
    for k in range(rows):
        r = _plus(builder, first, k)
        starts.append(builder.mul(builder.select(builder.icmp_signed("<", r, N), r, last_row), L))
    return starts


def _prefetch_ahead(builder, tile, o, size):
    """The first tile's hints (prefetch.py), emitted under `if tile.first` (later tiles of a call find the
    bytes in cache): the R rows of the work item side by side are at flat byte starts[0] + R o when each is
    at byte o, so ask for their next R blocks of `size` bytes from there, PREFETCH_AHEAD further on."""
    w, rows = tile.w, len(tile.w.starts)
    with builder.if_then(tile.first):
        start = builder.add(w.starts[0], builder.mul(o, ir.Constant(_I64, rows)))
        prefetch_lines(builder, w.packed, start, rows * size, w.last_byte)


# Tokens per tile of the block types' kernels: 16 accumulators (4 rows x 4 tokens) and the tokens' x fit
# AVX-512's 32 vector registers; AVX2's 16 hold one token's 4 rows and its x only.
BLOCK_TOKENS = 4 if WIDTH == 16 else 1

# Q4_0 and Q4_1 through their tables of weights (`nibble_table_dot`) where 16 lanes run on AVX-512.
NIBBLE_TABLES = AVX512 and WIDTH == 16
_four_bit = nibble_table_dot if NIBBLE_TABLES else block_dot

_Q8_0, _Q8_0_T = block_dot("Q8_0", ROWS), block_dot("Q8_0", ROWS, WIDTH, BLOCK_TOKENS)
_Q4_0, _Q4_0_T = _four_bit("Q4_0", ROWS), _four_bit("Q4_0", ROWS, tokens=BLOCK_TOKENS)
_Q4_1, _Q4_1_T = _four_bit("Q4_1", ROWS), _four_bit("Q4_1", ROWS, tokens=BLOCK_TOKENS)
_Q5_0, _Q5_0_T = block_dot("Q5_0", ROWS), block_dot("Q5_0", ROWS, WIDTH, BLOCK_TOKENS)
_Q5_1, _Q5_1_T = block_dot("Q5_1", ROWS), block_dot("Q5_1", ROWS, WIDTH, BLOCK_TOKENS)


@njit(inline="always")
def dot(kind, first, many, x, sums, data, y, r0, t):
    """y[t, r0 .. r0 + ROWS - 1] = rows r0 .. of data (block type TYPES[kind]) times token t of x (module
    docstring); with `many`, for BLOCK_TOKENS tokens t, t + 1, ... at once (those past the end repeat the
    last token), each bit for bit what it gives alone. The intrinsics are module globals, not values
    captured by each kernel: Numba's cache keys a closure on its captured values, and an intrinsic pickles
    differently in every process."""
    if kind == 0:
        _Q8_0_T(x, sums, data, y, r0, t, first) if many else _Q8_0(x, sums, data, y, r0, t, first)
    elif kind == 1:
        _Q4_0_T(x, sums, data, y, r0, t, first) if many else _Q4_0(x, sums, data, y, r0, t, first)
    elif kind == 2:
        _Q4_1_T(x, sums, data, y, r0, t, first) if many else _Q4_1(x, sums, data, y, r0, t, first)
    elif kind == 3:
        _Q5_0_T(x, sums, data, y, r0, t, first) if many else _Q5_0(x, sums, data, y, r0, t, first)
    else:
        _Q5_1_T(x, sums, data, y, r0, t, first) if many else _Q5_1(x, sums, data, y, r0, t, first)


# --------------------------------------------------------------------- Q4_K and Q5_K: super-blocks of 256
#
# A super-block (formats/kquants.py draws its bytes) holds d, dmin, 8 six-bit scales sc[j] and minimums m[j]
# packed in 12 bytes, and 8 sub-blocks of 32 weights w = d sc[j] q - dmin m[j]. Per super-block and row:
#     dsc, dm = d * sc[0..7], dmin * m[0..7]           (8 lanes each, exact: 11 x 6 significant bits)
#     acc    -= dm * sums[8b .. 8b + 7]                 (lane j: sub-block j's minimum times its sum of x)
#     per pair of sub-blocks (2g, 2g + 1), whose q are the low and high nibbles of the same 32 bytes:
#         s_low  = x . q over sub-block 2g, in 8 lanes of 4;  s_high the same for 2g + 1
#         acc   += dsc[2g] s_low + dsc[2g + 1] s_high
# Q5_K adds bit 2g (2g + 1) of qh[i] as the 16s bit of the low (high) nibble of byte i. Q4_K widens its
# bytes 8 at a time, in x's order (`_q4_k_pair`); Q5_K reads qs and qh 32 bytes at a time and takes x in
# byte-lane order (`_q5_k_pair`, as the Q6_K section below explains).


def _six_bit_scales(builder, row, o):
    """(sc[0..7], m[0..7]) of the Q4_K/Q5_K super-block at byte o, each as 8 float32 lanes.

    The 12 scale bytes are three little-endian words a, b, c: bytes 0-3 of a (b) hold sc[0..3] (m[0..3])
    in their low six bits and bits 4-5 of sc[4..7] (m[4..7]) on top; c holds the low nibbles of sc[4..7]
    and, shifted by 4, of m[4..7]."""
    a, b, c = (_load(builder, row, _plus(builder, o, at), _I32) for at in (4, 8, 12))

    def mask(v, bits):
        return builder.and_(v, ir.Constant(_I32, bits))

    def shr(v, n):
        return builder.lshr(v, ir.Constant(_I32, n))

    def lanes(low4, high4):  # two words of 4 bytes -> 8 float32 lanes, byte j -> lane j
        pair = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), ir.Undefined), low4, ir.Constant(_I32, 0))
        pair = builder.insert_element(pair, high4, ir.Constant(_I32, 1))
        return builder.sitofp(builder.zext(builder.bitcast(pair, _BYTES8), _INTS8), _FLOATS8)

    sc = lanes(mask(a, 0x3F3F3F3F), builder.or_(mask(c, 0x0F0F0F0F), mask(shr(a, 2), 0x30303030)))
    m = lanes(mask(b, 0x3F3F3F3F), builder.or_(mask(shr(c, 4), 0x0F0F0F0F), mask(shr(b, 2), 0x30303030)))
    return sc, m


def _six_bit_scales_by_shuffle(builder, row, o):
    """`_six_bit_scales` in vector instructions alone (AVX2's 256-bit `vpshufb`; used where the CPU has
    AVX-512): the 16 bytes of the super-block at byte o (d, dmin, then a, b, c as there) in both 128-bit
    halves of a register, and one byte shuffle per result puts into int32 lane j the byte of sc[j] (m[j]),
    and for j >= 4 the byte of a (b) with bits 4-5 above it, 8 bits up:
        lanes 0-3: a_j                  -> & 0x3F
        lanes 4-7: c_j | a_j << 8       -> & 0x0F (m: >> 4 first), | (>> 10) & 0x30
    (v & M) | (v >> 10 & ~M), M = 0x3F or 0x0F by lane: lanes 0-3 have nothing at bit 10 and up. The scalar
    masks and shifts, and the moves of their words into a vector, took about twice the instructions, a
    dozen of them on the two vector ports the loop is bound by (the Q4_K loop 1.06x, docs/kernels.md)."""
    bytes16, bytes32 = _vector(_I8, 16), _vector(_I8, 32)
    raw = _load(builder, row, o, bytes16)
    both = builder.shuffle_vector(raw, raw, ir.Constant(_vector(_I32, 32), list(range(16)) * 2))
    shuffle = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bytes32, [bytes32, bytes32]),
                                             "llvm.x86.avx2.pshuf.b")  # a byte index with bit 7 set gives 0

    def lanes(low4, high4):  # byte indices: lanes 0-3 take byte low4 + j, lanes 4-7 bytes 12 + j and high4 + j
        picks = [[low4 + j, 0x80, 0x80, 0x80] for j in range(4)] + [[12 + j, high4 + j, 0x80, 0x80] for j in range(4)]
        return builder.bitcast(builder.call(shuffle, [both, ir.Constant(bytes32, sum(picks, []))]), _INTS8)

    mask = ir.Constant(_INTS8, [0x3F] * 4 + [0x0F] * 4)
    above = ir.Constant(_INTS8, [~0x3F] * 4 + [~0x0F] * 4)

    def six_bits(v, shift):
        return builder.or_(builder.and_(builder.lshr(v, shift), mask), builder.and_(builder.lshr(v, _const(_INTS8, 10)), above))

    sc = six_bits(lanes(4, 4), _const(_INTS8, 0))
    m = six_bits(lanes(8, 8), ir.Constant(_INTS8, [0] * 4 + [4] * 4))
    return builder.sitofp(sc, _FLOATS8), builder.sitofp(m, _FLOATS8)


def _lane(builder, v, j):
    """Lane j of v, in every lane."""
    return builder.shuffle_vector(v, ir.Constant(_FLOATS8, ir.Undefined), _const(_INTS8, j))


def _byte(builder, lanes, p):
    """Byte p of each int32 lane, zero-extended: lanes >> 8p & 255."""
    if p == 3:
        return builder.lshr(lanes, _const(_INTS8, 24))
    return builder.and_(builder.lshr(lanes, _const(_INTS8, 8 * p)) if p else lanes, _const(_INTS8, 255))


def _shift(builder, v, n):
    """v << n, or v >> -n (logical), lane by lane."""
    return builder.shl(v, _const(_INTS8, n)) if n > 0 else builder.lshr(v, _const(_INTS8, -n)) if n < 0 else v


def _super_block_scales(builder, tile, b, o, size, mins, by_shuffle=False):
    """Q4_K/Q5_K super-block b (at byte o of each row) of a tile: per row k, the 8 lanes d sc[j] (returned);
    -dmin m[j] times the sum of x over sub-block j added to lane j of mins[i][k] (8 lanes) for each token i.
    On the first tile of a call, the hints for the bytes ahead first. by_shuffle: the scales by
    `_six_bit_scales_by_shuffle` (AVX-512 CPUs), else `_six_bit_scales`."""
    w, base = tile.w, tile.w.packed
    sub_sums = [_floats(builder, sum_row, builder.mul(b, ir.Constant(_I64, 8))) for sum_row in tile.sum_rows]
    _prefetch_ahead(builder, tile, o, size)
    dsc = []
    for k, start in enumerate(w.starts):
        row_o = builder.add(start, o)
        d, dmin = _f16(builder, base, row_o), _f16(builder, base, _plus(builder, row_o, 2))
        if by_shuffle:  # (the barrier keeps d and dmin loads of their own: LLVM took them out of the vector)
            _keep_in_memory(builder, base)
            sc, m = _six_bit_scales_by_shuffle(builder, base, row_o)
        else:
            sc, m = _six_bit_scales(builder, base, row_o)
        dsc.append(builder.fmul(_splat(builder, d), sc))
        minus_dm = builder.fmul(_splat(builder, builder.fneg(dmin)), m)
        for i, token_mins in enumerate(mins):
            builder.store(_llvm_fma(builder, minus_dm, sub_sums[i], builder.load(token_mins[k])), token_mins[k])
    return dsc


def k_quant_tile_dot(five: bool, rows: int, tokens: int):
    """Q4_K (five=False) or Q5_K (five=True) in 8-lane vectors for `tokens` tokens at once: the intrinsic
    (x, sums, data, y, r0, t0, first) with the arguments of `block_dot` (it writes y); for Q5_K, x in byte-lane
    order (`_q5_k_pair`). Each super-block's scales and each pair of sub-blocks' integers are unpacked once
    per row and serve every token; strict IR, so each token is summed alike in every tile."""
    size = 176 if five else 144

    def codegen(context, builder, signature, args):
        tile = _tile_start(context, builder, signature, args, rows, tokens, True)
        w, x_rows, base = tile.w, tile.x_rows, tile.w.packed
        acc = [[cgutils.alloca_once_value(builder, _const(_FLOATS8, 0.0)) for _ in range(rows)] for _ in x_rows]
        fifteen, four = _const(_INTS8, 15), _const(_INTS8, 4)

        with cgutils.for_range(builder, builder.udiv(tile.K, ir.Constant(_I64, 256))) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(_I64, size))
            c0 = builder.mul(b, ir.Constant(_I64, 256))  # the super-block's first column
            dsc = _super_block_scales(builder, tile, b, o, size, acc)  # minimums into lanes j of acc
            for g in range(4):
                col = _plus(builder, c0, 64 * g)
                for k in range(rows):
                    row_o = builder.add(w.starts[k], o)
                    if five:
                        low, high = _q5_k_pair(builder, base, row_o, g)
                    else:
                        low, high = _q4_k_pair(builder, base, row_o, g, fifteen, four)
                    for i in range(tokens):
                        x_low = [_floats(builder, x_rows[i], _plus(builder, col, 8 * h)) for h in range(4)]  # 2g
                        x_high = [_floats(builder, x_rows[i], _plus(builder, col, 32 + 8 * h)) for h in range(4)]
                        s_low, s_high = builder.fmul(x_low[0], low[0]), builder.fmul(x_high[0], high[0])
                        for h in range(1, 4):
                            s_low = _llvm_fma(builder, x_low[h], low[h], s_low)
                            s_high = _llvm_fma(builder, x_high[h], high[h], s_high)
                        a = _llvm_fma(builder, _lane(builder, dsc[k], 2 * g), s_low, builder.load(acc[i][k]))
                        builder.store(_llvm_fma(builder, _lane(builder, dsc[k], 2 * g + 1), s_high, a), acc[i][k])
        _tile_store(builder, tile, [[_ordered_lane_sum(builder, builder.load(a)) for a in row] for row in acc])
        return context.get_dummy_value()

    return _tile_intrinsic(True, codegen)


def _q4_k_pair(builder, base, row_o, g, fifteen, four):
    """Q4_K: q of sub-blocks 2g (low nibbles) and 2g + 1 (high nibbles) of the 32 bytes at 16 + 32g, each
    as four float32 vectors of 8 consecutive weights: bytes 8i .. 8i + 7 zero-extended into int32 lanes."""
    low, high = [], []
    for i in range(4):
        byte = _ints(builder, base, _plus(builder, row_o, 16 + 32 * g + 8 * i))
        low.append(builder.sitofp(builder.and_(byte, fifteen), _FLOATS8))
        high.append(builder.sitofp(builder.lshr(byte, four), _FLOATS8))
    return low, high


def _q5_k_pair(builder, base, row_o, g):
    """Q5_K: q of sub-blocks 2g and 2g + 1, each as four float32 vectors, from one 32-byte load of qs (at
    48 + 32g: low and high nibbles) and one of qh (at 16: bits 2g and 2g + 1 are the fifth bits), read as 8
    int32 lanes of 4 bytes. Per sub-block, masks and shifts put q into every byte (nibble | fifth bit << 4),
    and vector p is byte p of the 8 lanes: weights 4l + p, l = 0..7. x must come in the same order, which
    kquants.py makes once per call ("byte-lane order": in every run of 32, x[4l + p] moved to 8p + l)."""
    qs = _load(builder, base, _plus(builder, row_o, 48 + 32 * g), _INTS8)
    qh = _load(builder, base, _plus(builder, row_o, 16), _INTS8)
    nibbles, sixteens = _const(_INTS8, 0x0F0F0F0F), _const(_INTS8, 0x10101010)
    low = builder.or_(builder.and_(qs, nibbles), builder.and_(_shift(builder, qh, 4 - 2 * g), sixteens))
    high = builder.or_(builder.and_(builder.lshr(qs, _const(_INTS8, 4)), nibbles),
                       builder.and_(_shift(builder, qh, 3 - 2 * g), sixteens))
    return ([builder.sitofp(_byte(builder, low, p), _FLOATS8) for p in range(4)],
            [builder.sitofp(_byte(builder, high, p), _FLOATS8) for p in range(4)])


def q4_k_tile_dot(rows: int, tokens: int):
    """Q4_K in 16-lane vectors for `tokens` tokens at once: the intrinsic (x, sums, data, y, r0, t0) with the
    arguments of `block_dot` (it writes y), on AVX-512 (`Q4_K_TOKENS`). Per super-block and row the scales
    are unpacked once; per pair of sub-blocks and row, two 16-byte loads zero-extended into int32 lanes give
    sub-block 2g (low nibbles) and 2g + 1 (high nibbles) as weights d sc[j] q, looked up in the table
    d sc[j] (0 .. 15) as `nibble_table_dot` does (exact: 11 x 6 x 4 significant bits), and serve every token:
    two multiply-adds per token and sub-block into the token's accumulator of the low or of the high
    sub-blocks (two, so that a row's multiply-adds do not all wait for each other); the minimums
    -dmin m[j] sums[j] go into an 8-lane one, added at the end. Strict IR (`llvm.fma`, no
    fast-math flags), so each token is summed alike in every tile, as in `block_dot`. Measured on the Intel
    Xeon (Emerald Rapids), 2 threads, 8192 x 3072, against the 8-lane loop taking turns: 15.9-16.8 against
    13.9-14.6 GB/s from memory for one token (docs/kernels.md)."""
    size, sixteen_lanes, floats = 144, _vector(_I32, 16), _vector(_F32, 16)

    def codegen(context, builder, signature, args):
        tile = _tile_start(context, builder, signature, args, rows, tokens, True)
        w, x_rows, base, K = tile.w, tile.x_rows, tile.w.packed, tile.K
        # per token and row: the accumulators of the low and of the high sub-blocks, and the minimums'
        acc = [[cgutils.alloca_once_value(builder, _const(floats, 0.0)) for _ in range(rows)] for _ in x_rows]
        acc_high = [[cgutils.alloca_once_value(builder, _const(floats, 0.0)) for _ in range(rows)] for _ in x_rows]
        mins = [[cgutils.alloca_once_value(builder, _const(_FLOATS8, 0.0)) for _ in range(rows)] for _ in x_rows]
        four = _const(sixteen_lanes, 4)
        slots = [cgutils.alloca_once(builder, _FLOATS8) for _ in range(rows)]  # per row: d sc[0 .. 7]

        def scale(k, j):  # lane j of row k's d sc, in all 16 lanes
            return _lane_from_memory(builder, slots[k], j, floats)

        with cgutils.for_range(builder, builder.udiv(K, ir.Constant(_I64, 256))) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(_I64, size))
            c0 = builder.mul(b, ir.Constant(_I64, 256))  # the super-block's first column
            dsc = _super_block_scales(builder, tile, b, o, size, mins, by_shuffle=True)
            for k in range(rows):
                builder.store(dsc[k], slots[k])
                _keep_in_memory(builder, slots[k])
            for g in range(4):
                col = _plus(builder, c0, 64 * g)
                for k in range(rows):
                    row_o = builder.add(w.starts[k], o)
                    qs = [_ints(builder, base, _plus(builder, row_o, 16 + 32 * g + 16 * h), lanes=16) for h in range(2)]
                    tables = [builder.fmul(scale(k, j), _NIBBLES) for j in (2 * g, 2 * g + 1)]  # d sc[j] (0 .. 15)
                    low = [_lookup(builder, tables[0], q) for q in qs]  # sub-block 2g: weights, minimum aside
                    high = [_lookup(builder, tables[1], builder.lshr(q, four)) for q in qs]  # sub-block 2g + 1
                    for i in range(tokens):
                        for weights, at, a in ((low, 0, acc[i][k]), (high, 32, acc_high[i][k])):
                            xv = [_floats(builder, x_rows[i], _plus(builder, col, at + 16 * h), 16) for h in range(2)]
                            s = _llvm_fma(builder, xv[0], weights[0], builder.load(a))
                            builder.store(_llvm_fma(builder, xv[1], weights[1], s), a)
        _tile_store(builder, tile, [[builder.fadd(_ordered_lane_sum(builder, builder.fadd(builder.load(a), builder.load(h))),
                                                  _ordered_lane_sum(builder, builder.load(m)))
                                     for a, h, m in zip(a_row, h_row, m_row)]
                                    for a_row, h_row, m_row in zip(acc, acc_high, mins)])
        return context.get_dummy_value()

    return _tile_intrinsic(True, codegen)


# Q4_K's tiles (AVX-512 only: the table lookups need it, and 2 rows x 4 tokens x 2 of 16-lane accumulators
# need its 32 registers). 0 elsewhere: Q4_K then runs the 8-lane loop above, one token at a time.
Q4_K_TOKENS = 4 if AVX512 and WIDTH == 16 else 0
_Q4_K_1, _Q4_K_T = q4_k_tile_dot(2, 1), q4_k_tile_dot(2, max(Q4_K_TOKENS, 1))


@njit(inline="always")
def q4_k_tile(first, many, x, sums, data, y, r0, t):
    """y[t, r0], y[t, r0 + 1] = rows r0, r0 + 1 of Q4_K data times token t of x (many: for Q4_K_TOKENS tokens
    t, t + 1, ..., the last repeated past the end), by `q4_k_tile_dot`."""
    _Q4_K_T(x, sums, data, y, r0, t, first) if many else _Q4_K_1(x, sums, data, y, r0, t, first)


# Tokens per tile of the 8-lane K-quant loops (Q5_K everywhere, Q4_K on AVX2): 4 where AVX-512's 32 registers
# hold 2 rows x 4 tokens of accumulators with the unpacked integers, else one token a pass.
K_TOKENS = 4 if AVX512 and WIDTH == 16 else 1
_Q4_K8_1, _Q4_K8_T = k_quant_tile_dot(False, 2, 1), k_quant_tile_dot(False, 2, K_TOKENS)
_Q5_K_1, _Q5_K_T = k_quant_tile_dot(True, 2, 1), k_quant_tile_dot(True, 2, K_TOKENS)


@njit(inline="always")
def k_quant_tile(five, first, many, x, sums, data, y, r0, t):
    """y[t, r0], y[t, r0 + 1] (many: for K_TOKENS tokens t, t + 1, ..., the last repeated past the end) of
    Q5_K data (five) or Q4_K data in 8 lanes, by `k_quant_tile_dot`; for Q5_K, x in byte-lane order."""
    if five:
        _Q5_K_T(x, sums, data, y, r0, t, first) if many else _Q5_K_1(x, sums, data, y, r0, t, first)
    else:
        _Q4_K8_T(x, sums, data, y, r0, t, first) if many else _Q4_K8_1(x, sums, data, y, r0, t, first)


# ---------------------------------------------------------------------------------- Q6_K: super-blocks of 256
#
# 128 bytes ql (low nibbles), 64 bytes qh (high bit pairs), 16 int8 scales sc, float16 d; 16 sub-blocks of 16
# weights w = d sc[j] (q - 32), j = the weight's index // 16. Half h of a super-block (128 weights) is four
# quarters of 32: weight 128h + 32u + i (u = 0..3, i = 0..31) takes its low nibble from byte i of ql's 32
# bytes at 64h (u = 0, 2: low, high nibble) or 64h + 32 (u = 1, 3), and bits 2u, 2u + 1 of byte i of qh's
# 32 bytes at 32h on top.
#
# Each of those three runs of 32 bytes is read with one load, as 8 int32 lanes: lane l holds bytes
# 4l .. 4l + 3. Per quarter, masks and one bytewise subtraction make the 32 numbers q - 32 as int8 bytes
# in the same lanes, and byte p of every lane, sign-extended (a shift left, an arithmetic shift right),
# is the vector of the 8 weights i = 4l + p, l = 0..7. That is not x's order, so the kernel takes x in
# byte-lane order, as Q5_K's does (kquants.py makes it once per call: in every run of 32, x[4l + p] moved
# to 8p + l). Per row, half h, quarter u:
#     s    = sum over p of x_bl[32 (4h + u) + 8p : + 8] * (q - 32 of bytes p)   (8 lanes of 4, exact products)
#     acc += (d sc[8h + 2u] in lanes 0-3, d sc[8h + 2u + 1] in lanes 4-7) * s
# Lanes 0-3 hold i < 16 and lanes 4-7 i >= 16: the quarter's two sub-blocks of 16.


def _sub_block_pair(builder, v, j):
    """Lane j of v in lanes 0-3, lane j + 1 in lanes 4-7."""
    lanes = ir.Constant(_INTS8, [j] * 4 + [j + 1] * 4)
    return builder.shuffle_vector(v, ir.Constant(_FLOATS8, ir.Undefined), lanes)


def _q6_k_quarter_bytes(builder, nibbles, pairs):
    """q - 32 as int8 bytes in 8 int32 lanes: the low nibble of each byte of `nibbles` with bits 4-5 of the
    same byte of `pairs` on top, minus 32 in every byte (bytewise: no borrow crosses into the next byte)."""
    six = builder.or_(builder.and_(nibbles, _const(_INTS8, 0x0F0F0F0F)),
                      builder.and_(pairs, _const(_INTS8, 0x30303030)))
    bytes32 = ir.VectorType(_I8, 32)
    return builder.bitcast(builder.sub(builder.bitcast(six, bytes32), ir.Constant(bytes32, [32] * 32)), _INTS8)


def _signed_byte(builder, lanes, p):
    """Byte p of each int32 lane, sign-extended: lanes << (24 - 8p) >> 24 (arithmetic)."""
    top = builder.shl(lanes, _const(_INTS8, 24 - 8 * p)) if p < 3 else lanes
    return builder.ashr(top, _const(_INTS8, 24))


def _q6_k_super_block(builder, tile, b):
    """(first column, byte offset in the matrix) of Q6_K super-block b (210 bytes) of a one-row tile; the
    first tile's hints for the bytes ahead are emitted first."""
    o = builder.mul(b, ir.Constant(_I64, 210))
    _prefetch_ahead(builder, tile, o, 210)
    return builder.mul(b, ir.Constant(_I64, 256)), builder.add(tile.w.starts[0], o)


def q6_k_tile_dot(tokens: int):
    """Q6_K for `tokens` tokens at once: the intrinsic (x_bl, data, y, r, t0), x_bl (T, K) in byte-lane order,
    writing y[t, r] for tokens t0 .. t0 + tokens - 1 (clamped to T - 1). Per super-block and half, the 8
    scales once; per quarter of 32 weights, the 32 numbers q - 32 unpacked once for all the tokens (section
    above), then per token x . (q - 32) in 8 lanes of 4 and d sc of the quarter's two sub-blocks into its
    accumulator. Strict IR (`llvm.fma`, no fast-math flags): each token is summed alike in every tile. One
    row per call: two rows sharing each x load measured 9.6 against 10.3 G weights/s from memory (AMD EPYC
    Zen 3, 2 threads), as with the loop before this one (8.9 against 11.1)."""

    def codegen(context, builder, signature, args):
        tile = _tile_start(context, builder, signature, args, 1, tokens, False)
        x_rows, base, K = tile.x_rows, tile.w.packed, tile.K
        acc = [cgutils.alloca_once_value(builder, _const(_FLOATS8, 0.0)) for _ in x_rows]

        with cgutils.for_range(builder, builder.udiv(K, ir.Constant(_I64, 256))) as loop:
            c0, row_o = _q6_k_super_block(builder, tile, loop.index)
            d = _splat(builder, _f16(builder, base, _plus(builder, row_o, 208)))
            for h in range(2):
                sc = _ints(builder, base, _plus(builder, row_o, 192 + 8 * h), signed=True)  # sc[8h .. 8h + 7]
                dsc = builder.fmul(d, builder.sitofp(sc, _FLOATS8))
                first, second, high = (_load(builder, base, _plus(builder, row_o, at), _INTS8)
                                       for at in (64 * h, 64 * h + 32, 128 + 32 * h))
                quarters = [(first, _shift(builder, high, 4)), (second, _shift(builder, high, 2)),
                            (_shift(builder, first, -4), high),
                            (_shift(builder, second, -4), _shift(builder, high, -2))]
                for u, (nibbles, pairs) in enumerate(quarters):
                    q = _q6_k_quarter_bytes(builder, nibbles, pairs)
                    qp = [builder.sitofp(_signed_byte(builder, q, p), _FLOATS8) for p in range(4)]
                    scale = _sub_block_pair(builder, dsc, 2 * u)  # sub-blocks 8h + 2u, 8h + 2u + 1
                    for i in range(tokens):
                        s = None
                        for p in range(4):
                            xv = _floats(builder, x_rows[i], _plus(builder, c0, 128 * h + 32 * u + 8 * p))
                            s = builder.fmul(xv, qp[p]) if s is None else _llvm_fma(builder, xv, qp[p], s)
                        builder.store(_llvm_fma(builder, scale, s, builder.load(acc[i])), acc[i])
        _tile_store(builder, tile, [[_ordered_lane_sum(builder, builder.load(a))] for a in acc])
        return context.get_dummy_value()

    return _tile_intrinsic(False, codegen)


# On AVX-512, Q6_K runs in 16 lanes and in x's own order instead (`q6_k_wide_tile_dot`). Per half h of a
# super-block (128 weights), in 512-bit byte arithmetic (64 bytes at a time, as 32 words for the shifts):
#     A = (ql[64h .. +63] & 15)      | (qh[32h .. +31] << 4 | << 2) & 0x30     quarters 0, 1: weights 0 .. 63
#     B = (ql[64h .. +63] >> 4 & 15) | (qh[32h .. +31] >> 0 | >> 2) & 0x30     quarters 2, 3: weights 64 .. 127
# (qh's 32 bytes sit in both halves of one register, shifted by the first amount in the low half and by
# the second in the high one), minus 32 in every byte: the half's 128 numbers q - 32, in order. Each
# sub-block j of 16 is then 16 of those bytes, sign-extended:
#     w            = float(q - 32 of sub-block j) * (d sc[j])     (16 lanes: the dequantized weights, exactly)
#     acc[t][j % 4] += x[t, 16 j : 16 j + 16] * w                 per token t of the tile
# Four accumulators a token keep four multiply-adds in flight (one would wait for the last at every
# sub-block); they are added as (a0 + a1) + (a2 + a3) at the end. d sc[j] comes as a broadcast from memory
# (`_keep_in_memory`), like Q4_K's. Per 32 weights about 12 vector instructions, against about 22 of the
# 8-lane loop above in 256-bit registers: 1.2-1.35x (docs/kernels.md, "Q6_K in 16 lanes").
# With AVX-512 VBMI (`VBMI`) the 16 bytes come out by one byte permute as (q - 32) 2^24 (`_top_bytes`) and
# d 2^-24 scales them back: the same weights, bit for bit, one shuffle-port instruction a sub-block fewer
# (1.18x on the Intel Xeon, docs/kernels.md).
Q6_K_WIDE = AVX512 and WIDTH == 16


def q6_k_wide_tile_dot(tokens: int):
    """Q6_K in 16 lanes for `tokens` tokens at once (AVX-512; the section above): the intrinsic
    (x, data, y, r, t0, first), x (T, K) in its own order, writing y[t, r] for tokens t0 .. t0 + tokens - 1
    (clamped to T - 1). Each half super-block's numbers q - 32 are unpacked once for all the tokens. Strict
    IR (`llvm.fma`, no fast-math flags): each token is summed alike in every tile."""
    floats, ints = _vector(_F32, 16), _vector(_I32, 16)
    bytes32, bytes64, words = _vector(_I8, 32), _vector(_I8, 64), _vector(ir.IntType(16), 32)

    def halves(low, high):  # 32 words: `low` in the low 256 bits, `high` in the high ones
        return ir.Constant(words, [low] * 16 + [high] * 16)

    def codegen(context, builder, signature, args):
        tile = _tile_start(context, builder, signature, args, 1, tokens, False)
        x_rows, base, K = tile.x_rows, tile.w.packed, tile.K
        acc = [[cgutils.alloca_once_value(builder, _const(floats, 0.0)) for _ in range(4)] for _ in x_rows]
        scales = cgutils.alloca_once(builder, floats)  # d sc[0 .. 15] of the super-block
        nibbles, pairs = halves(0x0F0F, 0x0F0F), halves(0x3030, 0x3030)

        with cgutils.for_range(builder, builder.udiv(K, ir.Constant(_I64, 256))) as loop:
            c0, row_o = _q6_k_super_block(builder, tile, loop.index)
            d = _f16(builder, base, _plus(builder, row_o, 208))
            if VBMI:  # the numbers come as (q - 32) 2^24 (`_top_bytes`): d 2^-24 undoes it, exactly
                d = builder.fmul(d, ir.Constant(_F32, 2.0 ** -24))
            sc = _ints(builder, base, _plus(builder, row_o, 192), signed=True, lanes=16)  # sc[0 .. 15]
            builder.store(builder.fmul(_splat(builder, d, floats), builder.sitofp(sc, floats)), scales)
            _keep_in_memory(builder, scales)
            for h in range(2):
                ql = builder.bitcast(_load(builder, base, _plus(builder, row_o, 64 * h), bytes64), words)
                qh32 = _load(builder, base, _plus(builder, row_o, 128 + 32 * h), bytes32)
                qh = builder.bitcast(builder.shuffle_vector(qh32, qh32, ir.Constant(_vector(_I32, 64), list(range(32)) * 2)),
                                     words)
                six = [builder.or_(builder.and_(ql, nibbles), builder.and_(builder.shl(qh, halves(4, 2)), pairs)),
                       builder.or_(builder.and_(builder.lshr(ql, _const(words, 4)), nibbles),
                                   builder.and_(builder.lshr(qh, halves(0, 2)), pairs))]
                q = [builder.sub(builder.bitcast(v, bytes64), _const(bytes64, 32)) for v in six]  # weights 0-63, 64-127
                for j in range(8):  # sub-block 8h + j: weights 128h + 16j .. + 15
                    if VBMI:
                        numbers = _top_bytes(builder, q[j // 4], 16 * (j % 4))  # (q - 32) 2^24
                    else:
                        part = ir.Constant(_vector(_I32, 16), list(range(16 * (j % 4), 16 * (j % 4) + 16)))
                        numbers = builder.sext(builder.shuffle_vector(q[j // 4], q[j // 4], part), ints)
                    dsc = _lane_from_memory(builder, scales, 8 * h + j, floats)  # d sc[8h + j] in 16 lanes
                    weights = builder.fmul(builder.sitofp(numbers, floats), dsc)
                    col = _plus(builder, c0, 128 * h + 16 * j)
                    for i in range(tokens):
                        a = acc[i][j % 4]
                        builder.store(_llvm_fma(builder, _floats(builder, x_rows[i], col, 16), weights, builder.load(a)), a)
        sums = []
        for a in acc:  # (a0 + a1) + (a2 + a3), then the lanes
            v = [builder.load(p) for p in a]
            sums.append([_ordered_lane_sum(builder, builder.fadd(builder.fadd(v[0], v[1]), builder.fadd(v[2], v[3])))])
        _tile_store(builder, tile, sums)
        return context.get_dummy_value()

    return _tile_intrinsic(False, codegen)


# Q6_K's tiles: 4 tokens on AVX-512 (32 registers), one token a pass elsewhere.
Q6_K_TOKENS = K_TOKENS
if Q6_K_WIDE:
    _Q6_K_1, _Q6_K_T = q6_k_wide_tile_dot(1), q6_k_wide_tile_dot(max(Q6_K_TOKENS, 1))
else:
    _Q6_K_1, _Q6_K_T = q6_k_tile_dot(1), q6_k_tile_dot(max(Q6_K_TOKENS, 1))


@njit(inline="always")
def q6_k_tile(first, many, x_bl, data, y, r, t):
    """y[t, r] (many: y[t .. t + Q6_K_TOKENS - 1, r], the last token repeated past the end) by
    `q6_k_tile_dot`."""
    _Q6_K_T(x_bl, data, y, r, t, first) if many else _Q6_K_1(x_bl, data, y, r, t, first)


# ------------------------------------------------------------------ bf16 pairs: several tokens per widened row
#
# A bf16 row viewed as uint32 is a row of pairs (fast.py, `_reader`): the low half of pair c is weight 2c,
# the high half weight 2c + 1. A shift left by 16 makes the low one a float32, an AND that clears the low
# 16 bits the high one. x comes split into its even and odd columns (xe, xo), so each half meets a
# contiguous run of x. Per step of n = WIDTH pairs, for rows r0..r3 and tokens t0 .. t0 + m - 1:
#     lo, hi       = the 2n weights of row r as two float32 vectors       (one load, a shift, an AND)
#     acc[t][r]    = fma(xo[t, c:c+n], hi, fma(xe[t, c:c+n], lo, acc[t][r]))       (n lanes)
# and y[t, r] = (the lanes of acc[t][r] added as a fixed tree) + (the K/2 mod n pairs left, in scalars).
#
# Each widened vector serves every token of the tile: m tokens cost m x 2 multiply-adds a step, not m times
# the whole loop. That is what batched decode (one row per sequence) and short prompts pay for each token
# beyond the first. The IR carries no fast-math flags and every multiply-add is `llvm.fma`, so LLVM may not
# regroup anything: row r of token t is summed by the same instructions in the same order whatever m is
# and wherever t falls in a tile, and a batched row is bit for bit the row alone by construction.
# Tiles are up to BF16_TOKENS tokens x 4 rows: 16 accumulators fit AVX-512's 32 vector registers with the
# widened rows and x beside them; AVX2 has 16 registers, so 2 tokens (8 accumulators) there.

BF16_TOKENS = 4 if WIDTH == 16 else 2
_BF16_ROWS = 4


def bf16_pairs_dot(tokens: int, lanes: int = WIDTH):
    """The intrinsic (xe, xo, w, t0, r0, r1, r2, r3) -> UniTuple(float32, 4 tokens): y[t0 + i, r_k] at
    position 4 i + k, for xe, xo (T, K/2) float32 C-contiguous (x's even and odd columns), w (N, K/2) uint32
    bf16 pairs, rows of any stride but contiguous within (as `fast._reader` makes them), tokens
    t0 .. t0 + tokens - 1 (< T) and rows r0..r3 (< N)."""
    floats, ints = _vector(_F32, lanes), _vector(_I32, lanes)

    def codegen(context, builder, signature, args):
        xe, xo, w = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:3], args[:3]))
        _, K2 = cgutils.unpack_tuple(builder, xe.shape, 2)
        row_stride = cgutils.unpack_tuple(builder, w.strides, 2)[0]  # bytes
        base = builder.bitcast(w.data, _I8.as_pointer())
        t = [builder.add(args[3], ir.Constant(_I64, i)) for i in range(tokens)]
        x_rows = [[builder.gep(a.data, [builder.mul(ti, K2)]) for ti in t] for a in (xe, xo)]  # float*
        w_rows = [builder.bitcast(builder.gep(base, [builder.mul(r, row_stride)]), _I32.as_pointer())
                  for r in args[4:8]]  # i32*
        acc = [[cgutils.alloca_once_value(builder, _const(floats, 0.0)) for _ in w_rows] for _ in t]
        left = [[cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in w_rows] for _ in t]

        def vector_at(pointer, c, vector_type, align):
            return builder.load(builder.bitcast(builder.gep(pointer, [c]), vector_type.as_pointer()), align=align)

        def widen(u, shift, high_mask):  # a pair (or n pairs) -> its low and its high bf16 as float32
            return (builder.bitcast(builder.shl(u, shift), floats if u.type == ints else _F32),
                    builder.bitcast(builder.and_(u, high_mask), floats if u.type == ints else _F32))

        steps = builder.udiv(K2, ir.Constant(_I64, lanes))
        with cgutils.for_range(builder, steps) as loop:
            c = builder.mul(loop.index, ir.Constant(_I64, lanes))
            e = [vector_at(p, c, floats, 4) for p in x_rows[0]]
            o = [vector_at(p, c, floats, 4) for p in x_rows[1]]
            for k, row in enumerate(w_rows):
                lo, hi = widen(vector_at(row, c, ints, 1), _const(ints, 16), _const(ints, -65536))
                for i in range(tokens):
                    a = _llvm_fma(builder, e[i], lo, builder.load(acc[i][k]))
                    builder.store(_llvm_fma(builder, o[i], hi, a), acc[i][k])
        done = builder.mul(steps, ir.Constant(_I64, lanes))
        with cgutils.for_range(builder, builder.sub(K2, done)) as loop:  # the last K/2 mod n pairs
            c = builder.add(done, loop.index)
            for k, row in enumerate(w_rows):
                u = builder.load(builder.gep(row, [c]), align=1)
                lo, hi = widen(u, ir.Constant(_I32, 16), ir.Constant(_I32, -65536))
                for i in range(tokens):
                    ev = builder.load(builder.gep(x_rows[0][i], [c]))
                    ov = builder.load(builder.gep(x_rows[1][i], [c]))
                    a = _llvm_fma(builder, ev, lo, builder.load(left[i][k]))
                    builder.store(_llvm_fma(builder, ov, hi, a), left[i][k])
        out = [builder.fadd(_ordered_lane_sum(builder, builder.load(acc[i][k])), builder.load(left[i][k]))
               for i in range(tokens) for k in range(len(w_rows))]
        return context.make_tuple(builder, signature.return_type, out)

    @intrinsic
    def dot(typingctx, xe, xo, w, t0, r0, r1, r2, r3):
        def floats_c(a):
            return isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 and a.layout == "C"

        pairs = isinstance(w, types.Array) and w.dtype == types.uint32 and w.ndim == 2
        indices = all(isinstance(i, types.Integer) for i in (t0, r0, r1, r2, r3))
        if floats_c(xe) and floats_c(xo) and pairs and indices:
            int64 = types.int64
            return types.UniTuple(types.float32, _BF16_ROWS * tokens)(xe, xo, w, int64, int64, int64, int64, int64), codegen
        return None

    return dot


_BF16_1, _BF16_2, _BF16_3, _BF16_4 = (bf16_pairs_dot(m) for m in (1, 2, 3, 4))


@njit(inline="always")
def bf16_tile(xe, xo, w, y, t, r0, r1, r2, r3):
    """y[t .. t + m - 1, r0..r3] for m = min(BF16_TOKENS, T - t) tokens, through the intrinsic of m tokens
    (module globals, as for `dot`). Rows may repeat (the leftover rows of `fast._row_groups`): the repeat
    writes the same value again."""
    m = min(BF16_TOKENS, y.shape[0] - t)
    if m == 1:
        s = _BF16_1(xe, xo, w, t, r0, r1, r2, r3)
        y[t, r0], y[t, r1], y[t, r2], y[t, r3] = s
    elif m == 2:
        s = _BF16_2(xe, xo, w, t, r0, r1, r2, r3)
        y[t, r0], y[t, r1], y[t, r2], y[t, r3] = s[0], s[1], s[2], s[3]
        y[t + 1, r0], y[t + 1, r1], y[t + 1, r2], y[t + 1, r3] = s[4], s[5], s[6], s[7]
    elif m == 3:
        s = _BF16_3(xe, xo, w, t, r0, r1, r2, r3)
        y[t, r0], y[t, r1], y[t, r2], y[t, r3] = s[0], s[1], s[2], s[3]
        y[t + 1, r0], y[t + 1, r1], y[t + 1, r2], y[t + 1, r3] = s[4], s[5], s[6], s[7]
        y[t + 2, r0], y[t + 2, r1], y[t + 2, r2], y[t + 2, r3] = s[8], s[9], s[10], s[11]
    else:
        s = _BF16_4(xe, xo, w, t, r0, r1, r2, r3)
        y[t, r0], y[t, r1], y[t, r2], y[t, r3] = s[0], s[1], s[2], s[3]
        y[t + 1, r0], y[t + 1, r1], y[t + 1, r2], y[t + 1, r3] = s[4], s[5], s[6], s[7]
        y[t + 2, r0], y[t + 2, r1], y[t + 2, r2], y[t + 2, r3] = s[8], s[9], s[10], s[11]
        y[t + 3, r0], y[t + 3, r1], y[t + 3, r2], y[t + 3, r3] = s[12], s[13], s[14], s[15]
