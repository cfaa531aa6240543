"""Quantizing a checkpoint: `phinano quantize` writes a GGUF file, `phinano.load(..., quantize=)` does it in memory.

    phinano quantize --model microsoft/Phi-3-mini-4k-instruct --type q4_k_m --out phi3-mini-q4_k_m.gguf

Which tensors get which type is llama.cpp's rule (so llama.cpp and Ollama load the file as they would their
own): 1-D tensors (norms, biases) stay F32. For f16 and bf16 every matrix takes the chosen type. For q8_0,
q4_0, q4_1, q5_0 and q5_1 every matrix whose rows are whole blocks of 32 does (F16 otherwise), except that
the 4- and 5-bit files store the output head as Q6_K (`block_32_type`). q4_k_m, q5_k_m and q6_k are
llama.cpp's mixes of K-quant types, chosen per tensor as `llama-quantize` (without an importance matrix)
chooses them: see `k_mix_type`. Legacy blocks are rounded by the `gguf` package's reference quantizers,
K-quant blocks by formats/kquant_rounding.py, both bit for bit what llama.cpp writes.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import Config
from .errors import PhinanoError
from .formats.gguf_write import encode_tensor, write_gguf

# --type name -> the GGML type of every matrix, or the name of llama.cpp's mix of types (K_MIXES)
TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "f16": "F16", "bf16": "BF16",
         "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
# llama.cpp's file types (LLAMA_FTYPE_MOSTLY_*) that mix types -> the type of a matrix no rule singles out
K_MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
# llama.cpp's `tensor_type_fallback`: a type for rows that its 256-value super-blocks do not divide
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# GGML's types of 32-weight blocks, whose files llama.cpp's quantizer also shapes (`block_32_type`)
BLOCK_32 = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def check_type(name: str) -> str:
    if not isinstance(name, str) or name not in TYPES:
        raise PhinanoError(f"unknown quantization type {name!r}; choose one of {', '.join(TYPES)}")
    return TYPES[name]


def matrix_type(qtype: str, name: str, values, n_layers: int = 0, tied_embeddings: bool = False) -> str:
    """The storage of one tensor (GGUF name): F32 for 1-D tensors (as llama.cpp keeps them), llama.cpp's choice
    for a mix or a legacy type (n_layers and tied_embeddings are then needed), else the chosen type."""
    if len(values.shape) == 1:
        return "F32"
    if qtype in K_MIXES:
        return k_mix_type(qtype, name, values.shape, n_layers, tied_embeddings)
    if qtype in BLOCK_32:
        return block_32_type(qtype, name, values.shape, tied_embeddings)
    return qtype


def _kept_unquantized(gguf_name: str, shape) -> bool:
    """The tensors llama.cpp's quantizer never quantizes: 1-D ones, norms, the MoE router ffn_gate_inp."""
    return (len(shape) < 2 or not gguf_name.endswith("weight") or "_norm.weight" in gguf_name
            or "ffn_gate_inp.weight" in gguf_name)


def _is_output_head(gguf_name: str, tied_embeddings: bool) -> bool:
    """output.weight, or token_embd.weight when the head is tied (the file then has no output.weight)."""
    return gguf_name == "output.weight" or (tied_embeddings and gguf_name == "token_embd.weight")


def block_32_type(qtype: str, gguf_name: str, shape, tied_embeddings: bool = False) -> str:
    """The type llama.cpp's quantizer gives one tensor of a Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 file without an
    importance matrix (`llama_tensor_get_type`): the tensors it keeps (`_kept_unquantized`) F32; matrices whose
    rows 32 does not divide F16; in the 4- and 5-bit files the output head Q6_K (Q8_0 when 256 does not divide
    its rows); every other matrix qtype."""
    if _kept_unquantized(gguf_name, shape):
        return "F32"
    row = shape[-1]
    if row % 32:
        return "F16"
    if qtype != "Q8_0" and _is_output_head(gguf_name, tied_embeddings):
        return "Q8_0" if row % 256 else "Q6_K"
    return qtype


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def k_mix_type(mix: str, gguf_name: str, shape, n_layers: int, tied_embeddings: bool = False) -> str:
    """The type llama.cpp's quantizer gives one tensor of a Q4_K_M / Q5_K_M / Q6_K file without an importance
    matrix (`llama_tensor_get_type` in src/llama-quant.cpp, the rules that apply to Phi-3 and PhiMoE):

    - tensors llama.cpp never quantizes (1-D, norms, the MoE router ffn_gate_inp) stay F32, as converted;
    - output.weight (token_embd.weight too when the head is tied, i.e. there is no output.weight): Q6_K, or Q8_0
      when its rows are not a multiple of 256;
    - the attention values - attn_v, or Phi-3's fused attn_qkv, which llama.cpp counts as attn_v - and ffn_down
      (experts too), in layers where `use_more_bits`: Q6_K for Q4_K_M and Q5_K_M;
    - everything else: the mix's own type (Q4_K, Q5_K, Q6_K);
    - then rows that 256 does not divide fall back to Q5_0 / Q5_1 / Q8_0, and to F16 if 32 does not divide them.
    Rules for shapes no Phi model has (8 experts, 70B, Falcon) are left out.
    shape: the array's shape, rows last ((N, K) or experts' (E, N, K)); the layer is read from `blk.N.`."""
    if mix not in K_MIXES:
        raise PhinanoError(f"unknown type mix {mix!r}; choose one of {', '.join(K_MIXES)}")
    if _kept_unquantized(gguf_name, shape):
        return "F32"
    qtype, row = K_MIXES[mix], shape[-1]
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
    if _is_output_head(gguf_name, tied_embeddings):
        qtype = "Q8_0" if row % 256 else "Q6_K"
    elif any(part in gguf_name for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "ffn_down")):
        if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            qtype = "Q6_K"
    if row % 256 and qtype in FALLBACK:
        qtype = FALLBACK[qtype]
    return "F16" if row % 32 else qtype


