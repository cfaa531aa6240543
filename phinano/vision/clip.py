"""The image tower: CLIP ViT-L/14-336, as Phi-3-vision stores it and reads it.

    crop (3, 336, 336) -> 24 x 24 patches of 14 x 14 pixels, each a (588,) vector
                       -> patch embedding (576, 1024), a class token in front (577, 1024), + position embeddings
                       -> pre-LayerNorm
                       -> 23 of the 24 pre-LN layers: x + attention(ln1(x)), x + fc2(quick_gelu(fc1(ln2(x))))
                       -> drop the class token: features (576, 1024)

Phi-3-vision takes its features from `hidden_states[-2]`, the output of the second-to-last layer: the last
layer and CLIP's `post_layernorm` are stored in the checkpoint but never used, so they are not run here.
Attention sees every token (no mask). The patch embedding is a 14 x 14 convolution with stride 14 and no
bias, which is one `linear` over the flattened patches. Every op goes through `ops` (kernels/).

An image's crops go through together, GROUP at a time (see GROUP): their tokens side by side, (G * (P + 1), C),
in every linear, LayerNorm and activation; attention alone is per crop.

Shapes: N crops of an image, G crops in a group, P patches per crop (576), C tower width (1024), TH tower heads
(16), TF tower MLP width (4096).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREFIX = "model.vision_embed_tokens.img_processor.vision_model."
IMAGE_SIZE = 336  # crop side in pixels
PATCH = 14  # patch side in pixels
GRID = IMAGE_SIZE // PATCH  # 24 patches a side, P = 576
WIDTH = 1024  # C
HEADS = 16  # TH, head dim 64
MLP_WIDTH = 4096  # TF
LAYERS = 24  # stored; the features come from the output of layer LAYERS - 1 (hidden_states[-2])
EPS = 1e-5  # every LayerNorm of the tower


@dataclass
class TowerLayer:
    ln1_w: np.ndarray  # (C,)
    ln1_b: np.ndarray  # (C,)
    q: np.ndarray  # (C, C)
    q_b: np.ndarray  # (C,)
    k: np.ndarray  # (C, C)
    k_b: np.ndarray  # (C,)
    v: np.ndarray  # (C, C)
    v_b: np.ndarray  # (C,)
    o: np.ndarray  # (C, C)
    o_b: np.ndarray  # (C,)
    ln2_w: np.ndarray  # (C,)
    ln2_b: np.ndarray  # (C,)
    fc1: np.ndarray  # (TF, C)
    fc1_b: np.ndarray  # (TF,)
    fc2: np.ndarray  # (C, TF)
    fc2_b: np.ndarray  # (C,)


@dataclass
class Tower:
    patch: np.ndarray  # (C, 3 * 14 * 14) the convolution's kernels, flattened as (channel, row, column)
    class_embedding: np.ndarray  # (C,)
    positions: np.ndarray  # (P + 1, C) position embeddings, class token first
    pre_ln_w: np.ndarray  # (C,)
    pre_ln_b: np.ndarray  # (C,)
    layers: list  # LAYERS - 1 x TowerLayer: the ones the features pass through


def tower_shapes() -> dict[str, tuple[int, ...]]:
    """Every tower tensor a released checkpoint holds, with its shape (the unused last layer included)."""
    C, F = WIDTH, MLP_WIDTH
    shapes = {
        PREFIX + "embeddings.class_embedding": (C,),
        PREFIX + "embeddings.patch_embedding.weight": (C, 3, PATCH, PATCH),
        PREFIX + "embeddings.position_embedding.weight": (GRID * GRID + 1, C),
        PREFIX + "pre_layrnorm.weight": (C,),  # sic: CLIP's spelling
        PREFIX + "pre_layrnorm.bias": (C,),
        PREFIX + "post_layernorm.weight": (C,),
        PREFIX + "post_layernorm.bias": (C,),
    }
    for i in range(LAYERS):
        p = f"{PREFIX}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (C, C)
            shapes[p + f"self_attn.{name}.bias"] = (C,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{name}.weight"] = (C,)
            shapes[p + f"{name}.bias"] = (C,)
        shapes[p + "mlp.fc1.weight"] = (F, C)
        shapes[p + "mlp.fc1.bias"] = (F,)
        shapes[p + "mlp.fc2.weight"] = (C, F)
        shapes[p + "mlp.fc2.bias"] = (C,)
    return shapes


def load_tower(t: dict) -> Tower:
    """The tower's tensors (names of `tower_shapes`, already checked) arranged for `features`."""
    layers = []
    for i in range(LAYERS - 1):
        p = f"{PREFIX}encoder.layers.{i}."
        a = p + "self_attn."
        layers.append(TowerLayer(
            ln1_w=t[p + "layer_norm1.weight"], ln1_b=t[p + "layer_norm1.bias"],
            q=t[a + "q_proj.weight"], q_b=t[a + "q_proj.bias"], k=t[a + "k_proj.weight"], k_b=t[a + "k_proj.bias"],
            v=t[a + "v_proj.weight"], v_b=t[a + "v_proj.bias"], o=t[a + "out_proj.weight"], o_b=t[a + "out_proj.bias"],
            ln2_w=t[p + "layer_norm2.weight"], ln2_b=t[p + "layer_norm2.bias"],
            fc1=t[p + "mlp.fc1.weight"], fc1_b=t[p + "mlp.fc1.bias"],
            fc2=t[p + "mlp.fc2.weight"], fc2_b=t[p + "mlp.fc2.bias"],
        ))
    return Tower(
        patch=t[PREFIX + "embeddings.patch_embedding.weight"].reshape(WIDTH, 3 * PATCH * PATCH),
        class_embedding=t[PREFIX + "embeddings.class_embedding"],
        positions=t[PREFIX + "embeddings.position_embedding.weight"],
        pre_ln_w=t[PREFIX + "pre_layrnorm.weight"],
        pre_ln_b=t[PREFIX + "pre_layrnorm.bias"],
        layers=layers,
    )


