"""From one row of logits to one token id.

Two sampler orders (`sampler_order`; docs/sampling.md works one example through both):
    "transformers" (the default): repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw
    "llama.cpp"    (its default chain): penalties -> top-k -> top-p -> min-p -> temperature -> softmax -> draw
The filters see the tempered distribution in the first and the untempered one in the second, so the same
options give different distributions whenever temperature != 1 and a filter is on. Each filter is written
as its project defines it (llama.cpp's top-k keeps exactly k; its top-p keeps the prefix whose mass reaches p).
Greedy (temperature 0) is the argmax after the repetition penalty, first index on ties, in both orders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .errors import PhinanoError


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


# llama.cpp's samplers (src/llama-sampling.cpp), each on the candidates the previous one left (-inf = dropped).
def llama_top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly the k largest logits (ties: the lower id first); the rest become -inf."""
    order = np.argsort(-logits, kind="stable")  # descending, ties by id
    out = np.full_like(logits, -np.inf)
    out[order[:k]] = logits[order[:k]]
    return out


def llama_top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Sort descending, keep the shortest prefix whose cumulative probability is >= p (the token that reaches
    p included)."""
    order = np.argsort(-logits, kind="stable")
    cumulative = np.cumsum(_softmax(logits[order]))
    reached = np.flatnonzero(cumulative >= p)
    n = int(reached[0]) + 1 if reached.size else logits.size
    out = np.full_like(logits, -np.inf)
    out[order[:n]] = logits[order[:n]]
    return out


def llama_min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep logits >= max + ln(min_p), i.e. probability >= min_p times the top one's."""
    return np.where(logits >= logits.max() + np.log(min_p), logits, -np.inf)


SAMPLER_ORDERS = ("transformers", "llama.cpp")


