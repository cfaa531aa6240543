"""Beam search: keep the B most likely partial sequences, return the best finished one.

Transformers 5.23's `_beam_search` (batch 1, num_return_sequences 1, no sampling), step by step:

    1. every running beam's next-token log-probabilities (log-softmax, float32), plus the beam's score
    2. the top 2B candidates over all beams x vocabulary (B x (1 + number of stop ids) when that is larger)
    3. a candidate ending in a stop id, or reaching the length limit, is finished: among the first B
       candidates, it joins the finished list with score / (new tokens, stop included) ** length_penalty,
       and that list keeps its best B
    4. the best B candidates that are not finished run on (each beam's cache follows its parent's)
    5. stop when no running beam can beat the worst finished one (early_stopping False: judged at the current
       length; "never": at the longest length when length_penalty > 0), when early_stopping is True and B
       hypotheses are finished, or at the length limit. The answer is the best finished hypothesis.

Ties are broken by the lower index (beam, then token), as the stable sort here does. Every beam has its own
Sequence (KV cache): a parent continued by k children is copied k - 1 times. Longrope's switch happens per
beam, in Sequence.feed, as in Transformers (docs/pitfalls.md#longrope-switch).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence as Ids

import numpy as np

from .errors import PhinanoError
from .generate import Sequence, stop_ids, stop_texts
from .sampling import check_options

DROPPED = np.float32(-1.0e9)  # Transformers' score for "not a candidate"
CHECKED = set(inspect.signature(check_options).parameters)  # the options check_options validates
NEUTRAL = {"temperature": (0, 0.0, None), "repetition_penalty": (1, 1.0, None),
           "sampler_order": ("transformers", "llama.cpp", None), "prompt_lookup_num_tokens": (None, 0),
           "stop_strings": (None, (), [])}  # sampling options that leave beam search as it is


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) float32 log-probabilities, as torch.log_softmax computes them in float32."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first, ties to the lower index."""
    return np.argsort(-scores, kind="stable")[:k]


def beam_search(model, token_ids: Ids[int], max_new_tokens: int, num_beams: int, *, length_penalty: float = 1.0,
                early_stopping: bool | str = False, stop_token_ids: Ids[int] | None = None,
                stats: dict | None = None, **sampling) -> tuple[list[int], float]:
    """(new token ids of the best hypothesis, its score): the stop id that ended it included, as Transformers
    returns it; the score is its summed log-probability / length ** length_penalty.

    stop_token_ids: None = the model's own list; [] = run to max_new_tokens. Sampling options are refused
    unless neutral (temperature 0, no filters, no penalty): beam search is deterministic."""
    check_options(**{key: value for key, value in sampling.items() if key in CHECKED})  # types first
    if "stop_strings" in sampling and sampling["stop_strings"] is not None:
        sampling["stop_strings"] = stop_texts(sampling["stop_strings"])
    given = {key: value for key, value in sampling.items() if value not in NEUTRAL.get(key, (None,))}
    if given:
        raise PhinanoError(f"beam search does not sample: {', '.join(sorted(given))} cannot be combined with "
                           "num_beams > 1")
    options = check_options(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                            early_stopping=early_stopping)
    B, penalty, early = options["num_beams"], options["length_penalty"], options["early_stopping"]
    ids = [int(t) for t in model.check_ids(token_ids)]
    P = len(ids)
    max_new = min(options["max_new_tokens"], model.config.max_position_embeddings - P)
    stops = stop_ids(model, stop_token_ids)
    keep = max(2, 1 + len(stops)) * B  # candidates looked at per step
    V = model.config.vocab_size

    t0 = time.perf_counter()
    first = Sequence(model, P + max_new)
    logits = first.feed(ids)[None]  # (1, V): all beams start as the prompt; only beam 0 is live
    sequences = [first] * B
    running: list[list[int]] = [[] for _ in range(B)]  # each beam's new tokens
    prefill_seconds = time.perf_counter() - t0
    running_scores = np.full(B, DROPPED, np.float32)
    running_scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []  # (score, new tokens), best first, at most B
    for length in range(1, max_new + 1):  # `length` new tokens once this step's token is appended
        if logits.shape[0] == 1:
            logits = np.repeat(logits, B, axis=0)  # (B, V)
        scores = (_log_softmax(logits) + running_scores[:, None]).reshape(-1)  # (B * V,) float32
        top = _top(scores, keep)
        cand_scores, parents, tokens = scores[top], top // V, top % V
        done = np.array([int(t) in stops or length == max_new for t in tokens])  # (keep,)

        # Finished hypotheses: the first B candidates that hit a stop, scored per token of length. (Transformers
        # also bars them once (a) or (b) below holds, but then the search has already ended.)
        normalised = (cand_scores / np.float32(length ** penalty)).astype(np.float32)
        joining = [(float(normalised[j]), running[parents[j]] + [int(tokens[j])]) for j in range(B) if done[j]]
        merged = finished + joining  # earlier ones first: they win ties, as in Transformers' concatenation
        finished = sorted(merged, key=lambda hypothesis: -hypothesis[0])[:B]  # stable sort

        # Running beams: the best B candidates not finished.
        live = np.where(done, cand_scores + DROPPED, cand_scores).astype(np.float32)
        chosen = _top(live, B)
        running_scores = live[chosen]
        running = [running[parents[j]] + [int(tokens[j])] for j in chosen]

        # Stop?  (a) no running beam can beat the worst finished hypothesis, (b) early_stopping True and B
        # finished, (c) every candidate finished (the length limit).
        best_length = (max_new if early == "never" and penalty > 0 else length)
        best_possible = float(running_scores[0] / np.float32(best_length ** penalty))
        worst = min(score for score, _ in finished) if len(finished) == B else float(DROPPED)
        if best_possible <= worst or (early is True and len(finished) == B) or done.all():
            break

        # Each new beam continues its parent's cache: the first child takes it, the others copy it (before
        # any of them is fed).
        taken: set[int] = set()
        children = []
        for j in chosen:
            parent = sequences[int(parents[j])]
            children.append(parent.copy() if id(parent) in taken else parent)
            taken.add(id(parent))
        sequences = children
        logits = np.stack([seq.feed([beam[-1]]) for seq, beam in zip(sequences, running)])  # (B, V)
    score, best = finished[0]  # never empty: the length limit finishes B hypotheses
    if stats is not None:
        stats.update(prompt_tokens=P, new_tokens=len(best), prefill_seconds=prefill_seconds,
                     decode_seconds=time.perf_counter() - t0 - prefill_seconds,
                     finish_reason="stop" if best[-1] in stops else "length")
    return best, score
