"""The one model behind `phinano serve`: a first-in, first-out queue of `Job`s and one worker thread that
generates for every admitted job at once (docs/server.md, "One model, several clients: batching").

The worker's loop, one turn per generated token:
    admit   jobs from the queue while fewer than `max_batch` are running; each prefills its prompt alone
            (the batch waits) and draws its first token
    drop    jobs whose client went away (only theirs)
    step    the next token of every running job in one `Model.step_batch` (each weight read once for all)
    draw    each job draws its token from its own logits, with its own sampling settings and stops
Each job runs generate.py's own loop (`generate_steps`: penalty, sampling, stop tokens and strings, length),
paused after every token; `_Member`, its Sequence, hands it the logits the batch step left for it. Batching
never changes a token: `Model.step_batch` gives each row bit for bit what the sequence alone would get.
Nothing here knows about HTTP: a full queue raises `Busy`, and the app says what that means.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence as Ids
from dataclasses import dataclass, field

import numpy as np

from ..errors import PhinanoError
from ..generate import Sequence, TextStops, generate_steps
from ..rope import rope_variant

log = logging.getLogger("phinano.serve")


class Busy(Exception):
    """The queue is full: the job was not queued."""


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
    """One generation: the prompt ids, the length budget and generate_steps' keyword arguments."""

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


class _Member(Sequence):
    """A job's Sequence in the batch: a one-token feed that the batch step has already run returns the logits it
    left here (`ready`); any other feed (the prompt, a longrope recompute) runs alone, as Sequence.feed does."""

    ready: tuple[int, np.ndarray] | None = None  # (token, its logits (V,)) from the last batch step

    def feed_rows(self, new: Ids[int], rows: int) -> np.ndarray:
        if self.ready is None:
            return super().feed_rows(new, rows)
        (token, logits), self.ready = self.ready, None
        if [int(t) for t in new] != [token] or rows != 1:
            raise RuntimeError(f"the batch step ran token {token}, the generation fed {list(new)}")
        return logits[None]  # (1, V)


class _Generation:
    """One running job: its generation loop (generate_steps, paused after each token), and what is not sent yet."""

    def __init__(self, model, job: Job, logprob):
        self.job, self.model, self.logprob = job, model, logprob
        self.stats: dict = {}
        self.tokens: list[int] = []  # every generated id
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not been sent yet
        stop_ids = job.sampling.get("stop_token_ids")
        self.stop_ids = set(model.stop_token_ids if stop_ids is None else stop_ids)
        self.text = TextStops(model.tokenizer, job.stop_strings)
        room = min(job.max_new_tokens, model.config.max_position_embeddings - len(job.ids))  # as generate_steps
        vision = model.weights.vision  # Phi-3-vision: each image's (N_i, D) vectors, computed once here
        images = [vision.embed(model.ops, img) for img in job.images] if job.images else None
        self.sequence = _Member(model, len(job.ids) + max(0, room), images=images)
        self.steps = generate_steps(model, job.ids, job.max_new_tokens, text=self.text, stats=self.stats,
                                    on_step=self._on_step, sequence=self.sequence, images=images, **job.sampling)

    def _on_step(self, token: int, logits: np.ndarray) -> None:
        self.tokens.append(token)
        if self.job.top_logprobs is not None and token not in self.stop_ids:
            self.pending.append(self.logprob(token, logits, self.job.top_logprobs))

    def next_token(self) -> int | None:
        """The token the loop will feed next, if the batch step may run it: None when the loop is about to end
        (a stop token or string, the length limit) or the next position crosses the longrope switch (the loop's
        own feed then recomputes the sequence alone). A wrong guess costs time, never a token (`_Member`)."""
        seq, token = self.sequence, self.tokens[-1]
        if token in self.stop_ids or self.text.stopped or len(seq.tokens) + 1 >= seq.cache.capacity:
            return None
        if not seq.cache.fits(rope_variant(self.model.config, len(seq.tokens) + 1)):
            return None
        return token

    def advance(self) -> bool:
        """Draw the next token (prefilling first, on the first call) and send the text it makes printable;
        at the end send the rest and Done. False once the generation is over."""
        try:
            _, piece = next(self.steps)
        except StopIteration:
            rest = self.text.flush()  # what stream_text does at the end
            if self.text.stopped:  # a stop string completed by the final bytes
                self.stats["finish_reason"] = "stop"
            if rest:
                self.send(rest)
            self.job.send(Done("", self.pending, self.stats, self.tokens))
            return False
        if piece:
            self.send(piece)
        return True

    def send(self, text: str) -> None:
        self.job.send(Piece(text, self.pending[:]))
        self.pending.clear()

    def close(self) -> None:
        self.steps.close()


