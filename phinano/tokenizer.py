"""Text ↔ token ids for Phi-3: encode, decode, chat templates and streaming decode.

The heavy lifting (BPE merges, added-token matching) is done by the Hugging Face `tokenizers` library from the
model's own `tokenizer.json`; this module adds what Transformers adds on top of it, so that phinano produces
exactly the ids and text that `transformers.AutoTokenizer` (5.23) does for the same folder.

The parts, in reading order:

- `load_tokenizer(folder)` reads `tokenizer.json`, then `tokenizer_config.json` (named special tokens, chat
  template) and the template files Transformers 5 may write beside it (`chat_template.jinja`,
  `additional_chat_templates/*.jinja`).
- `Tokenizer.encode` / `decode` call the `tokenizers` backend, configured the way Transformers configures it.
- `Tokenizer.apply_chat_template` renders the Jinja chat template in the same sandbox, with the same globals and
  variables as Transformers, then encodes the string without adding special tokens (the template writes `<s>`).
- `StreamDecoder` (from `Tokenizer.stream()`) turns ids into text one id at a time, losslessly.

How Transformers 5.23 treats this tokenizer (mirrored here, found by reading its source and checked in tests):

- **BOS comes from tokenizer.json, not from `add_bos_token`.** When a `tokenizer.json` exists, Transformers drops
  `add_bos_token` / `add_eos_token` from `tokenizer_config.json` and keeps the file's post-processor. The Phi-3
  file's `TemplateProcessing` prepends `<s>`, so `encode("Hello")` gives `[1, 15043]` even though the config says
  `add_bos_token: false`. (Naming `"tokenizer_class": "LlamaTokenizer"` in the config makes Transformers rebuild a
  different pipeline instead; phinano follows the file, as `AutoTokenizer` does for the shared Phi-3 folder.)
- **Named special tokens become special.** Every token named in the config (`bos_token`, `eos_token`, ...) is
  marked special in the backend, so `decode(..., skip_special_tokens=True)` drops it, and is added to the
  vocabulary if it is missing. Its strip flags in `tokenizer.json` are kept.
- **Truncation and padding stored in tokenizer.json are switched off**, as Transformers does for a plain call.
- `clean_up_tokenization_spaces` is ignored: Transformers 5 skips it for BPE models, and every Phi model is BPE.

Phi-3 peculiarities (Llama-2 SentencePiece BPE, 32000 pieces, plus added tokens 32000–32010):

- **Dummy prefix `▁`.** The normalizer prepends `▁` (U+2581) and turns every space into `▁`. Added tokens such as
  `<|user|>` split the text into segments and *each segment* gets the prefix, so text right after an added token
  starts with `▁`: `"<|end|>\\n"` is `32007, 29871 (▁), 13 (\\n)` when `<|end|>` does not strip.
- **`rstrip` flags.** In the released Phi-3 tokenizer the chat markers 32001–32010 have `rstrip: true`: whitespace
  after them is swallowed at encode time, so `"<|user|>\\nHello"` is `32010, 15043 (▁Hello)`, while a tokenizer
  without the flag gives `32010, 29871, 13, 10994 (Hello)`. The flags differ between Hub revisions: always use
  the `tokenizer.json` shipped with the weights.
- **Byte fallback.** Characters missing from the vocabulary become one token per UTF-8 byte, `<0x00>`..`<0xFF>`
  (ids 3..258). The decoder joins a run of byte tokens and decodes it as UTF-8 as a whole: if the run is not valid
  UTF-8, *every* byte of the run becomes U+FFFD, including bytes that formed valid characters.
- **Decoding.** `▁` → space, byte runs → text, then exactly one leading space of the whole text is stripped. So
  decoding a suffix of the ids on its own loses the space of its first piece, and the `▁` after an added token
  shows up as a space: `decode([32010, 29871, 13])` is `"<|user|> \\n"` (Transformers issue #30590).

Streaming (`StreamDecoder`) uses the prefix/read-offset technique of text-generation-inference and vLLM: decode a
short window that starts with a few tokens already emitted ("context") and emit the part of the text beyond what
the context alone decodes to. The context absorbs the leading-space strip, so no space is lost. Two rules on top
make the concatenation of all pieces equal `decode(all ids)` exactly for any ids: a run of byte tokens is held
until a non-byte token ends it (the run can still turn invalid, see above), and with `skip_special_tokens=True`
special ids are dropped on arrival (decode drops them anyway, so this changes nothing and keeps the window short).
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from phinano.errors import PhinanoError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # Transformers 5 saves the default template here
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # ... and named extra templates here, one <name>.jinja each

# The named special tokens Transformers reads from tokenizer_config.json, in its order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# A SentencePiece byte-fallback piece: "<0x0A>" is the byte 0x0A.
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_tokenizer(folder) -> "Tokenizer":
    """Read the tokenizer in `folder` (tokenizer.json, and tokenizer_config.json / chat_template.jinja if present)."""
    folder = Path(folder)
    tokenizer_path = folder / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise PhinanoError(f"no tokenizer: {tokenizer_path} does not exist")
    text = tokenizer_path.read_text(encoding="utf-8")
    try:
        backend = BackendTokenizer.from_str(text)
    except Exception as error:  # the Rust side raises a plain Exception for malformed files
        raise PhinanoError(f"cannot read {tokenizer_path}: {error}") from error
    spec = json.loads(text)

    config = _read_config(folder / CONFIG_FILE)

    # Named special tokens as plain strings: {"bos_token": "<s>", "eos_token": "<|endoftext|>", ...}.
    special_tokens = {}
    for name in NAMED_SPECIAL_TOKENS:
        token = config.get(name)
        if token is not None:
            special_tokens[name] = _token_content(token, name, folder / CONFIG_FILE)
    _mark_special(backend, [config[name] for name in NAMED_SPECIAL_TOKENS if config.get(name) is not None])

    # Transformers encodes with truncation and padding off unless asked; tokenizer.json may have them on.
    backend.no_truncation()
    backend.no_padding()

    return Tokenizer(
        backend,
        special_tokens=special_tokens,
        chat_templates=_read_chat_templates(folder, config),
        byte_fallback="ByteFallback" in json.dumps(spec.get("decoder")),
    )


def _read_config(path: Path) -> dict:
    """tokenizer_config.json as a dict, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PhinanoError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise PhinanoError(f"{path} should hold a JSON object")
    return config


