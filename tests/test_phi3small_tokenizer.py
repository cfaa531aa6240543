"""Phi-3-small's tokenizer against tiktoken's own Encoding.

cl100k_base itself cannot be downloaded here, so the test writes a small vocabulary file in the same format
(`<base64 bytes> <rank>` per line, a few hundred byte-pair merges learned from a paragraph) and builds the
reference the way the released tokenization_phi3_small.py does: tiktoken's loader for the ranks, cl100k_base's
split pattern as tiktoken defines it, and the released special-token table (written out below as the release
writes it). phinano's tokenizer must give the same ids and text.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

tiktoken = pytest.importorskip("tiktoken")

import phinano  # noqa: E402
from phinano import PhinanoError  # noqa: E402
from phinano.config import PHI3SMALL_DUMMY_TOKEN_IDS  # noqa: E402
from phinano.tokenizer_tiktoken import TiktokenTokenizer, load_tiktoken_tokenizer  # noqa: E402

CORPUS = """The quick brown fox jumps over the lazy dog. It's 2024 and we're testing tokenizers: don't they'll
work? Numbers like 123456 and 3.14159 split in threes. Café, naïve, Zürich, 東京, Ελληνικά, emoji 🙂🚀!
    Indented code: def f(x):\n        return x * 2\r\n\ttabs\tand   spaces   everywhere.
<|user|>\nHello there<|end|>\n<|assistant|>\nGeneral Kenobi!<|end|>"""


def released_special_tokens() -> dict[str, int]:
    """tokenization_phi3_small.py's SPECIAL_TOKENS, as the release writes them."""
    dummy = {f"<|dummy_id_{11 + offset}|>": 100276 + offset for offset in range(1, 100352 - 100276)}
    return {
        "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
        "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263,
        "<|dummy_id_0|>": 100264, "<|dummy_id_1|>": 100265, "<|end|>": 100266, "<|dummy_id_2|>": 100256,
        "<|dummy_id_3|>": 100267, "<|dummy_id_4|>": 100268, "<|dummy_id_5|>": 100269, "<|dummy_id_6|>": 100270,
        "<|dummy_id_7|>": 100271, "<|dummy_id_8|>": 100272, "<|dummy_id_9|>": 100273, "<|dummy_id_10|>": 100274,
        "<|dummy_id_11|>": 100275, "<|endofprompt|>": 100276, **dummy,
    }


def write_test_vocab(folder: Path, merges: int = 300) -> Path:
    """A tiktoken-format vocabulary: the 256 bytes, then `merges` byte-pair merges learned from CORPUS."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [list(bytes([b]) for b in w.encode()) for w in CORPUS.replace("\n", " \n").split(" ")]
    words = [[b" "] + w for w in words if w]
    for _ in range(merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    path = Path(folder) / "cl100k_base.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def cl100k_pattern(monkeypatch, ranks) -> str:
    """cl100k_base's split pattern as tiktoken defines it (its constructor run with our ranks, not downloaded)."""
    import tiktoken_ext.openai_public as openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
    return openai_public.cl100k_base()["pat_str"]


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """(phinano's tokenizer, the reference tiktoken Encoding), on the same small vocabulary."""
    from tiktoken.load import load_tiktoken_bpe

    path = write_test_vocab(tmp_path)
    ranks = load_tiktoken_bpe(str(path))
    reference = tiktoken.Encoding(name="phi3small", pat_str=cl100k_pattern(monkeypatch, ranks),
                                  mergeable_ranks=ranks, special_tokens=released_special_tokens())
    return load_tiktoken_tokenizer(tmp_path), reference


