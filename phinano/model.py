"""The Phi decoder, read top to bottom in the order a token travels:

    ids (T,) -> embed (T, D)          (or input embeddings (T, D) given directly, e.g. image features)
             -> L x layer             (blocks/<architecture>.py: norm -> attention -> norm -> MLP or experts)
             -> final norm -> lm_head -> logits (T, V)

Phi-3-small adds muP's two multipliers and a mask, all config values that are 1 / empty for the other models:
embeddings x `embedding_multiplier` (10), logits / `logit_divisor` (8), and its unused vocabulary slots
(`dummy_token_ids`) get the float32 minimum, as released, so they are never chosen.

`Model.step` is the one way through the stack: T new positions into a KV cache. `forward` is a step from
scratch; the generation loop (generate.py) is a prefill step and then one step per token. Every op goes
through `self.ops`, the kernel backend ("numba" by default, "numpy" to read and check: kernels/reference.py).
Shapes use the legend of config.py; Phi-3-mini values: D 3072, H 32, KVH 32, HD 96, F 8192, V 32064, L 32.

An observer watches a step without changing it: a dict {fact: callback(layer, value)} with any of
    "residual"   x (T, D) after the embedding (layer -1) and after each layer (layer 0 .. L-1)
    "attention"  probabilities (H, T, S) of each layer (computed only when asked for)
    "routing"    (experts (T, 2) int64, weights (T, 2) float32) of each MoE layer
    "final"      the final norm's output (T, D) (layer L), what the head multiplies
and optionally "layers": {fact: layer numbers}, to watch a fact in those layers only (attention maps of the
other layers are then not computed).
Tests, the routing trace (`--show-experts`) and the trace tools use it; nothing else needs to know.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .beams import beam_search
from .blocks import block_module
from .blocks.attention import Step, notify
from .cache import KVCache, new_cache
from .config import Config
from .errors import PhinanoError
from .generate import generate_tokens
from .kernels import backend
from .rope import rope_tables, rope_variant
from .weights import Weights, parameter_counts


class RowOps:
    """A kernel backend whose `linear` is its `linear_rows`: for a batch of rows that belong to different
    sequences, so that the layers (blocks/) run unchanged and each row comes out as it would alone."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name: str):
        return getattr(self.ops, name)

    def linear(self, x: np.ndarray, w, b=None) -> np.ndarray:
        return self.ops.linear_rows(x, w, b)


