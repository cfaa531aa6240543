"""Worked example of Phi-3.5-MoE routing on a tiny random model: the numbers in docs/moe.md come from here.

    python scripts/moe_example.py            # makes the tiny model in a temp folder, prints the walk-through

The tiny model has the release's structure (16 experts, top-2 sparsemixer with eps = 0.01, LayerNorm, biases)
at hidden size 64, written with NumPy only (no torch needed). Its router rows share a common part so that
router logits sit close together and the masks keep more than one expert now and then, which is when the
sparsemixer's weights differ from 1.0.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import phinano
from phinano.blocks import phimoe as moe
from phinano.formats.safetensors import write_safetensors

D, F, E, L, H, KVH, V = 64, 96, 16, 2, 4, 2, 320
HD = D // H


def make_tiny_phimoe(folder: Path, seed: int = 0) -> Path:
    """A random PhimoeForCausalLM checkpoint in the release layout (config.json in the released spelling)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.3):
        fan_in = shape[-1]
        return (std * np.sqrt(64 / max(fan_in, 64)) * rng.standard_normal(shape)).astype(np.float32)

    def vec(base, n=D):
        return (base + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32),
         "model.norm.weight": vec(1.0), "model.norm.bias": vec(0.0),
         "lm_head.weight": normal(V, D), "lm_head.bias": vec(0.0, V)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": vec(1.0), p + "input_layernorm.bias": vec(0.0),
              p + "post_attention_layernorm.weight": vec(1.0), p + "post_attention_layernorm.bias": vec(0.5)}
        for name, rows in (("q_proj", H * HD), ("k_proj", KVH * HD), ("v_proj", KVH * HD), ("o_proj", D)):
            t[p + f"self_attn.{name}.weight"] = normal(rows, D)
            t[p + f"self_attn.{name}.bias"] = vec(0.0, rows)
        t[p + "block_sparse_moe.gate.weight"] = (0.1 + 0.05 * rng.standard_normal((E, D))).astype(np.float32)
        for e in range(E):
            x = p + f"block_sparse_moe.experts.{e}."
            t |= {x + "w1.weight": normal(F, D), x + "w3.weight": normal(F, D), x + "w2.weight": normal(D, F)}
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", t)
    rotary = HD // 2
    config = {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "vocab_size": V, "hidden_size": D,
        "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KVH,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "attention_bias": True, "lm_head_bias": True,
        "num_local_experts": E, "num_experts_per_tok": 2, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "rope_theta": 10000.0, "torch_dtype": "float32",
        "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.6 * i / (rotary - 1) for i in range(rotary)],
                         "long_factor": [1.0 + 8.0 * i / (rotary - 1) for i in range(rotary)],
                         "short_mscale": 1.1, "long_mscale": 1.3, "original_max_position_embeddings": 48},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def fmt(values, width=6, digits=2) -> str:
    """A row of numbers; NaN (not applicable) shows as '-'."""
    return " ".join(f"{'-':>{width}}" if np.isnan(v) else f"{v:>{width}.{digits}f}" for v in values)


def probs(experts, p) -> str:
    return ", ".join(f"{e}: {float(v):.4f}" for e, v in zip(experts, p))


