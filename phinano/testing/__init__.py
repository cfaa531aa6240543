"""A kit for testing your own kernel against phinano's reference ops.

    from phinano.testing import check_op
    check_op("attention", my_attention)          # same signature as phinano.kernels.reference.attention

`check_op` draws Phi-shaped inputs with Hypothesis (phinano.testing.strategies: grouped-query heads, head dims
64/96/128, sliding windows, longrope tables, partial rotary, bf16/fp16/fp32 weights, 1 to many tokens), runs the
candidate and the reference on each, and raises AssertionError naming the smallest input it found that breaks
the tolerance below. phinano's own Numba kernels are tested with it (tests/test_kernels.py);
docs/testing-kernels.md walks through an example. Needs hypothesis (pip install "phinano[testing]").

Tolerances, and why (float32 throughout; the candidate may sum in another order, fuse multiply-adds, and use
another exp):
- widen, embed, rope: exact. bf16 -> f32 puts the 16 bits in the high half of a word, f16 -> f32 is exact too;
  rope is the same few float32 operations per element in any order (no FMA: compile without fastmath).
- linear: |got - ref| <= 1e-5 * (|x| @ |w|.T + |b|) + 1e-30. Both sum K float32 products, in different orders;
  the rounding error of a float32 sum is bounded by about K * 2^-24 * sum|x_c w_c| in the worst case and is
  ~sqrt(K) * 2^-24 of it in practice, so the bound is stated against the row's |x|.|w| scale, not against |y|
  (which may cancel to ~0).
- rmsnorm: 1e-5 relative elementwise + 1e-6 of the row's largest output (row statistics summed in another
  order: ~1e-7 relative in the scale; the absolute term covers outputs that are denormal or zero).
- layernorm: 1e-5 relative + 1e-5 of the row's largest normalised value |out - b| (an ulp of the mean in every
  centred value).
- softmax: 1e-5 relative + 1e-7 absolute (exp differs by an ulp between libraries; the sum's order differs).
- swiglu: 1e-5 relative + 1e-30 absolute, and finite (silu of very negative gates is -0 or denormal in both).
- attention: max|v| * 1e-5 * (1 + B), B = max|q_h| * max|k_j| / sqrt(HD) bounding |score|. A float32 dot of HD
  terms errs by ~HD * 2^-24 * |q||k| (<= 1e-5 * B for HD <= 128), the softmax moves each probability by at most
  about the score error, and the output is a convex combination of value rows.
- attention_weights: 1e-5 * (1 + B) per probability, and exactly 0 wherever the reference is 0 (outside the
  causal window: a key that should be hidden must get no weight at all).
Every op must also return float32 of the reference's shape, with NaN exactly where the reference has NaN.
"""

from __future__ import annotations

import numpy as np

from ..kernels import reference
from . import strategies

__all__ = ["check_op", "compare", "strategies", "OPS"]

OPS = tuple(strategies.OPS)  # the ops check_op knows: every reference op but set_threads


def _widened(a) -> np.ndarray:
    return reference.widen(a).astype(np.float64)


def _attention_bound(q, k) -> float:
    HD = q.shape[-1]
    return float(np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max() / np.sqrt(HD))


def _tolerance(name: str, ref: np.ndarray, inputs: dict) -> np.ndarray | float:
    """The largest |got - ref| allowed, elementwise or one number (see the module docstring)."""
    a = np.abs(ref.astype(np.float64))
    if name in ("widen", "embed", "rope"):
        return 0.0
    if name == "linear":
        scale = np.abs(inputs["x"].astype(np.float64)) @ np.abs(_widened(inputs["w"])).T
        if inputs.get("b") is not None:
            scale = scale + np.abs(_widened(inputs["b"]))
        return 1e-5 * scale + 1e-30
    if name == "rmsnorm":
        return 1e-5 * a + 1e-6 * np.max(a, axis=-1, keepdims=True) + 1e-38
    if name == "layernorm":
        normalised = np.abs(ref.astype(np.float64) - _widened(inputs["b"])).max(axis=-1, keepdims=True)
        return 1e-5 * a + 1e-5 * normalised + 1e-38
    if name == "softmax":
        return 1e-5 * a + 1e-7
    if name == "swiglu":
        return 1e-5 * a + 1e-30
    if name == "attention":
        return float(np.abs(inputs["v"]).max()) * 1e-5 * (1.0 + _attention_bound(inputs["q"], inputs["k"]))
    if name == "attention_weights":
        return np.where(ref == 0, 0.0, 1e-5 * (1.0 + _attention_bound(inputs["q"], inputs["k"])))
    raise ValueError(f"no tolerance for op {name!r}")