def patches(crop: np.ndarray) -> np.ndarray:
    """A crop (3, 336, 336) -> its 24 x 24 patches in reading order, each flattened as (channel, row, column),
    the order of the convolution's kernels: (P, 3 * 14 * 14)."""
    x = crop.reshape(3, GRID, PATCH, GRID, PATCH)  # (channel, patch row, row, patch column, column)
    return x.transpose(1, 3, 0, 2, 4).reshape(GRID * GRID, 3 * PATCH * PATCH)


# Crops go through the tower GROUP at a time, not all at once. Every linear, LayerNorm and activation runs on the
# group's (GROUP * (P + 1), C) rows: one weight read (and bf16 widening) and one large BLAS product per group.
# Memory bounds the group: the MLP's (GROUP * (P + 1), TF) float32 activation is 38 MB for 4 crops, but would be
# 160 MB (twice: before and after quick-GELU) for a whole 17-crop image, while 2308 rows already make products
# large enough for BLAS.
GROUP = 4


def features(ops, tower: Tower, crops: np.ndarray) -> np.ndarray:
    """Normalised crops (N, 3, 336, 336) float32 -> their patch features (N, P, C): hidden_states[-2], class token
    dropped. Each crop's features are its own (attention stays within a crop), whatever the others are."""
    parts = [group_features(ops, tower, crops[i : i + GROUP]) for i in range(0, len(crops), GROUP)]
    return np.concatenate(parts) if parts else np.empty((0, GRID * GRID, WIDTH), np.float32)  # (N, P, C)


def group_features(ops, tower: Tower, crops: np.ndarray) -> np.ndarray:
    """A few crops (G, 3, 336, 336) -> (G, P, C), their tokens side by side through every layer."""
    G = len(crops)
    x = ops.linear(np.concatenate([patches(c) for c in crops]), tower.patch).reshape(G, GRID * GRID, WIDTH)
    cls = np.broadcast_to(ops.widen(tower.class_embedding), (G, 1, WIDTH))  # (G, 1, C)
    x = np.concatenate([cls, x], axis=1) + ops.widen(tower.positions)  # (G, P + 1, C)
    x = ops.layernorm(x.reshape(-1, WIDTH), tower.pre_ln_w, tower.pre_ln_b, EPS)  # (G * (P + 1), C)
    for layer in tower.layers:
        x = forward_layer(ops, layer, x, G)  # (G * (P + 1), C)
    return x.reshape(G, GRID * GRID + 1, WIDTH)[:, 1:]  # (G, P, C)


def forward_layer(ops, w: TowerLayer, x: np.ndarray, crops: int = 1) -> np.ndarray:
    """One pre-LN encoder layer over `crops` crops' tokens one after another, x (G * (P + 1), C) -> the same.
    The linears, norms and MLP treat every token alike; only attention is per crop."""
    T = x.shape[0] // crops  # P + 1 tokens per crop
    h = ops.layernorm(x, w.ln1_w, w.ln1_b, EPS)  # (G * T, C)
    q = ops.linear(h, w.q, w.q_b).reshape(crops, T, HEADS, WIDTH // HEADS)  # (G, T, TH, 64)
    k = ops.linear(h, w.k, w.k_b).reshape(crops, T, HEADS, WIDTH // HEADS)
    v = ops.linear(h, w.v, w.v_b).reshape(crops, T, HEADS, WIDTH // HEADS)
    attended = np.concatenate([ops.encoder_attention(q[g], k[g], v[g]) for g in range(crops)])  # (G * T, TH, 64)
    x = x + ops.linear(attended.reshape(-1, WIDTH), w.o, w.o_b)  # (G * T, C)
    h = ops.layernorm(x, w.ln2_w, w.ln2_b, EPS)
    return x + ops.linear(ops.quick_gelu(ops.linear(h, w.fc1, w.fc1_b)), w.fc2, w.fc2_b)  # (G * T, C)