def explain(s: np.ndarray, eps: float) -> None:
    """Walk one token's router logits s (E,) through the sparsemixer, then through Mixtral's rule."""
    s = s[None, :].astype(np.float32)  # (1, E)
    print("  expert       " + " ".join(f"{e:>6d}" for e in range(E)))
    print("  logit s      " + fmt(s[0]))

    e1, w1, masked1 = moe.sparsemixer_round(s, s, eps)
    m1 = s[0, e1[0]]
    gap1 = (m1 - s[0]) / np.maximum(np.abs(s[0]), m1)
    print(f"round 1: best expert e1 = {e1[0]} (s = {m1:.4f})")
    print("  rel. gap     " + fmt(gap1, digits=3))
    kept1 = np.flatnonzero(~masked1[0])
    print(f"  kept (gap <= 2*eps = {2 * eps:g}): experts {kept1.tolist()}")
    p1 = np.exp(s[0, kept1] - m1) / np.exp(s[0, kept1] - m1).sum()
    print(f"  softmax over the kept: {{{probs(kept1, p1)}}} -> w1 = {w1[0]:.4f}")

    without = s.copy()
    without[0, e1[0]] = -np.inf
    e2, w2, masked2 = moe.sparsemixer_round(s, without, eps)
    m2 = s[0, e2[0]]
    gap2 = (m2 - s[0]) / np.maximum(np.abs(s[0]), m2)
    print(f"round 2: expert {e1[0]} removed; best e2 = {e2[0]} (s = {m2:.4f})")
    print("  rel. gap     " + fmt(np.where(np.arange(E) == e1[0], np.nan, gap2), digits=3))
    kept2 = np.flatnonzero(~masked2[0] & np.isfinite(without[0]))
    p2 = np.exp(s[0, kept2] - m2) / np.exp(s[0, kept2] - m2).sum()
    print(f"  kept: experts {kept2.tolist()}; softmax over the kept: {{{probs(kept2, p2)}}} -> w2 = {w2[0]:.4f}")
    print(f"sparsemixer: out = {w1[0]:.4f} * expert_{e1[0]}(x) + {w2[0]:.4f} * expert_{e2[0]}(x)"
          f"   (w1 + w2 = {w1[0] + w2[0]:.4f})")

    p = np.exp(s[0] - s[0].max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:2]
    print(f"Mixtral top-2: softmax over all 16 gives {p[top[0]]:.4f} and {p[top[1]]:.4f}; renormalised: "
          f"out = {p[top[0]] / p[top[:2]].sum():.4f} * expert_{top[0]}(x) + "
          f"{p[top[1]] / p[top[:2]].sum():.4f} * expert_{top[1]}(x)")


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "tiny-phimoe"
    model = phinano.load(make_tiny_phimoe(folder), backend="numpy")
    eps = model.config.router_jitter_noise
    ids = [1, 17, 42, 99, 7, 256, 13, 64, 200, 5, 88, 150]

    # Listen in on the router: every call of the sparsemixer gets the router logits (T, E) of one layer.
    logits_seen = []
    sparsemixer = moe.sparsemixer
    moe.sparsemixer = lambda logits, eps: (logits_seen.append(logits.copy()), sparsemixer(logits, eps))[1]
    try:
        _, routing = model.forward(ids, return_routing=True)
    finally:
        moe.sparsemixer = sparsemixer

    print(f"Tiny PhiMoE: {L} layers, hidden {D}, {E} experts of width {F}, eps = {eps}; prompt of {len(ids)} tokens\n")
    print("Routing from model.forward(ids, return_routing=True), layer 0 (experts, weights) per token:")
    experts, weights = routing[0]
    for t in range(len(ids)):
        print(f"  token {t:2d} (id {ids[t]:3d}): experts {experts[t, 0]:2d} + {experts[t, 1]:2d}, "
              f"weights {weights[t, 0]:.4f}, {weights[t, 1]:.4f}")
    share = np.mean([(w < 1).mean() for _, w in routing])
    print(f"  ({share:.0%} of all weights in both layers are below 1.0)\n")

    plain = next(t for t in range(len(ids)) if (weights[t] == 1).all())
    close = next(t for t in range(len(ids)) if weights[t, 0] < 1)
    for t, why in ((plain, "both weights 1.0, the usual case"), (close, "a close call: w1 < 1")):
        print(f"--- layer 0, token {t} ({why}) ---")
        explain(logits_seen[0][t], eps)
        print()

    print("Grouped expert compute in the prefill, layer 0: each chosen expert runs once on its tokens")
    for e in np.unique(experts):
        rows, slots = np.nonzero(experts == e)
        print(f"  expert {e:2d}: tokens " + ", ".join(f"{r} ({['1st', '2nd'][k]})" for r, k in zip(rows, slots)))
    unused = sorted(set(range(E)) - set(np.unique(experts).tolist()))
    print(f"  experts never chosen (their weights are not read): {unused}\n")

    mistakes(model, ids)


def mixtral_top2(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Mixtral's routing, for comparison: one softmax over all experts, the top 2, renormalised to sum 1."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    w = np.take_along_axis(p, top, -1)
    return top, (w / w.sum(-1, keepdims=True)).astype(np.float32)


class RmsNormInsteadOfLayerNorm:
    """The kernel backend with layernorm replaced by RMSNorm plus the bias."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def layernorm(self, x, w, b, eps):
        return self.ops.rmsnorm(x, w, eps) + self.ops.widen(b)


def mistakes(model, ids) -> None:
    """What two known porting mistakes do to this model's logits."""
    good = model.forward(ids)
    ops = model.ops

    sparsemixer = moe.sparsemixer
    moe.sparsemixer = mixtral_top2
    try:
        mixtral = model.forward(ids)
    finally:
        moe.sparsemixer = sparsemixer
    # llama.cpp's shared Phi-3 graph: RMS norm (no mean subtracted), then weight and bias.
    model.ops = RmsNormInsteadOfLayerNorm(ops)
    try:
        rms = model.forward(ids)
    finally:
        model.ops = ops
    print(f"Porting mistakes on this model ({len(ids)} positions; max |logit| {np.abs(good).max():.2f}):")
    for name, bad in (("Mixtral top-2 softmax routing", mixtral), ("RMSNorm + bias instead of LayerNorm", rms)):
        changed = int((bad.argmax(-1) != good.argmax(-1)).sum())
        print(f"  {name:<36} max |logit change| {np.abs(bad - good).max():.3f}; "
              f"greedy next token changes at {changed} of {len(ids)} positions")


if __name__ == "__main__":
    main()
