"""Widening stored numbers to float32 inside compiled loops, and the array forms the kernels accept.

- `to_f32(value)`: one stored element -> float32, in registers (usable only inside @njit code).
- `f32_bits(x)`, `f32_from_bits(bits)`: a float32 and its 32 bits, reinterpreted both ways (@njit code only;
  the exponentials of expf.py and the bf16 parts of amx.py build floats from bits).
- `stored(w)`: a weight as the kernels read it (float16 as int16 bits, everything else as it is).
- `activation(x)`: activations as the kernels want them (float32, C-contiguous).

Why in registers: a matrix-vector product is limited by how fast the weights stream from memory, so the
weights must be read as stored (2 bytes for bf16) and never copied to float32 first. `to_f32` is a
bit-cast of two or three LLVM instructions, which keeps the loops around it vectorised.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def to_f32(typingctx, value):
    """One stored weight element -> float32, in registers.

    uint16 (bfloat16 bits): the 16 bits become the high half of a float32 (zero-extend, shift left 16,
    reinterpret; exact). int16 (float16 bits; Numba has no float16 arrays on the CPU, so float16 weights
    are passed as int16 views): reinterpret as half, then `fpext` (one vcvtph2ps instruction with F16C;
    exact, subnormals included). float32: unchanged.
    """
    if value == types.uint16:

        def codegen(context, builder, signature, args):
            wide = builder.zext(args[0], ir.IntType(32))
            high = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(high, ir.FloatType())

        return types.float32(value), codegen
    if value == types.int16:

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(value), codegen
    if value == types.float32:

        def codegen(context, builder, signature, args):
            return args[0]

        return types.float32(value), codegen
    return None


@intrinsic
def f32_bits(typingctx, value):
    """The uint32 bit pattern of a float32 (a reinterpretation, no conversion)."""
    if value != types.float32:
        return None
    return types.uint32(value), lambda context, builder, signature, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 or uint32 `bits` (a reinterpretation, no conversion)."""
    if bits not in (types.int32, types.uint32):
        return None
    return types.float32(bits), lambda context, builder, signature, args: builder.bitcast(args[0], ir.FloatType())


def stored(w: np.ndarray) -> np.ndarray:
    """A weight as the compiled kernels read it: bf16 (uint16) and float32 as they are, float16 as its int16
    bit patterns (a view, no copy). Other dtypes (float64, ...) are converted to float32."""
    if w.dtype == np.uint16 or w.dtype == np.float32:
        return w
    if w.dtype == np.float16:
        return w.view(np.int16)
    return np.asarray(w, dtype=np.float32)


def activation(x: np.ndarray) -> np.ndarray:
    """Activations as the kernels want them: float32, C-contiguous (a copy only when needed)."""
    return np.ascontiguousarray(x, dtype=np.float32)
