"""GGUF tokenizer metadata <-> Hugging Face tokenizer files: reading a GGUF file's vocabulary back as a tokenizer
(`tokenizer_parts`), and writing a checkpoint folder's tokenizer as GGUF metadata (`vocab_metadata`).

A GGUF file (llama.cpp, Ollama) has no tokenizer.json. llama.cpp's converter stores the vocabulary as metadata:

    tokenizer.ggml.model        "llama": SentencePiece BPE with byte fallback (Phi-3, 3.5, medium, MoE)
                                "gpt2":  byte-level BPE (Phi-4, Phi-4-mini and their reasoning models)
    tokenizer.ggml.pre          how "gpt2" text is split before BPE ("dbrx" for Phi-4, "gpt-4o" for Phi-4-mini)
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

`vocab_metadata(folder, vocab_size)` goes the other way, for `phinano quantize`: the keys above as the converter
writes them from the folder's tokenizer.json and tokenizer_config.json (Phi3MiniModel.set_vocab for SentencePiece
vocabularies, _set_vocab_gpt2 for byte-level ones, then gguf.SpecialVocab for ids, flags and chat template).
"""

from __future__ import annotations

import json
import re
from numbers import Integral, Real
from pathlib import Path
from typing import NamedTuple

from gguf import TokenType  # tokenizer.ggml.token_type values: NORMAL 1 .. BYTE 6 (llama.cpp's llama_token_type)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import PhinanoError

