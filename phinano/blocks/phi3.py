"""The dense Phi-3 layer (Phi-3-mini, Phi-3-medium, Phi-3.5-mini, Phi-4-mini; the text model of Phi-3-vision).

    x (T, D) -> x + attention(rmsnorm(x))               pre-norm residual
             -> x + down(silu(gate(h)) * up(h)),  h = rmsnorm(x)      SwiGLU MLP

On disk q/k/v are one fused `qkv_proj` (rows Q | K | V) and gate/up one `gate_up_proj` (rows gate | up). The
layer multiplies each fused matrix once, as stored, and splits the result: one pass over the weights
instead of three and two, which in decode is 7-9 % faster on those matrices (every product starts and ends
its threads and its memory stream; docs/kernels.md, "One product per fused matrix"). The q, k, v weights
are row views into qkv, for readers and tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import AttentionWeights, Step, self_attention

NORM_HAS_BIAS = False  # RMSNorm: weight only (the final norm too)


@dataclass
class Layer:
    attn_norm: np.ndarray  # (D,)   RMSNorm weight
    attn: AttentionWeights
    mlp_norm: np.ndarray  # (D,)
    gate_up: np.ndarray  # (2F, D)   rows gate (silu branch) | up (linear branch)
    down: np.ndarray  # (D, F)


def norm(ops, cfg, x: np.ndarray, weight: np.ndarray, bias=None) -> np.ndarray:
    return ops.rmsnorm(x, weight, cfg.rms_norm_eps)


def forward_layer(ops, cfg, w: Layer, x: np.ndarray, step: Step, i: int) -> np.ndarray:
    """One decoder layer on the residual stream x (T, D) -> (T, D)."""
    h = ops.rmsnorm(x, w.attn_norm, cfg.rms_norm_eps)  # (T, D)
    x = x + self_attention(ops, cfg, w.attn, h, step, i)  # (T, D)
    h = ops.rmsnorm(x, w.mlp_norm, cfg.rms_norm_eps)  # (T, D)
    gate_up = ops.linear(h, w.gate_up)  # (T, 2F)
    F = gate_up.shape[1] // 2
    return x + ops.linear(ops.swiglu(gate_up[:, :F], gate_up[:, F:]), w.down)  # (T, D)


# ------------------------------------------------------------------ the layer's tensors in a checkpoint
def layer_shapes(cfg, i: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of layer i, named as the released checkpoints name them, with its shape."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (D,),
        p + "self_attn.qkv_proj.weight": (q + 2 * kv, D),
        p + "self_attn.o_proj.weight": (D, q),
        p + "post_attention_layernorm.weight": (D,),
        p + "mlp.gate_up_proj.weight": (2 * F, D),
        p + "mlp.down_proj.weight": (D, F),
    }


def load_layer(t: dict, cfg, i: int) -> Layer:
    p = f"model.layers.{i}."
    q, kv = cfg.q_size, cfg.kv_size
    qkv = t[p + "self_attn.qkv_proj.weight"]  # (H*HD + 2*KVH*HD, D): rows Q | K | V
    gate_up = t[p + "mlp.gate_up_proj.weight"]  # (2F, D): rows gate | up
    return Layer(
        attn_norm=t[p + "input_layernorm.weight"],
        attn=AttentionWeights(q=qkv[:q], k=qkv[q : q + kv], v=qkv[q + kv :], o=t[p + "self_attn.o_proj.weight"],
                              qkv=qkv),
        mlp_norm=t[p + "post_attention_layernorm.weight"],
        gate_up=gate_up,
        down=t[p + "mlp.down_proj.weight"],
    )


def active_parameters(cfg, total: int) -> int:
    """Parameters a token uses: all of them, in a dense model."""
    return total
