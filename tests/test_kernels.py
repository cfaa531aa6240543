"""Every Numba kernel (kernels/fast.py) equals its NumPy reference (kernels/reference.py).

Hypothesis draws the shapes, dtypes, magnitudes and positions; NumPy draws the numbers from a seed that
Hypothesis also draws (so a failing example is reproducible and shrinks to small shapes, while the values
stay "random-looking" instead of shrinking to all-zero rows).

Tolerances, and why:
- widen, embed: exact. bf16 -> f32 puts the 16 bits in the high half of a word, f16 -> f32 is exact too.
- rope: exact. Same float32 operations in the same order, no fused multiply-add (the kernel is compiled
  without fastmath), so even the rounding is the same.
- linear: |fast - ref| <= 1e-5 * (|x| @ |w|.T) + 1e-30. Both sum K float32 products, in different orders
  (BLAS blocks vs 16-lane vector partial sums, with FMA); the rounding error of a float32 sum is bounded by
  about K * 2^-24 * sum|x_c w_c| in the worst case and is ~sqrt(K) * 2^-24 of it in practice, so the
  bound is stated against the row's |x|.|w| scale, not against |y| (which may cancel to ~0).
- rmsnorm, layernorm: 1e-5 relative elementwise + 1e-6 (layernorm: 1e-5) of the row's largest normalised
  output. The only difference is how the row statistics are summed (float64 here, float32 pairwise in
  NumPy): a relative error of ~1e-7 in the scale, and for layernorm an ulp of the mean in every centred
  value; the absolute term covers outputs that are denormal or zero and that centring error.
- softmax: 1e-5 relative + 1e-7 absolute. exp differs by an ulp between NumPy's SIMD exp and libm's expf,
  and the row sum is accumulated in another order.
- swiglu: 1e-5 relative + 1e-30 absolute (exp ulps; the absolute term covers silu of very negative gates,
  which is denormal or zero in both).
- attention: max|v| * 1e-5 * (1 + B) where B = max|q_h| * max|k_j| / sqrt(HD) bounds |score|. A float32 dot
  of HD terms has an error of ~HD * 2^-24 * |q||k| (<= 1e-5 * B for HD <= 128), the softmax moves each
  probability by at most the score error, and the output is a convex combination of value rows.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

import phinano.kernels as kernels  # noqa: E402
from phinano.kernels import fast, reference, runtime  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)
weight_dtypes = st.sampled_from(["bf16", "f16", "f32"])
# magnitudes: tiny, ordinary, large (large enough to matter, small enough that no float32 sum overflows)
scales = st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4, 1e12])


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def make_weight(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    if dtype == "bf16":
        return bf16_bits(values)
    if dtype == "f16":
        return np.clip(values, -6e4, 6e4).astype(np.float16)
    return values


def f32(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def activations(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    """`f32` with a few large negative outliers (about 5 % of the values times -1e3)."""
    x = f32(rng, shape, scale)
    x[rng.random(shape) < 0.05] *= -1e3
    return x


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


@SETTINGS
@given(seed=seeds, dtype=weight_dtypes, rows=st.integers(1, 9), cols=st.integers(1, 70))
def test_widen_is_exact(seed, dtype, rows, cols):
    w = make_weight(np.random.default_rng(seed), (rows, cols), dtype, 3.0)
    got = fast.widen(w)
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_array_equal(got, reference.widen(w))
    np.testing.assert_array_equal(fast.widen(w[:, 0]), reference.widen(w[:, 0]))  # strided 1-D


@SETTINGS
@given(seed=seeds, dtype=weight_dtypes, V=st.integers(1, 40), D=st.integers(1, 33), T=st.integers(1, 12))
def test_embed_is_exact(seed, dtype, V, D, T):
    rng = np.random.default_rng(seed)
    table = make_weight(rng, (V, D), dtype)
    ids = rng.integers(-V, V, T)  # negative ids index from the end, like NumPy
    got = fast.embed(table, ids)
    assert got.dtype == np.float32 and got.shape == (T, D)
    np.testing.assert_array_equal(got, reference.embed(table, ids))


def test_embed_rejects_out_of_range_ids():
    with pytest.raises(IndexError, match="token id 4 is out of range for an embedding table of 4 rows"):
        fast.embed(np.zeros((4, 3), np.uint16), np.array([0, 4]))
    with pytest.raises(IndexError, match="token id -5 "):
        fast.embed(np.zeros((4, 3), np.uint16), np.array([-5]))


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


@SETTINGS
@given(
    seed=seeds,
    dtype=weight_dtypes,
    T=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9]),
    N=st.integers(1, 37),
    K=st.integers(1, 300),
    xs=scales,
    ws=st.sampled_from([1e-3, 0.02, 1.0, 1e3]),
    bias=st.booleans(),
)
def test_linear_fused_path(seed, dtype, T, N, K, xs, ws, bias):
    """Few tokens: the fused kernel (4 rows x 4 tokens blocks, leftover tokens, leftover rows)."""
    rng = np.random.default_rng(seed)
    assume(T < fast.BLAS_MIN_TOKENS)
    x = activations(rng, (T, K), xs)
    w = make_weight(rng, (N, K), dtype, ws)
    b = make_weight(rng, (N,), dtype) if bias else None
    assert_linear_close(x, w, b)


@settings(max_examples=6, deadline=None)
@given(seed=seeds, dtype=weight_dtypes, extra=st.integers(0, 21), N=st.integers(1, 70), K=st.integers(1, 200))
def test_linear_blas_path(seed, dtype, extra, N, K):
    """Many tokens: widened weight tiles and BLAS."""
    rng = np.random.default_rng(seed)
    T = fast.BLAS_MIN_TOKENS + extra
    x = f32(rng, (T, K))
    w = make_weight(rng, (N, K), dtype, 0.05)
    assert_linear_close(x, w, make_weight(rng, (N,), dtype))


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


# --------------------------------------------------------------------------------------------- norms, softmax


def assert_rowwise_close(got, ref, rtol, row_atol):
    assert got.dtype == np.float32 and got.shape == ref.shape
    atol = row_atol * np.max(np.abs(ref), axis=-1, keepdims=True)
    assert np.all(np.abs(got - ref) <= rtol * np.abs(ref) + atol + 1e-38), f"max diff {np.max(np.abs(got - ref)):.3g}"


@SETTINGS
@given(seed=seeds, dtype=weight_dtypes, T=st.integers(1, 6), D=st.integers(1, 130), xs=scales, eps=st.sampled_from([1e-5, 1e-6]))
def test_rmsnorm(seed, dtype, T, D, xs, eps):
    rng = np.random.default_rng(seed)
    x = f32(rng, (T, D), xs)
    w = make_weight(rng, (D,), dtype)
    assert_rowwise_close(fast.rmsnorm(x, w, eps), reference.rmsnorm(x, w, eps), 1e-5, 1e-6)


@SETTINGS
@given(seed=seeds, dtype=weight_dtypes, T=st.integers(1, 6), D=st.integers(2, 130), xs=scales, offset=st.sampled_from([0.0, 1.0, -3.0]))
def test_layernorm(seed, dtype, T, D, xs, offset):
    rng = np.random.default_rng(seed)
    x = f32(rng, (T, D), xs) + np.float32(offset * xs)
    w = make_weight(rng, (D,), dtype)
    b = make_weight(rng, (D,), dtype, 0.1)
    ref = reference.layernorm(x, w, b, 1e-5)
    got = fast.layernorm(x, w, b, 1e-5)
    assert got.dtype == np.float32 and got.shape == ref.shape
    # relative to each output (adding b rounds to an ulp of |out|, possibly fused into one FMA here) plus
    # 1e-5 of the row's largest normalised value (the part that depends on the mean and variance)
    normalised = np.abs(ref - reference.widen(b)).max(axis=-1, keepdims=True)
    assert np.all(np.abs(got - ref) <= 1e-5 * np.abs(ref) + 1e-5 * normalised + 1e-38)


@SETTINGS
@given(seed=seeds, lead=st.sampled_from([(1,), (3,), (2, 3)]), N=st.integers(1, 200), xs=st.sampled_from([1e-3, 1.0, 30.0, 1e3]))
def test_softmax(seed, lead, N, xs):
    rng = np.random.default_rng(seed)
    x = f32(rng, lead + (N,), xs)
    ref = reference.softmax(x)
    got = fast.softmax(x)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ rope, swiglu


@SETTINGS
@given(
    seed=seeds,
    T=st.integers(1, 7),
    NH=st.integers(1, 5),
    HD_R=st.sampled_from([(64, 64), (96, 96), (128, 128), (128, 96), (96, 32), (6, 4)]),
    xs=scales,
)
def test_rope_is_exact(seed, T, NH, HD_R, xs):
    HD, R = HD_R
    rng = np.random.default_rng(seed)
    x = f32(rng, (T, NH, HD), xs)
    angles = rng.uniform(-100, 100, (T, R // 2)).astype(np.float32)
    cos = np.cos(np.concatenate([angles, angles], -1)) * np.float32(1.19)
    sin = np.sin(np.concatenate([angles, angles], -1)) * np.float32(1.19)
    np.testing.assert_array_equal(fast.rope(x, cos, sin), reference.rope(x, cos, sin))


@SETTINGS
@given(seed=seeds, T=st.integers(1, 5), F=st.integers(1, 150), gs=st.sampled_from([1e-3, 1.0, 10.0, 100.0, 1e4]), us=st.sampled_from([1e-3, 1.0, 1e4]))
def test_swiglu(seed, T, F, gs, us):
    rng = np.random.default_rng(seed)
    gate = f32(rng, (T, F), gs)  # gs >= 100: exp(-gate) overflows to inf for the most negative gates
    gate.flat[:: 7] = -gate.flat[:: 7] - np.float32(89.0)  # some just past expf's overflow threshold (~88.7)
    up = f32(rng, (T, F), us)
    with np.errstate(over="ignore"):
        ref = reference.swiglu(gate, up)
    got = fast.swiglu(gate, up)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-30)
    assert np.all(np.isfinite(got))


# --------------------------------------------------------------------------------------------------- attention


def assert_attention_close(q, k, v, start, window):
    ref = reference.attention(q, k, v, start, window)
    got = fast.attention(q, k, v, start, window)
    assert got.dtype == np.float32 and got.shape == ref.shape
    HD = q.shape[-1]
    bound = np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max() / np.sqrt(HD)
    tol = np.abs(v).max() * 1e-5 * (1.0 + bound)
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= tol, f"attention differs by {err:.3g} > {tol:.3g}"


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    HD=st.sampled_from([64, 96, 128]),
    KVH=st.integers(1, 3),
    ratio=st.sampled_from([1, 3, 4]),
    start=st.integers(0, 40),
    T=st.sampled_from([1, 1, 2, 3, 4, 5, 7, 8, 9, 16]),  # < 4: compiled kernel, >= 4: BLAS path
    window_kind=st.sampled_from(["none", "one", "S", "S-1", "two", "random", "huge"]),
    qs=st.sampled_from([0.1, 1.0, 3.0, 30.0]),
)
def test_attention(seed, HD, KVH, ratio, start, T, window_kind, qs):
    rng = np.random.default_rng(seed)
    H = KVH * ratio
    S = start + T  # cache lengths 1 .. 48
    window = {
        "none": None,
        "one": 1,
        "two": 2,
        "S": S,
        "S-1": max(1, S - 1),
        "random": int(rng.integers(1, S + 1)),
        "huge": 262144,
    }[window_kind]
    q = f32(rng, (T, H, HD), qs)
    k = f32(rng, (S, KVH, HD), qs)
    v = f32(rng, (S, KVH, HD), 10.0)
    v[rng.random(v.shape) < 0.01] = -1e4  # a few large negative values
    assert_attention_close(q, k, v, start, window)


@pytest.mark.parametrize("path", ["compiled", "blas"])
def test_attention_many_queries_and_views_of_a_larger_cache(path, monkeypatch):
    """Many queries through each path (compiled: KV-head blocks and zig-zag query order; BLAS: several
    query chunks), with k, v views of a preallocated cache and q a non-contiguous slice."""
    if path == "compiled":
        monkeypatch.setattr(fast, "ATTENTION_BLAS_MIN_QUERIES", 10**9)
    else:
        monkeypatch.setattr(fast, "_ATTENTION_CHUNK_BYTES", 4 * 3 * 60 * 10)  # chunks of 10 queries
    rng = np.random.default_rng(6)
    T, H, KVH, HD = 37, 12, 4, 64
    cache_k = f32(rng, (100, KVH, HD))
    cache_v = f32(rng, (100, KVH, HD))
    start = 11
    S = start + T
    q = f32(rng, (T, H, HD))
    for window in (None, 1, 7, S - 1, S):
        assert_attention_close(q, cache_k[:S], cache_v[:S], start, window)
    q_view = f32(rng, (T, H * HD * 3))[:, : H * HD].reshape(T, H, HD)  # a non-contiguous slice of a qkv output
    assert_attention_close(q_view, cache_k[:S], cache_v[:S], start, 5)


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


def test_run_puts_small_work_on_the_calling_thread_and_restores_the_thread_count():
    before = runtime.threads()
    seen = []
    runtime.run(lambda: seen.append(runtime.threads()), runtime.PARALLEL_MIN_WORK - 1)
    runtime.run(lambda: seen.append(runtime.threads()), runtime.PARALLEL_MIN_WORK)
    assert seen == [1, before] and runtime.threads() == before

    def fails():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        runtime.run(fails, 1)
    assert runtime.threads() == before


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
