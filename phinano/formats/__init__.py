"""Files on disk -> named weights. Nothing here knows what a layer is.

    hub.py          where a model comes from: a folder, a shipped nano model, the Hugging Face Hub
    safetensors.py  Hugging Face checkpoints: memory-mapped reader (bf16 as uint16 bits), streamed writer
    quantized.py    packed quantized weights (blocks of ints + scales) that the kernels multiply as they are

`read_tensors(folder)` gives {checkpoint name: array} for any supported format; weights.py arranges them.
"""

from __future__ import annotations

from pathlib import Path

from .safetensors import read_checkpoint


def read_tensors(folder: str | Path) -> dict:
    """Every tensor of the checkpoint in `folder`, by its checkpoint name, memory-mapped (no copies)."""
    return read_checkpoint(folder)
