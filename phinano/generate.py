"""The generation loop, the only one (beam search, which keeps several sequences, is beams.py): prefill the
prompt, then one token per step (or a few, with prompt lookup), until a stop.

    Sequence        the tokens so far and their KV cache; `feed` steps the model and owns the longrope switch;
                    `truncate` rolls back a rejected draft, `copy` branches a beam (beams.py)
    TextStops       tokens -> printable text, ended at the first stop string (one mechanism for both)
    generate_steps  the loop: feed, penalise, sample, check stops; yields (token, text piece). With
                    prompt_lookup_num_tokens, each step also checks a draft from speculate.py and may emit
                    several tokens, the same ones (docs/speculation.md)
    generate_tokens the new token ids;  stream_text  the new text, in printable pieces

Longrope models switch rotary factors when the sequence grows past original_max_position_embeddings. The keys
cached so far were rotated with the short factors, so at that step the cache is dropped and the whole sequence
(prompt + generated so far) is run again with the long factors -- what Transformers' generation does for
Phi-3, and why cached decoding equals a full recompute (docs/pitfalls.md#longrope-switch).

This module drives any model with `step`, `new_cache`, `check_ids`, `config`, `tokenizer` and
`stop_token_ids` (model.py's Model); it never imports the model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence as Ids

import numpy as np

from .errors import PhinanoError
from .rope import rope_variant
from .sampling import check_options, sample
from .speculate import prompt_lookup
from .sampling import repetition_penalty as apply_repetition_penalty


def stop_ids(model, stop_token_ids) -> set[int]:
    """The ids that end a generation: the model's own (None) or the given ones, each an integer id."""
    if stop_token_ids is None:
        return set(model.stop_token_ids)
    if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
        raise PhinanoError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
    ids = list(stop_token_ids)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in ids):
        raise PhinanoError(f"stop_token_ids must be a list of token ids, got {ids!r}")
    return {int(i) for i in ids}


def stop_texts(stop_strings) -> list[str]:
    """The stop strings as a list: one string, or a list of them (empty ones are dropped)."""
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not hasattr(stop_strings, "__iter__") or isinstance(stop_strings, bytes):
        raise PhinanoError(f"stop_strings must be a list of strings, got {stop_strings!r}")
    texts = list(stop_strings)
    if not all(isinstance(t, str) for t in texts):
        raise PhinanoError(f"stop_strings must be a list of strings, got {texts!r}")
    return [t for t in texts if t]


