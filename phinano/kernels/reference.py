"""The hot ops in plain NumPy: the reference a reader can check by eye.

Every function here has a twin of the same name and signature in `fast.py` (Numba). Nothing here knows
about models: arrays in, arrays out. All activations are float32. Weights may be float32, float16,
bfloat16 held as raw `np.uint16` bits (see phinano/weights.py), or quantized blocks in a
`QuantizedTensor` (phinano/formats/quantized.py); `widen` turns any of them into float32.

Shape letters: T tokens, S cached positions, D model width, H query heads, KVH key/value heads,
HD head dim, R rotary dims, N output rows, K input width, F MLP width.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..formats.quantized import QuantizedTensor, dequantize

__all__ = ["set_threads", "widen", "embed", "linear", "linear_rows", "rmsnorm", "layernorm", "rope", "softmax", "swiglu",
           "attention", "attention_weights", "gegelu", "blocksparse_visible", "blocksparse_attention_weights",
           "blocksparse_attention", "quick_gelu", "gelu", "encoder_attention"]


def set_threads(n: int | None = None) -> int:
    """Use `n` threads (default: all cores) in NumPy's BLAS, the only multi-threaded part of these ops.
    Returns the number asked for, clamped to 1 .. the core count.

    It reaches the BLAS library through the threadpoolctl package; without threadpoolctl installed it
    changes nothing (BLAS keeps its own thread count, e.g. from OPENBLAS_NUM_THREADS) and only returns
    the number. Unlike the fast backend's, the setting is for the whole process.
    """
    cores = os.cpu_count() or 1
    n = cores if n is None else max(1, min(int(n), cores))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return n
    threadpool_limits(n, user_api="blas")
    return n


def widen(w: np.ndarray | QuantizedTensor) -> np.ndarray:
    """Any stored weight -> float32. bf16 bits (uint16) go to the high half of a 32-bit word: exact.
    Quantized blocks are unpacked to the float matrix they stand for (e.g. Q8_0: d * q per block)."""
    if isinstance(w, QuantizedTensor):
        return dequantize(w)
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w.astype(np.float32, copy=False)


def embed(table: np.ndarray | QuantizedTensor, ids: np.ndarray) -> np.ndarray:
    """Rows of the (V, D) embedding table for the (T,) token ids -> (T, D) float32. A quantized table
    gives its T rows still packed (`table[ids]`), and only those are unpacked."""
    return widen(table[ids])


def linear(x: np.ndarray, w: np.ndarray | QuantizedTensor, b: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T (+ b). x (T, K) float32, w (N, K) as stored, b (N,) -> (T, N) float32."""
    y = x @ widen(w).T
    if b is not None:
        y += widen(b)
    return y


