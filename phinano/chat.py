"""`phinano chat`: an interactive terminal chat with history, streaming answers and the model's own template.

    $ phinano chat --model microsoft/Phi-3-mini-4k-instruct --verbose
    >>> Why is the sky blue?
    Because air scatters blue light more than red ...
    [14 prompt tokens at 85.2 tok/s, 61 new tokens at 9.8 tok/s, finish: stop]
    >>> /system Answer in one sentence.
    >>> /reset
    >>> /exit

Each answer is generated from the whole conversation rendered by the model's chat template, and stops on the
model's own stop tokens (generation_config.json). Ctrl-C during an answer stops that answer (what was printed
stays in the history) and the session goes on; Ctrl-D or /exit ends it. When the conversation outgrows the
context, the oldest turns are dropped.

`Chat` holds the conversation and is usable on its own; `repl` drives it from any line source, which is how
the tests talk to it.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from .errors import PhinanoError
from .generate import stream_text
from .reasoning import ReasoningSplit

HELP = """commands:
  /help          this list
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message (/system alone removes it)
  /image PATH    Phi-3-vision: attach an image to your next message
  /exit          leave (also /bye, /quit, Ctrl-D)
Ctrl-C stops the answer being written."""
# Around a reasoning model's <think> section, as Ollama's terminal shows it.
THINKING, DONE_THINKING, NO_REPLY = "Thinking...\n", "\n...done thinking.\n\n", "\n...(generation ended while thinking)"


class Chat:
    """A conversation with one model: the system message, the turns so far, and the generation options."""

    def __init__(self, model, system: str | None = None, max_new_tokens: int = 256, sampling: dict | None = None,
                 stop_strings: list[str] | None = None):
        if model.tokenizer is None:
            raise PhinanoError("chat needs a tokenizer.json in the model folder")
        model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # no template: fail now, clearly
        self.model = model
        self.system = system or None
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or {}
        self.stop_strings = stop_strings or []
        self.turns: list[dict] = []  # {"role": "user" | "assistant", "content": ...}, alternating
        self.images: list = []  # (N_i, D) vectors of the conversation's images, <|image_i|> in the turns
        self.attached: list = []  # vectors of the images /image attached to the next message

    def reset(self) -> None:
        self.turns = []
        self.images, self.attached = [], []

    def attach(self, image) -> int:
        """Phi-3-vision: encode an image (path, bytes or PIL image) for the next message; returns its positions."""
        _, vectors = self.model.with_images([-1], [image])
        self.attached.append(vectors[0])
        return len(vectors[0])

    def prompt_ids(self) -> list[int]:
        """The conversation rendered by the chat template, oldest turns dropped until the answer fits."""
        context = self.model.config.max_position_embeddings
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.model.tokenizer.apply_chat_template(system + self.turns, add_generation_prompt=True,
                                                           tokenize=not self.images)
            if self.images:  # the markers become the images' positions; turns with images are never dropped
                from .vision.prompt import expand

                ids = expand(self.model.tokenizer.encode_prompt(ids), [len(v) for v in self.images])
                break
            if len(ids) + min(self.max_new_tokens, 16) <= context or len(self.turns) <= 1:
                break
            self.turns = self.turns[2:]  # forget the oldest question and its answer
        if len(ids) >= context:
            raise PhinanoError(f"the message is {len(ids)} tokens long; the context holds {context}")
        return ids

    def answer(self, text: str, stats: dict | None = None) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer; the answer (or as much of it as was generated
        before the generator was closed or interrupted) joins the history.

        A reasoning model's `<think> ... </think>` section (phinano.reasoning) is shown between "Thinking..."
        and "...done thinking." and kept out of the history, which holds the reply only."""
        first = len(self.images) + 1  # the released user turn: <|image_1|>\n ... before the text
        markers = "".join(f"<|image_{i}|>\n" for i in range(first, first + len(self.attached)))
        self.turns.append({"role": "user", "content": markers + text})
        self.images += self.attached
        try:
            ids = self.prompt_ids()
        except PhinanoError:
            self.turns.pop()
            del self.images[first - 1 :]
            raise
        self.attached = []
        pieces: list[str] = []
        finished = False
        generation = stream_text(self.model, ids, self.max_new_tokens, stop_strings=self.stop_strings, stats=stats,
                                 images=self.images or None, **self.sampling)
        try:
            for piece, is_reply in _shown(generation):
                if is_reply:
                    pieces.append(piece)
                yield piece
            finished = True
        finally:  # also on Ctrl-C and on close(): keep what the user saw; forget a question left unanswered
            generation.close()  # frees the KV cache now
            if finished or pieces:
                self.turns.append({"role": "assistant", "content": "".join(pieces)})
            else:
                self.turns.pop()
                del self.images[first - 1 :]


