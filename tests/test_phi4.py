"""Phi-4 (14B), Phi-4-reasoning(-plus) and Phi-4-mini-reasoning: the released configs read as they are, tiny
checkpoints in the released layout against Transformers, and the GPT-2-style byte-level tokenizer with the
`<|im_start|>role<|im_sep|>...<|im_end|>` chat templates against Transformers' AutoTokenizer.

Tolerance as in test_parity.py: |phinano - Transformers| <= 1e-4 * max|logits|, and 64 greedy tokens identical.
The real vocabularies cannot be fetched here, so the tokenizer is a small byte-level BPE built in the test with
the release's pipeline, special tokens and templates (tests/tiny_models.py, add_phi4_tokenizer).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, pre_tokenizers

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import phinano  # noqa: E402
from phinano.cli import main as cli_main  # noqa: E402
from phinano.config import config_from_dict, load_config  # noqa: E402
from phinano.formats.gguf_vocab import PRE_TOKENIZER_SPLITS, tokenizer_parts, vocab_metadata  # noqa: E402
from phinano.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from phinano.weights import parameter_counts  # noqa: E402
from test_gguf_vocab import read_gguf_metadata, write_gguf  # noqa: E402
from test_parity import LOGIT_RTOL, hf_greedy, hf_logits, layer_report, prompt  # noqa: E402
from tiny_models import (PHI4_CHAT_TEMPLATE, PHI4_REASONING_SYSTEM, PHI4_SPECS, TINY_TEXT,  # noqa: E402
                         add_phi4_tokenizer, hf_reference, make_phi4)

# config.json of microsoft/phi-4 as released (Transformers 4.47 spelling).
PHI4_CONFIG = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "auto_map": {},
    "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 17920, "max_position_embeddings": 16384, "model_type": "phi3",
    "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 10,
    "original_max_position_embeddings": 16384, "pad_token_id": 100257, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 250000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0", "use_cache": True, "vocab_size": 100352,
}
# Phi-4-reasoning and -plus: the same network, 32768 positions, rope_theta 500000, eos <|im_end|>.
PHI4_REASONING_CONFIG = {**PHI4_CONFIG, "max_position_embeddings": 32768, "original_max_position_embeddings": 32768,
                         "rope_theta": 500000, "eos_token_id": 100265, "pad_token_id": 100349}
# Phi-4-mini-reasoning: Phi-4-mini's network (its factor lists shortened to placeholders of the right length).
PHI4_MINI_REASONING_CONFIG = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "bos_token_id": 199999, "eos_token_id": 199999,
    "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 24, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "original_max_position_embeddings": 4096, "pad_token_id": 199999,
    "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0 + i / 8 for i in range(48)]},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 200064,
}


# ------------------------------------------------------------------ the released configs
def test_phi4_config_reads_as_released():
    cfg = config_from_dict(PHI4_CONFIG)
    assert cfg.architecture == "Phi3ForCausalLM" and not cfg.is_moe
    assert cfg.sliding_window is None  # "sliding_window": null is full attention, not Phi-3's 2047
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rotary_dim) == (40, 10, 128, 128)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_attention_factor) == ("default", 250000.0, 1.0)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (100352, 16384, False)
    assert cfg.eos_token_id == (100257,) and cfg.dtype == "bfloat16"
    total, active = parameter_counts(cfg)
    assert total == active and round(total / 1e9, 2) == 14.66  # "14B": 14.66 billion weights


def test_phi4_reasoning_and_mini_reasoning_configs_read_as_released():
    cfg = config_from_dict(PHI4_REASONING_CONFIG)
    assert (cfg.sliding_window, cfg.rope_theta, cfg.max_position_embeddings) == (None, 500000.0, 32768)
    assert cfg.eos_token_id == (100265,) and cfg.pad_token_id == 100349
    assert parameter_counts(cfg) == parameter_counts(config_from_dict(PHI4_CONFIG))

    mini = config_from_dict(PHI4_MINI_REASONING_CONFIG)
    assert (mini.num_attention_heads, mini.num_key_value_heads, mini.head_dim, mini.rotary_dim) == (24, 8, 128, 96)
    assert (mini.rope_type, mini.original_max_position_embeddings, mini.sliding_window) == ("longrope", 4096, 262144)
    assert mini.tie_word_embeddings and mini.vocab_size == 200064
    assert round(parameter_counts(mini)[0] / 1e9, 2) == 3.84  # Phi-4-mini's 3.8B


@pytest.mark.parametrize("value", [0, -1, "none", 2.5])
def test_a_bad_sliding_window_is_still_refused(value):
    with pytest.raises(phinano.PhinanoError, match="'sliding_window' must be a positive integer"):
        config_from_dict({**PHI4_CONFIG, "sliding_window": value})


# ------------------------------------------------------------------ tiny checkpoints in the released layout
@pytest.fixture(scope="module")
def phi4_dir(tmp_path_factory):
    made: dict = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = make_phi4(tmp_path_factory.mktemp(name), name)
        return made[name]

    return make


def test_released_layout_is_what_the_tiny_checkpoint_has(phi4_dir):
    folder = phi4_dir("phi-4")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in index and "lm_head.weight" in index
    raw = json.loads((folder / "config.json").read_text())
    assert raw["sliding_window"] is None and raw["rope_scaling"] is None and "rope_parameters" not in raw
    cfg = load_config(folder)
    assert cfg.sliding_window is None and cfg.rope_theta == 250000.0 and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("name", list(PHI4_SPECS))
def test_logits_and_64_greedy_tokens_match_transformers(phi4_dir, name):
    folder = phi4_dir(name)
    hf = hf_reference(folder)
    ids = prompt(100)
    ref = hf_logits(hf, ids)
    model = phinano.load(folder, backend="numpy")
    diff = np.abs(model.forward(ids) - ref).max()
    print(f"{name}: max |diff| {diff:.2e}, max |logit| {np.abs(ref).max():.1f}")
    assert diff <= LOGIT_RTOL * np.abs(ref).max(), layer_report(model, hf, ids)

    for seed in range(30, 36):  # a prompt whose every greedy step is far from a tie (see test_parity.py)
        ids = prompt(30, seed=seed)
        expected, gap = hf_greedy(hf, ids, 64)
        if gap > 2 * LOGIT_RTOL and len(set(expected)) > 8:
            break
    else:
        pytest.fail("every prompt hits a near-tie or a repeat; widen the tiny model's init")
    for backend in ("numpy", "numba"):
        assert phinano.load(folder, backend=backend).generate(ids, 64, stop_token_ids=[]) == expected, backend


def test_phi4_mini_reasoning_layout_tied_and_sharded(tmp_path):
    """Phi-4-mini-reasoning's layout: Phi-4-mini's network in shards with an index, no lm_head (tied), plus
    inv_freq buffers; logits as Transformers'."""
    from tiny_models import add_inv_freq, make_phi3

    folder = make_phi3(tmp_path, "4-mini", "bfloat16", shard=True)
    add_inv_freq(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.layers.1.self_attn.rotary_emb.inv_freq" in index
    ids = prompt(70)  # past the original length 48: the long factors
    ref = hf_logits(hf_reference(folder), ids)
    model = phinano.load(folder, backend="numba")
    assert model.weights.lm_head is model.weights.embed
    assert np.abs(model.forward(ids) - ref).max() <= LOGIT_RTOL * np.abs(ref).max()


def test_no_window_means_every_key_past_phi3s_2047(phi4_dir):
    """A 2100-token prompt: with "sliding_window": null the last queries see all 2100 keys, as in Transformers.
    Phi-3's window of 2047 (what a loader falling back to Phi-3's default would use) is far off."""
    folder = phi4_dir("phi-4")
    ids = prompt(2100, seed=7)
    ref = hf_logits(hf_reference(folder), ids)[-8:]
    model = phinano.load(folder, backend="numba")
    scale = np.abs(ref).max()
    assert np.abs(model.forward(ids)[-8:] - ref).max() <= LOGIT_RTOL * scale
    model.config = dataclasses.replace(model.config, sliding_window=2047)
    assert np.abs(model.forward(ids)[-8:] - ref).max() > 10 * LOGIT_RTOL * scale  # 53 of 2100 keys dropped


# ------------------------------------------------------------------ the byte-level tokenizer and templates
@pytest.fixture(scope="module", params=[False, True], ids=["phi-4", "phi-4-reasoning"])
def tokenizer_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi4-tokenizer")
    add_phi4_tokenizer(folder, reasoning=request.param)
    return folder


TEXTS = TINY_TEXT + [
    "Grüße aus München, naïve café, 中文字符 and 🦙 llamas.",
    "  two spaces, a tab\tand\r\nwindows lines\n\n",
    "<|im_start|>user<|im_sep|>hi<|im_end|><|im_start|>assistant<|im_sep|><think>hm</think>ok<|im_end|>",
    "code: def f(x):\n    return x ** 2  # 1234567",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "why is the sky blue?"}],
    [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "<think>greet</think>hi!"}, {"role": "user", "content": "2 + 2?"}],
]


