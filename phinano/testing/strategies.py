"""Hypothesis strategies for Phi-shaped kernel inputs: one per op, each drawing the keyword arguments of
`phinano.kernels.reference.<op>` as a dict.

Hypothesis draws what should shrink (shapes, dtypes, magnitudes, positions, windows) and a seed; NumPy draws
the numbers from that seed. A failing example therefore shrinks to small shapes and simple choices while its
values stay random-looking (values drawn by Hypothesis itself would shrink to all-zero rows, where most bugs
hide). `OPS[name](**options)` is the strategy of op `name`; every strategy takes the same options:

    dtypes      weight storage to draw from: "bf16" (bit patterns in uint16), "f16", "f32"
    head_dims   attention/rope head dims (default 64, 96, 128: Phi-3-mini 96, Phi-3-medium and PhiMoE 128, ...)
    min_tokens, max_tokens   the range of new tokens T drawn (default 1 .. 120: decode, short prompts, and
                past 96, where phinano's fast linear switches to BLAS; attention draws at most 40 new
                tokens after up to 40 cached ones)

Shape letters: T tokens, S cached positions, H query heads, KVH key/value heads, HD head dim, R rotary dims,
N output rows, K input width, D width, F MLP width.
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as e:  # the kit's one runtime need beyond the engine
    raise ImportError('phinano.testing needs hypothesis: pip install "phinano[testing]" (or pip install hypothesis)'
                      ) from e

import numpy as np

__all__ = ["OPS", "seeds", "weight_dtypes", "scales", "tokens", "windows", "gqa_heads", "bf16_bits", "make_weight",
           "widen_inputs", "embed_inputs", "linear_inputs", "rmsnorm_inputs", "layernorm_inputs", "rope_inputs",
           "softmax_inputs", "swiglu_inputs", "attention_inputs", "attention_weights_inputs"]

DTYPES = ("bf16", "f16", "f32")
HEAD_DIMS = (64, 96, 128)
MAX_TOKENS = 120

seeds = st.integers(0, 2**32 - 1)
# magnitudes: tiny, ordinary, large (large enough to matter, small enough that no float32 sum overflows)
scales = st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4, 1e12])


def weight_dtypes(dtypes=DTYPES):
    return st.sampled_from(list(dtypes))


def tokens(min_tokens: int = 1, max_tokens: int = MAX_TOKENS):
    """T: mostly few (decode, short prompts: the fewest come first when shrinking), sometimes up to max_tokens."""
    small = st.integers(min_tokens, max(min_tokens, min(9, max_tokens)))
    return st.one_of(small, small, st.integers(min_tokens, max_tokens))


def gqa_heads():
    """(H, KVH): query heads a multiple of the key/value heads, ratios 1 (MHA: Phi-3-mini), 3 (Phi-4-mini),
    4 (Phi-3-medium, PhiMoE)."""
    return st.tuples(st.integers(1, 3), st.sampled_from([1, 3, 4])).map(lambda t: (t[0] * t[1], t[0]))


def windows(S: int):
    """A sliding window for S cached keys: none, 1, 2, S - 1, S, a random one, or a released size (2047)."""
    return st.one_of(st.none(), st.sampled_from([1, 2, max(1, S - 1), S, 2047]), st.integers(1, S + 1))


def bf16_bits(a) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def make_weight(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    """Normal values times `scale`, stored as `dtype` ("bf16" as uint16 bits, "f16", "f32")."""
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    if dtype == "bf16":
        return bf16_bits(values)
    if dtype == "f16":
        return np.clip(values, -6e4, 6e4).astype(np.float16)
    return values


def _f32(rng, shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _activations(rng, shape, scale=1.0) -> np.ndarray:
    """Normal values with a few large negative outliers (about 5 % times -1e3), like real residual streams."""
    x = _f32(rng, shape, scale)
    x[rng.random(shape) < 0.05] *= -1e3
    return x


def _options(dtypes=DTYPES, head_dims=HEAD_DIMS, min_tokens=1, max_tokens=MAX_TOKENS):
    """The options every strategy takes, checked; the token range as one strategy."""
    if not dtypes or not set(dtypes) <= set(DTYPES):
        raise ValueError(f"dtypes must be some of {DTYPES}, got {dtypes!r}")
    if not head_dims or any(int(d) < 2 or int(d) % 2 for d in head_dims):
        raise ValueError(f"head_dims must be even numbers >= 2, got {head_dims!r}")
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    return tuple(dtypes), tuple(head_dims), tokens(int(min_tokens), int(max_tokens))


@st.composite
def widen_inputs(draw, **options):
    dtypes, _, _ = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    shape = (draw(st.integers(1, 9)), draw(st.integers(1, 70)))
    return {"w": make_weight(rng, shape, draw(weight_dtypes(dtypes)), 3.0)}


@st.composite
def embed_inputs(draw, **options):
    dtypes, _, lengths = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    V, D, T = draw(st.integers(1, 40)), draw(st.integers(1, 96)), draw(lengths)
    return {"table": make_weight(rng, (V, D), draw(weight_dtypes(dtypes))), "ids": rng.integers(0, V, T)}


@st.composite
def linear_inputs(draw, **options):
    """x (T, K) activations with outliers, w (N, K) stored as a weight dtype, b (N,) or None."""
    dtypes, _, lengths = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    T, N, K = draw(lengths), draw(st.integers(1, 40)), draw(st.integers(1, 300))
    dtype = draw(weight_dtypes(dtypes))
    x = _activations(rng, (T, K), draw(scales))
    w = make_weight(rng, (N, K), dtype, draw(st.sampled_from([1e-3, 0.02, 1.0, 1e3])))
    b = make_weight(rng, (N,), dtype) if draw(st.booleans()) else None
    return {"x": x, "w": w, "b": b}


@st.composite
def rmsnorm_inputs(draw, **options):
    dtypes, _, lengths = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    T, D = draw(lengths), draw(st.integers(1, 130))
    return {"x": _f32(rng, (T, D), draw(scales)), "w": make_weight(rng, (D,), draw(weight_dtypes(dtypes))),
            "eps": draw(st.sampled_from([1e-5, 1e-6]))}


@st.composite
def layernorm_inputs(draw, **options):
    """PhiMoE's norm: rows with an offset (a mean far from 0) as well as centred ones."""
    dtypes, _, lengths = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    T, D, xs = draw(lengths), draw(st.integers(2, 130)), draw(scales)
    dtype = draw(weight_dtypes(dtypes))
    x = _f32(rng, (T, D), xs) + np.float32(draw(st.sampled_from([0.0, 1.0, -3.0])) * xs)
    return {"x": x, "w": make_weight(rng, (D,), dtype), "b": make_weight(rng, (D,), dtype, 0.1), "eps": 1e-5}


