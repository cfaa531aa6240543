"""Write a checkpoint of a real Phi configuration with random bf16 weights, laid out like the release.

    python scripts/make_random_checkpoint.py --out /tmp/phi3-mini-random
    python scripts/make_random_checkpoint.py --out /tmp/phi4 --config phi-4-mini --layers 2 --seed 1
    python scripts/make_random_checkpoint.py --out /tmp/x --config path/to/config.json

What it writes into --out:
- config.json: the released config.json of the named model (the dicts below), or the given file, with
  num_hidden_layers replaced by --layers;
- generation_config.json: the release's stop ids;
- the weights under the release's tensor names and shapes (Phi3ForCausalLM: fused qkv_proj and
  gate_up_proj; PhimoeForCausalLM: separate q/k/v with biases, 16 experts of w1/w3/w2), all BF16, in the
  order Transformers saves them, split greedily into shards of at most --shard-size bytes (5 GB like
  `save_pretrained`): `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` with
  metadata.total_size. When everything fits in one shard Transformers writes a single
  `model.safetensors` without an index, and so does this script (use a small --shard-size to get shards).

It streams: each file's safetensors header is computed and written first, then each tensor is generated
and written a block of rows at a time (<= 64 MB of float32), so memory stays far below the model's size.

Weights: normal, std 0.02 (Transformers' initializer_range), the residual-branch outputs (o_proj,
down_proj, w2) scaled by 1/sqrt(2 L) as in GPT-2 so that the residual stream stays O(1) through all
layers; norm weights 1, norm biases 0, linear biases (PhiMoE) std 0.02. Each tensor's values depend only
on --seed and the tensor's name, so --layers 2 gives the same first two layers as the full model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from phinano.formats.safetensors import to_bf16_bits, write_safetensors  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Released config.json contents, as published with each model on the Hugging Face Hub (microsoft/<name>);
# the longrope factor lists as noted at each list. docs/pitfalls.md explains the values engines get wrong.
# ---------------------------------------------------------------------------------------------------------

_PHI3_AUTO_MAP = {
    "AutoConfig": "configuration_phi3.Phi3Config",
    "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
}

# Phi-3-mini-128k-instruct: these are the lists of the first (April 2024) revision, which spelled the type
# "su" (also used by Phi-3-vision; long_factor[0] = 1.03). Current main has different values
# (long_factor[0] = 1.07) that we could not retrieve. The type is written as "longrope", the name every
# later revision uses (Transformers 5.23 cannot load "su" configs, see docs/pitfalls.md#su-rope-type).
_MINI_128K_LONG = [
    1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968,
    1.2299998998641968, 1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525,
    1.8999998569488525, 2.859999895095825, 3.68999981880188, 5.419999599456787, 5.489999771118164,
    5.489999771118164, 9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
    15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055, 30.009998321533203,
    32.35000228881836, 32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156,
    56.20000457763672, 57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844,
    61.190006256103516, 61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
    63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922, 64.760009765625,
    64.80001068115234, 64.81001281738281, 64.81001281738281,
]  # fmt: skip
_MINI_128K_SHORT = [
    1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002, 1.4000000000000004,
    1.4500000000000004, 1.5500000000000005, 1.8500000000000008, 1.9000000000000008, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.1000000000000005, 2.1000000000000005, 2.2,
    2.3499999999999996, 2.3499999999999996, 2.3499999999999996, 2.3499999999999996, 2.3999999999999995,
    2.3999999999999995, 2.6499999999999986, 2.6999999999999984, 2.8999999999999977, 2.9499999999999975,
    3.049999999999997, 3.049999999999997, 3.049999999999997,
]  # fmt: skip

# Phi-3.5-mini-instruct: exact lists (verbatim copy of the microsoft config.json).
_PHI35_MINI_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]  # fmt: skip
_PHI35_MINI_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]  # fmt: skip

# Phi-4-mini-instruct: exact lists (verbatim copy of the microsoft config.json).
_PHI4_MINI_LONG = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533,
    5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651,
    14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1,
    32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]  # fmt: skip


def _monotone(head: list[float], length: int, end: float) -> list[float]:
    """`head`, then a geometric ramp up to `end`: a made-up but plausible non-decreasing factor list."""
    start = head[-1]
    rest = length - len(head)
    return head + [round(start * (end / start) ** ((i + 1) / rest), 6) for i in range(rest)]


# Phi-3.5-MoE-instruct: the exact 64-entry lists were not available. The first eight entries are the
# release's (as copied into public test configs); the rest is GENERATED: a monotone geometric ramp to
# plausible end values (long ~64 like the other 128k models, short ~2.8 like Phi-3.5-mini's).
_PHI35_MOE_LONG = _monotone([1.0199999809265137, 1.0299999713897705, 1.0399999618530273, 1.0499999523162842,
                             1.0499999523162842, 1.0499999523162842, 1.059999942779541, 1.059999942779541], 64, 64.0)
_PHI35_MOE_SHORT = _monotone([1.0, 1.0399999618530273, 1.0399999618530273, 1.0399999618530273,
                              1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842], 64, 2.8)

_MINI_4K = {
    "_name_or_path": "Phi-3-mini-4k-instruct",
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": _PHI3_AUTO_MAP,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.2",
    "use_cache": True,
    "vocab_size": 32064,
}

_MINI_128K = {
    **_MINI_4K,
    "_name_or_path": "Phi-3-mini-128k-instruct",
    "max_position_embeddings": 131072,
    "rope_scaling": {"long_factor": _MINI_128K_LONG, "short_factor": _MINI_128K_SHORT, "type": "longrope"},
    "sliding_window": 262144,
}

_MEDIUM_4K = {
    "_name_or_path": "Phi-3-medium-4k-instruct",
    "architectures": ["Phi3ForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": _PHI3_AUTO_MAP,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 17920,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 10,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "attention_bias": False,
    "vocab_size": 32064,
}

_PHI35_MINI = {
    "_name_or_path": "Phi-3.5-mini-instruct",
    "architectures": ["Phi3ForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": _PHI3_AUTO_MAP,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": _PHI35_MINI_LONG, "short_factor": _PHI35_MINI_SHORT, "type": "longrope"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "use_cache": True,
    "attention_bias": False,
    "vocab_size": 32064,
}

_PHI4_MINI = {
    "_name_or_path": "Phi-4-mini-instruct",
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {**_PHI3_AUTO_MAP, "AutoTokenizer": "Xenova/gpt-4o"},
    "bos_token_id": 199999,
    "embd_pdrop": 0.0,
    "eos_token_id": 199999,
    "full_attn_mod": 1,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "interpolate_factor": 1,
    "lm_head_bias": False,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "phi3",
    "num_attention_heads": 24,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 199999,
    "partial_rotary_factor": 0.75,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": _PHI4_MINI_LONG, "short_factor": [1.0] * 48, "type": "longrope"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0",
    "use_cache": True,
    "vocab_size": 200064,
}

_PHI35_MOE = {
    "_name_or_path": "Phi-3.5-MoE-instruct",
    "architectures": ["PhiMoEForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_phimoe.PhiMoEConfig",
        "AutoModelForCausalLM": "modeling_phimoe.PhiMoEForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "input_jitter_noise": 0.01,
    "intermediate_size": 6400,
    "lm_head_bias": True,
    "max_position_embeddings": 131072,
    "model_type": "phimoe",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 16,
    "original_max_position_embeddings": 4096,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "long_factor": _PHI35_MOE_LONG,
        "long_mscale": 1.243163121016122,
        "original_max_position_embeddings": 4096,
        "short_factor": _PHI35_MOE_SHORT,
        "short_mscale": 1.243163121016122,
        "type": "longrope",
    },
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.0,
    "router_jitter_noise": 0.01,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "use_cache": True,
    "vocab_size": 32064,
}

CONFIGS = {
    "phi-3-mini-4k": _MINI_4K,
    "phi-3-mini-128k": _MINI_128K,
    "phi-3-medium-4k": _MEDIUM_4K,
    "phi-3.5-mini": _PHI35_MINI,
    "phi-4-mini": _PHI4_MINI,
    "phi-3.5-moe": _PHI35_MOE,
}

# generation_config.json: the release's stop lists (docs/pitfalls.md#stop-tokens). Phi-3-medium's file was not
# read; it is the same size as mini's and is assumed to say the same.
_PHI3_GENERATION = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
GENERATION_CONFIGS = {
    "phi-3-mini-4k": _PHI3_GENERATION,
    "phi-3-mini-128k": _PHI3_GENERATION,
    "phi-3-medium-4k": _PHI3_GENERATION,
    "phi-3.5-mini": {**_PHI3_GENERATION, "eos_token_id": [32007, 32001, 32000]},
    "phi-4-mini": {"_from_model_config": True, "bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999},
    "phi-3.5-moe": _PHI3_GENERATION,
}

DEFAULT_SHARD_SIZE = 5 * 10**9  # save_pretrained's max_shard_size="5GB"
_CHUNK_BYTES = 64 << 20  # float32 bytes generated at a time
INIT_STD = 0.02


def resolve_config(spec: str) -> tuple[str, dict]:
    """A model name ("phi-3-mini-4k", "microsoft/Phi-3.5-mini-instruct", ...) or a config.json path ->
    (short name or "custom", config dict)."""
    path = Path(spec)
    if path.is_file() or spec.endswith(".json"):
        return "custom", json.loads(path.read_text(encoding="utf-8"))
    key = spec.lower().removeprefix("microsoft/").removesuffix("-instruct")
    if key not in CONFIGS:
        raise SystemExit(f"unknown config {spec!r}: give a config.json path or one of {', '.join(CONFIGS)}")
    return key, copy.deepcopy(CONFIGS[key])


# ---------------------------------------------------------------------------------------------------------
# Tensor list, in the order Transformers' state dict has them
# ---------------------------------------------------------------------------------------------------------


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """[(name, shape, kind)] with kind one of "matrix", "residual" (output projections), "norm", "zero",
    "bias", in Transformers' module order (embed, layers, final norm, head)."""
    D = int(cfg["hidden_size"])
    H = int(cfg["num_attention_heads"])
    KVH = int(cfg.get("num_key_value_heads") or H)
    HD = int(cfg.get("head_dim") or D // H)
    F = int(cfg["intermediate_size"])
    V = int(cfg["vocab_size"])
    L = int(cfg["num_hidden_layers"])
    q, kv = H * HD, KVH * HD
    archs = cfg.get("architectures") or []
    moe = cfg.get("model_type") == "phimoe" or any(a.lower() == "phimoeforcausallm" for a in archs)
    bias = bool(cfg.get("attention_bias", moe))
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (V, D), "matrix")]
    for i in range(L):
        p = f"model.layers.{i}."
        if moe:
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                specs.append((p + f"self_attn.{name}.weight", (rows, D), "matrix"))
                if bias:
                    specs.append((p + f"self_attn.{name}.bias", (rows,), "bias"))
            specs.append((p + "self_attn.o_proj.weight", (D, q), "residual"))
            if bias:
                specs.append((p + "self_attn.o_proj.bias", (D,), "bias"))
            specs.append((p + "block_sparse_moe.gate.weight", (int(cfg.get("num_local_experts", 16)), D), "matrix"))
            for e in range(int(cfg.get("num_local_experts", 16))):
                x = p + f"block_sparse_moe.experts.{e}."
                specs += [(x + "w1.weight", (F, D), "matrix"), (x + "w2.weight", (D, F), "residual"),
                          (x + "w3.weight", (F, D), "matrix")]  # fmt: skip
            specs += [(p + "input_layernorm.weight", (D,), "norm"), (p + "input_layernorm.bias", (D,), "zero"),
                      (p + "post_attention_layernorm.weight", (D,), "norm"),
                      (p + "post_attention_layernorm.bias", (D,), "zero")]  # fmt: skip
        else:
            specs += [
                (p + "self_attn.o_proj.weight", (D, q), "residual"),
                (p + "self_attn.qkv_proj.weight", (q + 2 * kv, D), "matrix"),
                (p + "mlp.gate_up_proj.weight", (2 * F, D), "matrix"),
                (p + "mlp.down_proj.weight", (D, F), "residual"),
                (p + "input_layernorm.weight", (D,), "norm"),
                (p + "post_attention_layernorm.weight", (D,), "norm"),
            ]
    specs.append(("model.norm.weight", (D,), "norm"))
    if moe:
        specs.append(("model.norm.bias", (D,), "zero"))
    if not cfg.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (V, D), "matrix"))
    if cfg.get("lm_head_bias", False):
        specs.append(("lm_head.bias", (V,), "bias"))
    return specs


