"""Tests for phinano.formats.gguf_vocab: a Hugging Face tokenizer written as GGUF metadata (vocab_metadata, as
llama.cpp's converter writes it) and a GGUF file's vocabulary rebuilt as a tokenizer (tokenizer_parts).

- Phi-3 ("llama" vocabulary): vocab_metadata of the real Phi-3 tokenizer (conftest's phi3_tokenizer_dir, as in
  test_tokenizer.py; skipped, saying why, when it cannot be had), its values checked against the converter's rules
  and gguf.SpecialVocab, rebuilt and compared with phinano's tokenizer.json tokenizer of the same folder (itself
  tested equal to Transformers in test_tokenizer.py) and with llama.cpp's own reference tokenizations of that
  vocabulary (tests/data/llamacpp-phi3-vocab.jsonl); also through a real vocabulary-only .gguf file.
- Byte-level BPE ("gpt2", as Phi-4-mini): a tiny vocabulary trained here with `tokenizers`, saved as a tokenizer
  folder, written by vocab_metadata (checked against the converter's get_vocab_base on Transformers' tokenizer and
  gguf.SpecialVocab), rebuilt and compared with the `tokenizers` object it came from.
- The shipped nano models' tokenizers, the other SentencePiece pipelines, chat template files, and folders
  vocab_metadata cannot write (one PhinanoError naming the file).
- The worked example of docs/gguf-tokenizer.md, and malformed metadata (one PhinanoError naming the key).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phinano
from phinano.errors import PhinanoError
from phinano.formats.gguf_vocab import tokenizer_parts, vocab_metadata
from phinano.nano import nano_path
from phinano.tokenizer import Tokenizer, load_tokenizer

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
# Phi-3: the converter's metadata, from the released tokenizer folder
# ---------------------------------------------------------------------------------------------------------------


PHI3_GENERAL = {  # what the GGUF writer adds beside the vocabulary (read by tokenizer_parts for the rstrip rule)
    "general.architecture": "phi3",
    "general.name": "Phi 3 Mini 4k Instruct",  # what the converter makes of the folder name
}


def phi3_metadata(folder: Path) -> dict:
    """A Phi-3 GGUF file's metadata: the vocabulary as vocab_metadata writes it (llama.cpp's converter's way)."""
    return {**PHI3_GENERAL, **vocab_metadata(folder, PHI3_VOCAB_SIZE)}


def build(metadata: dict) -> Tokenizer:
    parts = tokenizer_parts(metadata)
    return Tokenizer(parts.backend, parts.special_tokens, parts.chat_templates, parts.byte_fallback)


@pytest.fixture(scope="module")
def phi3_meta(phi3_tokenizer_dir):
    return phi3_metadata(phi3_tokenizer_dir)


@pytest.fixture(scope="module")
def gguf_phi3(phi3_meta):
    return build(phi3_meta)


@pytest.fixture(scope="module")
def hf_phi3(phi3_tokenizer_dir):
    return load_tokenizer(phi3_tokenizer_dir)


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


