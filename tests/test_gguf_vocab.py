"""Tests for phinano.formats.gguf_vocab: a GGUF file's vocabulary rebuilt as a tokenizer.

- Phi-3 ("llama" vocabulary): GGUF metadata made from the real Phi-3 tokenizer in ../shared/phi3-tokenizer the way
  llama.cpp's converter writes it (skipped when the folder is absent), compared with phinano's tokenizer.json
  tokenizer of the same folder (itself tested equal to Transformers in test_tokenizer.py) and with llama.cpp's own
  reference tokenizations of that vocabulary (tests/data/llamacpp-phi3-vocab.jsonl).
- Byte-level BPE ("gpt2", as Phi-4-mini): a tiny vocabulary trained here with `tokenizers`, written as the
  converter's _set_vocab_gpt2 writes it, compared with the `tokenizers` object it came from.
- The worked example of docs/gguf-tokenizer.md, and malformed metadata (one PhinanoError naming the key).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phinano.errors import PhinanoError
from phinano.formats.gguf_vocab import tokenizer_parts
from phinano.tokenizer import Tokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHI3_DIR = SHARED / "phi3-tokenizer"
LLAMACPP_CASES = Path(__file__).resolve().parent / "data" / "llamacpp-phi3-vocab.jsonl"

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PHI3_VOCAB_SIZE = 32064  # config.json's vocab_size: the converter pads the token list to the embedding rows

HARD_TEXTS = [
    "",
    " ",
    "   ",
    "Hello",
    " Hello",
    "   Hello   world   ",
    "trailing spaces   ",
    "line one\nline two\n\n\nend",
    "\n",
    "\n\n leading newlines",
    "tab\tseparated\t\tvalues\t",
    " \t \n \r\n mixed whitespace",
    "emoji 🦙🚀😶‍🌫️ 👨‍👩‍👧‍👦 🇩🇪",
    "中文 日本語 한국어 ភាសាខ្មែរ",
    "Grüße, naïve café — ½ × ∞",
    "<|user|>\nHello<|end|>\n<|assistant|>\n",
    "<|user|>   spaces after a marker",
    "text<|end|>text<|end|>\n\n",
    "<s>bos in text</s> and eos",
    "<|endoftext|> after endoftext",
    "<unk> unknown",
    "almost <|user| special <|nope|>",
    "<|system|>\nBe brief.<|end|>\n<|user|>\n中文?<|end|>\n<|assistant|>\n",
    "code:\n    def f(x):\n        return x  *  2\n",
]

PHI3_CHATS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "  And  times three?\nExplain 🙂"},
    ],
]


# ---------------------------------------------------------------------------------------------------------------
# Phi-3: the converter's metadata, from the shared tokenizer folder
# ---------------------------------------------------------------------------------------------------------------


def phi3_metadata(folder: Path) -> dict:
    """GGUF metadata as llama.cpp's converter (Phi3MiniModel.set_vocab, then gguf.SpecialVocab) writes it.

    The converter reads SentencePiece's tokenizer.model; the shared folder has only tokenizer.json, so the
    scores are recovered from it: a piece's score is minus the rank of the first merge that makes it, and the
    runs of ▁ ("▁▁", "▁▁▁▁", ...) score -1e9, as in the Llama-2 SentencePiece model (that is why ("▁", "▁") is
    the very last merge in tokenizer.json). Types: <unk> unknown, <s> </s> control, <0xNN> byte, the rest
    normal; then every added token of tokenizer.json is rewritten as control (special) or user-defined (not
    special) with score -1000; ids past the vocabulary up to the embedding size are "[PADn]", unused, -10000.
    """
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    model = spec["model"]
    first_merge = {}
    for rank, (left, right) in enumerate(model["merges"]):
        first_merge.setdefault(left + right, rank)

    tokens = [f"[PAD{i}]" for i in range(PHI3_VOCAB_SIZE)]
    scores = [-10000.0] * PHI3_VOCAB_SIZE
    types = [UNUSED] * PHI3_VOCAB_SIZE
    for piece, i in model["vocab"].items():
        tokens[i] = piece
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            types[i], scores[i] = BYTE, 0.0
        elif piece in ("<unk>", "<s>", "</s>"):
            types[i], scores[i] = (UNKNOWN if piece == "<unk>" else CONTROL), 0.0
        elif len(piece) > 1 and set(piece) == {"\u2581"}:
            types[i], scores[i] = NORMAL, -1e9
        else:
            types[i], scores[i] = NORMAL, -float(first_merge.get(piece, len(model["merges"]) + i))
    ids = {}
    for token in spec["added_tokens"]:
        i = token["id"]
        tokens[i], scores[i] = token["content"], -1000.0
        types[i] = CONTROL if token["special"] else USER_DEFINED
        ids[token["content"]] = i

    return {
        "general.architecture": "phi3",
        "general.name": "Phi 3 Mini 4k Instruct",  # what the converter makes of the folder name
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": ids[config["bos_token"]],
        "tokenizer.ggml.eos_token_id": ids[config["eos_token"]],
        "tokenizer.ggml.unknown_token_id": ids[config["unk_token"]],
        "tokenizer.ggml.padding_token_id": ids[config["pad_token"]],
        "tokenizer.ggml.add_bos_token": config["add_bos_token"],  # false for Phi-3
        "tokenizer.ggml.add_eos_token": config["add_eos_token"],
        "tokenizer.chat_template": config["chat_template"],
    }


def build(metadata: dict) -> Tokenizer:
    parts = tokenizer_parts(metadata)
    return Tokenizer(parts.backend, parts.special_tokens, parts.chat_templates, parts.byte_fallback)


@pytest.fixture(scope="module")
def phi3_meta():
    if not (PHI3_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the shared Phi-3 tokenizer is not there ({PHI3_DIR}); these tests need it")
    return phi3_metadata(PHI3_DIR)


@pytest.fixture(scope="module")
def gguf_phi3(phi3_meta):
    return build(phi3_meta)


@pytest.fixture(scope="module")
def hf_phi3(phi3_meta):
    return load_tokenizer(PHI3_DIR)


def test_phi3_parts(phi3_meta):
    parts = tokenizer_parts(phi3_meta)
    assert parts.special_tokens == {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
    }
    assert parts.stop_ids == (32000, 32001, 32007)  # generation_config.json's eos list for Phi-3
    assert parts.byte_fallback is True
    assert parts.chat_templates == {"default": phi3_meta["tokenizer.chat_template"]}


def test_phi3_merges_derived_from_scores_are_tokenizer_json_merges(phi3_meta, gguf_phi3):
    spec = json.loads((PHI3_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    ours = json.loads(gguf_phi3.backend.to_str())["model"]
    assert ours["merges"] == spec["model"]["merges"]  # same pairs, same order
    assert ours["vocab"] == spec["model"]["vocab"]  # the [PADn] rows are not pieces


def test_phi3_vocabulary_and_added_tokens_match_hf(gguf_phi3, hf_phi3):
    assert gguf_phi3.vocab_size == hf_phi3.vocab_size == 32011
    assert gguf_phi3.special_ids == hf_phi3.special_ids
    assert gguf_phi3.byte_ids == hf_phi3.byte_ids
    flags = lambda tokenizer: {  # noqa: E731
        i: (t.content, t.special, t.rstrip, t.lstrip, t.normalized)
        for i, t in tokenizer.backend.get_added_tokens_decoder().items()
    }
    assert flags(gguf_phi3) == flags(hf_phi3)  # rstrip on the chat markers and </s>, not on <s> <unk> <|endoftext|>


def test_phi3_encode_matches_hf_without_bos(gguf_phi3, hf_phi3):
    """The converter writes add_bos_token false, and llama.cpp then adds no BOS; tokenizer.json adds <s>."""
    for text in HARD_TEXTS + reference_texts():
        expected = hf_phi3.encode(text, add_special_tokens=False)
        assert gguf_phi3.encode(text) == expected, text
        assert gguf_phi3.encode(text, add_special_tokens=False) == expected, text
    assert gguf_phi3.encode("Hello") == [15043]
    assert hf_phi3.encode("Hello") == [1, 15043]  # the documented difference
    assert gguf_phi3.encode("<|user|>\nHello") == [32010, 15043]  # rstrip restored: the newline is swallowed


@pytest.mark.parametrize("add_bos", [True, None])  # None: the key is absent, which means true for SentencePiece
def test_phi3_encode_with_bos_matches_hf(phi3_meta, hf_phi3, add_bos):
    metadata = dict(phi3_meta)
    if add_bos is None:
        del metadata["tokenizer.ggml.add_bos_token"]
    else:
        metadata["tokenizer.ggml.add_bos_token"] = add_bos
    tokenizer = build(metadata)
    for text in HARD_TEXTS:
        assert tokenizer.encode(text) == hf_phi3.encode(text), text
    assert tokenizer.encode("Hi", add_special_tokens=False) == hf_phi3.encode("Hi", add_special_tokens=False)


def test_phi3_add_eos(phi3_meta):
    tokenizer = build({**phi3_meta, "tokenizer.ggml.add_eos_token": True})
    assert tokenizer.encode("Hello") == [15043, 32000]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(
        st.one_of(
            st.text(alphabet=st.sampled_from(list(" \t\n\r1'aZé中🦙▁")), max_size=8),
            st.text(max_size=8),
            st.sampled_from(["<|user|>", "<|end|>", "<|assistant|>", "<s>", "</s>", "<|endoftext|>", "<unk>"]),
        ),
        max_size=8,
    )
)
def test_phi3_encode_matches_hf_on_any_text(gguf_phi3, hf_phi3, pieces):
    text = "".join(pieces)
    assert gguf_phi3.encode(text) == hf_phi3.encode(text, add_special_tokens=False)


def test_phi3_decode_matches_hf(gguf_phi3, hf_phi3):
    for text in HARD_TEXTS:
        ids = hf_phi3.encode(text)
        for skip in (False, True):
            assert gguf_phi3.decode(ids, skip_special_tokens=skip) == hf_phi3.decode(ids, skip_special_tokens=skip)
    # byte runs, invalid UTF-8, padding rows (no text in either) and ids past the end
    for ids in ([243, 162, 169, 156], [243, 162], [1, 29871, 13, 32007, 2], [32011, 32063, 15043], [99999]):
        assert gguf_phi3.decode(ids) == hf_phi3.decode(ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=32063), max_size=12), skip=st.booleans())
def test_phi3_decode_matches_hf_on_any_ids(gguf_phi3, hf_phi3, ids, skip):
    assert gguf_phi3.decode(ids, skip_special_tokens=skip) == hf_phi3.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", PHI3_CHATS)
def test_phi3_chat_template_matches_hf(gguf_phi3, hf_phi3, messages):
    assert gguf_phi3.apply_chat_template(messages, tokenize=False) == hf_phi3.apply_chat_template(
        messages, tokenize=False
    )
    ids = gguf_phi3.apply_chat_template(messages)
    assert ids == hf_phi3.apply_chat_template(messages)
    assert ids[:4] == [1, 32010, 15043, 32007] if messages == PHI3_CHATS[0] else ids[0] == 1


def test_phi3_stream_decode_matches_decode(gguf_phi3):
    ids = gguf_phi3.encode("Stream 🦙 bytes, 中文 and <|end|>\n spaces  ")
    stream = gguf_phi3.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == gguf_phi3.decode(ids)


def test_phi3_rstrip_follows_family(phi3_meta):
    """Architecture phi3/phimoe (or llama.cpp's rule: "phi3"/"phi-3" in general.name) -> the Phi-3 rstrip flags;
    any other SentencePiece model keeps the whitespace after its added tokens."""
    text = "<|user|>\nHi<|end|>\n"
    swallowed = [32010, 6324, 32007]
    kept = [32010, 29871, 13, 18567, 32007, 29871, 13]
    assert build(phi3_meta).encode(text) == swallowed
    assert build({**phi3_meta, "general.architecture": "phimoe"}).encode(text) == swallowed
    other = {**phi3_meta, "general.architecture": "llama", "general.name": "Some Llama"}
    assert build(other).encode(text) == kept
    assert build({**other, "general.name": "my-Phi3-finetune"}).encode(text) == swallowed
    assert build({**other, "general.name": None}).encode(text) == kept


def test_phi3_stop_ids_include_eot(phi3_meta):
    assert tokenizer_parts({**phi3_meta, "tokenizer.ggml.eot_token_id": 32007}).stop_ids == (32000, 32001, 32007)
    assert tokenizer_parts({**phi3_meta, "tokenizer.ggml.eos_token_id": 2}).stop_ids == (2, 32000, 32001, 32007)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's reference tokenizations of its Phi-3 vocabulary
# ---------------------------------------------------------------------------------------------------------------


def llamacpp_cases() -> list[dict]:
    lines = LLAMACPP_CASES.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line and not line.startswith("#")]


def reference_texts() -> list[str]:
    return [case["text"] for case in llamacpp_cases()]


def test_llamacpp_reference_tokenizations(gguf_phi3):
    cases = llamacpp_cases()
    assert len(cases) == 46
    wrong = [case["text"] for case in cases if gguf_phi3.encode(case["text"]) != case["ids"]]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ from llama.cpp: {wrong}"


# ---------------------------------------------------------------------------------------------------------------
# A real .gguf file: write the metadata with gguf.GGUFWriter, read it back with gguf.GGUFReader
# ---------------------------------------------------------------------------------------------------------------


def write_gguf(path: Path, metadata: dict) -> None:
    """A vocabulary-only GGUF (as the converter's --vocab-only writes), value types as the converter uses them."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), metadata["general.architecture"])  # writes general.architecture
    writer.add_name(metadata["general.name"])
    for key, value in metadata.items():
        if key.startswith("general."):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)  # token ids
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)  # strings, int32 token types, float32 scores
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def read_gguf_metadata(path: Path) -> dict:
    """{key: plain Python value} for every metadata key, as phinano's GGUF loader hands them over."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def phi3_gguf_file(phi3_meta, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "phi3-vocab.gguf"
    write_gguf(path, phi3_meta)
    return path


def test_phi3_gguf_file_round_trip(phi3_meta, hf_phi3, phi3_gguf_file):
    metadata = read_gguf_metadata(phi3_gguf_file)
    assert metadata == phi3_meta  # every value type survives (scores are whole numbers or -1e9: exact in float32)
    tokenizer = build(metadata)
    for text in HARD_TEXTS:
        assert tokenizer.encode(text) == hf_phi3.encode(text, add_special_tokens=False), text
    assert tokenizer_parts(metadata).stop_ids == (32000, 32001, 32007)


def test_phi3_gguf_file_matches_transformers_gguf_loader(phi3_meta, phi3_gguf_file):
    """Transformers' own GGUF tokenizer (AutoTokenizer with gguf_file=) is an independent rebuild of the same file.
    It restores no rstrip flags, so it equals phinano's rebuild without them (a non-Phi architecture), everywhere."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(phi3_gguf_file.parent), gguf_file=phi3_gguf_file.name)
    no_rstrip = build({**phi3_meta, "general.architecture": "llama"})
    for text in HARD_TEXTS + reference_texts():
        assert no_rstrip.encode(text) == hf.encode(text), text  # and no BOS: add_bos_token is false in both
        ids = no_rstrip.encode(text)
        assert no_rstrip.decode(ids) == hf.decode(ids), text