def describe(inputs: dict) -> str:
    """'q (3, 4, 64) float32, start 5, window 2, ...': what a counter-example is, in one line."""
    parts = []
    for key, value in inputs.items():
        if isinstance(value, np.ndarray):
            kind = "bf16 bits" if value.dtype == np.uint16 else str(value.dtype)
            parts.append(f"{key} {tuple(value.shape)} {kind}")
        else:
            parts.append(f"{key} {value!r}")
    return ", ".join(parts)


def compare(name: str, got, inputs: dict) -> None:
    """Raise AssertionError unless `got` equals reference.<name>(**inputs) within the op's tolerance."""
    with np.errstate(all="ignore"):
        ref = getattr(reference, name)(**inputs)
    got = np.asarray(got)
    if got.shape != ref.shape or got.dtype != np.float32:
        raise AssertionError(f"{name} returned {got.dtype} {got.shape}, the reference float32 {ref.shape}; "
                             f"inputs: {describe(inputs)}")
    nan = np.isnan(ref)
    if not np.array_equal(np.isnan(got), nan):
        raise AssertionError(f"{name} has NaN where the reference has none (or the other way); "
                             f"inputs: {describe(inputs)}")
    err = np.where(nan, 0.0, np.abs(got.astype(np.float64) - ref.astype(np.float64)))
    tol = np.broadcast_to(_tolerance(name, ref, inputs), err.shape)
    bad = err > tol
    if np.any(bad) or (name == "swiglu" and not np.all(np.isfinite(got))):
        where = np.unravel_index(int(np.argmax(np.where(bad, err - tol, -np.inf))), err.shape) if err.ndim else ()
        raise AssertionError(
            f"{name} differs from the reference by {err[where]:.3g} at {tuple(int(i) for i in where)} "
            f"(tolerance there {tol[where]:.3g}; got {float(got[where]):.7g}, reference {float(ref[where]):.7g}); "
            f"{int(bad.sum())} of {err.size} values out; inputs: {describe(inputs)}")


def check_op(name: str, candidate, *, max_examples: int = 100, seed: int | None = None, **options) -> None:
    """Property-test `candidate` against phinano.kernels.reference.<name> on Hypothesis-drawn Phi-shaped inputs.

    candidate: a function taking the reference op's arguments in the same order (called positionally, so
    its parameter names may differ).
    max_examples: how many inputs to try (Hypothesis stops at the first failure, then shrinks it).
    seed: fix Hypothesis' random choices (None: a fresh run each time, as Hypothesis does).
    options: narrow the inputs (phinano.testing.strategies): dtypes=("f32",), head_dims=(96,), max_tokens=16.

    Raises AssertionError describing the smallest failing input found (its arrays are on the exception as
    `.inputs`, to rerun it by hand); returns None when every example passes.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this function's
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as fix_seed

    if name not in strategies.OPS:
        raise ValueError(f"check_op knows the ops {', '.join(OPS)}; got {name!r}")
    inputs_of = strategies.OPS[name](**options)  # checks the options now, not inside Hypothesis

    # quiet: our message describes the counter-example in one line (Hypothesis' own note would print its arrays)
    @settings(max_examples=max_examples, deadline=None, database=None, print_blob=False, verbosity=Verbosity.quiet,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(inputs=inputs_of)
    def agrees_with_reference(inputs):
        try:
            with np.errstate(all="ignore"):
                got = candidate(*inputs.values())  # positional, in the reference's order
        except Exception as e:  # the candidate crashed: that is a counter-example too
            error = AssertionError(f"{name} raised {type(e).__name__}: {e}; inputs: {describe(inputs)}")
            error.inputs = inputs
            raise error from e
        try:
            compare(name, got, inputs)
        except AssertionError as e:
            e.inputs = inputs
            raise

    if seed is not None:
        agrees_with_reference = fix_seed(seed)(agrees_with_reference)
    try:
        agrees_with_reference()
    except AssertionError as e:  # raised afresh: a traceback through Hypothesis and compare() says nothing more
        error = AssertionError(str(e))
        error.inputs = getattr(e, "inputs", None)
        raise error from e.__cause__  # a crash in the candidate keeps its own traceback
