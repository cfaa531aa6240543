"""Which released Phi model a config has the shape of, for `phinano info`.

Checkpoints name their class (Phi3ForCausalLM, PhimoeForCausalLM), not their model: Phi-3-mini, Phi-3.5-mini,
Phi-4-mini and Phi-4 are all Phi3ForCausalLM. The released members differ in a few numbers, listed here with the
value each release's config.json has (README's model table lists them all). A fine-tune keeps its base's
shape and is named after it; a shape no release has gets no name.
"""

from __future__ import annotations

from .config import Config

# (architecture, vocab V, hidden D, layers L, query heads H, kv heads KVH) -> the releases of that shape.
_DENSE = {
    ("Phi3ForCausalLM", 32064, 3072, 32, 32, 32): "Phi-3-mini",
    ("Phi3ForCausalLM", 32064, 5120, 40, 40, 10): "Phi-3-medium",
    ("Phi3ForCausalLM", 200064, 3072, 32, 24, 8): "Phi-4-mini",
    ("Phi3ForCausalLM", 100352, 5120, 40, 40, 10): "Phi-4",
    ("Phi3SmallForCausalLM", 100352, 4096, 32, 32, 8): "Phi-3-small",
    ("Phi3VForCausalLM", 32064, 3072, 32, 32, 32): "Phi-3-vision",
}


def family(cfg: Config) -> str | None:
    """The released model(s) this config is shaped like, e.g. "Phi-4-reasoning or Phi-4-reasoning-plus", or None."""
    if cfg.is_moe:
        if (cfg.vocab_size, cfg.hidden_size, cfg.num_local_experts) != (32064, 4096, 16):
            return None
        if cfg.intermediate_size == 6400 and cfg.q_size == cfg.hidden_size:
            return "Phi-3.5-MoE-instruct"
        if cfg.intermediate_size == 448:  # SlimMoE: experts slimmed from 6400 wide, heads of 128 in 2048
            return "Phi-tiny-MoE-instruct"
        return "a SlimMoE model (Phi-mini-MoE-instruct or Phi-tiny-MoE-instruct shaped)"
    base = _DENSE.get((cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers,
                       cfg.num_attention_heads, cfg.num_key_value_heads))
    longrope = cfg.rope_type == "longrope"
    if base == "Phi-3-mini":
        return "Phi-3-mini-128k-instruct or Phi-3.5-mini-instruct" if longrope else "Phi-3-mini-4k-instruct"
    if base == "Phi-3-medium":
        return "Phi-3-medium-128k-instruct" if longrope else "Phi-3-medium-4k-instruct"
    if base == "Phi-3-small":
        return "Phi-3-small-128k-instruct" if longrope else "Phi-3-small-8k-instruct"
    if base == "Phi-3-vision":  # both carry the 128k longrope text model
        return "Phi-3-vision-128k-instruct or Phi-3.5-vision-instruct"
    if base == "Phi-4-mini":
        return "Phi-4-mini-instruct or Phi-4-mini-reasoning"
    if base == "Phi-4":  # the reasoning models were trained on to 32768 positions, with rope_theta 500000
        return "Phi-4-reasoning or Phi-4-reasoning-plus" if cfg.max_position_embeddings > 16384 else "Phi-4"
    return None
