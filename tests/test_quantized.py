"""Quantized weights: the Q8_0 container and quantizer equal the `gguf` package's bit for bit, and the Numba
kernels multiply packed weights as the NumPy reference does.

Block bytes are drawn at random (any int8 values, -128 included, which GGML's quantizer never writes but a
file may hold; any float16 scale bit pattern of a chosen kind), so the kernels are checked on everything a
GGUF file can contain, not only on what our quantizer makes.

Tolerances, and why:
- quantize_q8_0, dequantize, widen, embed: exact. Unpacking is exact in float32: d has 11 significant bits
  and q 8, so d * q has at most 19 (and float16's range, subnormals included, lies inside float32's normal
  range). The quantizer repeats GGML's float32 operations one for one.
- linear: |fast - ref| <= 1e-5 * (|x| @ |w|.T) + 1e-30, the bound of the bf16 kernels (tests/test_kernels.py)
  and for the same reason: both sides sum the same exact float32 products x[c] * w[r, c], only grouped
  differently. The reference lets BLAS sum all K; the fused kernel (kernels/vector.py) sums each block's
  32 products x * q in 8 lanes of 4 (16 lanes of 2 with AVX-512), scales each lane by d, adds the K / 32
  blocks lane by lane and the lanes at the end. The rounding error of either is at most (number of
  additions on the longest path) * 2^-24 * sum |x||w|: for K <= 1024 that is at most (4 + 1 + 32 + 3) * 6e-8 = 2.4e-6 here and (K / 8) * 6e-8
  = 8e-6 for BLAS's eight-lane sums, under 1e-5 even in the worst case. The
  bound is against |x|.|w|, not |y|, because y may cancel to ~0. The BLAS path (many tokens) unpacks tiles
  exactly, so it differs from the reference only in how BLAS blocks the sums.
- Q4_0, Q4_1, Q5_0, Q5_1 (GGML's legacy types): the same, except that linear is bounded against a wider
  scale, argued in their section at the end of this file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phinano.errors import PhinanoError
from phinano.formats.quantized import LAYOUTS, QuantizedTensor, dequantize, quantize_q8_0

gguf = pytest.importorskip("gguf")
pytest.importorskip("numba")

from phinano.kernels import fast, reference, vector  # noqa: E402
from phinano.kernels.quantized import KERNELS  # noqa: E402
from test_kernels import activations, assert_linear_close, assert_linear_within, f32  # noqa: E402

Q8_0_BLAS = KERNELS["Q8_0"].blas_min_tokens  # from this many tokens on, linear() unpacks tiles for BLAS
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)
# float16 scale bit patterns (sign bit random): exponent field ranges, never 31 (inf / nan) unless "any"
SCALE_EXPONENTS = {
    "typical": (7, 12),  # about 1e-3 .. 3e-2, what real Q8_0 weights hold
    "subnormal": (0, 0),  # 0 and 2^-24 .. 2^-14
    "tiny": (1, 3),  # the smallest normal numbers
    "huge": (28, 30),  # 8192 .. 65504
    "mixed": (0, 30),  # every finite float16
}
scale_kinds = st.sampled_from(sorted(SCALE_EXPONENTS))


def random_f16(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """n random float16 values of the given kind, as (n, 2) little-endian bytes."""
    lo, hi = SCALE_EXPONENTS[kind]
    exponent = rng.integers(lo, hi + 1, n, dtype=np.uint16)
    sign = rng.integers(0, 2, n, dtype=np.uint16) << 15
    bits = sign | (exponent << 10) | rng.integers(0, 1024, n, dtype=np.uint16)  # float16: s eeeee mmmmmmmmmm
    return bits.astype("<u2").view(np.uint8).reshape(n, 2)


def random_q8_0(rng: np.random.Generator, N: int, K: int, kind: str) -> QuantizedTensor:
    """N x K Q8_0 weights from random block bytes: any int8 q, float16 scales of the given kind."""
    blocks = rng.integers(0, 256, (N * K // 32, 34), dtype=np.uint8)
    blocks[:, :2] = random_f16(rng, len(blocks), kind)
    return QuantizedTensor("Q8_0", (N, K), blocks.reshape(N, K // 32 * 34))


def gguf_quantize(w: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # float16 overflow of huge scales, inf * 0 when dequantizing them
        warnings.simplefilter("ignore", RuntimeWarning)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)


# ------------------------------------------------------------------------------------------ the container


def test_q8_0_layout_is_ggmls():
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    layout = LAYOUTS["Q8_0"]
    assert (layout.block, layout.block_bytes) == (block, block_bytes) == (32, 34)


def test_every_layout_has_compiled_kernels():
    assert set(KERNELS) == set(LAYOUTS)


def test_quantized_tensor_looks_like_a_matrix_and_selects_whole_rows():
    t = random_q8_0(np.random.default_rng(0), 5, 64, "typical")
    assert (t.shape, t.ndim, t.nbytes) == ((5, 64), 2, 5 * 2 * 34)
    whole = dequantize(t)
    np.testing.assert_array_equal(dequantize(t[1:4]), whole[1:4])
    np.testing.assert_array_equal(dequantize(t[np.array([4, 0, -1])]), whole[[4, 0, -1]])
    for index in (2, (slice(None), slice(0, 34))):
        with pytest.raises(IndexError, match="whole rows"):
            t[index]


@pytest.mark.parametrize(
    "qtype, shape, data, message",
    [
        ("Q3_K", (2, 256), np.zeros((2, 110), np.uint8), "unsupported quantization type 'Q3_K'"),
        ("Q8_0", (2, 40), np.zeros((2, 34), np.uint8), "rows a multiple of 32"),
        ("Q8_0", (2, 32), np.zeros((2, 33), np.uint8), r"needs uint8 data of shape \(2, 34\), got uint8 \(2, 33\)"),
        ("Q8_0", (2, 32), np.zeros((2, 34), np.int8), "got int8"),
        ("Q8_0", (2, 32), b"\0" * 68, "got bytes"),
        ("Q5_1", (2, 64), np.zeros((2, 44), np.uint8), r"needs uint8 data of shape \(2, 48\), got uint8 \(2, 44\)"),
    ],
)
def test_a_quantized_tensor_that_does_not_fit_says_what_is_wrong(qtype, shape, data, message):
    with pytest.raises(PhinanoError, match=message):
        QuantizedTensor(qtype, shape, data)


# ------------------------------------------------------------------------ bit for bit equal to the gguf package


@SETTINGS
@given(
    seed=seeds,
    N=st.integers(1, 9),
    blocks=st.integers(1, 8),
    magnitude=st.sampled_from([1e-30, 1e-8, 1e-3, 1.0, 300.0, 1e6, 1e7]),  # 1e7: scales overflow float16 to inf
    pattern=st.sampled_from(["normal", "halves", "zero blocks", "one large"]),
)
def test_quantize_q8_0_is_bit_identical_to_gguf(seed, N, blocks, magnitude, pattern):
    rng = np.random.default_rng(seed)
    K = 32 * blocks
    w = f32(rng, (N, K), magnitude)
    if pattern == "halves":  # values whose w / d land exactly on .5: the rounding direction shows
        w = (rng.integers(-254, 255, (N, K)) * np.float32(0.5) * np.float32(magnitude)).astype(np.float32)
        w[:, ::32] = np.float32(127 * magnitude)  # max |w| = 127 * magnitude: d = magnitude (exactly when 1.0)
    elif pattern == "zero blocks":
        w[:, : K // 2] = 0.0
    elif pattern == "one large":
        w[rng.integers(0, N), rng.integers(0, K)] = np.float32(1e4 * magnitude)
    ours = quantize_q8_0(w)
    theirs = gguf_quantize(w)
    assert ours.data.dtype == theirs.dtype and ours.data.shape == theirs.shape
    np.testing.assert_array_equal(ours.data, theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(dequantize(ours), gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q8_0))


@SETTINGS
@given(seed=seeds, N=st.integers(1, 9), blocks=st.integers(1, 8), kind=scale_kinds)
def test_dequantize_equals_gguf_on_any_block_bytes(seed, N, blocks, kind):
    t = random_q8_0(np.random.default_rng(seed), N, 32 * blocks, kind)
    theirs = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.Q8_0)
    ours = dequantize(t)
    assert ours.dtype == np.float32 and ours.shape == t.shape
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # bit patterns, -0.0 included


def test_quantize_q8_0_rejects_rows_that_are_not_whole_blocks():
    with pytest.raises(PhinanoError, match="multiple of 32"):
        quantize_q8_0(np.zeros((3, 33), np.float32))


# --------------------------------------------------------------------------- the kernels: fast == reference


@SETTINGS
@given(
    seed=seeds,
    T=st.sampled_from([1, 2, 3, 4, 5, 8, 17, Q8_0_BLAS - 1, Q8_0_BLAS, Q8_0_BLAS + 13, 100]),  # fused, then BLAS
    N=st.integers(1, 37),  # any row count: the kernel works on four rows at a time
    blocks=st.integers(1, 32),  # K = 32 .. 1024
    kind=scale_kinds,
    xs=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4]),
    bias=st.booleans(),
)
def test_linear_on_q8_0_weights(seed, T, N, blocks, kind, xs, bias):
    rng = np.random.default_rng(seed)
    K = 32 * blocks
    w = random_q8_0(rng, N, K, kind)
    assert_linear_close(activations(rng, (T, K), xs), w, f32(rng, (N,)) if bias else None)


def test_linear_q8_0_blas_path_spans_several_tiles(monkeypatch):
    monkeypatch.setattr(fast, "_TILE_ELEMENTS", 64 * 64)  # tiles of 64 rows of K = 64
    rng = np.random.default_rng(1)
    assert_linear_close(f32(rng, (Q8_0_BLAS + 3, 64)), random_q8_0(rng, 150, 64, "typical"))


@pytest.mark.parametrize("T", [1, 5, Q8_0_BLAS])
def test_linear_reads_readonly_q8_0_data_and_writes_nothing(T):
    rng = np.random.default_rng(2)
    w = random_q8_0(rng, 13, 96, "typical")
    before = w.data.copy()
    w.data.flags.writeable = False  # as in a memory-mapped GGUF file
    x = f32(rng, (T, 96))
    assert_linear_close(x, w)
    np.testing.assert_array_equal(w.data, before)


def test_linear_on_q8_0_vectors_and_batches_keeps_numpy_shapes():
    rng = np.random.default_rng(3)
    w = random_q8_0(rng, 6, 64, "typical")
    assert fast.linear(f32(rng, (64,)), w).shape == reference.linear(f32(rng, (64,)), w).shape == (6,)
    x3 = f32(rng, (2, 3, 64))
    np.testing.assert_allclose(fast.linear(x3, w), reference.linear(x3, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"32 features but w has shape \(6, 64\)"):
        fast.linear(f32(rng, (1, 32)), w)


@SETTINGS
@given(seed=seeds, V=st.integers(1, 40), blocks=st.integers(1, 4), T=st.integers(1, 12), kind=scale_kinds)
def test_embed_and_widen_of_q8_0_are_exact(seed, V, blocks, T, kind):
    rng = np.random.default_rng(seed)
    table = random_q8_0(rng, V, 32 * blocks, kind)
    ids = rng.integers(-V, V, T)  # negative ids index from the end, like NumPy
    got = fast.embed(table, ids)
    assert got.dtype == np.float32 and got.shape == (T, 32 * blocks)
    np.testing.assert_array_equal(got, reference.embed(table, ids))
    np.testing.assert_array_equal(fast.widen(table), reference.widen(table))


def test_embed_of_q8_0_rejects_out_of_range_ids():
    table = random_q8_0(np.random.default_rng(4), 4, 32, "typical")
    for backend in (fast, reference):
        with pytest.raises(IndexError):
            backend.embed(table, np.array([4]))


def test_embed_unpacks_only_the_gathered_rows(monkeypatch):
    """A quantized embedding table is never unpacked whole: the kernel sees the T gathered rows only."""
    seen = []
    kernels = KERNELS["Q8_0"]
    spy = dataclasses.replace(kernels, widen_rows=lambda rows, out: seen.append(rows.shape) or kernels.widen_rows(rows, out))
    monkeypatch.setitem(KERNELS, "Q8_0", spy)
    table = random_q8_0(np.random.default_rng(5), 1000, 64, "typical")
    fast.embed(table, np.array([3, 999]))
    assert seen == [(2, 68)]


# ------------------------------------------------------------------ the legacy types: Q4_0, Q4_1, Q5_0, Q5_1
#
# Their blocks are drawn as bytes too: any nibbles, any fifth bits qh, float16 d and m of chosen kinds
# (independently: a huge d with a subnormal m, ...), never inf or nan.
#
# Tolerance of linear: |fast - ref| <= 1e-5 * (|x| @ (|w| + 2 |m|).T) + 1e-30, with m the block's min: the
# stored one (Q4_1, Q5_1), or -8 d (Q4_0) and -16 d (Q5_0), for which w = d * q + m too. Why: the fused
# kernel (kernels/vector.py) computes, per block, d * sum_j x_j q_j + m * sum_j x_j with q in 0..31 (exact
# products x * q; the first sum in 8 lanes of 4 terms (16 of 2 with AVX-512), the sum of x over the block of
# 32 terms), then adds the K / 32 block terms (lane by lane, the lanes at the end). For Q4_0 and Q5_0 the m
# term rides in the lanes: each lane starts from -(zero / n) * sum_j x_j (n lanes), an exact scaling by a
# power of two, before d multiplies it.
# Either way the rounding error is at most about (32 + 8 + K / 32) * 2^-24 * sum_c |x_c| (|d| q_c + |m|),
# i.e. under 5e-6 of that scale for K <= 1024; and
# |d| q = |w - m| <= |w| + |m|. The scale is wider than the |x|.|w| of Q8_0 because the two products are
# rounded apart and cancel where w is small (q = 8 in Q4_0: w = 0, but d q = -m = 8 d). The reference
# (BLAS on the exactly unpacked w) stays within 1e-5 of |x|.|w| as for Q8_0, and so does the BLAS path.

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
ZERO_POINT = {"Q4_0": 8, "Q5_0": 16}  # the types without a stored min: w = d * (q - zero)
legacy_types = st.sampled_from(LEGACY)
LEGACY_BLAS = max(KERNELS[qtype].blas_min_tokens for qtype in LEGACY)


def random_legacy(rng: np.random.Generator, qtype: str, N: int, K: int, d_kind: str, m_kind: str) -> QuantizedTensor:
    """N x K weights of a legacy type from random block bytes: any q, float16 d (and m) of the given kinds."""
    block_bytes = LAYOUTS[qtype].block_bytes
    blocks = rng.integers(0, 256, (N * K // 32, block_bytes), dtype=np.uint8)
    blocks[:, 0:2] = random_f16(rng, len(blocks), d_kind)
    if qtype not in ZERO_POINT:
        blocks[:, 2:4] = random_f16(rng, len(blocks), m_kind)
    return QuantizedTensor(qtype, (N, K), blocks.reshape(N, K // 32 * block_bytes))


def block_mins(t: QuantizedTensor) -> np.ndarray:
    """(N, K) float64: every weight's block min m (w = d * q + m), read from the block bytes."""
    blocks = t.data.reshape(-1, t.layout.block_bytes)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float64)  # (n, 1)
    m = -ZERO_POINT[t.qtype] * d if t.qtype in ZERO_POINT else blocks[:, 2:4].copy().view("<f2").astype(np.float64)
    return np.repeat(m, 32, axis=1).reshape(t.shape)


