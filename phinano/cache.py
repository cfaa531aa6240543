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

import mmap
import platform
import sys
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
        k, v = zeros(self.k.shape), zeros(self.v.shape)
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
    """Room for `capacity` positions in every layer (capacity * L * 2 * KVH * HD * 4 bytes of address space;
    memory only for the positions written, `zeros`)."""
    shape = (cfg.num_hidden_layers, capacity, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(k=zeros(shape), v=zeros(shape))


# MAP_NORESERVE: Python's mmap module names it from 3.13 on; Linux on x86-64 and ARM64 gives it 0x4000.
_NO_RESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") and
                      platform.machine() in ("x86_64", "aarch64") else 0)


def zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of zeros whose memory is taken only as it is written: an anonymous private map without
    a reservation (MAP_NORESERVE). A request that may run to the end of a 128k context (an OpenAI chat request
    without max_tokens) needs room for 131072 positions, 48 GiB a cache for Phi-3.5-mini; Linux refuses such
    a reservation outright on a smaller machine (np.zeros raised MemoryError), while the positions a
    generation really fills cost what they cost. Where anonymous maps are not available: np.zeros."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * 4
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if nbytes == 0 or None in flags:
        return np.zeros(shape, np.float32)
    try:
        buffer = mmap.mmap(-1, nbytes, flags=flags[0] | flags[1] | _NO_RESERVE)
    except (OSError, OverflowError) as e:
        raise PhinanoError(f"cannot set aside {nbytes / 2**30:.1f} GiB for a KV cache of shape {shape}: {e}; "
                           "ask for fewer new tokens") from None
    return np.frombuffer(buffer, np.float32).reshape(shape)
