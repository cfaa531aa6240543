"""Tiny random checkpoints shaped like each released Phi model, made with Transformers at test time.

Each spec keeps what makes its model different (sliding window, longrope, GQA, partial rotary, tied
embeddings) at a size that runs in milliseconds. Weights are drawn with std 0.1-ish instead of
Transformers' 0.02: at 0.02 tiny models fall into repeating one token and hide bugs, while a wider init
makes every step's greedy choice depend on the whole context, with a top-1/top-2 logit gap far above
float32 noise (the tests check that gap; see test_parity.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

VOCAB = 320  # tiny vocab, enough for the Phi-3 special ids not to matter

# name -> (Phi3Config keyword arguments); comments say which released model it mirrors and why.
DENSE_SPECS: dict[str, dict] = {
    # Phi-3-mini-4k: MHA, default rope, sliding window (2047 in the release; 24 here so prompts cross it)
    "mini-4k": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, intermediate_size=160,
                    sliding_window=24, max_position_embeddings=256, original_max_position_embeddings=256),
    # Phi-3-mini-128k / Phi-3.5-mini: longrope with short/long factors, original length 48 of 512
    "mini-128k": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, intermediate_size=160,
                      sliding_window=1024, max_position_embeddings=512, original_max_position_embeddings=48,
                      rope="longrope"),
    # Phi-3-medium: grouped-query attention 4:1, default rope, sliding window
    "medium": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, intermediate_size=224,
                   sliding_window=30, max_position_embeddings=256, original_max_position_embeddings=256),
    # Phi-4-mini: GQA 3:1, partial rotary 0.75 (rotary 12 of head dim 16), tied embeddings, longrope
    "4-mini": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96, intermediate_size=192,
                   sliding_window=1024, max_position_embeddings=512, original_max_position_embeddings=48,
                   partial_rotary_factor=0.75, tie_word_embeddings=True, rope="longrope"),
}


def _factors(n: int, start: float, stop: float) -> list[float]:
    return [start + (stop - start) * i / max(1, n - 1) for i in range(n)]


def phi3_config(name: str, layers: int = 2):
    from transformers import Phi3Config

    spec = dict(DENSE_SPECS[name])
    rope = spec.pop("rope", None)
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    rotary = int(head_dim * spec.get("partial_rotary_factor", 1.0))
    kwargs = dict(vocab_size=VOCAB, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  rope_theta=10000.0, rms_norm_eps=1e-5, **spec)
    if rope == "longrope":
        kwargs["rope_scaling"] = {"type": "longrope", "short_factor": _factors(rotary // 2, 1.0, 1.6),
                                  "long_factor": _factors(rotary // 2, 1.0, 9.0)}
    return Phi3Config(**kwargs)


def init_weights(model, seed: int, std: float = 0.1) -> None:
    """Deterministic wide init: normal(0, std) for matrices (scaled by 1/sqrt(fan-in/64)), ~1 for norms."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                scale = std * math.sqrt(64 / p.shape[1]) if p.shape[1] > 64 else std
                if "embed_tokens" in name:
                    scale = 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g))


def save_checkpoint(model, folder: Path, dtype: str = "float32", shard: bool = False) -> Path:
    """save_pretrained in the given dtype, one file or several shards, plus a generation_config.json."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = model.to(torch_dtype)
    kwargs = {"max_shard_size": "100KB"} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    model.to(torch.float32)
    return folder


def make_phi3(folder: Path, name: str, dtype: str = "float32", shard: bool = False, seed: int = 0,
              layers: int = 2) -> Path:
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM(phi3_config(name, layers)).eval()
    init_weights(model, seed)
    return save_checkpoint(model, folder, dtype, shard)


def hf_reference(folder: Path):
    """Transformers' model on the saved weights, computing in float32 (bf16 widens to float32 exactly)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model
