"""config.json -> one flat dataclass, for every Phi model phinano runs.

Two spellings of the same facts exist in the wild, and both are read here, once:

- the released checkpoints (2024): `rope_theta` and `rope_scaling` at top level, `rope_scaling.type` of
  `"longrope"` or the older `"su"`, `torch_dtype`;
- Transformers 5 `save_pretrained`: a `rope_parameters` dict holding `rope_theta`, `rope_type`,
  `partial_rotary_factor` and `original_max_position_embeddings`, and `dtype`.

Shape letters used across phinano (one legend, everywhere):
    T tokens in this forward, S cached positions, D hidden, H query heads, KVH key/value heads,
    HD head dim, R rotary dims, F MLP width, E experts, V vocab, L layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PhinanoError

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM", "PhimoeForCausalLM")
_MODEL_TYPES = {"phi3": "Phi3ForCausalLM", "phimoe": "PhimoeForCausalLM"}


@dataclass(frozen=True)
class Config:
    """Every number the forward pass needs. Comments give the Phi-3-mini-4k-instruct value."""

    architecture: str  # "Phi3ForCausalLM" (dense) or "PhimoeForCausalLM" (Phi-3.5-MoE)
    vocab_size: int  # V: 32064 embedding rows (the tokenizer has 32011 tokens; the rest is padding)
    hidden_size: int  # D: 3072
    intermediate_size: int  # F: 8192 (per expert for PhiMoE: 6400)
    num_hidden_layers: int  # L: 32
    num_attention_heads: int  # H: 32
    num_key_value_heads: int  # KVH: 32 (Phi-3-medium 10, Phi-4-mini 8: grouped-query attention)
    head_dim: int  # HD: 96 = D / H
    rms_norm_eps: float  # 1e-5 (PhiMoE uses it as its LayerNorm eps)
    max_position_embeddings: int  # 4096 (131072 for the 128k / 3.5 models)
    # --- rotary position embedding ---
    rope_theta: float  # 10000.0
    rope_type: str  # "default" or "longrope" ("su" is read as "longrope")
    rotary_dim: int  # R: 96 = HD * partial_rotary_factor (Phi-4-mini: 96 of 128)
    original_max_position_embeddings: int  # 4096: past this length longrope switches to long factors
    rope_short_factor: tuple[float, ...] | None  # R/2 per-frequency divisors used up to the original length
    rope_long_factor: tuple[float, ...] | None  # R/2 divisors used past it
    rope_attention_factor: float  # multiplies cos and sin: 1.0, or 1.19024 for 131072/4096 longrope
    rope_short_mscale: float | None  # PhiMoE only: replaces the attention factor up to the original length
    rope_long_mscale: float | None  # PhiMoE only: ... and past it
    # --- attention ---
    sliding_window: int | None  # 2047: a query sees at most this many keys, itself included; None = all
    attention_bias: bool  # False (PhiMoE: True, biases on q, k, v and o)
    # --- head and embeddings ---
    tie_word_embeddings: bool  # False (Phi-4-mini: True, lm_head reuses the embedding table)
    lm_head_bias: bool  # False (PhiMoE: True)
    # --- mixture of experts (PhiMoE only) ---
    num_local_experts: int  # E: 0 for dense models, 16 for Phi-3.5-MoE
    num_experts_per_tok: int  # 2
    router_jitter_noise: float  # 0.01: the sparsemixer's relative-gap threshold is 2x this
    # --- special tokens and storage ---
    bos_token_id: int | None  # 1
    eos_token_id: tuple[int, ...]  # (32000,) from config.json; generation stops on generation_config's list
    pad_token_id: int | None  # 32000
    dtype: str  # dtype the checkpoint says it was saved in: "bfloat16"
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # config.json as read

    @property
    def is_moe(self) -> bool:
        return self.architecture == "PhimoeForCausalLM"

    @property
    def q_size(self) -> int:  # H * HD rows of Q in the fused qkv projection
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:  # KVH * HD rows each of K and V
        return self.num_key_value_heads * self.head_dim


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _require(raw: dict, key: str, where: str):
    if key not in raw or raw[key] is None:
        raise PhinanoError(f"{where}: required key '{key}' is missing")
    return raw[key]


def config_from_dict(raw: dict, where: str = "config.json") -> Config:
    """Build a Config from the parsed config.json (either spelling)."""
    # The Phi-3.5-MoE release spells the class "PhiMoEForCausalLM"; Transformers calls it "PhimoeForCausalLM".
    archs = ["PhimoeForCausalLM" if a == "PhiMoEForCausalLM" else a for a in raw.get("architectures") or []]
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and raw.get("model_type") in _MODEL_TYPES and not archs:
        arch = _MODEL_TYPES[raw["model_type"]]
    if arch is None:
        named = ", ".join(archs) or f"model_type {raw.get('model_type')!r}"
        raise PhinanoError(
            f"{where}: unsupported architecture {named}; phinano runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    hidden = int(_require(raw, "hidden_size", where))
    heads = int(_require(raw, "num_attention_heads", where))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    max_pos = int(_require(raw, "max_position_embeddings", where))

    # Rotary: Transformers 5 keeps everything in `rope_parameters`; the release keeps `rope_theta` and
    # `rope_scaling` at the top level (PhiMoE puts original_max_position_embeddings inside rope_scaling).
    rope = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    rope = {**scaling, **rope}
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "su":  # the name early Phi-3 revisions used for longrope
        rope_type = "longrope"
    if rope_type not in ("default", "longrope"):
        raise PhinanoError(f"{where}: unsupported rope type {rope_type!r} (phinano knows default and longrope)")
    partial = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) or 1.0)
    rotary_dim = int(head_dim * partial)
    original_max = int(
        rope.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") or max_pos
    )

    short = long = None
    attention_factor = 1.0
    short_mscale = long_mscale = None
    if rope_type == "longrope":
        short = tuple(float(f) for f in _require(rope, "short_factor", f"{where} rope_scaling"))
        long = tuple(float(f) for f in _require(rope, "long_factor", f"{where} rope_scaling"))
        for name, factors in (("short_factor", short), ("long_factor", long)):
            if len(factors) != rotary_dim // 2:
                raise PhinanoError(
                    f"{where}: rope {name} has {len(factors)} entries, expected rotary_dim/2 = {rotary_dim // 2}"
                )
        # Transformers' rule: an explicit attention_factor wins; else sqrt(1 + ln(s)/ln(original)) where the
        # scale s is `factor` or max/original. It multiplies cos and sin at every length.
        if rope.get("attention_factor") is not None:
            attention_factor = float(rope["attention_factor"])
        else:
            scale = float(rope.get("factor") or max_pos / original_max)
            if scale > 1.0:
                attention_factor = math.sqrt(1 + math.log(scale) / math.log(original_max))
        if "short_mscale" in rope:
            short_mscale = float(rope["short_mscale"])
            long_mscale = float(rope["long_mscale"])

    is_moe = arch == "PhimoeForCausalLM"
    window = raw.get("sliding_window")
    return Config(
        architecture=arch,
        vocab_size=int(_require(raw, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", where)),
        num_hidden_layers=int(_require(raw, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_type=rope_type,
        rotary_dim=rotary_dim,
        original_max_position_embeddings=original_max,
        rope_short_factor=short,
        rope_long_factor=long,
        rope_attention_factor=attention_factor,
        rope_short_mscale=short_mscale,
        rope_long_mscale=long_mscale,
        sliding_window=int(window) if window is not None else None,
        attention_bias=bool(raw.get("attention_bias", is_moe)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        lm_head_bias=bool(raw.get("lm_head_bias", False)),
        num_local_experts=int(raw.get("num_local_experts", 16)) if is_moe else 0,
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)) if is_moe else 0,
        router_jitter_noise=float(raw.get("router_jitter_noise", 0.01)) if is_moe else 0.0,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_ids(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        raw=raw,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PhinanoError(f"{path}: not valid JSON ({e})") from None


def load_config(folder: str | Path) -> Config:
    """Read `<folder>/config.json`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PhinanoError(f"{path}: no config.json in the model folder")
    return config_from_dict(_read_json(path), where=str(path))


def load_stop_ids(folder: str | Path, config: Config) -> tuple[int, ...]:
    """The token ids generation stops on: generation_config.json's eos list (Phi-3 instruct: <|endoftext|>,
    <|assistant|>, <|end|> = 32000, 32001, 32007), else config.json's eos id."""
    path = Path(folder) / "generation_config.json"
    if path.is_file():
        ids = _ids(_read_json(path).get("eos_token_id"))
        if ids:
            return ids
    return config.eos_token_id


def load_sampling_defaults(folder: str | Path) -> dict:
    """The model's own sampling defaults from generation_config.json, as Transformers' generate() would
    use them: {} (greedy) unless it sets do_sample, else its temperature / top_k / top_p / min_p /
    repetition_penalty. Released Phi-3 checkpoints set none of these, so they stay greedy."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    raw = _read_json(path)
    if not raw.get("do_sample"):
        return {}
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    return {"temperature": 1.0, **{k: raw[k] for k in keys if raw.get(k) is not None}}