class Sequence:
    """A sequence being generated: its tokens and their KV cache (room for `capacity` positions)."""

    def __init__(self, model, capacity: int, observer: dict | None = None, images: Ids | None = None):
        self.model = model
        self.cache = model.new_cache(capacity)
        self.tokens: list[int] = []  # every token whose keys are (or were) cached
        self.observer = observer  # passed to every model step (see model.py)
        self.images = images  # (N_i, D) vectors of image i, for the runs of id -i in the prompt (Model.with_images)

    def feed(self, new: Ids[int]) -> np.ndarray:
        """Append tokens and return the logits (V,) float32 after the last of them.

        If the sequence crosses the original length here, keys cached with the short factors are stale: the
        cache is dropped and the whole sequence runs again, with the long factors."""
        return self.feed_rows(new, 1)[0]

    def feed_rows(self, new: Ids[int], rows: int) -> np.ndarray:
        """Append tokens and return the logits (rows, V) float32 after each of the last `rows` of them (a
        draft being verified needs one row per drafted token)."""
        new = [int(t) for t in new]
        pending = new
        if not self.cache.fits(rope_variant(self.model.config, len(self.tokens) + len(new))):
            self.cache.reset()
            pending = self.tokens + new
        if any(t < 0 for t in pending):  # image positions: the prompt goes in as embeddings
            x = self.model.embed_prompt(pending, self.images)  # (T, D)
            logits = self.model.step(self.cache, embeddings=x, observer=self.observer, last_only=rows == 1)
        else:
            logits = self.model.step(self.cache, pending, observer=self.observer, last_only=rows == 1)
        self.tokens += new
        return logits[-rows:]

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (a rejected draft): their keys are dropped too."""
        del self.tokens[length:]
        self.cache.truncate(length)

    def copy(self) -> "Sequence":
        """An independent copy (a beam that branches): same tokens, its own cache."""
        twin = copy.copy(self)
        twin.tokens, twin.cache = list(self.tokens), self.cache.copy()
        return twin


class TextStops:
    """Generated tokens -> printable text, ended at the first stop string.

    `push(token)` returns the text that is now safe to show: never half a UTF-8 character, never text that
    could still be the start of a stop string. Once a stop string appears, `stopped` is True and neither it
    nor anything after it is ever returned. `flush()` returns what is held back when generation ends.
    """

    def __init__(self, tokenizer, stop_strings: Ids[str] = (), skip_special_tokens: bool = True):
        self.stops = stop_texts(stop_strings)
        if tokenizer is None:
            raise PhinanoError("stop strings and text output need a tokenizer (no tokenizer.json in the model folder)")
        self.decoder = tokenizer.stream(skip_special_tokens=skip_special_tokens)
        self.keep = max((len(s) for s in self.stops), default=1) - 1  # chars that might begin a stop string
        self.held = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.held += self.decoder.push(token)
        return self._release(final=False)

    def flush(self) -> str:
        if not self.stopped:
            self.held += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((self.held.find(s) for s in self.stops if s in self.held), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.held = self.held[:cut], ""
            return out
        n = len(self.held) if final else max(0, len(self.held) - self.keep)
        out, self.held = self.held[:n], self.held[n:]
        return out


def generate_steps(model, token_ids: Ids[int], max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                   repetition_penalty: float = 1.0, seed: int | None = None, sampler_order: str = "transformers",
                   prompt_lookup_num_tokens: int | None = None,
                   stop_token_ids: Ids[int] | None = None, text: TextStops | None = None,
                   stats: dict | None = None, on_step: Callable[[int, np.ndarray], None] | None = None,
                   observer: dict | None = None, sequence: Sequence | None = None,
                   images: Ids | None = None) -> Iterator[tuple[int, str]]:
    """The loop. Yields (token, text piece) for up to `max_new_tokens` new tokens; the piece is what `text`
    releases for that token ("" without `text`). Ends early at a stop token, a stop string or the context's end.

    stop_token_ids: None = the model's own list (generation_config.json); [] = never stop on a token.
    sampler_order: "transformers" or "llama.cpp" (sampling.py).
    prompt_lookup_num_tokens: K > 0 drafts up to K tokens per step by prompt lookup (speculate.py) and checks
    them in one step; the tokens are the plain loop's (docs/speculation.md).
    stats: if given, filled with prompt_tokens, new_tokens, prefill_seconds, decode_seconds, finish_reason
    ("stop" or "length"), and with speculation drafted and accepted (draft tokens proposed, kept).
    on_step(token, logits): called before each token is yielded, with the logits (V,) float32 it was drawn
    from (after the repetition penalty, before temperature); it may raise to stop the generation.
    sequence: generate into this Sequence (the caller keeps its cache: e.g. to feed the last token and observe
    it); by default a new one, with `observer` on every step.
    images: the (N_i, D) vectors of each image whose positions the prompt holds as runs of id -i
    (Model.with_images makes both); the prompt is then fed as embeddings.
    """
    options = check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                            sampler_order=sampler_order, prompt_lookup_num_tokens=prompt_lookup_num_tokens)
    cfg = model.config
    ids = model.check_ids(token_ids, images=images)  # (P,)
    max_new = min(options["max_new_tokens"], cfg.max_position_embeddings - len(ids))
    stops = stop_ids(model, stop_token_ids)
    lookup = options["prompt_lookup_num_tokens"] or 0
    rng = np.random.default_rng(options["seed"])
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(ids), new_tokens=0, prefill_seconds=0.0, decode_seconds=0.0,
                 finish_reason="length")
    if lookup:
        stats.update(drafted=0, accepted=0)
    seq = sequence if sequence is not None else Sequence(model, len(ids) + max_new, observer, images)

    pending = [int(t) for t in ids]  # tokens not yet fed: the prompt, then the last sampled token
    seen = [t for t in pending if t >= 0]  # the sequence for the repetition penalty and the lookup (no image positions)
    produced = 0
    while produced < max_new:
        # A draft for every step after the prefill: at most the tokens still wanted after the model's own one,
        # never across the longrope switch (the plain loop rotates each position by its own length), and none
        # on the step that recomputes the sequence at the switch (its logits are needed for the last row only).
        draft = prompt_lookup(seen, min(lookup, max_new - produced - 1), stops) if produced else []
        start = len(seq.tokens) + len(pending)
        while draft and rope_variant(cfg, start) != rope_variant(cfg, start + len(draft)):
            draft.pop()
        if not seq.cache.fits(rope_variant(cfg, start)):
            draft = []
        t0 = time.perf_counter()
        rows = seq.feed_rows(pending + draft, len(draft) + 1)  # (1 + drafted, V) float32
        for i, logits in enumerate(rows):
            logits = apply_repetition_penalty(logits, seen, options["repetition_penalty"])
            token = sample(logits, rng, options["temperature"], options["top_k"], options["top_p"],
                           options["min_p"], options["sampler_order"])
            stats["prefill_seconds" if produced == 0 else "decode_seconds"] += time.perf_counter() - t0
            produced += 1
            stats["new_tokens"] = produced
            seen.append(token)
            if on_step is not None:
                on_step(token, logits)
            piece = text.push(token) if text is not None else ""
            yield token, piece
            t0 = time.perf_counter()
            if token in stops or (text is not None and text.stopped):
                stats["finish_reason"] = "stop"
                return
            if i == len(draft) or token != draft[i]:
                break  # the model's own token: the rest of the draft is rejected
        if draft:
            stats["drafted"] += len(draft)
            stats["accepted"] += i
            seq.truncate(start + i)  # keep the fed token and the accepted draft tokens, drop the rejected
        pending = [token]


def generate_tokens(model, token_ids: Ids[int], max_new_tokens: int, *, stop_strings: Ids[str] | None = None,
                    **options) -> Iterator[int]:
    """Yield up to `max_new_tokens` new ids (generate_steps lists the options). With stop_strings, stop once the
    generated text contains one (the token that completes it is still yielded)."""
    text = TextStops(model.tokenizer, stop_strings, skip_special_tokens=False) if stop_strings else None
    for token, _ in generate_steps(model, token_ids, max_new_tokens, text=text, **options):
        yield token


def stream_text(model, token_ids: Ids[int], max_new_tokens: int, *, stop_strings: Ids[str] = (),
                skip_special_tokens: bool = True, stats: dict | None = None, **options) -> Iterator[str]:
    """Yield the generated text in printable pieces (never half a UTF-8 character, never a lost space).

    A stop string ends the generation and is not yielded; text that could be the start of a stop string
    is held back until it is known not to be one."""
    text = TextStops(model.tokenizer, stop_strings or (), skip_special_tokens)
    stats = {} if stats is None else stats
    steps = generate_steps(model, token_ids, max_new_tokens, text=text, stats=stats, **options)
    try:
        for _, piece in steps:
            if piece:
                yield piece
        rest = text.flush()
        if text.stopped:  # a stop string completed by the final bytes
            stats["finish_reason"] = "stop"
        if rest:
            yield rest
    finally:
        steps.close()


def speed_line(stats: dict) -> str:
    """One line for humans from a generation's stats: prefill and decode tokens/s, finish reason."""
    prefill = stats["prompt_tokens"] / stats["prefill_seconds"] if stats["prefill_seconds"] else 0.0
    decoded = stats["new_tokens"] - 1
    decode = decoded / stats["decode_seconds"] if stats["decode_seconds"] and decoded > 0 else 0.0
    drafts = f", drafts kept {stats['accepted']}/{stats['drafted']}" if stats.get("drafted") else ""
    return (f"[{stats['prompt_tokens']} prompt tokens at {prefill:.1f} tok/s, {stats['new_tokens']} new tokens "
            f"at {decode:.1f} tok/s, finish: {stats['finish_reason']}{drafts}]")
