"""Watching a forward pass through the model's observer hook (model.py): `phinano.trace` and `--show-experts`.

`trace(model, ids)` runs one forward and keeps what it saw as small arrays (a `Trace`): the logit lens, the
attention maps of the layers asked for, PhiMoE's routing, the residual norms. pictures.py draws them
(`phinano trace`).

`phinano generate --show-experts` prints each generated token with its experts:

    'def'         L0:3+7 L1:12+0 ...

Built on the model's observer hook (model.py): generation runs as usual, with a "routing" observer that
keeps each step's routing. A token is routed when it is fed back in, so each line is printed one step after
its token is drawn, and the last token is fed once more at the end to be routed. A token's experts are those
of its own position, exactly what `Model.forward(ids, return_routing=True)` gives for it.
"""

from __future__ import annotations

import re

import numpy as np

from .errors import PhinanoError
from .generate import Sequence, generate_tokens


def token_label(tokenizer, token: int) -> str:
    """One token on its own, quoted: its piece with SentencePiece's '▁' shown as a space, an ASCII byte piece
    as its character ('<0x0A>' -> '\\n'); '#id' without a tokenizer."""
    piece = tokenizer.id_to_token(token) if tokenizer is not None else None
    if piece is None:
        return f"#{token}"
    byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    if byte and int(byte[1], 16) < 0x80:
        return repr(chr(int(byte[1], 16)))
    return repr(piece.replace("\u2581", " "))


