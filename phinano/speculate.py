"""Prompt-lookup drafts: guess the next tokens by finding the sequence's last n-gram earlier in it.

Input-grounded work (editing a file, extracting from a document, answering with quotes) repeats long runs
of the prompt. If the last 2 tokens (else the last 1) occurred before, the tokens that followed them there
are a cheap guess at what comes next. generate.py checks such a draft of K tokens in ONE model step of K+1
positions and keeps the longest prefix the model would have chosen itself, plus the model's own next token:
the output is the plain loop's, token for token, and when guesses are right several tokens cost one step.

The search is Transformers' PromptLookupCandidateGenerator (`prompt_lookup_num_tokens`,
max_matching_ngram_size 2): the first (leftmost) earlier occurrence with at least one token after it, a
draft cut before the first stop token.
"""

from __future__ import annotations

from collections.abc import Container, Sequence as Ids


def prompt_lookup(tokens: Ids[int], most: int, stops: Container[int] = (), max_ngram: int = 2) -> list[int]:
    """Up to `most` tokens that followed the first earlier occurrence of the last n-gram of `tokens`
    (n = max_ngram down to 1); [] when there is none."""
    n_tokens = len(tokens)
    if most <= 0:
        return []
    for n in range(min(max_ngram, n_tokens - 1), 0, -1):
        tail = list(tokens[n_tokens - n:])
        for start in range(0, n_tokens - n):  # windows ending before the tail itself
            if list(tokens[start:start + n]) == tail:
                draft = list(tokens[start + n:min(start + n + most, n_tokens)])
                for i, token in enumerate(draft):
                    if token in stops:
                        return draft[:i]
                return draft
    return []