ADDED_TYPES = (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED)  # whole tokens matched before BPE

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
# of the model llama.cpp's converter recognised; the names are llama.cpp's). llama.cpp spells the contractions
# out, '[sS]|'[tT]|..., where tokenizer.json has (?i:'s|'t|...); the two differ only on "'ſ" (long s, whose case
# folding is s), which phinano splits as the Hugging Face tokenizer does (docs/gguf-tokenizer.md#cl100k).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
GPT4O_SPLIT = (  # o200k: Phi-4-mini
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CL100K_SPLIT = (  # cl100k: Phi-4, Phi-4-reasoning(-plus); llama.cpp's "dbrx", named after the model it came with
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {"gpt-2": GPT2_SPLIT, "gpt-4o": GPT4O_SPLIT, "dbrx": CL100K_SPLIT}
PRE_TOKENIZER_NAMES = {split: name for name, split in PRE_TOKENIZER_SPLITS.items()}  # what vocab_metadata writes

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
        if not TokenType.NORMAL <= token_type <= TokenType.BYTE:
            raise PhinanoError(f"GGUF tokenizer.ggml.token_type[{i}] is {token_type}; expected 1..6")
    named = {name: _token_id(metadata, key, len(tokens)) for name, key in NAMED_TOKEN_KEYS.items()}
    named = {name: i for name, i in named.items() if i is not None}

    # The vocabulary: every piece but the unused ones ("[PAD32011]": embedding rows no text maps to).
    vocab = {}
    for i, token in enumerate(tokens):
        if types[i] != TokenType.UNUSED or i in named.values():
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
        if token_type == TokenType.BYTE and not BYTE_PIECE.match(tokens[i]):
            raise PhinanoError(f"GGUF token {i} {tokens[i]!r} has type byte but is not spelled <0xNN>")
    byte_fallback = TokenType.BYTE in types
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
    normal = {token: i for i, token in enumerate(tokens) if types[i] == TokenType.NORMAL}
    merges = []  # (score, left, right): pieces in id order, each piece's splits by (left id, right id)
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = sorted((normal[a], normal[b], a, b) for a, b in splits if a in normal and b in normal)
        merges += [(scores[i], left, right) for _, _, left, right in splits]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: equal keys keep that order
    return [(left, right) for _, left, right in merges]


# ---------------------------------------------------------------------------------------------------------------
# "gpt2": byte-level BPE (Phi-4, Phi-4-mini)
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
        is_special = types[i] != TokenType.USER_DEFINED or i in named_ids
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
# Writing: a Hugging Face tokenizer folder -> GGUF metadata, as llama.cpp's converter writes it
# ---------------------------------------------------------------------------------------------------------------

# Files that mean "this folder has a tokenizer" when tokenizer.json itself is missing.
OTHER_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")
# SentencePiece's own unknown and control pieces in the Llama-2 family's model (<unk> 0, <s> 1, </s> 2).
SENTENCEPIECE_UNKNOWN, SENTENCEPIECE_CONTROL = "<unk>", ("<s>", "</s>")
# Scores the converter gives pieces that are not SentencePiece's own (Phi3MiniModel.set_vocab).
ADDED_SCORE, UNUSED_SCORE, HAND_ADDED_SCORE = -1000.0, -10000.0, -1e9


def vocab_metadata(folder: Path, vocab_size: int) -> dict:
    """The tokenizer of a Hugging Face checkpoint folder as GGUF metadata ({GGUF key: plain value}), as llama.cpp's
    converter writes it, for a model of `vocab_size` embedding rows (ids past the tokenizer's are "[PADi]" unused
    entries). Reads tokenizer.json, tokenizer_config.json and chat_template.jinja (or additional_chat_templates/).

    Two kinds, told apart by tokenizer.json's pipeline: SentencePiece-style BPE with byte fallback (Phi-3, 3.5,
    MoE; "llama") and byte-level BPE (Phi-4, Phi-4-mini; "gpt2"). general.name and general.architecture are not
    included (the GGUF writer adds them). A folder with no tokenizer files at all gives {} (the file then has no
    tokenizer); a tokenizer phinano cannot write (tokenizer.json missing beside other tokenizer files, another
    kind of model or pipeline, a token id past the embedding) raises one PhinanoError naming the file."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        others = [name for name in OTHER_TOKENIZER_FILES if (folder / name).is_file()]
        if others:
            raise PhinanoError(f"{path} is missing (the folder has {', '.join(others)}); phinano writes a GGUF "
                               "vocabulary from tokenizer.json")
        return {}
    spec = _tokenizer_json(path)
    config_path = folder / "tokenizer_config.json"
    config = _json_object(config_path) if config_path.is_file() else {}

    model = spec["model"]
    if model["type"] != "BPE":
        raise PhinanoError(f"{path}: a {model['type']} model; phinano writes BPE vocabularies (SentencePiece-style "
                           "or byte-level) as GGUF")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise PhinanoError(f"{path}: BPE with word prefixes or suffixes cannot be written as GGUF")
    added = spec.get("added_tokens") or []  # [{"id": 32000, "content": "<|endoftext|>", "special": true, ...}]
    _check_ids([*model["vocab"].items(), *((token["content"], token["id"]) for token in added)], vocab_size, path)

    pre = _byte_level_pre(spec, path)
    if pre is not None:
        metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre}
        metadata.update(_byte_level_vocab(model, added, vocab_size))
    else:
        prefix = _space_prefix(spec, path)
        metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default"}
        metadata.update(_sentencepiece_vocab(model, added, vocab_size))
        if not prefix:  # absent means true for SentencePiece (llama.cpp's default); the converter writes only false
            metadata["tokenizer.ggml.add_space_prefix"] = False

    metadata.update(_special_ids(model, added, config, config_path))
    metadata.update(_add_flags(spec, config))
    metadata.update(_chat_template_keys(folder, config))
    return metadata


def _sentencepiece_vocab(model, added, vocab_size) -> dict:
    """tokens, scores and types as Phi3MiniModel.set_vocab writes them from SentencePiece's tokenizer.model, here
    recovered from tokenizer.json: a piece's score is minus the rank of the first merge that makes it (pieces no
    merge makes, the single characters, come after every merge); <unk> is unknown and <s> </s> control (score 0),
    <0xNN> pieces are bytes (score 0); then every added token of tokenizer.json becomes control (special) or
    user-defined (not special), score -1000; the ids up to the embedding size are "[PADi]", unused, -10000.

    The runs of ▁ ("▁▁", "▁▁▁▁", ...) score -1e9 when their merges come after all others: the Llama-2
    SentencePiece model (Phi-3's) adds them by hand with that score, which is why ("▁", "▁") is the very last
    merge of Phi-3's tokenizer.json. A BPE trained with runs of ▁ among its merges keeps their ranks."""
    merges = _merge_pairs(model["merges"])
    first_merge = {}  # piece -> rank of the first merge that makes it
    for rank, (left, right) in enumerate(merges):
        first_merge.setdefault(left + right, rank)
    runs = {piece for piece in first_merge if len(piece) > 1 and set(piece) == {SPACE}}
    last_other = max((rank for piece, rank in first_merge.items() if piece not in runs), default=-1)
    hand_added = runs if all(first_merge[piece] > last_other for piece in runs) else set()

    tokens, scores, types = _padded(vocab_size)
    for piece, i in model["vocab"].items():
        tokens[i] = piece
        if BYTE_PIECE.match(piece):
            types[i], scores[i] = TokenType.BYTE, 0.0
        elif piece == SENTENCEPIECE_UNKNOWN:
            types[i], scores[i] = TokenType.UNKNOWN, 0.0
        elif piece in SENTENCEPIECE_CONTROL:
            types[i], scores[i] = TokenType.CONTROL, 0.0
        elif piece in hand_added:
            types[i], scores[i] = TokenType.NORMAL, HAND_ADDED_SCORE
        else:
            types[i], scores[i] = TokenType.NORMAL, -float(first_merge.get(piece, len(merges) + i))
    for token in added:
        i = token["id"]
        tokens[i], scores[i] = token["content"], ADDED_SCORE
        types[i] = TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}


def _byte_level_vocab(model, added, vocab_size) -> dict:
    """tokens, types and merges as _set_vocab_gpt2 writes them: normal pieces in the byte alphabet; added tokens
    control when special or spelled "<|...|>", else user-defined (with ▁ written as a space); "[PADi]" unused up
    to the embedding size; merges as "left right", best first."""
    tokens, _, types = _padded(vocab_size)
    for piece, i in model["vocab"].items():
        tokens[i], types[i] = piece, TokenType.NORMAL
    for token in added:
        i, content = token["id"], token["content"]
        if token.get("special") or (content.startswith("<|") and content.endswith("|>")):
            tokens[i], types[i] = content, TokenType.CONTROL
        else:
            tokens[i], types[i] = content.replace(SPACE, " "), TokenType.USER_DEFINED
    merges = [f"{left} {right}" for left, right in _merge_pairs(model["merges"])]
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def _padded(vocab_size: int) -> tuple[list, list, list]:
    """tokens, scores, types for `vocab_size` ids, each an unused "[PADi]" row until a piece claims it."""
    return [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED_SCORE] * vocab_size, [TokenType.UNUSED] * vocab_size


def _check_ids(pairs, vocab_size, path) -> None:
    """Every (piece, id) has its id inside the embedding."""
    for piece, i in pairs:
        if not 0 <= i < vocab_size:
            raise PhinanoError(f"{path}: token {piece!r} has id {i}, outside the model's {vocab_size} embedding rows "
                               f"(0..{vocab_size - 1})")


def _merge_pairs(merges) -> list[tuple[str, str]]:
    """tokenizer.json's merges, either ["a", "b"] pairs or (older files) "a b" strings."""
    return [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in merges]


def _byte_level_pre(spec, path) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, or None when tokenizer.json is not byte-level: "gpt-4o" for
    Phi-4-mini's o200k split, "dbrx" for Phi-4's cl100k one (llama.cpp's converter knows a tokenizer by its ids on
    a test text, and Phi-4's vocabulary has cl100k's ids, as DBRX's has). The names are those tokenizer_parts
    reads (PRE_TOKENIZER_SPLITS)."""
    steps = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    if not any(step.get("type") == "ByteLevel" for step in steps):
        return None
    split = None
    if len(steps) == 1 and steps[0].get("use_regex", True):  # ByteLevel with its built-in GPT-2 regex
        split = GPT2_SPLIT
    elif len(steps) == 2 and steps[0].get("type") == "Split" and not steps[1].get("use_regex", True):
        rule = steps[0]
        if rule.get("behavior") == "Isolated" and not rule.get("invert"):
            split = (rule.get("pattern") or {}).get("Regex")
    if split not in PRE_TOKENIZER_NAMES or steps[-1].get("add_prefix_space") or spec.get("normalizer") is not None:
        known = ", ".join(PRE_TOKENIZER_NAMES.values())
        raise PhinanoError(f"{path}: a byte-level pre-tokenizer with no llama.cpp name phinano knows (it writes "
                           f"{known}: the GPT-2, o200k and cl100k splits, with no normalizer and no prefix space)")
    return PRE_TOKENIZER_NAMES[split]


def _space_prefix(spec, path) -> bool:
    """Whether a SentencePiece-style pipeline puts ▁ before each piece of text (GGUF's add_space_prefix): from
    tokenizer.json's normalizer, Prepend ▁ then Replace " " -> ▁ (Phi-3), or Replace alone (no prefix); a
    Metaspace pre-tokenizer only without a prefix. Metaspace's prefix is not GGUF's: it adds none to text that
    starts with a space, or (scheme "first") to text after an added token; llama.cpp adds one to every piece."""
    normalizer = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if not pre and normalizer and normalizer[-1] == replace:
        rest = normalizer[:-1]
        if rest in ([], [{"type": "Prepend", "prepend": SPACE}]):
            return bool(rest)
    if not normalizer and len(pre) == 1 and pre[0].get("type") == "Metaspace":
        scheme = pre[0].get("prepend_scheme", "always" if pre[0].get("add_prefix_space", True) else "never")
        if pre[0].get("replacement") == SPACE and not pre[0].get("split", True) and scheme == "never":
            return False
    raise PhinanoError(f"{path}: the normalizer and pre-tokenizer are neither SentencePiece-style as GGUF can say it "
                       "(spaces as ▁, and ▁ before every piece of text or never) nor byte-level")


def _steps(component, key) -> list[dict]:
    """A tokenizer.json normalizer / pre-tokenizer / processor as a flat list of steps ([] for none)."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [step for part in component.get(key, []) for step in _steps(part, key)]
    return [component]


def _special_ids(model, added, config, config_path) -> dict:
    """{tokenizer.ggml.bos_token_id: id, ...} for the tokens tokenizer_config.json names. gguf.SpecialVocab, the
    converter's code for these keys (and for the flags and templates below), is the tests' reference rather than
    called here: it logs a warning for every Phi-3 post-processor, skips a token it cannot find where phinano
    refuses it, and hands its keys only to a GGUFWriter."""
    ids = dict(model["vocab"])
    ids.update({token["content"]: token["id"] for token in added})
    out = {}
    for name, key in NAMED_TOKEN_KEYS.items():
        content = _content(config.get(name))
        if content is None:
            continue
        if content not in ids:
            raise PhinanoError(f"{config_path}: {name} {content!r} is not a token of tokenizer.json")
        out[key] = ids[content]
    return out


def _content(entry) -> str | None:
    """A tokenizer_config.json token entry: "<s>" or {"content": "<s>", ...}."""
    return entry.get("content") if isinstance(entry, dict) else entry


def _add_flags(spec, config) -> dict:
    """add_bos_token / add_eos_token: what tokenizer.json's post-processor adds around a text, overridden by
    tokenizer_config.json's flags (gguf.SpecialVocab's order). Absent when neither says."""
    named = {name: _content(config.get(f"{name}_token")) for name in ("bos", "eos")}
    flags = {}
    for processor in _steps(spec.get("post_processor"), "processors"):
        if processor.get("type") != "TemplateProcessing" or len(processor.get("single") or []) < 2:
            continue
        single = [step.get("SpecialToken", {}).get("id") for step in processor["single"]]  # ["<s>", None]: <s> $A
        if single[0] is not None:
            flags["bos"] = single[0] == named["bos"]
        if single[-1] is not None:
            flags["eos"] = single[-1] == named["eos"]
    for name in ("bos", "eos"):
        if isinstance(config.get(f"add_{name}_token"), bool):
            flags[name] = config[f"add_{name}_token"]
    return {f"tokenizer.ggml.add_{name}_token": flag for name, flag in flags.items()}


def _chat_template_keys(folder, config) -> dict:
    """tokenizer.chat_template (and named ones), from the same places and in the same order of priority as
    phinano.tokenizer reads them: chat_template.jinja and additional_chat_templates/*.jinja beat
    tokenizer_config.json's chat_template (a string, or named templates as a list or a dict)."""
    entry = config.get("chat_template")
    templates = {}
    if isinstance(entry, str):
        templates["default"] = entry
    elif isinstance(entry, list):  # [{"name": "default", "template": "..."}, ...]
        templates.update({item.get("name"): item.get("template") for item in entry if isinstance(item, dict)})
    elif isinstance(entry, dict):
        templates.update(entry)
    if not all(isinstance(name, str) and isinstance(template, str) for name, template in templates.items()):
        raise PhinanoError(f"{folder / 'tokenizer_config.json'}: chat_template should be a string or named strings")
    default_file, extra_files = folder / "chat_template.jinja", sorted(folder.glob("additional_chat_templates/*.jinja"))
    if default_file.is_file() or extra_files:
        templates = {path.name.removesuffix(".jinja"): path.read_text(encoding="utf-8") for path in extra_files}
        if default_file.is_file():
            templates["default"] = default_file.read_text(encoding="utf-8")
    out = {}
    if "default" in templates:
        out["tokenizer.chat_template"] = templates.pop("default")
    names = {re.sub(r"[^A-Za-z0-9]", "_", name): template for name, template in templates.items()}  # GGUFWriter's
    if names:
        out["tokenizer.chat_templates"] = sorted(names)
        out.update({f"tokenizer.chat_template.{name}": template for name, template in names.items()})
    return out


def _tokenizer_json(path: Path) -> dict:
    """tokenizer.json as a dict, once the `tokenizers` library has read it (so its structure is sound)."""
    try:
        text = path.read_text(encoding="utf-8")
        Tokenizer.from_str(text)
    except Exception as error:  # OSError, UnicodeDecodeError, or the Rust side's plain Exception
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PhinanoError(f"{path}: not a tokenizer.json the tokenizers library reads ({reason})") from None
    return json.loads(text)


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PhinanoError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise PhinanoError(f"{path} should hold a JSON object")
    return value


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
