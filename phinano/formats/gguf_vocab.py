"""GGUF tokenizer metadata -> the parts of a phinano Tokenizer, rebuilt with the `tokenizers` library.

A GGUF file (llama.cpp, Ollama) has no tokenizer.json. llama.cpp's converter stores the vocabulary as metadata:

    tokenizer.ggml.model        "llama": SentencePiece BPE with byte fallback (Phi-3, 3.5, medium, MoE)
                                "gpt2":  byte-level BPE (Phi-4-mini)
    tokenizer.ggml.pre          how "gpt2" text is split before BPE ("gpt-4o" for Phi-4-mini)
    tokenizer.ggml.tokens       V pieces, the id is the position: "▁Hello", "<0x0A>", "<|end|>", "[PAD32011]"
    tokenizer.ggml.scores       V floats ("llama"): the piece's merge priority, higher first
    tokenizer.ggml.token_type   V ints: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       ("gpt2") "left right" pairs, best first
    tokenizer.ggml.{bos,eos,unknown,padding,eot,eom}_token_id, add_bos_token, add_eos_token, add_space_prefix
    tokenizer.chat_template     the Jinja chat template (named extra ones: tokenizer.chat_template.<name>)

`tokenizer_parts(metadata)` turns them back into the pipeline the model's tokenizer.json describes, so that
`phinano.tokenizer.Tokenizer(*parts[:4])` encodes, decodes and renders chat templates like the Hugging Face
tokenizer of the same model. What the file does not say is restored by rule (docs/gguf-tokenizer.md has more):

- **Merges of a "llama" vocabulary** come from the scores, as Transformers' SentencePiece converters derive them:
  each normal piece that splits into two normal pieces is a merge; better score first.
- **rstrip.** In the released Phi tokenizers the chat markers swallow whitespace after them ("<|user|>\\nHi" is
  `<|user|>`, `▁Hi`). GGUF has no place for that flag; it is restored by family (RSTRIP_* below).
- **BOS** follows `add_bos_token`, as in llama.cpp. The converter writes false for Phi-3 (from
  tokenizer_config.json), so `encode("Hi")` has no `<s>`, where tokenizer.json's post-processor adds one. Chat
  templates write `<s>` themselves, so chat prompts are the same ids either way.
- **Stop ids**: eos, eot and eom from the file, plus the Phi end-of-turn markers the released
  generation_config.json files stop on (STOP_MARKERS below).
"""

from __future__ import annotations

import re
from numbers import Integral, Real
from typing import NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import PhinanoError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type, gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ADDED_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)  # whole tokens matched in the text before BPE

SPACE = "\u2581"  # ▁, SentencePiece's visible space
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # a byte-fallback piece: "<0x0A>" is the byte 0x0A