def q4_k_m_type(gguf_name: str, shape, n_layers: int, tied_embeddings: bool = False) -> str:
    """The type of one tensor in a Q4_K_M file, llama.cpp's most used mix (see k_mix_type)."""
    return k_mix_type("Q4_K_M", gguf_name, shape, n_layers, tied_embeddings)


def quantize_tensors(tensors: dict, qtype: str) -> dict:
    """Every matrix of a checkpoint's tensors as a packed QuantizedTensor (1-D tensors as they are), each of the
    type llama.cpp would give it (matrices it keeps in F16/F32 stay as they are).

    One matrix at a time is widened to float32 and rounded, so memory holds the packed result plus one matrix."""
    from .formats.quantized import QuantizedTensor

    kinds = hf_mix_types(tensors, qtype) if qtype in K_MIXES or qtype in BLOCK_32 else {}
    out = {}
    for name, values in tensors.items():
        kind = kinds.get(name, qtype)
        if values.ndim != 2 or kind in ("F16", "BF16", "F32"):
            out[name] = values
            continue
        if values.shape[1] % 32:
            raise PhinanoError(f"{name}: rows of {values.shape[1]} cannot be cut into {kind} blocks of 32")
        out[name] = QuantizedTensor(kind, values.shape, encode_tensor(values, kind))  # widens bf16 bits itself
    return out


def hf_mix_types(tensors: dict, mix: str) -> dict:
    """{Hugging Face name: type} of a mix (or a type of 32-weight blocks, `block_32_type`) for a checkpoint's
    tensors: each name is translated as the GGUF writer translates it (per-expert matrices as the stacked
    tensor they go into); the layer count is read off the names, and the head counts as tied when there is
    no lm_head.weight (a tied checkpoint that still carries a copy of it gets the untied types: Q4_K rather
    than Q6_K for the embedding)."""
    import gguf

    layers = [int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")]
    n_layers = max(layers, default=-1) + 1
    moe = any(".block_sparse_moe.experts." in n for n in tensors)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHIMOE if moe else gguf.MODEL_ARCH.PHI3, n_layers)
    kinds = {}
    for name, values in tensors.items():
        stacked = re.sub(r"\.experts\.\d+\.", ".experts.", name)  # experts.3.w2.weight -> experts.w2.weight
        gname = names.get_name(stacked, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            kinds[name] = matrix_type(mix, gname, values, n_layers, "lm_head.weight" not in tensors)
        elif values.ndim >= 2 and mix in BLOCK_32:  # a tensor llama.cpp's files lack (a vision tower's): as chosen
            kinds[name] = mix
        elif values.ndim >= 2:
            raise PhinanoError(f"no GGUF name for tensor {name}, so no {mix} type for it")
    return kinds


def write_quantized(folder: Path, cfg: Config, tensors: dict, type_name: str, out: Path, vocab: dict | None) -> Path:
    """The checkpoint in `folder` as one GGUF file of the given type (tokenizer metadata `vocab` included)."""
    qtype = check_type(type_name)
    if cfg.tie_word_embeddings:
        tensors = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    tensors = {n: t for n, t in tensors.items() if not n.endswith("rotary_emb.inv_freq")}

    def type_of(gguf_name: str, values) -> str:
        return matrix_type(qtype, gguf_name, values, cfg.num_hidden_layers, cfg.tie_word_embeddings)

    return write_gguf(out, cfg, tensors, type_of, vocab, name=folder.name)