class Engine:
    """The loaded model, its name, and the worker that generates for up to `max_batch` jobs at once, admitting
    them in arrival order."""

    def __init__(self, model, name: str, max_queue: int = 64, threads: int | None = None, max_batch: int = 8):
        if model.tokenizer is None:
            raise PhinanoError("the server needs a tokenizer.json in the model folder")
        if max_batch < 1:
            raise PhinanoError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer, self.name, self.max_queue = model, model.tokenizer, name, max_queue
        self.max_batch = max_batch
        self.context_length = model.config.max_position_embeddings
        self.created = int(time.time())
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._texts: dict[int, tuple[str, list[int]]] = {}  # token id -> (text, bytes), for logprobs
        anchor = self.tokenizer.encode("a", add_special_tokens=False)
        self._anchor = (anchor, self.tokenizer.decode(anchor))
        self.ready = threading.Event()  # set after the warm-up (kernel compilation): the first client does not pay it
        self._worker = threading.Thread(target=self._work, args=(threads,), name="phinano-generate", daemon=True)
        self._worker.start()

    # --- requests side (event loop) ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job behind the ones already waiting; Busy when max_queue jobs are already waiting."""
        if self._jobs.qsize() >= self.max_queue:
            raise Busy(f"the server is busy: {self.max_queue} requests are already waiting")
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        self._jobs.put(job)

    def close(self) -> None:
        """Stop the worker after the jobs already queued (and its warm-up), and wait for it."""
        self._jobs.put(None)
        if threading.current_thread() is not self._worker:
            self._worker.join()

    # --- the worker thread --------------------------------------------------------------------------------
    def _work(self, threads: int | None) -> None:
        self.model.ops.set_threads(threads)  # Numba's thread count is per calling thread: set it in this one
        try:  # warm up here: Numba JIT (prefill, decode and batch paths) and this thread's kernel thread pool
            self.model.generate(self.tokenizer.encode("hello, how are you?"), 8, stop_token_ids=[])
            caches = [self.model.new_cache(1), self.model.new_cache(1)]
            self.model.step_batch(caches, self.tokenizer.encode("hi", add_special_tokens=False)[:1] * 2)
        except Exception:
            log.exception("warm-up generation failed")
        self.ready.set()
        running: list[_Generation] = []
        while self._admit(running):
            running[:] = [g for g in running if not self._gone(g)]
            self._step(running)

    def _admit(self, running: list[_Generation]) -> bool:
        """Start queued jobs while there is room (waiting for one when nothing runs): prefill each and draw
        its first token. False when the engine is closed."""
        while len(running) < self.max_batch:
            try:
                job = self._jobs.get(block=not running)
            except queue.Empty:
                return True
            if job is None:
                for g in running:
                    g.close()
                return False
            if job.cancelled.is_set():
                log.info("skipped a queued request: its client went away")
                continue
            generation = self._guarded([job], lambda: _Generation(self.model, job, self.logprob))
            if generation is not None and self._guarded([job], generation.advance):
                running.append(generation)
        return True

    def _gone(self, g: _Generation) -> bool:
        """Whether the job's client went away; if so its generation stops here (the others run on)."""
        if g.job.cancelled.is_set():
            log.info("stopped a generation after %d tokens: its client went away", len(g.tokens))
            g.close()
            return True
        return False

    def _step(self, running: list[_Generation]) -> None:
        """One token for every running job: the batch step for those whose next feed it can run, then each
        job's draw (a job left out feeds alone, or ends). Ended and failed jobs leave `running`."""
        batch = [(g, token) for g in running if (token := g.next_token()) is not None]
        if batch:
            t0 = time.perf_counter()
            members = [g for g, _ in batch]
            logits = self._guarded([g.job for g in members], lambda: self.model.step_batch(
                [g.sequence.cache for g in members], [token for _, token in batch]))  # (B, V)
            if logits is None:  # failed: every job in it was told
                running[:] = [g for g in running if g not in members]
                return
            seconds = time.perf_counter() - t0
            for (g, token), row in zip(batch, logits):
                g.sequence.tokens.append(token)
                g.sequence.ready = (token, row)
                g.stats["decode_seconds"] += seconds  # what this token waited for; the draw adds its own time
        running[:] = [g for g in running if self._guarded([g.job], g.advance)]

    def _guarded(self, jobs: list[Job], work):
        """work(), or None after telling each job that it failed: a bug must not take the worker (and so every
        client) down."""
        try:
            return work()
        except Exception as error:
            log.exception("generation failed")
            for job in jobs:
                job.send(Failed(f"generation failed: {type(error).__name__}: {error}"))
            return None

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