def linear_rows(x: np.ndarray, w: np.ndarray | QuantizedTensor, b: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T (+ b) for B independent rows (one new token of each of B sequences): row t is exactly
    `linear(x[t : t + 1], w, b)[0]`. x (B, K) float32, w (N, K) as stored, b (N,) -> (B, N) float32.
    (One product of all rows could round differently from a row alone; the batch must not change a token.)"""
    return np.concatenate([linear(x[t : t + 1], w, b) for t in range(x.shape[0])]).reshape(x.shape[0], w.shape[0])


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w, per row. x (T, D) float32, w (D,) -> (T, D)."""
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + np.float32(eps)) * widen(w)


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b, per row (biased variance). x (T, D), w and b (D,) -> (T, D)."""
    mean = np.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(eps)) * widen(w) + widen(b)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, "rotate-half" (NeoX) pairing, on the first R dims of every head.

    x (T, NH, HD); cos, sin (T, R) with the R/2 angles repeated twice. Dim i < R/2 pairs with i + R/2:
        x'[i]       = x[i] * cos[i]       - x[i + R/2] * sin[i]
        x'[i + R/2] = x[i + R/2] * cos[i] + x[i] * sin[i]
    Dims R..HD pass through unchanged (Phi-4-mini rotates 96 of 128).
    """
    R = cos.shape[-1]
    half = R // 2
    rot = x[..., :R]  # (T, NH, R)
    rotated_half = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)  # (T, NH, R)
    out = x.copy()
    out[..., :R] = rot * cos[:, None, :] + rotated_half * sin[:, None, :]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32; rows that are all -inf are not expected."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def attention_weights(q: np.ndarray, k: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """The attention probabilities (H, T, S) float32: row (h, t) is a softmax over the keys query t sees.

    q (T, H, HD): queries at absolute positions start .. start+T-1; k (S, KVH, HD): keys at 0 .. S-1.
    Query at position i sees key j iff j <= i and i - j < window (window W = W keys, the query's own
    included). Query head h reads KV head h // (H // KVH) (grouped-query attention).
    """
    T, H, HD = q.shape
    S, KVH, _ = k.shape
    k = np.repeat(k, H // KVH, axis=1)  # (S, H, HD): KV head j serves query heads j*G .. j*G+G-1
    scores = np.einsum("thd,shd->hts", q, k) * np.float32(HD**-0.5)  # (H, T, S)
    i = np.arange(start, start + T)[:, None]  # (T, 1) query positions
    j = np.arange(S)[None, :]  # (1, S) key positions
    visible = j <= i
    if window is not None:
        visible &= i - j < window
    return softmax(np.where(visible[None], scores, -np.inf)).astype(np.float32)  # (H, T, S)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """Causal (optionally sliding-window) attention of T new queries over S cached keys: the probabilities of
    `attention_weights` applied to the values. q (T, H, HD); k, v (S, KVH, HD) at positions 0 .. S-1
    (S = start + T, the new ones included). Returns (T, H, HD)."""
    probs = attention_weights(q, k, start, window)  # (H, T, S)
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)  # (S, H, HD)
    return np.einsum("hts,shd->thd", probs, v)  # (T, H, HD)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """up * silu(gate), silu(g) = g * sigmoid(g). gate, up (T, F) -> (T, F)."""
    return up * (gate / (1.0 + np.exp(-gate)))



def gegelu(x: np.ndarray, limit: float | None) -> np.ndarray:
    """Phi-3-small's GEGELU on the interleaved up-projection x (T, 2F) -> (T, F).

    Even columns are the gelu branch a, odd columns the linear branch b. With a limit, a is clamped from above
    and b to [-limit, limit] (infinities pass unclamped, as released); then quick-gelu(a) * (b + 1), where
    quick-gelu(a) = a * sigmoid(1.702 a).
    """
    a, b = x[:, 0::2], x[:, 1::2]  # (T, F) each
    if limit is not None:
        a = np.where(np.isinf(a), a, np.minimum(a, np.float32(limit)))
        b = np.where(np.isinf(b), b, np.clip(b, np.float32(-limit), np.float32(limit)))
    with np.errstate(over="ignore"):  # exp overflow -> inf -> a / inf = 0, the limit of quick-gelu
        return (a / (1.0 + np.exp(np.float32(-1.702) * a)) * (b + 1.0)).astype(np.float32)


def blocksparse_visible(H: int, start: int, T: int, S: int, block: int, local_blocks: int, vert_stride: int,
                        head_step: int) -> np.ndarray:
    """Which keys each query sees under Phi-3-small's blocksparse pattern: (H, T, S) bool.

    Positions fall in blocks of `block` tokens. Query i (block qi) of head h sees key j (block kj) iff j <= i and
        qi - kj < local_blocks                            the local band: its own block and the ones just before, or
        (kj + h * head_step + 1) % vert_stride == 0       a "vertical" block: every vert_stride-th block, shifted
                                                          by h * head_step (0 for all heads when homogeneous)
    """
    i = np.arange(start, start + T)[None, :, None]  # (1, T, 1) query positions
    j = np.arange(S)[None, None, :]  # (1, 1, S) key positions
    h = np.arange(H)[:, None, None]  # (H, 1, 1)
    local = i // block - j // block < local_blocks  # (1, T, S)
    vertical = (j // block + h * head_step + 1) % vert_stride == 0  # (H, 1, S)
    return (j <= i) & (local | vertical)  # (H, T, S)


def blocksparse_attention_weights(q: np.ndarray, k: np.ndarray, start: int, block: int, local_blocks: int,
                                  vert_stride: int, head_step: int) -> np.ndarray:
    """Attention probabilities (H, T, S) under the blocksparse mask (see blocksparse_visible); scores are
    q.k / sqrt(HD) like `attention_weights`, grouped-query the same way."""
    T, H, HD = q.shape
    S, KVH, _ = k.shape
    k = np.repeat(k, H // KVH, axis=1)  # (S, H, HD)
    scores = np.einsum("thd,shd->hts", q, k) * np.float32(HD**-0.5)  # (H, T, S)
    visible = blocksparse_visible(H, start, T, S, block, local_blocks, vert_stride, head_step)
    return softmax(np.where(visible, scores, -np.inf)).astype(np.float32)


def blocksparse_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, block: int, local_blocks: int,
                          vert_stride: int, head_step: int) -> np.ndarray:
    """Blocksparse causal attention of T new queries over S cached keys (positions as in `attention`):
    the probabilities of `blocksparse_attention_weights` applied to the values. Returns (T, H, HD)."""
    probs = blocksparse_attention_weights(q, k, start, block, local_blocks, vert_stride, head_step)  # (H, T, S)
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)  # (S, H, HD)
    return np.einsum("hts,shd->thd", probs, v)  # (T, H, HD)


# ------------------------------------------------------------------ the image tower's ops (phinano/vision/)
def quick_gelu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(1.702 x), CLIP's activation, elementwise. x (T, F) -> (T, F)."""
    with np.errstate(over="ignore"):  # exp overflows to inf for x below about -52: x / inf = -0, the right limit
        return x / (1.0 + np.exp(np.float32(-1.702) * x))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """x / 2 * (1 + erf(x / sqrt(2))), the exact GELU (not the tanh approximation), elementwise.
    Computed in float64 with math.erf, rounded to float32. x (T, F) -> (T, F)."""
    x64 = np.asarray(x, dtype=np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(np.float32)


def encoder_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Attention without a mask: every query sees every key (an image encoder's tokens have no order).
    q, k, v (T, H, HD) -> (T, H, HD)."""
    scores = np.einsum("thd,shd->hts", q, k) * np.float32(q.shape[-1] ** -0.5)  # (H, T, T)
    return np.einsum("hts,shd->thd", softmax(scores), v).astype(np.float32)  # (T, H, HD)
