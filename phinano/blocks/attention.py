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


@dataclass
class Step:
    """What every layer of one forward step shares: where the new tokens sit and what rotates them."""

    cache: KVCache
    start: int  # absolute position of the first new token (= positions already cached)
    cos: np.ndarray  # (T, R) rotary tables for positions start .. start+T-1
    sin: np.ndarray  # (T, R)
    observer: dict | None = None  # fact name -> callback(layer, value); see model.py


def notify(step: Step, fact: str, layer: int, value) -> None:
    """Hand a fact to the observer, if it asked for this one."""
    if step.observer is not None and fact in step.observer:
        step.observer[fact](layer, value)


def wants(step: Step, fact: str) -> bool:
    return step.observer is not None and fact in step.observer


def self_attention(ops, cfg, w: AttentionWeights, x: np.ndarray, step: Step, layer: int) -> np.ndarray:
    """Attention of T new tokens over everything cached. x (T, D) normed -> (T, D)."""
    T, start = x.shape[0], step.start
    q = ops.linear(x, w.q, w.q_bias).reshape(T, cfg.num_attention_heads, cfg.head_dim)  # (T, H, HD)
    k = ops.linear(x, w.k, w.k_bias).reshape(T, cfg.num_key_value_heads, cfg.head_dim)  # (T, KVH, HD)
    v = ops.linear(x, w.v, w.v_bias).reshape(T, cfg.num_key_value_heads, cfg.head_dim)  # (T, KVH, HD)
    q = ops.rope(q, step.cos, step.sin)  # (T, H, HD)
    k = ops.rope(k, step.cos, step.sin)  # (T, KVH, HD)
    step.cache.k[layer, start : start + T] = k
    step.cache.v[layer, start : start + T] = v
    keys = step.cache.k[layer, : start + T]  # (S, KVH, HD), S = start + T
    values = step.cache.v[layer, : start + T]  # (S, KVH, HD)
    if wants(step, "attention"):  # only computed when asked for: (H, T, S) is large
        notify(step, "attention", layer, ops.attention_weights(q, keys, start, cfg.sliding_window))
    out = ops.attention(q, keys, values, start, cfg.sliding_window)  # (T, H, HD)
    return ops.linear(out.reshape(T, cfg.q_size), w.o, w.o_bias)  # (T, D)
