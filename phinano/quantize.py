"""Quantizing a checkpoint: `phinano quantize` writes a GGUF file, `phinano.load(..., quantize=)` does it in memory.

    phinano quantize --model microsoft/Phi-3-mini-4k-instruct --type q4_0 --out phi3-mini-q4_0.gguf

Which tensors get which type is llama.cpp's rule (so llama.cpp and Ollama load the file as they would their
own): 1-D tensors (norms, biases) stay F32, every matrix takes the chosen type. Blocks are rounded by the `gguf`
package's reference quantizers, bit for bit what llama.cpp's converter writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config
from .errors import PhinanoError
from .formats.gguf_write import encode_tensor, write_gguf

# --type name -> the GGML type of every matrix
TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "f16": "F16", "bf16": "BF16"}


def check_type(name: str) -> str:
    if name not in TYPES:
        raise PhinanoError(f"unknown quantization type {name!r}; choose one of {', '.join(TYPES)}")
    return TYPES[name]


def matrix_type(qtype: str, name: str, values) -> str:
    """The storage of one tensor: F32 for 1-D tensors (as llama.cpp keeps them), else the chosen type."""
    return "F32" if len(values.shape) == 1 else qtype


def float32(values: np.ndarray) -> np.ndarray:
    """A stored tensor (bf16 bits, f16, f32) as float32."""
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(values, dtype=np.float32)


def quantize_tensors(tensors: dict, qtype: str) -> dict:
    """Every matrix of a checkpoint's tensors as a packed QuantizedTensor (1-D tensors as they are).

    One matrix at a time is widened to float32 and rounded, so memory holds the packed result plus one matrix."""
    from .formats.quantized import QuantizedTensor

    out = {}
    for name, values in tensors.items():
        if values.ndim != 2 or qtype in ("F16", "BF16", "F32"):
            out[name] = values
            continue
        if values.shape[1] % 32:
            raise PhinanoError(f"{name}: rows of {values.shape[1]} cannot be cut into {qtype} blocks of 32")
        out[name] = QuantizedTensor(qtype, values.shape, encode_tensor(float32(values), qtype))
    return out


def write_quantized(folder: Path, cfg: Config, tensors: dict, type_name: str, out: Path, vocab: dict | None) -> Path:
    """The checkpoint in `folder` as one GGUF file of the given type (tokenizer metadata `vocab` included)."""
    qtype = check_type(type_name)
    if cfg.tie_word_embeddings:
        tensors = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    tensors = {n: t for n, t in tensors.items() if not n.endswith("rotary_emb.inv_freq")}
    return write_gguf(out, cfg, tensors, lambda name, values: matrix_type(qtype, name, values), vocab,
                      name=folder.name)
