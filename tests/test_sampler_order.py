"""The two sampler orders: each chain's distribution equals its definition, computed here independently in
plain Python (sorted lists, math.exp); docs/sampling.md's worked example; seeded draws reproducible and
distributed as stated; a bad sampler_order is one clear line at every door (library, CLI, both APIs)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phinano.cli import main
from phinano.sampling import OptionError, check_options, distribution, resolve_options, sample


def softmax(values: dict[int, float]) -> dict[int, float]:
    top = max(values.values())
    e = {i: math.exp(v - top) for i, v in values.items()}
    total = sum(e.values())
    return {i: x / total for i, x in e.items()}


def transformers_chain(logits, temperature, top_k=None, top_p=None, min_p=None) -> list[float]:
    """Temperature, then top-k (ties with the k-th kept), top-p (a token stays while the mass strictly above
    it, ranked by logit, is below p), min-p (probability >= min_p x the top's), on the tempered scores."""
    kept = {i: x / temperature for i, x in enumerate(logits)}
    if top_k:
        kth = sorted(kept.values(), reverse=True)[min(top_k, len(kept)) - 1]
        kept = {i: x for i, x in kept.items() if x >= kth}
    if top_p is not None and top_p < 1:
        probs = softmax(kept)
        ranked = sorted(kept, key=lambda i: (-kept[i], -i))  # Transformers' stable ascending sort, reversed
        above, survivors = 0.0, {}
        for i in ranked:
            if above < top_p or not survivors:
                survivors[i] = kept[i]
            above += probs[i]
        kept = survivors
    if min_p:
        probs = softmax(kept)
        kept = {i: x for i, x in kept.items() if probs[i] >= min_p * max(probs.values())}
    probs = softmax(kept)
    return [probs.get(i, 0.0) for i in range(len(logits))]


def llama_cpp_chain(logits, temperature, top_k=None, top_p=None, min_p=None) -> list[float]:
    """llama.cpp's default chain: top-k (exactly k, ties to the lower id), top-p (the shortest prefix, by
    logit, whose mass reaches p), min-p (logit >= max + ln min_p), then temperature, on the raw logits."""
    ranked = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if top_k:
        ranked = ranked[:top_k]
    if top_p is not None and top_p < 1:
        probs = softmax({i: logits[i] for i in ranked})
        mass = 0.0
        for n, i in enumerate(ranked, 1):
            mass += probs[i]
            if mass >= top_p:
                ranked = ranked[:n]
                break
    if min_p:
        top = max(logits[i] for i in ranked)
        ranked = [i for i in ranked if logits[i] >= top + math.log(min_p)]
    probs = softmax({i: logits[i] / temperature for i in ranked})
    return [probs.get(i, 0.0) for i in range(len(logits))]


CHAINS = {"transformers": transformers_chain, "llama.cpp": llama_cpp_chain}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-40, 40), min_size=1, max_size=12), st.sampled_from(list(CHAINS)),
       st.sampled_from([0.3, 0.7, 1.0, 1.6, 3.0]), st.one_of(st.none(), st.integers(1, 8)),
       st.one_of(st.none(), st.sampled_from([0.33, 0.57, 0.81, 0.93])),  # no k/n with n <= 12: no exact ties
       st.one_of(st.none(), st.sampled_from([0.05, 0.2, 0.5])))