def format_routing(routing: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """Per layer 'L<i>:<first>+<second>', e.g. 'L0:3+7 L1:12+0'."""
    return " ".join(f"L{i}:{int(experts[0])}+{int(experts[1])}" for i, (experts, _) in enumerate(routing))


class RoutingLog:
    """An observer that keeps, for each model step, every layer's routing: steps[k][layer] = (experts (T, 2),
    weights (T, 2)). `observer` is what to pass to a model step or a Sequence."""

    def __init__(self):
        self.steps: list[list[tuple[np.ndarray, np.ndarray]]] = []

    def _see(self, layer: int, routing) -> None:
        if layer == 0:
            self.steps.append([])
        self.steps[-1].append(routing)

    @property
    def observer(self) -> dict:
        return {"routing": self._see}

    def last_row(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Routing of the last position the latest step saw: per layer, (experts (2,), weights (2,))."""
        return [(experts[-1], weights[-1]) for experts, weights in self.steps[-1]]


def print_expert_trace(model, ids, max_new_tokens: int, sampling: dict, stop_strings, stats: dict
                       ) -> list[tuple[int, list]]:
    """Generate from `ids` with the given sampling options and print one line per new token: its text and, per
    layer, the two experts it was routed to (first + second). Stop strings end the generation as usual, but
    the trace shows every generated token. A last line counts the distinct experts used per layer.
    Returns [(token id, routing per layer)]."""
    if not model.config.is_moe:
        raise PhinanoError(
            f"--show-experts needs a mixture-of-experts model (PhimoeForCausalLM); "
            f"{model.name or 'this model'} is {model.config.architecture}, a dense model with no router"
        )
    log = RoutingLog()
    trace: list[tuple[int, list]] = []

    def show(token: int, routing) -> None:
        print(f"{token_label(model.tokenizer, token):<14} {format_routing(routing)}", flush=True)
        trace.append((token, routing))

    sequence = Sequence(model, len(ids) + max_new_tokens + 1, log.observer)  # +1: the last token is fed too
    previous = None  # the last generated token, not yet printed (its routing comes with the next step)
    for token in generate_tokens(model, ids, max_new_tokens, stop_strings=stop_strings or None, stats=stats,
                                 sequence=sequence, **sampling):
        if previous is not None:
            show(previous, log.last_row())  # the step that drew `token` routed `previous`
        previous = token
    if previous is not None and len(sequence.tokens) < model.config.max_position_embeddings:
        sequence.feed([previous])
        show(previous, log.last_row())
    elif previous is not None:  # the context is full: the last token can no longer be fed, so it has no routing
        print(f"{token_label(model.tokenizer, previous):<14} (not routed: the context is full)", flush=True)

    if trace:
        E, L = model.config.num_local_experts, model.config.num_hidden_layers
        used = [len({int(e) for _, routing in trace for e in routing[i][0]}) for i in range(L)]
        print("[experts used per layer: " + " ".join(f"L{i}:{n}/{E}" for i, n in enumerate(used)) + "]")
    return trace


# ------------------------------------------------------------------------------------------------ phinano.trace
# `phinano.trace(model, ids)`: one forward, watched through the observer hook, kept as small arrays.

_LENS_CHUNK = 1 << 24  # lens logits computed at most this many (T x V) elements at a time (64 MB of float32)


class Trace:
    """What one forward showed, as arrays (L layers, T tokens, H heads):

    tokens           (T,) the input ids
    lens_top_ids     (L, T) int64: the logit lens; layer l's residual through the final norm and lm_head, the top
                     token per position. The last row is the model's own argmax.
    lens_probs       (L, T) float32: that token's probability under the same softmax
    residual_norms   (L + 1, T) float32: |x| of the residual stream; row 0 after the embedding, row l + 1
                     after layer l
    routing          PhiMoE: per layer (experts (T, 2) int64, weights (T, 2) float32), the two experts of each
                     token and their sparsemixer weights, as `Model.forward(ids, return_routing=True)` gives
                     them; [] for a dense model
    attention(l)     (H, T, T) float32 attention probabilities of layer l, if it was kept (`attention=`)
    """

    def __init__(self, tokens: np.ndarray, lens_top_ids: np.ndarray, lens_probs: np.ndarray,
                 residual_norms: np.ndarray, routing: list, attention_maps: dict[int, np.ndarray]):
        self.tokens = tokens
        self.lens_top_ids = lens_top_ids
        self.lens_probs = lens_probs
        self.residual_norms = residual_norms
        self.routing = routing
        self._attention = attention_maps

    @property
    def attention_layers(self) -> list[int]:
        """The layers whose attention maps were kept."""
        return sorted(self._attention)

    def attention(self, layer: int) -> np.ndarray:
        """(H, T, T) attention probabilities of `layer`: row (h, t) is what query t reads, 0 outside the causal
        sliding window."""
        if layer not in self._attention:
            kept = ", ".join(map(str, self.attention_layers)) or "none"
            raise PhinanoError(f"the attention of layer {layer} was not kept (kept: {kept}); "
                               f"trace with attention=[{layer}] or attention='all'")
        return self._attention[layer]

    @property
    def routing_experts(self) -> np.ndarray:
        """(L, T, 2) int64: the routing's experts as one array (PhiMoE)."""
        return np.stack([experts for experts, _ in self.routing])

    @property
    def routing_weights(self) -> np.ndarray:
        """(L, T, 2) float32: the routing's sparsemixer weights as one array (PhiMoE)."""
        return np.stack([weights for _, weights in self.routing])


def _attention_layers(attention, L: int) -> set[int]:
    """attention= as a set of layers: None (none), "all", or layer numbers (negative count from the end)."""
    if attention is None:
        return set()
    if isinstance(attention, str):
        if attention != "all":
            raise PhinanoError(f"attention must be 'all', None or layer numbers, got {attention!r}")
        return set(range(L))
    layers = set()
    for layer in ([attention] if isinstance(attention, (int, np.integer)) else attention):
        if not -L <= int(layer) < L:
            raise PhinanoError(f"attention layer {layer} is out of range: the model has layers 0..{L - 1}")
        layers.add(int(layer) % L)
    return layers


def trace(model, token_ids, *, attention=None, lens: bool = True) -> Trace:
    """Run `token_ids` through `model` once and keep what the observer hook shows (see `Trace`).

    attention: which layers' (H, T, T) maps to keep: None (default, none), "all", or layer numbers. Only those
    are kept; each layer's map exists only while the layer runs otherwise. lens=False skips the logit lens
    (L head multiplications). The lens keeps the top id and its probability per layer and position, never the
    (L, T, V) logits: each layer's logits are reduced as soon as they are computed, T rows at a time.
    """
    cfg, ops, W = model.config, model.ops, model.weights
    ids = model.check_ids(token_ids)
    T, L = ids.size, cfg.num_hidden_layers
    keep = _attention_layers(attention, L)
    top_ids = np.zeros((L, T), np.int64)
    top_probs = np.zeros((L, T), np.float32)
    norms = np.zeros((L + 1, T), np.float32)
    routing: list = []
    maps: dict[int, np.ndarray] = {}

    def see_residual(layer: int, x: np.ndarray) -> None:  # x (T, D) after layer `layer` (-1: the embedding)
        norms[layer + 1] = np.linalg.norm(x, axis=-1)
        if not lens or layer < 0:
            return
        rows = max(1, _LENS_CHUNK // cfg.vocab_size)
        for a in range(0, T, rows):
            h = model.blocks.norm(ops, cfg, x[a : a + rows], W.final_norm, W.final_norm_bias)  # (t, D)
            logits = model.head(ops, h)  # (t, V), as the model's own head computes them
            best = np.argmax(logits, axis=-1)  # (t,)
            top = logits[np.arange(best.size), best]
            top_ids[layer, a : a + rows] = best
            top_probs[layer, a : a + rows] = 1.0 / np.sum(np.exp(logits - top[:, None]), axis=-1)

    observer = {"residual": see_residual}
    if cfg.is_moe:
        observer["routing"] = lambda layer, r: routing.append(r)
    if keep:
        observer["attention"] = lambda layer, probs: keep_map(layer, probs)
        observer["layers"] = {"attention": set(keep)}  # the other layers' maps are not even computed

    def keep_map(layer: int, probs: np.ndarray) -> None:  # probs (H, T, S = T) from a fresh cache
        maps[layer] = np.array(probs, np.float32)

    model.step(model.new_cache(T), ids, observer=observer, last_only=True)
    return Trace(ids, top_ids, top_probs, norms, routing, maps)