def framed(pieces: Iterator[str]) -> Iterator[str]:
    """Generated text pieces as the terminal shows them: a reasoning section framed by "Thinking..." and
    "...done thinking." (`phinano generate --chat` uses it too)."""
    for text, _ in _shown(pieces):
        yield text


def _shown(pieces: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Generated text as the terminal shows it: (text, whether it is reply text). A reasoning section is framed
    by THINKING and DONE_THINKING (NO_REPLY when the generation ends before the reply)."""
    split, phase = ReasoningSplit(), "start"  # "start", "thinking", "reply"
    parts = itertools.chain((split.push(p) for p in pieces), (split.flush() for _ in (0,)))  # flush after the end
    for reasoning, reply in parts:
        if reasoning:
            if phase == "start":
                yield THINKING, False
            phase = "thinking"
            yield reasoning, False
        if reply:
            if phase == "thinking":
                yield DONE_THINKING, False
            phase = "reply"
            yield reply, True
    if phase == "thinking":
        yield NO_REPLY, False


def repl(chat: Chat, lines: TextIO, out: TextIO, err: TextIO,
         speed_line: Callable[[dict], str] | None = None, prompt: str = ">>> ") -> int:
    """Read lines, answer them, until /exit or end of input. speed_line(stats), if given, is printed to `err`
    after each answer."""
    interactive = lines is sys.stdin and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"Chatting with {chat.model.name or 'the model'}. /help for commands, Ctrl-D to leave.", file=err)
    while True:
        try:
            line = _read(lines, out, prompt, interactive)
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to leave)", file=err)
            continue
        if line is None:  # end of input
            print(file=out)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(chat, line, err) == "exit":
                return 0
            continue
        stats: dict = {}
        try:
            pieces = chat.answer(line, stats)
            try:
                for piece in pieces:
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:
                pieces.close()
                out.write(" [stopped]")
        except PhinanoError as error:
            print(f"error: {error}", file=err)
            continue
        out.write("\n")
        out.flush()
        if speed_line is not None and stats.get("new_tokens"):
            print(speed_line(stats), file=err)


def _read(lines: TextIO, out: TextIO, prompt: str, interactive: bool) -> str | None:
    if interactive:
        try:
            return input(prompt)
        except EOFError:
            return None
    out.write(prompt)
    out.flush()
    line = lines.readline()
    return line if line else None


def _command(chat: Chat, line: str, err: TextIO) -> str | None:
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name == "/reset":
        chat.reset()
        print("(conversation cleared)", file=err)
    elif name == "/image":
        try:
            n = chat.attach(rest.strip())
        except PhinanoError as error:
            print(f"error: {error}", file=err)
        else:
            print(f"(image attached to your next message: {n} positions)", file=err)
    elif name == "/system":
        chat.system = rest.strip() or None
        print("(system message set)" if chat.system else "(system message removed)", file=err)
    else:
        if name not in ("/help", "/?"):
            print(f"unknown command {name}", file=err)
        print(HELP, file=err)
    return None

