"""phinano.trace: one forward kept as arrays (logit lens, attention maps, routing, residual norms), checked
against the model's own forward on the shipped nano models."""

from __future__ import annotations

import numpy as np
import pytest

import phinano
from phinano.tracing import Trace

CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.fixture(scope="module", params=["nano-phi3", "nano-phimoe"])
def model(request):
    return phinano.load(request.param)


def test_the_lens_last_row_is_the_models_argmax_with_its_probability(model):
    ids = model.tokenizer.encode(CODE)
    t = phinano.trace(model, ids)
    logits = model.forward(ids)  # (T, V)
    L, T = model.config.num_hidden_layers, len(ids)
    assert isinstance(t, Trace) and t.lens_top_ids.shape == (L, T) and t.lens_probs.shape == (L, T)
    np.testing.assert_array_equal(t.lens_top_ids[-1], logits.argmax(-1))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(t.lens_probs[-1], (e / e.sum(-1, keepdims=True)).max(-1), rtol=1e-4)
    assert np.all((t.lens_probs > 0) & (t.lens_probs <= 1))
    assert not np.array_equal(t.lens_top_ids[0], t.lens_top_ids[-1])  # early layers do guess differently


def test_the_lens_of_an_earlier_layer_is_its_residual_through_the_head(model):
    ids = model.tokenizer.encode(CODE)
    seen = {}
    model.forward(ids, observer={"residual": lambda layer, x: seen.setdefault(layer, x.copy())})
    cfg, W = model.config, model.weights
    h = model.blocks.norm(model.ops, cfg, seen[1], W.final_norm, W.final_norm_bias)
    np.testing.assert_array_equal(phinano.trace(model, ids).lens_top_ids[1],
                                  model.ops.linear(h, W.lm_head, W.lm_head_bias).argmax(-1))


def test_residual_norms_are_the_norms_the_observer_sees(model):
    ids = model.tokenizer.encode(CODE)
    seen = []
    model.forward(ids, observer={"residual": lambda layer, x: seen.append(np.linalg.norm(x, axis=-1))})
    t = phinano.trace(model, ids, lens=False)
    assert t.residual_norms.shape == (model.config.num_hidden_layers + 1, len(ids))
    np.testing.assert_allclose(t.residual_norms, np.stack(seen), rtol=1e-6)
    assert np.all(t.lens_top_ids == 0)  # lens=False computed no lens


def test_attention_rows_sum_to_one_and_respect_the_causal_sliding_window(model):
    window = model.config.sliding_window or 10**9
    # nano-phi3 (window 255): 264 tokens, so the first keys drop out of the last rows; nano-phimoe's window is
    # its whole context (2048): 80 tokens, causal only
    T = window + 9 if window + 9 <= model.config.max_position_embeddings else 80
    ids = np.random.default_rng(0).integers(5, 4000, T)
    t = phinano.trace(model, ids, attention=[0, -1], lens=False)
    assert t.attention_layers == [0, model.config.num_hidden_layers - 1]
    for layer in t.attention_layers:
        a = t.attention(layer)
        assert a.shape == (model.config.num_attention_heads, T, T) and a.dtype == np.float32
        np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        visible = (j <= i) & (i - j < window)
        assert np.all(a[:, ~visible] == 0)
        assert np.all(a[:, visible] > 0)  # softmax of finite scores: every visible key has some weight
        assert visible[-1, 0] == (T <= window)


def test_attention_maps_are_computed_only_for_the_layers_asked_for(model, monkeypatch):
    computed = []
    for name in ("attention_weights", "blocksparse_attention_weights"):
        if hasattr(model.ops, name):
            original = getattr(model.ops, name)
            monkeypatch.setattr(model.ops, name, lambda *a, _f=original: computed.append(1) or _f(*a))
    L = model.config.num_hidden_layers
    ids = np.arange(5, 25)
    t = phinano.trace(model, ids, attention=[L - 1], lens=False)
    assert t.attention_layers == [L - 1] and len(computed) == 1  # one layer's maps, not L
    computed.clear()
    phinano.trace(model, ids, attention="all", lens=False)
    assert len(computed) == L


def test_attention_not_kept_is_a_clear_error(model):
    t = phinano.trace(model, [1, 2, 3], lens=False)
    with pytest.raises(phinano.PhinanoError, match=r"attention of layer 2 was not kept \(kept: none\)"):
        t.attention(2)
    with pytest.raises(phinano.PhinanoError, match="out of range"):
        phinano.trace(model, [1, 2], attention=[model.config.num_hidden_layers])
    with pytest.raises(phinano.PhinanoError, match="'all', None or layer numbers"):
        phinano.trace(model, [1, 2], attention="some")


def test_routing_matches_forward_return_routing(model):
    ids = model.tokenizer.encode(CODE)
    t = phinano.trace(model, ids, lens=False)
    if not model.config.is_moe:
        assert t.routing == []
        return
    _, routing = model.forward(ids, return_routing=True)
    assert len(t.routing) == len(routing) == model.config.num_hidden_layers
    for (experts, weights), (want_experts, want_weights) in zip(t.routing, routing):
        np.testing.assert_array_equal(experts, want_experts)
        np.testing.assert_array_equal(weights, want_weights)
    assert t.routing_experts.shape == (len(routing), len(ids), 2)
    np.testing.assert_array_equal(t.routing_weights[2], routing[2][1])


def test_the_lens_is_computed_in_chunks_without_changing_it(model, monkeypatch):
    from phinano import tracing

    ids = model.tokenizer.encode(CODE)
    whole = phinano.trace(model, ids)
    monkeypatch.setattr(tracing, "_LENS_CHUNK", 3 * model.config.vocab_size)  # 3 positions at a time
    parts = phinano.trace(model, ids)
    np.testing.assert_array_equal(parts.lens_top_ids, whole.lens_top_ids)
    np.testing.assert_allclose(parts.lens_probs, whole.lens_probs, rtol=1e-5)
