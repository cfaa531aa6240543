"""The OpenAI-compatible door: request bodies in, `chat.completion` / `text_completion` objects out.

Shapes follow OpenAI's API reference (see docs/server.md for the field list). What phinano does not do is
refused with a 400 that names the parameter, rather than silently ignored: `n` > 1, `frequency_penalty` /
`presence_penalty` other than 0, `logit_bias`, tools, non-text `response_format`, image content, `echo`,
`suffix`, `best_of` > 1. Four extensions that vLLM also accepts (send them in `extra_body`): `top_k`, `min_p`,
`repetition_penalty`, and `ignore_eos` (keep going past the model's stop tokens, e.g. for benchmarks).

Every function here is plain: a body (already decoded JSON) becomes a Job and a Reply (what the response
needs besides the generated text); events from the engine become response dicts or server-sent events.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .errors import PhinanoError
from .server_engine import ApiError, Done, Engine, Failed, Job, Piece, TokenLogprob, parse_body

FINGERPRINT = f"phinano-{__version__}"
ROLES = {"system", "developer", "user", "assistant", "tool"}


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    # strict: "1" is not a number and 1.0 is not an integer (OpenAI rejects both); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Common(_Body):
    """Fields shared by chat completions and completions. None (JSON null) means "the default"."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # default 1
    top_p: float | None = Field(None, gt=0, le=1)  # default 1
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM's names), 0 / None = off
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None


class ChatBody(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


@dataclass
class Reply:
    """What a response needs besides the generated text."""

    kind: Literal["chat", "completion"]
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool


# ------------------------------------------------------------------ body -> job
def chat_job(engine: Engine, body: object) -> tuple[Job, Reply]:
    req = parse_body(ChatBody, body)
    _check_common(engine, req)
    if not req.messages:
        raise ApiError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                       param="messages", code="empty_array")
    if req.tools:
        raise ApiError(400, "phinano does not support tools (function calling).", param="tools",
                       code="unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise ApiError(400, "phinano supports only response_format {\"type\": \"text\"}.", param="response_format",
                       code="unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m, i)}
                for i, m in enumerate(req.messages)]
    try:
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except PhinanoError as error:
        raise ApiError(400, str(error), param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    job = Job(ids, _budget(engine, ids, max_tokens, param), _sampling(req), _stops(req.stop),
              top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    return job, _reply("chat", "chatcmpl", req, bool(req.logprobs))


def completion_job(engine: Engine, body: object) -> tuple[Job, Reply]:
    req = parse_body(CompletionBody, body)
    _check_common(engine, req)
    for name, refused in (("echo", req.echo), ("suffix", req.suffix), ("best_of", (req.best_of or 1) > 1)):
        if refused:
            raise ApiError(400, f"phinano does not support '{name}'.", param=name, code="unsupported_parameter")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "phinano completes one prompt per request; send a single prompt.", param="prompt",
                           code="unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    else:  # token ids
        ids = list(prompt)
        if any(not 0 <= i < engine.model.config.vocab_size for i in ids):
            raise ApiError(400, f"Invalid token id in 'prompt': ids run from 0 to "
                                f"{engine.model.config.vocab_size - 1}.", param="prompt")
    if not ids:
        raise ApiError(400, "The prompt is empty.", param="prompt")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    job = Job(ids, _budget(engine, ids, max_tokens, "max_tokens"), _sampling(req), _stops(req.stop),
              top_logprobs=req.logprobs)
    return job, _reply("completion", "cmpl", req, req.logprobs is not None)


def _check_common(engine: Engine, req: _Common) -> None:
    if not engine.serves(req.model):
        raise ApiError(404, f"The model `{req.model}` does not exist. This server serves `{engine.name}`.",
                       param="model", code="model_not_found")
    if (req.n or 1) != 1:
        raise ApiError(400, "phinano generates one choice per request; n must be 1.", param="n",
                       code="unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"phinano does not implement {name}; leave it at 0 (or use the extension "
                                f"'repetition_penalty', Transformers' multiplicative penalty).", param=name,
                           code="unsupported_parameter")
    if req.logit_bias:
        raise ApiError(400, "phinano does not support logit_bias.", param="logit_bias", code="unsupported_parameter")


def _text(message: Message, index: int) -> str:
    if message.role not in ROLES:
        raise ApiError(400, f"Invalid value for 'messages[{index}].role': '{message.role}'. Supported values are: "
                            f"{', '.join(sorted(ROLES))}.", param=f"messages[{index}].role")
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"phinano reads text only; 'messages[{index}].content' has a '{part.type}' part.",
                           param=f"messages[{index}].content", code="unsupported_content")
    return "".join(part.text for part in message.content)


def _budget(engine: Engine, ids: list[int], max_tokens: int | None, param: str) -> int:
    """New tokens allowed: max_tokens if prompt + max_tokens fits the context, else a 400 as OpenAI sends."""
    context = engine.context_length
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"Invalid '{param}': integer below minimum value. Expected a value >= 1, but got "
                            f"{max_tokens} instead.", param=param, code="integer_below_min_value")
    if len(ids) >= context or (max_tokens is not None and len(ids) + max_tokens > context):
        asked = len(ids) + (max_tokens or 0)
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{asked} tokens ({len(ids)} in the prompt, {max_tokens or 0} for the completion). "
                            f"Please reduce the length of the prompt or the completion.", param=param,
                       code="context_length_exceeded")
    return context - len(ids) if max_tokens is None else max_tokens


def _sampling(req: _Common) -> dict:
    """OpenAI's defaults: temperature 1, top_p 1 (so a request without them samples)."""
    top_p = req.top_p if req.top_p is not None else 1.0
    sampling = dict(temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=top_p if top_p < 1.0 else None, top_k=req.top_k if req.top_k and req.top_k > 0 else None,
                    min_p=req.min_p or None, repetition_penalty=req.repetition_penalty or 1.0,
                    seed=None if req.seed is None else req.seed % 2**64)  # OpenAI takes any integer
    if req.ignore_eos:
        sampling["stop_token_ids"] = []  # generate_tokens: [] never stops on a token
    return sampling


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError(400, "Invalid 'stop': array too long. Expected an array with maximum length 4.",
                       param="stop", code="array_above_max_length")
    return [s for s in stops if s]


def _reply(kind, prefix: str, req: _Common, logprobs: bool) -> Reply:
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return Reply(kind, f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), req.model, bool(req.stream),
                 include_usage, logprobs)


