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
from typing import NoReturn

from .errors import PhinanoError

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM", "PhimoeForCausalLM", "Phi3SmallForCausalLM", "Phi3VForCausalLM")
_MODEL_TYPES = {"phi3": "Phi3ForCausalLM", "phimoe": "PhimoeForCausalLM", "phi3small": "Phi3SmallForCausalLM",
                "phi3_v": "Phi3VForCausalLM"}
_ROPE_TYPES = ("default", "longrope", "su")  # "su" is what early Phi-3 revisions called longrope


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
    # --- Phi-3-small only (defaults leave every other model unchanged; values are Phi-3-small-8k's) ---
    rope_position_scale: float = 1.0  # positions are multiplied by this before rotating: 1.0
    embedding_multiplier: float = 1.0  # muP: embeddings are multiplied by `mup_embedding_multiplier`: 10.0
    logit_divisor: float = 1.0  # muP: logits are divided by `mup_width_multiplier`: 8.0
    softmax_scale: float | None = None  # scores = q.k * this; None = 1/sqrt(HD). muP: mup_attn_multiplier/HD = 1/128
    gegelu_limit: float | None = None  # 20.0: the GEGELU clamps its inputs at this
    dense_attention_every_n_layers: int | None = None  # 2: layer i is dense when (i+1) % 2 == 0, else blocksparse
    blocksparse_block_size: int = 64  # tokens per block of the blocksparse pattern
    blocksparse_num_local_blocks: int = 16  # a query sees the last 16 blocks (its own included) ...
    blocksparse_vert_stride: int = 8  # ... and every 8th block before them (the "vertical stride")
    blocksparse_homo_head_pattern: bool = False  # False: each query head shifts its vertical blocks by one
    dummy_token_ids: tuple[int, ...] = ()  # vocabulary slots the tokenizer never produces; their logits are masked

    @property
    def is_phi3small(self) -> bool:
        return self.architecture == "Phi3SmallForCausalLM"

    @property
    def has_vision(self) -> bool:  # Phi-3-vision / Phi-3.5-vision: a CLIP tower and projector (phinano/vision/)
        return self.architecture == "Phi3VForCausalLM"

    @property
    def is_moe(self) -> bool:
        return self.architecture == "PhimoeForCausalLM"

    @property
    def q_size(self) -> int:  # H * HD rows of Q in the fused qkv projection
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:  # KVH * HD rows each of K and V
        return self.num_key_value_heads * self.head_dim


