"""Watching the router: `phinano generate --show-experts` prints each generated token with its experts.

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
