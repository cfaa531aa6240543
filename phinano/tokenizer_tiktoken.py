"""Phi-3-small's tokenizer: tiktoken's cl100k_base ranks plus the model's own special and dummy tokens.

The released tokenizer (tokenization_phi3_small.py) is a tiktoken `Encoding` built from
- the cl100k_base byte-pair ranks (100256 of them, ids 0..100255), read from the model folder's
  `cl100k_base.tiktoken` (one `<base64 bytes> <rank>` per line; the released repository carries it). phinano never
  downloads it: a folder without it is one clear error;
- cl100k's split pattern;
- the special tokens below: cl100k's own (<|endoftext|> 100257, <|fim_*|>, <|endofprompt|>), the chat markers
  <|system|> 100261, <|user|> 100262, <|assistant|> 100263, <|end|> 100266, and "dummy" tokens filling every
  unused id up to the padded vocabulary of 100352.

As released: text is encoded with every special token allowed (typing "<|end|>" gives id 100266), nothing is
added around it (the chat template writes <|endoftext|>, the model's bos, itself), decoding with
`skip_special_tokens` keeps only ids below 100257, and invalid UTF-8 decodes to U+FFFD. The model never
produces the dummy ids: their logits are masked (config.PHI3SMALL_DUMMY_TOKEN_IDS).

`TiktokenTokenizer` offers what `tokenizer.Tokenizer` offers (encode, decode, stream, apply_chat_template, the
vocabulary look-ups), so the rest of phinano does not know which one it holds.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from .errors import PhinanoError
from .tokenizer import CONFIG_FILE, Tokenizer, _read_chat_templates, _read_config

VOCAB_FILE = "cl100k_base.tiktoken"

# cl100k_base's pre-tokenizer split (tiktoken_ext.openai_public.cl100k_base); the released tokenizer reuses it.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

_PADDED_VOCAB = 100352  # the embedding rows; ids 100277 .. 100351 are <|dummy_id_12|> .. <|dummy_id_86|>
SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|system|>": 100261,
    "<|user|>": 100262,
    "<|assistant|>": 100263,
    "<|dummy_id_0|>": 100264,
    "<|dummy_id_1|>": 100265,
    "<|end|>": 100266,
    "<|dummy_id_2|>": 100256,  # the one rank cl100k_base leaves empty
    **{f"<|dummy_id_{i}|>": 100264 + i for i in range(3, 12)},  # 100267 .. 100275
    "<|endofprompt|>": 100276,
    **{f"<|dummy_id_{11 + k}|>": 100276 + k for k in range(1, _PADDED_VOCAB - 100276)},
}
# Tokens the released tokenizer lists as unused (their logits are masked): the dummies and four cl100k specials.
UNUSED_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")

# tokenizer_config.json's template of the released instruct models, used when the folder has none.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + "
                 "message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken vocabulary file: {token bytes: rank}. A malformed line is one error naming its number."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error):
            raise PhinanoError(f"{path}: line {number} is not '<base64 token> <rank>'") from None
    if not ranks:
        raise PhinanoError(f"{path}: holds no tokens")
    return ranks


def load_tiktoken_tokenizer(folder) -> "TiktokenTokenizer":
    """Phi-3-small's tokenizer from `folder`: cl100k_base.tiktoken, and tokenizer_config.json's chat template
    when there is one."""
    folder = Path(folder)
    path = folder / VOCAB_FILE
    if not path.is_file():
        raise PhinanoError(f"{path} is missing: Phi-3-small's tokenizer needs the cl100k_base ranks from its model "
                           f"repository (phinano does not download them); or load with tokenizer=False")
    config = _read_config(folder / CONFIG_FILE)
    templates = _read_chat_templates(folder, config) or {"default": CHAT_TEMPLATE}
    return TiktokenTokenizer(read_ranks(path), SPECIAL_TOKENS, templates)


class TiktokenTokenizer(Tokenizer):
    """The Tokenizer interface over a tiktoken Encoding (apply_chat_template and stream are inherited)."""

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int], chat_templates: dict):
        import tiktoken

        self.encoding = tiktoken.Encoding(name="phi3small", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=special)
        self.special = dict(special)
        self.ranks = ranks  # bytes -> id
        self.pieces = {rank: piece for piece, rank in ranks.items()}  # id -> bytes
        self.names = {i: name for name, i in special.items()}  # id -> special token
        # bos = eos = pad = <|endoftext|>, as released; also the chat template's variables
        self.special_tokens = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        self.chat_templates = chat_templates
        self.special_ids = set(special.values())
        self.byte_ids = set()  # no byte-fallback pieces: a split UTF-8 character is held by the stream decoder
        self.eod_id = special["<|endoftext|>"]

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab  # 100352: the highest id + 1

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.special.get(token)

    def token_to_id(self, token: str | bytes) -> int | None:
        if isinstance(token, str) and token in self.special:
            return self.special[token]
        return self.ranks.get(token.encode("utf-8") if isinstance(token, str) else token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.names:
            return self.names[token_id]
        piece = self.pieces.get(token_id)
        return None if piece is None else piece.decode("utf-8", errors="replace")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, every special token allowed; nothing is added (add_special_tokens changes nothing)."""
        if not isinstance(text, str):
            raise PhinanoError(f"encode expects a str, got {type(text).__name__}")
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text (invalid UTF-8 -> U+FFFD). Unknown ids are ignored; skip_special_tokens keeps ids below
        <|endoftext|> only, as released."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids if i in self.pieces or i in self.names]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        return self.encoding.decode(ids, errors="replace")