def test_tokenizer_matches_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
        stream = ours.stream(skip_special_tokens=True)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        for prompt_ in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt_, tokenize=False)
            assert text == theirs.apply_chat_template(messages, add_generation_prompt=prompt_, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt_) == theirs.encode(text)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)


def test_no_bos_and_the_chat_markers_are_single_special_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.bos_token_id is not None and tok.bos_token_id not in tok.encode("hello")  # no BOS is prepended
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    marks = [tok.token_to_id(m) for m in ("<|im_start|>", "<|im_sep|>", "<|im_end|>")]
    assert ids[0] == marks[0] and ids[-1] == marks[1] and ids.count(marks[2]) == ids.count(marks[0]) - 1
    assert set(marks) <= tok.special_ids and tok.eos_token_id == marks[2]
    text = tok.decode(tok.encode("<think>a</think>b<|im_end|>"), skip_special_tokens=True)
    assert text == "<think>a</think>b"  # the reasoning markers survive decoding (they are not special)


def test_reasoning_template_adds_its_system_prompt_only_without_one(tmp_path):
    add_phi4_tokenizer(tmp_path, reasoning=True)
    tok = load_tokenizer(tmp_path)
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == (f"<|im_start|>system<|im_sep|>{PHI4_REASONING_SYSTEM}<|im_end|>"
                     "<|im_start|>user<|im_sep|>hi<|im_end|><|im_start|>assistant<|im_sep|>")
    own = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                  tokenize=False)
    assert PHI4_REASONING_SYSTEM not in own and own.startswith("<|im_start|>system<|im_sep|>S<|im_end|>")
    assert PHI4_CHAT_TEMPLATE in json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]


