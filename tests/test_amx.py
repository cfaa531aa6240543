"""kernels/amx.py: prefill products on AMX tiles with activations split into bf16 parts.

The split is plain compiled code and is checked everywhere: three parts add up to every finite float32
exactly, fewer parts round as stated, and the parts land where AMX's B tiles expect them. The products need
a CPU with AMX (Intel Xeon from Sapphire Rapids on); elsewhere those tests skip and say so. They are checked
against float64 with the bound a float32 sum of the same exact products obeys in any order: each of the
3K products of bf16 numbers is exact in float32, so only the additions round, |error| <= 2 (3K) u
sum_k |x_k w_k| (u = 2^-24; the factor 2 leaves room for the unit rounding a pair's sum before adding it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phinano.errors import PhinanoError
from phinano.kernels import amx, fast, reference

U = 2.0**-24
needs_amx = pytest.mark.skipif(not amx.available(), reason="this CPU has no AMX bf16 tiles (or PHINANO_AMX=0)")


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def parts_of(x: np.ndarray, parts: int) -> np.ndarray:
    """(P, T, K) float32: the parts of each activation, read back out of the B-tile layout."""
    xp = amx.split_parts(x, parts)  # (Mb, P, K / 2, 16, 2)
    Mb, P, half = xp.shape[:3]
    tokens = xp.transpose(1, 0, 3, 2, 4).reshape(P, 16 * Mb, 2 * half)  # (P, token, column)
    return widen(tokens)[:, : x.shape[0]]


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


NORMAL_PARTS = 2.0**-110  # from here on (and at 0) every part of x is a normal number


@settings(max_examples=200, deadline=None)
@given(st.lists(finite32.filter(lambda v: v == 0 or abs(v) >= NORMAL_PARTS), min_size=2, max_size=64)
       .filter(lambda v: len(v) % 2 == 0))
def test_three_parts_add_up_to_every_finite_float32_exactly(values):
    """Exact wherever the parts are normal numbers. Below 2^-110 the last part can fall under float32's
    normal range, where a bf16 keeps fewer bits (and the AMX unit flushes such parts to zero anyway)."""
    x = np.array(values, np.float32)[None, :]
    hi, mid, lo = parts_of(x, 3)[:, 0].astype(np.float64)
    np.testing.assert_array_equal(hi + mid + lo, x[0].astype(np.float64))
    assert np.all(np.abs(mid) <= np.abs(x[0]) * 2.0**-7) and np.all(np.abs(lo) <= np.abs(x[0]) * 2.0**-15)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite32.filter(lambda v: abs(v) < 3e38), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_fewer_parts_round_the_last_one_to_nearest_even(values):
    x = np.array(values, np.float32)[None, :]
    (one,) = parts_of(x, 1)[:, 0]
    np.testing.assert_array_equal(one, widen(bf16(x[0])))  # plain bf16 activations
    hi, lo = parts_of(x, 2)[:, 0]
    np.testing.assert_array_equal(hi, (x[0].view(np.uint32) & 0xFFFF0000).view(np.float32))  # truncated
    np.testing.assert_array_equal(lo, widen(bf16(x[0] - hi)))


def test_parts_of_inf_and_nan_stay_in_the_first_part():
    x = np.array([[np.inf, -np.inf, np.nan, 1.5]], np.float32)
    hi, mid, lo = parts_of(x, 3)[:, 0]
    assert np.isposinf(hi[0]) and np.isneginf(hi[1]) and np.isnan(hi[2]) and hi[3] == 1.5
    np.testing.assert_array_equal(mid, 0.0)
    np.testing.assert_array_equal(lo, 0.0)


def test_parts_sit_where_the_b_tiles_read_them():
    T, K = 37, 64  # 37 tokens: three blocks of 16 and a padded fourth (Mb even)
    x = (np.arange(T * K).reshape(T, K) % 251 + 1).astype(np.float32) / 8  # exact in bf16
    xp = amx.split_parts(x, 1)
    assert xp.shape == (4, 1, K // 2, 16, 2)
    for m, k in [(0, 0), (0, 1), (5, 2), (17, 63), (36, 33)]:
        assert widen(xp[m // 16, 0, k // 2, m % 16, k % 2]) == x[m, k]
    assert not xp[2, 0, :, 5:].any() and not xp[3].any()  # tokens 37 .. 63 are zeros


def float32_bound(x: np.ndarray, w: np.ndarray, parts: int) -> np.ndarray:
    """The largest error a float32 sum of the split products may have, plus what the parts drop."""
    K = x.shape[1]
    mags = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    dropped = {3: 0.0, 2: 2.0**-15, 1: 2.0**-8}[parts]
    return (2 * 3 * K * U + dropped) * mags + 1e-30


@needs_amx
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 70), n_tiles=st.integers(1, 5), k_tiles=st.integers(1, 6), parts=st.sampled_from([1, 2, 3]),
       scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e15]), seed=st.integers(0, 2**16))
def test_amx_products_meet_the_float32_bound(T, n_tiles, k_tiles, parts, scale, seed):
    rng = np.random.default_rng(seed)
    N, K = 32 * n_tiles, 32 * k_tiles
    w = bf16(rng.standard_normal((N, K)).astype(np.float32) * 0.05)
    x = (rng.standard_normal((T, K)) * scale).astype(np.float32)
    y = amx.matmul(x, w, parts)
    exact = x.astype(np.float64) @ widen(w).astype(np.float64).T
    assert np.all(np.abs(y - exact) <= float32_bound(x, widen(w), parts))


@needs_amx
def test_amx_blocks_and_token_chunks_cover_every_row_and_token(monkeypatch):
    """Row blocks of 32 (4 of them, the work items), column passes of 64 and token chunks of 48 (the last
    short) still give every entry, against the same product in one pass."""
    rng = np.random.default_rng(1)
    w = bf16(rng.standard_normal((128, 192)).astype(np.float32))
    x = rng.standard_normal((100, 192)).astype(np.float32)
    whole = amx.matmul(x, w)
    monkeypatch.setattr(amx, "ROW_BLOCK", 32)
    monkeypatch.setattr(amx, "K_BLOCK", 64)
    monkeypatch.setattr(amx, "WIDE_ROWS", 32)
    monkeypatch.setattr(amx, "TOKEN_CHUNK", 48)
    cut = amx.matmul(x, w)
    exact = x.astype(np.float64) @ widen(w).astype(np.float64).T
    bound = float32_bound(x, widen(w), 3)
    assert np.all(np.abs(cut - exact) <= bound) and np.all(np.abs(whole - exact) <= bound)


@needs_amx
def test_amx_spreads_inf_and_nan_like_a_float32_product():
    rng = np.random.default_rng(2)
    w = bf16(rng.standard_normal((64, 64)).astype(np.float32))
    w[5, 3] = 0  # inf * 0 is nan
    x = rng.standard_normal((20, 64)).astype(np.float32)
    x[4, 3], x[7, 10] = np.inf, np.nan
    y = amx.matmul(x, w)
    with np.errstate(invalid="ignore"):
        expected = x @ widen(w).T
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(expected))


@needs_amx
@pytest.mark.parametrize("N", [96, 100, 31])
def test_linear_sends_bf16_prefill_to_amx_and_the_last_rows_to_blas(N, monkeypatch):
    calls = []
    real = amx.matmul
    monkeypatch.setattr(amx, "matmul", lambda x, w, parts=None: calls.append(w.shape) or real(x, w, parts))
    rng = np.random.default_rng(3)
    w = bf16(rng.standard_normal((N, 64)).astype(np.float32))
    x = rng.standard_normal((fast.AMX_MIN_TOKENS + 3, 64)).astype(np.float32)
    y = fast.linear(x, w)
    assert calls == [(N, 64)]
    np.testing.assert_allclose(y, reference.linear(x, w), rtol=1e-5, atol=1e-5)
    calls.clear()
    fast.linear(x[: fast.AMX_MIN_TOKENS - 1], w)  # fewer tokens: the decode kernel
    fast.linear(x, rng.standard_normal((N, 64)).astype(np.float32))  # float32 weights: not bf16
    assert calls == []


def test_phinano_amx_0_turns_the_tiles_off(monkeypatch):
    monkeypatch.setattr(amx, "_available", None)
    monkeypatch.setenv("PHINANO_AMX", "0")
    assert not amx.available()
    with pytest.raises(RuntimeError, match="AMX"):
        amx.matmul(np.zeros((32, 32), np.float32), np.zeros((32, 32), np.uint16))


def test_parts_setting_is_checked(monkeypatch):
    monkeypatch.setattr(amx, "PARTS", 3)
    assert amx.set_parts(1) == 1 and amx.PARTS == 1
    with pytest.raises(PhinanoError, match="1, 2 or 3"):
        amx.set_parts(4)
    monkeypatch.setenv("PHINANO_AMX_PARTS", "x")
    with pytest.raises(PhinanoError, match="PHINANO_AMX_PARTS"):
        amx._parts_from_environment()
    monkeypatch.setattr(amx, "_available", None)
    monkeypatch.setenv("PHINANO_AMX", "yes")
    with pytest.raises(PhinanoError, match="PHINANO_AMX must be 0"):
        amx.available()


@pytest.mark.parametrize("name, value", [("PHINANO_AMX_PARTS", "5"), ("PHINANO_AMX", "on"),
                                         ("PHINANO_VECTOR_LANES", "32")])
def test_a_bad_kernel_switch_is_one_line_from_the_command(name, value, tmp_path):
    """The command turns a bad switch into one line naming it and exit status 1, not a traceback."""
    env = {**os.environ, name: value, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", "import sys; from phinano.cli import main; "
                          "sys.exit(main(['generate', 'def f(x): return x + 1 # a prompt of 16 tokens or more', "
                          "'--max-new-tokens', '1']))"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 1, run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1 and name in run.stderr