# ---------------------------------------------------------------------------------------------------------------
# Byte-level BPE ("gpt2"), Phi-4-mini style
# ---------------------------------------------------------------------------------------------------------------

# The split regex of the released Phi-4-mini tokenizer.json (o200k, Xenova/gpt-4o), written out independently of
# the module so that a wrong pattern there fails here.
O200K_SPLIT = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
    "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "I'm sure you'll see they've said it's what we'd do. DON'T SHOUT, WE'LL HEAR.",
    "Numbers: 1 12 123 1234 12345 3.14159 2,718 and 1/2 of 100%.",
    "def tokenize(text):\n    return [t for t in text.split()]  # comment\n\n",
    "Grüße aus München, naïve café, 中文字符 and 日本語 text, 🦙 llamas 🚀 rockets.",
    "Spaces   between    words\tand\ttabs\r\nand windows lines.",
    "<html><body class=\"x\">Hello &amp; goodbye</body></html>",
]
# (content, special, rstrip in the released Phi-4-mini tokenizer.json)
PHI4_ADDED = [
    ("<|endoftext|>", True, False),
    ("<|assistant|>", True, True),
    ("<|end|>", True, True),
    ("<|user|>", True, True),
    ("<|system|>", True, True),
    ("<|im_start|>", True, False),
    ("<think>", False, False),  # not special and not "<|...|>": the converter writes it user-defined
]


