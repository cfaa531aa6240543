"""`phinano diff`: run one checkpoint in phinano and in Transformers and say, stage by stage, where they part.

    phinano diff --model ./my-converted-phi3 --prompt "def add(a, b):"
    [OK]   embedding   max|diff| 0         tol 3.2e-04
    [OK]   layer 0     max|diff| 1.9e-06   tol 1.1e-03
    ...
    [DIFF] layer 2     max|diff| 4.1e+00   tol 1.3e-03      <- the first stage that differs is the one to read

For people porting the engine, writing a kernel, or checking a new or converted checkpoint. The stages are
what the model's observer hook shows (model.py): the embedding, each layer's residual stream, the final norm,
and the logits; on the Transformers side forward hooks catch the same tensors. Both run in float32 on the
same weights. A stage is OK when max|phinano - Transformers| <= rtol * max|Transformers| at that stage
(rtol 1e-4 by default, the bound the parity tests hold the logits to: float32 sums in another order). PhiMoE
also compares the routing: the same two experts for every token in every layer.

A .gguf file is compared against Transformers built from the file itself: its config (config_from_gguf) and
its tensors dequantized to float32 (hf_tensors + widen), written as a temporary checkpoint folder that
Transformers loads like any other. So a DIFF there is phinano reading the file wrongly, not the rounding of
the quantization.

torch and transformers are imported here only, when the command runs; the engine never needs them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PhinanoError

INSTALL = 'phinano diff needs torch and transformers: pip install torch transformers (or pip install "phinano[test]")'
RTOL = 1e-4
DEFAULT_PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
_MODEL_TYPES = {"Phi3ForCausalLM": "phi3", "PhimoeForCausalLM": "phimoe"}


@dataclass
class Stage:
    name: str  # "embedding", "layer 3", "final norm", "logits"
    diff: float  # max |phinano - Transformers|
    tol: float

    @property
    def ok(self) -> bool:
        return self.diff <= self.tol

    def line(self) -> str:
        return f"{'[OK]  ' if self.ok else '[DIFF]'} {self.name:<12} max|diff| {self.diff:<9.2g} tol {self.tol:.2g}"


def import_reference():
    """(torch, transformers), or a PhinanoError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError:
        raise PhinanoError(INSTALL) from None
    return torch, transformers


def phinano_stages(model, ids) -> tuple[dict[str, np.ndarray], list]:
    """{stage: (T, ...) float32} from phinano's observer, and the routing per layer (PhiMoE; [] if dense)."""
    seen: dict[str, np.ndarray] = {}
    routing: list = []

    def residual(layer: int, x: np.ndarray) -> None:  # layer -1 is the embedding
        seen["embedding" if layer < 0 else f"layer {layer}"] = np.array(x)

    observer = {"residual": residual, "final": lambda layer, x: seen.__setitem__("final norm", np.array(x)),
                "routing": lambda layer, r: routing.append(r)}
    seen["logits"] = model.forward(ids, observer=observer)
    return seen, routing


def transformers_stages(hf, ids) -> tuple[dict[str, np.ndarray], list]:
    """The same stages from Transformers, caught with forward hooks, and PhiMoE's routing from its routers:
    per layer (experts (T, 2), weights (T, 2))."""
    import torch

    seen: dict[str, np.ndarray] = {}
    routing: dict[int, tuple] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            seen[name] = tensor[0].detach().float().numpy()
        return hook

    def route(i: int):
        def hook(module, inputs, output):  # PhimoeTopKRouter: (router logits, weights, selected experts)
            _, weights, experts = output
            routing[i] = (experts.detach().numpy(), weights.detach().float().numpy())
        return hook

    inner = hf.model
    hooks = [inner.embed_tokens.register_forward_hook(keep("embedding")),
             inner.norm.register_forward_hook(keep("final norm"))]
    for i, layer in enumerate(inner.layers):
        hooks.append(layer.register_forward_hook(keep(f"layer {i}")))
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            hooks.append(router.register_forward_hook(route(i)))
    try:
        with torch.no_grad():
            seen["logits"] = hf(torch.tensor([list(ids)])).logits[0].float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return seen, [routing[i] for i in sorted(routing)]


