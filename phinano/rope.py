"""Rotary position embedding tables: the cos and sin each forward pass rotates q and k by.

Three flavours, all computed in float32 exactly as Transformers does:
- default:  inv_freq[i] = 1 / theta^(2i/R)
- longrope (Phi-3 128k, 3.5, 4-mini): inv_freq[i] = 1 / (factor[i] * theta^(2i/R)), where `factor` is the
  config's short list while the sequence fits in original_max_position_embeddings (4096), and the long list
  once it does not. cos and sin are multiplied by an attention factor (1.19024 for 128k models) at every
  length.
- PhiMoE longrope: the same, but the multiplier is short_mscale / long_mscale (1.2431).
- Phi-3-small: default or ("su") longrope with base 1e6; its 128k model's multiplier is short_mscale (1.0 unless
  given) / long_mscale, and every position is first multiplied by `rope_position_scale` (1.0 as released).

The factor choice is per forward pass, by the total length L = last position + 1: there is no mixing of
short- and long-rotated keys. When a generation grows past the original length, the KV cache built with
short factors is stale and the whole sequence is recomputed (see cache.py / generate.py).

Angles are float32(p) * float32(inv_freq) like Transformers; a float64 angle would drift at large p.
"""

from __future__ import annotations

import numpy as np

from .config import Config


def rope_variant(cfg: Config, total_len: int) -> str:
    """Which factor set a forward pass ending at length `total_len` uses: "short", "long" or "default"."""
    if cfg.rope_type != "longrope":
        return "default"
    return "long" if total_len > cfg.original_max_position_embeddings else "short"


def inverse_frequencies(cfg: Config, variant: str) -> np.ndarray:
    """(R/2,) float32 rotation speeds of the R/2 dimension pairs."""
    R = cfg.rotary_dim
    exponent = np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / np.float32(R)  # (R/2,)
    base = np.float32(cfg.rope_theta) ** exponent  # (R/2,)
    if variant == "default":
        return (np.float32(1.0) / base).astype(np.float32)
    factors = cfg.rope_long_factor if variant == "long" else cfg.rope_short_factor
    return (np.float32(1.0) / (np.asarray(factors, dtype=np.float32) * base)).astype(np.float32)


def attention_scale(cfg: Config, variant: str) -> float:
    """The multiplier on cos and sin: 1.0, the longrope attention factor, or PhiMoE's mscale."""
    if variant == "default":
        return 1.0
    if cfg.rope_short_mscale is not None:  # PhiMoE, Phi-3-small-128k
        return cfg.rope_long_mscale if variant == "long" else cfg.rope_short_mscale
    return cfg.rope_attention_factor


def rope_tables(cfg: Config, start: int, T: int, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, R) float32 for positions start .. start+T-1 under the given factor set."""
    positions = np.arange(start, start + T, dtype=np.float32)  # (T,)
    if cfg.rope_position_scale != 1.0:  # Phi-3-small's position scale (float32 product, as released)
        positions = positions * np.float32(cfg.rope_position_scale)
    freqs = positions[:, None] * inverse_frequencies(cfg, variant)[None, :]  # (T, R/2), float32 product
    angles = np.concatenate([freqs, freqs], axis=-1)  # (T, R): pair i and i + R/2 share an angle
    scale = np.float32(attention_scale(cfg, variant))
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)