@st.composite
def rope_tables(draw, T: int, R: int):
    """cos, sin (T, R) as phinano.rope makes them: default (theta 10000 or 250000), or longrope with random
    per-pair factors (short 1..1.6, long 1..20) and an attention factor, at positions up to 131k."""
    rng = np.random.default_rng(draw(seeds))
    start = draw(st.sampled_from([0, 1, 4095, 131000]))
    theta = np.float32(draw(st.sampled_from([10000.0, 250000.0])))
    exponent = np.arange(0, R, 2).astype(np.float32) / np.float32(R)  # (R/2,)
    inv_freq = np.float32(1.0) / theta**exponent  # (R/2,)
    scale = np.float32(1.0)
    if draw(st.booleans()):  # longrope
        top = draw(st.sampled_from([1.6, 20.0]))
        inv_freq = np.float32(1.0) / (rng.uniform(1.0, top, R // 2).astype(np.float32) / inv_freq)
        scale = np.float32(draw(st.sampled_from([1.0, 1.19024, 1.2431])))
    freqs = np.arange(start, start + T, dtype=np.float32)[:, None] * inv_freq[None, :]  # (T, R/2)
    angles = np.concatenate([freqs, freqs], axis=-1)  # (T, R)
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)


@st.composite
def rope_inputs(draw, **options):
    """x (T, NH, HD) with cos, sin (T, R): full rotary (R = HD) or partial (Phi-4-mini: 96 of 128)."""
    _, head_dims, lengths = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    HD = draw(st.sampled_from(list(head_dims)))
    R = draw(st.sampled_from(sorted({HD, HD * 3 // 4 // 2 * 2, 32 if HD > 32 else HD})))
    T, NH = draw(lengths), draw(st.integers(1, 5))
    cos, sin = draw(rope_tables(T, R))
    return {"x": _f32(rng, (T, NH, HD), draw(scales)), "cos": cos, "sin": sin}


@st.composite
def softmax_inputs(draw, **options):
    _options(**options)
    rng = np.random.default_rng(draw(seeds))
    lead = draw(st.sampled_from([(1,), (3,), (2, 3)]))
    return {"x": _f32(rng, lead + (draw(st.integers(1, 200)),), draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3])))}


@st.composite
def swiglu_inputs(draw, **options):
    """gate, up (T, F); some gates just past expf's overflow threshold (~-88.7), where silu is -0."""
    _, _, lengths = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    T, F = draw(lengths), draw(st.integers(1, 150))
    gate = _f32(rng, (T, F), draw(st.sampled_from([1e-3, 1.0, 10.0, 100.0, 1e4])))
    gate.flat[::7] = -gate.flat[::7] - np.float32(89.0)
    return {"gate": gate, "up": _f32(rng, (T, F), draw(st.sampled_from([1e-3, 1.0, 1e4])))}


@st.composite
def _attention_parts(draw, **options):
    _, head_dims, _ = _options(**options)
    rng = np.random.default_rng(draw(seeds))
    HD = draw(st.sampled_from(list(head_dims)))
    H, KVH = draw(gqa_heads())
    lo = options.get("min_tokens", 1)  # at most 40 new tokens (more only when min_tokens asks for more)
    T = draw(tokens(lo, max(lo, min(options.get("max_tokens", MAX_TOKENS), 40))))
    start = draw(st.sampled_from([0, 0, 1, 5, 17, 40]))  # tokens already cached
    S = start + T
    window = draw(windows(S))
    qs = draw(st.sampled_from([0.1, 1.0, 3.0, 30.0]))
    q, k = _f32(rng, (T, H, HD), qs), _f32(rng, (S, KVH, HD), qs)
    v = _f32(rng, (S, KVH, HD), 10.0)
    v[rng.random(v.shape) < 0.01] = -1e4  # a few large negative values
    return q, k, v, start, window


@st.composite
def attention_inputs(draw, **options):
    """q (T, H, HD) at positions start .. start+T-1 over k, v (S = start + T, KVH, HD), with a window."""
    q, k, v, start, window = draw(_attention_parts(**options))
    return {"q": q, "k": k, "v": v, "start": start, "window": window}


@st.composite
def attention_weights_inputs(draw, **options):
    q, k, _, start, window = draw(_attention_parts(**options))
    return {"q": q, "k": k, "start": start, "window": window}


OPS = {"widen": widen_inputs, "embed": embed_inputs, "linear": linear_inputs, "rmsnorm": rmsnorm_inputs,
       "layernorm": layernorm_inputs, "rope": rope_inputs, "softmax": softmax_inputs, "swiglu": swiglu_inputs,
       "attention": attention_inputs, "attention_weights": attention_weights_inputs}
