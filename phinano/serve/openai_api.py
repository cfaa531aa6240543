"""The OpenAI-compatible door: request bodies in, `chat.completion` / `text_completion` objects out. The fields,
and the four extensions vLLM also accepts (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`): docs/server.md.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator

from pydantic import Field

from .. import __version__
from ..reasoning import ReasoningSplit, split_reasoning
from .engine import Done, Engine, Failed, Job, TokenLogprob
from .validate import (ApiError, Body, Message, Reply, budget, chat_ids, logprobs_wanted, parse_body, sampling,
                       stop_strings, token_ids)

FINGERPRINT = f"phinano-{__version__}"
MEDIA_TYPE = "text/event-stream"
ROLES = {"system", "developer", "user", "assistant", "tool"}
DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's: a request that does not say otherwise samples
REFUSED = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "tools": [],  # unless null
           "response_format": {"type": "text"}, "echo": False, "suffix": "", "best_of": 1}  # or this value


class _Common(Body):
    """Fields of chat completions and completions alike. None (JSON null) means "the default"."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, le=2)  # OpenAI's range ends at 2; check_options does the rest
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # any integer, as in OpenAI's API (taken modulo 2**64)
    stream: bool | None = None
    stream_options: dict[str, bool] | None = None  # {"include_usage": true}
    top_k: int | None = None  # the extensions
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    sampler_order: str | None = None  # "transformers" (default) or "llama.cpp" (docs/sampling.md)


class ChatBody(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)


def job(kind: str, engine: Engine, body: object) -> tuple[Job, Reply]:
    req = parse_body(ChatBody if kind == "chat" else CompletionBody, body, engine, REFUSED)
    if kind == "chat":
        if not req.messages:
            raise ApiError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                           param="messages", code="empty_array")
        images: list = []  # Phi-3-vision: the images of image_url parts, in order
        ids = chat_ids(engine, req.messages, ROLES, content_required=True, images=images)
        param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        asked, top = getattr(req, param), logprobs_wanted(req.logprobs, req.top_logprobs)
    else:
        ids = _prompt_ids(engine, req.prompt)
        param, asked, top = "max_tokens", 16 if req.max_tokens is None else req.max_tokens, req.logprobs
    given = dict(temperature=req.temperature, top_p=req.top_p, top_k=None if req.top_k == -1 else req.top_k,
                 min_p=req.min_p, repetition_penalty=req.repetition_penalty, max_new_tokens=asked,
                 seed=None if req.seed is None else req.seed % 2**64, sampler_order=req.sampler_order)
    options = sampling(given, DEFAULTS, {"max_new_tokens": param})
    max_new = budget(ids, engine.context_length, options.pop("max_new_tokens", None), param, clip=False)
    if req.ignore_eos:
        options["stop_token_ids"] = []  # generate_tokens: [] never stops on a token
    include_usage = bool(req.stream and (req.stream_options or {}).get("include_usage"))
    reply = Reply(kind, req.model, bool(req.stream), top is not None, include_usage=include_usage,
                  id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}")
    return Job(ids, max_new, options, stop_strings(req.stop, most=4), top,
               images=images if kind == "chat" else None), reply


