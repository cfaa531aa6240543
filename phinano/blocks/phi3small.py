"""The Phi-3-small layer (Phi-3-small-8k-instruct, -128k-instruct), as its released modeling code computes it.

    x (T, D) -> x + attention(layernorm(x))                       pre-norm residual, LayerNorm with bias
             -> x + down(gegelu(up(layernorm(x))))               GEGELU MLP, biases on every linear

What sets it apart from the dense Phi-3 layer (blocks/phi3.py):

- Attention is **blocksparse** on every layer that is not dense: layer i (0-based) is dense when
  (i + 1) % dense_attention_every_n_layers == 0, so with the released 2 the even layers 0, 2, ... are sparse.
  There a query sees its own 64-token block and the 15 before it, plus every 8th block further back, each query
  head h shifted by h blocks (kernels/reference.py `blocksparse_visible` is the mask; docs/phi3-small.md draws it).
- Scores are scaled by muP's mup_attn_multiplier / HD = 1/128, not 1/sqrt(HD). The kernels scale by 1/sqrt(HD)
  like every Phi, so q is multiplied by the ratio of the two first.
- q, k and v are one fused `query_key_value`, grouped per KV head: for each of the KVH heads, its G = H / KVH
  query heads, then its key, then its value (so a tensor-parallel split keeps groups whole).
- The MLP's up-projection is interleaved: even output columns feed the gelu branch, odd ones the linear branch.

The embedding multiplier, the logit divisor and the masked dummy tokens are config values the model applies
(model.py); the final norm is called `model.final_layernorm` in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .attention import Step, notify, rotate_cache_attend, wants

NORM_HAS_BIAS = True  # LayerNorm: weight and bias (the final one too)
FINAL_NORM = "model.final_layernorm"  # the final norm's name in the checkpoint (others: model.norm)


@dataclass
class Layer:
    attn_norm: np.ndarray  # (D,)   LayerNorm weight
    attn_norm_bias: np.ndarray  # (D,)
    qkv: np.ndarray  # ((H + 2 KVH) * HD, D)   rows grouped per KV head: G query heads, its k, its v
    qkv_bias: np.ndarray  # ((H + 2 KVH) * HD,)
    dense: np.ndarray  # (D, H*HD)   output projection
    dense_bias: np.ndarray  # (D,)
    mlp_norm: np.ndarray  # (D,)
    mlp_norm_bias: np.ndarray  # (D,)
    up: np.ndarray  # (2F, D)   rows interleaved: 2c gelu branch, 2c + 1 linear branch
    up_bias: np.ndarray  # (2F,)
    down: np.ndarray  # (D, F)
    down_bias: np.ndarray  # (D,)


def norm(ops, cfg, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return ops.layernorm(x, weight, bias, cfg.rms_norm_eps)


def forward_layer(ops, cfg, w: Layer, x: np.ndarray, step: Step, i: int) -> np.ndarray:
    """One decoder layer on the residual stream x (T, D) -> (T, D)."""
    h = ops.layernorm(x, w.attn_norm, w.attn_norm_bias, cfg.rms_norm_eps)  # (T, D)
    x = x + attention(ops, cfg, w, h, step, i)  # (T, D)
    h = ops.layernorm(x, w.mlp_norm, w.mlp_norm_bias, cfg.rms_norm_eps)  # (T, D)
    up = ops.linear(h, w.up, w.up_bias)  # (T, 2F)
    return x + ops.linear(ops.gegelu(up, cfg.gegelu_limit), w.down, w.down_bias)  # (T, D)


def is_dense(cfg, i: int) -> bool:
    """Whether layer i attends densely (else blocksparse). No `dense_attention_every_n_layers`: none is."""
    every = cfg.dense_attention_every_n_layers
    return bool(every) and (i + 1) % every == 0


def head_step(cfg) -> int:
    """How many blocks each query head shifts its vertical stride by: 0 for a homogeneous pattern, else
    max(1, int(vert_stride / H)) as released (1 for the released 8 / 32)."""
    if cfg.blocksparse_homo_head_pattern:
        return 0
    return max(1, int(cfg.blocksparse_vert_stride / cfg.num_attention_heads))


def attention(ops, cfg, w: Layer, x: np.ndarray, step: Step | list[Step], layer: int) -> np.ndarray:
    """Attention of T new tokens over everything cached, dense or blocksparse. x (T, D) normed -> (T, D).
    A list of Steps is a batch of sequences, one row each (Model.step_batch), as in attention.py."""
    T = x.shape[0]
    H, KVH, HD = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = H // KVH
    qkv = ops.linear(x, w.qkv, w.qkv_bias).reshape(T, KVH, G + 2, HD)  # per KV head: G queries, k, v
    q = qkv[:, :, :G].reshape(T, H, HD)  # (T, H, HD): query head kv*G + g belongs to KV head kv
    k = qkv[:, :, G]  # (T, KVH, HD)
    v = qkv[:, :, G + 1]  # (T, KVH, HD)
    pattern = (cfg.blocksparse_block_size, cfg.blocksparse_num_local_blocks, cfg.blocksparse_vert_stride,
               head_step(cfg))

    def attend(s: Step, q, keys, values):  # (n, H, HD) over the sequence's (S, KVH, HD) cache
        if cfg.softmax_scale is not None:  # muP: scores * (mup_attn_multiplier / HD), not the ops' 1/sqrt(HD)
            q = q * np.float32(cfg.softmax_scale * math.sqrt(HD))
        if is_dense(cfg, layer):
            if wants(s, "attention", layer):
                notify(s, "attention", layer, ops.attention_weights(q, keys, s.start, None))
            return ops.attention(q, keys, values, s.start, None)  # (n, H, HD)
        if wants(s, "attention", layer):
            notify(s, "attention", layer, ops.blocksparse_attention_weights(q, keys, s.start, *pattern))
        return ops.blocksparse_attention(q, keys, values, s.start, *pattern)  # (n, H, HD)

    out = rotate_cache_attend(ops, step, layer, q, k, v, attend)  # (T, H, HD)
    return ops.linear(out.reshape(T, H * HD), w.dense, w.dense_bias)  # (T, D)


# ------------------------------------------------------------------ the layer's tensors in a checkpoint
_NAMES = {  # Layer field -> checkpoint name below model.layers.{i}.
    "attn_norm": "input_layernorm.weight",
    "attn_norm_bias": "input_layernorm.bias",
    "qkv": "self_attn.query_key_value.weight",
    "qkv_bias": "self_attn.query_key_value.bias",
    "dense": "self_attn.dense.weight",
    "dense_bias": "self_attn.dense.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "mlp_norm_bias": "post_attention_layernorm.bias",
    "up": "mlp.up_proj.weight",
    "up_bias": "mlp.up_proj.bias",
    "down": "mlp.down_proj.weight",
    "down_bias": "mlp.down_proj.bias",
}


def layer_shapes(cfg, i: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of layer i, named as the released checkpoints name them, with its shape."""
    D, F, HD = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * HD
    shapes = {
        "attn_norm": (D,), "attn_norm_bias": (D,),
        "qkv": (qkv, D), "qkv_bias": (qkv,),
        "dense": (D, cfg.q_size), "dense_bias": (D,),
        "mlp_norm": (D,), "mlp_norm_bias": (D,),
        "up": (2 * F, D), "up_bias": (2 * F,),
        "down": (D, F), "down_bias": (D,),
    }
    return {f"model.layers.{i}.{_NAMES[field]}": shape for field, shape in shapes.items()}


