"""Every Numba kernel (kernels/fast.py) equals its NumPy reference (kernels/reference.py).

The property tests are phinano's kernel-testing kit run on phinano's own kernels: `phinano.testing.check_op`
draws Phi-shaped inputs with Hypothesis (its strategies: shapes, dtypes, magnitudes, positions, windows and a
seed from which NumPy draws the values, so a failure shrinks to small shapes while the values stay
random-looking) and holds each op to the tolerance argued in phinano/testing/__init__.py: exact for widen,
embed and rope; float32 summation-order bounds for the rest. The tests below the kit's cover what it does not
draw: unaligned read-only memory maps, thread counts, NaN rows, the BLAS path's tiling.
"""

from __future__ import annotations

import inspect

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

import phinano.kernels as kernels  # noqa: E402
from phinano.kernels import fast, lanes, reference, runtime  # noqa: E402
from phinano.testing import check_op, compare  # noqa: E402
from phinano.testing.strategies import make_weight  # noqa: E402


def f32(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def activations(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    """`f32` with a few large negative outliers (about 5 % of the values times -1e3)."""
    x = f32(rng, shape, scale)
    x[rng.random(shape) < 0.05] *= -1e3
    return x


# Examples per op: enough to cross every path of the fast kernel (fused / BLAS linear, compiled / BLAS attention)
# in a few seconds; a nightly run may raise them.
EXAMPLES = {"widen": 25, "embed": 25, "linear": 30, "rmsnorm": 25, "layernorm": 25, "rope": 25, "softmax": 25,
            "swiglu": 25, "attention": 40, "attention_weights": 25}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_fast_kernel_agrees_with_the_reference(name):
    check_op(name, getattr(fast, name), max_examples=EXAMPLES[name])


def test_fast_linear_on_the_blas_path():
    """Many tokens only: widened weight tiles and BLAS (the draws above reach it only sometimes)."""
    check_op("linear", fast.linear, max_examples=6, min_tokens=fast.BLAS_MIN_TOKENS, max_tokens=fast.BLAS_MIN_TOKENS + 21)


def test_backend_switch_returns_the_numba_kernels():
    assert kernels.backend("numba") is fast
    assert kernels.backend("numpy") is reference
    with pytest.raises(ValueError):
        kernels.backend("cuda")


def public_functions(module) -> set[str]:
    """Names of the functions a kernel module defines without a leading underscore."""
    defined = {n: f for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__}
    return {n for n in defined if not n.startswith("_")}


def test_both_backends_export_the_same_ops_with_the_same_signatures():
    assert sorted(fast.__all__) == sorted(reference.__all__)
    for module in (fast, reference):
        assert public_functions(module) <= set(module.__all__), f"{module.__name__} defines ops missing from __all__"
    for name in reference.__all__:
        ours, theirs = inspect.signature(getattr(fast, name)), inspect.signature(getattr(reference, name))
        assert ours == theirs, f"{name}: fast{ours} != reference{theirs}"


# ------------------------------------------------------------------------------------------------- widen, embed




def test_embed_rejects_out_of_range_ids():
    with pytest.raises(IndexError, match="token id 4 is out of range for an embedding table of 4 rows"):
        fast.embed(np.zeros((4, 3), np.uint16), np.array([0, 4]))
    with pytest.raises(IndexError, match="token id -5 "):
        fast.embed(np.zeros((4, 3), np.uint16), np.array([-5]))


def test_rope_takes_tables_in_every_form_it_documents():
    """The step's own (T, R) float32 tables go to the kernel as they are; a (1, R) row, float64 tables and a
    strided view are made (T, R) float32 first. Every form gives the bits of the (T, R) float32 one."""
    rng = np.random.default_rng(4)
    T, R = 3, 64
    x = rng.standard_normal((T, 4, 96)).astype(np.float32)
    angles = rng.uniform(0, 6, (T, R // 2))
    cos = np.concatenate([np.cos(angles)] * 2, axis=1).astype(np.float32)  # (T, R)
    sin = np.concatenate([np.sin(angles)] * 2, axis=1).astype(np.float32)
    want = fast.rope(x, cos, sin)
    assert np.array_equal(want, reference.rope(x, cos, sin))
    wide_cos, wide_sin = np.repeat(cos, 2, axis=1), np.repeat(sin, 2, axis=1)  # every other column: strided
    for c, s in ((cos.astype(np.float64), sin.astype(np.float64)), (wide_cos[:, ::2], wide_sin[:, ::2])):
        assert np.array_equal(fast.rope(x, c, s), want)
    row = fast.rope(x, cos[:1], sin[:1])  # one row for every token
    assert np.array_equal(row, reference.rope(x, np.repeat(cos[:1], T, 0), np.repeat(sin[:1], T, 0)))


# ------------------------------------------------------------------------------------------------------ linear


def assert_linear_within(x, w, b, magnitudes: np.ndarray, rel: float) -> None:
    """fast.linear(x, w, b) equals reference.linear within rel * (|x| @ magnitudes.T + |b|) + 1e-30, elementwise.
    magnitudes (N, K): the size of what the kernels add up for each weight; |w| for arrays, wider for the
    quantized types whose kernels split a weight into terms that may cancel (their test files argue it)."""
    ref = reference.linear(x, w, b)
    got = fast.linear(x, w, b)
    assert got.dtype == np.float32 and got.shape == ref.shape
    scale = np.abs(x.astype(np.float64)) @ np.asarray(magnitudes, np.float64).T
    if b is not None:
        scale = scale + np.abs(reference.widen(b).astype(np.float64))
    err = np.abs(got.astype(np.float64) - ref)
    worst = np.max(err - rel * scale) if err.size else 0.0
    kind = w.qtype if hasattr(w, "qtype") else w.dtype
    assert worst <= 1e-30, f"{kind} linear differs by {err.max():.3g} (scale {scale.max():.3g})"


def assert_linear_close(x, w, b=None):
    """The bound of the module docstring: 1e-5 of |x| @ |w|.T."""
    assert_linear_within(x, w, b, np.abs(reference.widen(w).astype(np.float64)), 1e-5)


@pytest.mark.parametrize("K", [37, 38])
@pytest.mark.parametrize("T", range(1, 10))
def test_fused_tiles_write_only_their_tokens(T, K):
    """The few-token kernels. K = 37: `_matmul_fused` (bf16 read one by one): tiles of 4 tokens, a tile for 3
    tokens left (its last token computed twice), one-token passes for 1 or 2 left. K = 38: `_bf16_matmul`
    (bf16 read in pairs): tiles of vector.BF16_TOKENS tokens, a smaller tile for those left. Every token's
    row agrees with the reference, and a guard row after the T rows of y is never written."""
    rng = np.random.default_rng(T)
    w = make_weight(rng, (11, K), "bf16")  # one part (fast.PART_ROWS): streams of 2 rows, 3 rows left over
    rows, kernels = fast._reader(w)
    assert kernels.matmul is (fast._bf16_matmul if K % 2 == 0 else fast._matmul_fused)
    x = f32(rng, (T, K))
    out = np.full((T + 1, 11), 7.0, np.float32)
    kernels.matmul(x, rows, out[:T])
    exact = x.astype(np.float64) @ reference.widen(w).astype(np.float64).T
    np.testing.assert_allclose(out[:T], exact, rtol=0, atol=1e-5 * (np.abs(x) @ np.abs(reference.widen(w)).T).max())
    assert (out[T] == 7.0).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 15), N=st.integers(1, 80), pairs=st.integers(1, 70),
       step=st.sampled_from([1, 2]))
def test_bf16_tokens_are_each_summed_as_alone(seed, T, N, pairs, step):
    """`_bf16_matmul` sums each token by the same instructions whatever the tile it falls in (vector.py, "bf16
    pairs"): every row of a few-token product is bit for bit that token alone, for any K / 2 (the pairs left
    after the vectors go through the scalar tail), rows contiguous or every other one, and within the bound
    of the reference."""
    rng = np.random.default_rng(seed)
    K = 2 * pairs
    w = make_weight(rng, (N * step, K), "bf16")[::step]  # every other row: a row stride of 2 K bytes
    rows, kernels = fast._reader(w)
    assert kernels.matmul is fast._bf16_matmul
    x = f32(rng, (T, K))
    y = np.empty((T, N), np.float32)
    fast._bf16_matmul(x, rows, y)
    one = np.empty((1, N), np.float32)
    for t in range(T):
        fast._bf16_matmul(x[t : t + 1], rows, one)
        assert np.array_equal(y[t], one[0]), f"token {t} of {T}"
    exact = x.astype(np.float64) @ reference.widen(w).astype(np.float64).T
    np.testing.assert_allclose(y, exact, rtol=0, atol=1e-5 * (np.abs(x) @ np.abs(reference.widen(w)).T).max())


@pytest.mark.parametrize("N", [1, 3, 4, 63, 64, 65, 127, 128, 3 * 64 + 7, 3072])
def test_row_groups_read_each_part_as_four_streams(N):
    """`fast._row_groups`: every row in exactly one group (a repeated row only within its own group, the
    leftovers' last); the parts follow each other in order, each a run of about PART_ROWS rows read as four
    streams: step j of a part [a, b) reads a + j, a + q + j, a + 2q + j, a + 3q + j, q = (b - a) // 4."""
    groups = fast._row_groups(N)
    assert groups.shape[1] == 4 and groups.dtype == np.int64
    firsts = [sorted(set(g.tolist())) for g in groups]
    rows = [r for g in firsts for r in g]
    assert sorted(rows) == list(range(N))  # each row once
    parts = max(1, N // fast.PART_ROWS)
    g = 0
    for p in range(parts):
        a, b = N * p // parts, N * (p + 1) // parts
        q = (b - a) // 4
        for j in range(q):
            assert groups[g].tolist() == [a + j, a + q + j, a + 2 * q + j, a + 3 * q + j]
            g += 1
        if (b - a) % 4:
            assert firsts[g] == list(range(a + 4 * q, b)) and groups[g, 3] == b - 1
            g += 1
    assert g == len(groups)


@pytest.mark.parametrize("dtype,K", [("bf16", 38), ("bf16", 37), ("f16", 40)])
def test_every_decode_row_is_summed_alike_wherever_it_falls(dtype, K):
    """The decode kernels read a matrix in parts of about fast.PART_ROWS rows, each as four streams of
    rows, with the rows left over in a part through the same four-row loop. So a row's sum cannot depend on
    where the row falls: each row of a matrix of several parts (with rows left over) equals, bit for bit,
    that row multiplied alone, and the result is the same with 1 thread as with all."""
    rng = np.random.default_rng(K)
    N = 3 * fast.PART_ROWS + 7
    w = make_weight(rng, (N, K), dtype)
    x = f32(rng, (1, K))
    y = fast.linear(x, w)
    for r in range(N):
        assert np.array_equal(y[:, r], fast.linear(x, w[r : r + 1])[:, 0]), f"row {r}"
    n = fast.set_threads()
    try:
        fast.set_threads(1)
        assert np.array_equal(fast.linear(x, w), y)
    finally:
        fast.set_threads(n)
    assert_linear_close(x, w)


def test_bf16_pairs_read_unaligned_and_strided_rows(tmp_path):
    """The pair view (uint32) of a bf16 matrix at an odd byte offset gives the aligned matrix's results, bit for
    bit; every other row of a matrix (not contiguous) is read right too; and widened pairs are exact."""
    rng = np.random.default_rng(6)
    w = make_weight(rng, (10, 34), "bf16")
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" + w.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")[1:].view(np.uint16).reshape(w.shape)
    assert fast._reader(mm)[1] is fast._reader(w)[1] and not mm.flags.aligned
    for T in (1, 3, fast.BLAS_MIN_TOKENS):
        x = f32(rng, (T, 34))
        np.testing.assert_array_equal(fast.linear(x, mm), fast.linear(x, w))
        assert_linear_close(x, mm)
    every_other = np.concatenate([w, w])[::2]  # rows 2 apart: strides (136, 2), compiled for any layout
    columns = np.concatenate([w, w[:, :1]], axis=1)[:, :34]  # rows of 35 weights cut to 34: every other row odd
    for m in (every_other, columns):
        assert fast._reader(m)[1] is fast._reader(w)[1]
        for T in (1, 5):
            assert_linear_close(f32(rng, (T, 34)), m)
    np.testing.assert_array_equal(fast.widen(w), fast.embed(w, np.arange(10)))


def test_linear_blas_path_spans_several_tiles(monkeypatch):
    monkeypatch.setattr(fast, "_TILE_ELEMENTS", 64 * 16)  # tiles of 64 rows of K = 16
    rng = np.random.default_rng(1)
    x = f32(rng, (fast.BLAS_MIN_TOKENS + 3, 16))
    w = make_weight(rng, (150, 16), "bf16")
    assert_linear_close(x, w)


def test_linear_vector_and_batched_inputs_keep_numpy_shapes():
    rng = np.random.default_rng(2)
    w = make_weight(rng, (6, 10), "bf16")
    x = f32(rng, (10,))
    assert fast.linear(x, w).shape == (6,)
    assert_linear_close(x[None], w)
    x3 = f32(rng, (2, 3, 10))
    np.testing.assert_allclose(fast.linear(x3, w), reference.linear(x3, w), rtol=1e-5, atol=1e-5)


def unaligned_readonly_copy(w: np.ndarray) -> np.ndarray:
    """The same values in a read-only view at an odd byte offset of a uint8 buffer (like a memmap)."""
    raw = np.zeros(w.nbytes + 1, np.uint8)
    view = raw[1:].view(w.dtype).reshape(w.shape)
    view[...] = w
    view.flags.writeable = False
    assert not view.flags.aligned and not view.flags.writeable
    return view


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_linear_reads_unaligned_readonly_weights_and_writes_nothing(dtype, T):
    rng = np.random.default_rng(3)
    w = unaligned_readonly_copy(make_weight(rng, (13, 21), dtype))
    b = unaligned_readonly_copy(make_weight(rng, (13,), dtype))
    x = f32(rng, (T, 21))
    x.flags.writeable = False
    before = (x.copy(), np.array(w), np.array(b))
    assert_linear_close(x, w, b)
    for old, new in zip(before, (x, w, b)):
        np.testing.assert_array_equal(old, new)


def test_linear_on_a_real_readonly_memmap_at_an_odd_offset(tmp_path):
    rng = np.random.default_rng(4)
    w = make_weight(rng, (9, 33), "bf16")
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" + w.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")[1:].view(np.uint16).reshape(w.shape)
    assert not mm.flags.writeable
    x = f32(rng, (2, 33))
    assert_linear_close(x, mm)
    np.testing.assert_array_equal(fast.linear(x, mm), fast.linear(x, w))


def test_linear_does_not_widen_the_whole_matrix_on_decode(monkeypatch):
    """bf16 stays bf16: the decode path never calls widen() on the weight matrix."""
    calls = []
    real_widen = fast.widen
    monkeypatch.setattr(fast, "widen", lambda a: calls.append(a.shape) or real_widen(a))
    rng = np.random.default_rng(5)
    w = make_weight(rng, (40, 24), "bf16")
    fast.linear(f32(rng, (1, 24)), w, make_weight(rng, (40,), "bf16"))
    assert calls == [(40,)]  # the bias only


# --------------------------------------------------------------------------------------------------- attention


def assert_attention_close(q, k, v, start, window):
    """The kit's comparison (phinano.testing.compare: the attention tolerance) on one given input."""
    compare("attention", fast.attention(q, k, v, start, window), dict(q=q, k=k, v=v, start=start, window=window))



@pytest.mark.parametrize("path", ["compiled", "blas", "blas-query-chunks"])
def test_attention_many_queries_and_views_of_a_larger_cache(path, monkeypatch):
    """Many queries through each path (compiled: the keys cut into blocks at fixed positions, every query of
    the call over each block, and keys and values read in chunks of `_KEY_CHUNK` keys, windows starting
    inside a chunk; BLAS: several query chunks, cut by the score block's bytes or by ATTENTION_QUERY_CHUNK,
    each chunk's products stopping at its last query's key), with k, v views of a preallocated cache and q
    a non-contiguous slice."""
    if path == "compiled":
        monkeypatch.setattr(fast, "ATTENTION_BLAS_MIN_ROWS", 10**9)
    elif path == "blas":
        monkeypatch.setattr(fast, "_ATTENTION_CHUNK_BYTES", 4 * 3 * 60 * 10)  # chunks of 10 queries
    else:
        monkeypatch.setattr(fast, "ATTENTION_QUERY_CHUNK", 8)  # chunks of 8 queries, the last one of 5
    rng = np.random.default_rng(6)
    T, H, KVH, HD = 37, 12, 4, 64
    cache_k = f32(rng, (100, KVH, HD))
    cache_v = f32(rng, (100, KVH, HD))
    start = 11
    S = start + T
    assert S > 2 * fast._KEY_CHUNK + 1  # whole chunks and a partial one
    q = f32(rng, (T, H, HD))
    for window in (None, 1, 7, S - 1, S):
        assert_attention_close(q, cache_k[:S], cache_v[:S], start, window)
    q_view = f32(rng, (T, H * HD * 3))[:, : H * HD].reshape(T, H, HD)  # a non-contiguous slice of a qkv output
    assert_attention_close(q_view, cache_k[:S], cache_v[:S], start, 5)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # the same patches each time
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(2, 5), S=st.integers(5, 700), block=st.sampled_from([3, 64, 256]),
       window=st.sampled_from([None, 1, 4, 100]))