# Named special tokens (template variables bos_token, ...) and the GGUF key holding each one's id.
NAMED_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
STOP_ID_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# Byte-level BPE: the regex that cuts text into words before BPE, by tokenizer.ggml.pre (as in the tokenizer.json
# of the model llama.cpp's converter recognised; the names are llama.cpp's).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
GPT4O_SPLIT = (  # o200k: Phi-4-mini
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {"gpt-2": GPT2_SPLIT, "gpt2": GPT2_SPLIT, "gpt-4o": GPT4O_SPLIT}

# rstrip, by family. Phi-3 ("llama" vocabulary, architecture phi3 or phimoe): every added token except these three,
# which is also llama.cpp's rule for files whose general.name contains "phi3" or "phi-3". Phi-4-mini ("gpt2"
# vocabulary, architecture phi3): the role and tool markers 200019-200024.
PHI3_ARCHITECTURES = ("phi3", "phimoe")
RSTRIP_PHI3_EXCEPT = frozenset({"<unk>", "<s>", "<|endoftext|>"})
RSTRIP_PHI4_MINI = frozenset({"<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>"})

# End-of-turn markers generation stops on, by vocabulary kind, as in the released generation_config.json files:
# Phi-3/3.5/MoE [32000, 32001, 32007], Phi-4-mini [200020, 199999].
STOP_MARKERS = {"llama": ("<|endoftext|>", "<|end|>", "<|assistant|>"), "gpt2": ("<|endoftext|>", "<|end|>")}


class TokenizerParts(NamedTuple):
    backend: Tokenizer  # the `tokenizers` pipeline
    special_tokens: dict  # {"bos_token": "<s>", "eos_token": "<|endoftext|>", ...}
    chat_templates: dict  # {"default": "...", <name>: "..."}; may be empty
    byte_fallback: bool  # True when the vocabulary has <0x00>..<0xFF> pieces
    stop_ids: tuple  # ids generation stops on, ascending


def tokenizer_parts(metadata: dict) -> TokenizerParts:
    """Build the tokenizer a GGUF file describes. `metadata` maps GGUF keys to plain values (str, int, float, bool,
    lists). Raises PhinanoError naming the key when the vocabulary is missing, malformed or of an unknown kind."""
    kind = _string(metadata, "tokenizer.ggml.model")
    if kind not in STOP_MARKERS:
        raise PhinanoError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (phinano reads llama and gpt2)")
    tokens = _list(metadata, "tokenizer.ggml.tokens", str, "strings")
    types = _list(metadata, "tokenizer.ggml.token_type", Integral, "integers", length=len(tokens))
    for i, token_type in enumerate(types):
        if not NORMAL <= token_type <= BYTE:
            raise PhinanoError(f"GGUF tokenizer.ggml.token_type[{i}] is {token_type}; expected 1..6")
    named = {name: _token_id(metadata, key, len(tokens)) for name, key in NAMED_TOKEN_KEYS.items()}
    named = {name: i for name, i in named.items() if i is not None}

    # The vocabulary: every piece but the unused ones ("[PAD32011]": embedding rows no text maps to).
    vocab = {}
    for i, token in enumerate(tokens):
        if types[i] != UNUSED or i in named.values():
            if token in vocab:
                raise PhinanoError(f"GGUF tokenizer.ggml.tokens has {token!r} twice (ids {vocab[token]} and {i})")
            vocab[token] = i

    if kind == "llama":
        backend, byte_fallback = _sentencepiece_bpe(metadata, tokens, types, vocab, named)
    else:
        backend, byte_fallback = _byte_level_bpe(metadata, vocab), False
    _add_whole_tokens(backend, metadata, kind, tokens, types, set(named.values()))
    backend.post_processor = _bos_eos(metadata, kind, tokens, named)

    stop = {_token_id(metadata, key, len(tokens)) for key in STOP_ID_KEYS} - {None}
    stop |= {vocab[marker] for marker in STOP_MARKERS[kind] if marker in vocab}
    return TokenizerParts(
        backend=backend,
        special_tokens={name: tokens[i] for name, i in named.items()},
        chat_templates=_chat_templates(metadata),
        byte_fallback=byte_fallback,
        stop_ids=tuple(sorted(stop)),
    )


# ---------------------------------------------------------------------------------------------------------------
# "llama": SentencePiece BPE with byte fallback (Phi-3, Phi-3.5, Phi-3-medium, Phi-3.5-MoE)
# ---------------------------------------------------------------------------------------------------------------


def _sentencepiece_bpe(metadata, tokens, types, vocab, named) -> tuple[Tokenizer, bool]:
    """The Llama-2 pipeline: prepend ▁ and turn spaces into ▁, BPE with byte fallback, then back."""
    scores = _list(metadata, "tokenizer.ggml.scores", Real, "numbers", length=len(tokens))
    for i, token_type in enumerate(types):
        if token_type == BYTE and not BYTE_PIECE.match(tokens[i]):
            raise PhinanoError(f"GGUF token {i} {tokens[i]!r} has type byte but is not spelled <0xNN>")
    byte_fallback = BYTE in types
    unk = tokens[named["unk_token"]] if "unk_token" in named else None
    merges = _merges_from_scores(tokens, types, scores)
    backend = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback))

    prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default for SentencePiece
    # Each piece of text between added tokens: "Hi  you" -> "▁Hi▁▁you" (with the prefix), then BPE.
    prepend = [normalizers.Prepend(SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence(prepend + [normalizers.Replace(" ", SPACE)])
    # Back: ▁ -> space, runs of <0xNN> pieces -> UTF-8 text, join, and drop the one space the prefix added.
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()] + strip
    )
    return backend, byte_fallback


def _merges_from_scores(tokens, types, scores) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps scores, not merges: joining two pieces into a piece is worth that piece's score.
    Every normal piece that splits into two normal pieces gives a merge; best score first, then longer left part,
    then longer right part (Transformers' generate_merges, which llama.cpp's tokenizations agree with)."""
    normal = {token: i for i, token in enumerate(tokens) if types[i] == NORMAL}
    merges = []  # (score, left, right): pieces in id order, each piece's splits by (left id, right id)
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = sorted((normal[a], normal[b], a, b) for a, b in splits if a in normal and b in normal)
        merges += [(scores[i], left, right) for _, _, left, right in splits]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: equal keys keep that order
    return [(left, right) for _, left, right in merges]


# ---------------------------------------------------------------------------------------------------------------
# "gpt2": byte-level BPE (Phi-4-mini)
# ---------------------------------------------------------------------------------------------------------------


def _byte_level_bpe(metadata, vocab) -> Tokenizer:
    """Cut text into words with the model's regex, spell each byte as a printable character ("Ġ" is a space),
    then apply the merges in the file's order."""
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZER_SPLITS:
        known = ", ".join(sorted(PRE_TOKENIZER_SPLITS))
        raise PhinanoError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported for byte-level BPE (known: {known})")
    merges = []
    for n, merge in enumerate(_list(metadata, "tokenizer.ggml.merges", str, "strings")):
        left, _, right = merge.partition(" ")
        if " " in right or not all(piece in vocab for piece in (left, right, left + right)):
            raise PhinanoError(f"GGUF tokenizer.ggml.merges[{n}] {merge!r} is not two tokens that join into a token")
        merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