def assert_legacy_linear_close(x: np.ndarray, w: QuantizedTensor, b: np.ndarray | None = None) -> None:
    """The bound argued above: 1e-5 of |x| @ (|w| + 2 |m|).T."""
    assert_linear_within(x, w, b, np.abs(reference.widen(w).astype(np.float64)) + 2 * np.abs(block_mins(w)), 1e-5)


def gguf_dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    with warnings.catch_warnings():  # d * q + m may overflow float16's range in our random blocks: fine
        warnings.simplefilter("ignore", RuntimeWarning)
        return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype, block_bytes", [("Q4_0", 18), ("Q4_1", 20), ("Q5_0", 22), ("Q5_1", 24)])
def test_legacy_layouts_are_ggmls(qtype, block_bytes):
    layout = LAYOUTS[qtype]
    ggml = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert (layout.block, layout.block_bytes) == ggml == (32, block_bytes)


@SETTINGS
@given(
    seed=seeds, qtype=legacy_types, N=st.integers(1, 9), blocks=st.integers(1, 8), d_kind=scale_kinds, m_kind=scale_kinds
)
def test_legacy_dequantize_is_bit_identical_to_gguf_on_any_block_bytes(seed, qtype, N, blocks, d_kind, m_kind):
    t = random_legacy(np.random.default_rng(seed), qtype, N, 32 * blocks, d_kind, m_kind)
    ours = dequantize(t)
    theirs = gguf_dequantize(t.data, qtype)
    assert ours.dtype == np.float32 and ours.shape == t.shape
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # bit patterns, -0.0 included


