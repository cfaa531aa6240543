"""phinano: Microsoft's Phi-3 family in NumPy (+ Numba kernels), token for token equal to Transformers.

    import phinano
    model = phinano.load("microsoft/Phi-3-mini-4k-instruct")     # or a local folder, or "nano-phi3"
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    print(model.tokenizer.decode(model.generate(ids, 64)))
"""

from __future__ import annotations

from pathlib import Path

from .errors import PhinanoError

__all__ = ["load", "trace", "Model", "PhinanoError", "DEFAULT_MODEL"]
__version__ = "0.1.0"

DEFAULT_MODEL = "nano-phi3"  # the small model shipped inside the package


def load(path_or_repo_id: str | Path = DEFAULT_MODEL, *, backend: str = "numba", threads: int | None = None,
         revision: str | None = None, cache_dir: str | None = None, tokenizer: bool = True,
         quantize: str | None = None) -> "Model":
    """Load a Phi model from a local folder (safetensors), a GGUF file, `ollama:NAME[:TAG]` (Ollama's store),
    a shipped nano model name, or a Hugging Face repo id.

    backend: "numba" (fast kernels) or "numpy" (the plain reference ops); both give the same tokens.
    threads: kernel threads (default: all cores). Weights are memory-mapped, not copied.
    quantize: "q8_0", "q4_0", ... (phinano.quantize.TYPES): round a safetensors checkpoint's matrices into packed
    blocks while loading, so it decodes at int8/int4 speed without a conversion step (the packed weights are
    then in memory, not memory-mapped).
    """
    from .formats.hub import resolve
    from .model import Model

    location = resolve(path_or_repo_id, revision=revision, cache_dir=cache_dir)
    if location.is_file():
        if quantize is not None:
            raise PhinanoError(f"{location}: a GGUF file is already stored as it is; quantize applies to safetensors")
        config, weights, tok, stop_ids, defaults = _open_gguf(location, tokenizer)
    else:
        config, weights, tok, stop_ids, defaults = _open_folder(location, tokenizer, quantize)
    turn_end = None if tok is None else tok.turn_end_id()
    if turn_end is not None and turn_end not in stop_ids:  # a chat turn ends there, listed or not
        stop_ids = (*stop_ids, turn_end)  # (docs/pitfalls.md#stop-tokens)
    model = Model(config, weights, tok, stop_ids, backend_name=backend, name=str(path_or_repo_id))
    model.sampling_defaults = defaults
    if threads is not None:
        model.ops.set_threads(threads)
    return model


def trace(model, token_ids, *, attention=None, lens: bool = True):
    """One forward of `token_ids`, kept as arrays: the logit lens, attention maps of the layers asked for,
    PhiMoE routing, residual norms (phinano.tracing.trace and Trace say what each holds)."""
    from .tracing import trace as run_trace

    return run_trace(model, token_ids, attention=attention, lens=lens)


def _open_folder(folder: Path, tokenizer: bool, quantize: str | None = None):
    """A Hugging Face checkpoint folder: config.json, safetensors, tokenizer files, generation_config.json."""
    from .config import load_config, load_sampling_defaults, load_stop_ids
    from .formats import read_tensors
    from .weights import arrange

    config = load_config(folder)
    tensors = read_tensors(folder)
    if quantize is not None:  # check the checkpoint first: rounding a wrong one would be minutes wasted
        from .quantize import check_type, quantize_tensors
        from .weights import check_tensors, expected_shapes

        qtype = check_type(quantize)
        check_tensors(tensors, config, str(folder))
        tensors = quantize_tensors({n: tensors[n] for n in expected_shapes(config)}, qtype)
    weights = arrange(tensors, config, str(folder))
    if weights.vision is not None:
        from .vision import read_num_crops

        weights.vision.num_crops = read_num_crops(folder)
    tok = None
    if tokenizer and (folder / "tokenizer.json").is_file():
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(folder)
    elif tokenizer and config.is_phi3small:  # tiktoken ranks, not a tokenizer.json
        from .tokenizer_tiktoken import load_tiktoken_tokenizer

        tok = load_tiktoken_tokenizer(folder)
    return config, weights, tok, load_stop_ids(folder, config), load_sampling_defaults(folder)


def _open_gguf(path: Path, tokenizer: bool):
    """One GGUF file: hyperparameters, tensors and tokenizer all come from it."""
    from .formats.gguf import config_from_gguf, hf_tensors, read_gguf
    from .weights import arrange

    gguf = read_gguf(path)
    config = config_from_gguf(gguf)
    weights = arrange(hf_tensors(gguf), config, str(path), file_format="gguf")
    tok, stop_ids = None, config.eos_token_id
    if tokenizer and "tokenizer.ggml.tokens" in gguf.metadata:
        from .formats.gguf_vocab import tokenizer_parts
        from .tokenizer import Tokenizer

        backend, special, templates, byte_fallback, stop_ids = tokenizer_parts(gguf.metadata)
        tok = Tokenizer(backend, special, templates, byte_fallback)
    return config, weights, tok, stop_ids, {}


def __getattr__(name):  # `phinano.Model` without importing the model at package import time
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(name)