def distribution(logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, sampler_order: str = "transformers") -> np.ndarray:
    """The probabilities (V,) float64 a draw is made from (temperature > 0; logits already penalised)."""
    scores = logits.astype(np.float64)
    if sampler_order == "transformers":
        scores = scores / temperature
        if top_k is not None and top_k > 0:
            scores = top_k_filter(scores, top_k)
        if top_p is not None and top_p < 1.0:
            scores = top_p_filter(scores, top_p)
        if min_p is not None and min_p > 0.0:
            scores = min_p_filter(scores, min_p)
    elif sampler_order == "llama.cpp":
        if top_k is not None and top_k > 0:
            scores = llama_top_k_filter(scores, top_k)
        if top_p is not None and top_p < 1.0:
            scores = llama_top_p_filter(scores, top_p)
        if min_p is not None and min_p > 0.0:
            scores = llama_min_p_filter(scores, min_p)
        scores = scores / temperature
    else:
        raise OptionError("sampler_order", _order_message(sampler_order))
    return _softmax(scores)


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None, sampler_order: str = "transformers") -> int:
    """Pick the next token from logits (V,) float32 (already repetition-penalised)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    probs = distribution(logits, temperature, top_k, top_p, min_p, sampler_order)
    # Inverse-CDF draw: one uniform number per step, so a seed fixes the whole generation. A draw lands
    # only on tokens with non-zero probability (the clamp guards the last one against rounding).
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, int(np.flatnonzero(probs)[-1]))


# ---------------------------------------------------------------------------------------------------------
# The one rule set for generation options: the library, the CLI and both server APIs check them here.
# ---------------------------------------------------------------------------------------------------------


MAX_BEAMS = 256  # each beam keeps a KV cache and a model row per step: a bound, not a search anyone runs on a CPU


class OptionError(PhinanoError):
    """A generation option outside its range. `param` names it (the CLI prints the message; the server
    answers 400 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _number(param: str, value, integer: bool = False):
    """value as float (or int), refusing bools, strings, nan and inf with an OptionError naming `param`."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kinds):
        raise OptionError(param, f"{param} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(float(value)):
        raise OptionError(param, f"{param} must be a finite number, got {value!r}")
    return int(value) if integer else float(value)


def _order_message(order) -> str:
    return f"sampler_order must be 'transformers' or 'llama.cpp', got {order!r}"


def check_options(*, max_new_tokens=1, temperature=0.0, top_k=None, top_p=None, min_p=None,
                  repetition_penalty=1.0, seed=None, sampler_order="transformers", prompt_lookup_num_tokens=None,
                  num_beams=1, length_penalty=1.0, early_stopping=False) -> dict:
    """Validate generation options; return them normalised (floats, ints, None for "off").

        max_new_tokens      integer >= 1
        temperature         >= 0 (0 = greedy)
        top_k               integer >= 0, or None (0 and None = off)
        top_p               0 < top_p <= 1, or None (1 and None = off)
        min_p               0 <= min_p <= 1, or None (0 and None = off)
        repetition_penalty  > 0 (1 = off)
        seed                integer >= 0, or None (random)
        sampler_order       "transformers" or "llama.cpp" (the order the filters and temperature apply in)
        prompt_lookup_num_tokens  integer >= 0, or None (0 and None = no speculation; generate.py)
        num_beams           integer 1 .. MAX_BEAMS (1 = no beam search; beams.py)
        length_penalty      a number (beam scores are divided by length ** length_penalty)
        early_stopping      True, False or "never" (Transformers' meanings; beams.py)

    Raises OptionError naming the first option out of range.
    """
    n = _number("max_new_tokens", max_new_tokens, integer=True)
    if n < 1:
        raise OptionError("max_new_tokens", f"max_new_tokens must be at least 1, got {n}")
    t = _number("temperature", temperature)
    if t < 0:
        raise OptionError("temperature", f"temperature must be >= 0 (0 = greedy), got {t:g}")
    if top_k is not None:
        top_k = _number("top_k", top_k, integer=True)
        if top_k < 0:
            raise OptionError("top_k", f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None:
        top_p = _number("top_p", top_p)
        if not 0 < top_p <= 1:
            raise OptionError("top_p", f"top_p must be in (0, 1] (1 = off), got {top_p:g}")
    if min_p is not None:
        min_p = _number("min_p", min_p)
        if not 0 <= min_p <= 1:
            raise OptionError("min_p", f"min_p must be in [0, 1] (0 = off), got {min_p:g}")
    r = _number("repetition_penalty", repetition_penalty)
    if r <= 0:
        raise OptionError("repetition_penalty", f"repetition_penalty must be > 0 (1 = off), got {r:g}")
    if seed is not None:
        seed = _number("seed", seed, integer=True)
        if seed < 0:
            raise OptionError("seed", f"seed must be >= 0, got {seed}")
    if sampler_order not in SAMPLER_ORDERS:
        raise OptionError("sampler_order", _order_message(sampler_order))
    lookup = None
    if prompt_lookup_num_tokens is not None:
        lookup = _number("prompt_lookup_num_tokens", prompt_lookup_num_tokens, integer=True)
        if lookup < 0:
            raise OptionError("prompt_lookup_num_tokens",
                              f"prompt_lookup_num_tokens must be >= 0 (0 = off), got {lookup}")
    beams = _number("num_beams", num_beams, integer=True)
    if not 1 <= beams <= MAX_BEAMS:
        raise OptionError("num_beams", f"num_beams must be from 1 (no beam search) to {MAX_BEAMS}, got {beams}")
    penalty = _number("length_penalty", length_penalty)
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise OptionError("early_stopping", f"early_stopping must be true, false or 'never', got {early_stopping!r}")
    return dict(max_new_tokens=n, temperature=t, top_k=top_k or None, top_p=top_p if top_p != 1 else None,
                min_p=min_p or None, repetition_penalty=r, seed=seed, sampler_order=sampler_order,
                prompt_lookup_num_tokens=lookup or None, num_beams=beams, length_penalty=penalty,
                early_stopping=early_stopping)


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "sampler_order")


def resolve_options(given: dict, defaults: dict | None = None) -> dict:
    """The sampling translator every door uses: the options a user gave (None = not given), filled in from
    `defaults` (the model's generation_config for the CLI, OpenAI's or Ollama's documented defaults for the
    server), checked by `check_options`. Returns generate_tokens' keyword arguments (max_new_tokens included
    when given). Keys other than the sampling options and max_new_tokens are refused (a bug in the caller)."""
    unknown = set(given) - set(SAMPLING_KEYS) - {"max_new_tokens"}
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    merged = {k: v for k, v in (defaults or {}).items() if v is not None}
    merged.update({k: v for k, v in given.items() if v is not None})
    checked = check_options(**{"max_new_tokens": 1, **merged})
    out = {k: checked[k] for k in SAMPLING_KEYS}
    if "max_new_tokens" in merged:
        out["max_new_tokens"] = checked["max_new_tokens"]
    return out
