"""One module per decoder architecture; the config's architecture picks it.

Every block module provides the same few names, so the model (model.py) never branches on the architecture:

    Layer                                   dataclass of one layer's weights, shapes in comments
    NORM_HAS_BIAS                           whether its norms (the final one too) carry a bias
    norm(ops, cfg, x, weight, bias)         the architecture's norm, (T, D) -> (T, D)
    forward_layer(ops, cfg, w, x, step, i)  one layer on the residual stream, (T, D) -> (T, D)
    layer_shapes(cfg, i)                    layer i's tensor names in a checkpoint, with shapes
    load_layer(tensors, cfg, i)             those tensors arranged as a Layer (views, no copies)
    active_parameters(cfg, total)           parameters one token uses
    FINAL_NORM                              optional: the final norm's checkpoint name (default "model.norm")

A new architecture is a new file here and one line in ARCHITECTURES.
"""

from __future__ import annotations

from types import ModuleType

from . import phi3, phi3small, phimoe

ARCHITECTURES: dict[str, ModuleType] = {
    "Phi3ForCausalLM": phi3,  # Phi-3-mini, -medium, 3.5-mini, Phi-4-mini
    "PhimoeForCausalLM": phimoe,  # Phi-3.5-MoE
    "Phi3SmallForCausalLM": phi3small,  # Phi-3-small-8k, -128k
    "Phi3VForCausalLM": phi3,  # Phi-3-vision, Phi-3.5-vision: the dense text model (image parts: phinano/vision/)
}


def block_module(cfg) -> ModuleType:
    """The block module of a config's architecture (config.py has already refused unknown ones)."""
    return ARCHITECTURES[cfg.architecture]
