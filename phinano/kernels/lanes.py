"""The two inner loops of decode attention (fast._attend_keys), written as explicit 16-lane vector loops:
a query row's dot product with a key row, and a run of value rows summed into one accumulator row by their
weights.

Why explicit. Numba's own loops over a head's 96 or 128 numbers are vectorised by LLVM in 256-bit
registers on these CPUs (its "prefer-vector-width"), and in the value loop `acc[d] += p * v[j, d]` it
loaded and stored the accumulator row once for every key, unable to prove that the rows do not overlap.
Here a dot product is two 16-lane accumulators of fused multiply-adds and one fixed tree of additions,
and the value loop keeps up to four 16-number pieces of the accumulator row in registers across a run of
keys, as independent chains of multiply-adds. On a CPU without AVX-512 LLVM splits each 16-lane vector into
two of 8 lanes: the same numbers, the same order. Measured: docs/kernels.md, "Decode attention".

Both are strict IR (`llvm.fma`, no fast-math flags): every call sums in the same order wherever it is
called from, so a query's result depends only on its own keys.

    row_dot(q, t, h, k, j, kvh)
        q[t, h] . k[j, kvh]: q (T, H, HD), k (S, KVH, HD), float32, C-contiguous -> float32
    weighted_rows_into(acc, t, h, w, a, v, j1, j2, kvh)
        acc[t, h, :] += sum over j1 <= j < j2 of w[t, h, j - a] * v[j, kvh, :]
        acc (T, H, HD), w (T, H, n), v (S, KVH, HD), float32, C-contiguous; each acc[t, h, d] summed
        over j in order, one fused multiply-add per key

Editing this file: Numba's on-disk cache keys the attention kernel on fast.py, not on this file: touch
fast.py after a change here (or delete phinano/kernels/__pycache__).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

_LANES = 16
_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
_VEC = ir.VectorType(_F32, _LANES)


def _fma(builder, a, b, c):
    """a * b + c rounded once (`llvm.fma`), for a float or a 16-lane vector."""
    name = "llvm.fma.v16f32" if a.type == _VEC else "llvm.fma.f32"
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(f, [a, b, c])


def _vector_at(builder, pointer, index):
    """A pointer to the 16 float32 starting at element `index` (i64) of a float pointer."""
    return builder.bitcast(builder.gep(pointer, [index]), _VEC.as_pointer())


def _lane_sum(builder, v):
    """The sum of 16 lanes as a fixed tree: lanes i and i + 8, then i and i + 4, i and i + 2, i and i + 1."""
    n = _LANES
    while n > 1:
        n //= 2
        top = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, _LANES), [(i + n) % _LANES for i in range(_LANES)]))
        v = builder.fadd(v, top)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _is_rows(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C" and t.ndim == 3


def _start(context, builder, signature, args, a, i, j):
    """(data pointer, element index of a[i, j, 0], last dimension) for the C-contiguous 3-D array args[a]."""
    r = context.make_array(signature.args[a])(context, builder, args[a])
    _, n1, n2 = cgutils.unpack_tuple(builder, r.shape, 3)
    i, j = (context.cast(builder, args[k], signature.args[k], types.int64) for k in (i, j))
    return r.data, builder.mul(builder.add(builder.mul(i, n1), j), n2), n2


def _int64(context, builder, signature, args, k):
    return context.cast(builder, args[k], signature.args[k], types.int64)


@intrinsic
def row_dot(typingctx, q, t, h, k, j, kvh):
    """q[t, h] . k[j, kvh] (both (T or S, heads, HD) float32, C-contiguous): 16-lane products summed in two
    accumulators (even and odd vectors), their lanes by a fixed tree, then the last HD % 16 one by one."""
    if not (_is_rows(q) and _is_rows(k)):
        raise TypingError("row_dot takes two 3-D C-contiguous float32 arrays")

    def codegen(context, builder, signature, args):
        pa, ia, n = _start(context, builder, signature, args, 0, 1, 2)
        pb, ib, _ = _start(context, builder, signature, args, 3, 4, 5)
        pa, pb = builder.gep(pa, [ia]), builder.gep(pb, [ib])
        zero = ir.Constant(_VEC, [0.0] * _LANES)
        acc0 = cgutils.alloca_once_value(builder, zero)
        acc1 = cgutils.alloca_once_value(builder, zero)
        pairs = builder.udiv(n, ir.Constant(_I64, 2 * _LANES))
        with cgutils.for_range(builder, pairs) as loop:  # 32 numbers a turn
            i = builder.mul(loop.index, ir.Constant(_I64, 2 * _LANES))
            for acc, at in ((acc0, i), (acc1, builder.add(i, ir.Constant(_I64, _LANES)))):
                x = builder.load(_vector_at(builder, pa, at), align=4)
                y = builder.load(_vector_at(builder, pb, at), align=4)
                builder.store(_fma(builder, x, y, builder.load(acc)), acc)
        done = builder.mul(pairs, ir.Constant(_I64, 2 * _LANES))
        with builder.if_then(builder.icmp_unsigned(">=", builder.sub(n, done), ir.Constant(_I64, _LANES))):
            x = builder.load(_vector_at(builder, pa, done), align=4)
            y = builder.load(_vector_at(builder, pb, done), align=4)
            builder.store(_fma(builder, x, y, builder.load(acc0)), acc0)
        total = cgutils.alloca_once_value(builder, _lane_sum(builder, builder.fadd(builder.load(acc0), builder.load(acc1))))
        vectors = builder.mul(builder.udiv(n, ir.Constant(_I64, _LANES)), ir.Constant(_I64, _LANES))
        with cgutils.for_range(builder, builder.sub(n, vectors)) as loop:  # the last HD % 16 one by one
            at = builder.add(vectors, loop.index)
            x, y = builder.load(builder.gep(pa, [at])), builder.load(builder.gep(pb, [at]))
            builder.store(_fma(builder, x, y, builder.load(total)), total)
        return builder.load(total)

    return types.float32(q, t, h, k, j, kvh), codegen


# Pieces of 16 numbers an accumulator row keeps in registers at once in `weighted_rows_into`: independent
# chains of fused multiply-adds, so that each key's products do not wait for the previous key's (4 cycles
# each). 96 = 4 + 2 pieces, 128 = 4 + 4.
_PIECES = 4


@intrinsic
def weighted_rows_into(typingctx, acc, t, h, w, a, v, j1, j2, kvh):
    """acc[t, h, d] += w[t, h, j - a] * v[j, kvh, d] for j = j1 .. j2 - 1 in order (one fused multiply-add
    each), every d. acc (T, H, HD), w (T, H, n), v (S, KVH, HD): float32, C-contiguous. Up to _PIECES
    16-number pieces of acc stay in registers over the whole run of keys; the last HD % 16 numbers go one by
    one, in the same order of keys."""
    if not (_is_rows(acc) and _is_rows(w) and _is_rows(v)):
        raise TypingError("weighted_rows_into takes acc (T, H, HD), w (T, H, n), v (S, KVH, HD): 3-D C-contiguous float32")

    def codegen(context, builder, signature, args):
        pacc, iacc, HD = _start(context, builder, signature, args, 0, 1, 2)
        pw, iw, _ = _start(context, builder, signature, args, 3, 1, 2)
        pv, _, _ = _start(context, builder, signature, args, 5, 6, 8)
        r_v = context.make_array(signature.args[5])(context, builder, args[5])
        _, KVH, _ = cgutils.unpack_tuple(builder, r_v.shape, 3)
        a_, j1_, j2_, kvh_ = (_int64(context, builder, signature, args, k) for k in (4, 6, 7, 8))
        pacc, pw = builder.gep(pacc, [iacc]), builder.gep(pw, [builder.sub(iw, a_)])  # acc[t, h]; w[t, h, j] at j
        keys = builder.sub(j2_, j1_)
        keys = builder.select(builder.icmp_signed(">", keys, ir.Constant(_I64, 0)), keys, ir.Constant(_I64, 0))

        def value_row(j):  # a pointer to v[j, kvh, 0]
            return builder.gep(pv, [builder.mul(builder.add(builder.mul(j, KVH), kvh_), HD)])

        def pieces_over_keys(first, count):  # pieces first .. first + count - 1 (count a constant), every key
            at = [builder.add(first, ir.Constant(_I64, _LANES * p)) for p in range(count)]
            regs = [cgutils.alloca_once_value(builder, builder.load(_vector_at(builder, pacc, d), align=4)) for d in at]
            with cgutils.for_range(builder, keys) as key:
                j = builder.add(j1_, key.index)
                p = builder.insert_element(ir.Constant(_VEC, ir.Undefined), builder.load(builder.gep(pw, [j])), ir.Constant(_I32, 0))
                p = builder.shuffle_vector(p, ir.Constant(_VEC, ir.Undefined), ir.Constant(ir.VectorType(_I32, _LANES), [0] * _LANES))
                row = value_row(j)
                for r, d in zip(regs, at):
                    x = builder.load(_vector_at(builder, row, d), align=4)
                    builder.store(_fma(builder, p, x, builder.load(r)), r)
            for r, d in zip(regs, at):
                builder.store(builder.load(r), _vector_at(builder, pacc, d), align=4)

        pieces = builder.udiv(HD, ir.Constant(_I64, _LANES))
        groups = builder.udiv(pieces, ir.Constant(_I64, _PIECES))
        with cgutils.for_range(builder, groups) as group:
            pieces_over_keys(builder.mul(group.index, ir.Constant(_I64, _PIECES * _LANES)), _PIECES)
        first = builder.mul(groups, ir.Constant(_I64, _PIECES * _LANES))
        left = builder.urem(pieces, ir.Constant(_I64, _PIECES))
        for count in range(1, _PIECES):  # the 1 .. _PIECES - 1 pieces left, as one group
            with builder.if_then(builder.icmp_unsigned("==", left, ir.Constant(_I64, count))):
                pieces_over_keys(first, count)
        first = builder.mul(pieces, ir.Constant(_I64, _LANES))
        with cgutils.for_range(builder, builder.sub(HD, first)) as rest:  # the last HD % 16 numbers
            d = builder.add(first, rest.index)
            s = cgutils.alloca_once_value(builder, builder.load(builder.gep(pacc, [d])))
            with cgutils.for_range(builder, keys) as key:
                j = builder.add(j1_, key.index)
                x = builder.load(builder.gep(value_row(j), [d]))
                builder.store(_fma(builder, builder.load(builder.gep(pw, [j])), x, builder.load(s)), s)
            builder.store(builder.load(s), builder.gep(pacc, [d]))
        return context.get_dummy_value()

    return types.void(acc, t, h, w, a, v, j1, j2, kvh), codegen
