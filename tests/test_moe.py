"""Phi-3.5-MoE (PhimoeForCausalLM) against Transformers 5.23, on tiny random checkpoints made here.

The tiny model keeps everything that makes PhiMoE different from Phi-3: 16 experts with top-2 sparsemixer
routing (eps = router_jitter_noise = 0.01), LayerNorm with weight and bias, biases on q/k/v/o and on the
head, grouped-query attention, and longrope with short/long factors and different short/long mscales, with
original_max_position_embeddings = 48 so that 30-token prompts cross it while generating 64 tokens.

Tolerance: |phinano - Transformers| <= 1e-4 * max|logits| (LOGIT_RTOL, as for the dense models). Both compute in
float32 on the same weights (bf16 widens exactly), so only the order of float32 accumulation differs; the largest
difference seen is printed by each test (a few 1e-6 relative). Routing must be identical: the same two experts
for every token in every layer, weights within 1e-5.

Long context: Transformers 5.23 computes PhiMoE's rotary frequencies with the short factors at every length
(only the mscale switches), unlike the released model's code; phinano follows the release (long factors past
the original length, like Phi-3). Below the original length phinano must equal unmodified Transformers; past it,
Transformers with its rotary patched to pass the sequence length (`transformers_with_long_factors`). See
docs/moe.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import phinano  # noqa: E402
from phinano import tracing  # noqa: E402
from phinano.blocks import phimoe  # noqa: E402
from phinano.cli import main as cli_main  # noqa: E402
from phinano.config import config_from_dict, load_config  # noqa: E402
from phinano.generate import generate_tokens  # noqa: E402
from phinano.weights import parameter_counts  # noqa: E402
from tiny_models import VOCAB, hf_reference, save_checkpoint  # noqa: E402

LOGIT_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
ORIGINAL = 48  # original_max_position_embeddings of the tiny model
VARIANTS = [("float32", "transformers5"), ("bfloat16", "released")]

# ---------------------------------------------------------------------------------------------------------
# Making tiny PhimoeForCausalLM checkpoints
# ---------------------------------------------------------------------------------------------------------

SPEC = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=512, sliding_window=None,
            attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01, rms_norm_eps=1e-5)
ROTARY = 16  # head dim 64 / 4


def _factors(n: int, start: float, stop: float) -> list[float]:
    return [start + (stop - start) * i / (n - 1) for i in range(n)]


ROPE_SCALING = {"type": "longrope", "short_factor": _factors(ROTARY // 2, 1.0, 1.6),
                "long_factor": _factors(ROTARY // 2, 1.0, 9.0), "short_mscale": 1.1, "long_mscale": 1.3,
                "original_max_position_embeddings": ORIGINAL}


def phimoe_config(vocab_size: int = VOCAB):
    from transformers import PhimoeConfig

    # rope_theta explicitly: PhimoeConfig's default is 1e6, the release uses 1e4
    # (docs/pitfalls.md#tiny-config-defaults).
    return PhimoeConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
                        rope_scaling=dict(ROPE_SCALING), **SPEC)


def init_moe_weights(model, seed: int, std: float = 0.3) -> None:
    """Deterministic wide init that keeps greedy choices and routing far from degenerate.

    Matrices: normal(0, std), scaled by 1/sqrt(fan-in/64) (fan-in is the last axis, also for the stacked
    experts); norms ~1, biases ~0.1. The router gets a shared row plus small per-expert rows, and the MoE
    LayerNorm a bias of ~0.5, so router logits sit close together: then the sparsemixer often keeps more
    than one expert unmasked and about half of the weights are below 1 (at plain init nearly all are 1.0, which
    would leave the weights untested).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.copy_(1.0 + 0.1 * noise)
                elif "post_attention_layernorm.bias" in name:
                    p.copy_(0.5 + 0.1 * noise)
                else:
                    p.copy_(0.1 * noise)
            elif "router" in name:
                p.copy_(0.1 + 0.05 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                fan_in = p.shape[-1]
                p.copy_(std * math.sqrt(64 / fan_in) * noise if fan_in > 64 else std * noise)


def to_released_spelling(folder: Path) -> None:
    """Rewrite config.json the way the Phi-3.5-MoE release spells it: rope_theta and rope_scaling at the top
    level (original_max_position_embeddings inside rope_scaling only), torch_dtype, class PhiMoEForCausalLM."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw.pop("original_max_position_embeddings", None)
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {"type": "longrope", **{k: rope[k] for k in (
        "short_factor", "long_factor", "short_mscale", "long_mscale", "original_max_position_embeddings")}}
    raw["torch_dtype"] = raw.pop("dtype")
    raw["architectures"] = ["PhiMoEForCausalLM"]
    path.write_text(json.dumps(raw, indent=2))


def make_phimoe(folder: Path, dtype: str = "float32", spelling: str = "transformers5", seed: int = 0,
                vocab_size: int = VOCAB) -> Path:
    from transformers import PhimoeForCausalLM

    model = PhimoeForCausalLM(phimoe_config(vocab_size)).eval()
    init_moe_weights(model, seed)
    save_checkpoint(model, folder, dtype)
    if spelling == "released":
        to_released_spelling(folder)
    return folder


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory):
    """make(dtype, spelling) -> folder of a tiny PhimoeForCausalLM checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("moe")
    made: dict = {}

    def make(dtype: str = "float32", spelling: str = "transformers5") -> Path:
        if (dtype, spelling) not in made:
            made[dtype, spelling] = make_phimoe(root / f"{dtype}-{spelling}", dtype, spelling)
        return made[dtype, spelling]

    return make


# ---------------------------------------------------------------------------------------------------------
# Watching Transformers
# ---------------------------------------------------------------------------------------------------------


class RouterTap:
    """Records Transformers' routing: PhimoeTopKRouter returns (router_logits, routing_weights, selected_experts).
    `calls` holds, per forward pass of the model, per layer (experts (T, 2), weights (T, 2))."""

    def __init__(self, hf):
        self.layers = len(hf.model.layers)
        self.flat: list[tuple[np.ndarray, np.ndarray]] = []
        self.handles = [layer.mlp.router.register_forward_hook(self._hook) for layer in hf.model.layers]

    def _hook(self, module, inputs, output):
        _, weights, experts = output
        self.flat.append((experts.numpy().copy(), weights.float().numpy().copy()))

    @property
    def calls(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        n = self.layers
        return [self.flat[i : i + n] for i in range(0, len(self.flat), n)]

    def close(self):
        for h in self.handles:
            h.remove()


@contextmanager
def transformers_with_long_factors():
    """Transformers' PhimoeRotaryEmbedding.forward with one change: the rope init gets `seq_len`, so past the
    original length it uses the long factors, as the released model's code (and Transformers before 5.x) did."""
    from transformers.models.phimoe import modeling_phimoe

    cls = modeling_phimoe.PhimoeRotaryEmbedding
    original = cls.forward

    @torch.no_grad()
    def forward(self, x, position_ids=None):
        seq_len = int(torch.max(position_ids)) + 1
        rope = self.config.rope_parameters
        mscale = rope["long_mscale"] if seq_len > rope["original_max_position_embeddings"] else rope["short_mscale"]
        inv_freq, _ = self.rope_init_fn(self.config, x.device, seq_len=seq_len)  # the change: seq_len passed
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, n)


def router_margin(model, ids) -> float:
    """The smallest distance, over layers, tokens and both rounds, between a sparsemixer mask decision's
    relative gap and its threshold 2*eps. Below ~1e-5, float32 noise (another BLAS, another CPU) may flip the
    decision and move a weight by 0.1: a comparison there says nothing about correctness."""
    seen = []
    original = phimoe.sparsemixer
    phimoe.sparsemixer = lambda logits, eps: (seen.append(logits.copy()), original(logits, eps))[1]
    try:
        model.forward(ids)
    finally:
        phimoe.sparsemixer = original
    eps2 = 2 * model.config.router_jitter_noise
    margin = np.inf
    for s in seen:  # (T, E) router logits of one layer
        rows = np.arange(s.shape[0])
        e1 = np.argmax(s, axis=-1)
        second = s.copy()
        second[rows, e1] = -np.inf
        for best in (s.max(-1, keepdims=True), second.max(-1, keepdims=True)):
            with np.errstate(divide="ignore", invalid="ignore"):
                gap = (best - s) / np.maximum(np.abs(s), best)
            margin = min(margin, float(np.nanmin(np.abs(gap - eps2))))
    return margin


def clear_prompt(model, n: int, seed: int = 0) -> np.ndarray:
    """The first prompt of length n, from `seed` on, whose routing has no decision within 1e-4 of its threshold."""
    for s in range(seed, seed + 50):
        ids = prompt(n, s)
        if router_margin(model, ids) > 1e-4:
            return ids
    raise AssertionError("no prompt without a near-threshold routing decision")


def hf_forward(hf, ids) -> tuple[np.ndarray, list]:
    tap = RouterTap(hf)
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(np.asarray(ids)[None])).logits[0].float().numpy()
    finally:
        tap.close()
    return logits, tap.calls[0]


