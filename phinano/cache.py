"""The KV cache: every layer's rotated keys and values, allocated once per generation.

Prefill writes T positions at once; each decode step appends one (or, verifying a draft, a few: `truncate`
rolls back those rejected). Beam search gives every beam its own `copy`. Keys are stored after rotary, so a
cache is only valid for the rope factor set it was built with (`variant`): `claim` refuses a step with
another set. When a longrope model grows past its original length, the generation loop (generate.py) throws
the cache away and recomputes the sequence (Transformers does the same), so cached decoding always equals a
full recompute.

Every position is kept; the sliding window is applied as a mask in attention, which gives the same result
as Transformers' cache that keeps only the last W-1 keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Config
from .errors import PhinanoError


@dataclass
class KVCache:
    k: np.ndarray  # (L, S_max, KVH, HD) float32, rotated keys
    v: np.ndarray  # (L, S_max, KVH, HD) float32
    length: int = 0  # S: positions filled so far (the same in every layer)
    variant: str | None = None  # rope factor set the cached keys were rotated with

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.length = 0
        self.variant = None

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions only (speculative decoding rolls back a rejected draft). The
        dropped positions are overwritten by the next step; an emptied cache holds no factor set."""
        if not 0 <= length <= self.length:
            raise PhinanoError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
        if length == 0:
            self.variant = None

    def copy(self) -> "KVCache":
        """An independent copy of the filled positions, with the same capacity (a beam that branches)."""
        k, v = np.zeros_like(self.k), np.zeros_like(self.v)
        k[:, : self.length] = self.k[:, : self.length]
        v[:, : self.length] = self.v[:, : self.length]
        return KVCache(k=k, v=v, length=self.length, variant=self.variant)

    def fits(self, variant: str) -> bool:
        """Whether a step rotated with `variant` may append to what is cached."""
        return self.variant is None or self.length == 0 or self.variant == variant

    def claim(self, variant: str) -> None:
        """Mark the cache as holding keys rotated with `variant`; refuse to mix factor sets."""
        if not self.fits(variant):
            raise PhinanoError(f"cache holds keys rotated with the {self.variant} rope factors; a {variant} step "
                               "must recompute the sequence from scratch")
        self.variant = variant


def new_cache(cfg: Config, capacity: int) -> KVCache:
    """Room for `capacity` positions in every layer (capacity * L * 2 * KVH * HD * 4 bytes)."""
    shape = (cfg.num_hidden_layers, capacity, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(k=np.zeros(shape, np.float32), v=np.zeros(shape, np.float32))
