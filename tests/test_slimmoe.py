"""SlimMoE (Phi-tiny-MoE, Phi-mini-MoE): PhiMoE with a head dim of its own, against Transformers 5.23.

Phi-tiny-MoE's config.json carries `"head_dim": 128` with hidden 4096 and 16 heads: q is 16 x 128 = 2048 wide,
half of hidden, so o_proj is (4096, 2048), not square. It also keeps Phi-3.5-MoE's biases on q/k/v/o and on the
head, a sliding window of 2047 and plain rope ("rope_scaling": null, 4096 positions). Transformers' PhimoeConfig
takes `head_dim` through; its attention and rotary read it.

The tiny model here keeps all of that: hidden 64 with 4 heads of 32 (q 128 wide), GQA 2:1, 16 experts, biases,
a window of 24. Tolerance and routing checks as in test_moe.py: logits within 1e-4 x max|logits|, the same two
experts for every token and layer, and 64 greedy tokens identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import phinano  # noqa: E402
from phinano import tracing  # noqa: E402
from phinano.config import config_from_dict, load_config  # noqa: E402
from phinano.generate import generate_tokens  # noqa: E402
from phinano.formats import read_tensors  # noqa: E402
from phinano.weights import check_tensors, expected_shapes, parameter_counts  # noqa: E402
from test_moe import (LOGIT_RTOL, assert_same_routing, clear_prompt, hf_forward, hf_greedy,  # noqa: E402
                      init_moe_weights, prompt)
from tiny_models import VOCAB, save_checkpoint  # noqa: E402

# config.json of microsoft/Phi-tiny-MoE-instruct (the keys phinano reads; auto_map names configuration_slimmoe).
PHI_TINY_MOE_CONFIG = {
    "architectures": ["PhiMoEForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_slimmoe.PhiMoEConfig",
                 "AutoModelForCausalLM": "modeling_slimmoe.PhiMoEForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 32000, "expert_dropout": 0.0, "head_dim": 128, "hidden_act": "silu",
    "hidden_dropout": 0.0, "hidden_size": 4096, "initializer_range": 0.02, "input_jitter_noise": 0.01,
    "intermediate_size": 448, "lm_head_bias": True, "max_position_embeddings": 4096, "model_type": "phimoe",
    "num_attention_heads": 16, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 4,
    "num_local_experts": 16, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "router_jitter_noise": 0.01, "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32064,
}

SPEC = dict(hidden_size=64, head_dim=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            num_local_experts=16, num_experts_per_tok=2, num_hidden_layers=2, max_position_embeddings=256,
            sliding_window=24, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01, rms_norm_eps=1e-5)


def make_slimmoe(folder: Path, dtype: str, seed: int = 0):
    """A tiny SlimMoE checkpoint, its config.json in the release's spelling; returns (folder, Transformers' model
    holding exactly the saved weights, in float32)."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    config = PhimoeConfig(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
                          **SPEC)
    hf = PhimoeForCausalLM(config).eval()
    assert hf.model.layers[0].self_attn.o_proj.weight.shape == (64, 128)  # the head dim really is 32
    init_moe_weights(hf, seed)
    save_checkpoint(hf, folder, dtype)  # rounds hf's weights to dtype too: it holds what the files hold
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("rope_parameters")
    raw.update(architectures=["PhiMoEForCausalLM"], rope_theta=10000.0, rope_scaling=None,
               torch_dtype=raw.pop("dtype"), input_jitter_noise=0.01, expert_dropout=0.0, hidden_dropout=0.0)
    path.write_text(json.dumps(raw, indent=2))
    return folder, hf


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def slim(request, tmp_path_factory):
    return make_slimmoe(tmp_path_factory.mktemp(f"slimmoe-{request.param}"), request.param)