def train_byte_level(split: str | None, rstrip: bool):
    """A tiny byte-level BPE trained here: `split` is the pre-tokenizer regex (None: GPT-2's built-in one)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    backend.add_special_tokens(
        [AddedToken(c, special=True, normalized=False, rstrip=r and rstrip) for c, special, r in PHI4_ADDED if special]
    )
    backend.add_tokens([AddedToken(c, special=False, normalized=False) for c, special, _ in PHI4_ADDED if not special])
    return backend


def byte_level_metadata(backend, pre: str, architecture: str, padding: int = 5) -> dict:
    """GGUF metadata as the converter's _set_vocab_gpt2 writes it: get_vocab_base's tokens and types (added tokens
    control when special or "<|...|>", else user-defined; "[PADn]" unused up to the embedding size), merges as
    "left right", special ids from tokenizer_config.json (bos = eos = pad = <|endoftext|>, add_bos_token false)."""
    spec = json.loads(backend.to_str())
    added = {token["id"]: token for token in spec["added_tokens"]}
    by_id = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
    size = len(by_id) + padding
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            types.append(CONTROL if added[i]["special"] or looks_special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    end = backend.token_to_id("<|endoftext|>")
    return {
        "general.architecture": architecture,
        "general.name": "Tiny Byte Level",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [" ".join(pair) for pair in spec["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": end,
        "tokenizer.ggml.eos_token_id": end,
        "tokenizer.ggml.padding_token_id": end,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    }


@pytest.fixture(scope="module")
def phi4_style():
    """(original tokenizers object, tokenizer rebuilt from its GGUF metadata): o200k split, architecture phi3."""
    original = train_byte_level(O200K_SPLIT, rstrip=True)
    return original, build(byte_level_metadata(original, "gpt-4o", "phi3"))


@pytest.fixture(scope="module")
def gpt2_style():
    original = train_byte_level(None, rstrip=False)
    return original, build(byte_level_metadata(original, "gpt-2", "gpt2"))


BYTE_LEVEL_TEXTS = CORPUS + HARD_TEXTS + [
    "<|user|>  Hi there<|end|><|assistant|>\n\nSure<|end|>",
    "<|im_start|>system\nYou are<|im_end|>",
    "<think>  reasoning </think> answer",
    "WE'LL SEE what THEY'VE DONE's 1234567 apples/oranges\n\n\n  x",
]


@pytest.mark.parametrize("style", ["phi4_style", "gpt2_style"])
def test_byte_level_encode_decode_match_original(style, request):
    original, tokenizer = request.getfixturevalue(style)
    for text in BYTE_LEVEL_TEXTS:
        ids = original.encode(text).ids
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == original.decode(ids, skip_special_tokens=False)
        assert tokenizer.decode(ids) == text or style == "phi4_style"  # rstrip drops whitespace after markers
        assert tokenizer.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
        assert words(tokenizer.backend, text) == words(original, text)


def words(backend, text: str) -> list[str]:
    """How the pre-tokenizer cuts `text` (a tiny vocabulary's merges rarely cross the words a wrong regex makes)."""
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


BYTE_LEVEL_PIECES = st.lists(
    st.one_of(
        st.text(max_size=10),
        st.text(alphabet=st.sampled_from(list(" \t\n\r'sStTlLdD/1234") + ["a", "Б", "中", "é", "🦙", "\u0301"])),
        st.sampled_from([token for token, _, _ in PHI4_ADDED] + ["<|end", "|>"]),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=BYTE_LEVEL_PIECES, style=st.sampled_from(["phi4_style", "gpt2_style"]))
def test_byte_level_encode_matches_original_on_any_text(pieces, style, request):
    original, tokenizer = request.getfixturevalue(style)
    text = "".join(pieces)
    assert tokenizer.encode(text) == original.encode(text).ids
    assert words(tokenizer.backend, text) == words(original, text)


def test_byte_level_parts(phi4_style):
    original, _ = phi4_style
    parts = tokenizer_parts(byte_level_metadata(original, "gpt-4o", "phi3"))
    end, stop = original.token_to_id("<|endoftext|>"), original.token_to_id("<|end|>")
    assert parts.stop_ids == tuple(sorted((end, stop)))  # Phi-4-mini: [200020, 199999]
    assert parts.special_tokens == dict.fromkeys(("bos_token", "eos_token", "pad_token"), "<|endoftext|>")
    assert parts.byte_fallback is False
    tokenizer = build(byte_level_metadata(original, "gpt-4o", "phi3"))
    assert tokenizer.vocab_size == original.get_vocab_size(with_added_tokens=True)  # the [PADn] rows are no tokens
    assert tokenizer.token_to_id("<think>") not in tokenizer.special_ids
    assert tokenizer.token_to_id("<|im_start|>") in tokenizer.special_ids
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|user|>Hi<|end|><|assistant|>"


def test_byte_level_rstrip_only_for_phi4_mini(phi4_style):
    """Architecture phi3 with a byte-level vocabulary is Phi-4-mini: its role markers swallow whitespace."""
    original, tokenizer = phi4_style
    other = build(byte_level_metadata(original, "gpt-4o", "qwen2"))
    text = "<|user|>  Hi"
    assert tokenizer.encode(text) == tokenizer.encode("<|user|>Hi")
    assert other.encode(text) != other.encode("<|user|>Hi")
    assert other.encode("<|endoftext|>  x") == tokenizer.encode("<|endoftext|>  x")  # never stripped


def test_byte_level_gguf_file_round_trip(phi4_style, tmp_path):
    original, _ = phi4_style
    metadata = byte_level_metadata(original, "gpt-4o", "phi3")
    path = tmp_path / "tiny-vocab.gguf"
    write_gguf(path, metadata)
    assert read_gguf_metadata(path) == metadata
    tokenizer = build(read_gguf_metadata(path))
    for text in BYTE_LEVEL_TEXTS:
        assert tokenizer.encode(text) == original.encode(text).ids


# ---------------------------------------------------------------------------------------------------------------
# The worked example of docs/gguf-tokenizer.md
# ---------------------------------------------------------------------------------------------------------------

TINY = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<0x0A>", "▁", "h", "i", "▁h", "hi", "▁hi", "<|end|>"],
    "tokenizer.ggml.scores": [0.0, 0.0, 0.0, 0.0, -100.0, -101.0, -102.0, -1.0, -2.0, -3.0, -1000.0],
    "tokenizer.ggml.token_type": [2, 3, 3, 6, 1, 1, 1, 1, 1, 1, 3],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 0,
    "tokenizer.ggml.add_bos_token": True,
}


def test_worked_example():
    parts = tokenizer_parts(TINY)
    model = json.loads(parts.backend.to_str())["model"]
    assert model["merges"] == [["▁", "h"], ["h", "i"], ["▁h", "i"], ["▁", "hi"]]
    tokenizer = build(TINY)
    assert tokenizer.encode("hi hi\n") == [1, 9, 9, 3]
    assert tokenizer.decode([1, 9, 9, 3]) == "<s> hi hi\n"
    assert tokenizer.decode([1, 9, 9, 3], skip_special_tokens=True) == "hi hi\n"
    assert tokenizer.encode("hi<|end|>hi", add_special_tokens=False) == [9, 10, 9]
    assert parts.stop_ids == (2, 10)  # eos </s>, and <|end|>


# ---------------------------------------------------------------------------------------------------------------
# Malformed metadata: one PhinanoError naming the problem
# ---------------------------------------------------------------------------------------------------------------


def without(metadata: dict, key: str) -> dict:
    return {k: v for k, v in metadata.items() if k != key}


BAD_METADATA = {
    "no model": (without(TINY, "tokenizer.ggml.model"), "tokenizer.ggml.model is missing"),
    "unknown model": ({**TINY, "tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model 'bert' is not supported"),
    "no tokens": (without(TINY, "tokenizer.ggml.tokens"), "tokenizer.ggml.tokens is missing"),
    "empty tokens": (
        {**TINY, "tokenizer.ggml.tokens": [], "tokenizer.ggml.scores": [], "tokenizer.ggml.token_type": []},
        "tokenizer.ggml.tokens is empty",
    ),
    "tokens not strings": (
        {**TINY, "tokenizer.ggml.tokens": TINY["tokenizer.ggml.tokens"][:-1] + [7]},
        r"tokenizer.ggml.tokens\[10\] is 7",
    ),
    "tokens a string": ({**TINY, "tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens should be a list"),
    "scores too short": (
        {**TINY, "tokenizer.ggml.scores": TINY["tokenizer.ggml.scores"][:-1]},
        "tokenizer.ggml.scores has 10 entries but tokenizer.ggml.tokens has 11",
    ),
    "no scores": (without(TINY, "tokenizer.ggml.scores"), "tokenizer.ggml.scores is missing"),
    "types too long": (
        {**TINY, "tokenizer.ggml.token_type": TINY["tokenizer.ggml.token_type"] + [1]},
        "tokenizer.ggml.token_type has 12 entries but tokenizer.ggml.tokens has 11",
    ),
    "no types": (without(TINY, "tokenizer.ggml.token_type"), "tokenizer.ggml.token_type is missing"),
    "bad type": (
        {**TINY, "tokenizer.ggml.token_type": [2, 3, 3, 6, 1, 1, 1, 1, 1, 9, 3]},
        r"tokenizer.ggml.token_type\[9\] is 9; expected 1..6",
    ),
    "bos out of range": (
        {**TINY, "tokenizer.ggml.bos_token_id": 11},
        r"tokenizer.ggml.bos_token_id is 11, not a token id \(the vocabulary has ids 0..10\)",
    ),
    "eos negative": ({**TINY, "tokenizer.ggml.eos_token_id": -1}, "tokenizer.ggml.eos_token_id is -1"),
    "eot not an int": ({**TINY, "tokenizer.ggml.eot_token_id": "7"}, "tokenizer.ggml.eot_token_id is '7'"),
    "add_bos without bos": (
        without(TINY, "tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set",
    ),
    "add_bos not a bool": ({**TINY, "tokenizer.ggml.add_bos_token": 1}, "add_bos_token should be true or false"),
    "byte piece misspelled": (
        {**TINY, "tokenizer.ggml.token_type": [2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 3]},
        "token 4 '▁' has type byte but is not spelled <0xNN>",
    ),
    "duplicate token": (
        {**TINY, "tokenizer.ggml.tokens": TINY["tokenizer.ggml.tokens"][:-1] + ["hi"]},
        r"tokenizer.ggml.tokens has 'hi' twice \(ids 8 and 10\)",
    ),
    "chat template not a string": ({**TINY, "tokenizer.chat_template": ["x"]}, "chat_template should be a string"),
    "named template missing": (
        {**TINY, "tokenizer.chat_templates": ["tool_use"]},
        "tokenizer.chat_template.tool_use is missing",
    ),
}

TINY_BYTE_LEVEL = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "gpt-4o",
    "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ", "<|endoftext|>"],
    "tokenizer.ggml.token_type": [1, 1, 1, 1, 3],
    "tokenizer.ggml.merges": ["a b"],
}
BAD_METADATA.update(
    {
        "unknown pre": (
            {**TINY_BYTE_LEVEL, "tokenizer.ggml.pre": "qwen2"},
            "tokenizer.ggml.pre 'qwen2' is not supported for byte-level BPE",
        ),
        "no pre": (without(TINY_BYTE_LEVEL, "tokenizer.ggml.pre"), "tokenizer.ggml.pre None is not supported"),
        "no merges": (without(TINY_BYTE_LEVEL, "tokenizer.ggml.merges"), "tokenizer.ggml.merges is missing"),
        "merge of unknown pieces": (
            {**TINY_BYTE_LEVEL, "tokenizer.ggml.merges": ["a b", "b a"]},
            r"tokenizer.ggml.merges\[1\] 'b a' is not two tokens that join into a token",
        ),
        "merge without a space": (
            {**TINY_BYTE_LEVEL, "tokenizer.ggml.merges": ["ab"]},
            r"tokenizer.ggml.merges\[0\] 'ab' is not two tokens",
        ),
    }
)


def test_tiny_byte_level_is_valid():
    """The base of the byte-level bad cases works, so each case fails for its own reason."""
    tokenizer = build(TINY_BYTE_LEVEL)
    assert tokenizer.encode("ab a<|endoftext|>") == [2, 3, 0, 4]


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_one_clear_error(case):
    metadata, message = BAD_METADATA[case]
    with pytest.raises(PhinanoError, match=message) as error:
        tokenizer_parts(metadata)
    assert str(error.value).startswith("GGUF ")
    assert "\n" not in str(error.value)
