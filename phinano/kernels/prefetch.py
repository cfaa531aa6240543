"""Software prefetch for the packed-weight decode kernels: ask for weight bytes before the loop needs them.

A quantized matrix-vector product alternates between waiting for memory and unpacking what arrived. On the
2-core AMD EPYC (Zen 3) these machines had, the two did not overlap: one thread's Q8_0 product read 10.7 G
weights/s from L2 but 5.6 from memory, close to 1 / (1 / compute + 1 / memory), and the hardware prefetcher
did not run far enough ahead to hide it. Asking for the bytes PREFETCH_AHEAD further on (`prefetch_span`,
one hint per 64-byte cache line, into L2) made whole-model decode of a full-size Phi-3-mini 1.2x (Q8_0) to
1.45x (Q4_0) faster (docs/kernels.md, "Prefetching the packed bytes"). A hint never changes a result: the
loaded values are the same.

The bf16 kernel does not use it: it does little work per byte, so the out-of-order core already keeps
enough reads in flight. Measured on the model's own weights and in whole-model decode, a prefetch gave
nothing at any distance (docs/kernels.md).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# How far ahead of the bytes being unpacked to prefetch. Measured on AMD EPYC (Zen 3, 2 cores): 16-32 KiB
# gave the same gain, 4 KiB about half of it, 64 KiB and more less again (lines then arrive too early and
# are evicted before use). Not yet measured on the Intel (Sapphire Rapids) kind; a prefetch that comes too
# early or too late costs one instruction per cache line and changes no result.
PREFETCH_AHEAD = 16384
_LINE = 64  # bytes per cache line (x86-64)


@intrinsic
def _prefetch(typingctx, rows, index):
    """Hint: bring byte `index` of the C-contiguous 2-D array `rows` (counted over the whole array, clamped
    to its last byte) into L2. One `prefetcht1` instruction; no load, no fault, no result."""
    if not isinstance(rows, types.Array) or rows.ndim != 2 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        shape = cgutils.unpack_tuple(builder, array.shape, 2)
        size = builder.mul(builder.mul(shape[0], shape[1]), array.itemsize)
        last = builder.sub(size, ir.Constant(i64, 1))
        i = builder.sext(args[1], i64) if args[1].type.width < 64 else args[1]
        i = builder.select(builder.icmp_signed("<", i, last), i, last)
        emit_prefetch(builder, builder.gep(builder.bitcast(array.data, ir.IntType(8).as_pointer()), [i]))
        return context.get_dummy_value()

    return types.void(rows, index), codegen


def emit_prefetch(builder, pointer) -> None:
    """Emit the hint for the byte at an i8 pointer into LLVM IR: `llvm.prefetch`, which is one `prefetcht1` on
    x86 (also used by the explicit vector loops of vector.py)."""
    fnty = ir.FunctionType(ir.VoidType(), [pointer.type] + [ir.IntType(32)] * 3)
    prefetch = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # (address, 0 = read, locality 2 = keep in L2 and beyond, 1 = data cache)
    builder.call(prefetch, [pointer] + [ir.Constant(ir.IntType(32), v) for v in (0, 2, 1)])


@njit(inline="always")
def prefetch_span(rows, start, nbytes):
    """Prefetch the bytes [start, start + nbytes) + PREFETCH_AHEAD of `rows` (flat byte offsets), one hint
    per cache line. A work item that reads rows r0 .. r0 + k - 1 side by side has reached flat byte
    r0 * L + k * o when it is at offset o of each row (L bytes per row), so it calls
    prefetch_span(rows, r0 * L + k * o, k * block_bytes) once per block."""
    for p in range(0, nbytes, _LINE):
        _prefetch(rows, start + PREFETCH_AHEAD + p)