TEXTS = [
    "", "Hello world", "The quick brown fox jumps over the lazy dog.", "It's we're they'll don't I'M",
    "1234567 3.14159 0000", "Café naïve Zürich 東京 Ελληνικά 🙂🚀", "  leading\n\ntrailing  \n", "\t\ttabs\r\n",
    "<|user|>\nHi<|end|>\n<|assistant|>\n", "<|endoftext|><|dummy_id_40|><|fim_prefix|>x", "<|notspecial|>",
    CORPUS,
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_tiktoken(pair, text):
    ours, reference = pair
    assert ours.encode(text) == reference.encode(text, allowed_special="all")
    assert ours.encode(text, add_special_tokens=True) == ours.encode(text, add_special_tokens=False)


def test_decode_equals_tiktoken_and_skips_as_released(pair):
    ours, reference = pair
    ids = reference.encode(CORPUS, allowed_special="all")
    assert ours.decode(ids) == reference.decode(ids) == CORPUS
    # skip_special_tokens keeps ids below <|endoftext|> (100257) only, as released
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode([i for i in ids if i < 100257])
    assert "<|end|>" not in ours.decode(ids, skip_special_tokens=True)
    assert ours.decode([ids[0], 999_999, ids[1]]) == reference.decode(ids[:2])  # unknown ids are ignored
    emoji = reference.encode("🙂")  # one character in several byte tokens: a partial one decodes to U+FFFD
    assert len(emoji) > 1 and ours.decode(emoji[:1]) == "\ufffd"


def test_stream_decoding_equals_decode(pair):
    ours, reference = pair
    ids = reference.encode(CORPUS, allowed_special="all")
    stream = ours.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == CORPUS


def test_vocabulary_facts(pair):
    ours, reference = pair
    assert ours.vocab_size == reference.n_vocab == 100352
    assert ours.special == released_special_tokens()
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (100257, 100257, 100257)
    assert ours.token_to_id("<|end|>") == 100266 and ours.id_to_token(100266) == "<|end|>"
    assert ours.token_to_id(" the") == reference.encode_single_token(b" the")
    # the masked logits are exactly the tokens the release calls dummy or unused
    unused = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>"]
    released = sorted([i for t, i in released_special_tokens().items() if "dummy_id" in t]
                      + [released_special_tokens()[t] for t in unused])
    assert list(PHI3SMALL_DUMMY_TOKEN_IDS) == released


def test_chat_template_as_released(pair):
    ours, _ = pair
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    text = ours.apply_chat_template(messages, tokenize=False)
    assert text == "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n"
    ids = ours.apply_chat_template(messages)
    assert ids[:2] == [100257, 100261] and ids[-2:] == [100263, ours.encode("\n")[0]]
    closed = ours.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert closed.endswith("<|end|>\n<|endoftext|>")


def test_a_folder_template_wins(tmp_path):
    write_test_vocab(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert load_tiktoken_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                 tokenize=False) == "hi!"


def test_missing_or_broken_vocabulary_is_one_clear_error(tmp_path):
    with pytest.raises(PhinanoError, match="cl100k_base.tiktoken is missing.*does not download"):
        load_tiktoken_tokenizer(tmp_path)
    (tmp_path / "cl100k_base.tiktoken").write_text("SGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(PhinanoError, match="line 2 is not '<base64 token> <rank>'"):
        load_tiktoken_tokenizer(tmp_path)


def test_loaded_with_the_model(tmp_path):
    """phinano.load finds the vocabulary beside the weights; without it, loading says so (no download)."""
    from test_phi3small import make_phi3small

    folder = make_phi3small(tmp_path / "m")
    with pytest.raises(PhinanoError, match="cl100k_base.tiktoken is missing"):
        phinano.load(folder)
    write_test_vocab(folder)
    model = phinano.load(folder, backend="numpy")
    assert isinstance(model.tokenizer, TiktokenTokenizer)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    new = model.generate(ids, 5, stop_token_ids=[])
    assert len(new) == 5 and not set(new) & set(PHI3SMALL_DUMMY_TOKEN_IDS)
    assert isinstance(model.tokenizer.decode(new), str)
    assert np.isfinite(model.forward(ids)).all()
