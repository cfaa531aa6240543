"""A reasoning model's answer, split into its reasoning and its reply: `<think> ... </think> reply`.

Phi-4-reasoning, Phi-4-reasoning-plus and Phi-4-mini-reasoning answer in two sections: a chain of thought in
`<think> ... </think>`, then the solution. The doors show the two apart: the OpenAI-style API as
`reasoning_content` (on the message, and on stream deltas, as vLLM does), Ollama's as `thinking`, the terminal
chat between "Thinking..." and "...done thinking." (docs/phi4.md).

The rule, the same for every model and every door:

- The answer reasons if its text starts with `<think>` (whitespace before it allowed). Anything else is all
  reply, so a model that never thinks is shown exactly as before.
- The reasoning is the text after `<think>` up to the first `</think>`; the reply is everything after that.
- A `<think>` never closed (the token budget ran out mid-thought) leaves everything after it as reasoning and
  the reply empty.
- Whitespace at the start and end of the reasoning and at the start of the reply is dropped (the models write
  newlines around their tags). An empty reasoning (`<think></think>`) counts as none.

The markers are matched in the decoded text (the released tokenizers have them as added tokens that are not
special, so decoding keeps them), and they may arrive in pieces: a marker can be one token or several, and a
stream's text pieces are cut anywhere. `ReasoningSplit` takes the pieces as they stream and holds back only
what could still be the start of a marker.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ReasoningSplit:
    """Streamed text in, (reasoning, reply) pieces out.

    `push(text)` returns the (reasoning, reply) text that is now certain; either may be "". `flush()` returns
    what is held back once the text has ended. Joined, the pieces equal `split_reasoning(whole text)`.
    """

    def __init__(self):
        self.state = "start"  # "start": not yet known whether it reasons; "reasoning"; "reply"
        self.held = ""  # text received but not yet returned
        self.reasoned = False  # some reasoning text has been returned
        self.trim_reply = False  # after a reasoning section: drop the reply's leading whitespace

    def push(self, text: str) -> tuple[str, str]:
        self.held += text
        return self._release(final=False)

    def flush(self) -> tuple[str, str]:
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, str]:
        reasoning = reply = ""
        if self.state == "start":
            head = self.held.lstrip()
            if head.startswith(OPEN):
                self.state, self.held = "reasoning", head[len(OPEN):]
            elif OPEN.startswith(head) and not final:
                return "", ""  # empty, or the start of "<think>": wait for more
            else:
                self.state = "reply"
        if self.state == "reasoning":
            end = self.held.find(CLOSE)
            if end >= 0:
                reasoning, self.held = self._reasoning(self.held[:end], final=True), self.held[end + len(CLOSE):]
                self.state, self.trim_reply = "reply", True
            else:
                keep = 0 if final else _partial_marker(self.held, CLOSE)
                # Trailing whitespace is held too: it is dropped if the reasoning ends right after it.
                body = self.held[: len(self.held) - keep]
                cut = len(body) if final else len(body.rstrip())
                reasoning, self.held = self._reasoning(body[:cut], final), self.held[cut:]
        if self.state == "reply":
            reply, self.held = (self.held.lstrip() if self.trim_reply else self.held), ""
            self.trim_reply = self.trim_reply and not reply
        return reasoning, reply

    def _reasoning(self, text: str, final: bool) -> str:
        """Reasoning text to return: without leading whitespace at the very start, without trailing at the end."""
        if not self.reasoned:
            text = text.lstrip()
        if final:
            text = text.rstrip()
        self.reasoned = self.reasoned or bool(text)
        return text


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (0 if none)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, reply) of a whole answer, by the rule above."""
    split = ReasoningSplit()
    reasoning, reply = split.push(text)
    more_reasoning, more_reply = split.flush()
    reasoning += more_reasoning
    return (reasoning or None), reply + more_reply
