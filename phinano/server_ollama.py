"""The Ollama-compatible door: /api/generate and /api/chat bodies in, NDJSON chunks (or one object) out.

Defaults are Ollama's (`DefaultOptions()`): temperature 0.8, top_k 40, top_p 0.9, min_p 0, repeat_penalty 1.1,
a random seed, num_predict -1 (until a stop or the context's end), num_ctx 4096 (capped at the model's
context). Two differences, both documented in docs/server.md:

- **Sampler order.** Ollama's llama.cpp runner applies temperature *last* (penalties -> top-k -> top-p ->
  min-p -> temperature); phinano applies Transformers' order, temperature *first*. At temperature 1 or 0
  (greedy) they agree; otherwise top-p and min-p can keep different token sets.
- **repeat_penalty** divides/multiplies the logits of every token in the sequence (Transformers' rule);
  `repeat_last_n` is accepted and ignored.

Refused with a 400 (Ollama's `{"error": "..."}` shape): images, tools, `format`, `suffix`, a custom
`template`, `think`, and non-neutral `presence_penalty`, `frequency_penalty`, `typical_p`, `mirostat`.
Unknown option names are logged and ignored, as Ollama does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field

from .errors import PhinanoError
from .server_engine import ApiError, Done, Engine, Failed, Job, Piece, TokenLogprob, parse_body

log = logging.getLogger("phinano.server")
DEFAULT_NUM_CTX = 4096
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # as Ollama's quantization_level


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class Options(_Body):
    """The options phinano honours, with Ollama's defaults (None = that default)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # unknown keys: logged, ignored
    temperature: float | None = Field(None, ge=0)  # 0.8
    top_k: int | None = None  # 40; <= 0 off
    top_p: float | None = Field(None, ge=0, le=1)  # 0.9
    min_p: float | None = Field(None, ge=0, le=1)  # 0.0
    repeat_penalty: float | None = Field(None, gt=0)  # 1.1
    repeat_last_n: int | None = None  # accepted, ignored: the penalty covers the whole sequence
    seed: int | None = None  # < 0: random
    num_predict: int | None = Field(None, ge=-2)  # -1: until the context's end; -2: fill the context
    num_ctx: int | None = Field(None, ge=1)  # 4096, capped at the model's context
    stop: str | list[str] | None = None
    # known to Ollama, refused unless neutral
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    mirostat: int | None = None


# Ollama's runner/load-time options: meaningless for phinano, ignored without a warning.
RUNNER_OPTIONS = {"num_keep", "num_batch", "num_thread", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "numa",
                  "low_vram", "f16_kv", "vocab_only", "logits_all", "embedding_only", "penalize_newline",
                  "tfs_z", "mirostat_tau", "mirostat_eta"}


class Message(_Body):
    role: str
    content: str | None = None
    images: list | None = None
    tool_calls: list | None = None
    thinking: str | None = None
    tool_name: str | None = None


class _Request(_Body):
    model: str
    options: Options | None = None
    stream: bool | None = None  # default true
    format: str | dict | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class GenerateBody(_Request):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list | None = None


class ChatBody(_Request):
    messages: list[Message] | None = None
    tools: list | None = None


@dataclass
class Reply:
    kind: str  # "generate" or "chat"
    model: str
    stream: bool
    started: float  # time.perf_counter() when the request arrived
    context: list[int] | None  # the prompt ids, for /api/generate's `context` (None when raw)
    logprobs: bool
    unload: bool = False  # keep_alive 0 with nothing to generate: Ollama answers done_reason "unload"


# ------------------------------------------------------------------ body -> job (or a "load" reply)
def generate_job(engine: Engine, body: object) -> tuple[Job | None, Reply]:
    """A Job, or (None, reply) for an empty prompt, which in Ollama only loads the model."""
    started = time.perf_counter()
    req = parse_body(GenerateBody, body)
    _check_common(engine, req)
    for name, refused in (("suffix", req.suffix), ("template", req.template), ("images", req.images)):
        if refused:
            raise ApiError(400, f"phinano does not support '{name}'")
    reply = Reply("generate", req.model, req.stream is not False, started, None, bool(req.logprobs),
                  unload=req.keep_alive in (0, "0", "0s"))
    if not req.prompt and not req.context:
        return None, reply
    tok = engine.tokenizer
    prompt = req.prompt or ""
    if req.raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else [])
        messages.append({"role": "user", "content": prompt})
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        except PhinanoError:  # no chat template: Ollama's default template is the prompt itself
            ids = tok.encode(prompt)
        if req.context:
            if any(not 0 <= i < engine.model.config.vocab_size for i in req.context):
                raise ApiError(400, "context holds a token id out of range")
            ids = list(req.context) + ids
        reply.context = ids
    return _job(engine, req, ids), reply


def chat_job(engine: Engine, body: object) -> tuple[Job | None, Reply]:
    """A Job, or (None, reply) for empty messages, which in Ollama only loads the model."""
    started = time.perf_counter()
    req = parse_body(ChatBody, body)
    _check_common(engine, req)
    if req.tools:
        raise ApiError(400, f"registry.ollama.ai/library/{req.model} does not support tools")
    reply = Reply("chat", req.model, req.stream is not False, started, None, bool(req.logprobs),
                  unload=req.keep_alive in (0, "0", "0s"))
    if not req.messages:
        return None, reply
    messages = []
    for i, m in enumerate(req.messages):
        if m.images:
            raise ApiError(400, f"messages[{i}]: phinano reads text only (no images)")
        if m.role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}]: invalid role '{m.role}'")
        messages.append({"role": m.role, "content": m.content or ""})
    try:
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except PhinanoError as error:
        raise ApiError(400, str(error)) from None
    return _job(engine, req, ids), reply


