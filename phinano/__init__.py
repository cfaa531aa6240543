"""phinano: Microsoft's Phi-3 family in NumPy (+ Numba kernels), token for token equal to Transformers.

    import phinano
    model = phinano.load("microsoft/Phi-3-mini-4k-instruct")     # or a local folder, or "nano-phi3"
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    print(model.tokenizer.decode(model.generate(ids, 64)))
"""

from __future__ import annotations

from pathlib import Path

from .errors import PhinanoError

__all__ = ["load", "Model", "PhinanoError", "DEFAULT_MODEL"]
__version__ = "0.1.0"

DEFAULT_MODEL = "nano-phi3"  # the small model shipped inside the package


def load(path_or_repo_id: str | Path = DEFAULT_MODEL, *, backend: str = "numba", threads: int | None = None,
         revision: str | None = None, cache_dir: str | None = None, tokenizer: bool = True) -> "Model":
    """Load a Phi model from a local folder, a shipped nano model name, or a Hugging Face repo id.

    backend: "numba" (fast kernels) or "numpy" (the plain reference ops); both give the same tokens.
    threads: kernel threads (default: all cores). Weights are memory-mapped, not copied.
    """
    from .config import load_config, load_sampling_defaults, load_stop_ids
    from .formats.hub import resolve
    from .model import Model
    from .weights import load_weights

    folder = resolve(path_or_repo_id, revision=revision, cache_dir=cache_dir)
    config = load_config(folder)
    weights = load_weights(folder, config)
    tok = None
    if tokenizer and (folder / "tokenizer.json").is_file():
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(folder)
    model = Model(config, weights, tok, load_stop_ids(folder, config), backend_name=backend,
                  name=str(path_or_repo_id))
    model.sampling_defaults = load_sampling_defaults(folder)
    if threads is not None and hasattr(model.ops, "set_threads"):
        model.ops.set_threads(threads)
    return model


def __getattr__(name):  # `phinano.Model` without importing the model at package import time
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(name)
