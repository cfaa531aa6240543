"""Train the two nano models that ship inside phinano: nano-phi3 and nano-phimoe.

A development-time tool, never an engine dependency: it needs torch, transformers and tokenizers, and trains
on the CPU. Both models learn Python from the standard library of the interpreter running this script
(found through `sysconfig`, so every machine has the data); a fixed, named set of modules is held out for
evaluation. The result is two ordinary Hugging Face checkpoints that phinano loads through exactly the same
code as a Hub checkpoint:

    <out>/nano-phi3/    Phi3ForCausalLM    (LongRoPE + a sliding window, GQA 6:2, RMSNorm, fused qkv/gate_up)
    <out>/nano-phimoe/  PhimoeForCausalLM  (16 experts, top-2 sparsemixer, LayerNorm, biases, GQA 8:2)

each holding config.json, model.safetensors (bfloat16), generation_config.json, tokenizer.json,
tokenizer_config.json and training_log.json.

    python scripts/train_nano.py                      # both models, the shipped recipe (~30 min on 2 cores)
    python scripts/train_nano.py --quick              # smoke run: a few steps, written to build/nano-quick
    python scripts/train_nano.py --model nano-phimoe --steps 50 --out /tmp/nano

Reproducible: everything random (tokenizer data order, model init, batch sampling, the sparsemixer's Gumbel
noise during training) flows from --seed; float results are bit-identical for the same --threads, torch and
transformers versions and Python stdlib. The loss curve picture is drawn by scripts/plot_nano.py.

Sections, in the order the script runs: 1 data · 2 tokenizer · 3 model configs · 4 training · 5 evaluation
and samples · 6 saving · 7 command line.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# 1. Data: the Python standard library's own source
# ---------------------------------------------------------------------------------------------------------------

# Directories (any path component) left out of the corpus: installed third-party packages, the test suites
# (17 MB, mostly repetitive asserts), IDLE, and generated tables (codec tables in encodings/, the pydoc topic
# dump in pydoc_data/).
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
                       "encodings", "pydoc_data", "__pycache__"})

# Held out for evaluation, never trained on (paths relative to the stdlib root). About 3% of the corpus:
# algorithms (heapq, bisect, graphlib), numerics (fractions, statistics, colorsys), text (textwrap, shlex,
# string, difflib, calendar) and one package (json). All exist in every CPython since 3.9.
HELD_OUT = ("bisect.py", "calendar.py", "colorsys.py", "difflib.py", "fractions.py", "graphlib.py", "heapq.py",
            "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
            "shlex.py", "statistics.py", "string.py", "textwrap.py")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus(root: Path) -> tuple[list[Path], list[Path]]:
    """All .py files of the stdlib (sorted, so the split is reproducible) → (train files, held-out files)."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(path)
    held = set(HELD_OUT)
    train = [p for p in files if p.relative_to(root).as_posix() not in held]
    heldout = [p for p in files if p.relative_to(root).as_posix() in held]
    missing = held - {p.relative_to(root).as_posix() for p in heldout}
    if missing:
        raise SystemExit(f"held-out modules missing from {root}: {sorted(missing)}")
    return train, heldout


def read_source(path: Path) -> str:
    # Files are UTF-8 (PEP 3120); a few carry \r or form feeds, which the tokenizer's byte fallback handles.
    return path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# 2. Tokenizer: Phi-3's SentencePiece-style BPE layout, 4,096 pieces, trained on the training split
