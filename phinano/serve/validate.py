"""The one request validator of both APIs: a decoded body becomes checked values, or an ApiError naming the
field (`messages[0].content`, `options.top_p`). Sampling goes through phinano.sampling, the CLI's rule set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import PhinanoError
from ..sampling import OptionError, resolve_options
from .engine import Engine

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-plain"}


class ApiError(Exception):
    """A request the server refuses: becomes a JSON error in the shape of the API it came in by."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Body(BaseModel):
    # strict: "1" is not a number and 1.0 is not an integer (OpenAI rejects both); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(Body):
    type: str
    text: str | None = None
    image_url: dict | None = None  # {"url": "data:image/png;base64,..."} (Phi-3-vision)


class Message(Body):
    """A chat message of either API: content a string or (OpenAI) text parts; (Ollama) images."""

    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list | None = None
    images: list | None = None


@dataclass
class Reply:
    """What a response needs besides the generated text; each API fills in what it uses."""

    kind: str  # "chat" or "completion" (OpenAI); "chat" or "generate" (Ollama)
    model: str  # as the request named it
    stream: bool
    logprobs: bool
    id: str = ""  # OpenAI: chatcmpl-..., cmpl-...
    include_usage: bool = False  # OpenAI: a last chunk with the usage
    unload: bool = False  # Ollama: keep_alive 0 with nothing to generate is answered done_reason "unload"
    context: list[int] | None = None  # Ollama /api/generate: the prompt ids, returned with the answer's
    reasoning: bool = True  # show a `<think> ... </think>` section apart (phinano.reasoning); Ollama: think false
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)  # once the body is read: Ollama's total_duration


def parse_body(schema: type[Body], body: object, engine: Engine, refused: dict):
    """Decoded JSON validated against a schema (the first problem: a 400 naming the field), naming the served
    model, setting none of the `refused` parameters."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = schema.model_validate(body)
    except ValidationError as error:
        problem = error.errors()[0]
        path = ""
        for part in problem["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part.isidentifier() and part not in _TYPE_TAGS:  # skip pydantic's union-member tags
                path += f".{part}" if path else part
        if problem["type"] == "missing":
            raise missing(path) from None
        what = problem["msg"][0].lower() + problem["msg"][1:]
        raise ApiError(400, f"Invalid value for '{path}': {what}.", param=path or None, code="invalid_value") from None
    check_model(engine, req.model)
    refuse(body, refused)
    return req


def missing(param: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def chat_ids(engine: Engine, messages: list[Message], roles: set[str], content_required: bool,
             images: list | None = None) -> list[int]:
    """Messages -> prompt ids through the model's chat template ("developer" is a system message). With
    content_required, only an assistant message carrying tool_calls may go without content (OpenAI's rule).

    A Phi-3-vision model also takes images: OpenAI `image_url` parts (data: URLs) and Ollama `images` (base64).
    Each becomes `<|image_N|>\n` in the text (Ollama's before the message's text), is opened into `images`, and
    its marker is expanded to the image's positions in the ids returned."""
    vision = engine.model.weights.vision
    images = [] if images is None else images
    rendered = []
    for i, m in enumerate(messages):
        if m.role not in roles:
            raise ApiError(400, f"Invalid value for 'messages[{i}].role': '{m.role}'. Supported values are: "
                                f"{', '.join(sorted(roles))}.", param=f"messages[{i}].role", code="invalid_value")
        if m.content is None and content_required and not (m.role == "assistant" and m.tool_calls):
            raise missing(f"messages[{i}].content")
        parts = [] if m.content is None or isinstance(m.content, str) else m.content
        pictures = m.images or [] if vision is not None else []
        parts_ok = ("text", "image_url") if vision is not None else ("text",)
        if (m.images and vision is None) or any(p.type not in parts_ok or (p.type == "text" and p.text is None)
                                                for p in parts):
            raise ApiError(400, f"phinano reads text only; messages[{i}] holds an image or other non-text part.",
                           param=f"messages[{i}].content", code="unsupported_content")
        text = "".join(image_marker(images, decode_base64(data, where), where)
                       for where, data in ((f"messages[{i}].images[{j}]", d) for j, d in enumerate(pictures)))
        if isinstance(m.content, str):
            text += m.content
        for j, p in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            text += p.text if p.type == "text" else image_marker(images, _data_url(p.image_url, where), where)
        rendered.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    try:
        if not images:
            return engine.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
        from ..vision.prompt import expand

        text = engine.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
        return expand(engine.tokenizer.encode_prompt(text), [vision.positions(img) for img in images])
    except PhinanoError as error:
        raise ApiError(400, str(error), param="messages") from None


def image_marker(images: list, data: bytes, where: str) -> str:
    """Open an image sent in a request (a 400 naming `where` if it is not one), keep it, return its marker."""
    from ..vision.preprocess import open_image

    try:
        images.append(open_image(data, "image data"))
    except PhinanoError as error:
        raise ApiError(400, f"Invalid image in '{where}': {error}.", param=where, code="invalid_image") from None
    return f"<|image_{len(images)}|>\n"


def decode_base64(data, where: str) -> bytes:
    import base64
    import binascii

    if not isinstance(data, str):
        raise ApiError(400, f"Invalid image in '{where}': expected a base64 string.", param=where, code="invalid_image")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"Invalid image in '{where}': not valid base64.", param=where,
                       code="invalid_image") from None