def test_decode_attention_gives_each_query_what_it_gives_alone(seed, T, S, block, window, monkeypatch):
    """The blocks of keys sit at fixed positions, so a query's sums do not depend on the other queries of its
    call: each row of a few-query call is bit for bit that query's call alone (over the cache as it stood
    for it). That makes a speculative step's attention the single steps' (docs/speculation.md)."""
    monkeypatch.setattr(fast, "ATTENTION_KEY_BLOCK", block)
    monkeypatch.setattr(fast, "ATTENTION_BLAS_MIN_ROWS", 10**9)  # the compiled kernel, whatever T
    rng = np.random.default_rng(seed)
    H, KVH, HD = 6, 2, 32
    start = S - T
    q, k, v = f32(rng, (T, H, HD)), f32(rng, (S, KVH, HD)), f32(rng, (S, KVH, HD))
    together = fast.attention(q, k, v, start, window)
    for t in range(T):
        alone = fast.attention(q[t : t + 1], k[: start + t + 1], v[: start + t + 1], start + t, window)
        assert np.array_equal(together[t], alone[0]), f"query {t} of {T}"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 4), S=st.integers(1, 900), block=st.sampled_from([3, 64, 256]),
       window=st.sampled_from([0, 1, 5, 300]), kv_heads=st.sampled_from([1, 2, 3]), threads=st.integers(2, 5))
