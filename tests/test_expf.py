"""kernels/expf.py: the float32 e^x that the compiled softmax, SwiGLU, GEGELU and quick-GELU loops use in
place of the C library's expf, so that they vectorise. Checked against e^x in float64: within 2 units in
the last place where e^x is a normal float32 (0.99 at most over a dense grid when this was written), within
one step below that, and nan, inf and 0 where np.exp gives them."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from phinano.kernels.expf import exp32

TINY = np.finfo(np.float32).tiny  # the smallest normal float32
STEP = np.float32(2.0**-149)  # the smallest subnormal, the spacing of the subnormals


@njit
def exp_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp32(x[i])
    return out


def assert_close_to_exp(x: np.ndarray) -> None:
    got = exp_all(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        exact32 = exact.astype(np.float32)
    normal = np.isfinite(exact32) & (exact32 >= TINY)
    ulps = np.abs(got[normal] - exact[normal]) / np.spacing(exact32[normal]).astype(np.float64)
    assert ulps.max(initial=0) <= 2.0, x[normal][np.argmax(ulps)]
    low = ~normal & np.isfinite(exact32)  # subnormal or zero results
    assert np.all(np.abs(got[low] - exact[low]) <= STEP), x[low][np.argmax(np.abs(got[low] - exact[low]))]
    assert np.all(np.isposinf(got[np.isposinf(exact32)]))


def test_exp32_on_a_dense_grid_of_the_whole_range():
    assert_close_to_exp(np.linspace(-106.0, 90.0, 2_000_001, dtype=np.float32))
    assert_close_to_exp(np.linspace(-1.0, 1.0, 200_001, dtype=np.float32))  # small r, k = 0 and +-1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-110.0, 95.0, width=32), min_size=1, max_size=64))
def test_exp32_on_any_float32(values):
    assert_close_to_exp(np.array(values, np.float32))


def test_exp32_edges_are_those_of_np_exp():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72, 88.73, -87.33, -103.97, -103.98, -200.0, 200.0,
                  1e-30, -1e-30, 2.0**-149], np.float32)
    got = exp_all(x)
    with np.errstate(over="ignore"):
        ref = np.exp(x)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:5], [np.inf, 0.0, 1.0, 1.0])
    assert np.isposinf(got[6]) and np.isposinf(ref[6]) and np.isfinite(got[5])
    assert got[9] == 0.0 and got[10] == 0.0 and np.isposinf(got[11])
    assert got[8] == ref[8] == STEP  # the one subnormal e^-103.97 rounds to
    np.testing.assert_array_equal(got[12:], [1.0, 1.0, 1.0])