def test_legacy_dequantize_reads_nibbles_and_fifth_bits_where_ggml_puts_them():
    """One hand-made Q5_1 block: byte i of qs holds q[i] (low nibble) and q[i + 16] (high nibble); bit j of
    the little-endian qh adds 16 to q[j]."""
    block = np.zeros(24, np.uint8)
    block[0:2] = np.array([1.0], "<f2").view(np.uint8)  # d = 1
    block[2:4] = np.array([-0.5], "<f2").view(np.uint8)  # m = -0.5
    block[4:8] = np.array([(1 << 3) | (1 << 20)], "<u4").view(np.uint8)  # fifth bits of q[3] and q[20]
    block[8 + 3] = 0x52  # q[3] = 2, q[19] = 5
    block[8 + 4] = 0x07  # q[4] = 7, q[20] = 0
    want = np.full(32, -0.5, np.float32)
    want[[3, 19, 4, 20]] = [16 + 2 - 0.5, 5 - 0.5, 7 - 0.5, 16 - 0.5]
    np.testing.assert_array_equal(dequantize(QuantizedTensor("Q5_1", (1, 32), block[None])), want[None])


@SETTINGS
@given(
    seed=seeds,
    qtype=legacy_types,
    N=st.integers(1, 9),
    blocks=st.integers(1, 8),
    magnitude=st.sampled_from([1e-2, 1.0, 100.0]),
    offset=st.sampled_from([0.0, 3.0]),  # weights all of one sign: Q4_1's and Q5_1's m matters
)
def test_gguf_quantized_legacy_blocks_round_trip(seed, qtype, N, blocks, magnitude, offset):
    """What the gguf package's quantizer writes (as llama.cpp's converter does) reads back as its own
    dequantizer reads it, within one quantization step of the original weights, on both backends."""
    rng = np.random.default_rng(seed)
    K = 32 * blocks
    w = ((rng.standard_normal((N, K)) + offset) * magnitude).astype(np.float32)
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    t = QuantizedTensor(qtype, w.shape, data)
    ours = dequantize(t)
    np.testing.assert_array_equal(ours.view(np.uint32), gguf_dequantize(data, qtype).view(np.uint32))
    np.testing.assert_array_equal(fast.widen(t).view(np.uint32), ours.view(np.uint32))
    step = np.repeat(np.abs(data.reshape(-1, LAYOUTS[qtype].block_bytes)[:, :2].copy().view("<f2")), 32, axis=1)
    assert np.all(np.abs(ours - w) <= 1.01 * step.reshape(N, K) + 1e-3 * np.abs(block_mins(t)))
    assert_legacy_linear_close(f32(rng, (3, K)), t)