def _data_url(image_url: dict | None, where: str) -> bytes:
    """OpenAI's image_url part: only data: URLs (phinano fetches nothing from the network)."""
    url = (image_url or {}).get("url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, f"Invalid image in '{where}': phinano takes images as data: URLs "
                            "(data:image/png;base64,...).", param=where, code="invalid_image")
    return decode_base64(url.split(";base64,", 1)[1], where)


def token_ids(engine: Engine, ids: list[int], param: str) -> list[int]:
    """Token ids sent by the client, each checked to be in the vocabulary."""
    vocab = engine.model.config.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise ApiError(400, f"Invalid token id in '{param}': ids run from 0 to {vocab - 1}.", param=param)
    return list(ids)


def check_model(engine: Engine, model: str) -> None:
    """The request must name the served model: "name", or Ollama's "name:latest"."""
    if model not in (engine.name, f"{engine.name}:latest"):
        raise ApiError(404, f"The model `{model}` does not exist. This server serves `{engine.name}`.",
                       param="model", code="model_not_found")


def refuse(given: dict, neutral: dict, prefix: str = "") -> None:
    """A 400 for the first unimplemented parameter that `given` sets to other than null or its neutral value."""
    for name, value in neutral.items():
        if given.get(name) not in (None, value):
            raise ApiError(400, f"phinano does not support '{prefix}{name}' other than {json.dumps(value)}.",
                           param=prefix + name, code="unsupported_parameter")


def logprobs_wanted(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """None (no logprobs) or how many alternatives each token's entry lists."""
    if top_logprobs is not None and not logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def stop_strings(stop: str | list[str] | None, most: int | None = None) -> list[str]:
    """A stop string or a list of them (at most `most`); empty strings are dropped (they would match at once)."""
    stops = [stop] if isinstance(stop, str) else stop or []
    if most is not None and len(stops) > most:
        raise ApiError(400, f"Invalid 'stop': array too long. Expected an array with maximum length {most}.",
                       param="stop", code="array_above_max_length")
    return [s for s in stops if s]


def budget(ids: list[int], context: int, asked: int | None, param: str, clip: bool) -> int:
    """New tokens allowed: `asked` (None: up to the context's end) if prompt + asked fit the context, else
    the rest of the context (clip: Ollama's way) or a 400 (OpenAI's). A prompt that fills it is a 400."""
    if len(ids) >= context or (asked is not None and not clip and len(ids) + asked > context):
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{len(ids) + (asked or 0)} tokens ({len(ids)} in the prompt, {asked or 0} for the "
                            f"completion). Please reduce the length of the prompt or the completion.",
                       param=param, code="context_length_exceeded")
    return context - len(ids) if asked is None else min(asked, context - len(ids))


def sampling(given: dict, defaults: dict, names: dict[str, str]) -> dict:
    """resolve_options(given, defaults), or a 400 naming the option as the API does (`names`: where they differ)."""
    try:
        return resolve_options(given, defaults)
    except OptionError as error:
        param = names.get(error.param, error.param)
        raise ApiError(400, str(error).replace(error.param, param, 1), param=param, code="invalid_value") from None