def test_each_chain_is_its_definition(tenths, order, temperature, top_k, top_p, min_p):
    logits = [float(np.float32(t / 10)) for t in tenths]  # a grid, so that ties happen; float32 as the engine's
    expected = CHAINS[order](logits, temperature, top_k, top_p, min_p)
    got = distribution(np.array(logits, np.float32), temperature, top_k, top_p, min_p, sampler_order=order)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_the_worked_example_of_docs_sampling():
    """docs/sampling.md: logits [2, 1, 0.5, 0, -1], temperature 0.5, top_p 0.8."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    hf = distribution(logits, 0.5, top_p=0.8)
    cpp = distribution(logits, 0.5, top_p=0.8, sampler_order="llama.cpp")
    np.testing.assert_allclose(hf, [1, 0, 0, 0, 0], atol=1e-12)  # tempered: 0.829 of the mass on one token
    np.testing.assert_allclose(cpp, [0.8438, 0.1142, 0.0420, 0, 0], atol=5e-5)  # 3 kept at T 1, then tempered
    # And with min_p 0.3 at temperature 2: four tokens against two.
    np.testing.assert_allclose(distribution(logits, 2.0, min_p=0.3), [0.4087, 0.2479, 0.1931, 0.1504, 0], atol=5e-5)
    np.testing.assert_allclose(distribution(logits, 2.0, min_p=0.3, sampler_order="llama.cpp"),
                               [0.6225, 0.3775, 0, 0, 0], atol=5e-5)


@pytest.mark.parametrize("order", list(CHAINS))
def test_seeded_draws_are_reproducible_and_follow_the_distribution(order):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.5], np.float32)
    options = dict(temperature=1.4, top_k=5, top_p=0.9, min_p=0.1, sampler_order=order)
    draws = [sample(logits, np.random.default_rng(7), **options) for _ in range(3)]
    assert len(set(draws)) == 1
    rng = np.random.default_rng(11)
    counts = np.bincount([sample(logits, rng, **options) for _ in range(20000)], minlength=6) / 20000
    np.testing.assert_allclose(counts, distribution(logits, **options), atol=0.015)
    assert sample(logits, rng, 0.0, sampler_order=order) == 0  # greedy is the argmax in both orders


def test_the_default_order_is_transformers():
    assert check_options()["sampler_order"] == "transformers"
    assert resolve_options({"sampler_order": None})["sampler_order"] == "transformers"
    assert resolve_options({"sampler_order": "llama.cpp"})["sampler_order"] == "llama.cpp"


BAD = "sampler_order must be 'transformers' or 'llama.cpp', got 'llama'"


def test_a_bad_order_is_one_line_everywhere(capsys):
    with pytest.raises(OptionError, match=BAD) as error:
        check_options(sampler_order="llama")
    assert error.value.param == "sampler_order"
    assert main(["generate", "--sampler-order", "llama", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["phinano: error: --" + BAD[:13].replace("_", "-") +
                                                            BAD[13:]]


def test_a_bad_order_is_a_400_in_both_apis():
    pytest.importorskip("fastapi")
    from phinano.serve import ollama_api, openai_api
    from phinano.serve.validate import ApiError

    config = SimpleNamespace(vocab_size=32)
    model = SimpleNamespace(config=config, weights=SimpleNamespace(vision=None))  # a text model
    engine = SimpleNamespace(name="tiny", context_length=64, model=model,
                             tokenizer=SimpleNamespace(encode=lambda text: [5, 6]))
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "sampler_order": "llama"}
    with pytest.raises(ApiError) as error:
        openai_api.job("completion", engine, body)
    assert (error.value.status, error.value.param, error.value.message) == (400, "sampler_order", BAD)
    good, _ = openai_api.job("completion", engine, {**body, "sampler_order": "llama.cpp"})
    assert good.sampling["sampler_order"] == "llama.cpp"

    body = {"model": "tiny", "prompt": "hi", "raw": True, "options": {"sampler_order": "llama", "num_predict": 4}}
    with pytest.raises(ApiError) as error:
        ollama_api.job("generate", engine, body)
    assert (error.value.status, error.value.param) == (400, "options.sampler_order")
    assert error.value.message == BAD.replace("sampler_order", "options.sampler_order", 1)
    body["options"]["sampler_order"] = "llama.cpp"
    good, _ = ollama_api.job("generate", engine, body)
    assert good.sampling["sampler_order"] == "llama.cpp"