def test_phi_tiny_moe_config_reads_as_released():
    cfg = config_from_dict(PHI_TINY_MOE_CONFIG)
    assert cfg.is_moe and (cfg.head_dim, cfg.rotary_dim, cfg.q_size, cfg.kv_size) == (128, 128, 2048, 512)
    assert cfg.attention_bias and cfg.lm_head_bias and not cfg.tie_word_embeddings
    assert (cfg.sliding_window, cfg.rope_type, cfg.num_local_experts) == (2047, "default", 16)
    shapes = expected_shapes(cfg)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (4096, 2048)
    assert shapes["model.layers.0.self_attn.o_proj.bias"] == (4096,) and shapes["lm_head.bias"] == (32064,)
    total, active = parameter_counts(cfg)
    assert (round(total / 1e9, 2), round(active / 1e9, 2)) == (3.76, 1.29)  # the card: "3.8B total"


def test_released_spelling_is_read(slim):
    folder, _ = slim
    cfg = load_config(folder)
    assert cfg.architecture == "PhimoeForCausalLM" and cfg.head_dim == 32 and cfg.q_size == 128
    assert cfg.sliding_window == 24 and cfg.rope_type == "default"


def test_logits_and_routing_match_transformers(slim):
    folder, hf = slim
    model = phinano.load(folder, backend="numpy")
    ids = clear_prompt(model, 60)  # crosses the window of 24
    ref, their_routing = hf_forward(hf, ids)
    ours = []
    out = model.forward(ids, observer={"routing": lambda layer, r: ours.append(r)})
    diff = np.abs(out - ref).max()
    print(f"max |diff| {diff:.2e}, max |logit| {np.abs(ref).max():.1f}")
    assert diff <= LOGIT_RTOL * np.abs(ref).max()
    assert_same_routing(ours, their_routing)


def test_64_greedy_tokens_and_routing_match_transformers(slim):
    """A 30-token prompt, 64 tokens: past the window of 24 from the start. Tokens and every step's routing equal."""
    folder, hf = slim
    ids = prompt(30, seed=30)
    expected, gap, hf_steps = hf_greedy(hf, ids, 64)
    assert gap > 1e-3, "tiny model has a near-tie; the comparison would not be meaningful"
    assert len(set(expected)) > 16, "tiny model fell into a repeat; the comparison would not be meaningful"
    for backend in ("numpy", "numba"):
        recorder = tracing.RoutingLog()
        model = phinano.load(folder, backend=backend)
        assert list(generate_tokens(model, ids, 64, stop_token_ids=[], observer=recorder.observer)) == expected
        for step, (ours, theirs) in enumerate(zip(recorder.steps, hf_steps)):
            assert_same_routing(ours, theirs, f"{backend} step {step}")


def test_a_head_dim_taken_from_hidden_over_heads_is_refused_by_the_shapes(slim):
    """Without `head_dim` the config would mean heads of 16: the checkpoint's q_proj (128, 64) then does not fit,
    and the error names the tensor."""
    folder, _ = slim
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("head_dim")
    with pytest.raises(phinano.PhinanoError, match=r"q_proj.weight is \(128, 64\), expected \(64, 64\)"):
        check_tensors(read_tensors(folder), config_from_dict(raw), str(folder))


def test_gguf_keeps_the_head_dim(slim, tmp_path):
    """Written as GGUF (attention.key_length / value_length, as llama.cpp names them) and read back: the same
    config and, with F32 matrices, the same logits."""
    from phinano.formats.gguf_write import write_gguf

    folder, _ = slim
    tensors = {name: np.asarray(t, dtype=np.float32) if t.dtype != np.uint16 else
               (np.asarray(t).astype(np.uint32) << 16).view(np.float32) for name, t in read_tensors(folder).items()}
    out = write_gguf(tmp_path / "slim.gguf", load_config(folder), tensors, lambda name, values: "F32")
    model = phinano.load(out, backend="numpy")
    assert (model.config.head_dim, model.config.q_size, model.config.sliding_window) == (32, 128, 24)
    ids = clear_prompt(model, 40)
    ref = phinano.load(folder, backend="numpy").forward(ids)
    assert np.abs(model.forward(ids) - ref).max() <= LOGIT_RTOL * np.abs(ref).max()
