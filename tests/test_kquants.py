"""K-quants (Q4_K, Q5_K, Q6_K): the layouts unpack bit for bit as the `gguf` package does, and the Numba kernels
multiply packed weights as the NumPy reference does.

Blocks are random bytes (any 6-bit scales and minimums, nibbles, fifth and sixth bits, int8 scales); only the
float16 fields d and dmin are drawn by kind (typical, subnormal, tiny, huge, mixed; never inf or nan, which no
real file holds and which would make every comparison nan), so the kernels meet everything a GGUF file can hold.

Tolerances, and why:
- dequantize, widen, embed: exact. Every product in d * sc * q - dmin * m (Q4_K, Q5_K) and d * sc * (q - 32)
  (Q6_K) is exact in float32 (at most 11 + 7 + 5 = 23 significant bits, and float16's range, subnormals
  included, lies inside float32's normal range), so only Q4_K/Q5_K's final subtraction rounds, once, in
  GGML, in the `gguf` package and in both kernels alike.
- linear: |fast - ref| <= 2e-5 * (|x| @ M.T) + 1e-30, with M = |d * sc * q| + |dmin * m| per weight (Q6_K:
  M = |w|). The fused Q4_K/Q5_K kernel (kernels/vector.py) sums x * q per sub-block of 32 in 8 lanes of 4,
  scales each lane by d * sc (exact) into the row's accumulator, adds dmin * m[j] * (sum of x over
  sub-block j, 32 terms) to lane j, over K / 256 super-blocks, and adds the 8 lanes at the end: at most
  32 + 2 + 9 * 4 + 3 = 73 roundings on any path for K <= 1024, so its error is at most 73 * 2^-24 = 4.4e-6
  of the sum of the magnitudes of everything it adds, which is |x| @ M.T, not |x| @ |w|.T: d * sc * q and
  dmin * m may nearly cancel in w. (The same bound holds for Q6_K, where M = |w|: x . (q - 32) in lanes of
  2 per sub-block of 16, scaled by d * sc, 16 sub-blocks per super-block: at most 2 + 1 + 16 * 4 + 3 = 70
  roundings.) The reference rounds w once (2^-24 |w| <= 2^-24 M) and lets BLAS sum K <= 1024 products in at most K / 8 + 8
  steps per lane: 136 * 2^-24 = 8.1e-6. Together under 1.3e-5, so 2e-5 holds in the worst case; a wrong
  scale, nibble or bit is off by a whole weight, about 1e-2 of M or more. The BLAS path (many tokens) unpacks
  tiles exactly, so it differs from the reference only in how BLAS groups the sums.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phinano.errors import PhinanoError
from phinano.formats.quantized import LAYOUTS, QuantizedTensor, dequantize

gguf = pytest.importorskip("gguf")
pytest.importorskip("numba")

from phinano.kernels import fast, reference  # noqa: E402
from phinano.kernels.quantized import KERNELS  # noqa: E402
from test_kernels import activations, assert_linear_within, f32  # noqa: E402
from test_quantized import SETTINGS, random_f16, scale_kinds, seeds  # noqa: E402

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
k_types = st.sampled_from(K_TYPES)
# where the float16 fields of a block are: (d, dmin) for Q4_K/Q5_K, d alone for Q6_K
F16_AT = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
BLAS = max(KERNELS[q].blas_min_tokens for q in K_TYPES)


def random_kquant(rng: np.random.Generator, qtype: str, N: int, K: int, d_kind: str, dmin_kind: str = "typical") -> QuantizedTensor:
    """N x K weights of a K-quant type from random block bytes, with d (and dmin) float16s of the given kinds."""
    layout = LAYOUTS[qtype]
    blocks = rng.integers(0, 256, (N * K // 256, layout.block_bytes), dtype=np.uint8)
    for at, kind in zip(F16_AT[qtype], (d_kind, dmin_kind)):
        blocks[:, at : at + 2] = random_f16(rng, len(blocks), kind)
    return QuantizedTensor(qtype, (N, K), blocks.reshape(N, K // 256 * layout.block_bytes))


def magnitudes(w: QuantizedTensor) -> np.ndarray:
    """(N, K) |d * sc * q| + |dmin * m| (Q6_K: |w|): the size of what a kernel adds up for each weight. Made with
    `dequantize` itself: with dmin set to 0 a block gives d * sc * q, with d set to 0 it gives -dmin * m."""
    if w.qtype == "Q6_K":
        return np.abs(dequantize(w))
    parts = []
    for zeroed in F16_AT[w.qtype]:
        blocks = w.data.reshape(-1, w.layout.block_bytes).copy()
        blocks[:, zeroed : zeroed + 2] = 0
        parts.append(np.abs(dequantize(QuantizedTensor(w.qtype, w.shape, blocks.reshape(w.data.shape)))))
    return parts[0] + parts[1]


def assert_linear_close(x: np.ndarray, w: QuantizedTensor, b: np.ndarray | None = None) -> None:
    """The bound of the module docstring: 2e-5 of |x| @ M.T."""
    assert_linear_within(x, w, b, magnitudes(w), 2e-5)


# ------------------------------------------------------------------------------------------ the layouts


@pytest.mark.parametrize("qtype", K_TYPES)
def test_layout_sizes_are_ggmls(qtype):
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    layout = LAYOUTS[qtype]
    assert (layout.block, layout.block_bytes) == (block, block_bytes)
    assert qtype in KERNELS


def test_the_formats_floor_registers_k_quants_without_the_kernels():
    """Importing phinano.formats is enough to read K-quant tensors, and it pulls in no kernel (nor Numba)."""
    code = (
        "import sys\n"
        "from phinano.formats.quantized import LAYOUTS\n"
        "assert {'Q4_K', 'Q5_K', 'Q6_K'} <= set(LAYOUTS), sorted(LAYOUTS)\n"
        "assert not [m for m in sys.modules if m.startswith(('numba', 'phinano.kernels'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_rows_must_be_whole_super_blocks(qtype):
    with pytest.raises(PhinanoError, match="multiple of 256"):
        QuantizedTensor(qtype, (2, 128), np.zeros((2, LAYOUTS[qtype].block_bytes), np.uint8))


@SETTINGS
@given(seed=seeds, qtype=k_types, N=st.integers(1, 9), blocks=st.integers(1, 4), d_kind=scale_kinds, dmin_kind=scale_kinds)
def test_dequantize_equals_gguf_bit_for_bit(seed, qtype, N, blocks, d_kind, dmin_kind):
    w = random_kquant(np.random.default_rng(seed), qtype, N, 256 * blocks, d_kind, dmin_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        theirs = gguf.quants.dequantize(w.data, gguf.GGMLQuantizationType[qtype])
    ours = dequantize(w)
    assert ours.dtype == np.float32 and ours.shape == w.shape
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # bit patterns, -0.0 included


def test_dequantize_reads_the_documented_fields():
    """One hand-made Q4_K block: sub-block 5 takes its scale and minimum from the split 6-bit fields."""
    block = np.zeros(144, np.uint8)
    block[0:2] = np.array([0.5], "<f2").view(np.uint8)  # d
    block[2:4] = np.array([0.25], "<f2").view(np.uint8)  # dmin
    block[4 + 1] = 0b10_000000  # bits 4-5 of sc[5] = 2 -> sc[5] = 32 + low nibble
    block[4 + 5] = 0b01_000000  # bits 4-5 of m[5] = 1 -> m[5] = 16 + high nibble
    block[4 + 9] = 0x3_7  # low nibble of sc[5] = 7, of m[5] = 3
    block[16 + 64 + 7] = 0xA0  # group 2, byte 7: high nibble 10 = weight 64 * 2 + 32 + 7 (sub-block 5)
    w = dequantize(QuantizedTensor("Q4_K", (1, 256), block[None]))[0]
    assert w[32 * 5 + 7] == 0.5 * (32 + 7) * 10 - 0.25 * (16 + 3)
    assert w[32 * 5] == -0.25 * (16 + 3)  # q = 0 in the same sub-block: only the minimum
    assert w[0] == 0.0  # sub-block 0: sc = m = 0


# --------------------------------------------------------------------------- the kernels: fast == reference


@SETTINGS
@given(
    seed=seeds,
    qtype=k_types,
    T=st.sampled_from([1, 2, 3, 4, 5, 8, BLAS - 1, BLAS, BLAS + 13, 40]),  # fused, then BLAS
    N=st.integers(1, 37),  # any row count: the kernels work on blocks of rows
    blocks=st.integers(1, 4),  # K = 256 .. 1024
    d_kind=scale_kinds,
    dmin_kind=scale_kinds,
    xs=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4]),
    bias=st.booleans(),
)
def test_linear_on_k_quant_weights(seed, qtype, T, N, blocks, d_kind, dmin_kind, xs, bias):
    rng = np.random.default_rng(seed)
    K = 256 * blocks
    w = random_kquant(rng, qtype, N, K, d_kind, dmin_kind)
    assert_linear_close(activations(rng, (T, K), xs), w, f32(rng, (N,)) if bias else None)


@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("N", [1, 2, 3, 5, 6, 7])  # fewer rows than a block, and every remainder
def test_linear_decodes_odd_row_counts(qtype, N):
    rng = np.random.default_rng(N)
    assert_linear_close(f32(rng, (1, 512)), random_kquant(rng, qtype, N, 512, "typical"))


def test_byte_lane_order_is_each_run_of_32_read_as_8_by_4_and_transposed():
    """The order the Q5_K and Q6_K loops take x in (kernels/vector.py): x[4l + p] at 8p + l in every run of 32."""
    from phinano.kernels.kquants import _in_byte_lane_order

    x = np.arange(3 * 256, dtype=np.float32).reshape(3, 256)
    want = x.reshape(3, 8, 8, 4).transpose(0, 1, 3, 2).reshape(3, 256)
    np.testing.assert_array_equal(_in_byte_lane_order(x), want)
    assert _in_byte_lane_order(x)[0, 8 * 3 + 5] == x[0, 4 * 5 + 3]  # lane 5, byte 3


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", *K_TYPES])
def test_decode_rows_are_bit_for_bit_each_row_alone(qtype):
    """Batched decode (Model.step_batch) keeps every sequence's tokens because the fused kernel sums each
    token of a call exactly as it sums a token alone: the first token of a call runs the loop with the
    prefetches, the others without, and both must add in the same order (x permuted the same way too)."""
    from test_quantized import random_legacy, random_q8_0

    rng = np.random.default_rng(7)
    K, N = 768, 21
    if qtype in K_TYPES:
        w = random_kquant(rng, qtype, N, K, "typical")
    elif qtype == "Q8_0":
        w = random_q8_0(rng, N, K, "typical")
    else:
        w = random_legacy(rng, qtype, N, K, "typical", "typical")
    matmul = KERNELS[qtype].matmul
    x = activations(rng, (KERNELS[qtype].blas_min_tokens - 1, K), 1.0)
    together = np.empty((len(x), N), np.float32)
    matmul(x, w.data, together)
    for t in range(len(x)):
        alone = np.empty((1, N), np.float32)
        matmul(x[t : t + 1], w.data, alone)
        np.testing.assert_array_equal(together[t].view(np.uint32), alone[0].view(np.uint32))


@pytest.mark.parametrize("qtype", K_TYPES)
def test_linear_blas_path_spans_several_tiles(qtype, monkeypatch):
    monkeypatch.setattr(fast, "_TILE_ELEMENTS", 64 * 256)  # tiles of 64 rows of K = 256
    rng = np.random.default_rng(1)
    assert_linear_close(f32(rng, (KERNELS[qtype].blas_min_tokens + 3, 256)), random_kquant(rng, qtype, 150, 256, "typical"))


@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("T", [1, 5, BLAS])
def test_linear_reads_readonly_data_and_writes_nothing(qtype, T):
    rng = np.random.default_rng(2)
    w = random_kquant(rng, qtype, 13, 512, "typical")
    before = w.data.copy()
    w.data.flags.writeable = False  # as in a memory-mapped GGUF file
    assert_linear_close(f32(rng, (T, 512)), w)
    np.testing.assert_array_equal(w.data, before)


@SETTINGS
@given(seed=seeds, qtype=k_types, V=st.integers(1, 40), blocks=st.integers(1, 3), T=st.integers(1, 12), kind=scale_kinds)
def test_embed_and_widen_are_exact(seed, qtype, V, blocks, T, kind):
    rng = np.random.default_rng(seed)
    table = random_kquant(rng, qtype, V, 256 * blocks, kind, kind)
    ids = rng.integers(-V, V, T)  # negative ids index from the end, like NumPy
    got = fast.embed(table, ids)
    assert got.dtype == np.float32 and got.shape == (T, 256 * blocks)
    np.testing.assert_array_equal(got.view(np.uint32), reference.embed(table, ids).view(np.uint32))
    np.testing.assert_array_equal(fast.widen(table).view(np.uint32), reference.widen(table).view(np.uint32))
