"""Phi-3.5-MoE's sparse block: a router picks 2 of 16 SwiGLU experts per token ("sparsemixer").

The block replaces the dense MLP of a Phi-3 layer (model.py calls `sparse_moe` where a dense model calls its
MLP). For one token with normed hidden state x (D,):

    s   = x @ router.T                                   (E,) router logits, no bias
    e1, w1, e2, w2 = sparsemixer(s, eps)                 two experts and their weights
    out = w1 * expert_e1(x) + w2 * expert_e2(x)          expert(x) = w2_e @ (silu(w1_e @ x) * (w3_e @ x))

Sparsemixer top-2 is Transformers' inference path (`PhimoeTopKRouter` in eval mode); eps is the config's
`router_jitter_noise` (0.01), which despite its name is used at inference as a relative-gap threshold:

  1. e1 = argmax(s), m1 = s[e1]. Mask every expert j whose gap to the best, relative to the larger of |s[j]|
     and m1, is more than 2*eps:   (m1 - s[j]) / max(|s[j]|, m1) > 2*eps.
     w1 = softmax(s over the unmasked experts)[e1].
  2. Take e1 out (s'[e1] = -inf); e2 = argmax(s'), m2 = s'[e2]. Mask around m2 with the same rule (the gap and
     |s[j]| use the original logits s), w2 = softmax(s' over its unmasked experts)[e2].
  3. w1 and w2 come from two different softmaxes and are NOT renormalised: w1 + w2 is anything in (0, 2].

Mixtral-style top-2 instead takes one softmax over all E logits, keeps the two largest probabilities and
renormalises them to sum to 1. The two rules pick the same two experts but weigh them very differently: a mask
keeps only the experts within 2% (relative) of the round's best, so whenever no other logit is that close, the
sparsemixer's weight is exactly 1.0 (the expert's full output is added), where Mixtral's would be e.g. 0.58 and
0.42. An engine that reuses its Mixtral routing for Phi-3.5-MoE runs, but produces wrong text (reference
pitfall P7). docs/moe.md works through both rules on a tiny model.

Memory: weights are memory-mapped, and `sparse_moe` reads an expert's three matrices only if some token in the
batch was routed to it. A decode step therefore touches 2 of the 16 experts per layer (6.6B of the 41.9B
parameters per token), and an expert that is never chosen is never paged in from disk.

Shapes: T tokens, D hidden, E experts, F expert width (6400 in the release).
"""

from __future__ import annotations

import re

import numpy as np

from .config import Config
from .errors import PhinanoError
from .rope import rope_variant
from .weights import LayerWeights

# ---------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------