def test_phi3_merges_derived_from_scores_are_tokenizer_json_merges(phi3_tokenizer_dir, gguf_phi3):
    spec = json.loads((phi3_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
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


def test_phi3_metadata_is_the_converters(phi3_meta, phi3_tokenizer_dir):
    """The values Phi3MiniModel.set_vocab and gguf.SpecialVocab write for Phi-3, spelled out."""
    tokens, scores, types = (phi3_meta[f"tokenizer.ggml.{key}"] for key in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == PHI3_VOCAB_SIZE
    rows = {i: (tokens[i], types[i], scores[i]) for i in (0, 1, 2, 13, 32000, 32007, 32010, 32011, 32063)}
    assert rows == {
        0: ("<unk>", CONTROL, -1000.0),  # every added token of tokenizer.json: control when special
        1: ("<s>", CONTROL, -1000.0),
        2: ("</s>", USER_DEFINED, -1000.0),  # ... user-defined when not
        13: ("<0x0A>", BYTE, 0.0),
        32000: ("<|endoftext|>", CONTROL, -1000.0),
        32007: ("<|end|>", CONTROL, -1000.0),
        32010: ("<|user|>", CONTROL, -1000.0),
        32011: ("[PAD32011]", UNUSED, -10000.0),  # embedding rows past the tokenizer
        32063: ("[PAD32063]", UNUSED, -10000.0),
    }
    assert scores[tokens.index("▁▁")] == scores[tokens.index("▁▁▁▁")] == -1e9  # SentencePiece's hand-added runs
    assert types[3:259] == [BYTE] * 256
    assert -1e9 < scores[tokens.index("▁Hello")] < scores[tokens.index("▁t")] == 0  # ("▁", "t") is the first merge
    lists = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    assert {key: value for key, value in phi3_meta.items() if key not in lists} == {
        **PHI3_GENERAL,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 32000,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 32000,
        "tokenizer.ggml.add_bos_token": False,  # tokenizer_config.json's, over the post-processor's <s>
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": json.loads((phi3_tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"],
    }


def special_vocab_metadata(folder: Path, vocab_size: int, load_merges: bool = False) -> dict:
    """What gguf.SpecialVocab (the converter's own code) writes for a folder: special ids, add_bos/add_eos, chat
    template, and for byte-level vocabularies the merges. add_sep_token is left out: it is always false for these
    tokenizers, which is also what its absence means to llama.cpp."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(None, "phi3")
    gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    written = {key: value.value for key, value in writer.kv_data[0].items()}
    assert written.pop("tokenizer.ggml.add_sep_token", False) is False
    return {key: value for key, value in written.items() if key.startswith("tokenizer.")}


def written_by_special_vocab(metadata: dict) -> dict:
    """The keys of vocab_metadata's answer that SpecialVocab writes."""
    own = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
           "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix")
    return {key: value for key, value in metadata.items() if key.startswith("tokenizer.") and key not in own}


def test_phi3_special_keys_are_special_vocabs(phi3_meta, phi3_tokenizer_dir):
    assert written_by_special_vocab(phi3_meta) == special_vocab_metadata(phi3_tokenizer_dir, PHI3_VOCAB_SIZE)


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


# The GGUF value type of each key as llama.cpp's converter writes it (GGUFWriter.add_token_list, add_token_scores,
# add_token_types, add_token_merges, add_bos_token_id, add_add_bos_token, add_chat_template, ...).
CONVERTER_TYPES = {
    "tokenizer.ggml.model": ["STRING"],
    "tokenizer.ggml.pre": ["STRING"],
    "tokenizer.ggml.tokens": ["ARRAY", "STRING"],
    "tokenizer.ggml.scores": ["ARRAY", "FLOAT32"],
    "tokenizer.ggml.token_type": ["ARRAY", "INT32"],
    "tokenizer.ggml.merges": ["ARRAY", "STRING"],
    **{f"tokenizer.ggml.{name}_token_id": ["UINT32"] for name in ("bos", "eos", "unknown", "padding")},
    **{f"tokenizer.ggml.add_{name}": ["BOOL"] for name in ("bos_token", "eos_token", "space_prefix")},
    "tokenizer.chat_template": ["STRING"],
    "tokenizer.chat_templates": ["ARRAY", "STRING"],
}


def write_gguf(path: Path, metadata: dict) -> None:
    """A vocabulary-only GGUF (as the converter's --vocab-only writes), each value stored as phinano's GGUF writer
    stores it (gguf_write._add_value)."""
    gguf = pytest.importorskip("gguf")
    from phinano.formats.gguf_write import _add_value

    writer = gguf.GGUFWriter(str(path), metadata["general.architecture"])  # writes general.architecture
    writer.add_name(metadata["general.name"])
    for key, value in metadata.items():
        if not key.startswith("general."):
            _add_value(writer, key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def read_gguf_metadata(path: Path) -> dict:
    """{key: plain Python value} for every metadata key, as phinano's GGUF reader hands them to tokenizer_parts."""
    pytest.importorskip("gguf")
    from phinano.formats.gguf import read_gguf

    return read_gguf(path).metadata


def value_types(path: Path) -> dict:
    """{key: its GGUF value type, e.g. ["ARRAY", "INT32"]} for the tokenizer keys of a file."""
    gguf = pytest.importorskip("gguf")
    fields = gguf.GGUFReader(str(path)).fields
    return {name: [t.name for t in field.types] for name, field in fields.items() if name.startswith("tokenizer.")}


def converter_types(metadata: dict) -> dict:
    """The converter's value type of each tokenizer key in `metadata` (None for a key it does not write)."""
    named_template = ["STRING"]  # tokenizer.chat_template.<name>
    return {
        key: CONVERTER_TYPES.get(key, named_template if key.startswith("tokenizer.chat_template.") else None)
        for key in metadata
        if key.startswith("tokenizer.")
    }


@pytest.fixture(scope="module")
def phi3_gguf_file(phi3_meta, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "phi3-vocab.gguf"
    write_gguf(path, phi3_meta)
    return path


def test_phi3_gguf_file_round_trip(phi3_meta, hf_phi3, phi3_gguf_file):
    metadata = read_gguf_metadata(phi3_gguf_file)
    assert metadata == phi3_meta  # every value type survives (scores are whole numbers or -1e9: exact in float32)
    assert value_types(phi3_gguf_file) == converter_types(phi3_meta)
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


BYTE_LEVEL_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_level_folder(backend, folder: Path) -> Path:
    """A Hugging Face tokenizer folder for `backend` with Phi-4-mini's tokenizer_config.json settings: bos = eos =
    pad = unk = <|endoftext|>, add_bos_token and add_eos_token false, GPT2Tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        **dict.fromkeys(("bos_token", "eos_token", "pad_token", "unk_token"), "<|endoftext|>"),
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": BYTE_LEVEL_CHAT,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def byte_level_size(folder: Path, padding: int = 5) -> int:
    """The embedding rows of a model on that tokenizer: every token, and `padding` rows no token uses."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])]) + 1 + padding


def byte_level_metadata(folder: Path, architecture: str) -> dict:
    """The GGUF metadata of a model on that tokenizer (vocab_metadata, plus what the GGUF writer adds)."""
    general = {"general.architecture": architecture, "general.name": "Tiny Byte Level"}
    return {**general, **vocab_metadata(folder, byte_level_size(folder))}


class Style(NamedTuple):
    original: object  # the `tokenizers` object the folder was saved from
    tokenizer: Tokenizer  # rebuilt from the folder's GGUF metadata
    folder: Path


@pytest.fixture(scope="module")
def phi4_style(tmp_path_factory):
    """o200k split, architecture phi3 (so Phi-4-mini's rstrip rule applies)."""
    original = train_byte_level(O200K_SPLIT, rstrip=True)
    folder = byte_level_folder(original, tmp_path_factory.mktemp("phi4-style"))
    return Style(original, build(byte_level_metadata(folder, "phi3")), folder)


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    original = train_byte_level(None, rstrip=False)
    folder = byte_level_folder(original, tmp_path_factory.mktemp("gpt2-style"))
    return Style(original, build(byte_level_metadata(folder, "gpt2")), folder)


BYTE_LEVEL_TEXTS = CORPUS + HARD_TEXTS + [
    "<|user|>  Hi there<|end|><|assistant|>\n\nSure<|end|>",
    "<|im_start|>system\nYou are<|im_end|>",
    "<think>  reasoning </think> answer",
    "WE'LL SEE what THEY'VE DONE's 1234567 apples/oranges\n\n\n  x",
]


@pytest.mark.parametrize("style", ["phi4_style", "gpt2_style"])
def test_byte_level_encode_decode_match_original(style, request):
    original, tokenizer, _ = request.getfixturevalue(style)
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
    original, tokenizer, _ = request.getfixturevalue(style)
    text = "".join(pieces)
    assert tokenizer.encode(text) == original.encode(text).ids
    assert words(tokenizer.backend, text) == words(original, text)


def test_byte_level_parts(phi4_style):
    original, tokenizer, folder = phi4_style
    parts = tokenizer_parts(byte_level_metadata(folder, "phi3"))
    end, stop = original.token_to_id("<|endoftext|>"), original.token_to_id("<|end|>")
    assert parts.stop_ids == tuple(sorted((end, stop)))  # Phi-4-mini: [200020, 199999]
    assert parts.special_tokens == dict.fromkeys(("bos_token", "eos_token", "unk_token", "pad_token"), "<|endoftext|>")
    assert parts.byte_fallback is False
    assert tokenizer.vocab_size == original.get_vocab_size(with_added_tokens=True)  # the [PADn] rows are no tokens
    assert tokenizer.token_to_id("<think>") not in tokenizer.special_ids
    assert tokenizer.token_to_id("<|im_start|>") in tokenizer.special_ids
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|user|>Hi<|end|><|assistant|>"


def test_byte_level_rstrip_only_for_phi4_mini(phi4_style):
    """Architecture phi3 with a byte-level vocabulary is Phi-4-mini: its role markers swallow whitespace."""
    _, tokenizer, folder = phi4_style
    other = build(byte_level_metadata(folder, "qwen2"))
    text = "<|user|>  Hi"
    assert tokenizer.encode(text) == tokenizer.encode("<|user|>Hi")
    assert other.encode(text) != other.encode("<|user|>Hi")
    assert other.encode("<|endoftext|>  x") == tokenizer.encode("<|endoftext|>  x")  # never stripped


def test_byte_level_gguf_file_round_trip(phi4_style, tmp_path):
    original, _, folder = phi4_style
    metadata = byte_level_metadata(folder, "phi3")
    path = tmp_path / "tiny-vocab.gguf"
    write_gguf(path, metadata)
    assert read_gguf_metadata(path) == metadata
    assert value_types(path) == converter_types(metadata)
    tokenizer = build(read_gguf_metadata(path))
    for text in BYTE_LEVEL_TEXTS:
        assert tokenizer.encode(text) == original.encode(text).ids


@pytest.mark.parametrize("style", ["phi4_style", "gpt2_style"])
def test_byte_level_metadata_is_the_converters(style, request):
    """Tokens and types as _set_vocab_gpt2 (get_vocab_base) makes them from Transformers' tokenizer of the folder;
    ids, flags, chat template and merges as gguf.SpecialVocab(load_merges=True) writes them."""
    transformers = pytest.importorskip("transformers")
    folder = request.getfixturevalue(style).folder
    size = byte_level_size(folder)
    metadata = vocab_metadata(folder, size)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    by_id, added = {i: token for token, i in hf.vocab.items()}, hf.get_added_vocab()
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif by_id[i] in added:
            control = hf.added_tokens_decoder[i].special or (by_id[i].startswith("<|") and by_id[i].endswith("|>"))
            tokens.append(by_id[i] if control else by_id[i].replace("▁", " "))
            types.append(CONTROL if control else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    assert metadata["tokenizer.ggml.tokens"] == tokens
    assert metadata["tokenizer.ggml.token_type"] == types
    assert USER_DEFINED in types and UNUSED in types  # <think>, and the padding rows
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == {"phi4_style": "gpt-4o", "gpt2_style": "gpt-2"}[style]
    assert "tokenizer.ggml.scores" not in metadata
    assert written_by_special_vocab(metadata) == special_vocab_metadata(folder, size, load_merges=True)


# ---------------------------------------------------------------------------------------------------------------
# vocab_metadata on other folders: the shipped nano models, other SentencePiece pipelines, chat template files,
# folders it cannot write
# ---------------------------------------------------------------------------------------------------------------

NANO_ARCHITECTURES = {"nano-phi3": "phi3", "nano-phimoe": "phimoe"}


class Nano(NamedTuple):
    folder: Path
    metadata: dict  # as a GGUF file of the model holds it
    gguf: Tokenizer  # rebuilt from the metadata
    hf: Tokenizer  # phinano's tokenizer.json tokenizer of the folder


@pytest.fixture(scope="module", params=list(NANO_ARCHITECTURES))
def nano(request):
    folder = nano_path(request.param)
    if folder is None:
        pytest.skip(f"the {request.param} files are not installed")
    size = json.loads((folder / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    general = {"general.architecture": NANO_ARCHITECTURES[request.param], "general.name": request.param}
    metadata = {**general, **vocab_metadata(folder, size)}
    return Nano(folder, metadata, build(metadata), load_tokenizer(folder))


def test_nano_tokenizers_round_trip(nano):
    """The nano models' tokenizers are BPE trained with `tokenizers` (merges in training order, runs of ▁ among
    the first merges) in the SentencePiece pipeline: written and rebuilt, they tokenize as their tokenizer.json."""
    assert written_by_special_vocab(nano.metadata) == special_vocab_metadata(nano.folder, 4160)
    assert nano.metadata["tokenizer.ggml.add_bos_token"] is True  # their tokenizer_config.json says so
    tokens, scores = nano.metadata["tokenizer.ggml.tokens"], nano.metadata["tokenizer.ggml.scores"]
    assert len(tokens) == 4160 and tokens[4107] == "[PAD4107]"
    assert scores[tokens.index("▁▁")] == 0  # ("▁", "▁") is their first merge: no -1e9 here
    for text in HARD_TEXTS:
        ids = nano.hf.encode(text)
        assert nano.gguf.encode(text) == ids, text  # with <s>: add_bos_token is true in both
        assert nano.gguf.decode(ids) == nano.hf.decode(ids)
        assert nano.gguf.decode(ids, skip_special_tokens=True) == nano.hf.decode(ids, skip_special_tokens=True)
    for messages in PHI3_CHATS:
        rendered = nano.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert nano.gguf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered
        assert nano.gguf.apply_chat_template(messages) == nano.hf.apply_chat_template(messages)
    generation = json.loads((nano.folder / "generation_config.json").read_text(encoding="utf-8"))
    assert list(tokenizer_parts(nano.metadata).stop_ids) == sorted(generation["eos_token_id"])


NANO_PIECES = list(" \t\n\r1'aZé中🦙▁_()") + ["def ", "self", "the", "ing", "    "]  # code, which they were trained on


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(
        st.one_of(
            st.lists(st.sampled_from(NANO_PIECES), max_size=8).map("".join),
            st.text(max_size=8),
            st.sampled_from(["<|user|>", "<|end|>", "<|assistant|>", "<s>", "</s>", "<|endoftext|>", "<unk>"]),
        ),
        max_size=8,
    )
)
def test_nano_encode_matches_tokenizer_json_on_any_text(nano, pieces):
    text = "".join(pieces)
    assert nano.gguf.encode(text) == nano.hf.encode(text)


def copy_tokenizer(source: Path, folder: Path, edit=None) -> Path:
    """tokenizer.json and tokenizer_config.json of `source` in `folder`, after edit(spec, config) if given."""
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    if edit is not None:
        edit(spec, config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


REPLACE_SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
UNDO_SPACES = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
]}


def metaspace(scheme: str) -> dict:
    return {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}


NO_PREFIX_PIPELINES = {  # name: (normalizer, pre_tokenizer) of a SentencePiece-style tokenizer.json
    "replace only": (REPLACE_SPACES, None),
    "metaspace never": (None, metaspace("never")),
}


@pytest.mark.parametrize("pipeline", list(NO_PREFIX_PIPELINES))
def test_sentencepiece_without_space_prefix(pipeline, tmp_path):
    """Both ways tokenizer.json spells "spaces are ▁, and no ▁ before the text" become add_space_prefix false (Phi-3's
    Prepend + Replace is the prefix, tested above), and the rebuilt tokenizer encodes and decodes as tokenizer.json."""

    def edit(spec, config):
        spec["normalizer"], spec["pre_tokenizer"] = NO_PREFIX_PIPELINES[pipeline]
        spec["decoder"] = UNDO_SPACES  # no prefix was added, so none is stripped

    folder = copy_tokenizer(nano_path("nano-phi3"), tmp_path / "variant", edit)
    metadata = vocab_metadata(folder, 4160)
    assert metadata["tokenizer.ggml.add_space_prefix"] is False
    gguf, hf = build({"general.architecture": "phi3", **metadata}), load_tokenizer(folder)
    for text in HARD_TEXTS:
        ids = hf.encode(text)
        assert gguf.encode(text) == ids, text
        assert gguf.decode(ids) == hf.decode(ids), text


def test_sentencepiece_own_pieces_that_are_not_added_tokens(tmp_path):
    """<unk>, <s>, </s> only in the vocabulary (not added tokens of tokenizer.json, which would override them) are
    typed as SentencePiece's tokenizer.model types them for the converter: unknown, control, control, score 0."""
    folder = copy_tokenizer(nano_path("nano-phi3"), tmp_path / "own", lambda spec, config: spec.update(
        added_tokens=[token for token in spec["added_tokens"] if token["id"] > 2]))
    metadata = vocab_metadata(folder, 4160)
    rows = [(metadata["tokenizer.ggml.tokens"][i], metadata["tokenizer.ggml.token_type"][i],
             metadata["tokenizer.ggml.scores"][i]) for i in range(3)]
    assert rows == [("<unk>", UNKNOWN, 0.0), ("<s>", CONTROL, 0.0), ("</s>", CONTROL, 0.0)]


def test_chat_template_files(tmp_path):
    """chat_template.jinja and additional_chat_templates/*.jinja beat tokenizer_config.json's template, as in
    phinano's tokenizer.json reader; named templates become tokenizer.chat_template.<name> (GGUF spells names with
    letters, digits and _) and are listed in tokenizer.chat_templates."""
    folder = copy_tokenizer(nano_path("nano-phi3"), tmp_path / "templates")
    (folder / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}", encoding="utf-8")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool-use.jinja").write_text("T", encoding="utf-8")
    metadata = vocab_metadata(folder, 4160)
    assert metadata["tokenizer.chat_template"] == "J{{ messages[0]['content'] }}"
    assert metadata["tokenizer.chat_templates"] == ["tool_use"]
    assert metadata["tokenizer.chat_template.tool_use"] == "T"
    assert tokenizer_parts(metadata).chat_templates == {"default": "J{{ messages[0]['content'] }}", "tool_use": "T"}
    assert load_tokenizer(folder).chat_templates["default"] == metadata["tokenizer.chat_template"]

    listed = [{"name": "default", "template": "A"}, {"name": "rag", "template": "B"}]
    folder = copy_tokenizer(nano_path("nano-phi3"), tmp_path / "listed", lambda spec, config: config.update(
        chat_template=listed))
    assert {k: v for k, v in vocab_metadata(folder, 4160).items() if "chat_template" in k} == {
        "tokenizer.chat_template": "A", "tokenizer.chat_templates": ["rag"], "tokenizer.chat_template.rag": "B"}
    folder = copy_tokenizer(nano_path("nano-phi3"), tmp_path / "none", lambda spec, config: config.pop("chat_template"))
    assert not any("chat_template" in key for key in vocab_metadata(folder, 4160))


def test_folder_without_a_tokenizer_gives_no_metadata(tmp_path):
    """No tokenizer files at all: {}. `phinano quantize` then writes a GGUF file with no vocabulary, which phinano
    loads without a tokenizer."""
    import phinano
    from phinano.cli import main

    folder = tmp_path / "weights-only"
    folder.mkdir()
    assert vocab_metadata(folder, 4160) == {}
    for name in ("config.json", "model.safetensors"):
        shutil.copy(nano_path("nano-phi3") / name, folder / name)
    assert vocab_metadata(folder, 4160) == {}
    assert main(["quantize", "--model", str(folder), "--type", "f16", "--out", str(tmp_path / "out.gguf")]) == 0
    model = phinano.load(tmp_path / "out.gguf")
    assert model.tokenizer is None and model.stop_token_ids == ()  # the eos id is a tokenizer key too


def byte_level_pipeline(spec, config):
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\w+|\\W"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


BAD_FOLDERS = {  # name: (edit(spec, config), message)
    "unigram model": (
        lambda spec, config: spec.update(model={"type": "Unigram", "vocab": [["<unk>", 0.0]]}),
        "tokenizer.json: a Unigram model; phinano writes BPE vocabularies",
    ),
    "word suffixes": (
        lambda spec, config: spec["model"].update(end_of_word_suffix="</w>"),
        "tokenizer.json: BPE with word prefixes or suffixes cannot be written",
    ),
    "merge not a pair": (
        lambda spec, config: spec["model"]["merges"].__setitem__(3, ["▁"]),
        r"tokenizer.json: not a tokenizer.json the tokenizers library reads \(",
    ),
    "prefix only at the start": (  # none after an added token
        lambda spec, config: spec.update(normalizer=None, pre_tokenizer=metaspace("first")),
        "tokenizer.json: the normalizer and pre-tokenizer are neither SentencePiece-style",
    ),
    "prefix unless a space": (  # Metaspace's "always" adds none to " Hi"; llama.cpp's add_space_prefix does
        lambda spec, config: spec.update(normalizer=None, pre_tokenizer=metaspace("always")),
        "tokenizer.json: the normalizer and pre-tokenizer are neither SentencePiece-style",
    ),
    "lowercasing": (
        lambda spec, config: spec["normalizer"]["normalizers"].insert(0, {"type": "Lowercase"}),
        "tokenizer.json: the normalizer and pre-tokenizer are neither SentencePiece-style",
    ),
    "byte-level with another split": (
        byte_level_pipeline,
        "tokenizer.json: a byte-level pre-tokenizer with no llama.cpp name phinano knows",
    ),
    "added token without content": (
        lambda spec, config: spec["added_tokens"].append({"id": 4107}),
        r"tokenizer.json: not a tokenizer.json the tokenizers library reads \(",
    ),
    "chat template not a string": (
        lambda spec, config: config.update(chat_template=[{"name": "default", "template": 7}]),
        "tokenizer_config.json: chat_template should be a string or named strings",
    ),
    "bos not a token": (
        lambda spec, config: config.update(bos_token="<bos>"),
        "tokenizer_config.json: bos_token '<bos>' is not a token of tokenizer.json",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folder_is_one_clear_error(case, tmp_path):
    edit, message = BAD_FOLDERS[case]
    folder = copy_tokenizer(nano_path("nano-phi3"), tmp_path / "bad", edit)
    with pytest.raises(PhinanoError, match=message) as error:
        vocab_metadata(folder, 4160)
    assert str(error.value).startswith(str(folder)) and "\n" not in str(error.value)


def test_bad_folder_files(tmp_path):
    folder = copy_tokenizer(nano_path("nano-phi3"), tmp_path / "small")
    with pytest.raises(PhinanoError, match="token '<|endoftext|>' has id 4096, outside the model's 4100 embedding"):
        vocab_metadata(folder, 4100)
    (folder / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(PhinanoError, match="tokenizer.json: not a tokenizer.json the tokenizers library reads"):
        vocab_metadata(folder, 4160)
    (folder / "tokenizer.json").write_bytes(b"\xff")
    with pytest.raises(PhinanoError, match="tokenizer.json: not a tokenizer.json the tokenizers library reads"):
        vocab_metadata(folder, 4160)
    copy_tokenizer(nano_path("nano-phi3"), folder)
    (folder / "tokenizer_config.json").write_text("[]", encoding="utf-8")
    with pytest.raises(PhinanoError, match="tokenizer_config.json should hold a JSON object"):
        vocab_metadata(folder, 4160)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(PhinanoError, match=r"tokenizer.json is missing \(the folder has tokenizer_config.json\)"):
        vocab_metadata(folder, 4160)


def test_quantize_with_a_bad_tokenizer_writes_nothing(tmp_path, capsys):
    """`phinano quantize` checks the tokenizer before the weights: one line naming the file, no GGUF file."""
    from phinano.cli import main

    source = nano_path("nano-phi3")
    folder = copy_tokenizer(source, tmp_path / "model", BAD_FOLDERS["unigram model"][0])
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, folder / name)
    out = tmp_path / "out.gguf"
    assert main(["quantize", "--model", str(folder), "--type", "f16", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tokenizer.json: a Unigram model" in error
    assert list(tmp_path.glob("out.gguf*")) == []


def test_quantize_to_a_place_it_cannot_write_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """An --out in a folder that does not exist was found only after every tensor was rounded, and then as a
    FileNotFoundError traceback; a file that cannot be created is one line, with nothing left behind."""
    from phinano import quantize
    from phinano.cli import main

    rounded = []
    monkeypatch.setattr(quantize, "write_quantized", lambda *a, **k: rounded.append(a))
    for out, words in ((tmp_path / "no" / "such" / "x.gguf", "the folder"), (tmp_path, "must name a .gguf file")):
        assert main(["quantize", "--model", "nano-phi3", "--type", "q8_0", "--out", str(out)]) == 2
        assert words in capsys.readouterr().err and rounded == []
    monkeypatch.undo()
    (tmp_path / "taken.gguf").mkdir()  # the name is a folder: creating the file fails
    out = tmp_path / "taken.gguf" / ".." / "taken.gguf"
    assert main(["quantize", "--model", "nano-phi3", "--type", "q8_0", "--out", str(out)]) == 2
    assert "must name a .gguf file" in capsys.readouterr().err
    from phinano.formats.gguf_write import write_gguf

    with pytest.raises(PhinanoError, match="cannot write the GGUF file"):
        write_gguf("/proc/phinano-test.gguf", phinano.load("nano-phi3", tokenizer=False).config, {}, lambda n, a: "F32")
    assert not list(tmp_path.glob("*.partial"))


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
