"""From one row of logits to one token id.

The order is Transformers' (so seeded behaviour is easy to reason about and greedy parity is exact):
    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw.
Greedy (temperature 0) is the argmax after the repetition penalty, first index on ties.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def repetition_penalty(logits: np.ndarray, seen: Iterable[int], penalty: float) -> np.ndarray:
    """Transformers' rule for every token already in the sequence (prompt included):
    a positive logit is divided by `penalty`, a negative one multiplied. logits (V,) -> (V,)."""
    if penalty == 1.0:
        return logits
    ids = np.fromiter(set(seen), dtype=np.int64)
    out = logits.copy()
    picked = out[ids]
    out[ids] = np.where(picked < 0, picked * np.float32(penalty), picked / np.float32(penalty))
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (and any tied with the k-th); the rest become -inf."""
    k = min(k, logits.size)
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the most likely tokens whose cumulative probability reaches p (at least one).

    Transformers' formulation: sort ascending, drop the tokens whose ascending cumulative probability is
    <= 1 - p, always keep the most likely token."""
    order = np.argsort(logits, kind="stable")  # ascending
    probs = _softmax(logits[order])
    cumulative = np.cumsum(probs)
    drop = cumulative <= 1.0 - p
    drop[-1] = False
    out = logits.copy()
    out[order[drop]] = -np.inf
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    probs = _softmax(logits)
    return np.where(probs < min_p * probs.max(), -np.inf, logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None) -> int:
    """Pick the next token from logits (V,) float32 (already repetition-penalised)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / temperature
    if top_k is not None and top_k > 0:
        scores = top_k_filter(scores, top_k)
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if min_p is not None and min_p > 0.0:
        scores = min_p_filter(scores, min_p)
    probs = _softmax(scores)
    # Inverse-CDF draw: one uniform number per step, so a seed fixes the whole generation. A draw lands
    # only on tokens with non-zero probability (the clamp guards the last one against rounding).
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, int(np.flatnonzero(probs)[-1]))