# ------------------------------------------------------------------ the whole model: stop tokens, info
@pytest.fixture(scope="module")
def reasoning_model_dir(phi4_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi4-reasoning-full")
    shutil.copytree(phi4_dir("phi-4-reasoning"), folder, dirs_exist_ok=True)
    add_phi4_tokenizer(folder, reasoning=True)
    return folder


def test_stop_tokens_come_from_generation_config(reasoning_model_dir):
    model = phinano.load(reasoning_model_dir, backend="numpy")
    tok = model.tokenizer
    assert model.stop_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    new = model.generate(ids, 16)
    assert len(new) == 16 or new[-1] in model.stop_token_ids


def test_info_shows_no_window_and_the_reasoning_theta(reasoning_model_dir, capsys):
    assert cli_main(["info", "--model", str(reasoning_model_dir), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "sliding window" not in out and "theta 500000" in out


# ------------------------------------------------------------------ which release a config is shaped like
_PHI3_MINI = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 4096, "sliding_window": 2047}
_LONGROPE_96 = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}
_PHI3_MEDIUM = {**_PHI3_MINI, "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
                "num_attention_heads": 40, "num_key_value_heads": 10}
_PHI35_MOE = {"architectures": ["PhiMoEForCausalLM"], "vocab_size": 32064, "hidden_size": 4096,
              "intermediate_size": 6400, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "num_local_experts": 16, "max_position_embeddings": 4096}


@pytest.mark.parametrize("raw,name", [
    (_PHI3_MINI, "Phi-3-mini-4k-instruct"),
    ({**_PHI3_MINI, **_LONGROPE_96}, "Phi-3-mini-128k-instruct or Phi-3.5-mini-instruct"),
    (_PHI3_MEDIUM, "Phi-3-medium-4k-instruct"),
    (PHI4_MINI_REASONING_CONFIG, "Phi-4-mini-instruct or Phi-4-mini-reasoning"),
    (PHI4_CONFIG, "Phi-4"),
    (PHI4_REASONING_CONFIG, "Phi-4-reasoning or Phi-4-reasoning-plus"),
    (_PHI35_MOE, "Phi-3.5-MoE-instruct"),
    ({**_PHI35_MOE, "intermediate_size": 448, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128},
     "Phi-tiny-MoE-instruct"),
    ({**_PHI3_MINI, **_LONGROPE_96, "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v",
      "img_processor": {"name": "clip_vision_model", "num_img_tokens": 144}, "embd_layer": {"use_hd_transform": True}},
     "Phi-3-vision-128k-instruct or Phi-3.5-vision-instruct"),
    ({**PHI4_CONFIG, "vocab_size": 320}, None),  # no release has this shape
])
def test_family_names_the_release_a_config_is_shaped_like(raw, name):
    from phinano.families import family

    assert family(config_from_dict(raw)) == name


# ------------------------------------------------------------------ Phi-4's vocabulary in a GGUF file ("dbrx")
# The regex llama.cpp splits tokenizer.ggml.pre "dbrx" with (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DBRX, "same
# as llama3"), written out here: the contractions spelled out where tokenizer.json has (?i:'s|'t|...).
LLAMACPP_DBRX_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
                       r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_TEXTS = TEXTS + [
    "I'M SURE YOU'LL SEE THEY'VE SAID IT'S WHAT WE'D DO. DON'T! i'm, you're; 'Ll 'rE 'S 'T",
    "digits 1 12 123 1234 12345678901 3.14159 1,000,000 and 2024-01-01",
    "\n\n\nnewlines\n \n\t\n  end  \r\n",
    "Ωmega, naïve e\u0301, Straße, 日本語のテキスト, 🦙🚀 and \u00a0no-break",
    "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>",
    "<|im_end|>  <|endoftext|>\n<|dummy_85|>x",
]

GGUF_VOCAB = 1000


@pytest.fixture(scope="module", params=[False, True], ids=["phi-4", "phi-4-reasoning"])
def gguf_dir(request, tmp_path_factory):
    """Phi-4's tokenizer, its merges learnt on GGUF_TEXTS: words a wrong split makes then give other ids."""
    folder = tmp_path_factory.mktemp("phi4-gguf-tokenizer")
    add_phi4_tokenizer(folder, reasoning=request.param, vocab_size=GGUF_VOCAB, corpus=GGUF_TEXTS * 3)
    return folder


def phi4_gguf(folder: Path, path: Path, vocab_size: int = GGUF_VOCAB) -> dict:
    """Write the folder's tokenizer as a vocabulary-only GGUF file (what phinano quantize writes); its metadata."""
    general = {"general.architecture": "phi3", "general.name": "Tiny Phi 4"}
    write_gguf(path, {**general, **vocab_metadata(folder, vocab_size)})
    return read_gguf_metadata(path)


def gguf_tokenizer(metadata: dict):
    return Tokenizer(*tokenizer_parts(metadata)[:4])


def test_phi4_vocabulary_as_gguf_is_dbrx_and_reads_back_as_transformers(gguf_dir, tmp_path):
    """The reference is tokenizer.json as Transformers runs it (PreTrainedTokenizerFast; AutoTokenizer does the
    same in a model folder). AutoTokenizer on a folder holding only tokenizer files makes Transformers 5 build its
    GPT2Tokenizer, whose GPT-2 regex replaces the cl100k split: other ids wherever a merge crosses the two."""
    from transformers import PreTrainedTokenizerFast

    metadata = phi4_gguf(gguf_dir, tmp_path / "vocab.gguf")
    assert (metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.pre"]) == ("gpt2", "dbrx")
    ours, theirs = gguf_tokenizer(metadata), PreTrainedTokenizerFast.from_pretrained(gguf_dir)
    for text in GGUF_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids), text
    for messages in CONVERSATIONS:
        text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages, tokenize=False) == text
        assert ours.apply_chat_template(messages) == theirs.encode(text)
    assert ours.turn_end_id() == theirs.convert_tokens_to_ids("<|im_end|>")


