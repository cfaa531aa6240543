"""Software prefetch for the packed-weight decode kernels: ask for weight bytes before the loop needs them.

A quantized matrix-vector product alternates between waiting for memory and unpacking what arrived. On the
2-core AMD EPYC (Zen 3) these machines had, the two did not overlap: one thread's Q8_0 product read 10.7 G
weights/s from L2 but 5.6 from memory, close to 1 / (1 / compute + 1 / memory), and the hardware prefetcher
did not run far enough ahead to hide it. Asking for the bytes PREFETCH_AHEAD further on (`prefetch_lines`:
one hint per 64-byte cache line, into L2, emitted into the loops of vector.py) made whole-model decode of a
full-size Phi-3-mini 1.2x (Q8_0) to 1.45x (Q4_0) faster (docs/kernels.md, "Prefetching the packed bytes").
A hint never changes a result: the loaded values are the same.

The bf16 kernel does not use it: it does little work per byte, so the out-of-order core already keeps
enough reads in flight, and it reads its rows as four long streams that the hardware prefetcher follows
(fast.py, `_row_groups`). Measured on the model's own weights and in whole-model decode, a prefetch gave
nothing at any distance (docs/kernels.md).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

# How far ahead of the bytes being unpacked to prefetch. Measured on AMD EPYC (Zen 3, 2 cores): 16-32 KiB
# gave the same gain, 4 KiB about half of it, 64 KiB and more less again (lines then arrive too early and
# are evicted before use); with the explicit vector loops 4-32 KiB all gave the same. On the Intel Xeon
# (Emerald Rapids) kind, 2026-11-30, 2 threads, 1 GiB of 3072 x 8192 matrices, two rounds of alternating
# processes, GB/s for 4 / 16 / 64 KiB ahead and no hint: Q4_0 18.9-20.5 / 16.7-18.0 / 13.8-20.5 / 18.6-21.3,
# Q4_K 16.9-18.4 / 16.7 / 11.6-17.8 / 16.2-16.4, Q6_K 17.5-18.7 / 18.3-18.5 / 19.4-19.8 / 18.7-20.0: its
# prefetchers need no hint, and 16 KiB costs nothing there that the noise shows. A prefetch that comes too
# early or too late costs one instruction per cache line and changes no result.
PREFETCH_AHEAD = 16384
_LINE = 64  # bytes per cache line (x86-64)


def emit_prefetch(builder, pointer) -> None:
    """Emit the hint for the byte at an i8 pointer into LLVM IR: `llvm.prefetch`, which is one `prefetcht1`
    on x86."""
    fnty = ir.FunctionType(ir.VoidType(), [pointer.type] + [ir.IntType(32)] * 3)
    prefetch = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # (address, 0 = read, locality 2 = keep in L2 and beyond, 1 = data cache)
    builder.call(prefetch, [pointer] + [ir.Constant(ir.IntType(32), v) for v in (0, 2, 1)])


def prefetch_lines(builder, base, start, nbytes, last_byte) -> None:
    """One hint per 64-byte line of the bytes [start, start + nbytes) + PREFETCH_AHEAD of the packed matrix
    at the i8 pointer `base` (flat byte offsets, i64), each clamped to `last_byte`, so no hint points past
    the matrix. A work item reading rows r0 .. r0 + k - 1 side by side (L bytes a row) is at flat byte
    r0 L + k o when it is at offset o of each row, so its loops ask once per block for the k blocks'
    bytes from there (vector.py, `_prefetch_ahead`)."""
    i64 = ir.IntType(64)
    for p in range(0, nbytes, _LINE):
        i = builder.add(start, ir.Constant(i64, PREFETCH_AHEAD + p))
        i = builder.select(builder.icmp_signed("<", i, last_byte), i, last_byte)
        emit_prefetch(builder, builder.gep(base, [i]))
