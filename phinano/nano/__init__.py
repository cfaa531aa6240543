"""The two small checkpoints that ship inside phinano, so the first command works offline in seconds.

    nano-phi3    Phi3ForCausalLM,   3.2 M parameters (LongRoPE, sliding window, GQA)       — the default model
    nano-phimoe  PhimoeForCausalLM, 4.4 M parameters (16 experts, top-2 sparsemixer)

Each folder is an ordinary Hugging Face checkpoint (config.json, model.safetensors in bfloat16, tokenizer.json,
tokenizer_config.json, generation_config.json, plus training_log.json) and is loaded by the same code as a Hub
download. They were trained by scripts/train_nano.py on the Python standard library; docs/nano.md says how, and
what they can and cannot do. No engine code lives here.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

DEFAULT_MODEL = "nano-phi3"   # what `phinano generate` uses when no --model is given

NANO_MODELS: dict[str, Path] = {
    "nano-phi3": _HERE / "nano-phi3",
    "nano-phimoe": _HERE / "nano-phimoe",
}


def nano_path(name: str) -> Path | None:
    """The folder of the nano model called `name`, or None if `name` is not a nano model or its files are not
    installed (no config.json there). Anything else — a Hub id, a local folder — is for the caller to resolve."""
    path = NANO_MODELS.get(name)
    if path is None or not (path / "config.json").is_file():
        return None
    return path