def _token_content(token, name: str, path: Path) -> str:
    """A named special token's text: the string itself, or an AddedToken-style object's "content"."""
    content = token.get("content") if isinstance(token, dict) else token
    if not isinstance(content, str):
        raise PhinanoError(f"{path}: {name} should be a string or an object with a \"content\" string, got {token!r}")
    return content


def _mark_special(backend: BackendTokenizer, tokens: list) -> None:
    """Make each named special token (a string or an AddedToken-style dict) a special added token, as Transformers
    does: an existing added token only gets `special=True` (its strip flags stay), anything else is added."""
    existing = {token.content: token for token in backend.get_added_tokens_decoder().values()}
    for token in tokens:
        content = token["content"] if isinstance(token, dict) else str(token)
        if content in existing:
            added = existing[content]
            if added.special:
                continue
            added.special = True
        elif isinstance(token, dict):
            flags = {key: token[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in token}
            added = AddedToken(content, **{"normalized": False, **flags}, special=True)
        else:
            added = AddedToken(content, normalized=False, special=True)
        backend.add_special_tokens([added])


def _read_chat_templates(folder: Path, config: dict) -> dict:
    """All chat templates by name ("default" for the main one). chat_template.jinja beats the config's entry."""
    templates = {}
    entry = config.get("chat_template")
    if isinstance(entry, str):
        templates["default"] = entry
    elif isinstance(entry, list):  # older multi-template form: [{"name": ..., "template": ...}, ...]
        templates.update((item.get("name"), item.get("template")) if isinstance(item, dict) else (None, None)
                         for item in entry)
    elif isinstance(entry, dict):
        templates.update(entry)
    named = all(isinstance(name, str) and isinstance(text, str) for name, text in templates.items())
    if not (entry is None or isinstance(entry, (str, list, dict)) and named):
        raise PhinanoError(f"{folder / CONFIG_FILE}: chat_template should be a string, a list of "
                           f"{{\"name\", \"template\"}} objects or an object of named templates")

    jinja_file = folder / CHAT_TEMPLATE_FILE
    extra_files = sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    if jinja_file.is_file() or extra_files:
        templates = {}  # separate template files take priority over every template in the config
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        for path in extra_files:
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    return templates


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode, decode and chat-format text for one model. Build it with `load_tokenizer(folder)`."""

    def __init__(self, backend: BackendTokenizer, special_tokens: dict, chat_templates: dict, byte_fallback: bool):
        self.backend = backend  # the `tokenizers` object that does BPE and decoding
        self.special_tokens = special_tokens  # {"bos_token": "<s>", ...}: named tokens, also template variables
        self.chat_templates = chat_templates  # {"default": "{{ bos_token }}...", ...}; may be empty
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = {i for i, token in added.items() if token.special}
        # Ids of byte-fallback pieces <0x00>..<0xFF> (3..258 for Phi-3); empty unless the decoder does byte fallback.
        self.byte_ids = set()
        if byte_fallback:
            self.byte_ids = {i for piece, i in backend.get_vocab().items() if BYTE_PIECE.match(piece)}

    # --- vocabulary --------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (32011 for Phi-3; the model's embedding may have more rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The config's eos token (32000 for Phi-3). Generation stops on a list; see generation_config.json."""
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece (e.g. "▁Hello" or "<|end|>"), or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The piece of an id (e.g. 15043 → "▁Hello", 13 → "<0x0A>"), or None if the id is out of range."""
        return self.backend.id_to_token(token_id)

    # --- encode / decode ---------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text → ids. add_special_tokens applies tokenizer.json's post-processor (Phi-3: prepend <s>)."""
        if not isinstance(text, str):
            raise PhinanoError(f"encode expects a str, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the Rust side refuses a str it cannot turn into UTF-8 ("must be str")
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) < 0xE000), None)
            if bad is None:
                raise
            raise PhinanoError(f"text is not valid Unicode: a lone surrogate U+{ord(text[bad]):04X} at character "
                               f"{bad}") from None

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt that may hold image markers `<|image_1|>`, `<|image_2|>` ... -> ids with one -N per marker,
        as Phi-3-vision's released processor tokenizes it: each piece of text between markers is encoded on its
        own, with <s> and the leading-space prefix (phinano/vision/prompt.py). Model.generate(..., images=)
        expands each -N to the image's positions."""
        from .vision.prompt import split

        ids: list[int] = []
        for part in split(text):
            ids.extend([-part] if isinstance(part, int) else self.encode(part))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids → text. Unknown ids are ignored, as in Transformers."""
        ids = [int(i) for i in ids]
        try:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except OverflowError:  # the Rust side takes u32 ids
            raise PhinanoError(f"token ids must be integers from 0 to 2^32 - 1, got {min(ids)}..{max(ids)}") from None

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A decoder that takes ids one at a time and returns the new text each time (see StreamDecoder)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # --- chat template -----------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = True, tokenize: bool = True, chat_template=None, **extra
    ):
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        Returns the ids (encoded without adding special tokens: the template writes <s> itself) or, with
        tokenize=False, the string. `chat_template` may name one of several templates or be a template itself;
        `extra` becomes template variables (e.g. tools=[...]), overriding bos_token and friends.
        Unlike Transformers (default False), add_generation_prompt defaults to True: phinano renders prompts.
        """
        template = self._pick_template(chat_template, extra.get("tools"))
        if not all(isinstance(message, dict) for message in messages):
            raise PhinanoError("chat messages should be dicts like {'role': 'user', 'content': '...'}")
        # Transformers drops keys whose value is None (OpenAI-style content=None) before rendering.
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            text = _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as error:  # includes raise_exception("...") from the template itself
            raise PhinanoError(f"chat template failed: {error}") from error
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def turn_end_id(self) -> int | None:
        """The special token the chat template writes right after an assistant's message: the end of a turn
        (Phi-3 and Phi-4-mini `<|end|>`, Phi-4 `<|im_end|>`). None without a default template, or when what follows
        the message is not a special token. Generation stops there too (docs/pitfalls.md#stop-tokens)."""
        if "default" not in self.chat_templates:
            return None
        probe = "phinano-turn-end-probe"
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}]
        try:
            text = self.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        except Exception:  # a template that cannot render this conversation names no end of turn
            return None
        if probe not in text:
            return None
        after = self.encode(text[text.rindex(probe) + len(probe):].lstrip(), add_special_tokens=False)
        return after[0] if after and after[0] in self.special_ids else None

    def _pick_template(self, chat_template, tools) -> str:
        """The template source to render, chosen as Transformers' get_chat_template chooses it."""
        if chat_template is not None and chat_template in self.chat_templates:
            return self.chat_templates[chat_template]
        if chat_template is not None:
            return chat_template  # a template passed in by the caller
        if not self.chat_templates:
            raise PhinanoError("this tokenizer has no chat template (not in tokenizer_config.json or a .jinja file)")
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        names = ", ".join(sorted(self.chat_templates))
        raise PhinanoError(f"several chat templates and none is 'default'; pass chat_template= one of: {names}")


