"""Tests for phinano.tokenizer.

Two tokenizers are used:
- the real Phi-3 tokenizer (conftest.find_phi3_tokenizer: ../shared/phi3-tokenizer beside the checkout, else
  microsoft/Phi-3-mini-4k-instruct's files from the Hugging Face cache or the Hub; skipped, saying why, when
  none can be had): parity with Transformers' AutoTokenizer, chat templates, streaming, and llama.cpp's
  reference tokenizations (those only come with ../shared);
- a tiny byte-fallback BPE trained here with the `tokenizers` library, with Phi-3-like added tokens, so the
  module is exercised everywhere.
Transformers is only a test oracle; those tests skip when it is not installed.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PHI3_REFERENCE
from phinano.errors import PhinanoError
from phinano.tokenizer import load_tokenizer

# Mixed-script text for round trips: umlauts, CJK, RTL, Devanagari, emoji (ZWJ family, flag, skin tone),
# indented code, runs of spaces, blank lines, a leading space and a tab.
MIXED_TEXTS = [
    "Hello, world! The quick brown fox.",
    "Grüße aus München: Äpfel, Öl und Übermut — ß.",
    "我爱自然语言处理。今天天气很好！",
    "日本語のテキスト、カタカナとひらがな。",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Family 👨‍👩‍👧‍👦, flags 🇩🇪🇯🇵, thumbs 👍🏽, star ⭐ and 🤖",
    "def f(x):\n    if x:\n        return  x  *  2\n\treturn None\n",
    "multiple     spaces\n\n\nand newlines  \n end",
    " leading space and trailing  ",
    "mixed: Grüße 你好 مرحبا नमस्ते 🎉\n",
]

PHI3_CHATS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system_user_assistant_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And  times three?\nExplain 🙂"},
    ],
}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phi3(phi3_tokenizer_dir):
    return load_tokenizer(phi3_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_phi3(phi3_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))


def hf_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_chat_ids(hf, messages, add_generation_prompt):
    """Transformers 5 returns a BatchEncoding (dict) from apply_chat_template(tokenize=True)."""
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def phi3_variant(source, tmp_path, rstrip=None, **config_overrides):
    """A copy of the Phi-3 tokenizer in `source` into tmp_path, with the chat markers' rstrip flag and config
    changed."""
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    if rstrip is not None:
        for token in spec["added_tokens"]:
            if 32001 <= token["id"] <= 32010:
                token["rstrip"] = rstrip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(config_overrides)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


TINY_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_tiny_tokenizer(folder: Path, chat_template=TINY_TEMPLATE) -> Path:
    """Train a tiny Llama-style byte-fallback BPE (the same pipeline as Phi-3's tokenizer.json) into `folder`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False
    )
    sentences = [
        "Hello world, this is a tiny tokenizer.",
        "The quick brown fox jumps over the lazy dog.",
        "Hello again: tokens, merges and bytes!",
        "def main():\n    return 42\n",
    ]
    backend.train_from_iterator(sentences * 5, trainer)

    # Make it look like Phi-3's file: byte pieces are ordinary vocabulary (not added tokens), the normalizer adds
    # the dummy prefix, no pre-tokenizer, SentencePiece decoder chain, <s> prepended.
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] in ("<unk>", "<s>", "</s>")]
    spec["model"]["unk_token"] = None
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.pre_tokenizer = None
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens(
        [AddedToken("<|endoftext|>", special=True, normalized=False)]
        + [
            AddedToken(marker, special=True, normalized=False, rstrip=True)
            for marker in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))

    config = {
        "add_bos_token": False,
        # AddedToken-style dict, as Transformers 4 saved it
        "bos_token": {"__type": "AddedToken", "content": "<s>", "rstrip": False, "normalized": False, "special": True},
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny") / "tok")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_tokenizer(tiny_dir)


def stream_all(tokenizer, ids, skip_special_tokens=False):
    decoder = tokenizer.stream(skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


def assert_stream_lossless(tokenizer, ids, skip_special_tokens):
    pieces = stream_all(tokenizer, ids, skip_special_tokens)
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == full
    emitted = ""
    for piece in pieces:
        emitted += piece
        # Every piece is final: what was printed so far is the start of the full text, so no space was lost and
        # no U+FFFD was printed for bytes that later completed a character.
        assert full.startswith(emitted)
        if "\ufffd" in piece:
            assert "\ufffd" in full


# ---------------------------------------------------------------------------------------------------------------
# Where the real Phi-3 tokenizer comes from
# ---------------------------------------------------------------------------------------------------------------


def test_phi3_tokenizer_from_the_hugging_face_cache(tmp_path):
    """Without ../shared, the released files in the Hugging Face cache are used; else a skip says why."""
    from conftest import PHI3_FILES, find_phi3_tokenizer

    nowhere = tmp_path / "no-shared"
    folder, why = find_phi3_tokenizer(nowhere, str(tmp_path / "cache"), offline=True)
    assert folder is None and why == (f"no {nowhere}, microsoft/Phi-3-mini-4k-instruct not in the Hugging Face "
                                      "cache, and HF_HUB_OFFLINE is set")
    snapshot = tmp_path / "cache" / "models--microsoft--Phi-3-mini-4k-instruct" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for name in PHI3_FILES:
        (snapshot / name).write_text("{}")
    assert find_phi3_tokenizer(nowhere, str(tmp_path / "cache"), offline=True) == (snapshot, "")


def test_skips_say_why_under_q(tmp_path):
    """A test session without the tokenizer prints each skip's reason, also under -q."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PHINANO_SHARED_DIR": str(tmp_path / "none"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_tokenizer.py::test_vocabulary"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert "1 skipped" in run.stdout, run.stdout
    assert "SKIPPED [1] tests/test_tokenizer.py" in run.stdout
    assert "needs the real Phi-3 tokenizer: no " in run.stdout and "HF_HUB_OFFLINE is set" in run.stdout


# ---------------------------------------------------------------------------------------------------------------
# Real Phi-3 tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_llama_cpp_reference_cases(phi3):
    reference = PHI3_REFERENCE  # in ../shared only, not on the Hub
    if not (reference / "cases.txt").is_file():
        pytest.skip(f"needs llama.cpp's reference tokenizations in {reference}")
    cases = (reference / "cases.txt").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (reference / "expected-ids.txt").read_text(encoding="utf-8").split("\n")
    assert len(cases) == len(expected) == 47
    for text, line in zip(cases, expected):
        assert phi3.encode(text, add_special_tokens=False) == [int(i) for i in line.split()], repr(text)


def test_vocabulary(phi3):
    assert phi3.vocab_size == 32011
    assert (phi3.bos_token_id, phi3.eos_token_id, phi3.pad_token_id) == (1, 32000, 32000)
    assert phi3.token_to_id("<|end|>") == 32007
    assert phi3.token_to_id("▁") == 29871
    assert phi3.id_to_token(13) == "<0x0A>"
    assert phi3.id_to_token(15043) == "▁Hello"
    assert phi3.token_to_id("no such piece") is None
    assert phi3.special_ids == {0, 1, *range(32000, 32011)}  # </s> (2) is not special in this tokenizer
    assert phi3.byte_ids == set(range(3, 259))


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_decode_match_transformers(phi3, hf_phi3, add_special_tokens):
    texts = MIXED_TEXTS + [
        "",
        "<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n<|endoftext|>",
        "<s>text</s>\n after </s>",
        "<|system|>  spaced <|placeholder1|>x",
    ]
    for text in texts:
        ids = phi3.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf_phi3.encode(text, add_special_tokens=add_special_tokens), repr(text)
        for skip in (False, True):
            assert phi3.decode(ids, skip_special_tokens=skip) == hf_phi3.decode(ids, skip_special_tokens=skip)


def test_encode_adds_bos_from_tokenizer_json(phi3):
    # tokenizer_config.json says add_bos_token: false, but Transformers 5 ignores it when tokenizer.json exists
    # and keeps the file's post-processor, which prepends <s>.
    assert phi3.encode("Hello world") == [1, 15043, 3186]
    assert phi3.encode("Hello world", add_special_tokens=False) == [15043, 3186]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", sorted(PHI3_CHATS))
def test_chat_template_matches_transformers(phi3, hf_phi3, chat, add_generation_prompt):
    messages = PHI3_CHATS[chat]
    text = phi3.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == hf_phi3.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = phi3.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_chat_ids(hf_phi3, messages, add_generation_prompt)


def test_released_rstrip_flags_swallow_newlines(phi3):
    # The released flags: rstrip on <|user|>, <|end|>, <|assistant|> eats the "\n" the template writes after
    # them, so "Hello" is encoded as a segment start (▁Hello = 15043).
    text = phi3.apply_chat_template(PHI3_CHATS["user"], tokenize=False)
    bos = [1] if text.startswith("<s>") else []  # the first release's template writes <s>; later ones do not
    assert text == "<s>" * len(bos) + "<|user|>\nHello<|end|>\n<|assistant|>\n"
    assert phi3.apply_chat_template(PHI3_CHATS["user"]) == bos + [32010, 15043, 32007, 32001]


def test_april_template_without_rstrip(phi3_tokenizer_dir, tmp_path):
    # Without rstrip, each segment after an added token starts with the dummy prefix ▁ (29871): "\n" → 29871, 13.
    folder = phi3_variant(phi3_tokenizer_dir, tmp_path, rstrip=False)
    tokenizer = load_tokenizer(folder)
    expected = [32010, 29871, 13, 10994, 32007, 29871, 13, 32001, 29871, 13]
    bos = [1] if tokenizer.apply_chat_template(PHI3_CHATS["user"], tokenize=False).startswith("<s>") else []
    assert tokenizer.apply_chat_template(PHI3_CHATS["user"]) == bos + expected
    hf = hf_tokenizer(folder)
    for chat in PHI3_CHATS.values():
        for add_generation_prompt in (True, False):
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
            assert ids == hf_chat_ids(hf, chat, add_generation_prompt)
    ids = tokenizer.encode("<|user|>\nHi<|end|>\n")
    assert tokenizer.decode(ids) == hf.decode(ids) == "<s><|user|> \nHi<|end|> \n"  # the ▁ shows as a space


def test_named_special_token_becomes_special(phi3_tokenizer_dir, tmp_path):
    # Naming </s> (not special in tokenizer.json) as eos makes Transformers treat it as special: skipped on decode,
    # while its rstrip flag still applies at encode time.
    folder = phi3_variant(phi3_tokenizer_dir, tmp_path, eos_token="</s>")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_token_id == 2 and 2 in tokenizer.special_ids
    ids = tokenizer.encode("<|end|>\nfoo</s>\nbar")
    assert ids == [1, 32007, 7953, 2, 2594]
    hf = hf_tokenizer(folder)
    assert ids == hf.encode("<|end|>\nfoo</s>\nbar")
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "foo bar"


# Byte-fallback ids, the bare ▁ and runs of ▁, newline, special and non-special added tokens, and anything else.
PHI3_INTERESTING_IDS = [29871, 259, 1678, 13, 0, 1, 2, *range(32000, 32011)]
phi3_ids = st.lists(
    st.one_of(
        st.integers(3, 258),
        st.sampled_from(PHI3_INTERESTING_IDS),
        st.integers(0, 32010),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=phi3_ids, skip_special_tokens=st.booleans())
def test_stream_is_lossless_on_random_ids(phi3, ids, skip_special_tokens):
    assert_stream_lossless(phi3, ids, skip_special_tokens)


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_stream_round_trips_mixed_text(phi3, text):
    ids = phi3.encode(text, add_special_tokens=False)
    assert "".join(stream_all(phi3, ids)) == phi3.decode(ids) == text
    assert_stream_lossless(phi3, ids, skip_special_tokens=False)


def test_stream_chat_transcript(phi3):
    # A whole prompt + answer, with specials shown and skipped; the answer has byte-fallback emoji mid-text.
    ids = phi3.apply_chat_template(PHI3_CHATS["system_user_assistant_user"]) + phi3.encode(
        "Sure 👨‍👩‍👧 — 12 × 3 = 36.<|end|>", add_special_tokens=False
    )
    for skip in (False, True):
        assert_stream_lossless(phi3, ids, skip)


def test_stream_waits_for_whole_characters(phi3):
    ids = phi3.encode("a🤖b", add_special_tokens=False)  # ▁a, then the four UTF-8 bytes of 🤖, then b
    decoder = phi3.stream()
    pieces = [decoder.push(i) for i in ids]
    assert pieces[0] == "a"
    assert all(piece == "" for piece in pieces[1:-1])  # nothing while the byte run is open
    assert pieces[-1] == "🤖b"
    assert decoder.flush() == ""


def test_stream_keeps_spaces_after_specials(phi3):
    ids = phi3.encode("Hello<|end|> world", add_special_tokens=False)
    for skip in (False, True):
        pieces = stream_all(phi3, ids, skip)
        assert "".join(pieces) == phi3.decode(ids, skip_special_tokens=skip)
    assert "".join(stream_all(phi3, ids, True)) == "Hello world"


# ---------------------------------------------------------------------------------------------------------------
# Tiny tokenizer (always runs)
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_load_and_vocabulary(tiny):
    assert tiny.bos_token_id == 1  # bos_token given as an AddedToken-style dict
    assert tiny.eos_token_id == tiny.token_to_id("<|endoftext|>")
    assert {tiny.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>")} <= tiny.special_ids
    assert tiny.byte_ids == set(range(3, 259))
    assert tiny.id_to_token(3 + 0x41) == "<0x41>"


def test_tiny_encode_decode(tiny):
    ids = tiny.encode("Hello world")
    assert ids[0] == 1 and tiny.decode(ids) == "<s> Hello world"  # only the very first space is stripped
    assert tiny.decode(ids, skip_special_tokens=True) == "Hello world"
    # Characters never seen in training fall back to one id per UTF-8 byte.
    ids = tiny.encode("Grüße 🤖", add_special_tokens=False)
    assert set(ids) & tiny.byte_ids
    assert tiny.decode(ids) == "Grüße 🤖"
    # Added tokens are matched inside text; rstrip on <|user|> swallows the newline after it.
    ids = tiny.encode("<|user|>\nHello<|end|>", add_special_tokens=False)
    assert ids[0] == tiny.token_to_id("<|user|>") and ids[-1] == tiny.token_to_id("<|end|>")
    assert tiny.decode(ids) == "<|user|> Hello<|end|>"  # the segment's dummy-prefix ▁ decodes to a space
    for text in MIXED_TEXTS:
        assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text


def test_tiny_matches_transformers(tiny, tiny_dir):
    hf = hf_tokenizer(tiny_dir)
    for text in MIXED_TEXTS + ["<|user|>\nHello<|end|>\n<|assistant|>\n"]:
        for add in (True, False):
            ids = tiny.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add)
            assert tiny.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    for add_generation_prompt in (True, False):
        text = tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ids == hf_chat_ids(hf, messages, add_generation_prompt)


def test_tiny_chat_template(tiny):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi", "tool_calls": None}]
    text = tiny.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\nHello<|end|>\n<|assistant|>\nHi<|end|>\n<|assistant|>\n"
    closed = tiny.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert closed.endswith("<|end|>\n<|endoftext|>")
    assert tiny.apply_chat_template(messages) == tiny.encode(text, add_special_tokens=False)
    # Template variables passed by the caller override the tokenizer's.
    assert tiny.apply_chat_template(messages, tokenize=False, bos_token="").startswith("<|user|>")


def test_template_sandbox_features(tiny):
    template = (
        "{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{% generation %}[{{ strftime_now('%Y') | length }}]{% endgeneration %}"
        "{% if messages | length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}"
    )
    one = [{"role": "user", "content": "<é>"}]
    text = tiny.apply_chat_template(one, tokenize=False, chat_template=template)
    assert text == '{"role": "user", "content": "<é>"}[4]'  # tojson does not escape < or é
    with pytest.raises(PhinanoError, match="only one message"):
        tiny.apply_chat_template(one * 2, chat_template=template)
    with pytest.raises(PhinanoError, match="dicts"):
        tiny.apply_chat_template(["Hello"])


def test_chat_template_sources(tmp_path):
    # chat_template.jinja beats the config; the list form [{name, template}] is read; tools pick "tool_use".
    folder = build_tiny_tokenizer(
        tmp_path / "a", chat_template=[{"name": "default", "template": "A"}, {"name": "tool_use", "template": "T"}]
    )
    tokenizer = load_tokenizer(folder)
    assert tokenizer.apply_chat_template([], tokenize=False) == "A"
    assert tokenizer.apply_chat_template([], tokenize=False, tools=[{"name": "f"}]) == "T"
    assert tokenizer.apply_chat_template([], tokenize=False, chat_template="tool_use") == "T"
    (folder / "chat_template.jinja").write_text("J{{ eos_token }}", encoding="utf-8")
    assert load_tokenizer(folder).apply_chat_template([], tokenize=False) == "J<|endoftext|>"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_tiny_stream_is_lossless(tiny, data, skip_special_tokens):
    ids = data.draw(st.lists(st.integers(0, tiny.vocab_size - 1), max_size=40))
    assert_stream_lossless(tiny, ids, skip_special_tokens)


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_tiny_stream_round_trips_mixed_text(tiny, text):
    assert "".join(stream_all(tiny, tiny.encode(text, add_special_tokens=False))) == text


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(PhinanoError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(PhinanoError, match=str(tmp_path / "nowhere")):
        load_tokenizer(tmp_path / "nowhere")


def test_no_chat_template(tmp_path):
    tokenizer = load_tokenizer(build_tiny_tokenizer(tmp_path / "t", chat_template=None))
    with pytest.raises(PhinanoError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    # Without tokenizer_config.json at all: the tokenizer still works, it just has no named tokens.
    (tmp_path / "t" / "tokenizer_config.json").unlink()
    bare = load_tokenizer(tmp_path / "t")
    assert bare.bos_token_id is None and bare.decode(bare.encode("Hello")) == "<s> Hello"


def test_bad_input(tmp_path, tiny):
    with pytest.raises(PhinanoError, match="str"):
        tiny.encode(["not", "text"])
    # found by fuzzing: JSON can carry a lone surrogate ("\\ud800"), and ids may come negative from a caller
    with pytest.raises(PhinanoError, match="lone surrogate U\\+D800 at character 3"):
        tiny.encode("hi \ud800 there")
    with pytest.raises(PhinanoError, match="token ids must be integers from 0"):
        tiny.decode([5, -1])
    with pytest.raises(PhinanoError, match="token ids must be integers from 0"):
        tiny.stream().push(-3)
    (tmp_path / "tokenizer.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(PhinanoError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("key,value,words", [
    ("bos_token", {"text": "<s>"}, ["bos_token", "content"]),  # an AddedToken object without its content
    ("eos_token", 7, ["eos_token", "string"]),  # Transformers refuses a number too
    ("chat_template", [{"name": "default"}], ["chat_template"]),  # an entry without its template
    ("chat_template", [3], ["chat_template"]),
    ("chat_template", 5, ["chat_template"]),
    ("chat_template", {"default": None}, ["chat_template"]),
])
def test_a_damaged_tokenizer_config_is_one_clear_error(tmp_path, tiny_dir, key, value, words):
    """Found by fuzzing tokenizer_config.json: these raised KeyError or TypeError from inside the loader."""
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tiny_dir, folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, key: value}), encoding="utf-8")
    with pytest.raises(PhinanoError) as e:
        load_tokenizer(folder)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
