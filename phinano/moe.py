"""Phi-3.5-MoE's sparse block: a router picks 2 of 16 SwiGLU experts per token ("sparsemixer").

Sparsemixer top-2 (Transformers' inference path), for one token's router logits s (E,), eps = 0.01:

  1. e1 = argmax(s), m1 = s[e1]. Mask every expert j whose relative gap to the best is too large:
         (m1 - s[j]) / max(|s[j]|, m1) > 2*eps.
     w1 = softmax(s over the unmasked experts)[e1].
  2. Remove e1 (s'[e1] = -inf); e2 = argmax(s'), m2 = s'[e2]. Mask with the same rule around m2
     (the gap and |s[j]| use the original logits), w2 = softmax(s' over its unmasked experts)[e2].
  3. out = w1 * expert_e1(x) + w2 * expert_e2(x). w1 + w2 is NOT renormalised to 1.

Mixtral-style top-2 instead takes one softmax over all 16 logits, keeps the two largest probabilities and
renormalises them to sum to 1. With eps = 0.01 the sparsemixer's masks usually leave only the chosen
expert unmasked, so w1 and w2 are often exactly 1.0 -- very different weights from Mixtral's.
"""

from __future__ import annotations

import numpy as np

from .config import Config
from .weights import LayerWeights


def sparsemixer(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-2 routing for router logits (T, E) -> experts (T, 2) int64, weights (T, 2) float32."""
    T, E = logits.shape
    s = logits.astype(np.float32)
    experts = np.zeros((T, 2), np.int64)
    weights = np.zeros((T, 2), np.float32)
    threshold = np.float32(2 * eps)
    remaining = s.copy()  # (T, E): logits still in the running
    for slot in range(2):
        best = np.argmax(remaining, axis=-1)  # (T,) first index on ties, like torch.max
        top = remaining[np.arange(T), best][:, None]  # (T, 1)
        with np.errstate(invalid="ignore"):  # 0/0 when top == s == 0 gives nan: not masked, as in torch
            gap = (top - s) / np.maximum(np.abs(s), top)  # (T, E) relative gap to this round's best
        gated = np.where(gap > threshold, -np.inf, remaining)  # mask the far-away experts
        gated = np.exp(gated - top)  # softmax numerators (masked -> 0)
        weights[:, slot] = gated[np.arange(T), best] / gated.sum(axis=-1)
        experts[:, slot] = best
        remaining[np.arange(T), best] = -np.inf  # the second round excludes the first expert
    return experts, weights


def sparse_moe(ops, cfg: Config, w: LayerWeights, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The MoE block for x (T, D): route, run each chosen expert once on its group of tokens, scatter-add.

    Returns the output (T, D) and the routing (experts (T, 2), weights (T, 2)).
    Only the experts some token chose are read, so a decode step touches 2 of the 16 experts' weights.
    """
    router_logits = ops.linear(x, w.router)  # (T, E)
    experts, weights = sparsemixer(router_logits, cfg.router_jitter_noise)  # (T, 2), (T, 2)
    out = np.zeros_like(x)  # (T, D)
    for e in np.unique(experts):
        rows, slots = np.nonzero(experts == e)  # tokens routed to expert e, and in which slot
        w1, w3, w2 = w.experts[e]  # gate (F, D), up (F, D), down (D, F)
        h = x[rows]  # (n, D) gather
        y = ops.linear(ops.swiglu(ops.linear(h, w1), ops.linear(h, w3)), w2)  # (n, D)
        np.add.at(out, rows, y * weights[rows, slots][:, None])  # weighted scatter-add
    return out, (experts, weights)


def parameter_counts(cfg: Config) -> tuple[int, int]:
    """(total, active per token) parameter counts, from the config alone."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.q_size, cfg.kv_size
    attn = D * q + 2 * D * kv + q * D
    if cfg.attention_bias:
        attn += q + 2 * kv + D
    norms = 2 * D * (2 if cfg.is_moe else 1)
    head = (0 if cfg.tie_word_embeddings else V * D) + (V if cfg.lm_head_bias else 0)
    outside = V * D + head + D * (2 if cfg.is_moe else 1)
    if not cfg.is_moe:
        total = outside + L * (attn + norms + 3 * D * F)
        return total, total
    expert = 3 * D * F
    router = cfg.num_local_experts * D
    total = outside + L * (attn + norms + router + cfg.num_local_experts * expert)
    active = outside + L * (attn + norms + router + 2 * expert)
    return total, active