# ---------------------------------------------------------------------------------------------------------------
# Added tokens, BOS/EOS, chat templates
# ---------------------------------------------------------------------------------------------------------------


def _add_whole_tokens(backend, metadata, kind, tokens, types, named_ids) -> None:
    """Control and unknown tokens (and named ones) become special added tokens, user-defined ones plain added
    tokens: both are matched whole in the text before BPE, as llama.cpp does with special tokens parsed."""
    ids = [i for i, token_type in enumerate(types) if token_type in ADDED_TYPES or i in named_ids]
    rstrip = _rstrip_tokens(metadata, kind, {tokens[i] for i in ids})
    special, plain = [], []
    for i in ids:
        is_special = types[i] != USER_DEFINED or i in named_ids
        token = AddedToken(tokens[i], rstrip=tokens[i] in rstrip, normalized=False, special=is_special)
        (special if is_special else plain).append(token)
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


def _rstrip_tokens(metadata, kind, added: set) -> set:
    """The added tokens that swallow the whitespace after them (tokenizer.json's rstrip flag), by family."""
    architecture = metadata.get("general.architecture")
    name = str(metadata.get("general.name") or "").lower()
    if kind == "llama" and (architecture in PHI3_ARCHITECTURES or "phi3" in name or "phi-3" in name):
        return added - RSTRIP_PHI3_EXCEPT
    if kind == "gpt2" and architecture == "phi3":
        return added & RSTRIP_PHI4_MINI
    return set()


def _bos_eos(metadata, kind, tokens, named) -> processors.TemplateProcessing:
    """Prepend BOS / append EOS when the file says so (add_bos_token defaults to true for SentencePiece, as in
    llama.cpp and Transformers; add_eos_token to false)."""
    ends = {}  # "bos_token" / "eos_token" -> its id, for the ones to add
    for name, default in (("bos_token", kind == "llama"), ("eos_token", False)):
        flag = f"tokenizer.ggml.add_{name}"
        if _flag(metadata, flag, default):
            if name not in named:
                raise PhinanoError(f"GGUF {flag} is true but {NAMED_TOKEN_KEYS[name]} is not set")
            ends[name] = named[name]
    first = [tokens[ends["bos_token"]]] if "bos_token" in ends else []
    last = [tokens[ends["eos_token"]]] if "eos_token" in ends else []

    def sequence(name, type_id):  # e.g. ["<s>:0", "$A:0"]
        return [f"{t}:{type_id}" for t in first] + [f"${name}:{type_id}"] + [f"{t}:{type_id}" for t in last]

    return processors.TemplateProcessing(
        single=sequence("A", 0),
        pair=sequence("A", 0) + sequence("B", 1),
        special_tokens=[(tokens[i], i) for i in ends.values()],
    )


def _chat_templates(metadata) -> dict:
    """{"default": tokenizer.chat_template, name: tokenizer.chat_template.<name> for each name listed in
    tokenizer.chat_templates}."""
    templates = {}
    if metadata.get("tokenizer.chat_template") is not None:
        templates["default"] = _string(metadata, "tokenizer.chat_template")
    for name in _list(metadata, "tokenizer.chat_templates", str, "strings", required=False):
        templates[name] = _string(metadata, f"tokenizer.chat_template.{name}")
    return templates


# ---------------------------------------------------------------------------------------------------------------
# Reading metadata values: one clear error naming the key
# ---------------------------------------------------------------------------------------------------------------


def _string(metadata, key) -> str:
    value = metadata.get(key)
    if not isinstance(value, str):
        raise PhinanoError(f"GGUF {key} is missing" if value is None else f"GGUF {key} should be a string")
    return value


def _flag(metadata, key, default: bool) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool):
        raise PhinanoError(f"GGUF {key} should be true or false, not {value!r}")
    return value


def _token_id(metadata, key, n) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < n:
        raise PhinanoError(f"GGUF {key} is {value!r}, not a token id (the vocabulary has ids 0..{n - 1})")
    return int(value)


def _list(metadata, key, item_type, what, length=None, required=True) -> list:
    value = metadata.get(key)
    if value is None and not required:
        return []
    if value is None:
        raise PhinanoError(f"GGUF {key} is missing")
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise PhinanoError(f"GGUF {key} should be a list of {what}")
    value = list(value)
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, item_type):
            raise PhinanoError(f"GGUF {key}[{i}] is {item!r}; expected a list of {what}")
    if length is not None and len(value) != length:
        raise PhinanoError(f"GGUF {key} has {len(value)} entries but tokenizer.ggml.tokens has {length}")
    if required and not value:
        raise PhinanoError(f"GGUF {key} is empty")
    return value
