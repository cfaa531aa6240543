"""Phi-4 (14B), Phi-4-reasoning(-plus) and Phi-4-mini-reasoning: the released configs read as they are, tiny
checkpoints in the released layout against Transformers, and the GPT-2-style byte-level tokenizer with the
`<|im_start|>role<|im_sep|>...<|im_end|>` chat templates against Transformers' AutoTokenizer.

Tolerance as in test_parity.py: |phinano - Transformers| <= 1e-4 * max|logits|, and 64 greedy tokens identical.
The real vocabularies cannot be fetched here, so the tokenizer is a small byte-level BPE built in the test with
the release's pipeline, special tokens and templates (tests/tiny_models.py, add_phi4_tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import phinano  # noqa: E402
from phinano.cli import main as cli_main  # noqa: E402
from phinano.config import config_from_dict, load_config  # noqa: E402
from phinano.tokenizer import load_tokenizer  # noqa: E402
from phinano.weights import parameter_counts  # noqa: E402
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
    ({**PHI4_CONFIG, "vocab_size": 320}, None),  # no release has this shape
])
def test_family_names_the_release_a_config_is_shaped_like(raw, name):
    from phinano.families import family

    assert family(config_from_dict(raw)) == name