_ABSENT = object()  # default for a key that must be present


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Values:
    """Typed getters over config.json or its rope dicts. Each returns the value (a key set to null counts as
    absent) or raises one PhinanoError naming the key, e.g. "'hidden_size' must be a positive integer, got 'x'".

    `layers` are (prefix, dict) pairs searched in order: the rope settings live in `rope_parameters`
    (Transformers 5), `rope_scaling` (the release) or at the top level, and the first one that has a key wins.
    """

    def __init__(self, where: str, *layers: tuple[str, dict]):
        self.where = where
        self.layers = layers

    def _lookup(self, key: str, default):
        """(the key's name as written in the file, its value or `default`, whether it was given)."""
        for prefix, values in self.layers:
            if values.get(key) is not None:
                return prefix + key, values[key], True
        name = (self.layers[0][0] if self.layers else "") + key
        if default is _ABSENT:
            raise PhinanoError(f"{self.where}: required key '{name}' is missing")
        return name, default, False

    def fail(self, message: str) -> NoReturn:
        raise PhinanoError(f"{self.where}: {message}")

    def _wrong(self, name: str, expected: str, value) -> NoReturn:
        self.fail(f"'{name}' must be {expected}, got {_show(value)}")

    def section(self, key: str) -> tuple[str, dict]:
        """A nested object such as rope_scaling: (its prefix for key names, the dict; {} when absent)."""
        name, value, given = self._lookup(key, {})
        if given and not isinstance(value, dict):
            self._wrong(name, "an object", value)
        return name + ".", value

    def integer(self, key: str, default=_ABSENT, minimum: int = 1) -> int:
        name, value, given = self._lookup(key, default)
        if given and (not _is_int(value) or value < minimum):
            self._wrong(name, "a positive integer" if minimum == 1 else f"an integer >= {minimum}", value)
        if given and value >= 2**31:  # no size, length or id of a real model comes near; a damaged one would
            self._wrong(name, "an integer below 2^31", value)  # overflow the int64 of the kernels or memory
        return value

    def number(self, key: str, default=_ABSENT, rule: str = "positive") -> float:
        """A finite number within `rule`: "positive" (> 0), "non-negative" (>= 0) or "fraction" (0 < x <= 1)."""
        check, expected = _NUMBER_RULES[rule]
        name, value, given = self._lookup(key, default)
        if given and not (_is_number(value) and math.isfinite(value) and check(value)):
            self._wrong(name, expected, value)
        return float(value) if given else value

    def numbers(self, key: str, count: int, why: str) -> tuple[float, ...]:
        """A list of `count` positive numbers (the longrope factors); `why` explains the count."""
        name, value, _ = self._lookup(key, _ABSENT)
        if not isinstance(value, list) or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in value):
            self._wrong(name, "a list of positive numbers", value)
        if len(value) != count:
            self.fail(f"'{name}' has {len(value)} entries, expected {count} ({why})")
        return tuple(float(v) for v in value)

    def flag(self, key: str, default: bool) -> bool:
        name, value, given = self._lookup(key, default)
        if given and not isinstance(value, bool):
            self._wrong(name, "true or false", value)
        return value

    def text(self, key: str, default: str | None, one_of: tuple[str, ...] | None = None) -> str | None:
        name, value, given = self._lookup(key, default)
        if given and not isinstance(value, str):
            self._wrong(name, "a string", value)
        if given and one_of is not None and value not in one_of:
            self._wrong(name, "one of " + ", ".join(one_of), value)
        return value

    def texts(self, key: str) -> list[str]:
        name, value, given = self._lookup(key, [])
        if given and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            self._wrong(name, "a list of strings", value)
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        """A token id or a list of them (eos_token_id); () when absent."""
        name, value, given = self._lookup(key, [])
        ids = [value] if _is_int(value) else value
        if given and not (isinstance(ids, list) and all(_is_int(i) and i >= 0 for i in ids)):
            self._wrong(name, "a token id or a list of token ids", value)
        return tuple(ids)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_NUMBER_RULES = {
    "positive": (lambda x: x > 0, "a positive number"),
    "non-negative": (lambda x: x >= 0, "a number >= 0"),
    "fraction": (lambda x: 0 < x <= 1, "a number in (0, 1]"),
}