def test_decode_attention_cut_by_heads_gives_the_bits_of_the_cut_by_keys(seed, T, S, block, window, kv_heads, threads):
    """With few blocks of keys the threads take runs of KV heads instead (`HEAD_RUNS_ABOVE`). Each head's sums
    are the same instructions either way, so the result is too, bit for bit: a call told of 1 thread always
    cuts by keys, one told of 2-5 threads cuts short caches by heads (the work items still run on the
    threads there are)."""
    rng = np.random.default_rng(seed)
    H, HD = 2 * kv_heads, 16
    start = max(0, S - T)
    q, k, v = f32(rng, (T, H, HD)), f32(rng, (S, kv_heads, HD)), f32(rng, (S, kv_heads, HD))
    by_keys, by_heads = np.empty_like(q), np.empty_like(q)
    with np.errstate(invalid="ignore"):
        fast._attention_parts(q, k, v, start, window, block, 1, by_keys)
        fast._attention_parts(q, k, v, start, window, block, threads, by_heads)
    assert np.array_equal(by_keys, by_heads, equal_nan=True)


@pytest.mark.parametrize("block", [1, 2, 3, 7, 256])
def test_decode_attention_merges_any_split_of_the_keys(block, monkeypatch):
    """The compiled decode kernel cuts the visible keys into blocks at fixed positions and merges the blocks'
    softmaxes. Any block size gives the reference: blocks of one key, windows that start or end inside a
    block, queries of one call that see different keys, and queries that see none (nan), also far past the
    cache's end (a block over keys that do not exist would not fit in memory there)."""
    monkeypatch.setattr(fast, "ATTENTION_KEY_BLOCK", block)
    monkeypatch.setattr(fast, "ATTENTION_BLAS_MIN_ROWS", 10**9)  # the compiled kernel, whatever T
    rng = np.random.default_rng(9)
    H, KVH, HD = 6, 2, 32
    for S, T, start in ((1, 1, 0), (2, 1, 1), (5, 3, 2), (40, 3, 37), (40, 2, 41), (3, 4, 10**9)):
        q, k, v = f32(rng, (T, H, HD)), f32(rng, (S, KVH, HD)), f32(rng, (S, KVH, HD))
        for window in (None, 1, 2, 5, S):
            with np.errstate(invalid="ignore"):
                ref = reference.attention(q, k, v, start, window)
            got = fast.attention(q, k, v, start, window)
            blind = np.isnan(ref).all(axis=(1, 2))  # queries that see no key
            assert np.isnan(got[blind]).all()
            np.testing.assert_allclose(got[~blind], ref[~blind], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("HD", [2, 8, 16, 18, 40, 50, 112, 144])
def test_decode_attention_any_head_dim(HD, monkeypatch):
    """The compiled kernel's explicit vector loops (lanes.py) take a head in pieces of 16 numbers, up to 4
    pieces at once, and the last HD % 16 numbers one by one: every split of a head (no piece, 1-3 pieces
    left over after groups of 4, a scalar tail) against the reference, over several chunks of keys."""
    monkeypatch.setattr(fast, "ATTENTION_BLAS_MIN_ROWS", 10**9)
    rng = np.random.default_rng(HD)
    T, H, KVH, S = 2, 6, 3, 3 * fast._KEY_CHUNK + 5
    q, k, v = f32(rng, (T, H, HD)), f32(rng, (S, KVH, HD)), f32(rng, (S, KVH, HD))
    for window in (None, 7):
        ref = reference.attention(q, k, v, S - T, window)
        np.testing.assert_allclose(fast.attention(q, k, v, S - T, window), ref, rtol=1e-5, atol=1e-6)


@numba.njit
def _row_dot(q, t, h, k, j, kvh):
    return lanes.row_dot(q, t, h, k, j, kvh)


@numba.njit
def _weighted_rows_into(acc, t, h, w, a, v, j1, j2, kvh):
    lanes.weighted_rows_into(acc, t, h, w, a, v, j1, j2, kvh)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), HD=st.integers(1, 150), keys=st.integers(0, 20),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_lane_loops_equal_numpy(seed, HD, keys, scale):
    """The twins of the decode attention kernel's two inner loops: a score q[t, h] . k[j, kvh] and a run of
    value rows summed into acc[t, h] by their weights, against NumPy in float64 (float32 summation-order
    bounds), for any head size, run of keys (none included) and magnitude; what lies outside the row
    written stays as it was."""
    rng = np.random.default_rng(seed)
    T, H, S, KVH = 2, 3, keys + 3, 2
    q, k = f32(rng, (T, H, HD), scale), f32(rng, (S, KVH, HD), scale)
    want = q[1, 2].astype(np.float64) @ k[S - 1, 1].astype(np.float64)
    bound = 2 * HD * np.finfo(np.float32).eps * (np.abs(q[1, 2].astype(np.float64)) @ np.abs(k[S - 1, 1]))
    assert abs(float(_row_dot(q, 1, 2, k, S - 1, 1)) - want) <= bound + 1e-45
    acc, w, v = f32(rng, (T, H, HD)), f32(rng, (T, H, keys + 1)), f32(rng, (S, KVH, HD), scale)
    before = acc.copy()
    j1, a = 2, 1  # keys 2 .. 2 + keys - 1, their weights w[1, 0, j - a]
    _weighted_rows_into(acc, 1, 0, w, a, v, j1, j1 + keys, 1)
    terms = w[1, 0, j1 - a : j1 - a + keys, None].astype(np.float64) * v[j1 : j1 + keys, 1]  # (keys, HD)
    want = before[1, 0] + terms.sum(axis=0)
    bound = (keys + 1) * np.finfo(np.float32).eps * (np.abs(before[1, 0]) + np.abs(terms).sum(axis=0))
    assert np.all(np.abs(acc[1, 0] - want) <= bound + 1e-45)
    untouched = np.ones(acc.shape, bool)
    untouched[1, 0] = False
    assert np.array_equal(acc[untouched], before[untouched])


