"""A checkpoint's named tensors -> the model's weights, arranged by layer and checked against the config.

The names and shapes of a layer's tensors belong to its architecture (blocks/<arch>.py: `layer_shapes`,
`load_layer`); the parts every Phi model shares (embedding, final norm, head) are named here. Nothing is
copied: every array is a memory-mapped view of the file (or a packed quantized tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blocks import block_module
from .config import Config
from .errors import PhinanoError
from .formats import read_tensors
from .vision import IGNORED as VISION_IGNORED
from .vision import load_vision, vision_shapes


@dataclass
class Weights:
    embed: np.ndarray  # (V, D) embedding table, rows gathered by token id
    layers: list  # L x blocks.<arch>.Layer
    final_norm: np.ndarray  # (D,)
    final_norm_bias: np.ndarray | None  # (D,)  LayerNorm models only (PhiMoE)
    lm_head: np.ndarray  # (V, D), the embedding table itself when tied
    lm_head_bias: np.ndarray | None  # (V,)  PhiMoE only
    dtype: str  # storage of the matrices: "bfloat16", "float16", "float32" (or a quantized type name)
    nbytes: int  # bytes of every distinct tensor (a tied head is counted once)
    file_format: str = "safetensors"  # or "gguf": where the tensors were read from
    vision: object = None  # phinano.vision.Vision: Phi-3-vision's image tower and projector, else None


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of this config must have, with its shape."""
    D, V = cfg.hidden_size, cfg.vocab_size
    blocks = block_module(cfg)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        shapes.update(blocks.layer_shapes(cfg, i))
    final = final_norm_name(cfg)
    shapes[final + ".weight"] = (D,)
    if blocks.NORM_HAS_BIAS:
        shapes[final + ".bias"] = (D,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    if cfg.lm_head_bias:
        shapes["lm_head.bias"] = (V,)
    if cfg.has_vision:
        shapes.update(vision_shapes(D))
    return shapes


def final_norm_name(cfg: Config) -> str:
    """"model.norm", or the architecture's own name for it (Phi-3-small: "model.final_layernorm")."""
    return getattr(block_module(cfg), "FINAL_NORM", "model.norm")


def check_tensors(tensors: dict, cfg: Config, where: str) -> None:
    """Raise one error that names every missing, unexpected and mis-shaped tensor."""
    if cfg.num_hidden_layers > len(tensors):  # every layer has tensors: a damaged count would list them forever
        raise PhinanoError(f"{where}: the config says {cfg.num_hidden_layers} layers, but the checkpoint has only "
                           f"{len(tensors)} tensors")
    if cfg.is_moe and cfg.num_hidden_layers * cfg.num_local_experts > len(tensors):  # and every expert too
        raise PhinanoError(f"{where}: the config says {cfg.num_local_experts} experts in each of "
                           f"{cfg.num_hidden_layers} layers, but the checkpoint has only {len(tensors)} tensors")
    want = expected_shapes(cfg)

    def listed(names: list[str]) -> str:
        return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")

    problems = []
    missing = [n for n in want if n not in tensors]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {listed(missing)}")
    # A tied checkpoint may still carry an lm_head copy; rotary inv_freq buffers are harmless leftovers.
    ignorable = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    ignorable += VISION_IGNORED if cfg.has_vision else ()
    extra = [n for n in tensors if n not in want and n not in ignorable and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {listed(extra)}")
    wrong = [f"{n} is {tuple(tensors[n].shape)}, expected {s}" for n, s in want.items()
             if n in tensors and tuple(tensors[n].shape) != s]
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong[:8]))
    if problems:
        raise PhinanoError(f"{where}: checkpoint does not match config.json ({cfg.architecture}): " + " | ".join(problems))


def _dtype_name(array) -> str:
    names = {np.dtype(np.uint16): "bfloat16", np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}
    if hasattr(array, "qtype"):  # a QuantizedTensor
        return array.qtype
    return names.get(array.dtype, str(array.dtype))


def arrange(tensors: dict, cfg: Config, where: str = "checkpoint", file_format: str = "safetensors") -> Weights:
    """Check the named tensors against `cfg` and arrange them by layer (views, no copies)."""
    check_tensors(tensors, cfg, where)
    blocks = block_module(cfg)
    embed = tensors["model.embed_tokens.weight"]
    want = expected_shapes(cfg)
    return Weights(
        embed=embed,
        layers=[blocks.load_layer(tensors, cfg, i) for i in range(cfg.num_hidden_layers)],
        final_norm=tensors[final_norm_name(cfg) + ".weight"],
        final_norm_bias=tensors.get(final_norm_name(cfg) + ".bias"),
        lm_head=embed if cfg.tie_word_embeddings else tensors["lm_head.weight"],
        lm_head_bias=tensors.get("lm_head.bias"),
        dtype=_dtype_name(embed),
        nbytes=sum(int(tensors[name].nbytes) for name in want),
        file_format=file_format,
        vision=load_vision(tensors) if cfg.has_vision else None,
    )


def load_weights(folder: str | Path, cfg: Config) -> Weights:
    """Open the checkpoint in `folder`, check it against `cfg`, and arrange it by layer."""
    return arrange(read_tensors(folder), cfg, str(folder))


def parameter_counts(cfg: Config) -> tuple[int, int]:
    """(total, active per token), from the config alone. Equal for dense models; PhiMoE uses 2 of 16 experts."""
    total = sum(int(np.prod(shape)) for shape in expected_shapes(cfg).values())
    return total, block_module(cfg).active_parameters(cfg, total)