# ------------------------------------------------------------------ events -> responses
def usage(stats: dict) -> dict:
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["new_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["new_tokens"]}


def response(reply: Reply, text: str, logprobs: list[TokenLogprob], done: Done) -> dict:
    """The whole (non-streaming) `chat.completion` or `text_completion` object."""
    reason = done.stats["finish_reason"]
    if reply.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": _chat_logprobs(logprobs) if reply.logprobs else None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": _legacy_logprobs(logprobs) if reply.logprobs else None,
                  "finish_reason": reason}
    return {"id": reply.id, "object": "chat.completion" if reply.kind == "chat" else "text_completion",
            "created": reply.created, "model": reply.model, "system_fingerprint": FINGERPRINT,
            "choices": [choice], "usage": usage(done.stats)}


async def sse(reply: Reply, job: Job) -> AsyncIterator[str]:
    """Server-sent events: `data: <chunk>` per text piece, one with finish_reason, usage if asked, [DONE]."""
    if reply.kind == "chat":
        yield _event(_chunk(reply, {"role": "assistant", "content": ""}, None, None))
    async for event in job.stream():
        if isinstance(event, Piece):
            yield _event(_chunk(reply, {"content": event.text}, event.logprobs, None))
        elif isinstance(event, Done):
            yield _event(_chunk(reply, {}, event.logprobs, event.stats["finish_reason"]))
            if reply.include_usage:
                yield _event(_frame(reply, [], usage(event.stats)))
        elif isinstance(event, Failed):
            yield _event(error_body(500, event.message))
    yield "data: [DONE]\n\n"


def _chunk(reply: Reply, delta: dict, logprobs: list[TokenLogprob] | None, reason: str | None) -> dict:
    if reply.kind == "chat":
        lp = _chat_logprobs(logprobs or []) if reply.logprobs else None
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
    else:
        lp = _legacy_logprobs(logprobs or []) if reply.logprobs else None
        choice = {"index": 0, "text": delta.get("content", ""), "logprobs": lp, "finish_reason": reason}
    return _frame(reply, [choice], None)


def _frame(reply: Reply, choices: list, usage_block: dict | None) -> dict:
    frame = {"id": reply.id, "object": "chat.completion.chunk" if reply.kind == "chat" else "text_completion",
             "created": reply.created, "model": reply.model, "system_fingerprint": FINGERPRINT, "choices": choices}
    if reply.include_usage:
        frame["usage"] = usage_block
    return frame


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    return {"content": [{"token": lp.text, "logprob": lp.logprob, "bytes": lp.bytes,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, b, v in lp.top]}
                        for lp in logprobs], "refusal": None}


def _legacy_logprobs(logprobs: list[TokenLogprob]) -> dict:
    """The completions endpoint's older shape: parallel lists, alternatives as {token: logprob} dicts that
    also hold the chosen token (so up to logprobs + 1 entries, as OpenAI documents)."""
    offsets, at = [], 0
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.text)
    return {"tokens": [lp.text for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{lp.text: lp.logprob, **{t: v for t, _, v in lp.top}} for lp in logprobs],
            "text_offset": offsets}


# ------------------------------------------------------------------ the rest of the API
def models(engine: Engine) -> dict:
    return {"object": "list", "data": [model_card(engine)]}


def model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "phinano"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
