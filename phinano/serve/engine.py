"""The one model behind `phinano serve`: a first-in, first-out queue of `Job`s and one worker thread that runs
them, sending each job's text back to its request's event loop (docs/server.md, "One model, several clients").
Nothing here knows about HTTP: a full queue raises `Busy`, and the app says what that means.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import PhinanoError
from ..generate import stream_text

log = logging.getLogger("phinano.serve")


class Busy(Exception):
    """The queue is full: the job was not queued."""


class _Cancelled(Exception):
    """Raised inside the generation (from generate_tokens' on_step) to stop a cancelled job."""


# ------------------------------------------------------------------ what flows from the worker to a request
@dataclass
class TokenLogprob:
    """One generated token's log-probability and, optionally, the most likely alternatives at its step."""

    text: str  # what the token stands for, e.g. " Hello" (a lone byte piece: "bytes:\\xe2")
    bytes: list[int]  # its UTF-8 bytes
    logprob: float
    top: list[tuple[str, list[int], float]] = field(default_factory=list)  # (text, bytes, logprob), best first

    def entry(self) -> dict:
        """The {token, logprob, bytes, top_logprobs} entry of OpenAI's chat API, which Ollama uses too."""
        return {"token": self.text, "logprob": self.logprob, "bytes": self.bytes,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, b, v in self.top]}


@dataclass
class Piece:
    """Printable text (never half a character; never part of a stop string) and its tokens' logprobs."""

    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Done(Piece):
    """The last piece: the logprobs of tokens not yet sent (no text), generate_tokens' stats (prompt_tokens,
    new_tokens, prefill_seconds, decode_seconds, finish_reason "stop" | "length"), every generated id."""

    stats: dict = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # the stop token included


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """One generation: the prompt ids, the length budget and generate_tokens' keyword arguments."""

    ids: list[int]
    max_new_tokens: int
    sampling: dict  # temperature, top_k, top_p, min_p, repetition_penalty, seed (and stop_token_ids, if set)
    stop_strings: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's plus the k best
    images: list | None = None  # Phi-3-vision: PIL images whose positions `ids` holds (runs of -1, -2, ...)
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue | None = None  # set by Engine.submit, read on the request's event loop
    loop: asyncio.AbstractEventLoop | None = None

    def cancel(self) -> None:
        """Stop the generation before its next token (or skip it if it has not started). Safe to repeat."""
        self.cancelled.set()

    def send(self, event: Piece | Failed) -> None:
        """From the worker thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()

    async def stream(self) -> AsyncIterator[Piece | Failed]:
        """The job's events as they arrive, ending with a Done or Failed."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, (Done, Failed)):
                return

    async def result(self) -> Done | Failed:
        """Wait for the whole generation: a Done that holds all its text and logprobs, or a Failed."""
        text, logprobs = [], []
        async for event in self.stream():
            if isinstance(event, Failed):
                return event
            text.append(event.text)
            logprobs += event.logprobs
        return Done("".join(text), logprobs, event.stats, event.tokens)


class Engine:
    """The loaded model, its name, and the worker that runs jobs one at a time in arrival order."""

    def __init__(self, model, name: str, max_queue: int = 64, threads: int | None = None):
        if model.tokenizer is None:
            raise PhinanoError("the server needs a tokenizer.json in the model folder")
        self.model, self.tokenizer, self.name, self.max_queue = model, model.tokenizer, name, max_queue
        self.context_length = model.config.max_position_embeddings
        self.created = int(time.time())
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._texts: dict[int, tuple[str, list[int]]] = {}  # token id -> (text, bytes), for logprobs
        anchor = self.tokenizer.encode("a", add_special_tokens=False)
        self._anchor = (anchor, self.tokenizer.decode(anchor))
        self.ready = threading.Event()  # set after the warm-up (kernel compilation): the first client does not pay it
        threading.Thread(target=self._work, args=(threads,), name="phinano-generate", daemon=True).start()

    # --- requests side (event loop) ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job behind the ones already waiting; Busy when max_queue jobs are already waiting."""
        if self._jobs.qsize() >= self.max_queue:
            raise Busy(f"the server is busy: {self.max_queue} requests are already waiting")
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)

    # --- the worker thread --------------------------------------------------------------------------------
    def _work(self, threads: int | None) -> None:
        self.model.ops.set_threads(threads)  # Numba's thread count is per calling thread: set it in this one
        try:  # warm up here: Numba JIT (prefill and decode paths) and this thread's kernel thread pool
            self.model.generate(self.tokenizer.encode("hello, how are you?"), 8, stop_token_ids=[])
        except Exception:
            log.exception("warm-up generation failed")
        self.ready.set()
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                log.info("skipped a queued request: its client went away")
                continue
            try:
                self._run(job)
            except _Cancelled:
                pass
            except Exception as error:  # a bug must not take the worker (and so every client) down
                log.exception("generation failed")
                job.send(Failed(f"generation failed: {type(error).__name__}: {error}"))

    def _run(self, job: Job) -> None:
        stats: dict = {}
        tokens: list[int] = []
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not been sent yet
        stops = set(self.model.stop_token_ids)

        def on_step(token: int, logits: np.ndarray) -> None:
            if job.cancelled.is_set():
                log.info("stopped a generation after %d tokens: its client went away", len(tokens))
                raise _Cancelled
            tokens.append(token)
            if job.top_logprobs is not None and token not in stops:
                pending.append(self.logprob(token, logits, job.top_logprobs))

        vision = self.model.weights.vision
        vectors = [vision.embed(self.model.ops, img) for img in job.images] if job.images else None  # each (N_i, D)
        pieces = stream_text(self.model, job.ids, job.max_new_tokens, stop_strings=job.stop_strings, stats=stats,
                             on_step=on_step, images=vectors, **job.sampling)
        try:
            for text in pieces:
                job.send(Piece(text, pending[:]))
                pending.clear()
        finally:
            pieces.close()  # frees the KV cache now, also when the job was cancelled
        job.send(Done("", pending, stats, tokens))

    def logprob(self, token: int, logits: np.ndarray, k: int) -> TokenLogprob:
        """The chosen token's log-probability under softmax(logits) and the k most likely tokens'."""
        logprobs = logits.astype(np.float64) - logits.max()
        logprobs -= np.log(np.exp(logprobs).sum())  # (V,) log-softmax
        best = np.argsort(-logprobs, kind="stable")[:k] if k > 0 else []
        top = [(*self.token_text(int(i)), float(logprobs[i])) for i in best]
        return TokenLogprob(*self.token_text(token), float(logprobs[token]), top)

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token on its own, with its leading space (decoded after an anchor)."""
        if token not in self._texts:
            if token in self.tokenizer.byte_ids:  # "<0xE2>": one byte of a longer character
                byte = int(self.tokenizer.id_to_token(token)[3:5], 16)
                self._texts[token] = (chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}", [byte])
            else:
                anchor, anchor_text = self._anchor
                text = self.tokenizer.decode(anchor + [token])[len(anchor_text):]
                self._texts[token] = (text, list(text.encode("utf-8")))
        return self._texts[token]
