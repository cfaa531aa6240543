"""phinano.testing.check_op catches a wrong kernel with a small counter-example and passes a right one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("hypothesis")

from phinano.kernels import reference  # noqa: E402
from phinano.testing import check_op, strategies  # noqa: E402


def window_one_too_wide(q, k, v, start, window):
    """The classic off-by-one: a query sees `window + 1` keys."""
    return reference.attention(q, k, v, start, None if window is None else window + 1)


def test_a_window_one_key_too_wide_is_caught_and_shrunk():
    with pytest.raises(AssertionError, match=r"attention differs from the reference by .*inputs: q \(") as caught:
        check_op("attention", window_one_too_wide, max_examples=200, seed=0)
    inputs = caught.value.inputs  # the shrunk counter-example, to rerun by hand
    assert inputs["window"] is not None and inputs["window"] < inputs["k"].shape[0]  # a window that cuts
    assert inputs["q"].shape[0] <= 3  # shrunk to a few tokens
    got = window_one_too_wide(**inputs)
    assert not np.allclose(got, reference.attention(**inputs))


def attention_with_float32_noise(q, k, v, start, window):
    """A right kernel computed another way: per KV head, scores in one matmul, exp'd without max shift when safe,
    the probabilities nudged by a float32 ulp or so."""
    rng = np.random.default_rng(0)
    probs = reference.attention_weights(q, k, start, window)  # (H, T, S)
    probs = probs * (1 + rng.uniform(-2e-7, 2e-7, probs.shape)).astype(np.float32)
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)  # (S, H, HD)
    return np.matmul(probs, v.transpose(1, 0, 2)).transpose(1, 0, 2).astype(np.float32)  # (T, H, HD)


def test_a_right_kernel_with_float32_noise_passes():
    check_op("attention", attention_with_float32_noise, max_examples=60, seed=1)
    check_op("rmsnorm", lambda x, w, eps: (x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + eps)
                                           * reference.widen(w)).astype(np.float32), max_examples=40, seed=2)


@pytest.mark.parametrize("name", sorted(strategies.OPS))
def test_the_reference_passes_its_own_check(name):
    check_op(name, getattr(reference, name), max_examples=5, seed=3)


def test_a_kernel_that_leaks_weight_outside_the_window_is_caught_in_attention_weights():
    def leaky(q, k, start, window):
        probs = reference.attention_weights(q, k, start, window)
        return np.where(probs == 0, np.float32(1e-30), probs).astype(np.float32)

    with pytest.raises(AssertionError, match="attention_weights differs"):
        check_op("attention_weights", leaky, max_examples=50, seed=4)


def test_wrong_dtype_shape_and_crashes_are_counter_examples_too():
    with pytest.raises(AssertionError, match=r"rope returned float64 \("):
        check_op("rope", lambda x, cos, sin: reference.rope(x, cos, sin).astype(np.float64), max_examples=5, seed=5)
    with pytest.raises(AssertionError, match="swiglu raised ZeroDivisionError: division by zero; inputs: gate "):
        check_op("swiglu", lambda gate, up: 1 / 0 if gate.size else None, max_examples=5, seed=6)
    with pytest.raises(AssertionError, match="linear differs"):  # drops the bias
        check_op("linear", lambda x, w, b: reference.linear(x, w), max_examples=50, seed=7)


def test_options_narrow_the_inputs_and_bad_ones_are_refused():
    seen = []

    def spy(x, cos, sin):
        seen.append((x.shape, cos.shape))
        return reference.rope(x, cos, sin)

    check_op("rope", spy, max_examples=10, seed=8, head_dims=(96,), max_tokens=3)
    assert seen and all(x[2] == 96 and 1 <= x[0] <= 3 and c[1] in (96, 72, 32) for x, c in seen)
    with pytest.raises(ValueError, match="check_op knows the ops"):
        check_op("set_threads", reference.set_threads)
    with pytest.raises(ValueError, match="dtypes must be some of"):
        check_op("linear", reference.linear, dtypes=("int8",))
    with pytest.raises(TypeError):
        check_op("linear", reference.linear, colour="red")


def test_without_hypothesis_the_import_error_says_what_to_install():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "try:\n    import phinano.testing\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'phinano.testing needs hypothesis: pip install "phinano[testing]" (or pip install hypothesis)'


@pytest.mark.parametrize("name", sorted(strategies.OPS))
def test_each_strategy_draws_the_reference_ops_arguments_in_order(name):
    import inspect

    from hypothesis import given, settings

    @settings(max_examples=3, deadline=None, database=None)
    @given(inputs=strategies.OPS[name]())
    def in_order(inputs):
        assert list(inputs) == list(inspect.signature(getattr(reference, name)).parameters)

    in_order()


def test_a_candidate_with_other_parameter_names_is_called_positionally():
    check_op("swiglu", lambda g, u: reference.swiglu(g, u), max_examples=5, seed=9)
