"""The Phi-3.5-MoE layer: attention, then a router that picks 2 of 16 SwiGLU experts per token ("sparsemixer").

The layer is a Phi-3 layer with three changes: LayerNorm (weight and bias) where Phi-3 has RMSNorm, separate
q/k/v projections with biases, and this sparse block where Phi-3 has its MLP. For one token with normed
hidden state x (D,):

    s   = x @ router.T                                   (E,) router logits, no bias
    e1, w1, e2, w2 = sparsemixer(s, eps)                 two experts and their weights
    out = w1 * expert_e1(x) + w2 * expert_e2(x)          expert(x) = w2_e @ (silu(w1_e @ x) * (w3_e @ x))

Sparsemixer top-2 is Transformers' inference path (`PhimoeTopKRouter` in eval mode); eps is the config's
`router_jitter_noise` (0.01), which despite its name is used at inference as a relative-gap threshold:

  1. e1 = argmax(s), m1 = s[e1]. Mask every expert j whose gap to the best, relative to the larger of |s[j]|
     and m1, is more than 2*eps:   (m1 - s[j]) / max(|s[j]|, m1) > 2*eps.
     w1 = softmax(s over the unmasked experts)[e1].
  2. Take e1 out (s'[e1] = -inf); e2 = argmax(s'), m2 = s'[e2]. Mask around m2 with the same rule (the gap and
     |s[j]| use the original logits s), w2 = softmax(s' over its unmasked experts)[e2].
  3. w1 and w2 come from two different softmaxes and are NOT renormalised: w1 + w2 is anything in (0, 2].

Mixtral-style top-2 instead takes one softmax over all E logits, keeps the two largest probabilities and
renormalises them to sum to 1. The two rules pick the same two experts but weigh them very differently: a mask
keeps only the experts within 2% (relative) of the round's best, so whenever no other logit is that close, the
sparsemixer's weight is exactly 1.0 (the expert's full output is added), where Mixtral's would be e.g. 0.58 and
0.42. An engine that reuses its Mixtral routing for Phi-3.5-MoE runs, but produces wrong text
(docs/pitfalls.md#sparsemixer). docs/moe.md works through both rules on a tiny model.

Memory: weights are memory-mapped, and `sparse_moe` reads an expert's three matrices only if some token in the
batch was routed to it. A decode step therefore touches 2 of the 16 experts per layer (6.6B of the 41.9B
parameters per token), and an expert that is never chosen is never paged in from disk.

Shapes: T tokens, D hidden, E experts, F expert width (6400 in the release).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import AttentionWeights, Step, notify, self_attention

NORM_HAS_BIAS = True  # LayerNorm with weight and bias (the final norm too)


@dataclass
class Layer:
    attn_norm: np.ndarray  # (D,)   LayerNorm weight
    attn_norm_bias: np.ndarray  # (D,)
    attn: AttentionWeights  # separate q, k, v, o, each with a bias
    mlp_norm: np.ndarray  # (D,)
    mlp_norm_bias: np.ndarray  # (D,)
    router: np.ndarray  # (E, D)   router logits = x @ router.T, no bias
    experts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # E x (w1 gate (F, D), w3 up (F, D), w2 down (D, F))


def norm(ops, cfg, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return ops.layernorm(x, weight, bias, cfg.rms_norm_eps)


def forward_layer(ops, cfg, w: Layer, x: np.ndarray, step: Step, i: int) -> np.ndarray:
    """One decoder layer on the residual stream x (T, D) -> (T, D)."""
    h = ops.layernorm(x, w.attn_norm, w.attn_norm_bias, cfg.rms_norm_eps)  # (T, D)
    x = x + self_attention(ops, cfg, w.attn, h, step, i)  # (T, D)
    h = ops.layernorm(x, w.mlp_norm, w.mlp_norm_bias, cfg.rms_norm_eps)  # (T, D)
    experts, weights = sparsemixer(ops.linear(h, w.router), cfg.router_jitter_noise)  # (T, 2), (T, 2)
    notify(step, "routing", i, (experts, weights))
    return x + sparse_moe(ops, w.experts, h, experts, weights)  # (T, D)


# ---------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------


def sparsemixer_round(s: np.ndarray, candidates: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One round of the sparsemixer for T tokens at once.

    s (T, E) float32: the original router logits.
    candidates (T, E) float32: the logits still in the running (-inf for an expert already chosen).
    Returns expert (T,) int64, weight (T,) float32, and masked (T, E) bool (True = masked out this round).
    """
    T = s.shape[0]
    rows = np.arange(T)
    # The round's best expert, first index on ties (torch.max does the same).
    expert = np.argmax(candidates, axis=-1)  # (T,)
    best = candidates[rows, expert][:, None]  # (T, 1)
    # Relative gap of every expert to the best. 0/0 (best == s[j] == 0) is NaN, which is not > 2*eps, so the
    # expert stays in, as in torch. A gap too large for float32 (huge logits) overflows to inf, which is > 2*eps:
    # masked, as in torch too.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gap = (best - s) / np.maximum(np.abs(s), best)  # (T, E)
    masked = gap > np.float32(2 * eps)  # (T, E) compared in float32, as torch does
    # Softmax over the experts that survive the mask (and are still candidates); the weight is the chosen one's.
    kept = np.where(masked, -np.inf, candidates)  # (T, E)
    numerators = np.exp(kept - best)  # (T, E), 0 where masked; the best is the row max, so exp(0) = 1 is in
    weight = numerators[rows, expert] / numerators.sum(axis=-1)  # (T,)
    return expert.astype(np.int64), weight.astype(np.float32), masked