def test_cl100k_split_is_llamacpps_but_for_the_long_s():
    """(?i:'s) also matches "'ſ" (U+017F, long s, whose case folding is s); llama.cpp's '[sS] does not, so
    "'ſz" is one word there and two in Transformers. phinano reads "dbrx" as tokenizer.json splits. No other
    character of the Basic Multilingual Plane differs, in a word or after a contraction."""
    ours, llamacpp = (pre_tokenizers.Split(Regex(split), behavior="isolated")
                      for split in (PRE_TOKENIZER_SPLITS["dbrx"], LLAMACPP_DBRX_SPLIT))
    for text in GGUF_TEXTS:
        assert ours.pre_tokenize_str(text) == llamacpp.pre_tokenize_str(text), text
    chars = "".join(chr(c) for c in range(0x80, 0x10000) if not 0xD800 <= c < 0xE000)
    text = "".join(f"x'{c}z '{c}" for c in chars)
    differ = {word for word, _ in ours.pre_tokenize_str(text)} ^ {word for word, _ in llamacpp.pre_tokenize_str(text)}
    assert differ == {"'ſ", "'ſz"}


LLAMACPP_SCRIPT = """
import json, sys
import llama_cpp
vocab = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.loads(sys.stdin.read())
print(json.dumps([vocab.tokenize(text.encode(), add_bos=False, special=True) for text in texts]))
"""