@SETTINGS
@given(
    seed=seeds,
    qtype=legacy_types,
    T=st.sampled_from([1, 2, 3, 4, 5, 8, 17, LEGACY_BLAS - 1, LEGACY_BLAS, LEGACY_BLAS + 13, 100]),  # fused, then BLAS
    N=st.integers(1, 37),  # any row count: the kernel works on four rows at a time
    blocks=st.integers(1, 32),  # K = 32 .. 1024
    d_kind=scale_kinds,
    m_kind=scale_kinds,
    xs=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4]),
    bias=st.booleans(),
)
def test_linear_on_legacy_weights(seed, qtype, T, N, blocks, d_kind, m_kind, xs, bias):
    rng = np.random.default_rng(seed)
    K = 32 * blocks
    w = random_legacy(rng, qtype, N, K, d_kind, m_kind)
    assert_legacy_linear_close(activations(rng, (T, K), xs), w, f32(rng, (N,)) if bias else None)


@pytest.mark.parametrize("qtype", LEGACY)
def test_linear_legacy_blas_path_spans_several_tiles_of_readonly_data(qtype, monkeypatch):
    monkeypatch.setattr(fast, "_TILE_ELEMENTS", 64 * 64)  # tiles of 64 rows of K = 64
    rng = np.random.default_rng(1)
    w = random_legacy(rng, qtype, 150, 64, "typical", "typical")
    before = w.data.copy()
    w.data.flags.writeable = False  # as in a memory-mapped GGUF file
    for T in (1, 5, KERNELS[qtype].blas_min_tokens + 3):
        assert_legacy_linear_close(f32(rng, (T, 64)), w)
    np.testing.assert_array_equal(w.data, before)