def plan_shards(specs, max_bytes: int) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Greedy split in order, like save_pretrained: a new shard starts when the next tensor would overflow."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = 2 * math.prod(spec[1])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def _chunks(name: str, shape: tuple[int, ...], kind: str, seed: int, std: float, residual_std: float):
    """The tensor's bf16 bits, a block of rows at a time (each tensor has its own seeded stream)."""
    if kind in ("norm", "zero"):
        yield np.full(shape, 0x3F80 if kind == "norm" else 0, np.uint16)  # bf16 bits of 1.0 and 0.0
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    scale = np.float32(residual_std if kind == "residual" else std)
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for r in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        block *= scale
        yield to_bf16_bits(block)


def write_shard(path: Path, specs, seed: int, std: float, residual_std: float) -> int:
    """One .safetensors file, streamed by phinano's writer: header first, then each tensor's rows."""
    return write_safetensors(path, [(name, np.uint16, shape, lambda name=name, shape=shape, kind=kind:
                                     _chunks(name, shape, kind, seed, std, residual_std))
                                    for name, shape, kind in specs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight checkpoint of a real Phi configuration.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--config", default="phi-3-mini-4k",
                        help=f"model name ({', '.join(CONFIGS)}) or a config.json path; default phi-3-mini-4k")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_SIZE, help="max bytes per shard (default 5e9)")
    parser.add_argument("--std", type=float, default=INIT_STD, help="std of the random weights (default 0.02)")
    args = parser.parse_args(argv)

    name, cfg = resolve_config(args.config)
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit("--layers must be at least 1")
        cfg["num_hidden_layers"] = args.layers
    specs = tensor_specs(cfg)
    residual_std = args.std / math.sqrt(2 * int(cfg["num_hidden_layers"]))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    generation = GENERATION_CONFIGS.get(name) or {
        k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    shards = plan_shards(specs, int(args.shard_size))
    total = sum(2 * math.prod(shape) for _, shape, _ in specs)
    print(f"{name}: {len(specs)} tensors, {total / 1e9:.2f} GB of bf16 in {len(shards)} file(s) -> {out}", flush=True)
    if len(shards) == 1:
        write_shard(out / "model.safetensors", specs, args.seed, args.std, residual_std)
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            size = write_shard(out / filename, shard, args.seed, args.std, residual_std)
            weight_map.update({tensor: filename for tensor, _, _ in shard})
            print(f"  {filename}: {len(shard)} tensors, {size / 1e9:.2f} GB", flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (out / "model.safetensors").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