def hf_greedy(hf, ids, n: int):
    """Transformers' greedy tokens (no early stop), the smallest top-1/top-2 logit gap, and the routing of
    every forward pass generate made."""
    tap = RouterTap(hf)
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor(np.asarray(ids)[None]), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
    finally:
        tap.close()
    gaps = [float(np.diff(np.sort(step[0].numpy())[-2:])[0]) for step in out.logits]
    return out.sequences[0, len(ids):].tolist(), min(gaps), tap.calls


def assert_same_routing(ours, theirs, where: str = "") -> float:
    """Identical experts for every token and layer; weights within WEIGHT_ATOL. Returns the largest weight diff."""
    assert len(ours) == len(theirs), where
    worst = 0.0
    for layer, ((e, w), (he, hw)) in enumerate(zip(ours, theirs)):
        assert e.shape == he.shape, f"{where} layer {layer}"
        bad = np.flatnonzero((e != he).any(axis=-1))
        assert bad.size == 0, f"{where} layer {layer}: experts differ at tokens {bad[:5]}: {e[bad]} vs {he[bad]}"
        worst = max(worst, float(np.abs(w - hw).max()))
    assert worst <= WEIGHT_ATOL, f"{where}: routing weights differ by {worst:.2e}"
    return worst


def load(folder, backend: str = "numpy"):
    return phinano.load(folder, backend=backend)