@SETTINGS
@given(seed=seeds, qtype=legacy_types, V=st.integers(1, 40), blocks=st.integers(1, 4), T=st.integers(1, 12),
       d_kind=scale_kinds, m_kind=scale_kinds)
def test_embed_and_widen_of_legacy_types_are_exact(seed, qtype, V, blocks, T, d_kind, m_kind):
    rng = np.random.default_rng(seed)
    table = random_legacy(rng, qtype, V, 32 * blocks, d_kind, m_kind)
    ids = rng.integers(-V, V, T)  # negative ids index from the end, like NumPy
    got = fast.embed(table, ids)
    assert got.dtype == np.float32 and got.shape == (T, 32 * blocks)
    np.testing.assert_array_equal(got.view(np.uint32), reference.embed(table, ids).view(np.uint32))
    np.testing.assert_array_equal(got.view(np.uint32), dequantize(table)[ids].view(np.uint32))  # the gathered rows
    np.testing.assert_array_equal(fast.widen(table).view(np.uint32), reference.widen(table).view(np.uint32))


# ------------------------------------------------------------------------ the kernels' on-disk cache

_CACHE_PROBE = """
import json, numpy as np
from phinano.formats.quantized import QuantizedTensor
from phinano.kernels import fast
from phinano.testing.strategies import make_weight
from phinano.kernels.quantized import KERNELS
from phinano.kernels.runtime import PARALLEL_MIN_WORK, serial_twin
hits = {}
for qtype, block_bytes, block in (("Q8_0", 34, 32), ("Q4_K", 144, 256), ("Q6_K", 210, 256)):
    for N in (4, PARALLEL_MIN_WORK // 256):  # the serial twin (small work), then the parallel kernel
        w = QuantizedTensor(qtype, (N, 256), np.zeros((N, 256 // block * block_bytes), np.uint8))
        fast.linear(np.ones((1, 256), np.float32), w)
    kernel = KERNELS[qtype].matmul
    hits[qtype] = [sum(k.stats.cache_hits.values()) for k in (serial_twin(kernel), kernel)]
print(json.dumps(hits))
"""