# ---------------------------------------------------------------------------------------------------------------
# The finished tokenizer.json has exactly the structure of Phi-3's released tokenizer.json: normalizer
# Prepend("▁") + Replace(" " → "▁"), *no* pre-tokenizer (BPE runs over each whole segment between added
# tokens), BPE with byte fallback, ids 0/1/2 = <unk>/<s>/</s>, 3…258 = <0x00>…<0xFF>, the Phi-3 added tokens
# right after the base vocabulary (4096…4106 here, 32000…32010 in Phi-3), a post-processor that prepends <s>,
# and the decoder Replace("▁" → " ") → ByteFallback → Fuse → Strip(1 leading space). So phinano's tokenizer
# path meets the same quirks as with real Phi-3 (the dummy-prefix ▁ after every added token, rstrip on the
# chat markers, the leading-space strip on decode).
#
# Only for *training* the merges, text is split into SentencePiece-like words: a run of spaces keeps all but
# its last ▁ as one piece and the last ▁ starts the next word (as SentencePiece does, so "        return" is
# "▁▁▁▁▁▁▁" + "▁return", not eight "▁"), and a newline joins the indentation that follows it ("\n▁▁▁").
# Indentation is a fifth of the stdlib's characters (spaces in all, 29%); without these pieces a 512-token
# window would hold little code. The corpus is then encoded with the finished tokenizer, so training and inference see identical ids.

