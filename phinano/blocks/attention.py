"""Self-attention as every Phi text model does it: project, rotate, cache, attend, project back.

    q = x Wq, k = x Wk, v = x Wv            (T, H, HD), (T, KVH, HD), (T, KVH, HD)
    q, k = rope(q), rope(k)                 positions start .. start+T-1
    cache[start : start+T] = k, v           the cache keeps every position (the window is a mask)
    out = softmax(q k^T / sqrt(HD) + mask) v    causal, sliding window, grouped-query
    return out Wo                           (T, D)

Shared by the dense Phi-3 layer (blocks/phi3.py) and the PhiMoE layer (blocks/phimoe.py); they differ only in
where q, k and v come from (Phi-3 stores them fused as one `qkv_proj`, PhiMoE separately with biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cache import KVCache


@dataclass
class AttentionWeights:
    """Linear weights are (out, in) as stored; y = x @ W.T. Arrays are memory-mapped views (or packed
    quantized tensors): the kernels' `linear` reads them as they are."""

    q: np.ndarray  # (H*HD, D)
    k: np.ndarray  # (KVH*HD, D)
    v: np.ndarray  # (KVH*HD, D)
    o: np.ndarray  # (D, H*HD)
    q_bias: np.ndarray | None = None  # (H*HD,)   PhiMoE only
    k_bias: np.ndarray | None = None  # (KVH*HD,)
    v_bias: np.ndarray | None = None  # (KVH*HD,)
    o_bias: np.ndarray | None = None  # (D,)
    qkv: np.ndarray | None = None  # (H*HD + 2*KVH*HD, D): q, k, v stacked, where the checkpoint stores them so


@dataclass
class Step:
    """What every layer of one forward step shares: where the new tokens sit and what rotates them."""

    cache: KVCache
    start: int  # absolute position of the first new token (= positions already cached)
    cos: np.ndarray  # (T, R) rotary tables for positions start .. start+T-1
    sin: np.ndarray  # (T, R)
    observer: dict | None = None  # fact name -> callback(layer, value); see model.py


def notify(step: Step | list[Step], fact: str, layer: int, value) -> None:
    """Hand a fact to the observer, if it asked for this one (a batch of Steps has no observer)."""
    if wants(step, fact, layer):
        step.observer[fact](layer, value)


def wants(step: Step | list[Step], fact: str, layer: int | None = None) -> bool:
    """Whether the observer asked for `fact` (of `layer`: an observer's "layers" entry, {fact: layer numbers},
    limits a fact to those layers; costly facts are then computed for those layers only)."""
    if isinstance(step, list) or step.observer is None or fact not in step.observer:
        return False
    only = step.observer.get("layers", {}).get(fact)
    return layer is None or only is None or layer in only


def self_attention(ops, cfg, w: AttentionWeights, x: np.ndarray, step: Step | list[Step], layer: int) -> np.ndarray:
    """Attention of T new tokens over everything cached. x (T, D) normed -> (T, D).

    `step` may also be a list of Steps, one per sequence (batched decode, Model.step_batch): their tokens
    are consecutive rows of x, in order, and each sequence rotates, caches and attends within its own
    cache. The projections run once over all rows; only the attention itself is per sequence."""
    T = x.shape[0]
    if w.qkv is not None:  # one product over the fused matrix, then its columns split Q | K | V
        qkv = ops.linear(x, w.qkv)  # (T, q_size + 2 kv_size)
        q, k, v = qkv[:, : cfg.q_size], qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size], qkv[:, cfg.q_size + cfg.kv_size :]
    else:
        q, k, v = ops.linear(x, w.q, w.q_bias), ops.linear(x, w.k, w.k_bias), ops.linear(x, w.v, w.v_bias)
    q = q.reshape(T, cfg.num_attention_heads, cfg.head_dim)  # (T, H, HD)
    k = k.reshape(T, cfg.num_key_value_heads, cfg.head_dim)  # (T, KVH, HD)
    v = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)  # (T, KVH, HD)

    def attend(s: Step, q, keys, values):  # (n, H, HD) over the sequence's (S, KVH, HD) cache
        if wants(s, "attention", layer):  # only computed when asked for: (H, n, S) is large
            notify(s, "attention", layer, ops.attention_weights(q, keys, s.start, cfg.sliding_window))
        return ops.attention(q, keys, values, s.start, cfg.sliding_window)  # (n, H, HD)

    out = rotate_cache_attend(ops, step, layer, q, k, v, attend)  # (T, H, HD)
    return ops.linear(out.reshape(T, cfg.q_size), w.o, w.o_bias)  # (T, D)


def rotate_cache_attend(ops, step: Step | list[Step], layer: int, q, k, v, attend) -> np.ndarray:
    """The middle of every attention: rotate q (T, H, HD) and k (T, KVH, HD), append k and v to each
    sequence's cache, and `attend(step, q_rows, keys, values)` per sequence over its cached keys and
    values (S, KVH, HD). One Step: T tokens of one sequence; a list: consecutive rows per sequence."""
    steps = step if isinstance(step, list) else [step]
    if len(steps) == 1:  # one sequence: its own tables
        cos, sin = steps[0].cos, steps[0].sin  # (T, R)
    else:  # (T, R): each row the rotation of its own position
        cos, sin = np.concatenate([s.cos for s in steps]), np.concatenate([s.sin for s in steps])
    q = ops.rope(q, cos, sin)  # (T, H, HD)
    k = ops.rope(k, cos, sin)  # (T, KVH, HD)
    out = np.empty_like(q)  # (T, H, HD)
    first = 0  # x's row of the sequence's first token
    for s in steps:
        n, start = s.cos.shape[0], s.start  # the sequence's tokens, its first position
        rows = slice(first, first + n)
        s.cache.k[layer, start : start + n] = k[rows]
        s.cache.v[layer, start : start + n] = v[rows]
        out[rows] = attend(s, q[rows], s.cache.k[layer, : start + n], s.cache.v[layer, : start + n])
        first += n
    return out