def sparsemixer_round(s: np.ndarray, candidates: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One round of the sparsemixer for T tokens at once.

    s (T, E) float32: the original router logits.
    candidates (T, E) float32: the logits still in the running (-inf for an expert already chosen).
    Returns expert (T,) int64, weight (T,) float32, and masked (T, E) bool (True = masked out this round).
    """
    T = s.shape[0]
    rows = np.arange(T)
    # The round's best expert, first index on ties (torch.max does the same).
    expert = np.argmax(candidates, axis=-1)  # (T,)
    best = candidates[rows, expert][:, None]  # (T, 1)
    # Relative gap of every expert to the best. 0/0 (best == s[j] == 0) is NaN, which is not > 2*eps, so the
    # expert stays in, as in torch.
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = (best - s) / np.maximum(np.abs(s), best)  # (T, E)
    masked = gap > np.float32(2 * eps)  # (T, E) compared in float32, as torch does
    # Softmax over the experts that survive the mask (and are still candidates); the weight is the chosen one's.
    kept = np.where(masked, -np.inf, candidates)  # (T, E)
    numerators = np.exp(kept - best)  # (T, E), 0 where masked; the best is the row max, so exp(0) = 1 is in
    weight = numerators[rows, expert] / numerators.sum(axis=-1)  # (T,)
    return expert.astype(np.int64), weight.astype(np.float32), masked


def sparsemixer(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-2 routing: router logits (T, E) -> experts (T, 2) int64, weights (T, 2) float32.

    Column 0 is the first expert (the argmax), column 1 the second (never equal to the first).
    """
    s = np.asarray(logits, dtype=np.float32)  # (T, E)
    rows = np.arange(s.shape[0])

    e1, w1, _ = sparsemixer_round(s, s, eps)  # round 1: every expert is a candidate

    without_e1 = s.copy()
    without_e1[rows, e1] = -np.inf  # round 2: the first expert is out
    e2, w2, _ = sparsemixer_round(s, without_e1, eps)

    return np.stack([e1, e2], axis=-1), np.stack([w1, w2], axis=-1)


# ---------------------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------------------


def sparse_moe(ops, cfg: Config, w: LayerWeights, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The MoE block for x (T, D): route, run each chosen expert once on its group of tokens, scatter-add.

    Returns the output (T, D) float32 and this layer's routing: experts (T, 2) int64, weights (T, 2) float32.
    Only experts some token chose are read: a decode step (T = 1) touches exactly 2 of the E experts.
    """
    router_logits = ops.linear(x, w.router)  # (T, E)
    experts, weights = sparsemixer(router_logits, cfg.router_jitter_noise)  # (T, 2), (T, 2)

    out = np.zeros_like(x)  # (T, D)
    for e in np.unique(experts):  # ascending expert index, as Transformers
        rows, slots = np.nonzero(experts == e)  # the n tokens routed to e, and in which slot (first or second)
        w1, w3, w2 = w.experts[e]  # gate (F, D), up (F, D), down (D, F)
        h = x[rows]  # (n, D) gather
        y = ops.linear(ops.swiglu(ops.linear(h, w1), ops.linear(h, w3)), w2)  # (n, D) SwiGLU expert
        # Weighted scatter-add. A token appears at most once per expert (e2 != e1), so `rows` has no repeats.
        out[rows] += y * weights[rows, slots][:, None]
    return out, (experts, weights)


def parameter_counts(cfg: Config) -> tuple[int, int]:
    """(total, active per token) parameter counts, from the config alone.

    Active = everything but the experts a token does not use: all of attention, norms, router, embedding and
    head, plus 2 of the E experts in each layer. Phi-3.5-MoE: 41,873,153,344 total, 6,640,999,744 active.
    """
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.q_size, cfg.kv_size
    attn = D * q + 2 * D * kv + q * D  # q, k, v, o
    if cfg.attention_bias:
        attn += q + 2 * kv + D
    norms = 2 * D * (2 if cfg.is_moe else 1)  # two norms per layer (LayerNorm has a bias too)
    head = (0 if cfg.tie_word_embeddings else V * D) + (V if cfg.lm_head_bias else 0)
    outside = V * D + head + D * (2 if cfg.is_moe else 1)  # embedding, head, final norm
    if not cfg.is_moe:
        total = outside + L * (attn + norms + 3 * D * F)
        return total, total
    expert = 3 * D * F  # w1, w3, w2
    router = cfg.num_local_experts * D
    total = outside + L * (attn + norms + router + cfg.num_local_experts * expert)
    active = outside + L * (attn + norms + router + 2 * expert)
    return total, active


# ---------------------------------------------------------------------------------------------------------
# Watching the router: `phinano generate --show-experts`
# ---------------------------------------------------------------------------------------------------------


class RoutingRecorder:
    """Stands in for the model inside `generate_tokens`: every call passes through to the model, but each
    forward step's routing is recorded, and the KV cache is kept so that the last token can be routed too."""

    def __init__(self, model):
        self.model = model
        self.steps: list[list[tuple[np.ndarray, np.ndarray]]] = []  # per forward step, per layer: (T, 2) x 2
        self.cache = None

    def __getattr__(self, name):  # config, tokenizer, stop_token_ids, _check_ids, ...
        return getattr(self.model, name)

    def new_cache(self, capacity: int):
        self.cache = self.model.new_cache(capacity)
        return self.cache

    def _run(self, ids, cache, last_only, routing=None):
        routing = []
        logits = self.model._run(ids, cache, last_only, routing)
        self.steps.append(routing)
        return logits

    def last_row(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Routing of the last token the latest forward step saw: per layer, (experts (2,), weights (2,))."""
        return [(experts[-1], weights[-1]) for experts, weights in self.steps[-1]]

    def route_last(self, tokens: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Run one more step so the last generated token (which generation never feeds back) is routed.

        Same rule as generation: if this step crosses the original length, the cache is stale and the whole
        sequence is recomputed with the long factors."""
        cache = self.cache
        pending = tokens[-1:]
        if cache.variant not in (None, rope_variant(self.model.config, len(tokens))):
            cache.reset()
            pending = tokens
        self._run(np.asarray(pending, dtype=np.int64), cache, last_only=True)
        return self.last_row()


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


def print_expert_trace(model, ids, max_new_tokens: int, sampling: dict, stop_strings, stats: dict
                       ) -> list[tuple[int, list]]:
    """Generate from `ids` with the given sampling options and print one line per new token: its text and, per layer,
    the two experts it was routed to (first + second), e.g.

        'def'         L0:3+7 L1:12+0 ...

    Each token is shown on its own (its piece, see `token_label`). A token's experts are those of its own
    position, exactly what `Model.forward(ids, return_routing=True)` gives for it: a generated token is routed
    when it is fed back in, so each line is printed one step after its token is drawn, and one extra decode
    step routes the last token. Stop strings end the generation as usual, but the trace shows every generated
    token. A last line counts the distinct experts used per layer. Returns [(token id, routing per layer)].
    """
    from .generate import generate_tokens

    if not model.config.is_moe:
        raise PhinanoError(
            f"--show-experts needs a mixture-of-experts model (PhimoeForCausalLM); "
            f"{model.name or 'this model'} is {model.config.architecture}, a dense model with no router"
        )

    def show(token: int, routing) -> None:
        print(f"{token_label(model.tokenizer, token):<14} {format_routing(routing)}", flush=True)
        trace.append((token, routing))

    recorder = RoutingRecorder(model)
    trace: list[tuple[int, list]] = []
    tokens = [int(t) for t in ids]
    previous = None  # the last generated token, not yet printed (its routing comes with the next step)
    for token in generate_tokens(recorder, ids, max_new_tokens, stop_strings=stop_strings or None,
                                 stats=stats, **sampling):
        if previous is not None:
            show(previous, recorder.last_row())  # the step that drew `token` routed `previous`
        tokens.append(token)
        previous = token
    if previous is not None:
        show(previous, recorder.route_last(tokens))

    if trace:
        E, L = model.config.num_local_experts, model.config.num_hidden_layers
        used = [len({int(e) for _, routing in trace for e in routing[i][0]}) for i in range(L)]
        print("[experts used per layer: " + " ".join(f"L{i}:{n}/{E}" for i, n in enumerate(used)) + "]")
    return trace