@pytest.mark.filterwarnings("error")  # and says nothing about it (the BLAS path runs on worker threads)
@pytest.mark.parametrize("T", [1, 9])
def test_attention_without_visible_keys_matches_the_reference_nan(T):
    q = np.ones((T, 2, 64), np.float32)
    k = np.ones((T, 1, 64), np.float32)
    with np.errstate(invalid="ignore"):
        ref = reference.attention(q, k, k, 0, 0)
    assert np.isnan(ref).all() and np.isnan(fast.attention(q, k, k, 0, 0)).all()


@pytest.mark.parametrize("T", [2, 9])  # the compiled kernel, the BLAS path
def test_attention_rows_that_see_no_key_are_nan_like_the_reference(T):
    """A cache shorter than the query positions: with window 2, queries 4.. see none of the 3 keys, while
    the earlier queries of the same call (and of the same BLAS chunk) do."""
    rng = np.random.default_rng(8)
    start = 3 if T == 2 else 0
    q, k, v = f32(rng, (T, 2, 64)), f32(rng, (3, 1, 64)), f32(rng, (3, 1, 64))
    with np.errstate(invalid="ignore"):
        ref = reference.attention(q, k, v, start, 2)
    got = fast.attention(q, k, v, start, 2)
    blind = np.arange(start, start + T) >= 4
    assert np.isnan(ref[blind]).all() and np.isnan(got[blind]).all()
    np.testing.assert_allclose(got[~blind], ref[~blind], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
def test_blas_path_tiles_that_grow_with_the_tokens(kind, monkeypatch):
    """Tiles of about TILE_ROWS_PER_TOKEN rows per token, at least 64: each thread's rows cut into several
    tiles, the last one short, give the reference."""
    tiled = []
    real = fast._matmul_blas

    def spy(x, rows, widen_rows):
        def counting(r, out):
            tiled.append(r.shape[0])
            widen_rows(r, out)
        return real(x, rows, counting)

    monkeypatch.setattr(fast, "_matmul_blas", spy)
    rng = np.random.default_rng(11)
    T = fast.BLAS_MIN_TOKENS
    N = 4 * fast.TILE_ROWS_PER_TOKEN * T + 37  # each of 1 or 2 parts: 2 or more tiles
    w = make_weight(rng, (N, 24), kind)
    assert_linear_close(f32(rng, (T, 24)), w)
    if kind != "f32":  # float32 rows go to BLAS as they are, unwidened
        assert max(tiled) == fast.TILE_ROWS_PER_TOKEN * T and len(tiled) >= 3 and sum(tiled) == N

def test_set_threads():
    import numba

    most = numba.config.NUMBA_NUM_THREADS
    try:
        assert fast.set_threads(1) == 1
        rng = np.random.default_rng(7)
        w = make_weight(rng, (130, 40), "bf16")
        assert_linear_close(f32(rng, (1, 40)), w)
        assert_linear_close(f32(rng, (fast.BLAS_MIN_TOKENS, 40)), w)  # BLAS path in one part
        q, k = f32(rng, (9, 4, 64)), f32(rng, (12, 2, 64))
        assert_attention_close(q, k, k, 3, None)
    finally:
        assert fast.set_threads() == most


def test_reference_set_threads_without_threadpoolctl_only_returns_the_count(monkeypatch):
    import os
    import sys

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # "not installed": importing it raises ImportError
    cores = os.cpu_count()
    assert reference.set_threads() == cores
    assert reference.set_threads(1) == 1
    assert reference.set_threads(0) == 1
    assert reference.set_threads(cores + 5) == cores


def test_reference_set_threads_limits_blas_through_threadpoolctl(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("threadpoolctl")
    fake.threadpool_limits = lambda limits, user_api: calls.append((limits, user_api))
    monkeypatch.setitem(sys.modules, "threadpoolctl", fake)
    assert reference.set_threads(1) == 1
    assert calls == [(1, "blas")]


# ----------------------------------------------------------------------------------------------------- runtime


@numba.njit(parallel=True, cache=True)
def _which_threads(out):
    """out[i] = the id of the pool thread that ran iteration i (0: the calling thread)."""
    for i in numba.prange(out.shape[0]):
        out[i] = numba.get_thread_id()


def test_run_puts_small_work_on_a_serial_twin_and_large_work_on_the_threads():
    before = runtime.threads()
    small, large = np.full(64, -1), np.full(64, -1)
    runtime.run(_which_threads, runtime.PARALLEL_MIN_WORK - 1, small)
    runtime.run(_which_threads, runtime.PARALLEL_MIN_WORK, large)
    assert set(small) == {0}  # every iteration on the calling thread
    assert set(large) == set(range(before)) if before > 1 else {0}
    assert runtime.threads() == before
    twin = runtime.serial_twin(_which_threads)  # what run() made and keeps for it
    assert not twin.targetoptions.get("parallel") and twin.py_func.__qualname__ == "_which_threads_serial"
    assert runtime.serial_twin(twin) is twin  # a serial kernel is its own twin

    @numba.njit(parallel=True)
    def fails(x):
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        runtime.run(fails, 1, small)
    assert runtime.threads() == before


def _every_op_on_small_inputs(rng):
    """(name, thunk) for each op whose kernel `runtime.run` may give to the serial twin: products of every
    stored weight type over 1, 3 and 5 tokens and batched rows, norms, rotary, activations, attention."""
    from phinano.formats.gguf_write import encode_tensor
    from phinano.formats.quantized import QuantizedTensor

    def x(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    weights = [make_weight(rng, (37, 512), dtype) for dtype in ("bf16", "float16", "float32")]
    weights += [QuantizedTensor(q, (37, 512), encode_tensor(x(37, 512), q))
                for q in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")]
    ops = []
    for w in weights:
        name = getattr(w, "qtype", None) or str(w.dtype)
        for T in (1, 3, 5):
            xs = x(T, 512)
            ops += [(f"linear {name} T={T}", lambda w=w, xs=xs: fast.linear(xs, w)),
                    (f"linear_rows {name} B={T}", lambda w=w, xs=xs: fast.linear_rows(xs, w))]
        ops.append((f"widen {name}", lambda w=w: fast.widen(w)))
    h, g = x(3, 3072), x(3, 2 * 4096)
    ops += [("rmsnorm", lambda: fast.rmsnorm(h, h[0], 1e-5)),
            ("layernorm", lambda: fast.layernorm(h, h[0], h[1], 1e-5)),
            ("rope", lambda: fast.rope(h.reshape(3, 32, 96), h[:, :96], h[:, 96:192])),
            ("softmax", lambda: fast.softmax(h)),
            ("swiglu", lambda: fast.swiglu(g[:, :4096], g[:, 4096:])),
            ("gegelu", lambda: fast.gegelu(g, 7.0)),
            ("gelu", lambda: fast.gelu(h)),
            ("quick_gelu", lambda: fast.quick_gelu(h))]
    for S, T in ((5, 1), (300, 3), (700, 1)):
        q, k, v = x(T, 32, 96), x(S, 8, 96), x(S, 8, 96)
        ops.append((f"attention S={S} T={T}", lambda q=q, k=k, v=v, S=S, T=T: fast.attention(q, k, v, S - T, None)))
    q, k, v = x(2, 8, 64), x(70, 2, 64), x(70, 2, 64)
    ops.append(("blocksparse_attention", lambda: fast.blocksparse_attention(q, k, v, 68, 16, 2, 2, 1)))
    return ops


def test_small_work_on_the_serial_twins_gives_bit_for_bit_what_the_threads_give(monkeypatch):
    """`runtime.run` hands small work to a kernel's serial twin (the same source compiled without threads).
    Batched rows, short speculative steps and the single steps they must equal fall on either side of the
    switch, so the two compiled forms must round alike: every op here, all on the threads, then all on
    the twins."""
    ops = _every_op_on_small_inputs(np.random.default_rng(11))
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 0)  # everything on the parallel kernels
    threaded = [op() for _, op in ops]
    monkeypatch.setattr(runtime, "PARALLEL_MIN_WORK", 1 << 62)  # everything on the twins
    for (name, op), want in zip(ops, threaded):
        got = op()
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), name


@pytest.mark.parametrize("thread_local_blas", [True, False])  # False: OpenBLAS without the thread-local setting
def test_in_parts_runs_every_part_once_and_propagates_errors(thread_local_blas, monkeypatch):
    if not thread_local_blas:
        monkeypatch.setattr(runtime, "_blas_set_local_threads", None)
    parts = min(5, runtime.threads())
    calls = []
    runtime.in_parts(lambda i, n: calls.append((i, n)), 5)
    assert sorted(calls) == [(i, parts) for i in range(parts)]

    def last_part_fails(i, n):
        if i == n - 1:
            raise ValueError("part failed")

    with pytest.raises(ValueError, match="part failed"):
        runtime.in_parts(last_part_fails, 5)