def _prompt_ids(engine: Engine, prompt: str | list) -> list[int]:
    """A completion's prompt: a string, or token ids, or a list of one of those."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "phinano completes one prompt per request; send a single prompt.", param="prompt",
                           code="unsupported_parameter")
        prompt = prompt[0]
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else token_ids(engine, prompt, "prompt")
    if not ids:
        raise ApiError(400, "The prompt is empty.", param="prompt")
    return ids


def response(reply: Reply, done: Done) -> dict:
    """The whole (non-streaming) `chat.completion` or `text_completion` object. A chat answer that reasons
    (`<think> ... </think>`, phinano.reasoning) carries its reasoning apart, as vLLM does: `reasoning_content`."""
    if reply.kind == "chat":
        reasoning, content = split_reasoning(done.text)
        extra = {} if reasoning is None else {"reasoning_content": reasoning}
        answer = {"message": {"role": "assistant", "content": content, **extra, "refusal": None}}
    else:
        answer = {"text": done.text}
    return _object(reply, [_choice(reply, answer, done.logprobs, done.stats["finish_reason"])], done.stats)


async def stream(reply: Reply, job: Job) -> AsyncIterator[str]:
    """Server-sent events: `data: <chunk>` per text piece, one with finish_reason, usage if asked, [DONE].
    A chat answer's reasoning streams as `reasoning_content` deltas, its reply as `content` deltas."""
    split = ReasoningSplit() if reply.kind == "chat" else None
    if reply.kind == "chat":
        yield _sse(_chunk(reply, {"role": "assistant", "content": ""}, [], None))
    async for event in job.stream():
        if isinstance(event, Failed):
            yield _sse(error_body(ApiError(500, event.message)))
        elif isinstance(event, Done):
            for delta in _deltas(split.flush() if split else ("", "")):
                yield _sse(_chunk(reply, delta, [], None))
            yield _sse(_chunk(reply, {}, event.logprobs, event.stats["finish_reason"]))
            if reply.include_usage:
                yield _sse(_object(reply, [], event.stats))
        elif split is None:
            yield _sse(_chunk(reply, {"content": event.text}, event.logprobs, None))
        else:
            deltas = _deltas(split.push(event.text))
            if not deltas and event.logprobs:  # text held back (it may open "<think>"): the logprobs still go
                deltas = [{"content": ""}]
            for i, delta in enumerate(deltas):
                yield _sse(_chunk(reply, delta, event.logprobs if i == 0 else [], None))
    yield "data: [DONE]\n\n"


def _deltas(pieces: tuple[str, str]) -> list[dict]:
    """(reasoning, reply) text -> the deltas that carry it: reasoning first, then content; none for "" ."""
    reasoning, content = pieces
    return ([{"reasoning_content": reasoning}] if reasoning else []) + ([{"content": content}] if content else [])


def _chunk(reply: Reply, delta: dict, logprobs: list[TokenLogprob], reason: str | None) -> dict:
    answer = {"delta": delta} if reply.kind == "chat" else {"text": delta.get("content", "")}
    return _object(reply, [_choice(reply, answer, logprobs, reason)])


def _choice(reply: Reply, answer: dict, logprobs: list[TokenLogprob], reason: str | None) -> dict:
    """One choice. Its logprobs: chat's {content: [entry, ...]}, or completions' older parallel lists, whose
    alternatives are {token: logprob} dicts that also hold the chosen token (up to logprobs + 1 entries)."""
    if not reply.logprobs:
        lps = None
    elif reply.kind == "chat":
        lps = {"content": [lp.entry() for lp in logprobs], "refusal": None}
    else:
        lps = {"tokens": [lp.text for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
               "top_logprobs": [{lp.text: lp.logprob, **{t: v for t, _, v in lp.top}} for lp in logprobs],
               "text_offset": list(itertools.accumulate((len(lp.text) for lp in logprobs), initial=0))[:-1]}
    return {"index": 0, **answer, "logprobs": lps, "finish_reason": reason}


def _object(reply: Reply, choices: list, stats: dict | None = None) -> dict:
    """A response, or a chunk when streaming: a chunk has `usage` only if the client asked (null but in the last)."""
    kind = "text_completion" if reply.kind == "completion" else f"chat.completion{'.chunk' if reply.stream else ''}"
    out = {"id": reply.id, "object": kind, "created": reply.created, "model": reply.model,
           "system_fingerprint": FINGERPRINT, "choices": choices}
    if not reply.stream or reply.include_usage:
        out["usage"] = None if stats is None else {
            "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["new_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["new_tokens"]}
    return out


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "phinano"}


def error_body(error: ApiError) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
