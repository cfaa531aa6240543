"""The Phi-3 decoder, read top to bottom in the order a token travels:

    ids (T,) -> embed (T, D)
             -> L x [ norm -> attention (+ residual) -> norm -> MLP or MoE (+ residual) ]
             -> final norm -> lm_head -> logits (T, V)

Every op goes through `self.ops`, the kernel backend ("numba" by default, "numpy" to read and check:
see kernels/reference.py). Shapes use the legend of config.py; Phi-3-mini values: D 3072, H 32, KVH 32,
HD 96, F 8192, V 32064, L 32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from . import moe
from .cache import KVCache, new_cache
from .config import Config
from .errors import PhinanoError
from .rope import rope_tables, rope_variant
from .weights import LayerWeights, Weights
from .kernels import backend


class Model:
    """A loaded Phi model: config, memory-mapped weights, tokenizer, and the forward pass."""

    def __init__(self, config: Config, weights: Weights, tokenizer=None, stop_token_ids=(), backend_name="numba",
                 name: str = ""):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer  # phinano.tokenizer.Tokenizer, or None for a folder without tokenizer.json
        self.stop_token_ids = tuple(stop_token_ids)  # generation_config.json's eos list
        self.sampling_defaults: dict = {}  # generation_config.json's do_sample settings (used by the CLI)
        self.backend = backend_name
        self.ops = backend(backend_name)
        self.name = name

    # ------------------------------------------------------------------ one layer
    def _norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """RMSNorm for Phi-3; LayerNorm (weight and bias) for PhiMoE. (T, D) -> (T, D)."""
        if bias is None:
            return self.ops.rmsnorm(x, weight, self.config.rms_norm_eps)
        return self.ops.layernorm(x, weight, bias, self.config.rms_norm_eps)

    def _attention(self, w: LayerWeights, x: np.ndarray, cache: KVCache, layer: int, start: int,
                   cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Self-attention of T new tokens over everything cached. x (T, D) -> (T, D)."""
        cfg, ops = self.config, self.ops
        T = x.shape[0]
        q = ops.linear(x, w.q, w.q_bias).reshape(T, cfg.num_attention_heads, cfg.head_dim)  # (T, H, HD)
        k = ops.linear(x, w.k, w.k_bias).reshape(T, cfg.num_key_value_heads, cfg.head_dim)  # (T, KVH, HD)
        v = ops.linear(x, w.v, w.v_bias).reshape(T, cfg.num_key_value_heads, cfg.head_dim)  # (T, KVH, HD)
        q = ops.rope(q, cos, sin)  # (T, H, HD), positions start .. start+T-1
        k = ops.rope(k, cos, sin)  # (T, KVH, HD)
        cache.k[layer, start : start + T] = k
        cache.v[layer, start : start + T] = v
        S = start + T
        out = ops.attention(q, cache.k[layer, :S], cache.v[layer, :S], start, cfg.sliding_window)  # (T, H, HD)
        return ops.linear(out.reshape(T, cfg.q_size), w.o, w.o_bias)  # (T, D)

    def _mlp(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        """SwiGLU: down(up(x) * silu(gate(x))). x (T, D) -> (T, D)."""
        ops = self.ops
        gate = ops.linear(x, w.gate)  # (T, F)
        up = ops.linear(x, w.up)  # (T, F)
        return ops.linear(ops.swiglu(gate, up), w.down)  # (T, D)

    # ------------------------------------------------------------------ the whole stack
    def _run(self, ids: np.ndarray, cache: KVCache, last_only: bool, routing: list | None = None,
             trace: list | None = None) -> np.ndarray:
        """Run T new tokens through the model, appending their keys/values to the cache.

        ids (T,) at positions cache.length .. cache.length+T-1. Returns logits (T, V), or (1, V) for the
        last position only when `last_only` (what generation needs after a prefill). `trace`, if given,
        receives the residual stream x (T, D) after the embedding and after every layer (for debugging
        a parity failure layer by layer).
        """
        cfg, ops, W = self.config, self.ops, self.weights
        T, start = len(ids), cache.length
        if start + T > cache.capacity:
            raise PhinanoError(f"KV cache holds {cache.capacity} positions; {start + T} requested")
        variant = rope_variant(cfg, start + T)
        if cache.variant not in (None, variant):
            raise PhinanoError(f"cache built with {cache.variant} rope factors cannot take a {variant} step")
        cos, sin = rope_tables(cfg, start, T, variant)  # (T, R) each

        x = ops.embed(W.embed, ids)  # (T, D)
        if trace is not None:
            trace.append(x)
        for i, w in enumerate(W.layers):
            x = x + self._attention(w, self._norm(x, w.attn_norm, w.attn_norm_bias), cache, i, start, cos, sin)
            h = self._norm(x, w.mlp_norm, w.mlp_norm_bias)  # (T, D)
            if cfg.is_moe:
                out, chosen = moe.sparse_moe(ops, cfg, w, h)  # (T, D), routing of this layer
                if routing is not None:
                    routing.append(chosen)
            else:
                out = self._mlp(w, h)
            x = x + out
            if trace is not None:
                trace.append(x)
        cache.length, cache.variant = start + T, variant

        if last_only:
            x = x[-1:]  # (1, D)
        x = self._norm(x, W.final_norm, W.final_norm_bias)
        return ops.linear(x, W.lm_head, W.lm_head_bias)  # (T, V) float32

    # ------------------------------------------------------------------ public API
    def _check_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise PhinanoError("no input tokens")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise PhinanoError(f"token id out of range 0..{self.config.vocab_size - 1}")
        if ids.size > self.config.max_position_embeddings:
            raise PhinanoError(
                f"prompt of {ids.size} tokens is longer than the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        return ids

    def forward(self, token_ids: Sequence[int], return_routing: bool = False):
        """Float32 logits (T, V) of a full causal forward from scratch (no cache carried over).

        With `return_routing=True` (PhiMoE), also returns, per layer, (experts (T, 2) int64, weights (T, 2)
        float32): the two experts each token was sent to and their sparsemixer weights.
        """
        ids = self._check_ids(token_ids)
        routing: list | None = [] if return_routing else None
        logits = self._run(ids, new_cache(self.config, len(ids)), last_only=False, routing=routing)
        return (logits, routing) if return_routing else logits

    def new_cache(self, capacity: int) -> KVCache:
        return new_cache(self.config, capacity)

    def stream(self, token_ids: Sequence[int], max_new_tokens: int, **sampling) -> Iterator[int]:
        """Yield new token ids one at a time (see generate.generate_tokens for the options)."""
        from .generate import generate_tokens

        return generate_tokens(self, token_ids, max_new_tokens, **sampling)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None) -> list[int]:
        """The new token ids only. Greedy at temperature 0; uses the KV cache.

        stop_token_ids=None stops on the model's own list (generation_config.json); [] never stops early.
        """
        return list(self.stream(token_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                stop_token_ids=stop_token_ids, stop_strings=stop_strings))

    # ------------------------------------------------------------------ facts for `phinano info`
    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token). Equal for dense models; PhiMoE activates 2 of 16 experts."""
        return moe.parameter_counts(self.config)