# ---------------------------------------------------------------------------------------------------------
# Config, weights and parameter counts
# ---------------------------------------------------------------------------------------------------------


def test_both_config_spellings_read_the_same(moe_checkpoint):
    a = load_config(moe_checkpoint("float32", "transformers5"))
    b = load_config(moe_checkpoint("bfloat16", "released"))
    assert a.is_moe and b.is_moe
    assert dataclasses.replace(a, dtype="-") == dataclasses.replace(b, dtype="-")
    assert (a.dtype, b.dtype) == ("float32", "bfloat16")
    assert a.original_max_position_embeddings == ORIGINAL and a.rope_theta == 10000.0
    assert (a.rope_short_mscale, a.rope_long_mscale) == (1.1, 1.3)
    assert (a.num_local_experts, a.num_experts_per_tok, a.router_jitter_noise) == (16, 2, 0.01)
    # Transformers reads the released spelling to the same rope parameters (the reference below relies on it).
    from transformers import AutoConfig

    ra = AutoConfig.from_pretrained(moe_checkpoint("float32", "transformers5")).rope_parameters
    rb = AutoConfig.from_pretrained(moe_checkpoint("bfloat16", "released")).rope_parameters
    keys = ("rope_theta", "short_factor", "long_factor", "short_mscale", "long_mscale",
            "original_max_position_embeddings")
    assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}


