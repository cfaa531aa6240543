"""The decoder's public seams: Model.step from ids or from input embeddings, the observer hook, the block
module chosen from the config, and the floors the package is built in (nothing imports upward)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import phinano  # noqa: E402
from phinano import PhinanoError  # noqa: E402
from phinano.blocks import ARCHITECTURES, phi3, phi3small, phimoe  # noqa: E402
from tiny_models import VOCAB  # noqa: E402

PACKAGE = Path(phinano.__file__).parent


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_step_from_embeddings_equals_step_from_ids(checkpoint_dir, backend):
    """Input embeddings (T, D) placed as they are give exactly what their token ids give, also when mixed
    with ids in later steps of the same cache (an image's features between text tokens)."""
    model = phinano.load(checkpoint_dir("mini-128k"), backend=backend)
    ids = prompt(60)  # crosses the original length 48: the long factors
    rows = model.ops.embed(model.weights.embed, np.asarray(ids))  # (T, D)
    np.testing.assert_array_equal(model.forward(embeddings=rows), model.forward(ids))

    cache_a, cache_b = model.new_cache(48), model.new_cache(48)  # 48: all short factors, one cache
    a = [model.step(cache_a, ids[:10]), model.step(cache_a, embeddings=rows[10:30]), model.step(cache_a, ids[30:48])]
    b = [model.step(cache_b, ids[:10]), model.step(cache_b, ids[10:30]), model.step(cache_b, ids[30:48])]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_step_refuses_bad_input(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    cache = model.new_cache(8)
    D = model.config.hidden_size
    for kwargs, words in [(dict(ids=[1, 2], embeddings=np.zeros((2, D))), "exactly one"),
                          (dict(), "exactly one"),
                          (dict(embeddings=np.zeros((2, D + 1))), f"(T, {D})"),
                          (dict(ids=[VOCAB]), "out of range"),
                          (dict(ids=list(range(9))), "KV cache holds 8")]:
        with pytest.raises(PhinanoError, match=None) as e:
            model.step(cache, **kwargs)
        assert words in str(e.value), str(e.value)
    assert cache.length == 0, "a refused step writes nothing"
    with pytest.raises(PhinanoError, match="exactly one"):
        model.forward()


@pytest.mark.parametrize("ids,options,words", [
    ([1.7, 2.0], {}, "token ids must be integers, got float64"),  # was: cut to 1 and 2 without a word
    ("hello", {}, "token ids must be integers"),  # was: numpy's ValueError
    ([True, False], {}, "token ids must be integers, got bool"),
    ([[1, 2], [3]], {}, "token ids must be a sequence of integers"),
    ([1, 2], dict(stop_token_ids=3), "stop_token_ids must be a list of token ids"),  # was: TypeError
    ([1, 2], dict(stop_token_ids=[1.5]), "stop_token_ids must be a list of token ids"),
    ([1, 2], dict(stop_strings=7), "stop_strings must be a list of strings"),
    ([1, 2], dict(stop_strings=["ok", 3]), "stop_strings must be a list of strings"),
])
def test_generate_refuses_bad_arguments_in_one_error(checkpoint_dir, ids, options, words):
    """Found by fuzzing Model.generate's arguments: each raised a TypeError or ValueError from deep inside."""
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    with pytest.raises(PhinanoError) as e:
        model.generate(ids, 2, **options)
    assert words in str(e.value), str(e.value)
    assert len(model.generate(np.array([1, 2], np.int32), 2, stop_token_ids=(np.int64(5),))) <= 2  # numpy ids fine


def test_step_refuses_mixing_rope_factor_sets(checkpoint_dir):
    """Keys rotated with the short factors cannot be extended by a step past the original length: the caller
    must recompute (the generation loop does)."""
    model = phinano.load(checkpoint_dir("mini-128k"), backend="numpy")
    cache = model.new_cache(60)
    model.step(cache, prompt(40))
    with pytest.raises(PhinanoError, match="rope factors"):
        model.step(cache, prompt(10))


def test_observer_sees_residuals_attention_and_final_norm(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")  # sliding window 24
    ids = prompt(40)
    seen: dict = {"residual": [], "attention": [], "final": []}
    observer = {fact: (lambda fact: lambda layer, value: seen[fact].append((layer, value)))(fact) for fact in seen}
    logits = model.forward(ids, observer=observer)
    L, W = model.config.num_hidden_layers, model.config.sliding_window
    assert [layer for layer, _ in seen["residual"]] == list(range(-1, L))
    assert [layer for layer, _ in seen["attention"]] == list(range(L))
    for _, probs in seen["attention"]:
        assert probs.shape == (model.config.num_attention_heads, 40, 40)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        i, j = np.indices((40, 40))
        assert np.all(probs[:, (j > i) | (i - j >= W)] == 0), "causal, and W keys at most"
        assert np.all(probs[:, (j <= i) & (i - j < W)] > 0)
    (layer, final), = seen["final"]
    assert layer == L
    np.testing.assert_allclose(model.ops.linear(final, model.weights.lm_head), logits, rtol=1e-6)
    # Watching changes nothing.
    np.testing.assert_array_equal(model.forward(ids), logits)


def test_generation_with_an_observer_equals_generation_without(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-128k"), backend="numpy")
    ids = prompt(30)
    steps = []
    watched = model.generate(ids, 30, stop_token_ids=[], observer={"residual": lambda layer, x: steps.append(x.shape)})
    assert watched == model.generate(ids, 30, stop_token_ids=[])
    # prefill (30), decode steps of one token, one recompute of the whole sequence when it reaches 49 > 48.
    rows = [shape[0] for shape in steps[:: model.config.num_hidden_layers + 1]]
    assert rows == [30] + [1] * 18 + [49] + [1] * 10


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_one_product_per_fused_matrix_gives_the_separate_products_bits(checkpoint_dir, backend):
    """The Phi-3 layer multiplies the stored qkv and gate_up matrices once each and splits the columns
    (blocks/phi3.py). Each output column of a product depends only on its own weight row, so that must be
    bit for bit the three (two) separate products of the row views: prefill and decode, all layers."""
    from dataclasses import replace

    model = phinano.load(checkpoint_dir("mini-128k"), backend=backend)
    fused = list(model.weights.layers)
    F = model.config.intermediate_size

    def separate_layer(ops, cfg, w, x, step, i):  # the layer as written before: q, k, v, gate, up apart
        h = ops.rmsnorm(x, w.attn_norm, cfg.rms_norm_eps)
        x = x + phi3.self_attention(ops, cfg, replace(w.attn, qkv=None), h, step, i)
        h = ops.rmsnorm(x, w.mlp_norm, cfg.rms_norm_eps)
        gate, up = ops.linear(h, w.gate_up[:F]), ops.linear(h, w.gate_up[F:])
        return x + ops.linear(ops.swiglu(gate, up), w.down)

    ids = prompt(20)
    want = [model.step(cache := model.new_cache(32), ids[:19]), model.step(cache, ids[19:])]
    model.blocks = type("Separate", (), {"forward_layer": staticmethod(separate_layer), "norm": phi3.norm})
    got = [model.step(cache := model.new_cache(32), ids[:19]), model.step(cache, ids[19:])]
    assert all(layer.attn.qkv is not None for layer in fused)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_architecture_picks_the_block_module(checkpoint_dir):
    assert ARCHITECTURES == {"Phi3ForCausalLM": phi3, "PhimoeForCausalLM": phimoe, "Phi3SmallForCausalLM": phi3small,
                             "Phi3VForCausalLM": phi3}
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    assert model.blocks is phi3
    assert all(isinstance(layer, phi3.Layer) for layer in model.weights.layers)


# ------------------------------------------------------------------ the floors
FLOORS = [  # lowest first; a module may import its own floor and those below it, never one above
    {"errors"},
    {"config", "sampling", "nano", "families"},
    {"formats"},
    {"kernels"},
    {"rope", "cache", "blocks", "vision"},
    {"weights", "tokenizer", "tokenizer_tiktoken"},
    {"generate", "reasoning", "speculate", "beams"},
    {"model", "tracing", "quantize"},
    {"chat", "cli", "diff", "pictures", "testing", "serve", "server", "server_app", "server_engine", "server_openai", "server_ollama", "__init__"},
]


def _floor(module: str) -> int:
    top = module.split(".")[0]
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"phinano.{module} is on no floor: add it to FLOORS")


def _module_or_package(base: list[str], name: str) -> str:
    """`from <base> import name`: the submodule if name is one, else the package base itself."""
    folder = PACKAGE.joinpath(*base)
    if (folder / f"{name}.py").is_file() or (folder / name).is_dir():
        return ".".join(base + [name])
    return ".".join(base) or "__init__"


def _imports(path: Path) -> set[str]:
    """phinano modules a file imports (relative or absolute), as dotted names below phinano."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level])
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [_module_or_package(base, a.name) for a in node.names]
            elif node.module and node.module.startswith("phinano"):
                names = [node.module.removeprefix("phinano").strip(".")]
            else:
                continue
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("phinano.") for a in node.names if a.name.startswith("phinano."))
    return found


def test_nothing_imports_upward():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "__init__":
            continue
        own = _floor(module)
        for imported in _imports(path):
            if imported.split(".")[0] != module.split(".")[0] and _floor(imported) > own:
                wrong.append(f"phinano.{module} (floor {own}) imports phinano.{imported} (floor {_floor(imported)})")
    assert not wrong, "\n".join(wrong)


def test_kernels_are_a_real_package_folder():
    """`pip install .` then Python started in the checkout root must import the same package: the kernels are
    files inside phinano/, not a folder mapped into it by pyproject."""
    import phinano.kernels

    assert Path(phinano.kernels.__file__).parent == PACKAGE / "kernels"
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert "package-dir" not in pyproject


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc/self/statm), in bytes."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="resident memory is read from Linux's /proc")
def test_a_cache_for_a_whole_128k_context_takes_memory_only_as_it_fills():
    """An OpenAI chat request without max_tokens may run to the context's end: on Phi-3.5-mini a cache with room
    for 131072 positions, 48 GiB for keys and as much for values. np.zeros asked Linux to reserve that and got
    MemoryError on a 24 GB machine; the cache's pages are now taken as they are written."""
    from phinano.cache import new_cache
    from phinano.config import config_from_dict
    from test_config import PHI35_MINI

    cfg = config_from_dict(PHI35_MINI)
    before = resident_bytes()
    caches = [new_cache(cfg, cfg.max_position_embeddings) for _ in range(2)]  # two requests at once
    assert caches[0].k.shape == (32, 131072, 32, 96) and caches[0].k.dtype == np.float32
    for cache in caches:
        cache.k[:, :100] = 1.0  # a 100-token prompt in every layer
        cache.v[:, :100] = 2.0
    assert caches[1].k[5, 99, 3, 7] == 1.0 and caches[1].v[5, 100, 3, 7] == 0.0
    copy = caches[0].copy()  # a beam that branches: room for as much again
    assert copy.k.shape == caches[0].k.shape
    assert resident_bytes() - before < 400 * 2**20  # what 100 positions take, not 2 x 96 GiB


def test_a_cache_the_system_refuses_is_one_clear_error(monkeypatch):
    """Where the map itself is refused (a strict overcommit policy, no address space): one error with the size."""
    import mmap

    from phinano import cache
    from phinano.config import config_from_dict
    from test_config import PHI35_MINI

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(PhinanoError, match=r"cannot set aside 48\.0 GiB for a KV cache .*ask for fewer new tokens"):
        cache.new_cache(config_from_dict(PHI35_MINI), 131072)


def test_one_stop_string_is_one_stop_not_its_characters():
    """stop_strings="ab" once meant the stops "a" and "b"; it is now the one string, as in Transformers."""
    from phinano.generate import TextStops

    tokenizer = phinano.load("nano-phi3").tokenizer
    assert TextStops(tokenizer, "ab").stops == ["ab"] == TextStops(tokenizer, ["ab", ""]).stops