def _architecture(top: _Values) -> str:
    """The supported class named by `architectures`, or implied by `model_type` when no class is named."""
    # The Phi-3.5-MoE release spells the class "PhiMoEForCausalLM"; Transformers calls it "PhimoeForCausalLM".
    archs = ["PhimoeForCausalLM" if a == "PhiMoEForCausalLM" else a for a in top.texts("architectures")]
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    model_type = top.text("model_type", None)
    if arch is None and not archs and model_type in _MODEL_TYPES:
        arch = _MODEL_TYPES[model_type]
    if arch is None:
        top.fail(f"unsupported architecture ('architectures' {', '.join(archs) or 'not given'}, 'model_type' "
                 f"{model_type or 'not given'}); phinano runs {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def config_from_dict(raw: dict, where: str = "config.json") -> Config:
    """Build a Config from the parsed config.json (either spelling); every value is checked, and a bad one
    raises one PhinanoError naming its key."""
    if not isinstance(raw, dict):
        raise PhinanoError(f"{where}: must hold a JSON object, got {type(raw).__name__}")
    top = _Values(where, ("", raw))
    arch = _architecture(top)
    if arch == "Phi3SmallForCausalLM":
        return _phi3small_config(top, raw)
    is_moe = arch == "PhimoeForCausalLM"

    hidden = top.integer("hidden_size")
    heads = top.integer("num_attention_heads")
    kv_heads = top.integer("num_key_value_heads", heads)
    if heads % kv_heads:
        top.fail(f"'num_attention_heads' ({heads}) must be a multiple of 'num_key_value_heads' ({kv_heads})")
    head_dim = top.integer("head_dim", None)
    head_dim_from = f"'head_dim' {head_dim}"
    if head_dim is None:
        if hidden % heads:
            top.fail(f"'hidden_size' ({hidden}) must be a multiple of 'num_attention_heads' ({heads}) "
                     "when 'head_dim' is not given")
        head_dim = hidden // heads
        head_dim_from = f"head dim {head_dim} = 'hidden_size' / 'num_attention_heads'"
    max_pos = top.integer("max_position_embeddings")
    if top.text("hidden_act", "silu") != "silu":  # Transformers would run whatever ACT2FN names; phinano runs SwiGLU
        top.fail("'hidden_act' must be \"silu\" (the activation of every Phi-3, Phi-3.5, Phi-4-mini and PhiMoE "
                 "release; phinano's MLP is SwiGLU)")

    # Rotary: Transformers 5 keeps everything in `rope_parameters`; the release keeps `rope_theta` and
    # `rope_scaling` at the top level (PhiMoE puts original_max_position_embeddings inside rope_scaling).
    sections = [top.section("rope_parameters"), top.section("rope_scaling")]
    rope = _Values(where, *[(prefix, d) for prefix, d in sections if d])  # what only the rope dicts hold
    rope_or_top = _Values(where, *rope.layers, ("", raw))  # what either place may hold
    theta = rope_or_top.number("rope_theta", 10000.0)
    rope_type = rope.text("rope_type", None, _ROPE_TYPES) or rope.text("type", "default", _ROPE_TYPES)
    if rope_type == "su":  # the name early Phi-3 revisions used for longrope
        rope_type = "longrope"
    partial = rope_or_top.number("partial_rotary_factor", 1.0, rule="fraction")
    rotary_dim = int(head_dim * partial)
    rotary_from = f"{head_dim_from} x 'partial_rotary_factor' {partial:g}"
    if rotary_dim < 2 or rotary_dim % 2:
        top.fail(f"rotary dims must be a positive even number, got {rotary_dim} = {rotary_from}")
    original_max = rope_or_top.integer("original_max_position_embeddings", max_pos)

    short = long = None
    attention_factor = 1.0
    short_mscale = long_mscale = None
    if rope_type == "longrope":
        why = f"rotary dims / 2, rotary dims {rotary_dim} = {rotary_from}"
        short = rope.numbers("short_factor", rotary_dim // 2, why)
        long = rope.numbers("long_factor", rotary_dim // 2, why)
        # Transformers' rule: an explicit attention_factor wins; else sqrt(1 + ln(s)/ln(original)) where the
        # scale s is `factor` or max/original. It multiplies cos and sin at every length.
        attention_factor = rope.number("attention_factor", None)
        if attention_factor is None:
            attention_factor = 1.0
            scale = rope.number("factor", max_pos / original_max)
            if scale > 1.0:
                if original_max < 2:
                    top.fail(f"'original_max_position_embeddings' must be at least 2 for longrope, got {original_max}")
                attention_factor = math.sqrt(1 + math.log(scale) / math.log(original_max))
        short_mscale = rope.number("short_mscale", None)
        long_mscale = rope.number("long_mscale", None)
        if (short_mscale is None) != (long_mscale is None):
            top.fail("'short_mscale' and 'long_mscale' must be given together")

    if arch == "Phi3VForCausalLM":
        _check_vision(top)
    window = top.integer("sliding_window", None)
    experts = top.integer("num_local_experts", 16, minimum=2) if is_moe else 0
    per_token = top.integer("num_experts_per_tok", 2) if is_moe else 0
    if is_moe and per_token != 2:
        top.fail(f"'num_experts_per_tok' must be 2 (the sparsemixer picks two experts), got {per_token}")
    return Config(
        architecture=arch,
        vocab_size=top.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=top.integer("intermediate_size"),
        num_hidden_layers=top.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=top.number("rms_norm_eps", 1e-5),
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
        sliding_window=window,
        attention_bias=top.flag("attention_bias", is_moe),
        tie_word_embeddings=top.flag("tie_word_embeddings", False),
        lm_head_bias=top.flag("lm_head_bias", False),
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        router_jitter_noise=top.number("router_jitter_noise", 0.01, rule="non-negative") if is_moe else 0.0,
        bos_token_id=top.integer("bos_token_id", None, minimum=0),
        eos_token_id=top.token_ids("eos_token_id"),
        pad_token_id=top.integer("pad_token_id", None, minimum=0),
        dtype=top.text("dtype", None) or top.text("torch_dtype", "float32"),
        raw=raw,
    )


# Phi-3-small's vocabulary slots that its tokenizer never produces: the padding "dummy" tokens (100256, 100264,
# 100265, 100267-100275 and 100277-100351) and the cl100k specials it does not use (<|fim_prefix|>,
# <|fim_middle|>, <|fim_suffix|>, <|endofprompt|>). The released model sets their logits to the float32 minimum.
PHI3SMALL_DUMMY_TOKEN_IDS = (100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352))


def _released_mscale(rope: _Values, key: str, default: float) -> float:
    """Phi-3-small-128k's short_mscale / long_mscale: the value when it is > 0, else `default`."""
    name, value, given = rope._lookup(key, None)
    if given and not (_is_number(value) and math.isfinite(value)):
        rope._wrong(name, "a number", value)
    return float(value) if given and value > 0 else default


def _phi3small_config(top: _Values, raw: dict) -> Config:
    """Phi-3-small (configuration_phi3_small.py): its own key names, muP multipliers, GEGELU, blocksparse
    attention, and for the 128k model "su"/longrope rotary with its own mscale rules."""
    hidden = top.integer("hidden_size")
    heads = top.integer("num_attention_heads")
    kv_heads = top.integer("num_key_value_heads", 8)
    if hidden % heads or heads % kv_heads:
        top.fail(f"'hidden_size' ({hidden}) must be a multiple of 'num_attention_heads' ({heads}), and that of "
                 f"'num_key_value_heads' ({kv_heads})")
    head_dim = hidden // heads  # the released code has no head_dim key
    max_pos = top.integer("max_position_embeddings", 8192)
    if top.text("hidden_act", "gegelu") != "gegelu":
        top.fail("'hidden_act' must be \"gegelu\" (the only activation Phi-3-small has)")
    # ff_intermediate_size, or ff_dim_multiplier * (hidden // 3) * 2 rounded up to 256 (gegelu_pad_to_256).
    ff_size, ff_multiplier = top.integer("ff_intermediate_size", None), top.integer("ff_dim_multiplier", None)
    if (ff_size is None) == (ff_multiplier is None):
        top.fail("exactly one of 'ff_intermediate_size' and 'ff_dim_multiplier' must be given")
    if ff_size is None:
        ff_size = ff_multiplier * (hidden // 3) * 2
        if top.flag("gegelu_pad_to_256", True):
            ff_size = -(-ff_size // 256) * 256

    # Rotary (positional_embedding.py): NeoX pairing over the whole head, base `rope_embedding_base`, positions
    # times `rope_position_scale`. The 128k model adds rope_scaling {type "su"/"longrope", short/long factors,
    # original length 8192}, and its longrope branch does not scale positions. Unlike Phi-3-mini, short_mscale
    # defaults to 1.0 (not the attention factor) and long_mscale to sqrt(1 + ln(s) / ln(original)), s = max /
    # original positions; the release's "not given" is any value <= 0 (its default -1).
    prefix, scaling = top.section("rope_scaling")
    rope = _Values(top.where, (prefix, scaling))
    rope_type, position_scale = "default", top.number("rope_position_scale", 1.0)
    original_max, short, long, short_mscale, long_mscale = max_pos, None, None, None, None
    if scaling:
        rope.text("type", None, ("su", "longrope")) or rope.text("rope_type", "su", ("su", "longrope"))
        rope_type, position_scale = "longrope", 1.0  # "su" is the released name
        original_max = rope.integer("original_max_position_embeddings", minimum=2)
        why = f"head dim / 2, head dim {head_dim} = 'hidden_size' / 'num_attention_heads'"
        short = rope.numbers("short_factor", head_dim // 2, why)
        long = rope.numbers("long_factor", head_dim // 2, why)
        scale = max_pos / original_max
        short_mscale = _released_mscale(rope, "short_mscale", 1.0)
        long_mscale = _released_mscale(rope, "long_mscale",
                                       math.sqrt(1 + math.log(scale) / math.log(original_max)) if scale > 1 else 1.0)

    every = top.integer("dense_attention_every_n_layers", 2, minimum=0) or None  # 0 / null: no dense layer
    block = top.integer("blocksparse_block_size", 64)
    local = top.integer("blocksparse_num_local_blocks", 16)
    stride = top.integer("blocksparse_vert_stride", 8)
    attn_multiplier = top.number("mup_attn_multiplier", 1.0)
    vocab = top.integer("vocab_size", 100352)
    eos = top.token_ids("eos_token_id") or (100257,)
    return Config(
        architecture="Phi3SmallForCausalLM",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ff_size,
        num_hidden_layers=top.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=top.number("layer_norm_epsilon", 1e-5),  # a LayerNorm eps here, as for PhiMoE
        max_position_embeddings=max_pos,
        rope_theta=top.number("rope_embedding_base", 1e6),
        rope_type=rope_type,
        rotary_dim=head_dim,
        original_max_position_embeddings=original_max,
        rope_short_factor=short,
        rope_long_factor=long,
        rope_attention_factor=1.0,
        rope_short_mscale=short_mscale,
        rope_long_mscale=long_mscale,
        sliding_window=None,
        attention_bias=True,
        tie_word_embeddings=top.flag("tie_word_embeddings", True),
        lm_head_bias=False,
        num_local_experts=0,
        num_experts_per_tok=0,
        router_jitter_noise=0.0,
        bos_token_id=top.integer("bos_token_id", 100257, minimum=0),
        eos_token_id=eos,
        pad_token_id=top.integer("pad_token_id", None, minimum=0),
        dtype=top.text("torch_dtype", None) or top.text("dtype", "bfloat16"),
        raw=raw,
        rope_position_scale=position_scale,
        embedding_multiplier=top.number("mup_embedding_multiplier", 0.0, rule="non-negative") or 1.0,
        logit_divisor=top.number("mup_width_multiplier", 0.0, rule="non-negative") or 1.0,
        softmax_scale=attn_multiplier / head_dim if top.flag("mup_use_scaling", True) else None,
        gegelu_limit=top.number("gegelu_limit", 20.0),
        dense_attention_every_n_layers=every,
        blocksparse_block_size=block,
        blocksparse_num_local_blocks=local,
        blocksparse_vert_stride=stride,
        blocksparse_homo_head_pattern=top.flag("blocksparse_homo_head_pattern", False),
        dummy_token_ids=tuple(i for i in PHI3SMALL_DUMMY_TOKEN_IDS if i < vocab),
    )


def _check_vision(top: _Values) -> None:
    """Phi-3-vision's image settings: phinano runs the released design (CLIP ViT-L/14-336 features from its
    second-to-last layer, HD transform with learned separators in "sub_glb" order, two-layer projector)."""
    prefix, processor = top.section("img_processor")
    if processor.get("name", "clip_vision_model") != "clip_vision_model":
        top.fail(f"'{prefix}name' must be 'clip_vision_model', got {_show(processor.get('name'))}")
    for key, want in (("image_dim_out", 1024), ("num_img_tokens", 144), ("layer_idx", -2), ("type_feature", "patch")):
        if processor.get(key, want) != want:
            top.fail(f"'{prefix}{key}' must be {want!r} (CLIP ViT-L/14-336 as released), got {_show(processor[key])}")
    prefix, layer = top.section("embd_layer")
    for key, want in (("embedding_cls", "image"), ("projection_cls", "mlp"), ("use_hd_transform", True),
                      ("with_learnable_separator", True), ("hd_transform_order", "sub_glb")):
        if layer.get(key, want) != want:
            top.fail(f"'{prefix}{key}' must be {want!r} (the released Phi-3-vision design), got {_show(layer[key])}")


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PhinanoError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise PhinanoError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    return raw


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
        ids = _Values(str(path), ("", _read_json(path))).token_ids("eos_token_id")
        if ids:
            return ids
    return config.eos_token_id


def load_sampling_defaults(folder: str | Path) -> dict:
    """The model's own sampling defaults from generation_config.json, as Transformers' generate() would
    use them: {} (greedy) unless it sets do_sample, else its temperature / top_k / top_p / min_p /
    repetition_penalty. Released Phi-3 checkpoints set none of these, so they stay greedy.

    Only the types are checked here; the ranges are phinano.sampling's rules, applied where the defaults are
    used."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    values = _Values(str(path), ("", _read_json(path)))
    if not values.flag("do_sample", False):
        return {}
    defaults = {"temperature": 1.0}
    for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = values.number(key, None, rule="non-negative")
        if value is not None:
            defaults[key] = value
    top_k = values.integer("top_k", None, minimum=0)
    return defaults if top_k is None else {**defaults, "top_k": top_k}