def test_packed_decode_kernels_load_from_numbas_cache_in_a_new_process(tmp_path):
    """The fused kernels of the three families (a closure per type number, one per Q4_K/Q5_K flag, a module
    function) reach their loops through intrinsics that vector.py keeps as module globals. A kernel that
    captured an intrinsic instead would never hit Numba's cache (an intrinsic pickles differently in every
    process) and would be compiled again at every start: the second process must find all three cached, and
    their serial twins (runtime.serial_twin: small work) too."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert json.loads(runs[1].stdout) == {"Q8_0": [1, 1], "Q4_K": [1, 1], "Q6_K": [1, 1]}


# ------------------------------------------------------------------------ the other vector width

_OTHER_WIDTH_PROBE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import test_quantized as t
from phinano.kernels import vector
rng = np.random.default_rng(7)
for qtype in t.LEGACY:
    for d_kind, m_kind in (("typical", "typical"), ("huge", "subnormal"), ("subnormal", "huge")):
        w = t.random_legacy(rng, qtype, 13, 96, d_kind, m_kind)
        t.assert_legacy_linear_close(rng.standard_normal((3, 96)).astype(np.float32), w)
w = t.random_q8_0(rng, 13, 96, "typical")
x = rng.standard_normal((3, 96)).astype(np.float32)
t.assert_linear_within(x, w, None, np.abs(t.reference.widen(w).astype(np.float64)), 1e-5)
from phinano.kernels import fast
from phinano.testing.strategies import make_weight
for K in (34, 96):  # bf16 pairs a row: 17 (vectors and a scalar tail left) and 48
    w = make_weight(rng, (13, K), "bf16")
    x = rng.standard_normal((7, K)).astype(np.float32)
    y = fast.linear(x, w)
    for i in range(7):  # tiles of vector.BF16_TOKENS and the tokens left: each token as alone
        assert np.array_equal(y[i], fast.linear(x[i : i + 1], w)[0]), (K, i)
    t.assert_linear_within(x, w, None, np.abs(t.reference.widen(w).astype(np.float64)), 1e-5)
from phinano.formats.gguf_write import encode_tensor
from phinano.formats.quantized import QuantizedTensor
for qtype in ("Q4_K", "Q6_K"):  # tiles of tokens on AVX-512 at 16 lanes, one token a pass at 8
    w = QuantizedTensor(qtype, (13, 512), encode_tensor(rng.standard_normal((13, 512)).astype(np.float32), qtype))
    x = rng.standard_normal((7, 512)).astype(np.float32)
    y = fast.linear(x, w)
    for i in range(7):
        assert np.array_equal(y[i], fast.linear(x[i : i + 1], w)[0]), (qtype, i)
    t.assert_linear_within(x, w, None, np.abs(t.reference.widen(w).astype(np.float64)), 1e-5)
print(vector.WIDTH, vector.BF16_TOKENS)
"""


