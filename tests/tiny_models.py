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


# ------------------------------------------------------------------ Phi-4 (14B) and Phi-4-reasoning(-plus)
# Full Phi3Config keyword arguments. Neither release has a sliding window ("sliding_window": null) or rope
# scaling ("rope_scaling": null); their config.json spelling is written by `to_phi4_release`.
PHI4_SPECS: dict[str, dict] = {
    # Phi-4: GQA 4:1 (40/10 in the release), rope_theta 250000, 16384 positions, untied head
    "phi-4": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, intermediate_size=224,
                  rope_theta=250000.0, max_position_embeddings=16384),
    # Phi-4-reasoning and -plus: the same network with rope_theta 500000 and 32768 positions
    "phi-4-reasoning": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, intermediate_size=224,
                            rope_theta=500000.0, max_position_embeddings=32768),
}


def make_phi4(folder: Path, name: str, dtype: str = "bfloat16", seed: int = 0, layers: int = 2,
              vocab: int = VOCAB) -> Path:
    """A tiny Phi-4-shaped checkpoint in the released layout: config.json spelled as the release spells it,
    shards `model-0000i-of-0000n.safetensors` with their index, and `rotary_emb.inv_freq` buffers beside the
    weights (as checkpoints saved by older Transformers carry them)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    spec = PHI4_SPECS[name]
    config = Phi3Config(vocab_size=vocab, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        rms_norm_eps=1e-5, sliding_window=None, original_max_position_embeddings=spec[
                            "max_position_embeddings"], **spec)
    model = Phi3ForCausalLM(config).eval()
    init_weights(model, seed)
    save_checkpoint(model, folder, dtype, shard=True)
    to_phi4_release(folder)
    add_inv_freq(folder)
    return folder


def to_phi4_release(folder: Path) -> None:
    """Rewrite config.json in the released Phi-4 spelling (Transformers 4.47): rope_theta at the top level,
    "rope_scaling": null, "sliding_window": null, torch_dtype, an empty auto_map."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta"))
    raw.update(rope_scaling=None, sliding_window=None, auto_map={}, attention_bias=False, embd_pdrop=0.0,
               resid_pdrop=0.0, torch_dtype=raw.pop("dtype", "bfloat16"), transformers_version="4.47.0")
    path.write_text(json.dumps(raw, indent=2))


def add_inv_freq(folder: Path) -> None:
    """Add a `model.layers.i.self_attn.rotary_emb.inv_freq` buffer per layer to the first shard and the index."""
    import torch
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(folder / first)
    raw = json.loads((folder / "config.json").read_text())
    head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    theta = raw.get("rope_theta") or raw["rope_parameters"]["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    for i in range(raw["num_hidden_layers"]):
        name = f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
        tensors[name] = inv_freq.clone()
        index["weight_map"][name] = first
    save_file(tensors, folder / first, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))


# ------------------------------------------------------------------ a tiny Phi-4-style (GPT-2 byte-level) tokenizer
# The released Phi-4 tokenizer is tiktoken's cl100k vocabulary as a byte-level BPE tokenizer.json; its special
# tokens sit at 100257 and up. These are the ones its templates use, in the release's order.
PHI4_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"]
PHI4_REASONING_MARKERS = ["<think>", "</think>"]  # Phi-4-reasoning: added tokens, not special (shown by decode)
PHI4_CHAT_TEMPLATE = (  # microsoft/phi-4's tokenizer_config.json chat_template
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
# Phi-4-reasoning's shape: the reasoning system prompt (shortened here) written when the conversation has none.
PHI4_REASONING_SYSTEM = ("You are Phi, a language model trained by Microsoft to help users. Please structure your "
                         "response into two main sections: Thought and Solution using the specified format: "
                         "<think> {Thought section} </think> {Solution section}.")
PHI4_REASONING_TEMPLATE = (
    "{% if messages|length == 0 or messages[0]['role'] != 'system' %}"
    "{{'<|im_start|>system<|im_sep|>" + PHI4_REASONING_SYSTEM + "<|im_end|>'}}{% endif %}"
    + PHI4_CHAT_TEMPLATE)


def add_phi4_tokenizer(folder: Path, reasoning: bool = False, vocab_size: int = VOCAB,
                       corpus: list[str] = TINY_TEXT) -> dict[str, int]:
    """Write a Phi-4-shaped byte-level BPE tokenizer into `folder`; return the added tokens' ids.

    As in the release: GPT-2's byte-level pre-tokenizer (with the cl100k split regex), decoder and
    post-processor (no BOS is added: `encode` gives the text's tokens only), the 256 byte symbols then merges
    learnt here on `corpus`, the special tokens of PHI4_SPECIAL (and with `reasoning` the non-special
    `<think>` / `</think>`), tokenizer_config.json with bos `<|endoftext|>`, eos `<|im_end|>`, pad `<|dummy_85|>`
    and Phi-4's chat template (Phi-4-reasoning's with `reasoning`), and generation_config.json stopping on
    `<|im_end|>` (and `<|endoftext|>`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    added = PHI4_SPECIAL + (PHI4_REASONING_MARKERS if reasoning else [])
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")  # cl100k's
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(added), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    spec = json.loads(backend.to_str())
    base = len(spec["model"]["vocab"])
    ids = {token: base + i for i, token in enumerate(added)}
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": t not in PHI4_REASONING_MARKERS} for t, i in ids.items()]
    assert max(ids.values()) < vocab_size
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False, "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>", "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False, "model_max_length": 16384, "tokenizer_class": "GPT2Tokenizer",
        "chat_template": PHI4_REASONING_TEMPLATE if reasoning else PHI4_CHAT_TEMPLATE}, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
         "pad_token_id": ids["<|dummy_85|>"]}))
    return ids