def sparsemixer(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-2 routing: router logits (T, E) -> experts (T, 2) int64, weights (T, 2) float32.

    Column 0 is the first expert (the argmax), column 1 the second (never equal to the first).
    """
    s = np.asarray(logits, dtype=np.float32)  # (T, E)
    rows = np.arange(s.shape[0])

    e1, w1, _ = sparsemixer_round(s, s, eps)  # round 1: every expert is a candidate

    without_e1 = s.copy()
    without_e1[rows, e1] = -np.inf  # round 2: the first expert is out
    e2, w2, _ = sparsemixer_round(s, without_e1, eps)

    return np.stack([e1, e2], axis=-1), np.stack([w1, w2], axis=-1)


# ---------------------------------------------------------------------------------------------------------
# The experts
# ---------------------------------------------------------------------------------------------------------


def sparse_moe(ops, experts: list, x: np.ndarray, chosen: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Run each chosen expert once on its group of tokens and scatter-add: x (T, D) -> (T, D) float32.

    chosen (T, 2) int64 and weights (T, 2) float32 come from `sparsemixer`. Only experts some token chose are
    read: a decode step (T = 1) touches exactly 2 of the E experts.
    """
    out = np.zeros_like(x)  # (T, D)
    for e in np.unique(chosen):  # ascending expert index, as Transformers
        rows, slots = np.nonzero(chosen == e)  # the n tokens routed to e, and in which slot (first or second)
        w1, w3, w2 = experts[e]  # gate (F, D), up (F, D), down (D, F)
        h = x[rows]  # (n, D) gather
        y = ops.linear(ops.swiglu(ops.linear(h, w1), ops.linear(h, w3)), w2)  # (n, D) SwiGLU expert
        # Weighted scatter-add. A token appears at most once per expert (e2 != e1), so `rows` has no repeats.
        out[rows] += y * weights[rows, slots][:, None]
    return out


# ---------------------------------------------------------------------------------------------------------
# The layer's tensors in a checkpoint
# ---------------------------------------------------------------------------------------------------------


def layer_shapes(cfg, i: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of layer i, named as the released checkpoint names them, with its shape."""
    D, F, E, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.q_size, cfg.kv_size
    p = f"model.layers.{i}."
    shapes = {p + "input_layernorm.weight": (D,), p + "input_layernorm.bias": (D,)}
    for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        shapes[p + f"self_attn.{name}.weight"] = (rows, D)
        if cfg.attention_bias:
            shapes[p + f"self_attn.{name}.bias"] = (rows,)
    shapes[p + "self_attn.o_proj.weight"] = (D, q)
    if cfg.attention_bias:
        shapes[p + "self_attn.o_proj.bias"] = (D,)
    shapes[p + "post_attention_layernorm.weight"] = (D,)
    shapes[p + "post_attention_layernorm.bias"] = (D,)
    shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
    for e in range(E):
        x = p + f"block_sparse_moe.experts.{e}."
        shapes.update({x + "w1.weight": (F, D), x + "w3.weight": (F, D), x + "w2.weight": (D, F)})
    return shapes


def load_layer(t: dict, cfg, i: int) -> Layer:
    p = f"model.layers.{i}."
    a, ex = p + "self_attn.", p + "block_sparse_moe.experts."
    return Layer(
        attn_norm=t[p + "input_layernorm.weight"],
        attn_norm_bias=t[p + "input_layernorm.bias"],
        attn=AttentionWeights(q=t[a + "q_proj.weight"], k=t[a + "k_proj.weight"], v=t[a + "v_proj.weight"],
                              o=t[a + "o_proj.weight"], q_bias=t.get(a + "q_proj.bias"),
                              k_bias=t.get(a + "k_proj.bias"), v_bias=t.get(a + "v_proj.bias"),
                              o_bias=t.get(a + "o_proj.bias")),
        mlp_norm=t[p + "post_attention_layernorm.weight"],
        mlp_norm_bias=t[p + "post_attention_layernorm.bias"],
        router=t[p + "block_sparse_moe.gate.weight"],
        experts=[(t[ex + f"{e}.w1.weight"], t[ex + f"{e}.w3.weight"], t[ex + f"{e}.w2.weight"])
                 for e in range(cfg.num_local_experts)],
    )


def active_parameters(cfg, total: int) -> int:
    """Parameters a token uses: everything but the experts it is not routed to (E - 2 per layer)."""
    unused = cfg.num_local_experts - cfg.num_experts_per_tok
    return total - cfg.num_hidden_layers * unused * 3 * cfg.hidden_size * cfg.intermediate_size