_OTHER_TARGET_PROBE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import test_quantized as t
from phinano.kernels import fast, vector
from phinano.formats.gguf_write import encode_tensor
from phinano.formats.quantized import QuantizedTensor
assert not vector.AVX512  # compiling for Haswell: no AVX-512 intrinsics may be emitted
rng = np.random.default_rng(3)
for qtype in ("Q4_0", "Q4_K", "Q6_K"):
    w = QuantizedTensor(qtype, (13, 512), encode_tensor(rng.standard_normal((13, 512)).astype(np.float32), qtype))
    x = rng.standard_normal((5, 512)).astype(np.float32)
    t.assert_linear_within(x, w, None, np.abs(t.reference.widen(w).astype(np.float64)), 1e-5)
print("ok")
"""


def test_compiling_for_another_cpu_emits_no_avx512_intrinsics(tmp_path):
    """Numba can be told to compile for another CPU (NUMBA_CPU_NAME), e.g. for a cache shared between
    machines. The nibble tables use an AVX-512 intrinsic, which LLVM cannot select for a CPU without it:
    vector.AVX512 must follow Numba's target, not the host, and the kernels must still be right."""
    from llvmlite import binding

    if not binding.get_host_cpu_features().get("avx2"):
        pytest.skip("this CPU cannot run code compiled for Haswell (AVX2)")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "haswell"}
    run = subprocess.run([sys.executable, "-c", _OTHER_TARGET_PROBE, os.path.dirname(__file__)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok"]


_WITHOUT_VBMI_PROBE = """
import sys, numpy as np
from phinano.kernels import fast, vector
from phinano.formats.gguf_write import encode_tensor
from phinano.formats.quantized import QuantizedTensor
assert vector.AVX512 and not vector.VBMI
rng = np.random.default_rng(5)
w = QuantizedTensor("Q6_K", (13, 768), encode_tensor(rng.standard_normal((13, 768)).astype(np.float32) * 3, "Q6_K"))
x = rng.standard_normal((6, 768)).astype(np.float32)
sys.stdout.write(fast.linear(x, w).tobytes().hex() + " " + fast.linear(x[:1], w).tobytes().hex())
"""


def test_q6_k_without_byte_permutes_gives_the_same_bits(tmp_path):
    """Q6_K's 16-lane loop takes each sub-block's numbers with a byte permute where the CPU has AVX-512 VBMI
    (`vector._top_bytes`, (q - 32) 2^24 then d 2^-24) and by a shuffle and a sign extension where it has
    AVX-512 without VBMI (Skylake-SP, Cascade Lake). The two make the same weights exactly and add them in
    the same order: this compiles the second for this CPU (NUMBA_CPU_FEATURES without avx512vbmi, an empty
    cache) and compares the bits, one token and a tile of tokens."""
    from llvmlite import binding

    from phinano.formats.gguf_write import encode_tensor

    features = binding.get_host_cpu_features()
    if not (vector.VBMI and features.get("avx512vbmi")):
        pytest.skip("this CPU runs Q6_K without byte permutes already (no AVX-512 VBMI)")
    flags = features.flatten().replace("+avx512vbmi,", "-avx512vbmi,").replace("+avx512vbmi2", "-avx512vbmi2")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_FEATURES": flags}
    run = subprocess.run([sys.executable, "-c", _WITHOUT_VBMI_PROBE], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rng = np.random.default_rng(5)
    w = QuantizedTensor("Q6_K", (13, 768), encode_tensor(rng.standard_normal((13, 768)).astype(np.float32) * 3, "Q6_K"))
    x = rng.standard_normal((6, 768)).astype(np.float32)
    here = fast.linear(x, w).tobytes().hex() + " " + fast.linear(x[:1], w).tobytes().hex()
    assert run.stdout == here


def test_the_vector_kernels_at_the_vector_width_this_cpu_does_not_pick(tmp_path):
    """Q8_0, the legacy types, Q4_K and bf16 pairs run in 16-lane vectors where the CPU has AVX-512 and in
    8-lane ones elsewhere (vector.WIDTH; bf16 in tiles of 4 tokens, else 2; the block types, Q4_K and Q6_K
    in tiles of 4 tokens, else one token a pass). The suite runs the host's width; this runs the other one
    (PHINANO_VECTOR_LANES, compiled afresh into an empty cache: LLVM splits 16 lanes into two 8-lane halves
    on an AVX2 CPU) against the same bounds."""
    other = 8 if vector.WIDTH == 16 else 16
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PHINANO_VECTOR_LANES": str(other)}
    run = subprocess.run([sys.executable, "-c", _OTHER_WIDTH_PROBE, os.path.dirname(__file__)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [str(other), str(4 if other == 16 else 2)]
