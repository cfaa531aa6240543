"""The generation loop: prefill the prompt into a fresh KV cache, then one token at a time.

Longrope models switch rotary factors when the sequence grows past original_max_position_embeddings. The
keys cached so far were rotated with the short factors, so at that step the cache is dropped and the whole
sequence (prompt + generated so far) is run again with the long factors -- what Transformers'
`prepare_inputs_for_generation` does for Phi-3, and why cached decoding equals a full recompute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .rope import rope_variant
from .sampling import repetition_penalty as apply_repetition_penalty
from .sampling import sample


def generate_tokens(model, token_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float = 1.0, seed: int | None = None,
                    stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
                    stats: dict | None = None,
                    on_step: Callable[[int, np.ndarray], None] | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new ids (fewer at a stop token, a stop string, or the context's end).

    stop_token_ids: None = the model's generation_config list; [] = never stop on a token.
    stop_strings: stop once the generated text contains one (the completing token is still yielded).
    stats: if given, filled with prompt_tokens, new_tokens, prefill_seconds, decode_seconds, finish_reason
    ("stop" or "length").
    on_step: if given, called as on_step(token, logits) before each token is yielded, with the logits (V,)
    float32 it was drawn from, after the repetition penalty and before temperature (for log-probabilities);
    it may raise to stop the generation.
    """
    cfg = model.config
    ids = model._check_ids(token_ids)  # (P,)
    max_new = max(0, min(int(max_new_tokens), cfg.max_position_embeddings - len(ids)))
    stops = set(model.stop_token_ids if stop_token_ids is None else stop_token_ids)
    if stop_strings and model.tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    rng = np.random.default_rng(seed)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(ids), new_tokens=0, prefill_seconds=0.0, decode_seconds=0.0,
                 finish_reason="length")

    tokens = [int(t) for t in ids]  # the whole sequence so far
    cache = model.new_cache(len(ids) + max_new)
    pending = ids  # tokens not yet in the cache: the prompt, then the last sampled token
    for step in range(max_new):
        t0 = time.perf_counter()
        if cache.variant not in (None, rope_variant(cfg, len(tokens))):  # crossed the original length
            cache.reset()
            pending = np.asarray(tokens, dtype=np.int64)
        logits = model._run(pending, cache, last_only=True)[0]  # (V,) float32
        logits = apply_repetition_penalty(logits, tokens, repetition_penalty)
        token = sample(logits, rng, temperature, top_k, top_p, min_p)
        stats["prefill_seconds" if step == 0 else "decode_seconds"] += time.perf_counter() - t0
        tokens.append(token)
        stats["new_tokens"] = step + 1
        if on_step is not None:
            on_step(token, logits)
        yield token
        if token in stops:
            stats["finish_reason"] = "stop"
            return
        if stop_strings:
            text = model.tokenizer.decode(tokens[len(ids):])
            if any(s in text for s in stop_strings):
                stats["finish_reason"] = "stop"
                return
        pending = np.array([token], dtype=np.int64)


def stream_text(model, token_ids: Sequence[int], max_new_tokens: int, *, stop_strings: Sequence[str] = (),
                skip_special_tokens: bool = True, stats: dict | None = None, **sampling) -> Iterator[str]:
    """Yield the generated text in printable pieces (never half a UTF-8 character, never a lost space).

    A stop string ends the generation and is not yielded; text that could be the start of a stop string
    is held back until it is known not to be one.
    """
    stats = {} if stats is None else stats
    decoder = model.tokenizer.stream(skip_special_tokens=skip_special_tokens)
    keep = max((len(s) for s in stop_strings), default=1) - 1  # chars that might begin a stop string
    held = ""
    tokens = generate_tokens(model, token_ids, max_new_tokens, stats=stats, **sampling)
    try:
        for token in tokens:
            held += decoder.push(token)
            cut = min((held.find(s) for s in stop_strings if s in held), default=-1)
            if cut >= 0:
                stats["finish_reason"] = "stop"
                if cut:
                    yield held[:cut]
                return
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep :]
        held += decoder.flush()
        cut = min((held.find(s) for s in stop_strings if s in held), default=-1)
        if cut >= 0:
            stats["finish_reason"] = "stop"
            held = held[:cut]
        if held:
            yield held
    finally:
        tokens.close()


def speed_line(stats: dict) -> str:
    """One line for humans from a generate_tokens stats dict: prefill and decode tokens/s, finish reason."""
    prefill = stats["prompt_tokens"] / stats["prefill_seconds"] if stats["prefill_seconds"] else 0.0
    decoded = stats["new_tokens"] - 1
    decode = decoded / stats["decode_seconds"] if stats["decode_seconds"] and decoded > 0 else 0.0
    return (f"[{stats['prompt_tokens']} prompt tokens at {prefill:.1f} tok/s, {stats['new_tokens']} new tokens "
            f"at {decode:.1f} tok/s, finish: {stats['finish_reason']}]")