def compare(ours: dict, theirs: dict, rtol: float, L: int) -> list[Stage]:
    stages = []
    for name in ["embedding", *(f"layer {i}" for i in range(L)), "final norm", "logits"]:
        a, b = ours[name].astype(np.float64), theirs[name].astype(np.float64)
        diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
        stages.append(Stage(name, diff, rtol * float(np.max(np.abs(b)))))
    return stages


def routing_line(ours: list, theirs: list) -> tuple[bool, str]:
    """PhiMoE: (same experts everywhere, one line). Experts must be identical for every token and layer (a
    different expert is a different computation, no tolerance applies); weights are reported."""
    pairs = sum(e.shape[0] for e, _ in ours)
    moved = sum(int(np.any(a != b, axis=-1).sum()) for (a, _), (b, _) in zip(ours, theirs))
    weights = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(ours, theirs))
    ok = moved == 0 and len(ours) == len(theirs)
    return ok, (f"{'[OK]  ' if ok else '[DIFF]'} {'routing':<12} {moved} of {pairs} token-layers sent to other "
                f"experts; weights max|diff| {weights:.2g}")


def reference_folder(location: Path, model, scratch: Path) -> Path:
    """A checkpoint folder Transformers can load: the folder itself, or for a GGUF file its config and its
    tensors dequantized to float32 (written into `scratch`)."""
    if location.is_dir():
        return location
    from .formats.gguf import hf_tensors, read_gguf
    from .formats.safetensors import write_safetensors
    from .kernels.reference import widen

    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None and cfg.pad_token_id < cfg.vocab_size else None
    # pad_token_id: GGUF metadata may not say; Transformers' default (32000) would be outside a small vocab
    raw = {**cfg.raw, "model_type": _MODEL_TYPES[cfg.architecture], "dtype": "float32", "pad_token_id": pad}
    (scratch / "config.json").write_text(json.dumps(raw, indent=1))
    tensors = {name: np.ascontiguousarray(widen(t)) for name, t in hf_tensors(read_gguf(location)).items()}
    write_safetensors(scratch / "model.safetensors", tensors)
    return scratch


def prompt_ids(model, prompt: str | None) -> list[int]:
    if model.tokenizer is not None:
        return model.tokenizer.encode(prompt if prompt is not None else DEFAULT_PROMPT)
    if prompt is not None:
        raise PhinanoError(f"{model.name}: no tokenizer to encode --prompt with; leave it out to use fixed token ids")
    V = model.config.vocab_size
    return [int(i) for i in (np.arange(40) * 37 + 3) % V]  # 40 fixed ids spread over the vocabulary


def run_diff(model_name: str, prompt: str | None = None, rtol: float = RTOL, backend: str = "numba",
             threads: int | None = None, revision: str | None = None, out=print) -> bool:
    """Print one [OK]/[DIFF] line per stage (and a last line for the routing of a PhiMoE model); True when
    every stage is OK."""
    import phinano

    torch, transformers = import_reference()
    from .formats.hub import resolve

    transformers.logging.set_verbosity_error()  # its notes on config spellings and loading bars are not ours
    transformers.logging.disable_progress_bar()

    location = resolve(model_name, revision=revision)
    model = phinano.load(str(location), backend=backend, threads=threads)
    model.name = model_name
    ids = prompt_ids(model, prompt)
    cfg = model.config
    if cfg.is_moe and len(ids) > cfg.original_max_position_embeddings:
        out(f"note: {len(ids)} tokens are past the original length {cfg.original_max_position_embeddings}: "
            "Transformers' PhiMoE keeps the short rope factors there, phinano (like the release) switches")
    ours, routing = phinano_stages(model, ids)
    with tempfile.TemporaryDirectory(prefix="phinano-diff-") as scratch:
        folder = reference_folder(location, model, Path(scratch))
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        theirs, their_routing = transformers_stages(hf, ids)
    out(f"{model_name}: {len(ids)} tokens, phinano ({backend}) vs Transformers {transformers.__version__}, "
        f"float32; tol = {rtol:g} x max|Transformers| of the stage")
    stages = compare(ours, theirs, rtol, cfg.num_hidden_layers)
    for stage in stages:
        out(stage.line())
    ok = all(stage.ok for stage in stages)
    if cfg.is_moe:
        same, line = routing_line(routing, their_routing)
        out(line)
        ok = ok and same
    first = next((s.name for s in stages if not s.ok), None if ok else "routing")
    if first is not None:
        out(f"first difference: {first}")
    return ok
