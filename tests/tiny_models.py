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


def phi3_config(name: str, layers: int = 2, vocab: int = VOCAB):
    from transformers import Phi3Config

    spec = dict(DENSE_SPECS[name])
    rope = spec.pop("rope", None)
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    rotary = int(head_dim * spec.get("partial_rotary_factor", 1.0))
    kwargs = dict(vocab_size=vocab, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2,
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
                if "embed_tokens" in name or "lm_head" in name:
                    scale = 1.0  # wide logits: top-1/top-2 gaps far above float32 noise
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
              layers: int = 2, vocab: int = VOCAB) -> Path:
    from transformers import Phi3ForCausalLM

    config = phi3_config(name, layers, vocab)
    model = Phi3ForCausalLM(config).eval()
    # A tied head maps the residual stream's own token embedding back onto itself: at std 0.1 the layers
    # are too weak to move it and greedy repeats one token, so tied models get wider layers.
    init_weights(model, seed, std=0.2 if config.tie_word_embeddings else 0.1)
    return save_checkpoint(model, folder, dtype, shard)


def hf_reference(folder: Path):
    """Transformers' model on the saved weights, computing in float32 (bf16 widens to float32 exactly)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model


# ------------------------------------------------------------------ a tiny Phi-3-style tokenizer
TINY_TEXT = [  # lowercase only: capitals and anything else fall back to bytes, as rare characters do in Phi-3
    "the quick brown fox jumps over the lazy dog.",
    "hello, how are you today? i am fine, thank you.",
    "a model reads tokens and writes tokens, one at a time.",
    "the sky is blue because the air scatters blue light more than red light.",
    "write a short poem about the sea and the wind.",
]
CHAT_MARKERS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
PHI35_CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def add_tiny_tokenizer(folder: Path, vocab_size: int = VOCAB) -> dict[str, int]:
    """Write a Phi-3-shaped tokenizer of at most `vocab_size` ids into `folder`; return the chat markers' ids.

    The layout is Phi-3's: <unk> <s> </s> at 0-2, the byte pieces <0x00>..<0xFF> at 3-258 (byte fallback), BPE
    pieces trained here on TINY_TEXT, then the chat markers as added special tokens (rstrip as in Phi-3).
    Normalizer, decoder and the <s>-prepending post-processor are Phi-3's. Also writes tokenizer_config.json
    (Phi-3.5-style chat template) and generation_config.json (stop on <|endoftext|> and <|end|>).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    pieces = vocab_size - 3 - 256 - len(CHAT_MARKERS)  # room left for characters and merges
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")  # merge within words
    trainer_tok.train_from_iterator(TINY_TEXT, trainers.BpeTrainer(vocab_size=pieces, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(trained["vocab"], key=trained["vocab"].get)[:pieces]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in learned:
        vocab.setdefault(piece, len(vocab))
    merges = [m for m in trained["merges"] if "".join(m if isinstance(m, list) else m.split(" ")) in vocab]
    markers = {marker: len(vocab) + i for i, marker in enumerate(CHAT_MARKERS)}
    assert max(markers.values()) < vocab_size

    def added(token_id, content, special=True, rstrip=False):
        return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": rstrip,
                "normalized": False, "special": special}

    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>", special=False, rstrip=True)]
        + [added(i, m, rstrip=m != "<|endoftext|>") for m, i in markers.items()],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "model_max_length": 4096,
        "clean_up_tokenization_spaces": False, "chat_template": PHI35_CHAT_TEMPLATE}, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [markers["<|endoftext|>"], markers["<|end|>"]]}))
    return markers
