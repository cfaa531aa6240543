"""Files on disk -> named weights. Nothing here knows what a layer is.

    hub.py          where a model comes from: a folder, a GGUF file, Ollama's store, a nano model, the Hub
    safetensors.py  Hugging Face checkpoints: memory-mapped reader (bf16 as uint16 bits), streamed writer
    gguf.py         llama.cpp / Ollama files: metadata -> config, tensors under the checkpoint's names
    gguf_write.py   writing GGUF files (phinano quantize); gguf_vocab.py: their tokenizer metadata
    quantized.py    GGML's packed block types as `QuantizedTensor`, which the kernels multiply as stored
    kquants.py      GGML's K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256), added to quantized.LAYOUTS here
    kquant_rounding.py  llama.cpp's rounding of floats into K-quant blocks (phinano quantize)
    ollama.py       Ollama's model store (manifests -> the GGUF blob)
    mapping.py      memory maps of weight files: 2 MiB pages asked for

`read_tensors(folder)` gives {checkpoint name: array} of a safetensors checkpoint; weights.py arranges them.
"""

from __future__ import annotations

from pathlib import Path

from . import kquants  # noqa: F401 - registers the K-quant layouts before any QuantizedTensor is made
from .safetensors import read_checkpoint


def read_tensors(folder: str | Path) -> dict:
    """Every tensor of the checkpoint in `folder`, by its checkpoint name, memory-mapped (no copies)."""
    return read_checkpoint(folder)