def load_layer(t: dict, cfg, i: int) -> Layer:
    return Layer(**{field: t[f"model.layers.{i}.{name}"] for field, name in _NAMES.items()})


def active_parameters(cfg, total: int) -> int:
    """Parameters a token uses: all of them (blocksparse skips keys, not weights)."""
    return total


def describe(cfg) -> list[tuple[str, str]]:
    """Lines for `phinano info`: the attention pattern and the muP multipliers."""
    L = cfg.num_hidden_layers
    dense = [i for i in range(L) if is_dense(cfg, i)]
    sparse = [i for i in range(L) if not is_dense(cfg, i)]
    heads = "one pattern for all heads" if head_step(cfg) == 0 else f"head h shifted by {head_step(cfg)}*h blocks"
    scale = f"{cfg.softmax_scale:g}" if cfg.softmax_scale is not None else f"1/sqrt({cfg.head_dim})"

    def listed(layers):
        return ", ".join(map(str, layers[:4])) + (", ..." if len(layers) > 4 else "") if layers else "none"

    return [
        ("attention", f"blocksparse on layers {listed(sparse)} (block {cfg.blocksparse_block_size}, "
                      f"{cfg.blocksparse_num_local_blocks} local blocks, vertical stride "
                      f"{cfg.blocksparse_vert_stride}, {heads}); dense on {listed(dense)}"),
        ("muP", f"embeddings x {cfg.embedding_multiplier:g}, attention scale {scale}, "
                f"logits / {cfg.logit_divisor:g}, {len(cfg.dummy_token_ids)} dummy token ids masked"),
    ]