BASE_VOCAB = 4096                     # BPE pieces, including <unk>, <s>, </s> and the 256 byte tokens
SPECIAL_BASE = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
# Phi-3's added tokens, in Phi-3's order; (content, rstrip). Ids BASE_VOCAB + index.
ADDED_TOKENS = [("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True),
                ("<|placeholder2|>", True), ("<|placeholder3|>", True), ("<|placeholder4|>", True),
                ("<|system|>", True), ("<|end|>", True), ("<|placeholder5|>", True), ("<|placeholder6|>", True),
                ("<|user|>", True)]
VOCAB_SIZE = 4160                     # embedding rows: 4096 + 11 added, padded to a multiple of 64 (Phi-3: 32064)
BOS_ID, EOS_ID = 1, BASE_VOCAB        # <s>; <|endoftext|> (Phi-3: 1, 32000)
END_ID, ASSISTANT_ID = BASE_VOCAB + 7, BASE_VOCAB + 1   # <|end|>, <|assistant|> (Phi-3: 32007, 32001)
GENERATION_EOS = [EOS_ID, ASSISTANT_ID, END_ID]         # Phi-3-mini / 3.5-MoE order: 32000, 32001, 32007

# Training-only word splitter, applied to normalised text (spaces already ▁). Alternatives, in order:
# newline(s) + indentation minus the last ▁ (which starts the next word) | newline(s) + trailing ▁s |
# a space run minus its last ▁ | [▁]identifier-or-number | [▁]punctuation run | leftover ▁s | other whitespace.
_TRAIN_SPLIT = r"\n+▁*?(?=▁[^▁\s])|\n+▁*|▁+?(?=▁[^▁\s])|▁?[A-Za-z_0-9]+|▁?[^▁\sA-Za-z_0-9]+|▁+|\s"

# Phi-3.5-style chat template (no BOS; system turn skipped when empty). The nano models never saw chat data:
# the template is here so that phinano's chat path can be exercised end to end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def train_tokenizer(texts: list[str]):
    """BPE merges learned on `texts`, assembled into Phi-3's tokenizer layout (a `tokenizers.Tokenizer`)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_TRAIN_SPLIT), behavior="isolated")
    alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n", "\t"]   # printable ASCII; the rest byte-falls back
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, special_tokens=SPECIAL_BASE + BYTE_TOKENS,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        raise SystemExit(f"BPE produced {tok.get_vocab_size()} pieces, expected {BASE_VOCAB}")

    # Reassemble as Phi-3 does it: byte tokens live only in the BPE vocabulary (not as added tokens, which
    # would match the literal text "<0x41>"); <unk> and <s> are special added tokens; </s> is added but not
    # special, with rstrip — the released Phi-3 flags, copied.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": c == "</s>",
         "normalized": False, "special": c != "</s>"}
        for i, c in enumerate(SPECIAL_BASE)]
    spec["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(c, rstrip=r, lstrip=False, single_word=False, normalized=False, special=True)
                            for c, r in ADDED_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    for i, (content, _) in enumerate(ADDED_TOKENS):
        assert tok.token_to_id(content) == BASE_VOCAB + i, content
    return tok


def tokenizer_config() -> dict:
    return {
        "add_bos_token": True,           # tokenizer.json's post-processor prepends <s> (as Phi-3's does)
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def encode_documents(tok, texts: list[str]) -> np.ndarray:
    """One int32 stream: <s> file₁ <|endoftext|> <s> file₂ <|endoftext|> …"""
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([BOS_ID] + enc.ids + [EOS_ID], dtype=np.int32))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------------------------
# 3. Model configurations
# ---------------------------------------------------------------------------------------------------------------
# Sizes are set by the package budget — both checkpoints together ≲ 20 MB in bfloat16 (2 bytes a parameter, so
# ≈ 10 M parameters in all; the 4160×D embedding and the untied lm_head take a large share at this scale) — and
# by the training budget: with ~3 M tokens in 30 minutes, a smaller model that sees more tokens wins.
# bfloat16 is what every Phi-3 checkpoint ships in, so loading them exercises phinano's bf16 path.
# Training length is 512 tokens for both.

def _ramp(n: int, lo: float, hi: float) -> list[float]:
    """n factors rising from lo to hi (rounded, as in released configs): one per rotary frequency pair."""
    return [round(lo + (hi - lo) * i / (n - 1), 4) for i in range(n)]


def _attention_factor(max_pos: int, orig_max: int) -> float:
    """LongRoPE's default scale sqrt(1 + ln(max/orig) / ln(orig)) (1.1902 for 131072/4096)."""
    return math.sqrt(1 + math.log(max_pos / orig_max) / math.log(orig_max))


def phi3_config():
    """nano-phi3: Phi-3(.5)-mini shrunk. D 192, 4 layers, 6 query heads over 2 KV heads (GQA 3:1, the ratio of
    Phi-4-mini's 24/8), head_dim 32, MLP ratio 2.67 as in mini (512/192 = 8192/3072). LongRoPE as in
    Phi-3.5-mini (short factors up to 512 tokens, long ones past it, attention factor 1.1055 from 2048/512),
    *and* a sliding window of 255 keys like Phi-3-mini-4k (W = trained length / 2 − 1): relative distances stay
    within what training saw, so the model keeps writing past 512 tokens. (A 5.6 M-parameter D 256 × 5 layer
    version learned no faster per token in this budget and ran 1.5× slower, so it saw fewer tokens.)"""
    from transformers import Phi3Config

    head_dim = 192 // 6
    return Phi3Config(
        vocab_size=VOCAB_SIZE, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=2048, original_max_position_embeddings=512,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": _ramp(head_dim // 2, 1.0, 1.5),
                         "long_factor": _ramp(head_dim // 2, 1.0, 4.0)},
        sliding_window=255, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,   # P13: never the default 32000
    )


def phimoe_config():
    """nano-phimoe: Phi-3.5-MoE shrunk. D 128, 4 layers, 8 query heads over 2 KV heads (GQA 4:1 like 32/8),
    16 experts of width 128, top-2 sparsemixer with router_jitter_noise 0.01 (the eval-time threshold) and
    input_jitter_noise 0.01 (training only), LayerNorm, biases on q/k/v/o and lm_head. LongRoPE as in the
    release: short/long factors, short_mscale = long_mscale, original 512 inside the rope dict; the window
    equals max_position_embeddings (full causal attention, like the release's 131072)."""
    from transformers import PhimoeConfig

    head_dim = 128 // 8
    mscale = round(_attention_factor(2048, 512), 6)
    return PhimoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,     # P13: PhimoeConfig defaults to 1e6
                         "short_factor": _ramp(head_dim // 2, 1.0, 1.5),
                         "long_factor": _ramp(head_dim // 2, 1.0, 4.0),
                         "short_mscale": mscale, "long_mscale": mscale,
                         "original_max_position_embeddings": 512},
        sliding_window=2048, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
        num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.01, input_jitter_noise=0.01,
        router_aux_loss_coef=0.01,   # release default 0.001; stronger so 16 experts balance within a short run
        attention_bias=True, lm_head_bias=True, attention_dropout=0.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )


# Training recipe per model: steps × batch × 512 tokens. Steps were chosen so both models train in about
# 30 minutes on 2 otherwise idle cores (nano-phi3 ≈ 4,300 tokens/s, nano-phimoe ≈ 5,500 tokens/s there):
# ≈ 3.1 M tokens (1.3 epochs) for nano-phi3, ≈ 3.3 M (1.3 epochs) for nano-phimoe. Peak learning rate 2e-3:
# a 104-step probe at 6e-3 ended worse (held-out perplexity 606 against 466).
RECIPES = {
    "nano-phi3": {"make_config": phi3_config, "steps": 760, "batch": 8, "seq_len": 512, "lr": 2e-3},
    "nano-phimoe": {"make_config": phimoe_config, "steps": 800, "batch": 8, "seq_len": 512, "lr": 2e-3},
}
MODEL_ORDER = ("nano-phi3", "nano-phimoe")


# ---------------------------------------------------------------------------------------------------------------
# 4. Training: AdamW + warmup + cosine, float32, random 512-token windows of the training stream
# ---------------------------------------------------------------------------------------------------------------

def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine down to peak/10 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_of_windows(stream: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int):
    import torch
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
    return torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def eval_windows(stream: np.ndarray, seq_len: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens over the held-out stream: (N, seq_len)."""
    n = len(stream) // seq_len
    if limit is not None and limit < n:   # evenly spaced subset for the cheap in-training estimate
        idx = np.linspace(0, n - 1, limit).round().astype(int)
    else:
        idx = np.arange(n)
    return np.stack([stream[i * seq_len:(i + 1) * seq_len] for i in idx]).astype(np.int64)


def heldout_loss(model, windows: np.ndarray, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of `windows`, eval mode."""
    import torch
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(windows[i:i + batch])
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def train_model(name: str, recipe: dict, train_stream: np.ndarray, heldout_stream: np.ndarray, *, steps: int,
                seed: int, eval_every: int, eval_windows_n: int, log_every: int) -> tuple[object, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    config = recipe["make_config"]()
    torch.manual_seed(seed)                       # model init and (MoE) the Gumbel noise of training routing
    rng = np.random.default_rng([seed, MODEL_ORDER.index(name)])   # batch sampling, independent per model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    is_moe = config.model_type == "phimoe"

    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed_tokens" not in pname else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe["lr"], betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, min(20, steps // 10))
    probe = eval_windows(heldout_stream, recipe["seq_len"], eval_windows_n)

    log = {"steps": steps, "batch": recipe["batch"], "seq_len": recipe["seq_len"], "peak_lr": recipe["lr"],
           "warmup_steps": warmup, "tokens_per_step": recipe["batch"] * recipe["seq_len"],
           "train": [], "heldout": []}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] {n_params:,} parameters, {steps} steps × {recipe['batch']}×{recipe['seq_len']} tokens",
          flush=True)
    t0 = time.time()
    for step in range(steps):
        if step % eval_every == 0:
            hl = heldout_loss(model, probe)
            log["heldout"].append({"step": step, "loss": hl, "time": time.time() - t0})
            print(f"[{name}] step {step:4d}  held-out loss {hl:.4f}", flush=True)
        lr = lr_at(step, steps, recipe["lr"], warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch_of_windows(train_stream, rng, recipe["batch"], recipe["seq_len"])
        inputs, labels = x[:, :-1], x[:, 1:]
        kwargs = {"output_router_logits": True} if is_moe else {}
        out = model(input_ids=inputs, **kwargs)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
        loss = lm_loss
        entry = {"step": step, "loss": lm_loss.item(), "lr": lr}
        if is_moe:   # Switch-style load balancing over the 16 experts of every layer
            loss = lm_loss + config.router_aux_loss_coef * out.aux_loss
            entry["aux_loss"] = out.aux_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        entry["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        entry["time"] = time.time() - t0
        log["train"].append(entry)
        if step % log_every == 0 or step == steps - 1:
            rate = (step + 1) * log["tokens_per_step"] / entry["time"]
            print(f"[{name}] step {step:4d}  loss {entry['loss']:.4f}  lr {lr:.2e}  {rate:,.0f} tok/s", flush=True)
    hl = heldout_loss(model, probe)
    log["heldout"].append({"step": steps, "loss": hl, "time": time.time() - t0})
    log["train_seconds"] = time.time() - t0
    log["parameters"] = n_params
    print(f"[{name}] done in {log['train_seconds']:.0f} s, held-out loss {hl:.4f}", flush=True)
    return model, log


# ---------------------------------------------------------------------------------------------------------------
# 5. Evaluation of the shipped (bfloat16-rounded) weights, routing statistics, samples
# ---------------------------------------------------------------------------------------------------------------

SAMPLE_PROMPT = "def fibonacci(n):"


def routing_stats(model, windows: np.ndarray, tok, batch: int = 8) -> dict:
    """Eval-mode sparsemixer choices on held-out text: per layer, how often each expert is picked (first or
    second), and for each expert of the last layer the tokens it is most often the first choice for."""
    from collections import Counter

    import torch
    layers = model.model.layers
    picks = [np.zeros(len(layers[0].mlp.router.weight), dtype=np.int64) for _ in layers]
    first_tokens = [Counter() for _ in range(len(picks[0]))]
    captured = {}
    hooks = [layer.mlp.router.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(i, out[2].detach().numpy()))
        for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                x = windows[i:i + batch]
                model(input_ids=torch.from_numpy(x))
                for li in range(len(layers)):
                    picks[li] += np.bincount(captured[li].ravel(), minlength=len(picks[li]))
                for tid, e in zip(x.ravel(), captured[len(layers) - 1][:, 0]):
                    first_tokens[e][int(tid)] += 1
    finally:
        for h in hooks:
            h.remove()
    return {"expert_share_per_layer": [(p / p.sum()).round(4).tolist() for p in picks],
            "last_layer_top_tokens": [[tok.id_to_token(t) for t, _ in c.most_common(6)] for c in first_tokens]}


def make_samples(model, tok, seed: int, max_new: int) -> dict:
    """Greedy and one sampled continuation of SAMPLE_PROMPT (prompt with <s>, as `tokenizer(prompt)` gives)."""
    import torch
    ids = torch.tensor([tok.encode(SAMPLE_PROMPT).ids])
    common = {"max_new_tokens": max_new, "eos_token_id": GENERATION_EOS, "pad_token_id": EOS_ID}
    greedy = model.generate(ids, do_sample=False, **common)[0].tolist()
    torch.manual_seed(seed)
    sampled = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95, top_k=0, **common)[0].tolist()
    # Decode prompt and continuation together, without the leading <s>: decoding the continuation alone would
    # lose the space of its first "▁word" to the decoder's leading-space strip (a SentencePiece quirk).
    return {"prompt": SAMPLE_PROMPT,
            "greedy": tok.decode(greedy[1:], skip_special_tokens=False),
            "sampled": tok.decode(sampled[1:], skip_special_tokens=False),
            "new_tokens": {"greedy": len(greedy) - ids.shape[1], "sampled": len(sampled) - ids.shape[1]},
            "sampling": {"temperature": 0.8, "top_p": 0.95, "seed": seed}}


# ---------------------------------------------------------------------------------------------------------------
# 6. Saving
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(model, tok, folder: Path) -> None:
    """config.json + model.safetensors (bfloat16) + generation_config.json + tokenizer files."""
    import torch
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=GENERATION_EOS, pad_token_id=EOS_ID)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    for path in folder.iterdir():     # safetensors writes 0600; packaged files must be world-readable
        path.chmod(0o644)


def evaluate_saved(folder: Path, tok, heldout_stream: np.ndarray, heldout_chars: int, seq_len: int, seed: int,
                   quick: bool) -> dict:
    """Reload the checkpoint as users get it (bf16 on disk, computed in float32) and measure it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = eval_windows(heldout_stream, seq_len, 8 if quick else None)
    loss = heldout_loss(model, windows)
    predicted = windows.shape[0] * (seq_len - 1)
    chars = heldout_chars * predicted / len(heldout_stream)   # characters those tokens cover, proportionally
    result = {"heldout_tokens": int(predicted), "heldout_loss": loss, "heldout_perplexity": math.exp(loss),
              "heldout_bits_per_char": loss * predicted / chars / math.log(2)}
    if model.config.model_type == "phimoe":
        result["routing"] = routing_stats(model, windows, tok)
    result["samples"] = make_samples(model, tok, seed, 16 if quick else 160)
    return result


# ---------------------------------------------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default phinano/nano, or build/nano-quick with --quick)")
    ap.add_argument("--model", choices=[*MODEL_ORDER, "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (results depend on it)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 6 steps, small evaluation, short samples")
    args = ap.parse_args(argv)

    import tokenizers
    import torch
    import transformers

    transformers.logging.set_verbosity_error()      # rope-key notices and progress bars, not our business
    transformers.utils.logging.disable_progress_bar()
    out = args.out or (REPO / ("build/nano-quick" if args.quick else "phinano/nano"))
    names = MODEL_ORDER if args.model == "all" else (args.model,)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    root = stdlib_root()
    train_files, heldout_files = list_corpus(root)
    train_texts = [read_source(p) for p in train_files]
    heldout_texts = [read_source(p) for p in heldout_files]
    print(f"stdlib {root}: {len(train_files)} training files ({sum(map(len, train_texts)) / 1e6:.2f} M chars), "
          f"{len(heldout_files)} held out ({sum(map(len, heldout_texts)) / 1e6:.3f} M chars)", flush=True)

    t0 = time.time()
    tok = train_tokenizer(train_texts)
    train_stream = encode_documents(tok, train_texts)
    heldout_stream = encode_documents(tok, heldout_texts)
    data_seconds = time.time() - t0
    chars_per_token = sum(map(len, train_texts)) / len(train_stream)
    print(f"tokenizer + encoding {data_seconds:.1f} s: {len(train_stream):,} training tokens, "
          f"{len(heldout_stream):,} held-out tokens, {chars_per_token:.2f} chars/token", flush=True)

    for name in names:
        recipe = dict(RECIPES[name], **({"lr": args.lr} if args.lr else {}))
        steps = args.steps or (6 if args.quick else recipe["steps"])
        model, log = train_model(name, recipe, train_stream, heldout_stream, steps=steps, seed=args.seed,
                                 eval_every=3 if args.quick else max(1, steps // 20),
                                 eval_windows_n=4 if args.quick else 16, log_every=1 if args.quick else 10)
        folder = out / name
        save_checkpoint(model, tok, folder)
        del model
        final = evaluate_saved(folder, tok, heldout_stream, sum(map(len, heldout_texts)), recipe["seq_len"],
                               args.seed, args.quick)
        log.update(final)
        log.update({
            "model": name, "architecture": json.loads((folder / "config.json").read_text())["architectures"][0],
            "seed": args.seed, "threads": args.threads, "quick": args.quick,
            "wall_seconds_total": time.time() - t_start, "data_seconds": data_seconds,
            "data": {"source": "Python standard library (sysconfig stdlib path)", "python": platform.python_version(),
                     "skip_dirs": sorted(SKIP_DIRS), "train_files": len(train_files),
                     "train_chars": sum(map(len, train_texts)), "train_tokens": len(train_stream),
                     "heldout_modules": list(HELD_OUT), "heldout_chars": sum(map(len, heldout_texts)),
                     "heldout_tokens": len(heldout_stream), "chars_per_token": chars_per_token},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
            "checkpoint_bytes": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
        })
        (folder / "training_log.json").write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")
        print(f"[{name}] saved to {folder}: held-out perplexity {final['heldout_perplexity']:.3f} "
              f"({final['heldout_bits_per_char']:.3f} bits/char)\n--- greedy ---\n{final['samples']['greedy']}\n"
              f"--- sampled ---\n{final['samples']['sampled']}\n", flush=True)
    print(f"all done in {time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
