"""Sampling: each filter keeps exactly the tokens its definition allows; seeds make draws reproducible."""

from __future__ import annotations

import numpy as np

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import phinano
from phinano.sampling import min_p_filter, repetition_penalty, sample, top_k_filter, top_p_filter

logit_rows = arrays(np.float64, st.integers(1, 40), elements=st.floats(-20, 20, allow_nan=False))


def probs_of(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@settings(max_examples=300, deadline=None)
@given(logit_rows, st.integers(1, 50))
def test_top_k_keeps_the_k_largest_and_their_ties(x, k):
    kept = np.isfinite(top_k_filter(x, k))
    kth = np.sort(x)[::-1][min(k, x.size) - 1]
    np.testing.assert_array_equal(kept, x >= kth)
    assert kept.sum() >= min(k, x.size)


@settings(max_examples=300, deadline=None)
@given(logit_rows, st.floats(0.01, 0.99))
def test_top_p_keeps_a_token_while_the_tokens_above_it_have_not_reached_p(x, p):
    """Token kept <=> the probability mass ranked strictly above it (stable order) is < p."""
    probs = probs_of(x)
    order = np.argsort(x, kind="stable")[::-1]  # descending, ties: later index first, as the filter sorts
    above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    assume(np.all(np.abs(above - p) > 1e-9) and np.all(np.abs(np.cumsum(probs[order]) - (1 - p)) > 1e-9))
    kept = np.isfinite(top_p_filter(x, p))
    expected = np.zeros(x.size, bool)
    expected[order] = above < p
    expected[order[0]] = True  # the most likely token always survives
    np.testing.assert_array_equal(kept, expected)


@settings(max_examples=300, deadline=None)
@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_at_least_min_p_times_the_top(x, min_p):
    probs = probs_of(x)
    assume(np.all(np.abs(probs - min_p * probs.max()) > 1e-12))
    kept = np.isfinite(min_p_filter(x, min_p))
    np.testing.assert_array_equal(kept, probs >= min_p * probs.max())
    assert kept[np.argmax(x)]


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.integers(0, 2**32 - 1), st.floats(0.1, 2.0), st.integers(1, 10), st.floats(0.05, 1.0))
def test_draws_only_allowed_tokens_and_seed_reproduces(x, seed, temperature, k, p):
    x = x.astype(np.float32)
    a = sample(x, np.random.default_rng(seed), temperature, top_k=k, top_p=p)
    b = sample(x, np.random.default_rng(seed), temperature, top_k=k, top_p=p)
    assert a == b
    allowed = np.isfinite(top_p_filter(top_k_filter(x.astype(np.float64) / temperature, k), p))
    assert allowed[a]


def test_greedy_is_first_argmax():
    assert sample(np.array([1.0, 3.0, 3.0], np.float32), np.random.default_rng(0)) == 1


def test_repetition_penalty_transformers_rule():
    x = np.array([2.0, -2.0, 1.0], np.float32)
    np.testing.assert_allclose(repetition_penalty(x, [0, 1, 1], 2.0), [1.0, -4.0, 1.0])


def test_sampling_distribution_follows_probabilities():
    x = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    rng = np.random.default_rng(0)
    counts = np.bincount([sample(x, rng, 1.0) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_seeded_generation_is_reproducible(checkpoint_dir):
    model = phinano.load(checkpoint_dir("medium"), backend="numpy")
    ids = [5, 9, 33, 101, 7]
    opts = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1, stop_token_ids=[])
    a = model.generate(ids, 24, seed=1234, **opts)
    assert a == model.generate(ids, 24, seed=1234, **opts)
    assert a != model.generate(ids, 24, seed=4321, **opts)
    assert a != model.generate(ids, 24, stop_token_ids=[])  # not greedy


def test_stop_token_ids(checkpoint_dir):
    model = phinano.load(checkpoint_dir("medium"), backend="numpy")
    ids = [5, 9, 33, 101, 7]
    free = model.generate(ids, 20, stop_token_ids=[])
    stop = free[5]
    out = model.generate(ids, 20, stop_token_ids=[stop])
    assert out == free[: free.index(stop) + 1]
    assert model.stop_token_ids == (2, 5)  # from generation_config.json
