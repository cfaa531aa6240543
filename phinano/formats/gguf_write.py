"""Writing GGUF files that llama.cpp and Ollama load: llama.cpp's names, metadata and block layouts.

Tensor names come from the `gguf` package's own map of Hugging Face names (`gguf.get_tensor_name_map`), the one
llama.cpp's converter uses, so this writer and gguf.py's reader (which spells the map out by hand) check each
other. The metadata keys are those the converter writes for Phi-3 (Phi3MiniModel) and Phi-3.5-MoE
(PhiMoeModel); PhiMoE files also carry the release's short/long mscale, which the converter drops.
The file appears only when complete (written to `<path>.partial`, then renamed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import PhinanoError

GGUF_ARCH = {"Phi3ForCausalLM": "phi3", "PhimoeForCausalLM": "phimoe"}


def encode_tensor(values: np.ndarray, qtype: str) -> np.ndarray:
    """An (N, K) matrix (or a 1-D vector) in GGUF storage: F32, F16, BF16 or packed blocks (uint8). The input may be
    stored bf16 bits (uint16), float16 or float32; legacy block types round with the `gguf` package's reference
    quantizers, K-quants (which it cannot write) with kquant_rounding's port of llama.cpp's: both match llama.cpp."""
    import gguf

    from .kquant_rounding import QUANTIZERS as K_QUANTIZERS, quantize as quantize_k

    if values.dtype == np.uint16:  # bf16 bits: widen exactly
        values = (values.astype(np.uint32) << 16).view(np.float32)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F32":
        return values
    if qtype == "F16":
        return values.astype(np.float16)
    if qtype in K_QUANTIZERS:
        return quantize_k(values, qtype)
    try:
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])
    except (KeyError, NotImplementedError):
        raise PhinanoError(f"cannot write tensors of type {qtype}") from None


def _metadata(writer, cfg: Config, arch: str, tensors: dict) -> None:
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:  # SlimMoE: a head dim of its own
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_sliding_window(cfg.sliding_window or 0)  # 0 = no window, as the converter writes for Phi-4
    if cfg.rope_type == "longrope":
        writer.add_rope_scaling_attn_factors(cfg.rope_attention_factor)
        tensors["rope_factors_long.weight"] = np.asarray(cfg.rope_long_factor, np.float32)
        tensors["rope_factors_short.weight"] = np.asarray(cfg.rope_short_factor, np.float32)
        if cfg.rope_short_mscale is not None:
            writer.add_float32(f"{arch}.rope.scaling.short_mscale", cfg.rope_short_mscale)
            writer.add_float32(f"{arch}.rope.scaling.long_mscale", cfg.rope_long_mscale)
    if cfg.is_moe:
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_count(cfg.num_local_experts)


def gguf_names(cfg: Config, tensors: dict) -> dict:
    """Hugging Face names -> llama.cpp's, with PhiMoE's per-expert matrices stacked into (E, out, in)."""
    import gguf

    arch = GGUF_ARCH[cfg.architecture]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    out, experts = {}, {}
    for name, values in tensors.items():
        if ".block_sparse_moe.experts." in name:  # model.layers.i.block_sparse_moe.experts.e.w1.weight
            layer, e, w = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            experts.setdefault((layer, w), {})[e] = values
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise PhinanoError(f"no GGUF name for tensor {name}")
        out[mapped] = values
    for (layer, w), by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])
        out[names.get_name(f"model.layers.{layer}.block_sparse_moe.experts.{w}.weight",
                           try_suffixes=(".weight",))] = stacked
    return out


def write_gguf(path: str | Path, cfg: Config, tensors: dict, type_of, vocab: dict | None = None,
               name: str = "") -> Path:
    """Write `tensors` ({Hugging Face name: float32 array}) as a GGUF file of config `cfg`.

    type_of(gguf_name, array) -> "F32" | "F16" | "Q8_0" | ...: the storage of each tensor (norms and 1-D
    tensors should stay F32, as llama.cpp keeps them). vocab: tokenizer metadata ({GGUF key: value}), added as is.
    """
    import gguf

    if cfg.architecture not in GGUF_ARCH:
        raise PhinanoError(f"cannot write {cfg.architecture} as GGUF")
    arch = GGUF_ARCH[cfg.architecture]
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    if name:
        writer.add_name(name)
    named = gguf_names(cfg, tensors)
    _metadata(writer, cfg, arch, named)
    for key, value in (vocab or {}).items():
        _add_value(writer, key, value)
    # Tensor infos first (sizes follow from shapes and types), then each tensor rounded and written in turn:
    # memory holds one packed tensor at a time, not the whole file.
    types = {gname: "F32" if values.ndim == 1 else type_of(gname, values) for gname, values in named.items()}
    for gname, values in named.items():
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types[gname]]]
        nbytes = int(np.prod(values.shape)) // block * block_bytes
        writer.add_tensor_info(gname, values.shape, np.dtype(np.float32), nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[types[gname]])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname, values in named.items():
            writer.write_tensor_data(encode_tensor(values, types[gname]))
    except BaseException as error:
        writer.close()
        partial.unlink(missing_ok=True)  # nothing half-written stays behind
        if isinstance(error, OSError):  # no such folder, no permission, disk full
            raise PhinanoError(f"{path}: cannot write the GGUF file ({error.strerror or error})") from None
        raise
    writer.close()
    partial.replace(path)
    return path


def _add_value(writer, key: str, value) -> None:
    """One metadata entry with the GGUF value type its Python type implies (lists keep their element type)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple, np.ndarray)):  # ints -> int32, floats -> float32, strings (the converter's)
        writer.add_array(key, value.tolist() if isinstance(value, np.ndarray) else list(value))
    else:
        raise PhinanoError(f"GGUF metadata {key}: cannot store a {type(value).__name__}")