def _check_common(engine: Engine, req: _Request) -> None:
    if not engine.serves(req.model):
        raise ApiError(404, f"model '{req.model}' not found (this server serves '{engine.name}')")
    if req.format:
        raise ApiError(400, "phinano does not support 'format' (structured output)")
    if req.think:
        raise ApiError(400, f"\"{req.model}\" does not support thinking")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true")


def _job(engine: Engine, req: _Request, ids: list[int]) -> Job:
    o = req.options or Options()
    for name, value, neutral in (("presence_penalty", o.presence_penalty, 0), ("frequency_penalty",
                                 o.frequency_penalty, 0), ("typical_p", o.typical_p, 1), ("mirostat", o.mirostat, 0)):
        if value not in (None, neutral):
            raise ApiError(400, f"phinano does not support the option {name} (other than {neutral})")
    unknown = set(o.model_extra or {}) - RUNNER_OPTIONS
    if unknown:
        log.warning("invalid option provided: %s (ignored)", ", ".join(sorted(unknown)))
    context = min(o.num_ctx or DEFAULT_NUM_CTX, engine.context_length)
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, which does not fit the context of {context} tokens "
                            f"(num_ctx {o.num_ctx or DEFAULT_NUM_CTX}, model {engine.context_length})")
    room = context - len(ids)
    num_predict = -1 if o.num_predict is None else o.num_predict
    stops = [o.stop] if isinstance(o.stop, str) else [s for s in (o.stop or []) if s]
    top_k = 40 if o.top_k is None else o.top_k
    top_p = 0.9 if o.top_p is None else o.top_p
    sampling = dict(temperature=0.8 if o.temperature is None else o.temperature,
                    top_k=top_k if top_k > 0 else None, top_p=top_p if 0 < top_p < 1 else None,
                    min_p=o.min_p or None, repetition_penalty=1.1 if o.repeat_penalty is None else o.repeat_penalty,
                    seed=o.seed if o.seed is not None and o.seed >= 0 else None)
    return Job(ids, room if num_predict < 0 else min(num_predict, room), sampling, stops,
               top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)


# ------------------------------------------------------------------ events -> responses
def now() -> str:
    """Ollama's created_at: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def load_reply(reply: Reply) -> dict:
    """What Ollama answers to an empty prompt / empty messages: the model is loaded (phinano never unloads it)."""
    return _final(reply, "", "unload" if reply.unload else "load")


def response(reply: Reply, text: str, logprobs: list[TokenLogprob], done: Done) -> dict:
    """The single object of a "stream": false request: the whole text and the final metrics."""
    final = _final(reply, text, done.stats["finish_reason"], done)
    if reply.logprobs:
        final["logprobs"] = _logprobs(logprobs)
    return final


async def ndjson(reply: Reply, job: Job) -> AsyncIterator[str]:
    """One JSON object per line: a chunk per text piece, then the final object with done: true."""
    async for event in job.stream():
        if isinstance(event, Piece):
            chunk = _chunk(reply, event.text)
            if reply.logprobs:
                chunk["logprobs"] = _logprobs(event.logprobs)
            yield _line(chunk)
        elif isinstance(event, Done):
            final = _final(reply, "", event.stats["finish_reason"], event)
            if reply.logprobs:
                final["logprobs"] = _logprobs(event.logprobs)
            yield _line(final)
        elif isinstance(event, Failed):
            yield _line({"error": event.message})


def _chunk(reply: Reply, text: str) -> dict:
    chunk = {"model": reply.model, "created_at": now()}
    if reply.kind == "chat":
        chunk["message"] = {"role": "assistant", "content": text}
    else:
        chunk["response"] = text
    chunk["done"] = False
    return chunk


def _final(reply: Reply, text: str, reason: str, done: Done | None = None) -> dict:
    """The last object: done_reason and Ollama's counts and durations (nanoseconds).

    prompt_eval_duration is the prefill, which also draws the first new token; eval_duration the rest."""
    final = _chunk(reply, text)
    final.update(done=True, done_reason=reason)
    if done is None:
        return final
    s = done.stats
    if reply.kind == "generate" and reply.context is not None:
        final["context"] = reply.context + done.tokens
    final.update(total_duration=int((time.perf_counter() - reply.started) * 1e9), load_duration=0,
                 prompt_eval_count=s["prompt_tokens"], prompt_eval_duration=int(s["prefill_seconds"] * 1e9),
                 eval_count=s["new_tokens"], eval_duration=int(s["decode_seconds"] * 1e9))
    return final


def _logprobs(logprobs: list[TokenLogprob]) -> list[dict]:
    return [{"token": lp.text, "logprob": lp.logprob, "bytes": lp.bytes,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, b, v in lp.top]} for lp in logprobs]


def _line(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------ the rest of the API
def tags(engine: Engine) -> dict:
    """/api/tags: the one model, described as Ollama describes its models."""
    import hashlib

    model, cfg = engine.model, engine.model.config
    total, _ = model.parameter_counts()
    name = f"{engine.name}:latest"
    modified = datetime.fromtimestamp(engine.created, timezone.utc).isoformat().replace("+00:00", "Z")
    details = {"parent_model": "", "format": "safetensors", "family": "phimoe" if cfg.is_moe else "phi3",
               "families": ["phimoe" if cfg.is_moe else "phi3"], "parameter_size": _size(total),
               "quantization_level": DTYPE_NAMES.get(str(model.weights.dtype), str(model.weights.dtype))}
    return {"models": [{"name": name, "model": name, "modified_at": modified, "size": int(model.weights.nbytes),
                        "digest": hashlib.sha256(engine.name.encode()).hexdigest(), "details": details}]}


def _size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """Ollama's error object: {"error": "message"}."""
    return {"error": message}
