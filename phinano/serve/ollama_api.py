"""The Ollama-compatible door: /api/generate and /api/chat bodies in, NDJSON chunks (or one object) out, with
Ollama's defaults and error shape. Where it differs from Ollama (sampler order, repeat_penalty): docs/server.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from pydantic import ConfigDict, Field

from ..errors import PhinanoError
from ..reasoning import ReasoningSplit, split_reasoning
from .engine import Done, Engine, Failed, Job, TokenLogprob
from .validate import (ApiError, Body, Message, Reply, budget, chat_ids, logprobs_wanted, parse_body, refuse, sampling,
                       stop_strings, token_ids)

log = logging.getLogger("phinano.serve")
MEDIA_TYPE = "application/x-ndjson"
ROLES = {"system", "user", "assistant", "tool"}
DEFAULT_NUM_CTX = 4096  # capped at the model's context
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.1}
NAMES = {"temperature": "options.temperature", "top_k": "options.top_k", "top_p": "options.top_p",
         "min_p": "options.min_p", "repetition_penalty": "options.repeat_penalty", "seed": "options.seed",
         "sampler_order": "options.sampler_order"}
# Refused unless null or this value:
REFUSED = {"format": "", "tools": [], "suffix": "", "template": "", "images": []}
REFUSED_OPTIONS = {"presence_penalty": 0, "frequency_penalty": 0, "typical_p": 1, "mirostat": 0}
# Runner options: meaningless here, ignored without a warning (other unknown options get one).
IGNORED = {"repeat_last_n", "num_keep", "num_batch", "num_thread", "num_gpu", "main_gpu", "use_mmap", "use_mlock",
           "numa", "low_vram", "f16_kv", "vocab_only", "logits_all", "embedding_only", "penalize_newline", "tfs_z",
           "mirostat_tau", "mirostat_eta"}
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # as Ollama's quantization_level


class Options(Body):
    """The options phinano honours (None: Ollama's default); others are extra: refused or ignored."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    temperature: float | None = None
    top_k: int | None = None  # <= 0: off
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None  # < 0: random
    num_predict: int | None = Field(None, ge=-2)  # -1: until the context's end; -2: fill the context
    num_ctx: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    sampler_order: str | None = None  # an extra: "transformers" (default) or "llama.cpp" (docs/sampling.md)


class Request(Body):
    """/api/chat's and /api/generate's fields (each endpoint reads its own)."""

    model: str
    options: Options | None = None
    stream: bool | None = None  # default true
    keep_alive: str | int | float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    messages: list[Message] | None = None  # /api/chat
    prompt: str | None = None  # /api/generate
    system: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    think: bool | None = None  # null or true: reasoning apart, as `thinking`; false: left in the text as written
    images: list | None = None  # /api/generate, Phi-3-vision: base64 images (a text model refuses them)


def job(kind: str, engine: Engine, body: object) -> tuple[Job | None, Reply]:
    """A Job, or (None, reply) for an empty prompt or empty messages, which in Ollama only loads the model."""
    vision = engine.model.weights.vision is not None
    req = parse_body(Request, body, engine, {k: v for k, v in REFUSED.items() if not (vision and k == "images")})
    refuse(body.get("options") or {}, REFUSED_OPTIONS, prefix="options.")
    o = req.options or Options()
    unknown = set(o.model_extra or {}) - set(REFUSED_OPTIONS) - IGNORED
    if unknown:
        log.warning("invalid option provided: %s (ignored)", ", ".join(sorted(unknown)))
    top = logprobs_wanted(req.logprobs, req.top_logprobs)
    reply = Reply(kind, req.model, req.stream is not False, top is not None, unload=req.keep_alive in (0, "0", "0s"),
                  reasoning=req.think is not False)
    if not (req.messages if kind == "chat" else req.prompt or req.context):
        return None, reply
    images: list = []  # Phi-3-vision: the messages' images, in order
    ids = chat_ids(engine, req.messages, ROLES, content_required=False, images=images) if kind == "chat" else \
        _generate_ids(engine, req, reply, images)
    asked = None if o.num_predict is None or o.num_predict < 0 else o.num_predict
    max_new = budget(ids, min(o.num_ctx or DEFAULT_NUM_CTX, engine.context_length), asked, "num_ctx", clip=True)
    given = dict(temperature=o.temperature, top_k=None if o.top_k is None else max(o.top_k, 0), top_p=o.top_p,
                 min_p=o.min_p, repetition_penalty=o.repeat_penalty, seed=None if (o.seed or 0) < 0 else o.seed,
                 sampler_order=o.sampler_order)
    return Job(ids, max_new, sampling(given, DEFAULTS, NAMES), stop_strings(o.stop), top, images=images), reply


def _generate_ids(engine: Engine, req: Request, reply: Reply, images: list) -> list[int]:
    """The prompt as is (raw), else in the chat template after `system` and a previous answer's `context`.
    Images (Phi-3-vision) go before the prompt as `<|image_N|>` markers, expanded to their positions; such a
    prompt is not returned as `context` (its image positions are no token ids)."""
    tok, prompt = engine.tokenizer, req.prompt or ""
    if req.images:
        return _generate_ids_with_images(engine, req, images)
    if req.raw:
        return tok.encode(prompt)
    messages = ([{"role": "system", "content": req.system}] if req.system else [])
    try:
        ids = tok.apply_chat_template(messages + [{"role": "user", "content": prompt}], add_generation_prompt=True)
    except PhinanoError:  # no chat template: Ollama's default template is the prompt itself
        ids = tok.encode(prompt)
    reply.context = token_ids(engine, req.context or [], "context") + ids
    return reply.context


def _generate_ids_with_images(engine: Engine, req: Request, images: list) -> list[int]:
    from ..vision.prompt import expand
    from .validate import decode_base64, image_marker

    markers = "".join(image_marker(images, decode_base64(data, f"images[{j}]"), f"images[{j}]")
                      for j, data in enumerate(req.images))
    text = markers + (req.prompt or "")
    if not req.raw:
        messages = ([{"role": "system", "content": req.system}] if req.system else [])
        text = engine.tokenizer.apply_chat_template(messages + [{"role": "user", "content": text}], tokenize=False)
    try:
        return expand(engine.tokenizer.encode_prompt(text), [engine.model.weights.vision.positions(i) for i in images])
    except PhinanoError as error:
        raise ApiError(400, str(error), param="prompt") from None


async def stream(reply: Reply, job: Job) -> AsyncIterator[str]:
    """One JSON object per line: a chunk per text piece, then the final object with done: true. A reasoning
    answer's thinking streams in chunks of its own (`thinking` set, the text empty), as Ollama's do."""
    split = ReasoningSplit() if reply.reasoning else None
    async for event in job.stream():
        lines = []
        if isinstance(event, Failed):
            lines = [error_body(ApiError(500, event.message))]
        elif isinstance(event, Done):
            thinking, text = split.flush() if split else ("", "")
            if thinking or text:
                lines.append(_chunk(reply, text, [], thinking))
            lines.append(response(reply, event))
        elif split is None:
            lines = [_chunk(reply, event.text, event.logprobs)]
        else:
            thinking, text = split.push(event.text)
            if thinking or text or event.logprobs:
                lines = [_chunk(reply, text, event.logprobs, thinking)]
        for line in lines:
            yield json.dumps(line, ensure_ascii=False) + "\n"


def _chunk(reply: Reply, text: str, logprobs: list[TokenLogprob], thinking: str | None = None) -> dict:
    """A chunk; `thinking` (the reasoning, /api/chat: in the message) appears only when there is some."""
    extra = {"thinking": thinking} if thinking else {}
    answer = {"message": {"role": "assistant", "content": text, **extra}} if reply.kind == "chat" \
        else {"response": text, **extra}
    chunk = {"model": reply.model, "created_at": _rfc3339(time.time()), **answer, "done": False}
    if reply.logprobs:
        chunk["logprobs"] = [lp.entry() for lp in logprobs]
    return chunk


def response(reply: Reply, done: Done | None) -> dict:
    """The last object (the only one when not streaming); done None: the reply to "load the model"."""
    if done is None:
        return {**_chunk(reply, "", []), "done": True, "done_reason": "unload" if reply.unload else "load"}
    thinking, text = split_reasoning(done.text) if reply.reasoning else (None, done.text)
    final = {**_chunk(reply, text, done.logprobs, thinking), "done": True, "done_reason": done.stats["finish_reason"]}
    s = done.stats
    if reply.context is not None:
        final["context"] = reply.context + done.tokens
    final.update(total_duration=int((time.perf_counter() - reply.started) * 1e9), load_duration=0,
                 prompt_eval_count=s["prompt_tokens"], prompt_eval_duration=int(s["prefill_seconds"] * 1e9),
                 eval_count=s["new_tokens"], eval_duration=int(s["decode_seconds"] * 1e9))
    return final


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def tags(engine: Engine) -> dict:
    """/api/tags: the one model, described as Ollama describes its models."""
    model, name, dtype = engine.model, f"{engine.name}:latest", str(engine.model.weights.dtype)
    family = "phimoe" if model.config.is_moe else "phi3"
    total, _ = model.parameter_counts()
    size = next((f"{total / scale:.1f}{unit}" for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3))
                 if total >= scale), str(total))
    details = {"parent_model": "", "format": model.weights.file_format, "family": family, "families": [family],
               "parameter_size": size, "quantization_level": DTYPE_NAMES.get(dtype, dtype)}
    return {"models": [{"name": name, "model": name, "modified_at": _rfc3339(engine.created),
                        "size": int(model.weights.nbytes), "digest": hashlib.sha256(engine.name.encode()).hexdigest(),
                        "details": details}]}


def error_body(error: ApiError) -> dict:
    """Ollama's error object: {"error": "message"}."""
    return {"error": error.message}