def test_phi4_gguf_vocabulary_tokenizes_as_llamacpp(gguf_dir, tmp_path):
    """llama.cpp's own tokenizer (llama-cpp-python, in a child process: its CPU build may not run here) on the
    same vocabulary-only file gives phinano's ids, special tokens parsed."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: llama.cpp's tokenizer cannot be compared")
    path = tmp_path / "vocab.gguf"
    ours = gguf_tokenizer(phi4_gguf(gguf_dir, path))
    run = subprocess.run([sys.executable, "-c", LLAMACPP_SCRIPT, str(path)], input=json.dumps(GGUF_TEXTS),
                         capture_output=True, text=True, timeout=300)
    if run.returncode < 0:
        pytest.skip(f"llama.cpp stopped with signal {-run.returncode} (a CPU build this machine cannot run)")
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for text, ids in zip(GGUF_TEXTS, theirs):
        assert ours.encode(text) == ids, text


# ------------------------------------------------------------------ the end of a chat turn stops generation
def test_a_chat_turn_ends_at_im_end_whatever_the_folder_lists(phi4_dir, tmp_path):
    """Phi-4's config.json names <|endoftext|> as eos. A folder whose generation_config.json lists only that
    (or that has none) still stops at <|im_end|>: the token the chat template writes after an answer."""
    folder = tmp_path / "phi-4"
    shutil.copytree(phi4_dir("phi-4"), folder)
    ids = add_phi4_tokenizer(folder)
    end, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "bos_token_id": end, "eos_token_id": end}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": end, "eos_token_id": end}))
    assert phinano.load(folder, backend="numpy").stop_token_ids == (end, im_end)
    (folder / "generation_config.json").unlink()
    model = phinano.load(folder, backend="numpy")
    assert model.stop_token_ids == (end, im_end)
    assert phinano.load(folder, backend="numpy", tokenizer=False).stop_token_ids == (end,)  # no template, no turn


@pytest.mark.parametrize("template,expected", [
    (PHI4_CHAT_TEMPLATE, "<|im_end|>"),
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}", "<|im_end|>"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <|endoftext|>{% endfor %}", "<|endoftext|>"),
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", None),  # plain text after the answer
    ("{% for m in messages %}{{ m['content'] }}<think>{% endfor %}", None),  # not a special token
    ("{{ raise_exception('only one user message') }}", None),
    (None, None),
])
def test_turn_end_is_the_special_token_after_an_answer(tmp_path, template, expected):
    add_phi4_tokenizer(tmp_path, reasoning=True)
    tok = load_tokenizer(tmp_path)
    tok = Tokenizer(tok.backend, tok.special_tokens, {} if template is None else {"default": template}, False)
    assert tok.turn_end_id() == (None if expected is None else tok.token_to_id(expected))