def test_parameter_counts():
    """Total and active counts: the tiny model against Transformers' own numel, the release against its
    published 41.9B / 6.6B."""
    from transformers import PhimoeForCausalLM

    hf = PhimoeForCausalLM(phimoe_config())
    total = sum(p.numel() for p in hf.parameters())
    per_expert = 3 * SPEC["hidden_size"] * SPEC["intermediate_size"]
    active = total - SPEC["num_hidden_layers"] * (SPEC["num_local_experts"] - 2) * per_expert
    cfg = config_from_dict(json.loads(hf.config.to_json_string()))
    assert parameter_counts(cfg) == (total, active)

    release = config_from_dict({
        "architectures": ["PhimoeForCausalLM"], "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 6400,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "attention_bias": True, "lm_head_bias": True, "num_local_experts": 16, "num_experts_per_tok": 2,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False})
    assert parameter_counts(release) == (41_873_153_344, 6_640_999_744)


# ---------------------------------------------------------------------------------------------------------
# Logits and routing against Transformers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,spelling", VARIANTS)
def test_below_original_length_equals_unmodified_transformers(moe_checkpoint, dtype, spelling):
    folder = moe_checkpoint(dtype, spelling)
    hf = hf_reference(folder)
    model = load(folder)
    ids = clear_prompt(model, ORIGINAL)  # the longest prompt that still uses the short factors
    ref, ref_routing = hf_forward(hf, ids)
    out, routing = model.forward(ids, return_routing=True)
    diff = np.abs(out - ref).max()
    wdiff = assert_same_routing(routing, ref_routing)
    below_one = np.mean([(w < 1).mean() for _, w in routing])
    print(f"{dtype}/{spelling} T={ORIGINAL}: max |logit diff| {diff:.2e} of max |logit| {np.abs(ref).max():.1f}, "
          f"max weight diff {wdiff:.1e}, {below_one:.0%} of weights < 1")
    assert diff <= LOGIT_RTOL * np.abs(ref).max()
    assert below_one > 0.2, "routing is degenerate (weights all 1.0): the weights would go untested"
    # The patch used past the original length changes nothing below it.
    with transformers_with_long_factors():
        patched, _ = hf_forward(hf, ids)
    np.testing.assert_array_equal(patched, ref)


@pytest.mark.parametrize("dtype,spelling", VARIANTS)
def test_past_original_length_equals_transformers_with_long_factors(moe_checkpoint, dtype, spelling):
    folder = moe_checkpoint(dtype, spelling)
    hf = hf_reference(folder)
    model = load(folder)
    ids = clear_prompt(model, 100)
    with transformers_with_long_factors():
        ref, ref_routing = hf_forward(hf, ids)
    out, routing = model.forward(ids, return_routing=True)
    diff = np.abs(out - ref).max()
    wdiff = assert_same_routing(routing, ref_routing)
    print(f"{dtype}/{spelling} T=100: max |logit diff| {diff:.2e} of max |logit| {np.abs(ref).max():.1f}, "
          f"max weight diff {wdiff:.1e}")
    assert diff <= LOGIT_RTOL * np.abs(ref).max()
    # Unmodified Transformers 5.23 (short factors at every length) is far away: the documented difference.
    unmodified, _ = hf_forward(hf, ids)
    assert np.abs(out - unmodified).max() > 100 * LOGIT_RTOL * np.abs(ref).max()


@pytest.mark.parametrize("dtype,spelling", VARIANTS)
@pytest.mark.parametrize("prompt_len", [30, 60])
def test_greedy_64_tokens_and_routing_match_transformers(moe_checkpoint, dtype, spelling, prompt_len):
    """30-token prompts cross the original length (48) while generating; 60-token prompts start past it.
    Tokens and the routing of every forward pass must be identical to Transformers (rotary patched to use the
    long factors past the original length)."""
    folder = moe_checkpoint(dtype, spelling)
    hf = hf_reference(folder)
    ids = prompt(prompt_len, seed=prompt_len)
    with transformers_with_long_factors():
        expected, gap, hf_steps = hf_greedy(hf, ids, 64)
    assert gap > 1e-3, "tiny model has a near-tie; the comparison would not be meaningful"
    assert len(set(expected)) > 16, "tiny model fell into a repeat; the comparison would not be meaningful"

    for backend in ("numpy", "numba"):
        recorder = tracing.RoutingLog()
        got = list(generate_tokens(load(folder, backend), ids, 64, stop_token_ids=[], observer=recorder.observer))
        assert got == expected, backend
        assert len(recorder.steps) == len(hf_steps) == 64
        for step, (ours, theirs) in enumerate(zip(recorder.steps, hf_steps)):
            assert_same_routing(ours, theirs, f"{backend} step {step}")

    # Both drop the cache when the sequence first exceeds the original length and re-run all of it: the step
    # that makes the total length 49 sees 49 tokens, every other decode step one.
    rows = [steps[0][0].shape[0] for steps in hf_steps]
    if prompt_len < ORIGINAL:
        crossing = ORIGINAL + 1 - prompt_len  # step index whose forward ends at length 49
        assert rows == [prompt_len] + [1] * (crossing - 1) + [ORIGINAL + 1] + [1] * (63 - crossing)
    else:
        assert rows == [prompt_len] + [1] * 63
    assert rows == [steps[0][0].shape[0] for steps in recorder.steps]

    if prompt_len < ORIGINAL:  # unmodified Transformers agrees on every token drawn before the crossing
        unmodified, _, _ = hf_greedy(hf, ids, ORIGINAL + 1 - prompt_len)
        assert unmodified == expected[: len(unmodified)]


def test_cached_generation_equals_full_recompute(moe_checkpoint):
    """Across the crossing, each cached greedy step picks the argmax of a from-scratch forward over the whole
    sequence, and routes its input token exactly as that forward does."""
    model = load(moe_checkpoint())
    ids = [int(t) for t in prompt(40, seed=3)]
    recorder = tracing.RoutingLog()
    new = list(generate_tokens(model, ids, 20, stop_token_ids=[], observer=recorder.observer))
    for i, token in enumerate(new):
        logits, routing = model.forward(ids + new[:i], return_routing=True)
        assert int(np.argmax(logits[-1])) == token
        step = recorder.steps[i]  # the cached step that drew `token`; its last row is the last input token
        last = [(e[-1:], w[-1:]) for e, w in routing]
        assert_same_routing([(e[-1:], w[-1:]) for e, w in step], last, f"step {i}")


def test_tolerance_catches_moe_bugs(moe_checkpoint):
    """The tolerance is tight enough to see the classic PhiMoE mistakes (docs/pitfalls.md#sparsemixer and
    docs/pitfalls.md#phimoe-layernorm)."""
    folder = moe_checkpoint()
    ids = clear_prompt(load(folder), 40)
    ref, _ = hf_forward(hf_reference(folder), ids)
    limit = 100 * LOGIT_RTOL * np.abs(ref).max()

    def mixtral_top2(logits, eps):  # one softmax over all experts, top-2, renormalised
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
        w = np.take_along_axis(p, top, -1)
        return top, (w / w.sum(-1, keepdims=True)).astype(np.float32)

    model = load(folder)
    original = phimoe.sparsemixer
    try:
        phimoe.sparsemixer = mixtral_top2
        assert np.abs(model.forward(ids) - ref).max() > limit
    finally:
        phimoe.sparsemixer = original
    ops = model.ops
    try:  # RMS norm + bias where PhiMoE has LayerNorm (llama.cpp's Phi-3 graph)
        model.ops = RmsNormInsteadOfLayerNorm(ops)
        assert np.abs(model.forward(ids) - ref).max() > limit
    finally:
        model.ops = ops
    assert np.abs(model.forward(ids) - ref).max() <= LOGIT_RTOL * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------------------
# Expert compute: grouped prefill, 2 experts per decode step
# ---------------------------------------------------------------------------------------------------------


class RmsNormInsteadOfLayerNorm:
    """A kernel backend whose layernorm is RMSNorm plus the bias: a plausible porting slip."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def layernorm(self, x, w, b, eps):
        return self.ops.rmsnorm(x, w, eps) + self.ops.widen(b)


class CountingOps:
    """Wraps a kernel backend and records every weight array handed to `linear` and `embed`."""

    def __init__(self, ops):
        self.ops = ops
        self.read: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def linear(self, x, w, b=None):
        self.read.append(w)
        if b is not None:
            self.read.append(b)
        return self.ops.linear(x, w, b)

    def layernorm(self, x, w, b, eps):
        self.read += [w, b]
        return self.ops.layernorm(x, w, b, eps)

    def embed(self, table, ids):
        self.read.append(table[ids])  # the rows looked up
        return self.ops.embed(table, ids)


def test_decode_step_reads_only_the_two_chosen_experts(moe_checkpoint):
    model = load(moe_checkpoint("bfloat16", "released"))
    ids = prompt(20, seed=7)
    cache = model.new_cache(21)
    model.step(cache, ids, last_only=True)
    counting = CountingOps(model.ops)
    model.ops = counting
    routing: list = []
    model.step(cache, [5], last_only=True, observer={"routing": lambda layer, r: routing.append(r)})
    touched = {id(a) for a in counting.read}
    W = model.weights
    for layer, (experts, _) in zip(W.layers, routing):
        chosen = set(experts[0].tolist())
        assert len(chosen) == 2
        for e, triple in enumerate(layer.experts):
            assert all((id(m) in touched) == (e in chosen) for m in triple), f"expert {e}"
    # Bytes read = norms + attention + router + 2 experts per layer + head + one embedding row: exactly the
    # active parameters, but for the embedding table (one row of it), at 2 bytes per bf16 parameter.
    read = sum(a.nbytes for a in counting.read)
    _, active = model.parameter_counts()
    cfg = model.config
    assert read == 2 * (active - (cfg.vocab_size - 1) * cfg.hidden_size)


def test_prefill_runs_each_expert_once_on_its_group(moe_checkpoint):
    model = load(moe_checkpoint())
    counting = CountingOps(model.ops)
    model.ops = counting
    ids = prompt(30, seed=1)
    logits, routing = model.forward(ids, return_routing=True)
    w1_calls = {}
    for layer, (experts, _) in zip(model.weights.layers, routing):
        for e, (w1, _, _) in enumerate(layer.experts):
            w1_calls[e] = sum(a is w1 for a in counting.read)
            assert w1_calls[e] == int(np.isin(e, experts))  # once if any token chose it, else never


# ---------------------------------------------------------------------------------------------------------
# The sparsemixer rule itself
# ---------------------------------------------------------------------------------------------------------


def hf_sparsemixer(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    with torch.no_grad():
        weights, experts = sparsemixer(torch.from_numpy(np.ascontiguousarray(logits, np.float32)), eps, training=False)
    return experts.numpy(), weights.numpy()


EPS = st.one_of(st.sampled_from([0.0, 0.01, 0.005, 0.1, 0.5, 1.0, 3.0]), st.floats(0.0, 1.0, width=32))
# Logits from a handful of values make ties common; free floats cover the rest (both signs, zero, tiny, large).
FEW = st.sampled_from([float(np.float32(v)) for v in (0.0, -0.0, 1.0, -1.0, 0.99, 1.01, 0.98, 2.5, -2.5, 1e-3, 100.0)])
ANY = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@st.composite
def router_logits(draw):
    T, E = draw(st.integers(1, 4)), draw(st.integers(2, 16))
    return draw(hnp.arrays(np.float32, (T, E), elements=st.one_of(FEW, ANY)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(router_logits(), EPS)
def test_sparsemixer_equals_transformers(logits, eps):
    experts, weights = phimoe.sparsemixer(logits, eps)
    ref_experts, ref_weights = hf_sparsemixer(logits, eps)
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
    assert (experts[:, 0] != experts[:, 1]).all()  # the second expert is never the first
    assert ((weights > 0) & (weights <= 1)).all()
    # Ties go to the first index, as torch.max.
    assert (experts[:, 0] == np.argmax(logits, axis=-1)).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 16), st.floats(-100, 100), EPS)
def test_sparsemixer_all_equal_logits(E, value, eps):
    """All experts tie: experts 0 and 1, weights 1/E and 1/(E-1) (nothing is masked, whatever eps)."""
    experts, weights = phimoe.sparsemixer(np.full((1, E), value, np.float32), eps)
    assert experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(weights[0], [1 / E, 1 / (E - 1)], rtol=1e-6)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, (3, 16), elements=ANY, unique=True))
def test_sparsemixer_eps_limits(logits):
    """eps >= 1: the relative gap never exceeds 2, nothing is masked, the weights are plain softmax
    probabilities (the second one over the experts left). eps = 0: everything below the best is masked, so
    distinct logits give weights of exactly 1."""
    experts, weights = phimoe.sparsemixer(logits, 1.0)
    s = logits.astype(np.float64)
    rows = np.arange(3)
    p1 = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(weights[:, 0], (p1 / p1.sum(-1, keepdims=True))[rows, experts[:, 0]], rtol=1e-5)
    s2 = s.copy()
    s2[rows, experts[:, 0]] = -np.inf
    p2 = np.exp(s2 - s2.max(-1, keepdims=True))
    np.testing.assert_allclose(weights[:, 1], (p2 / p2.sum(-1, keepdims=True))[rows, experts[:, 1]], rtol=1e-5)

    experts0, weights0 = phimoe.sparsemixer(logits, 0.0)
    assert (weights0 == 1.0).all()
    np.testing.assert_array_equal(experts0, experts)  # the experts never depend on eps
    np.testing.assert_array_equal(experts[:, 1], np.argsort(-s, axis=-1, kind="stable")[:, 1])


@settings(max_examples=300, deadline=None)
@given(st.floats(0.01, 1e3), st.sampled_from([0.01, 0.005, 0.1, 0.25]), st.integers(-3, 3), st.floats(-0.3, 0.9))
def test_sparsemixer_at_the_eps_boundary(best, eps, ulps, low):
    """A runner-up whose relative gap to the best is 2*eps give or take a few float32 ulps: masked or not,
    exactly as Transformers decides (same float32 arithmetic, compared in float32)."""
    best = np.float32(best)
    edge = np.float32(best - np.float32(2 * eps) * best)  # gap (best - edge) / best ~ 2*eps
    edge = np.float32(edge + ulps * np.spacing(edge))
    logits = np.array([[low * best, best, edge, -best]], np.float32)
    experts, weights = phimoe.sparsemixer(logits, eps)
    ref_experts, ref_weights = hf_sparsemixer(logits, eps)
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)
    assert experts[0, 0] == 1


# ---------------------------------------------------------------------------------------------------------
# The CLI: info and --show-experts
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_with_tokenizer(moe_checkpoint, tmp_path_factory):
    tiny_models = pytest.importorskip("tiny_models")
    if not hasattr(tiny_models, "add_tiny_tokenizer"):
        pytest.skip("tiny_models.add_tiny_tokenizer not available")
    folder = tmp_path_factory.mktemp("moe-cli") / "model"
    shutil.copytree(moe_checkpoint("bfloat16", "released"), folder)
    tiny_models.add_tiny_tokenizer(folder, VOCAB)
    return folder


def test_cli_info_shows_total_and_active_parameters(moe_with_tokenizer, capsys):
    assert cli_main(["info", "--model", str(moe_with_tokenizer), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    total, active = parameter_counts(load_config(moe_with_tokenizer))
    assert f"{total:,} total, {active:,} active per token" in out
    assert "PhimoeForCausalLM" in out


def test_cli_show_experts(moe_with_tokenizer, capsys):
    """One line per generated token with its experts in every layer: those Model.forward gives the token at its
    own position. The length is chosen so that routing the last token crosses the original length."""
    text = "the quick brown fox"
    model = load(moe_with_tokenizer)
    ids = model.tokenizer.encode(text)
    n = ORIGINAL + 1 - len(ids)
    assert cli_main(["generate", "--model", str(moe_with_tokenizer), "--backend", "numpy", "--show-experts",
                     "-n", str(n), text]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.search(r" L0:\d+\+\d+ L1:\d+\+\d+$", line)]
    assert re.search(r"\[experts used per layer: L0:\d+/16 L1:\d+/16\]", out)
    assert out.splitlines()[0] == text and "" not in out.splitlines(), "the prompt's line, then no blank line"

    new = model.generate(ids, n)  # the model's own stop tokens, as the CLI
    assert len(lines) == len(new), out
    seq = ids + new
    for k, line in enumerate(lines):
        shown = [tuple(map(int, m)) for m in re.findall(r"L\d+:(\d+)\+(\d+)", line)]
        _, routing = model.forward(seq[: len(ids) + k + 1], return_routing=True)  # as generation saw it
        assert shown == [tuple(e[-1].tolist()) for e, _ in routing], f"token {k}: {line}"


def test_show_experts_returns_every_token_with_sampling(moe_checkpoint, capsys):
    """Sampling options come from args; stop tokens end the trace (the stop token itself is shown)."""
    model = load(moe_checkpoint())
    args = argparse.Namespace(max_new_tokens=70, stop=[], temperature=0.8, top_k=20, top_p=0.9, min_p=None,
                              repetition_penalty=1.1, seed=5)
    ids = prompt(10, seed=2)
    stats: dict = {}
    from phinano.cli import sampling_options

    trace = tracing.print_expert_trace(model, ids, args.max_new_tokens, sampling_options(args), args.stop, stats)
    sampled = model.generate(ids, 70, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=5)
    assert [t for t, _ in trace] == sampled
    assert stats["new_tokens"] == len(sampled)
    assert len(capsys.readouterr().out.splitlines()) == len(sampled) + 1  # a line per token, then the footer


def test_cli_show_experts_on_a_dense_model_is_a_clear_error(checkpoint_dir, tmp_path, capsys):
    tiny_models = pytest.importorskip("tiny_models")
    if not hasattr(tiny_models, "add_tiny_tokenizer"):
        pytest.skip("tiny_models.add_tiny_tokenizer not available")
    folder = tmp_path / "dense"
    shutil.copytree(checkpoint_dir("mini-4k"), folder)
    tiny_models.add_tiny_tokenizer(folder, VOCAB)
    assert cli_main(["generate", "--model", str(folder), "--backend", "numpy", "--show-experts", "-n", "3", "hi"]) == 1
    err = capsys.readouterr().err
    assert "--show-experts needs a mixture-of-experts model" in err and "Phi3ForCausalLM" in err


def test_an_absurd_expert_count_is_refused_before_any_list_is_made(moe_checkpoint, tmp_path):
    """Found by fuzzing a PhiMoE GGUF's metadata: an expert count of 2^32 - 1 listed each expert's tensor names
    until memory ran out. More experts than the checkpoint has tensors is one error at once."""
    import json
    import shutil

    folder = tmp_path / "moe"
    shutil.copytree(moe_checkpoint(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 10**6}))
    with pytest.raises(phinano.PhinanoError, match="1000000 experts in each of"):
        phinano.load(folder, backend="numpy")
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 2**32 - 1}))
    with pytest.raises(phinano.PhinanoError, match="'num_local_experts' must be an integer below 2\\^31"):
        phinano.load(folder, backend="numpy")