# ---------------------------------------------------------------------------------------------------------------
# Chat-template sandbox (the same environment Transformers builds in utils/chat_template_utils.py)
# ---------------------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it only renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '); templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise PhinanoError(f"chat template has a syntax error: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Streaming decode
# ---------------------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Ids in, printable text out, one id at a time (like ONNX GenAI's TokenizerStream.decode).

    ''.join(push(i) for i in ids) + flush() == tokenizer.decode(ids) exactly. Each push decodes only a short
    window: `ids[prefix:]`, where `ids[prefix:read]` were already emitted (the context) and `ids[read:]` are new.
    The text beyond decode(context) is emitted; then the new tokens become the next context.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = []  # the window: context tokens then pending tokens (older ids are dropped)
        self.prefix = 0  # ids[prefix:read] is the context, already emitted
        self.read = 0  # ids[read:] are pending: pushed, not yet emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now certain (often "", e.g. mid-way through a byte run)."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # decode would drop it anyway
        self.ids.append(token_id)
        if token_id in self.tokenizer.byte_ids:
            return ""  # a byte run is decoded as a whole, and later bytes can still make it invalid
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still pending (an unfinished byte run decodes to U+FFFD, as in decode) and reset."""
        text = self._emit(final=True)
        self.ids, self.prefix, self.read = [], 0, 0
        return text

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        context_text = decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        window_text = decode(self.ids[self.prefix :], self.skip_special_tokens)
        if len(window_text) <= len(context_text):
            return ""  # nothing new yet (e.g. an unknown id)
        if window_text.endswith("\ufffd") and not final:
            return ""  # looks like an unfinished character: wait for more ids
        text = window_text[len(context_text) :]
        # The pending tokens become the next context; everything before them is no longer needed.
        self.ids = self.ids[self.read :]
        self.prefix, self.read = 0, len(self.ids)
        return text