class Model:
    """A loaded Phi model: config, memory-mapped weights, tokenizer, and the forward pass."""

    def __init__(self, config: Config, weights: Weights, tokenizer=None, stop_token_ids=(), backend_name="numba",
                 name: str = ""):
        self.config = config
        self.weights = weights
        self.blocks = block_module(config)  # the architecture's layer: blocks/phi3.py, blocks/phimoe.py
        self.tokenizer = tokenizer  # phinano.tokenizer.Tokenizer, or None for a folder without tokenizer.json
        self.stop_token_ids = tuple(stop_token_ids)  # generation_config.json's eos list
        self.sampling_defaults: dict = {}  # generation_config.json's do_sample settings (used by the CLI)
        self.backend = backend_name
        self.ops = backend(backend_name)
        self.name = name

    # ------------------------------------------------------------------ the one way through the stack
    def step(self, cache: KVCache, ids: Sequence[int] | None = None, *, embeddings: np.ndarray | None = None,
             observer: dict | None = None, last_only: bool = False) -> np.ndarray:
        """Run T new positions through the model, appending their keys and values to `cache`.

        Input: token ids (T,), or input embeddings (T, D) float32 placed as they are (an image encoder's
        features between text tokens). The positions are cache.length .. cache.length+T-1. Returns float32
        logits (T, V), or (1, V) for the last position only when `last_only` (all generation needs).
        """
        cfg, ops, W = self.config, self.ops, self.weights
        if (ids is None) == (embeddings is None):
            raise PhinanoError("step takes exactly one of token ids and input embeddings")
        start = cache.length
        if embeddings is None:
            x = self.embed(ops, self.check_ids(ids, start))  # (T, D)
        else:
            x = self.check_embeddings(embeddings, start)  # (T, D)
            if cfg.embedding_multiplier != 1.0:  # Phi-3-small (muP): given embeddings as ids' own
                x = x * np.float32(cfg.embedding_multiplier)
        T = x.shape[0]
        step = self.begin(cache, T, observer)  # what every layer of this step shares

        notify(step, "residual", -1, x)
        for i, layer in enumerate(W.layers):
            x = self.blocks.forward_layer(ops, cfg, layer, x, step, i)  # (T, D)
            notify(step, "residual", i, x)
        cache.length = start + T

        if last_only:
            x = x[-1:]  # (1, D)
        x = self.blocks.norm(ops, cfg, x, W.final_norm, W.final_norm_bias)  # (T, D)
        notify(step, "final", cfg.num_hidden_layers, x)
        return self.head(ops, x)  # (T, V)

    def step_batch(self, caches: Sequence[KVCache], ids: Sequence[int]) -> np.ndarray:
        """One new token for each of B sequences at once (batched decode, `phinano serve`): ids[i] goes into
        caches[i] at that cache's own position, rotated with its own factor set. Returns float32 logits (B, V).

        Row i is bit for bit what `step(caches[i], [ids[i]], last_only=True)` returns: the linears run once
        over the B rows with `linear_rows` (each weight read once for all of them, each row summed as it
        would be alone; `RowOps`), attention runs per sequence, and every other op works row by row.
        No observer: watch a sequence with `step`.
        """
        cfg, ops, W = self.config, RowOps(self.ops), self.weights
        if len(caches) != len(ids) or not caches:
            raise PhinanoError(f"step_batch needs one token per cache: {len(ids)} tokens for {len(caches)} caches")
        for cache in caches:
            self._check_length(cache.length + 1)
        steps = [self.begin(cache, 1) for cache in caches]  # each sequence at its own position
        x = self.embed(ops, self.check_ids(ids))  # (B, D): row i is sequence i's token

        for i, layer in enumerate(W.layers):
            x = self.blocks.forward_layer(ops, cfg, layer, x, steps, i)  # (B, D)
        for cache in caches:
            cache.length += 1
        x = self.blocks.norm(ops, cfg, x, W.final_norm, W.final_norm_bias)  # (B, D)
        return self.head(ops, x)  # (B, V)

    def begin(self, cache: KVCache, T: int, observer: dict | None = None) -> Step:
        """The Step of T new positions at the end of `cache`: their rotary tables (T, R), with the factor set
        of the total length (longrope), which the cache must already hold or be empty for."""
        start = cache.length
        if start + T > cache.capacity:
            raise PhinanoError(f"KV cache holds {cache.capacity} positions; {start + T} requested")
        variant = rope_variant(self.config, start + T)  # the rotary factor set of this step (longrope)
        cache.claim(variant)  # refuses keys rotated with another set: the caller must recompute (generate.py)
        cos, sin = rope_tables(self.config, start, T, variant)  # (T, R) each
        return Step(cache, start, cos, sin, observer)

    # ------------------------------------------------------------------ the two ends of the stack
    def embed(self, ops, ids: np.ndarray) -> np.ndarray:
        """Token ids (T,) -> embeddings (T, D) float32, times muP's embedding multiplier (Phi-3-small)."""
        x = ops.embed(self.weights.embed, ids)  # (T, D)
        if self.config.embedding_multiplier != 1.0:
            x = x * np.float32(self.config.embedding_multiplier)
        return x

    def head(self, ops, x: np.ndarray) -> np.ndarray:
        """Final-normed x (T, D) -> float32 logits (T, V). Phi-3-small divides them by muP's width multiplier
        and gives the vocabulary's dummy slots (ids no token uses) the float32 minimum, as released."""
        cfg, W = self.config, self.weights
        logits = ops.linear(x, W.lm_head, W.lm_head_bias)  # (T, V) float32
        if cfg.logit_divisor != 1.0:
            logits /= np.float32(cfg.logit_divisor)
        if cfg.dummy_token_ids:
            logits[:, cfg.dummy_token_ids] = np.finfo(np.float32).min
        return logits

    # ------------------------------------------------------------------ input checks
    def check_ids(self, token_ids: Sequence[int], start: int = 0, images: Sequence | None = None) -> np.ndarray:
        """Token ids as int64 (T,), refusing an empty input, ids outside the vocabulary, or a sequence
        longer than the model's context. With `images` (see with_images), -i marks a position of image i."""
        try:
            ids = np.asarray(token_ids).reshape(-1)
        except (TypeError, ValueError) as e:  # ragged nesting and the like
            raise PhinanoError(f"token ids must be a sequence of integers ({e})") from None
        if ids.size == 0:
            raise PhinanoError("no input tokens")
        if ids.dtype.kind not in "iu":  # floats would be cut to integers, strings and bools are no ids
            raise PhinanoError(f"token ids must be integers, got {ids.dtype} values")
        ids = ids.astype(np.int64)  # (T,)
        text = ids  # the ids the vocabulary check applies to
        if images:
            self.embed_prompt(ids, images, check_only=True)
            text = np.where(ids < 0, 0, ids)  # -i marks image i's positions, checked just now
        if text.min() < 0 or text.max() >= self.config.vocab_size:
            raise PhinanoError(f"token id out of range 0..{self.config.vocab_size - 1}")
        self._check_length(start + ids.size)
        return ids

    def check_embeddings(self, embeddings: np.ndarray, start: int = 0) -> np.ndarray:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.config.hidden_size:
            raise PhinanoError(f"input embeddings must be (T, {self.config.hidden_size}) with T >= 1, got {x.shape}")
        self._check_length(start + x.shape[0])
        return x

    def _check_length(self, n: int) -> None:
        context = self.config.max_position_embeddings
        if n > context:
            raise PhinanoError(f"prompt of {n} tokens is longer than the model's context of {context} tokens")

    # ------------------------------------------------------------------ images (Phi-3-vision; phinano/vision/)
    def with_images(self, token_ids: Sequence[int], images: Sequence) -> tuple[list[int], list[np.ndarray]]:
        """A prompt with one id -i per `<|image_i|>` marker (Tokenizer.encode_prompt) and its images (paths,
        bytes or PIL images) -> (the ids with each marker expanded to the image's positions, the (N_i, D)
        vectors of each image). Both go to `generate(..., images=...)` or `embed_prompt`."""
        from .vision import prompt

        if self.weights.vision is None:
            raise PhinanoError(f"{self.name or 'this model'} takes no images (not a Phi-3-vision checkpoint)")
        if len(prompt.markers(token_ids)) != len(images):  # before minutes of image encoding
            prompt.expand(token_ids, [0] * len(images))
        vectors = [self.weights.vision.embed(self.ops, image) for image in images]  # each (N_i, D)
        return prompt.expand(token_ids, [len(v) for v in vectors]), vectors

    def embed_prompt(self, ids: Sequence[int], images: Sequence[np.ndarray], check_only: bool = False) -> np.ndarray:
        """Input embeddings (T, D) of ids in which each run of -i holds image i's vectors (N_i, D), in order;
        a run may be cut at the end (a prompt fed in parts is not: see generate.py)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        runs = []  # (first position, image number, length)
        for t in np.flatnonzero(ids < 0):
            if runs and ids[t] == -runs[-1][1] and runs[-1][0] + runs[-1][2] == t:
                runs[-1][2] += 1
            else:
                runs.append([t, int(-ids[t]), 1])
        for first, i, n in runs:
            if i > len(images) or n != len(images[i - 1]):
                size = "" if i > len(images) else f" of {len(images[i - 1])} positions"
                raise PhinanoError(f"{n} positions marked for image {i}{size}, of {len(images)} image(s) given")
        if check_only:
            return ids
        x = self.ops.embed(self.weights.embed, np.where(ids < 0, 0, ids))  # (T, D)
        for first, i, n in runs:
            x[first : first + n] = images[i - 1]
        return x

    # ------------------------------------------------------------------ conveniences over `step`
    def new_cache(self, capacity: int) -> KVCache:
        return new_cache(self.config, capacity)

    def forward(self, token_ids: Sequence[int] | None = None, *, embeddings: np.ndarray | None = None,
                observer: dict | None = None, return_routing: bool = False, images: Sequence | None = None):
        """Float32 logits (T, V) of a full causal forward from scratch (no cache carried over).

        With `images` (Phi-3-vision), token_ids hold one -i per `<|image_i|>` marker (Tokenizer.encode_prompt);
        the logits are those of the expanded prompt, one row per position (Model.with_images).

        With `return_routing=True` (PhiMoE), also returns, per layer, (experts (T, 2) int64, weights (T, 2)
        float32): the two experts each token was sent to and their sparsemixer weights.
        """
        if images:
            ids, vectors = self.with_images(token_ids, images)
            token_ids, embeddings = None, self.embed_prompt(ids, vectors)
        given = token_ids if embeddings is None else embeddings
        T = len(given) if given is not None else 1  # neither given: step says so
        routing: list = []
        if return_routing:
            observer = {**(observer or {}), "routing": lambda layer, r: routing.append(r)}
        logits = self.step(self.new_cache(max(T, 1)), token_ids, embeddings=embeddings, observer=observer)
        return (logits, routing) if return_routing else logits

    def stream(self, token_ids: Sequence[int], max_new_tokens: int, images: Sequence | None = None,
               **options) -> Iterator[int]:
        """Yield new token ids one at a time (generate.generate_tokens lists the options)."""
        if images:
            token_ids, options["images"] = self.with_images(token_ids, images)
        return generate_tokens(self, token_ids, max_new_tokens, **options)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int, images: Sequence | None = None,
                 **options) -> list[int]:
        """The new token ids only. Greedy unless a temperature > 0 is given; uses the KV cache.

        Options (generate.generate_tokens): temperature, top_k, top_p, min_p, repetition_penalty, seed,
        sampler_order, prompt_lookup_num_tokens, stop_token_ids (None: the model's own list; []: never stop
        early), stop_strings (a string or a list of them), observer. With num_beams > 1: beam search
        (beams.beam_search: length_penalty, early_stopping, stop_token_ids; Transformers' generate(num_beams=B)).
        images (Phi-3-vision): paths, bytes or PIL images for the prompt's `<|image_1|>`, `<|image_2|>` ...
        markers; token_ids is then Tokenizer.encode_prompt of the prompt text (one id -i per marker).
        """
        if options.get("num_beams", 1) != 1:
            if images:
                raise PhinanoError("beam search takes text prompts only (no images)")
            return beam_search(self, token_ids, max_new_tokens, **options)[0]
        for beam_only in ("num_beams", "length_penalty", "early_stopping"):  # no effect on one sequence
            options.pop(beam_only, None)
        return list(self.stream(token_ids, max_new_tokens, images, **options))

    # ------------------------------------------------------------------ facts for `phinano info`
    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token). Equal for dense models; PhiMoE activates 2 of 16 experts."""
        return parameter_counts(self.config)
